"""How reversals look upstream (issue 14's findings): a repeat is the first attempt's message with the
MTI's last digit 1, even when a new gateway process sends it after a crash; `repeat = "fresh"` gives each
attempt a new STAN and field 7 instead; `upstream_mti = "0420"` sends them as advices 0420/0421, which
the host simulator books like reversals. Real host simulator, gateway and terminals on loopback, a real
journal (SQLite, and PostgreSQL for the crash case)."""

from __future__ import annotations

import dataclasses

import anyio
import pytest
from test_e2e_reversal import BOUND, FAST_SAF, HOST_TIMEOUT, OPENING, assert_no_charge_without_receipt, eventually
from test_e2e_reversal import journal as journal  # the SQLite / PostgreSQL fixture

from gateway.iso.message import Message
from gateway.lab import CARD_CUP, LAB_ACCOUNTS, LAB_CARDS, LOOPBACK, MERCHANT_ID, lab_config, open_lab, terminal_ids
from gateway.security.algorithms import generate_key
from gateway.serve import RunningGateway, run_gateway
from gateway.sim.host import HostSimConfig, HostSimulator
from gateway.sim.host_rules import Fault, HostRulesConfig
from gateway.sim.terminal import TerminalSimulator
from gateway.store import SafState, TxnState

pytestmark = pytest.mark.anyio


def reversals(seen: list[Message], mtis: tuple[str, ...] = ("0400", "0401")) -> list[Message]:
    return [m for m in seen if m.mti in mtis]


def without_mac(msg: Message) -> dict[str, str]:
    """Everything but the MAC (64, or 128 in a two-bitmap message such as a reversal with field 90)."""
    return {k: v for k, v in msg.fields.items() if k not in ("64", "128")}


async def test_fresh_repeats_get_a_new_stan_each_attempt(tmp_path):
    saf = dataclasses.replace(FAST_SAF, repeat="fresh")
    async with open_lab(tmp_path, host_timeout=HOST_TIMEOUT, reversal=saf) as lab:
        lab.host.add_fault(Fault("drop", pan=CARD_CUP.pan, mti=("0200",), limit=1))
        lab.host.add_fault(Fault("reject_reversal", count=2))
        term = lab.terminal(timeout=5.0)
        await term.connect()
        await term.sign_in()
        assert (await term.purchase(3_000, CARD_CUP)).rc == "98"

        async def done() -> bool:
            return [e.state for e in await lab.gateway.store.list_saf()] == [SafState.DONE]

        await eventually(done, "the reversal acknowledged")
        sent = reversals(lab.host.seen)
        assert [m.mti for m in sent] == ["0400", "0401", "0401"]
        assert len({m.fields["11"] for m in sent}) == 3  # a new STAN each time
        assert len({m.fields["90"] for m in sent}) == 1  # the same original
        [entry] = await lab.gateway.store.list_saf()
        assert entry.reversal_stan is None  # nothing fixed in the journal
        await assert_no_charge_without_receipt(lab)


async def test_reversals_go_upstream_as_0420_advices_when_configured(tmp_path):
    saf = dataclasses.replace(FAST_SAF, upstream_mti="0420")
    async with open_lab(tmp_path, host_timeout=HOST_TIMEOUT, reversal=saf) as lab:
        lab.host.add_fault(Fault("drop", pan=CARD_CUP.pan, mti=("0200",), limit=1))  # booked, never answered
        lab.host.add_fault(Fault("reject_reversal", count=1))
        term = lab.terminal(timeout=5.0)
        await term.connect()
        await term.sign_in()
        assert (await term.purchase(4_000, CARD_CUP)).rc == "98"

        async def reversed_() -> bool:
            rows = await lab.gateway.store.list_transactions()
            return [r.state for r in rows] == [TxnState.REVERSED]

        await eventually(reversed_, "the purchase reversed")
        sent = reversals(lab.host.seen, ("0400", "0401", "0420", "0421"))
        assert [m.mti for m in sent] == ["0420", "0421"]  # a refused advice is repeated as 0421
        assert without_mac(sent[0]) == without_mac(sent[1])
        assert lab.host.stats.responses["00"] >= 1
        assert lab.host.balance(CARD_CUP.pan) == OPENING["cup-debit"]
        [entry] = await lab.gateway.store.list_saf()
        assert (entry.state, entry.ack_rc, entry.attempts) == (SafState.DONE, "00", 2)
        await assert_no_charge_without_receipt(lab)


