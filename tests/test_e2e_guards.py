"""Regression tests from review: paths where an approval could have been neither delivered nor
reversed, a reversal that was refused, a merchant id taken on trust, originals looked up across
terminals, and an operator action that could stop the SAF sender."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from gateway.config import ReversalConfig
from gateway.lab import CARD_CUP, LOOPBACK, MERCHANT_ID, open_lab
from gateway.security.algorithms import generate_key
from gateway.sim.host_rules import Fault
from gateway.sim.terminal import TerminalSimulator
from gateway.store.records import SafState, TxnState

pytestmark = pytest.mark.anyio


async def final_state(lab: object, terminal_id: str, stan: str, timeout: float = 8.0) -> object:
    """The journal row of one terminal request once it has left every in-between state."""
    store = lab.gateway.store  # type: ignore[attr-defined]
    with anyio.fail_after(timeout):
        while True:
            rows = [r for r in await store.list_transactions(terminal_id=terminal_id) if r.terminal_stan == stan]
            if rows and rows[0].state not in (TxnState.PENDING, TxnState.REVERSAL_QUEUED):
                return rows[0]
            await anyio.sleep(0.05)


async def test_sign_off_while_a_purchase_is_at_the_host_reverses_it(tmp_path: Path) -> None:
    async with open_lab(tmp_path, terminals=1, host_timeout=3.0) as lab:
        tid = lab.config.terminals[0].terminal_id
        a = lab.terminal(timeout=5.0, auto_reverse=False)
        await a.connect()
        await a.sign_in()
        before = lab.host.balance(CARD_CUP.pan)
        lab.host.add_fault(Fault("delay", seconds=1.0, mti=("0200",), limit=1))
        results: dict[str, object] = {}

        async def buy() -> None:
            results["p"] = await a.purchase(1_000, CARD_CUP)

        async with anyio.create_task_group() as tg:
            tg.start_soon(buy)
            await anyio.sleep(0.3)
            # sign-off is not MAC'd (CUP): anyone on the terminal's id can send it, keys or not
            b = TerminalSimulator(LOOPBACK, lab.gateway.terminal_port, tid, MERCHANT_ID, generate_key(16), timeout=5.0)
            lab.terminals.append(b)
            await b.connect()
            assert (await b.sign_off()).rc == "00"
        purchase = results["p"]
        assert not purchase.approved  # type: ignore[attr-defined]  # the approval could not be MAC'd
        row = await final_state(lab, tid, purchase.stan)  # type: ignore[attr-defined]
        assert row.state is TxnState.REVERSED and row.reversed_from is TxnState.UNDELIVERABLE  # type: ignore[attr-defined]
        assert lab.host.balance(CARD_CUP.pan) == before
        assert not lab.gateway.service.in_flight


async def test_terminal_reversal_of_a_void_is_forwarded(tmp_path: Path) -> None:
    async with open_lab(tmp_path, terminals=1) as lab:
        t = lab.terminal()
        await t.connect()
        await t.sign_in()
        before = lab.host.balance(CARD_CUP.pan)
        purchase = await t.purchase(5_000, CARD_CUP)
        void = await t.void(purchase)
        assert void.approved and lab.host.balance(CARD_CUP.pan) == before
        reversal = await t.reversal(void, "96")
        assert reversal.rc == "00"
        row = await final_state(lab, t.ident.terminal_id, void.stan)
        assert row.kind == "void" and row.state is TxnState.REVERSED  # type: ignore[attr-defined]
        assert lab.host.balance(CARD_CUP.pan) == before - 5_000  # the void undone: the sale stands


async def test_a_merchant_id_other_than_the_registered_one_is_refused(tmp_path: Path) -> None:
    async with open_lab(tmp_path, terminals=1) as lab:
        t = lab.terminal()
        await t.connect()
        await t.sign_in()
        sent = sum(lab.host.stats.messages.values())
        t.ident = type(t.ident)(t.ident.terminal_id, "999999999999999")
        refused = await t.purchase(1_000, CARD_CUP)
        assert refused.rc == "03"
        assert sum(lab.host.stats.messages.values()) == sent  # nothing went upstream


async def test_originals_are_this_terminals_and_refunds_cannot_exceed_them(tmp_path: Path) -> None:
    async with open_lab(tmp_path, terminals=2) as lab:
        a = lab.terminal(lab.config.terminals[0].terminal_id)
        b = lab.terminal(lab.config.terminals[1].terminal_id)
        for t in (a, b):
            await t.connect()
            await t.sign_in()
        sale = await a.purchase(10_000, CARD_CUP)
        assert sale.approved
        assert (await b.void(sale)).rc == "25"  # B cannot void A's sale, not even by its RRN
        assert (await a.refund(6_000, CARD_CUP, original=sale)).approved
        assert (await a.refund(6_000, CARD_CUP, original=sale)).rc == "64"  # 12,000 > 10,000 refunded
        assert (await a.refund(4_000, CARD_CUP, original=sale)).approved  # exactly the rest


async def test_an_operator_dropping_a_reversal_mid_attempt_does_not_stop_the_gateway(tmp_path: Path) -> None:
    saf = ReversalConfig(max_attempts=5, backoff=(0.2,), poll_interval=0.1, original_wait=3.0)
    async with open_lab(tmp_path, terminals=1, host_timeout=1.0, reversal=saf) as lab:
        t = lab.terminal(timeout=5.0, auto_reverse=False)
        await t.connect()
        await t.sign_in()
        lab.host.add_fault(Fault("drop", mti=("0200",), limit=1))
        lab.host.add_fault(Fault("drop", mti=("0400", "0401")))
        assert (await t.purchase(1_000, CARD_CUP)).rc == "98"
        await anyio.sleep(0.4)  # an attempt is at the host, which never answers
        [entry] = await lab.gateway.store.list_saf()
        await lab.gateway.store.drop_saf(entry.saf_id, "closed by the operator")
        await anyio.sleep(1.5)  # the attempt times out and finds its entry dropped
        assert (await lab.gateway.store.get_saf(entry.saf_id)).state is SafState.DROPPED
        lab.host.clear_faults()
        assert (await t.purchase(500, CARD_CUP)).approved  # still serving


async def test_an_approval_the_terminal_dialect_cannot_carry_is_reversed(tmp_path: Path) -> None:
    """ISO 8583:1987 allows 120 characters of additional amounts (54), CUP 40: such an approval cannot
    be encoded for the terminal, so it is not delivered, and so it is reversed."""
    async with open_lab(tmp_path, terminals=1) as lab:
        t = lab.terminal(auto_reverse=False)
        await t.connect()
        await t.sign_in()
        before = lab.host.balance(CARD_CUP.pan)
        original_answer = lab.host._answer

        def long_54(request: object, rc: str, **kwargs: object) -> object:
            answer = original_answer(request, rc, **kwargs)  # type: ignore[arg-type]
            if rc == "00" and answer.mti == "0210":
                answer.fields["54"] = "1001156C000000010000" * 3
            return answer

        lab.host._answer = long_54  # type: ignore[method-assign]
        result = await t.purchase(1_000, CARD_CUP)
        assert not result.approved
        lab.host._answer = original_answer  # type: ignore[method-assign]
        row = await final_state(lab, t.ident.terminal_id, result.stan)
        assert row.state is TxnState.REVERSED  # type: ignore[attr-defined]
        assert lab.host.balance(CARD_CUP.pan) == before
