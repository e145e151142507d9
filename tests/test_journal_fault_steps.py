"""Issue 11 items 1 and 2, issue 16 item 3: a journal write fails at each step of an exchange, the
gateway runs on, and once the journal takes writes again the journal, the SAF queue, the host's books
and the risk-limit counters agree.

The fault is real SQLite failing a real commit: the chosen journal operation raises the error SQLite
raises on a full disk (`sqlite3.OperationalError`) inside the group commit, so the whole commit rolls
back and every write in it gets `StoreIOError`, exactly as on a full disk. (tests/test_journal_faults.py
does the same to a real process with a file size limit.)
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from test_e2e_reversal import (
    FAST_SAF,
    HOST_TIMEOUT,
    RawTerminal,
    assert_no_charge_without_receipt,
    eventually,
    host_entry,
    receipt,
    settled,
)

import gateway.store.sqlite as sqlite_backend
from gateway.lab import CARD_CUP, CARD_LOW, CARD_VISA, Lab, open_lab
from gateway.sim.host_rules import Fault
from gateway.store.records import SafState, TxnRequest, TxnState

pytestmark = pytest.mark.anyio


class ArmedFault:
    """A fault that strikes only inside `with fault.on():`, counting how often it struck."""

    armed = False
    failures = 0

    @contextmanager
    def on(self) -> Iterator[None]:
        self.armed = True
        try:
            yield
        finally:
            self.armed = False


class JournalFault(ArmedFault):
    """While `armed`, the named journal operations fail their commit as a full disk does."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *ops: str) -> None:
        for name in ops:
            original = getattr(sqlite_backend, f"_op_{name}")

            def faulty(conn: sqlite3.Connection, *args: Any, _original: Any = original) -> Any:
                if self.armed:
                    self.failures += 1
                    raise sqlite3.OperationalError("database or disk is full")
                return _original(conn, *args)

            monkeypatch.setattr(sqlite_backend, f"_op_{name}", faulty)


async def only_row(lab: Lab) -> Any:
    rows = await lab.gateway.store.list_transactions()
    assert len(rows) == 1, rows
    return rows[0]


async def ready(lab: Lab) -> bool:
    return lab.gateway.service.journal_healthy


def limit_used(lab: Lab) -> int:
    return lab.gateway.service.limits.used(lab.config.terminals[0].terminal_id)


