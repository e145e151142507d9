"""Kill tests for the store backends' mutation survivors (issue 16), written against gateway/store/sqlite.py's
and held by every backend (SQLite in a real file, memory, PostgreSQL in a schema of the test's own): what a
reversal queued with the host's answer keeps, the typed errors an operator and the service rely on (which
field, which entry), the checks a fire-and-forget write makes before it is queued, the SAF queue at a
glance, the default page of refusals; and, SQLite only, closing: what `aclose` promises even from a
cancelled task, and on a store that never connected."""

from __future__ import annotations

import functools
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import pytest
from test_store_lookups import failed, refusal
from test_store_support import BACKENDS, FakeClock, backend, open_store, request

from gateway.store import (
    InvalidRecord,
    NotFound,
    SafState,
    SqliteStore,
    StateConflict,
    StoreClosed,
    StoreError,
    TxnQuery,
    TxnRequest,
    TxnState,
)
from gateway.store.errors import OriginalRefused

pytestmark = pytest.mark.anyio


@pytest.fixture(params=BACKENDS)
def kind(request: pytest.FixtureRequest) -> str:
    return backend(request)


# --- reversals queued with the host's answer ---------------------------------------------------------


async def test_a_reversal_queued_with_the_hosts_answer_keeps_its_codes(kind: str, tmp_path: Path) -> None:
    """An approval the terminal never got is reversed: the journal still holds what the host said (its rc,
    approval code and RRN are how the host finds the charge the reversal undoes)."""
    async with open_store(kind, tmp_path) as store:
        txn = await store.record_request(request("000001"))
        queued = await store.queue_reversal(txn, "06", state="completed", rc="00", auth_code="A1B2C3",
                                            rrn="123456789012")
        assert queued.created
        rec = await store.get(txn)
        assert rec is not None
        assert (rec.state, rec.reversed_from, rec.rc, rec.auth_code, rec.rrn) == (
            TxnState.REVERSAL_QUEUED, "completed", "00", "A1B2C3", "123456789012")
        # and the host's RRN finds it again (a late 0410, an operator's lookup)
        found = await store.find_by_rrn("123456789012")
        assert found is not None and found.txn_id == txn


# --- typed errors: which field, which entry ---------------------------------------------------------


async def test_an_unknown_saf_entry_is_named_in_the_error(kind: str, tmp_path: Path) -> None:
    async with open_store(kind, tmp_path) as store:
        for call in (store.retry_saf(424242), store.drop_saf(424242, "ticket 9"), store.park_reversal(424242, "x"),
                     store.ack_reversal(424242, "00"), store.mark_reversal_attempt(424242, 1.0, 2.0, "timeout")):
            with pytest.raises(NotFound) as err:
                await call
            assert (err.value.what, err.value.ident) == ("SAF entry", 424242)


async def test_bad_arguments_name_the_field_and_write_nothing(kind: str, tmp_path: Path) -> None:
    async with open_store(kind, tmp_path) as store:
        txn = await store.record_request(request("000001"))
        saf_id = (await store.record_timeout_and_queue_reversal(txn)).saf_id
        before = await store.get_saf(saf_id)
        for call, field in (
            (store.retry_saf("1"), "saf_id"),  # type: ignore[arg-type]
            (store.drop_saf(True, "ticket 9"), "saf_id"),  # type: ignore[arg-type]
            (store.mark_reversal_attempt(saf_id, 1.0, 2.0, None), "error"),  # type: ignore[arg-type]
        ):
            with pytest.raises(InvalidRecord) as err:
                await call
            assert err.value.field == field
        assert await store.get_saf(saf_id) == before


async def test_a_credit_naming_no_journal_entry_is_refused_with_its_reason(kind: str, tmp_path: Path) -> None:
    async with open_store(kind, tmp_path) as store:
        with pytest.raises(InvalidRecord) as err:
            await store.record_request(request("000001", kind="void", orig_txn_id=424242))
        assert (err.value.field, err.value.reason) == ("orig_txn_id", "no such journal entry")
        assert await store.list_transactions() == []


