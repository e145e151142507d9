"""Issue 16 item 3, the rest of the service's error paths: a journal failure at each step of an exchange
that tests/test_journal_fault_steps.py does not drive (an approval the gateway does not trust, a timeout
of a kind that is not reversed, a void's or refund's lookups of its original, a terminal's own 0400, the
SAF's writes, a refusal's record, a request the host link cannot take).

Each test fails one journal operation of a real SQLite store (a write fails its commit as on a full
disk, `JournalFault`; a read fails as SQLite fails a read, `ReadFault`), drives the exchange over real
loopback sockets against the host simulator, lets the journal work again, and then checks the end state a
payment engineer cares about (`assert_consistent`): no approval left unreversed or undelivered, the SAF
holds exactly what it should, the risk-limit counter equals what the journal says is charged today, and
the terminal got a defined response code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_e2e_reversal import (
    FAST_SAF,
    FINAL_STATES,
    HOST_TIMEOUT,
    Receipt,
    assert_no_charge_without_receipt,
    eventually,
    host_entry,
    host_key,
    receipt,
    settled,
)
from test_journal_fault_steps import ArmedFault, JournalFault, limit_used, only_row, ready

from gateway.config import LimitsConfig
from gateway.lab import CARD_CUP, CARD_VISA, Lab, open_lab
from gateway.net.host_link import HostUnavailable
from gateway.sim.host_rules import Fault
from gateway.store.errors import StoreIOError
from gateway.store.records import ReversalInitiator, SafState, TxnKind, TxnRecord, TxnState

pytestmark = pytest.mark.anyio

#: a row in one of these states still has something to happen to it
OPEN = frozenset({TxnState.PENDING, TxnState.REVERSAL_QUEUED})


class ReadFault(ArmedFault):
    """While `armed`, the named reads of the lab's real SQLite store fail as a journal read does when
    SQLite cannot read its file (`StoreIOError`, what `SqliteStore._read` raises for a `sqlite3.Error`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, store: Any, *reads: str) -> None:
        for name in reads:
            original = getattr(store, name)

            async def faulty(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
                if self.armed:
                    self.failures += 1
                    raise StoreIOError("journal read failed: disk I/O error")
                return await _original(*args, **kwargs)

            monkeypatch.setattr(store, name, faulty)


async def charged_today(lab: Lab) -> int:
    """What the journal says the first terminal has spent today: the total the limits start from after
    a restart (`purchase_totals_since`)."""
    totals = await lab.gateway.store.purchase_totals_since(0.0)
    return totals.get(lab.config.terminals[0].terminal_id, 0)


async def assert_consistent(lab: Lab, receipts: list[Receipt] = (), *, saf: int = 0) -> None:  # type: ignore[assignment]
    """The end state, once the journal works again: ready, both books agree (no charge without a
    receipt), the SAF holds `saf` entries and all of them are done, and the risk-limit counter of the
    running gateway equals the journal's charged total (what a restart would seed it with)."""
    await eventually(lambda: ready(lab), "journal healthy again")
    store = lab.gateway.store

    async def nothing_open() -> bool:
        return all(r.state not in OPEN for r in await store.list_transactions(limit=1000))

    await eventually(nothing_open, "no journal row pending or waiting for its reversal")
    if all(r.state in FINAL_STATES for r in await store.list_transactions(limit=1000)):
        await assert_no_charge_without_receipt(lab, receipts)
    else:  # a timed-out or rejected inquiry is final for its kind: the host's debits alone, then
        standing = {k for k, e in lab.host.ledger.items() if e.approved and e.delta < 0 and not e.reversed}
        expected = set()
        for terminal_id, batch, stan in receipts:
            rec = await store.find_original(terminal_id, batch, stan)
            assert rec is not None and rec.state is TxnState.COMPLETED, rec
            expected.add(host_key(lab, rec))
        assert standing == expected, "a debit stands at the host without a receipt"
    entries = await lab.gateway.store.list_saf()
    assert len(entries) == saf, entries
    assert all(e.state is SafState.DONE for e in entries), entries
    assert limit_used(lab) == await charged_today(lab)
    assert lab.gateway.service.journal_retry.backlog == 0


async def signed_in(lab: Lab) -> Any:
    t = lab.terminal(auto_reverse=False)
    await t.connect()
    await t.sign_in()
    return t


async def row_of(lab: Lab, kind: TxnKind) -> TxnRecord:
    rows = [r for r in await lab.gateway.store.list_transactions() if r.kind is kind]
    assert len(rows) == 1, rows
    return rows[0]


async def state_of(lab: Lab, txn_id: int, state: TxnState) -> TxnRecord:
    async def probe() -> TxnRecord | None:
        rec = await lab.gateway.store.get(txn_id)
        return rec if rec is not None and rec.state is state else None

    return await eventually(probe, f"txn {txn_id} {state.value}")


# --- the host's answer is not trusted (host_rejected) ----------------------------------------------


async def test_an_untrusted_approval_whose_reversal_cannot_be_queued_gets_96_and_is_reversed_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fault = JournalFault(monkeypatch, "queue_reversal")
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        lab.host.add_fault(Fault("wrong_mac", pan=CARD_CUP.pan, mti=("0200",), limit=1))
        t = await signed_in(lab)
        with fault.on():
            result = await t.purchase(2_200, CARD_CUP)
            assert result.rc == "96" and not result.approved  # the host approved, but its MAC is wrong
            assert (await only_row(lab)).state is TxnState.PENDING
            assert not lab.gateway.service.journal_healthy
            assert limit_used(lab) == 0  # nothing stands for the customer: the reservation is back already
        rec = await settled(lab, (await only_row(lab)).txn_id)
        assert rec.state is TxnState.REVERSED and rec.reversed_from is TxnState.HOST_REJECTED
        assert rec.reversal_reason == "A0"  # an answer whose MAC failed is reversed as a security failure
        assert host_entry(lab, rec).reversed
        await assert_consistent(lab, saf=1)


async def test_an_untrusted_answer_to_a_balance_inquiry_is_journalled_rejected_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not reversible: no SAF entry, only the outcome, which waits for the journal."""
    fault = JournalFault(monkeypatch, "record_outcome")
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        lab.host.add_fault(Fault("wrong_mac", pan=CARD_CUP.pan, mti=("0100", "0200"), limit=1))
        t = await signed_in(lab)
        with fault.on():
            result = await t.balance(CARD_CUP)
            assert result.rc == "96" and result.balance is None  # an untrusted balance is not shown
            assert (await only_row(lab)).state is TxnState.PENDING
        rec = await state_of(lab, (await only_row(lab)).txn_id, TxnState.HOST_REJECTED)
        assert rec.kind is TxnKind.BALANCE_INQUIRY and rec.rc == "00"
        await assert_consistent(lab, saf=0)


# --- a timeout of a kind that is not reversed --------------------------------------------------------


async def test_a_balance_inquiry_timeout_whose_write_fails_gets_98_and_is_journalled_timed_out_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fault = JournalFault(monkeypatch, "record_outcome", "queue_reversal")
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        lab.host.add_fault(Fault("delay", seconds=HOST_TIMEOUT + 0.3, pan=CARD_CUP.pan, mti=("0100", "0200"),
                                 limit=1))
        t = await signed_in(lab)
        with fault.on():
            result = await t.balance(CARD_CUP)
            assert result.rc == "98"
            assert (await only_row(lab)).state is TxnState.PENDING
            await eventually(lambda: _failed(fault), "the timeout's write failed")
        rec = await state_of(lab, (await only_row(lab)).txn_id, TxnState.TIMED_OUT)
        assert rec.rc == "98"
        # a balance inquiry moves no money: it is never reversed, even when its late answer comes
        assert await lab.gateway.store.saf_for_txn(rec.txn_id) is None
        await eventually(lambda: lab.gateway.store.late_answers(txn_id=rec.txn_id), "late answer on record")
        await assert_consistent(lab, saf=0)


async def _failed(fault: JournalFault) -> bool:
    return fault.failures > 0


# --- the host link cannot take the request -----------------------------------------------------------


async def test_a_request_the_host_link_cannot_take_gets_91_and_its_decline_is_journalled_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The link went down between the readiness check and the write (`HostUnavailable`: nothing left)."""
    fault = JournalFault(monkeypatch, "record_outcome")
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        t = await signed_in(lab)
        link = lab.gateway.service.link
        real_request = link.request

        async def link_lost(request: Any) -> Any:
            raise HostUnavailable("host link is down")

        monkeypatch.setattr(link, "request", link_lost)
        with fault.on():
            result = await t.purchase(1_700, CARD_CUP)
            assert result.rc == "91"
            assert (await only_row(lab)).state is TxnState.PENDING
            assert limit_used(lab) == 0
        monkeypatch.setattr(link, "request", real_request)
        rec = await settled(lab, (await only_row(lab)).txn_id)
        assert rec.state is TxnState.DECLINED and rec.rc == "91"
        assert lab.host.stats.messages["0200"] == 0
        later = await t.purchase(1_800, CARD_CUP)
        assert later.approved
        await assert_consistent(lab, [receipt(later)], saf=0)


# --- a void's and a refund's lookups of their original -------------------------------------------------


@pytest.mark.parametrize("lookup", ["find_original", "find_referencing"])
async def test_a_void_whose_original_cannot_be_read_gets_96_and_the_sale_stands(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, lookup: str) -> None:
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        fault = ReadFault(monkeypatch, lab.gateway.store, lookup)
        t = await signed_in(lab)
        sale = await t.purchase(3_100, CARD_CUP)
        assert sale.approved
        with fault.on():
            void = await t.void(sale)
            assert void.rc == "96" and not void.approved
            assert fault.failures >= 1
        # the operator's line names the request and carries the journal's error (its traceback)
        [line] = [r for r in caplog.records if "journal failed while processing" in r.getMessage()]
        terminal_id = lab.config.terminals[0].terminal_id
        assert line.getMessage() == f"journal failed while processing 0200 from terminal {terminal_id}: 96"
        assert line.exc_info is not None and isinstance(line.exc_info[1], StoreIOError)
        # nothing was sent or journalled for the void: the sale stands, its limit too, the refusal is kept
        assert lab.host.stats.messages["0200"] == 1
        assert [r.kind for r in await lab.gateway.store.list_transactions()] == [TxnKind.PURCHASE]
        # the refusal is kept while the journal is in doubt, then put on record
        refusals = await eventually(lambda: lab.gateway.store.refusals(), "the void's refusal on record")
        assert [r.rc for r in refusals] == ["96"] and "journal failed" in refusals[0].reason
        await assert_consistent(lab, [receipt(sale)], saf=0)
        # the journal reads again: the same void goes through, and the sale is cancelled at the host
        opening = lab.host.balance(CARD_CUP.pan) + 3_100
        again = await t.void(sale)
        assert again.approved
        assert host_entry(lab, await row_of(lab, TxnKind.PURCHASE)).voided
        assert lab.host.balance(CARD_CUP.pan) == opening
        assert (await row_of(lab, TxnKind.VOID)).state is TxnState.COMPLETED
        assert limit_used(lab) == await charged_today(lab)


async def test_a_refund_whose_original_cannot_be_found_by_rrn_gets_96_and_credits_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        fault = ReadFault(monkeypatch, lab.gateway.store, "find_by_rrn")
        t = await signed_in(lab)
        sale = await t.purchase(4_000, CARD_VISA)
        assert sale.approved and sale.rrn
        balance = lab.host.balance(CARD_VISA.pan)
        with fault.on():
            # no batch/trace of the original that the journal knows: only its RRN can find it
            refund = await t.refund(1_000, CARD_VISA, orig_rrn=sale.rrn)
            assert refund.rc == "96"
            assert fault.failures == 1
        assert lab.host.balance(CARD_VISA.pan) == balance  # no credit went out
        assert [r.kind for r in await lab.gateway.store.list_transactions()] == [TxnKind.PURCHASE]
        await assert_consistent(lab, [receipt(sale)], saf=0)
        again = await t.refund(1_000, CARD_VISA, orig_rrn=sale.rrn)
        assert again.approved
        assert (await row_of(lab, TxnKind.REFUND)).orig_txn_id == (await row_of(lab, TxnKind.PURCHASE)).txn_id
        assert lab.host.balance(CARD_VISA.pan) == balance + 1_000


# --- the terminal's own reversal -------------------------------------------------------------------------


async def test_a_terminal_reversal_that_cannot_be_queued_gets_96_and_goes_through_when_repeated(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fault = JournalFault(monkeypatch, "queue_reversal")
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        t = await signed_in(lab)
        sale = await t.purchase(2_600, CARD_CUP)
        assert sale.approved
        rec = await settled(lab, (await only_row(lab)).txn_id)
        assert rec.state is TxnState.COMPLETED
        with fault.on():
            rev = await t.reversal(sale, "96")
            assert rev.rc == "96"  # a defined answer: the terminal keeps its reversal and repeats it
            assert t.pending_reversals
        after = await lab.gateway.store.get(rec.txn_id)
        assert after is not None and after.state is TxnState.COMPLETED  # nothing half-written
        assert await lab.gateway.store.list_saf() == []
        await eventually(lambda: ready(lab), "journal healthy again")
        again = await t.reversal(sale, "96")
        assert again.rc == "00"
        rec = await settled(lab, rec.txn_id)
        assert rec.state is TxnState.REVERSED and rec.reversal_initiator is ReversalInitiator.TERMINAL
        assert host_entry(lab, rec).reversed
        await assert_consistent(lab, [], saf=1)


# --- the SAF's own writes --------------------------------------------------------------------------------


async def test_a_reversal_whose_saf_writes_fail_is_sent_and_closed_once_the_journal_works(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fault = JournalFault(monkeypatch, "mark_attempt", "ack")
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        lab.host.add_fault(Fault("delay", seconds=HOST_TIMEOUT + 0.3, pan=CARD_CUP.pan, mti=("0200",), limit=1))
        t = await signed_in(lab)
        with fault.on():
            result = await t.purchase(2_900, CARD_CUP)
            assert result.rc == "98"
            await eventually(lambda: _failed(fault), "the SAF's write failed")
            rec = await only_row(lab)
            assert rec.state is TxnState.REVERSAL_QUEUED  # queued, not lost, while the SAF cannot write
        rec = await settled(lab, rec.txn_id)
        assert rec.state is TxnState.REVERSED and rec.reversed_from is TxnState.TIMED_OUT
        assert host_entry(lab, rec).reversed
        await assert_consistent(lab, saf=1)


# --- a refusal's record ----------------------------------------------------------------------------------


async def test_a_refusal_whose_record_fails_is_answered_at_once_and_put_on_record_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fault = JournalFault(monkeypatch, "record_refusal")
    limits = LimitsConfig(per_transaction=5_000, per_day=50_000_000)
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF, limits=limits) as lab:
        t = await signed_in(lab)
        with fault.on():
            result = await t.purchase(6_000, CARD_CUP)  # over the per-transaction limit
            assert result.rc == "61"
            await eventually(lambda: _failed(fault), "the refusal's write failed")
            assert not lab.gateway.service.journal_healthy
            assert await lab.gateway.store.refusals() == []
        refusals = await eventually(lambda: lab.gateway.store.refusals(), "refusal on record")
        assert [r.rc for r in refusals] == ["61"]
        assert "per-transaction" in refusals[0].reason and "journalled later" in refusals[0].reason
        assert refusals[0].pan_masked and CARD_CUP.pan not in refusals[0].pan_masked
        assert lab.host.stats.messages["0200"] == 0
        await assert_consistent(lab, saf=0)


# --- the retry queue is full ---------------------------------------------------------------------------------


async def test_a_full_retry_queue_refuses_new_requests_with_96_until_the_journal_works(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the journal fails, the steps that settle transactions wait in memory; once they fill the
    retry queue the gateway takes on nothing new (96 at once, nothing sent), and takes requests again
    when the journal does."""
    fault = JournalFault(monkeypatch, "record_outcome")
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        lab.gateway.service.journal_retry.capacity = 1  # one waiting step fills it (a real one holds thousands)
        t = await signed_in(lab)
        with fault.on():
            first = await t.purchase(1_100, CARD_CUP)
            assert first.approved  # delivered; its completion waits for the journal
            await eventually(lambda: _failed(fault), "the completion's write failed")

            async def full() -> bool:  # the failed step is kept just after its write failed
                return lab.gateway.service.journal_retry.full

            await eventually(full, "the retry queue full")
            refused = await t.purchase(1_200, CARD_CUP)
            assert refused.rc == "96"
            assert lab.host.stats.messages["0200"] == 1  # the refused one never left
        refusals = await eventually(lambda: lab.gateway.store.refusals(), "the 96 on record")
        [refusal] = refusals  # kept while the journal failed, so it says when it was refused
        assert refusal.rc == "96" and refusal.reason.startswith("journal failing: its retry queue is full (refused at ")
        await eventually(lambda: ready(lab), "journal healthy again")
        later = await t.purchase(1_300, CARD_CUP)
        assert later.approved
        await assert_consistent(lab, [receipt(first), receipt(later)], saf=0)