async def test_record_request_fails_nothing_is_sent_and_the_limit_is_given_back(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    fault = JournalFault(monkeypatch, "record_request", "record_refusal")
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        t = lab.terminal(auto_reverse=False)
        await t.connect()
        await t.sign_in()
        with fault.on():
            result = await t.purchase(1_500, CARD_CUP)
            assert not lab.gateway.service.journal_healthy  # /readyz: not ready
            await anyio.sleep(0.3)
            assert not lab.gateway.service.journal_healthy
        assert result.rc == "96"
        assert await lab.gateway.store.list_transactions() == []
        assert lab.host.stats.messages["0200"] == 0 and limit_used(lab) == 0
        # ready again once the disk is back, with no traffic needed to find out; the refusal is on record
        await eventually(lambda: ready(lab), "ready again")
        refusals = await lab.gateway.store.refusals()
        assert [r.rc for r in refusals] == ["96"] and "journal write failed" in refusals[0].reason
        later = await t.purchase(1_600, CARD_CUP)
        assert later.approved
        await assert_no_charge_without_receipt(lab, [receipt(later)])


async def test_a_decline_whose_write_fails_is_answered_at_once_and_journalled_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fault = JournalFault(monkeypatch, "record_outcome")
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        t = lab.terminal(auto_reverse=False)
        await t.connect()
        await t.sign_in()
        with fault.on():
            result = await t.purchase(900_000, CARD_LOW)  # more than the card holds: 51
            assert result.rc == "51"
            assert (await only_row(lab)).state is TxnState.PENDING
            assert not lab.gateway.service.journal_healthy
        rec = await settled(lab, (await only_row(lab)).txn_id)
        assert rec.state is TxnState.DECLINED and rec.rc == "51"
        assert await lab.gateway.store.list_saf() == [] and limit_used(lab) == 0
        await eventually(lambda: ready(lab), "ready again")
        await assert_no_charge_without_receipt(lab)


async def test_a_timeout_whose_reversal_cannot_be_queued_gets_98_and_is_reversed_once_the_journal_works(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fault = JournalFault(monkeypatch, "queue_reversal")
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        lab.host.add_fault(Fault("delay", seconds=HOST_TIMEOUT + 0.3, pan=CARD_CUP.pan, mti=("0200",), limit=1))
        t = lab.terminal(auto_reverse=False)
        await t.connect()
        await t.sign_in()
        with fault.on():
            result = await t.purchase(2_500, CARD_CUP)
            assert result.rc == "98"
            assert (await only_row(lab)).state is TxnState.PENDING
            await anyio.sleep(0.6)  # the late approval comes meanwhile
            assert fault.failures >= 2, "the reversal was not retried while the journal failed"
        rec = await settled(lab, (await only_row(lab)).txn_id)
        assert rec.state is TxnState.REVERSED and rec.reversed_from is TxnState.TIMED_OUT
        assert rec.reversal_reason == "98"
        assert host_entry(lab, rec).reversed and limit_used(lab) == 0
        await assert_no_charge_without_receipt(lab)


async def test_a_delivered_approval_whose_completion_fails_is_completed_not_reversed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fault = JournalFault(monkeypatch, "record_outcome")
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        t = lab.terminal(auto_reverse=False)
        await t.connect()
        await t.sign_in()
        with fault.on():
            result = await t.purchase(3_000, CARD_CUP)
            assert result.approved
            await anyio.sleep(0.3)
            assert (await only_row(lab)).state is TxnState.PENDING
            # a void of it meanwhile cannot be judged from the row: 96, not "original not completed" (12)
            assert (await t.void(result)).rc == "96"
        rec = await settled(lab, (await only_row(lab)).txn_id)
        assert rec.state is TxnState.COMPLETED and rec.auth_code == result.auth_code
        assert not host_entry(lab, rec).reversed and lab.host.reversal_count(host_entry(lab, rec).key) == 0
        assert limit_used(lab) == 3_000  # the sale stands: its reservation too
        await assert_no_charge_without_receipt(lab, [receipt(result)])


async def test_an_undeliverable_approval_whose_reversal_cannot_be_queued_is_reversed_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fault = JournalFault(monkeypatch, "queue_reversal")
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        lab.host.add_fault(Fault("delay", seconds=0.25, pan=CARD_CUP.pan, mti=("0200",), limit=1))
        with fault.on():
            async with RawTerminal(lab) as raw:
                await raw.sign_in()
                await raw.send(raw.purchase(2_000, CARD_CUP))
                await raw.hang_up()
            await eventually(lambda: _host_approved(lab), "the host approved")
            await anyio.sleep(0.3)
            assert (await only_row(lab)).state is TxnState.PENDING
        rec = await settled(lab, (await only_row(lab)).txn_id)
        assert rec.state is TxnState.REVERSED and rec.reversed_from is TxnState.UNDELIVERABLE
        assert limit_used(lab) == 0
        await assert_no_charge_without_receipt(lab)


async def _host_approved(lab: Lab) -> bool:
    return any(e.approved for e in lab.host.ledger.values())


async def test_a_late_answer_whose_write_fails_is_journalled_later(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    fault = JournalFault(monkeypatch, "record_late_answer")
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        lab.host.add_fault(Fault("delay", seconds=HOST_TIMEOUT + 0.3, pan=CARD_CUP.pan, mti=("0200",), limit=1))
        t = lab.terminal(auto_reverse=False)
        await t.connect()
        await t.sign_in()
        with fault.on():
            assert (await t.purchase(2_500, CARD_CUP)).rc == "98"
            await eventually(lambda: _failed(fault), "the late answer's write failed")
            assert await lab.gateway.store.late_answers() == []
        rec = await settled(lab, (await only_row(lab)).txn_id)
        late = await eventually(lambda: lab.gateway.store.late_answers(txn_id=rec.txn_id), "late answer on record")
        assert late[0].rc == "00"
        await assert_no_charge_without_receipt(lab)


async def _failed(fault: JournalFault) -> bool:
    return fault.failures > 0


async def test_the_sweep_settles_a_pending_row_whose_exchange_ended_without_an_outcome(tmp_path: Path) -> None:
    """The backstop: a transaction of this process left pending with its exchange over (nothing kept
    for it) is reversed by the journal retry's sweep, while the gateway runs."""
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        t = lab.terminal(auto_reverse=False)
        await t.connect()
        await t.sign_in()
        sale = await t.purchase(700, CARD_VISA)
        done = await lab.gateway.store.find_original(t.ident.terminal_id, sale.batch, sale.stan)
        assert done is not None
        store, retry = lab.gateway.store, lab.gateway.service.journal_retry
        lost = await store.record_request(TxnRequest(
            terminal_id=done.terminal_id, merchant_id=done.merchant_id, batch=done.batch, terminal_stan="999999",
            terminal_mti="0200", processing_code="000000", kind="purchase", amount=800, currency="156",  # type: ignore[arg-type]
            pan_masked=done.pan_masked, pan_fingerprint=done.pan_fingerprint, host_mti="0200",
            host_stan="999999", transmission_datetime=done.transmission_datetime))
        retry.opened(lost)
        retry.finished(lost)
        rec = await settled(lab, lost)
        assert rec.state is TxnState.REVERSED and rec.reversal_reason == "06"
        saf = await store.saf_for_txn(lost)
        assert saf is not None and saf.state is SafState.DONE