async def test_a_repeat_sent_by_the_next_process_after_a_crash_is_identical(tmp_path, journal):
    """The first process sends the 0400 and dies while the host holds it (no attempt was recorded).
    The next process on the same journal repeats it as a 0401 with the same STAN and field 7: the STAN
    was journalled before the 0400 went out."""
    zmk = generate_key(16)
    tmks = {tid: generate_key(16) for tid in terminal_ids(1)}
    [terminal_id] = tmks
    faults = (Fault("drop", pan=CARD_CUP.pan, mti=("0200",), limit=1),  # booked, never answered: 98
              Fault("drop", mti=("0400",), limit=1))  # the first reversal reaches the host, no answer
    host = HostSimulator(HostSimConfig(zmk=zmk, rules=HostRulesConfig(accounts=LAB_ACCOUNTS, faults=faults)))
    async with anyio.create_task_group() as tg:
        host_port = await tg.start(host.serve, LOOPBACK, 0)
        config = lab_config(tmp_path, host_port, tmks, zmk, host_timeout=HOST_TIMEOUT, admin=False,
                            reversal=FAST_SAF)
        config = dataclasses.replace(config, **journal)
        # the first life waits long for the reversal's answer: it is killed before it comes
        first = dataclasses.replace(config, host=dataclasses.replace(config.host, timeout=30.0))

        async with anyio.create_task_group() as first_life:
            gw1: RunningGateway = await first_life.start(run_gateway, first)
            with anyio.fail_after(BOUND):
                await gw1.link.wait_signed_on()
            term = TerminalSimulator(LOOPBACK, gw1.terminal_port, terminal_id, MERCHANT_ID, tmks[terminal_id],
                                     cards=LAB_CARDS, timeout=1.0, auto_reverse=False)
            await term.connect()
            await term.sign_in()
            assert (await term.purchase(5_000, CARD_CUP)).timed_out  # the gateway still waits (30 s)
            await term.aclose()
            first_life.cancel_scope.cancel()  # the gateway dies with the purchase in flight
        # the second life reverses it at start and dies while the host holds its 0400 (never answered)
        async with anyio.create_task_group() as second_life:
            gw2: RunningGateway = await second_life.start(run_gateway, first)
            assert gw2.recovered == 1
            await eventually(lambda: _seen(host, "0400"), "the 0400 at the host")
            await anyio.sleep(0.1)
            second_life.cancel_scope.cancel()  # dies while the host holds the 0400
        gw3: RunningGateway = await tg.start(run_gateway, config)

        async def reversed_() -> bool:
            rec = (await gw3.store.list_transactions())[0]
            return rec.state is TxnState.REVERSED

        await eventually(reversed_, "the purchase reversed by the third process")
        sent = reversals(host.seen)
        assert [m.mti for m in sent] == ["0400", "0401"]
        assert without_mac(sent[1]) == without_mac(sent[0])  # identical but for the MTI (and so the MAC)
        [entry] = await gw3.store.list_saf()
        assert entry.reversal_stan == sent[0].fields["11"] and entry.attempts == 1
        assert host.balance(CARD_CUP.pan) == OPENING["cup-debit"]
        tg.cancel_scope.cancel()


async def _seen(host: HostSimulator, mti: str) -> bool:
    return any(m.mti == mti for m in host.seen)
