"""Every store operation and state transition, on every backend (SQLite in a real file under tmp_path,
memory, and PostgreSQL in a schema of the test's own on the real server), each on asyncio+uvloop and trio."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_store_support import (
    BACKENDS,
    OTHER_PAN,
    PAN_KEY,
    TEST_PAN,
    FakeClock,
    Recorder,
    backend,
    open_store,
    request,
)

from gateway.iso.message import mask_pan
from gateway.store import (
    DuplicateRequest,
    InvalidRecord,
    NotFound,
    NotReversible,
    ReversalInitiator,
    SafState,
    StateConflict,
    TxnKind,
    TxnState,
    pan_fingerprint,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(params=BACKENDS)
def kind(request: pytest.FixtureRequest) -> str:
    return backend(request)


# --- journal -----------------------------------------------------------------------------------------


async def test_record_request_is_pending_and_keeps_the_request(kind: str, tmp_path: Path) -> None:
    clock = FakeClock()
    async with open_store(kind, tmp_path, clock=clock) as store:
        first = await store.record_request(request("000001"))
        second = await store.record_request(request("000002", amount=2500))
        assert second > first
        rec = await store.get(second)
        assert rec is not None
        assert (rec.txn_id, rec.state, rec.amount, rec.terminal_stan) == (
            second,
            TxnState.PENDING,
            2500,
            "000002",
        )
        assert rec.kind is TxnKind.PURCHASE
        assert rec.pan_masked == mask_pan(TEST_PAN)
        assert rec.pan_fingerprint == pan_fingerprint(PAN_KEY, TEST_PAN)
        assert (rec.host_mti, rec.host_stan, rec.transmission_datetime) == ("0200", "000002", "1123101500")
        assert rec.created_at == rec.updated_at == clock.now
        assert await store.get(999_999) is None


async def test_duplicate_terminal_stan_is_refused_but_a_terminal_reversal_may_repeat_it(
    kind: str, tmp_path: Path
) -> None:
    async with open_store(kind, tmp_path) as store:
        original = await store.record_request(request("000007"))
        with pytest.raises(DuplicateRequest) as err:
            await store.record_request(request("000007", amount=5))
        assert (err.value.terminal_id, err.value.batch, err.value.stan) == ("T0000001", "000001", "000007")
        # the same STAN in another batch or on another terminal is another transaction
        await store.record_request(request("000007", batch="000002"))
        await store.record_request(request("000007", terminal_id="T0000002"))
        # a terminal's 0400 carries the original's STAN: journalled, and not mistaken for the original
        rev = await store.record_request(
            request("000007", kind="reversal", terminal_mti="0400", orig_txn_id=original)
        )
        found = await store.find_original("T0000001", "000001", "000007")
        assert found is not None and found.txn_id == original
        assert [r.txn_id for r in await store.find_referencing(original)] == [rev]


async def test_record_outcome_transitions(kind: str, tmp_path: Path) -> None:
    async with open_store(kind, tmp_path) as store:
        txn = await store.record_request(request("000001"))
        await store.record_outcome(txn, "completed", rc="00", auth_code="123456", rrn="000000000042")
        rec = await store.get(txn)
        assert (rec.state, rec.rc, rec.auth_code, rec.rrn, rec.approved) == (
            TxnState.COMPLETED,
            "00",
            "123456",
            "000000000042",
            True,
        )
        # the approval was journalled, then the terminal could not be reached: allowed, values kept
        await store.record_outcome(txn, TxnState.UNDELIVERABLE)
        rec = await store.get(txn)
        assert (rec.state, rec.auth_code, rec.rrn) == (TxnState.UNDELIVERABLE, "123456", "000000000042")
        with pytest.raises(StateConflict) as err:
            await store.record_outcome(txn, "declined", rc="05")
        assert (err.value.current, err.value.ident) == ("undeliverable", txn)
        assert (await store.get(txn)).state == TxnState.UNDELIVERABLE  # the refused write changed nothing

        declined = await store.record_request(request("000002"))
        await store.record_outcome(declined, "declined", rc="51")
        await store.record_outcome(declined, "declined", rc="51")  # a retried write is harmless
        with pytest.raises(StateConflict):
            await store.record_outcome(declined, "completed", rc="00")
        with pytest.raises(NotFound):
            await store.record_outcome(12345, "completed")
        with pytest.raises(InvalidRecord):
            await store.record_outcome(declined, "approved-ish")
        with pytest.raises(InvalidRecord):
            await store.record_outcome(declined, "pending")  # not an outcome
        with pytest.raises(InvalidRecord):
            await store.record_outcome(declined, "declined", rc="TOOLONG")


async def test_an_outcome_recorded_soon_is_seen_by_the_next_read(kind: str, tmp_path: Path) -> None:
    """record_outcome_soon is not awaited, yet any read in the process sees it (reads flush first), and
    its failure (a conflicting state) goes to the handler instead of being raised."""
    failures: list[BaseException] = []
    async with open_store(kind, tmp_path) as store:
        txn = await store.record_request(request("000001"))
        store.record_outcome_soon(txn, "completed", rc="00", rrn="123456789012", auth_code="A1B2C3",
                                  on_error=failures.append)
        rec = await store.get(txn)
        assert rec is not None and (rec.state, rec.rc, rec.rrn) == (TxnState.COMPLETED, "00", "123456789012")
        store.record_outcome_soon(txn, "declined", rc="51", on_error=failures.append)  # completed is final
        assert (await store.get(txn)).state is TxnState.COMPLETED  # type: ignore[union-attr]
        with pytest.raises(InvalidRecord):  # bad arguments still raise at once
            store.record_outcome_soon(txn, "completed", rc="0000", on_error=failures.append)
    assert len(failures) == 1 and isinstance(failures[0], StateConflict)


async def test_unknown_outcomes_are_the_pending_rows(kind: str, tmp_path: Path) -> None:
    async with open_store(kind, tmp_path) as store:
        ids = [await store.record_request(request(f"{i:06d}")) for i in range(1, 6)]
        await store.record_outcome(ids[0], "completed", rc="00")
        await store.record_outcome(ids[2], "declined", rc="05")
        await store.record_timeout_and_queue_reversal(ids[3])
        assert [r.txn_id for r in await store.unknown_outcomes()] == [ids[1], ids[4]]


async def test_lookups_by_rrn_host_stan_and_fingerprint(kind: str, tmp_path: Path) -> None:
    async with open_store(kind, tmp_path) as store:
        a = await store.record_request(
            request("000001", host_stan="400001", transmission_datetime="1123101500")
        )
        b = await store.record_request(request("000002", pan=OTHER_PAN, host_stan="400002"))
        c = await store.record_request(
            request("000003", host_stan="400001", transmission_datetime="1124101500")
        )
        await store.record_outcome(a, "completed", rc="00", rrn="RRN000000001")
        await store.record_outcome(b, "completed", rc="00", rrn="RRN000000002")
        assert (await store.find_by_rrn("RRN000000002")).txn_id == b
        assert await store.find_by_rrn("RRN000000002", terminal_id="T0000009") is None
        assert await store.find_by_rrn("NOPE") is None
        # host STANs wrap: the newest wins unless field 7 says which
        assert (await store.find_by_host_stan("400001")).txn_id == c
        assert (await store.find_by_host_stan("400001", transmission_datetime="1123101500")).txn_id == a
        assert await store.find_by_host_stan("499999") is None
        same_card = await store.find_by_fingerprint(store.fingerprint(TEST_PAN))
        assert [r.txn_id for r in same_card] == [c, a]
        assert [r.txn_id for r in await store.find_by_fingerprint(store.fingerprint(OTHER_PAN), limit=1)] == [
            b
        ]
        assert await store.find_by_fingerprint("") == []
        assert await store.find_original("T0000001", "000001", "000099") is None


async def test_void_and_refund_reference_their_original(kind: str, tmp_path: Path) -> None:
    async with open_store(kind, tmp_path) as store:
        sale = await store.record_request(request("000001", amount=800))
        await store.record_outcome(sale, "completed", rc="00", rrn="RRN000000001", auth_code="A1B2C3")
        # a void the host declined: the sale stands, so a partial refund of it may follow
        void = await store.record_request(
            request(
                "000002",
                kind="void",
                processing_code="200000",
                amount=800,
                orig_txn_id=sale,
                orig_batch="000001",
                orig_stan="000001",
                orig_rrn="RRN000000001",
                orig_auth_code="A1B2C3",
            )
        )
        await store.record_outcome(void, "declined", rc="05")
        refund = await store.record_request(
            request(
                "000003",
                kind="refund",
                terminal_mti="0220",
                processing_code="200000",
                amount=300,
                orig_txn_id=sale,
                orig_rrn="RRN000000001",
                orig_date="1123",
            )
        )
        refs = await store.find_referencing(sale)
        assert [(r.txn_id, r.kind) for r in refs] == [(void, TxnKind.VOID), (refund, TxnKind.REFUND)]
        assert refs[0].orig_auth_code == "A1B2C3" and refs[1].orig_date == "1123"
        with pytest.raises(InvalidRecord) as err:
            await store.record_request(request("000004", kind="void", orig_txn_id=424242))
        assert err.value.field == "orig_txn_id"


async def test_late_answer_is_journalled_without_changing_the_state(kind: str, tmp_path: Path) -> None:
    clock = FakeClock()
    async with open_store(kind, tmp_path, clock=clock) as store:
        txn = await store.record_request(request("000001"))
        await store.record_timeout_and_queue_reversal(txn)
        # the host's approval turns up after the timeout: an outcome is refused...
        with pytest.raises(StateConflict) as err:
            await store.record_outcome(txn, "completed", rc="00")
        assert err.value.current == TxnState.REVERSAL_QUEUED
        # ...and journalled as a late answer instead
        clock.now += 12
        late = await store.record_late_answer(
            txn,
            "00",
            auth_code="999999",
            rrn="RRN000000777",
            host_mti="0210",
            host_stan="000001",
            terminal_id="T0000001",
            amount=1000,
        )
        rec = await store.get(txn)
        assert (rec.state, rec.late_rc, rec.late_at) == (TxnState.REVERSAL_QUEUED, "00", clock.now)
        assert rec.auth_code is None  # never promoted to the transaction's own outcome
        orphan = await store.record_late_answer(None, "05", host_stan="123456")
        answers = await store.late_answers()
        assert [(a.late_id, a.txn_id, a.rc) for a in answers] == [
            (orphan.late_id, None, "05"), (late.late_id, txn, "00"),
        ]
        assert [a.late_id for a in await store.late_answers(txn_id=txn)] == [late.late_id]
        assert not late.reopened  # its reversal is still queued: nothing to reopen
        assert answers[1].auth_code == "999999" and answers[1].received_at == clock.now
        with pytest.raises(NotFound):
            await store.record_late_answer(31337, "00")
        # a host answer with no field 39 is still journalled
        assert (await store.record_late_answer(txn, "")).late_id > late.late_id


async def test_list_transactions_filters_newest_first(kind: str, tmp_path: Path) -> None:
    async with open_store(kind, tmp_path) as store:
        ids = [
            await store.record_request(request(f"{i:06d}", terminal_id=f"T000000{i % 2}")) for i in range(6)
        ]
        await store.record_outcome(ids[4], "completed", rc="00")
        assert [r.txn_id for r in await store.list_transactions(limit=3)] == ids[::-1][:3]
        assert [r.txn_id for r in await store.list_transactions(terminal_id="T0000001")] == [
            ids[5],
            ids[3],
            ids[1],
        ]
        assert [r.txn_id for r in await store.list_transactions(state="completed")] == [ids[4]]
        assert await store.list_transactions(batch="000009") == []
        with pytest.raises(InvalidRecord):
            await store.list_transactions(limit=0)


async def test_fingerprint_needs_the_key(kind: str, tmp_path: Path) -> None:
    async with open_store(kind, tmp_path) as store:
        assert store.fingerprint(TEST_PAN) == pan_fingerprint(PAN_KEY, TEST_PAN)
    async with open_store(kind, tmp_path, pan_key=None) as store:
        with pytest.raises(InvalidRecord) as err:
            store.fingerprint(TEST_PAN)
        assert err.value.field == "pan_key" and TEST_PAN not in str(err.value)


# --- reversals and the SAF queue ------------------------------------------------------------------


async def test_timeout_queues_a_reversal_atomically(kind: str, tmp_path: Path) -> None:
    clock = FakeClock()
    async with open_store(kind, tmp_path, clock=clock) as store:
        txn = await store.record_request(request("000001", amount=4200))
        queued = await store.record_timeout_and_queue_reversal(txn)
        assert queued and queued.created
        entry = queued.entry
        assert (
            entry.txn_id,
            entry.state,
            entry.reason,
            entry.initiator,
            entry.attempts,
            entry.is_repeat,
        ) == (txn, SafState.PENDING, "98", ReversalInitiator.GATEWAY, 0, False)
        assert entry.queued_at == entry.next_attempt_at == clock.now
        # the entry carries what a 0400/0420 needs (no PAN): STANs, field 7, amount, MTIs
        assert (
            entry.txn.host_stan,
            entry.txn.transmission_datetime,
            entry.txn.amount,
            entry.txn.host_mti,
        ) == ("000001", "1123101500", 4200, "0200")
        rec = await store.get(txn)
        assert (rec.state, rec.reversed_from, rec.reversal_reason, rec.reversal_initiator) == (
            TxnState.REVERSAL_QUEUED,
            TxnState.TIMED_OUT,
            "98",
            ReversalInitiator.GATEWAY,
        )
        assert [e.saf_id for e in await store.due_reversals(clock.now)] == [entry.saf_id]


async def test_queueing_twice_is_idempotent(kind: str, tmp_path: Path) -> None:
    async with open_store(kind, tmp_path) as store:
        txn = await store.record_request(request("000001"))
        await store.record_outcome(txn, "completed", rc="00")
        first = await store.queue_reversal(txn, "96", initiator="terminal")
        again = await store.queue_reversal(txn, "98")
        timeout_again = await store.record_timeout_and_queue_reversal(txn)
        assert first.created and not again and not again.created and not timeout_again
        assert again.saf_id == first.saf_id == timeout_again.saf_id
        assert again.entry.reason == "96" and again.entry.initiator == ReversalInitiator.TERMINAL
        assert len(await store.list_saf()) == 1
        rec = await store.get(txn)
        assert (rec.reversed_from, rec.reversal_reason) == (TxnState.COMPLETED, "96")
        # still one entry after it is acknowledged, parked or dropped
        await store.ack_reversal(first.saf_id, "00")
        assert not await store.queue_reversal(txn, "06")
        assert len(await store.list_saf()) == 1


async def test_queue_with_outcome_and_refusals(kind: str, tmp_path: Path) -> None:
    async with open_store(kind, tmp_path) as store:
        rejected = await store.record_request(request("000001"))
        queued = await store.queue_reversal(
            rejected, "A0", state="host_rejected", rc="00", auth_code="777777"
        )
        rec = await store.get(rejected)
        assert (rec.state, rec.reversed_from, rec.rc, rec.auth_code) == (
            TxnState.REVERSAL_QUEUED,
            TxnState.HOST_REJECTED,
            "00",
            "777777",
        )
        assert queued.entry.txn.auth_code == "777777"  # field 38 of the reversal

        undeliverable = await store.record_request(request("000002"))
        await store.record_outcome(undeliverable, "undeliverable", rc="00")
        await store.queue_reversal(undeliverable, "96")
        assert (await store.get(undeliverable)).reversed_from == TxnState.UNDELIVERABLE

        in_flight = await store.record_request(request("000003"))
        held = await store.queue_reversal(
            in_flight, "06", initiator=ReversalInitiator.TERMINAL, not_before=1e12
        )
        assert held.entry.next_attempt_at == 1e12  # waits until the original's own timeout has passed
        assert (await store.get(in_flight)).reversed_from == TxnState.PENDING

        declined = await store.record_request(request("000004"))
        await store.record_outcome(declined, "declined", rc="51")
        with pytest.raises(NotReversible):
            await store.queue_reversal(declined, "06")
        with pytest.raises(StateConflict):  # declined cannot become host_rejected
            await store.queue_reversal(declined, "A0", state="host_rejected")
        with pytest.raises(NotFound):
            await store.queue_reversal(99_999, "98")
        with pytest.raises(InvalidRecord):
            await store.queue_reversal(declined, "timeout")  # a reason is a 2-character code
        with pytest.raises(InvalidRecord):
            await store.queue_reversal(declined, "98", state="pending")
        with pytest.raises(InvalidRecord):
            await store.queue_reversal(declined, "98", initiator="somebody")
        assert (await store.get(declined)).state == TxnState.DECLINED
        assert len(await store.list_saf()) == 3


async def test_attempts_ack_and_repeat_flag(kind: str, tmp_path: Path) -> None:
    clock = FakeClock()
    async with open_store(kind, tmp_path, clock=clock) as store:
        txn = await store.record_request(request("000001"))
        saf_id = (await store.record_timeout_and_queue_reversal(txn)).saf_id
        now = clock.now
        # a timed-out 0400 counts as an attempt; the entry is due again only after the back-off
        assert await store.mark_reversal_attempt(saf_id, now, now + 5, "timeout after 10s") == 1
        assert await store.due_reversals(now + 4) == []
        (entry,) = await store.due_reversals(now + 5)
        assert (entry.attempts, entry.total_attempts, entry.is_repeat) == (1, 1, True)  # next one is a 0401
        assert (entry.last_attempt_at, entry.last_error) == (now, "timeout after 10s")
        assert await store.mark_reversal_attempt(saf_id, now + 5, now + 15, "host answered 96") == 2
        await store.ack_reversal(saf_id, "00")
        await store.ack_reversal(saf_id, "00")  # repeated acknowledgement: no change, no error
        entry = await store.get_saf(saf_id)
        assert (entry.state, entry.ack_rc, entry.attempts) == (SafState.DONE, "00", 2)
        rec = await store.get(txn)
        assert (rec.state, rec.reversal_rc) == (TxnState.REVERSED, "00")
        assert await store.due_reversals(now + 1000) == []
        with pytest.raises(StateConflict):
            await store.mark_reversal_attempt(saf_id, now, now, "late")
        with pytest.raises(NotFound):
            await store.ack_reversal(4242, "00")
        assert await store.get_saf(4242) is None


async def test_late_approval_after_a_00_reopens_only_for_a_host_that_answers_00_for_unbooked_originals(
        kind: str, tmp_path: Path) -> None:
    """`unknown_rc` says what the host answers to a reversal whose original it has not booked. By
    default (25) a 00 is a real reversal: a late approval after it changes nothing. With "00" that 00
    may have come before the booking, so a MAC-verified late approval reopens the reversal as after a
    25; a decline or an unverified approval still does not."""
    clock = FakeClock()
    async with open_store(kind, tmp_path, clock=clock) as store:
        ids = []
        for stan in ("000001", "000002"):
            txn = await store.record_request(request(stan))
            saf_id = (await store.record_timeout_and_queue_reversal(txn)).saf_id
            assert await store.ack_reversal(saf_id, "00", attempt_at=clock.now) is True
            ids.append((txn, saf_id))
        (booked, _), (unbooked, unbooked_saf) = ids
        clock.now += 3
        assert not (await store.record_late_answer(booked, "00")).reopened
        assert (await store.get(booked)).state is TxnState.REVERSED
        assert not (await store.record_late_answer(unbooked, "05", unknown_rc="00")).reopened
        assert not (await store.record_late_answer(unbooked, "00", authenticated=False, unknown_rc="00")).reopened
        assert (await store.get(unbooked)).state is TxnState.REVERSED
        assert (await store.record_late_answer(unbooked, "00", unknown_rc="00")).reopened
        rec = await store.get(unbooked)
        assert (rec.state, rec.reversal_rc) == (TxnState.REVERSAL_QUEUED, None)
        (entry,) = await store.due_reversals(clock.now)
        assert (entry.saf_id, entry.is_repeat) == (unbooked_saf, True)
        with pytest.raises(InvalidRecord):
            await store.record_late_answer(booked, "00", unknown_rc="12")


async def test_late_approval_reopens_a_reversal_the_host_answered_25(kind: str, tmp_path: Path) -> None:
    """The reversal overtook its original at the host ("25, not found"); then the host approves the
    original after all: the journal puts the reversal back in the queue, as a repeat, due now."""
    clock = FakeClock()
    observer = Recorder()
    async with open_store(kind, tmp_path, clock=clock, observer=observer) as store:
        txn = await store.record_request(request("000001"))
        other = await store.record_request(request("000002"))
        saf_id = (await store.record_timeout_and_queue_reversal(txn)).saf_id
        other_saf = (await store.record_timeout_and_queue_reversal(other)).saf_id
        for _ in range(2):  # the 25 came on the second attempt
            await store.mark_reversal_attempt(saf_id, clock.now, clock.now, "host answered 96")
        assert await store.ack_reversal(saf_id, "25", attempt_at=clock.now) is True
        assert await store.ack_reversal(other_saf, "00", attempt_at=clock.now) is True
        assert (await store.get(txn)).state is TxnState.REVERSED
        assert await store.saf_depth() == 0

        clock.now += 3
        # nothing to reopen: a reversal acknowledged 00, a late decline, an approval whose MAC failed
        assert not (await store.record_late_answer(other, "00")).reopened
        assert not (await store.record_late_answer(txn, "05")).reopened
        assert not (await store.record_late_answer(txn, "00", authenticated=False)).reopened
        assert (await store.get(other)).state is TxnState.REVERSED
        rec = await store.get(txn)
        assert (rec.state, rec.late_rc, rec.late_approved_at) == (TxnState.REVERSED, "00", None)
        assert await store.due_reversals(clock.now + 1000) == []

        assert (await store.record_late_answer(txn, "00")).reopened
        rec = await store.get(txn)
        assert (rec.state, rec.reversal_rc, rec.late_approved_at) == (TxnState.REVERSAL_QUEUED, None, clock.now)
        (entry,) = await store.due_reversals(clock.now)
        # one attempt counted (the next goes as a 0401), the rest of the budget fresh
        assert (entry.saf_id, entry.state, entry.attempts, entry.total_attempts, entry.is_repeat) == (
            saf_id, SafState.PENDING, 1, 3, True,
        )
        assert (entry.ack_rc, entry.next_attempt_at) == (None, clock.now)
        assert entry.last_error == "the host approved the original after answering its reversal 25"
        assert await store.saf_depth() == 1 and observer.depths[-1] == 1
        assert not (await store.record_late_answer(txn, "00")).reopened  # already queued again
        # the repeat finds the original now
        assert await store.ack_reversal(saf_id, "00", attempt_at=clock.now) is True
        rec = await store.get(txn)
        assert (rec.state, rec.reversal_rc) == (TxnState.REVERSED, "00")
        assert (await store.get_saf(saf_id)).total_attempts == 4


async def test_a_25_after_a_late_approval_is_not_an_acknowledgement(kind: str, tmp_path: Path) -> None:
    """The late approval came first, the reversal's 25 after it: the 25 cannot be true any more, so
    it acknowledges nothing (the sender counts a failed attempt and repeats). A later late answer of
    another kind does not make the approval go away; an approval whose MAC failed proves nothing."""
    clock = FakeClock()
    async with open_store(kind, tmp_path, clock=clock) as store:
        txn = await store.record_request(request("000001"))
        saf_id = (await store.record_timeout_and_queue_reversal(txn)).saf_id
        unproven = await store.record_request(request("000002"))
        unproven_saf = (await store.record_timeout_and_queue_reversal(unproven)).saf_id
        await store.record_late_answer(unproven, "00", authenticated=False)
        assert await store.ack_reversal(unproven_saf, "25", attempt_at=clock.now) is True

        assert not (await store.record_late_answer(txn, "00")).reopened  # already queued
        await store.record_late_answer(txn, "96")  # e.g. a second, garbled answer: the approval stays
        assert (await store.get(txn)).state is TxnState.REVERSAL_QUEUED  # unchanged: already queued
        assert await store.ack_reversal(saf_id, "25", attempt_at=clock.now) is False
        entry = await store.get_saf(saf_id)
        assert (entry.state, entry.attempts, entry.ack_rc) == (SafState.PENDING, 0, None)  # untouched
        assert (await store.get(txn)).state is TxnState.REVERSAL_QUEUED
        assert await store.ack_reversal(saf_id, "00", attempt_at=clock.now) is True
        assert (await store.get(txn)).reversal_rc == "00"


async def test_park_retry_and_drop(kind: str, tmp_path: Path) -> None:
    clock = FakeClock()
    observer = Recorder()
    async with open_store(kind, tmp_path, clock=clock, observer=observer) as store:
        a = await store.record_request(request("000001"))
        b = await store.record_request(request("000002"))
        saf_a = (await store.record_timeout_and_queue_reversal(a)).saf_id
        saf_b = (await store.record_timeout_and_queue_reversal(b)).saf_id
        assert await store.saf_depth() == 2
        for n in range(3):
            await store.mark_reversal_attempt(saf_a, clock.now, clock.now, f"timeout {n}")
        await store.park_reversal(saf_a, "gave up after 4 attempts: timeout", final_attempt_at=clock.now + 1)
        parked = await store.get_saf(saf_a)
        assert (parked.state, parked.attempts, parked.total_attempts, parked.last_attempt_at) == (
            SafState.PARKED,
            4,
            4,
            clock.now + 1,
        )
        assert parked.parked_reason == "gave up after 4 attempts: timeout"
        assert (await store.get(a)).state == TxnState.REVERSAL_FAILED
        assert [e.saf_id for e in await store.due_reversals(clock.now + 1e6)] == [saf_b]  # parked is not due
        assert [e.saf_id for e in await store.list_saf("parked")] == [saf_a]
        assert await store.saf_depth() == 2  # parked still needs someone

        clock.now += 60
        retried = await store.retry_saf(saf_a)
        assert (retried.state, retried.attempts, retried.total_attempts, retried.is_repeat) == (
            SafState.PENDING,
            0,
            4,
            False,
        )
        assert retried.next_attempt_at == clock.now and retried.parked_reason is None
        assert (await store.get(a)).state == TxnState.REVERSAL_QUEUED
        with pytest.raises(StateConflict):
            await store.retry_saf(saf_a)  # only a parked entry

        # free text never carries a PAN, even when an operator pastes one
        await store.mark_reversal_attempt(saf_b, clock.now, clock.now, f"host said card {TEST_PAN} unknown")
        assert (await store.get_saf(saf_b)).last_error == f"host said card {mask_pan(TEST_PAN)} unknown"
        dropped = await store.drop_saf(saf_b, "reversed by phone, ticket 17")
        assert (dropped.state, dropped.operator_note) == (SafState.DROPPED, "reversed by phone, ticket 17")
        assert (await store.get(b)).state == TxnState.REVERSAL_DROPPED
        with pytest.raises(StateConflict):
            await store.drop_saf(saf_b, "again")
        with pytest.raises(StateConflict):
            await store.park_reversal(saf_b, "no")
        with pytest.raises(InvalidRecord):
            await store.drop_saf(saf_a, "   ")  # an operator must say why
        assert await store.saf_depth() == 1
        # the host's late acknowledgement of a dropped reversal still counts: the host's word wins
        await store.ack_reversal(saf_b, "00")
        assert (await store.get(b)).state == TxnState.REVERSED
        assert observer.depths[-1] == await store.saf_depth() == 1
        assert 2 in observer.depths


async def test_saf_is_fifo_and_one_entry_per_transaction(kind: str, tmp_path: Path) -> None:
    clock = FakeClock()
    async with open_store(kind, tmp_path, clock=clock) as store:
        ids = [await store.record_request(request(f"{i:06d}")) for i in range(1, 6)]
        order = [ids[3], ids[0], ids[4], ids[1]]
        saf_ids = [(await store.queue_reversal(t, "06")).saf_id for t in order]
        for t in order:  # queueing again never adds or reorders
            await store.queue_reversal(t, "98")
        due = await store.due_reversals(clock.now)
        assert [e.txn_id for e in due] == order
        assert [e.txn_id for e in await store.due_reversals(clock.now, limit=2)] == order[:2]
        # one that failed and backs off steps aside; the rest keep their order
        await store.mark_reversal_attempt(saf_ids[0], clock.now, clock.now + 30, "timeout")
        assert [e.txn_id for e in await store.due_reversals(clock.now)] == order[1:]
        assert [e.txn_id for e in await store.due_reversals(clock.now + 30)] == order
        assert [e.txn_id for e in await store.list_saf()] == order
        assert len({e.txn_id for e in await store.list_saf()}) == len(order)


# --- settlement --------------------------------------------------------------------------------------


async def test_settlement_totals(kind: str, tmp_path: Path) -> None:
    async with open_store(kind, tmp_path) as store:
        stan = iter(range(1, 100))

        async def txn(state: str | None, kind_: str = "purchase", amount: int = 100, **kw: object) -> int:
            txn_id = await store.record_request(request(f"{next(stan):06d}", kind=kind_, amount=amount, **kw))
            if state == "reversed":
                saf = await store.record_timeout_and_queue_reversal(txn_id)
                await store.ack_reversal(saf.saf_id, "00")
            elif state is not None:
                await store.record_outcome(txn_id, state, rc="00" if state == "completed" else "05")
            return txn_id

        sale = await txn("completed", amount=1000)
        await txn("completed", amount=2000)
        await txn("completed", amount=700, card_org="000")  # unknown organisation: settled as 内卡
        await txn("completed", amount=5000, card_org="VIS")  # 外卡
        await txn("completed", "void", amount=1000, orig_txn_id=sale)  # the sale stays in debit
        await txn("completed", "refund", amount=300, terminal_mti="0220")
        await txn("completed", "refund", amount=450, card_org="MCC", terminal_mti="0220")
        await txn("completed", "balance_inquiry", amount=0)
        await txn("declined", amount=9999)
        await txn(None, amount=9999)  # pending: outcome unknown, not settled
        await txn("reversed", amount=9999)
        await txn("completed", amount=9999, batch="000002")
        await txn("completed", amount=9999, terminal_id="T0000009")
        totals = await store.settlement_totals("T0000001", "000001")
        d, f = totals.domestic, totals.foreign
        assert (d.debit_count, d.debit_amount, d.credit_count, d.credit_amount) == (3, 3700, 2, 1300)
        assert (f.debit_count, f.debit_amount, f.credit_count, f.credit_amount) == (1, 5000, 1, 450)
        empty = await store.settlement_totals("T0000001", "000077")
        assert empty.domestic.debit_count == empty.foreign.credit_amount == 0


async def test_purchase_totals_since(kind: str, tmp_path: Path) -> None:
    clock = FakeClock()
    async with open_store(kind, tmp_path, clock=clock) as store:
        old = await store.record_request(request("000001", amount=111))
        await store.record_outcome(old, "completed", rc="00")
        clock.now += 3600
        since = clock.now
        for i, (tid, amount, outcome) in enumerate(
            [
                ("T0000001", 200, "completed"),
                ("T0000001", 300, "completed"),
                ("T0000002", 50, "completed"),
                ("T0000002", 70, "declined"),
            ]
        ):
            txn = await store.record_request(request(f"{i + 2:06d}", terminal_id=tid, amount=amount))
            await store.record_outcome(txn, outcome, rc="00")
        refund = await store.record_request(request("000009", kind="refund", amount=40))
        await store.record_outcome(refund, "completed", rc="00")
        assert await store.purchase_totals_since(since) == {"T0000001": 500, "T0000002": 50}


async def test_a_reversals_own_stan_is_fixed_once_and_cleared_by_an_operator_retry(kind: str, tmp_path: Path) -> None:
    """Identical repeats: the STAN and field 7 of a reversal are journalled before its first attempt and
    never change after (the first write wins); an operator's retry starts afresh (a new 0400)."""
    async with open_store(kind, tmp_path) as store:
        txn = await store.record_request(request("000001"))
        entry = (await store.record_timeout_and_queue_reversal(txn)).entry
        assert (entry.reversal_stan, entry.reversal_datetime, entry.is_repeat) == (None, None, False)
        assert await store.record_reversal_ident(entry.saf_id, "400001", "1123101500") == ("400001", "1123101500")
        assert await store.record_reversal_ident(entry.saf_id, "499999", "1123101600") == ("400001", "1123101500")
        fixed = await store.get_saf(entry.saf_id)
        assert (fixed.reversal_stan, fixed.reversal_datetime, fixed.attempts) == ("400001", "1123101500", 0)
        assert fixed.is_repeat  # it may have gone out: the next send is a 0401
        with pytest.raises(InvalidRecord):
            await store.record_reversal_ident(entry.saf_id, "4001", "1123101500")
        await store.park_reversal(entry.saf_id, "gave up after 1 attempt: timeout", final_attempt_at=1.0)
        with pytest.raises(StateConflict):
            await store.record_reversal_ident(entry.saf_id, "400002", "1123101700")  # only while pending
        retried = await store.retry_saf(entry.saf_id)
        assert (retried.reversal_stan, retried.is_repeat) == (None, False)
        with pytest.raises(NotFound):
            await store.record_reversal_ident(4242, "400001", "1123101500")
        # one store alone: nobody else's pending requests to take over
        await store.record_request(request("000002"))
        assert await store.claim_orphaned_pending(10.0) == []