async def test_an_outcome_recorded_soon_is_checked_before_it_is_queued(kind: str, tmp_path: Path) -> None:
    """`record_outcome_soon` has no caller waiting for the commit: a bad argument must fail at the call,
    not reach the journal (nor surface later in `on_error` only)."""
    errors: list[BaseException] = []
    async with open_store(kind, tmp_path) as store:
        txn = await store.record_request(request("000001"))
        with pytest.raises(InvalidRecord) as err:
            store.record_outcome_soon(txn, "completed", rc="00", rrn="1234567890123", on_error=errors.append)
        assert err.value.field == "rrn"
        rec = await store.get(txn)
        assert rec is not None and (rec.state, rec.rrn) == (TxnState.PENDING, None)
    assert errors == []


async def test_only_a_new_refusal_record_is_journalled(kind: str, tmp_path: Path) -> None:
    async with open_store(kind, tmp_path) as store:
        store.record_refusal_soon(refusal("A0"), on_error=failed)
        (kept,) = await store.refusals()
        for wrong in (kept, object(), {"rc": "A0"}):  # a journalled Refusal, or not a record at all
            with pytest.raises(InvalidRecord) as err:
                store.record_refusal_soon(wrong, on_error=failed)  # type: ignore[arg-type]
            assert (err.value.field, err.value.reason) == ("record", "expected a RefusalRecord")
        assert [r.refusal_id for r in await store.refusals()] == [kept.refusal_id]


async def test_refusals_come_a_hundred_to_a_page_by_default(kind: str, tmp_path: Path) -> None:
    async with open_store(kind, tmp_path) as store:
        for i in range(101):
            store.record_refusal_soon(refusal(stan=f"{i:06d}"), on_error=failed)
        page = await store.refusals()
        assert len(page) == 100
        assert page[0].stan == "000100" and page[-1].stan == "000001"  # the newest hundred
        assert len(await store.refusals(limit=1000)) == 101


# --- the SAF queue at a glance ------------------------------------------------------------------------


async def test_saf_summary_counts_pending_and_parked_and_the_oldest_pending(kind: str, tmp_path: Path) -> None:
    clock = FakeClock()
    async with open_store(kind, tmp_path, clock=clock) as store:
        empty = await store.saf_summary()
        assert (empty.pending, empty.parked, empty.oldest_pending_queued_at) == (0, 0, None)
        first_queued = clock.now
        ids = [await store.record_request(request(f"{i:06d}")) for i in range(1, 5)]
        saf_ids = []
        for txn in ids:
            saf_ids.append((await store.record_timeout_and_queue_reversal(txn)).saf_id)
            clock.now += 10
        await store.park_reversal(saf_ids[0], "gave up after 6 attempts: timeout")
        await store.ack_reversal(saf_ids[3], "00")  # done: neither pending nor parked
        summary = await store.saf_summary()
        assert (summary.pending, summary.parked) == (2, 1)
        # the parked one was queued first, but the oldest *pending* is what waits for the host
        assert summary.oldest_pending_queued_at == first_queued + 10
        assert (await store.get_saf(saf_ids[1])).state is SafState.PENDING  # type: ignore[union-attr]


# --- SQLite: a write's unexpected failure, and closing -------------------------------------------------


