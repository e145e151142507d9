"""An instance stalled past `store.orphan_after` is taken for dead: another instance settles its pending
request (reverses it) while the stalled one still waits for the host's answer. When that answer then
comes, the stalled instance must not break the books (found by the crash soak's stalls,
tests/test_pg_crash_soak.py):

- the reversal overtook the original at the host (the host answered it 25, "original not found") and
  the host then APPROVED the original: the reversal must go again, whether or not the approval reached
  the terminal (otherwise the cardholder stays charged with no receipt, or the journal says reversed
  while the host kept the money);
- the host DECLINED it: the terminal gets the decline, as it would have without the takeover (the
  journal's refusal of `declined` on a reversed row is no internal error).

The takeover is the other instance's own step, `GatewayService.settle_orphans`, called here on the
same journal while the request is at the host; the host decides the purchase only after a delay
(`booked_late`), so the reversal gets there first.
"""

from __future__ import annotations

import logging

import anyio
import pytest
from test_e2e_failover import TwoInstances, _instance, reversals
from test_e2e_reversal import OPENING, eventually

from gateway.lab import CARD_CUP, CARD_LOW, LOOPBACK
from gateway.serve import RunningGateway
from gateway.sim.host_rules import Fault
from gateway.store import SafState, TxnRecord, TxnState

pytestmark = pytest.mark.anyio

HELD = 1.5  #: seconds the host holds the purchase before deciding it
PATIENT = 6.0  #: the stalled instance's host timeout and the waiting terminal's: both outwait HELD


async def _take_over_while_at_the_host(gw: RunningGateway, lab: TwoInstances) -> TxnRecord:
    """Once the purchase is at the host: settle it as another instance's orphan sweep does; wait until
    the host has answered that reversal 25 (the original is not booked yet)."""
    await eventually(lambda: _purchase_seen(lab), "the purchase at the host")
    [pending] = await gw.store.list_transactions()
    assert pending.state is TxnState.PENDING
    assert await gw.service.settle_orphans([pending]) == 1

    async def answered_25() -> TxnRecord | None:
        rec = await gw.store.get(pending.txn_id)
        return rec if rec is not None and rec.state is TxnState.REVERSED else None

    rec = await eventually(answered_25, "the takeover's reversal answered")
    assert rec.reversal_rc == "25" and not lab.host.ledger  # it overtook the original
    return rec


@pytest.mark.parametrize("terminal_waits", [False, True], ids=["terminal-gone", "approval-delivered"])
async def test_an_approval_after_the_takeovers_reversal_was_answered_25_reverses_it_again(
        pg_url, tmp_path, caplog, terminal_waits):
    lab = TwoInstances(pg_url, tmp_path, faults=(Fault("booked_late", seconds=HELD, mti=("0200",), limit=1),))
    async with anyio.create_task_group() as tg:
        lab.host_port = await tg.start(lab.host.serve, LOOPBACK, 0)
        gw: RunningGateway = await tg.start(_instance, lab.config("gw-a", host_timeout=PATIENT), anyio.CancelScope())
        term = await lab.terminal(gw)
        term.timeout = PATIENT if terminal_waits else 0.3
        async with anyio.create_task_group() as sale:
            results = []

            async def buy() -> None:
                results.append(await term.purchase(9_000, CARD_CUP))
                if not terminal_waits:
                    await term.aclose()  # gone: the approval cannot be delivered

            sale.start_soon(buy)
            rec = await _take_over_while_at_the_host(gw, lab)
        [result] = results
        assert result.approved is terminal_waits  # a receipt, or none (no answer in time)

        async def reversed_at_host() -> bool:
            return any(e.reversed for e in lab.host.ledger.values())

        await eventually(reversed_at_host, "the approved original reversed at the host")
        final = await eventually(lambda: _done(gw, rec.txn_id), "the reversal acknowledged again")
        assert final.state is TxnState.REVERSED and final.reversal_rc == "00"
        assert lab.host.balance(CARD_CUP.pan) == OPENING["cup-debit"]
        assert [m.mti for m in reversals(lab.host)] == ["0400", "0401"]  # the 25, then the repeat
        assert not [r for r in caplog.records if r.exc_info], "no traceback"
        await term.aclose()
        tg.cancel_scope.cancel()


async def test_a_decline_after_the_takeover_reaches_the_terminal(pg_url, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    lab = TwoInstances(pg_url, tmp_path, faults=(Fault("booked_late", seconds=HELD, mti=("0200",), limit=1),))
    async with anyio.create_task_group() as tg:
        lab.host_port = await tg.start(lab.host.serve, LOOPBACK, 0)
        gw: RunningGateway = await tg.start(_instance, lab.config("gw-a", host_timeout=PATIENT), anyio.CancelScope())
        term = await lab.terminal(gw)
        term.timeout = PATIENT
        results = []
        async with anyio.create_task_group() as sale:
            async def buy() -> None:
                results.append(await term.purchase(9_000, CARD_LOW))  # more than its balance: 51

            sale.start_soon(buy)
            rec = await _take_over_while_at_the_host(gw, lab)
        [result] = results
        assert result.rc == "51" and not result.approved
        final = await gw.store.get(rec.txn_id)
        assert final is not None and final.state is TxnState.REVERSED  # as the takeover left it
        assert lab.host.balance(CARD_LOW.pan) == OPENING["cup-low"]
        assert not [r for r in caplog.records if r.exc_info], "no traceback"
        await term.aclose()
        tg.cancel_scope.cancel()


async def _purchase_seen(lab: TwoInstances) -> bool:
    return any(m.mti == "0200" for m in lab.host.seen)


async def _done(gw: RunningGateway, txn_id: int) -> TxnRecord | None:
    rec = await gw.store.get(txn_id)
    entry = await gw.store.saf_for_txn(txn_id)
    if rec is None or entry is None or entry.state is not SafState.DONE or rec.state is not TxnState.REVERSED:
        return None
    return rec if rec.reversal_rc == "00" else None
