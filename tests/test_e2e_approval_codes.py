"""Approvals that are not "00": the customer is charged all the same (reference §5).

11 (VIP approval) and A2/A4/A5/A6 ("defective success", which terminals treat as success) approve the
whole amount; 10 approves part of it. Each is money that moved at the issuer, so the promise of issue 5
holds for them as for 00: delivered to the terminal, or reversed. Before this, only 00 counted as an
approval: an undeliverable 11 was journalled as a decline and its charge stood with no receipt.

The gateway offers terminals no partial approval, so a 10 is reversed as an answer it cannot carry and
the terminal gets 96 (not approved) at once.
"""

from __future__ import annotations

import pytest
from test_e2e_reversal import (
    FAST_SAF,
    HOST_TIMEOUT,
    RawTerminal,
    assert_no_charge_without_receipt,
    assert_reversed,
    eventually,
    host_entry,
    only_txn,
    receipt,
    settled,
)

from gateway.lab import CARD_CUP, open_lab
from gateway.sim.host_rules import Fault
from gateway.store import TxnState

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("code", ["11", "A2"])
async def test_a_delivered_whole_approval_is_completed_and_stands(tmp_path, code):
    async with open_lab(tmp_path, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        lab.host.add_fault(Fault("approve_as", code=code, pan=CARD_CUP.pan, mti=("0200",), limit=1))
        term = lab.terminal(timeout=5.0)
        await term.connect()
        await term.sign_in()

        result = await term.purchase(1_200, CARD_CUP)
        assert result.rc == code

        rec = await eventually(lambda: _completed(lab), "the approval journalled completed")
        assert rec.rc == code and rec.auth_code
        entry = host_entry(lab, rec)
        assert entry.approved and not entry.reversed
        await assert_no_charge_without_receipt(lab, [receipt(result)])


async def _completed(lab):  # type: ignore[no-untyped-def]
    rec = await only_txn(lab)
    return rec if rec.state is TxnState.COMPLETED else None


@pytest.mark.parametrize("code", ["11", "A2"])
async def test_a_whole_approval_the_terminal_never_gets_is_reversed(tmp_path, code):
    async with open_lab(tmp_path, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        lab.host.add_fault(Fault("approve_as", code=code, pan=CARD_CUP.pan, mti=("0200",), limit=1))
        lab.host.add_fault(Fault("delay", seconds=0.25, pan=CARD_CUP.pan, mti=("0200",), limit=1))
        async with RawTerminal(lab) as raw:
            await raw.sign_in()
            await raw.send(raw.purchase(2_000, CARD_CUP))
            await raw.hang_up()

        rec = await settled(lab, (await eventually(lambda: lab.gateway.store.list_transactions(),
                                                   "purchase journalled"))[0].txn_id)
        assert_reversed(rec, reason="96", was=TxnState.UNDELIVERABLE)
        assert rec.rc == code
        entry = host_entry(lab, rec)
        assert entry.approved and entry.reversed and lab.host.reversal_count(entry.key) == 1
        await assert_no_charge_without_receipt(lab)


async def test_a_partial_approval_is_reversed_and_the_terminal_gets_96_at_once(tmp_path):
    async with open_lab(tmp_path, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        lab.host.add_fault(Fault("approve_as", code="10", pan=CARD_CUP.pan, mti=("0200",), limit=1))
        term = lab.terminal(timeout=5.0)
        await term.connect()
        await term.sign_in()

        result = await term.purchase(3_000, CARD_CUP)
        assert result.rc == "96" and not result.approved

        rec = await settled(lab, (await only_txn(lab)).txn_id)
        assert_reversed(rec, reason="06", was=TxnState.HOST_REJECTED)
        entry = host_entry(lab, rec)
        assert entry.approved and entry.reversed and lab.host.reversal_count(entry.key) == 1
        await assert_no_charge_without_receipt(lab)