async def test_a_write_that_fails_unexpectedly_says_what_failed(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    async with SqliteStore.open(path) as store:
        txn = await store.record_request(request("000001"))
        side = sqlite3.connect(path, isolation_level=None)
        side.execute("CREATE TRIGGER no_saf BEFORE INSERT ON saf BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
        try:
            with pytest.raises(StoreError) as err:
                await store.record_timeout_and_queue_reversal(txn)
        finally:
            side.execute("DROP TRIGGER no_saf")
            side.close()
        cause = err.value.__cause__
        assert isinstance(cause, sqlite3.Error)
        assert str(err.value) == f"journal write failed: {type(cause).__name__}"


async def test_aclose_from_a_cancelled_task_still_commits_and_closes(tmp_path: Path) -> None:
    """Shutdown often runs in a cancelled task: `aclose` must still let the committer commit what is
    queued (an outcome recorded `soon`), then close the files, not give up at its first wait."""
    path = tmp_path / "j.db"
    store = SqliteStore(path)
    await store.connect()
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(store.run)
            txn = await store.record_request(request("000001"))
            errors: list[BaseException] = []
            store.record_outcome_soon(txn, "completed", rc="00", on_error=errors.append)
            with anyio.CancelScope() as scope:
                scope.cancel()
                await store.aclose()
            assert not scope.cancelled_caught  # aclose finished its work inside the cancelled scope
            with pytest.raises(StoreClosed):
                await store.get(txn)  # the files are closed
    assert errors == []
    async with SqliteStore.open(path) as again:
        rec = await again.get(txn)
        assert rec is not None and (rec.state, rec.rc) == (TxnState.COMPLETED, "00")


async def test_aclose_of_a_store_that_never_connected_is_harmless(tmp_path: Path) -> None:
    """A start-up that fails before `connect` still runs its cleanup."""
    store = SqliteStore(tmp_path / "j.db")
    await store.aclose()
    with pytest.raises(StoreClosed):
        await store.get(1)
    assert not (tmp_path / "j.db").exists()


# --- credits: the re-check inside the write that journals a void or refund -----------------------------


def credit(stan: str, kind: str, amount: int, orig: int) -> TxnRequest:
    return request(stan, kind=kind, terminal_mti="0220" if kind == "refund" else "0200",
                   processing_code="200000", amount=amount, orig_txn_id=orig)


async def sale(store: Any, stan: str, amount: int = 800, outcome: str = "completed") -> int:
    txn = await store.record_request(request(stan, amount=amount))
    await store.record_outcome(txn, outcome, rc="00" if outcome == "completed" else "05")
    return int(txn)


async def refused(store: Any, rec: TxnRequest) -> str:
    with pytest.raises(OriginalRefused) as err:
        await store.record_request(rec)
    assert err.value.orig_txn_id == rec.orig_txn_id
    return err.value.rc


async def test_refunds_together_never_exceed_the_sale(kind: str, tmp_path: Path) -> None:
    """The store refuses, inside the journalling write, a credit the cardholder has no right to: the
    service asked before sending, but only this check sees every void and refund already journalled."""
    async with open_store(kind, tmp_path) as store:
        s = await sale(store, "000001", 800)
        first = await store.record_request(credit("000002", "refund", 500, s))
        assert await refused(store, credit("000003", "refund", 301, s)) == "64"  # 500 + 301 > 800
        last = await store.record_request(credit("000004", "refund", 300, s))  # exactly the rest
        assert await refused(store, credit("000005", "refund", 1, s)) == "64"
        assert [r.txn_id for r in await store.find_referencing(s)] == [first, last]  # refused: not journalled
        # a refund the host declined moved no money: it does not count
        other = await sale(store, "000006", 800)
        declined = await store.record_request(credit("000007", "refund", 800, other))
        await store.record_outcome(declined, "declined", rc="05")
        await store.record_request(credit("000008", "refund", 800, other))
        assert await refused(store, credit("000009", "refund", 800, other)) == "64"


async def test_a_void_is_the_whole_sale_once_and_only_with_no_credit_standing(kind: str, tmp_path: Path) -> None:
    async with open_store(kind, tmp_path) as store:
        s = await sale(store, "000001", 800)
        assert await refused(store, credit("000002", "void", 799, s)) == "64"  # a void is the whole amount
        await store.record_request(credit("000003", "void", 800, s))
        assert await refused(store, credit("000004", "void", 800, s)) == "12"  # voided already
        assert await refused(store, credit("000005", "refund", 100, s)) == "12"  # nothing left to refund
        refunded = await sale(store, "000006", 800)
        await store.record_request(credit("000007", "refund", 100, refunded))
        assert await refused(store, credit("000008", "void", 800, refunded)) == "12"  # it would credit 900


async def test_only_a_completed_purchase_can_be_credited(kind: str, tmp_path: Path) -> None:
    async with open_store(kind, tmp_path) as store:
        declined = await sale(store, "000001", 800, outcome="declined")
        assert await refused(store, credit("000002", "refund", 100, declined)) == "12"
        pending = await store.record_request(request("000003", amount=800))
        assert await refused(store, credit("000004", "void", 800, pending)) == "12"
        assert await store.find_referencing(declined) == await store.find_referencing(pending) == []


async def test_two_refunds_in_one_batch_are_checked_one_after_the_other(kind: str, tmp_path: Path) -> None:
    """Submitted together, two refunds share a commit: the second is checked against the first."""
    async with open_store(kind, tmp_path) as store:
        s = await sale(store, "000001", 800)
        outcomes: list[object] = []

        async def refund(stan: str) -> None:
            try:
                outcomes.append(await store.record_request(credit(stan, "refund", 600, s)))
            except OriginalRefused as exc:
                outcomes.append(exc.rc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(refund, "000002")
            tg.start_soon(refund, "000003")
        assert outcomes.count("64") == 1  # 600 + 600 > 800: one of the two, whichever came first
        [accepted] = [o for o in outcomes if o != "64"]
        assert [r.txn_id for r in await store.find_referencing(s)] == [accepted]


# --- more typed errors, and the default pages ----------------------------------------------------------


async def test_a_refused_outcome_names_the_state_it_found(kind: str, tmp_path: Path) -> None:
    async with open_store(kind, tmp_path) as store:
        txn = await store.record_request(request("000001"))
        await store.record_outcome(txn, "declined", rc="05")
        with pytest.raises(StateConflict) as err:
            await store.record_outcome(txn, "completed", rc="00", auth_code="A1B2C3", rrn="123456789012")
        assert (err.value.ident, err.value.current) == (txn, TxnState.DECLINED)
        rec = await store.get(txn)
        assert rec is not None and (rec.state, rec.rc, rec.auth_code, rec.rrn) == (TxnState.DECLINED, "05", None, None)


async def test_what_is_not_a_request_is_refused_by_name(kind: str, tmp_path: Path) -> None:
    async with open_store(kind, tmp_path) as store:
        txn = await store.record_request(request("000001"))
        journalled = await store.get(txn)
        for wrong in (journalled, object()):  # a TxnRecord is a request already journalled
            with pytest.raises(InvalidRecord) as err:
                await store.record_request(wrong)
            assert (err.value.field, err.value.reason) == ("record", "expected a TxnRequest")
        saf_id = (await store.record_timeout_and_queue_reversal(txn)).saf_id
        with pytest.raises(InvalidRecord) as err:
            await store.record_reversal_ident(str(saf_id), "000123", "1123101500")  # type: ignore[arg-type]
        assert err.value.field == "saf_id"
        assert [r.txn_id for r in await store.list_transactions()] == [txn]


async def test_searches_and_late_answers_come_a_hundred_to_a_page_by_default(kind: str, tmp_path: Path) -> None:
    async with open_store(kind, tmp_path) as store:
        async with anyio.create_task_group() as tg:
            for i in range(1, 102):
                tg.start_soon(store.record_request, request(f"{i:06d}"))
                tg.start_soon(functools.partial(store.record_late_answer, None, "00", host_stan=f"{i:06d}"))
        assert len(await store.search(TxnQuery(terminal_id="T0000001"))) == 100
        assert len(await store.search(TxnQuery(terminal_id="T0000001"), limit=200)) == 101
        assert len(await store.late_answers()) == 100
        assert len(await store.late_answers(limit=200)) == 101
