"""Two gateway instances on one PostgreSQL journal (the real server), one host simulator, real sockets.

- An instance stops while its reversal is at the host: the other takes the entry over once the lease
  has expired and repeats it, identically (same STAN and field 7), as a 0401.
- An instance stalls past its lease while its reversal is at the host: the other takes it over and
  repeats it; the stalled one's late acknowledgement then changes nothing (no attempt counted twice,
  nothing sent again).
- An instance stops while a purchase is at the host: the other settles that pending request (reverses
  it) without waiting for the first one to come back.

Each case checks both books: the journal, and the host's ledger and balances. The failover time (from
the stop to the reversal acknowledged by the other instance) is printed (`-s` shows it).

In-process instances stopped by cancellation close their journal cleanly; a killed process's heartbeat
just goes stale (tests/test_store_postgres.py covers that, the multi-process crash soak the rest).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import pytest
from test_e2e_reversal import OPENING, eventually

from gateway.config import GatewayConfig, ReversalConfig, StoreConfig
from gateway.iso.message import Message
from gateway.lab import CARD_CUP, LAB_ACCOUNTS, LAB_CARDS, LOOPBACK, MERCHANT_ID, lab_config, terminal_ids
from gateway.security.algorithms import generate_key
from gateway.serve import RunningGateway, run_gateway
from gateway.sim.host import HostSimConfig, HostSimulator
from gateway.sim.host_rules import Fault, HostRulesConfig
from gateway.sim.terminal import TerminalSimulator
from gateway.store import SafState, TxnState

pytestmark = pytest.mark.anyio

LEASE = 1.0
#: the first instance waits this long for the host: the cases stop or outlast it before
LONG = 30.0


def reversals(host: HostSimulator) -> list[Message]:
    return [m for m in host.seen if m.mti in ("0400", "0401")]


def without_mac(msg: Message) -> dict[str, str]:
    return {k: v for k, v in msg.fields.items() if k not in ("64", "128")}


class TwoInstances:
    def __init__(self, pg_url: str, tmp_path: Any, faults: tuple[Fault, ...]) -> None:
        self.zmk = generate_key(16)
        self.tmks = {tid: generate_key(16) for tid in terminal_ids(1)}
        [self.terminal_id] = self.tmks
        self.host = HostSimulator(HostSimConfig(zmk=self.zmk, rules=HostRulesConfig(accounts=LAB_ACCOUNTS,
                                                                                   faults=faults)))
        self.pg_url = pg_url
        self.tmp_path = tmp_path
        self.host_port = 0

    def config(self, instance_id: str, *, host_timeout: float, poll: float = 0.05) -> GatewayConfig:
        config = lab_config(self.tmp_path, self.host_port, self.tmks, self.zmk, host_timeout=host_timeout,
                            admin=False)
        return dataclasses.replace(
            config,
            store=StoreConfig(url=self.pg_url, instance_id=instance_id, pan_hash_key_hex="11" * 32, saf_lease=LEASE,
                              heartbeat_interval=0.2, orphan_after=1.0),
            reversal=ReversalConfig(max_attempts=5, backoff=(0.2, 0.5), poll_interval=poll,
                                    original_wait=host_timeout + 1.0),
        )

    async def terminal(self, gateway: RunningGateway) -> TerminalSimulator:
        term = TerminalSimulator(LOOPBACK, gateway.terminal_port, self.terminal_id, MERCHANT_ID,
                                 self.tmks[self.terminal_id], cards=LAB_CARDS, timeout=5.0, auto_reverse=False)
        await term.connect()
        await term.sign_in()
        return term


@asynccontextmanager
async def gateway(config: GatewayConfig) -> AsyncIterator[RunningGateway]:
    """One instance, until the block ends (then it stops: its task group is cancelled)."""
    async with anyio.create_task_group() as tg:
        gw: RunningGateway = await tg.start(run_gateway, config)
        with anyio.fail_after(10):
            await gw.link.wait_signed_on()
        try:
            yield gw
        finally:
            tg.cancel_scope.cancel()


async def until_reversed(gw: RunningGateway) -> float:
    async def probe() -> float | None:
        rows = await gw.store.list_transactions()
        return time.monotonic() if rows and rows[0].state is TxnState.REVERSED else None

    return await eventually(probe, "the purchase reversed", bound=20.0)


async def test_a_stopped_instances_reversal_is_repeated_identically_by_the_other(pg_url, tmp_path):
    lab = TwoInstances(pg_url, tmp_path, faults=(Fault("drop", mti=("0400",), limit=1),))  # booked, silent
    async with anyio.create_task_group() as tg:
        lab.host_port = await tg.start(lab.host.serve, LOOPBACK, 0)
        async with gateway(lab.config("gw-a", host_timeout=LONG)) as a:
            term = await lab.terminal(a)
            sale = await term.purchase(6_000, CARD_CUP)
            assert sale.approved
            assert (await term.reversal(sale, "96")).rc == "00"  # the terminal's 0400: queued, answered
            await eventually(lambda: _any(reversals(lab.host)), "A's 0400 at the host")
            await term.aclose()
        stopped = time.monotonic()  # A stopped while its 0400 waited for an answer that never came
        async with gateway(lab.config("gw-b", host_timeout=2.0)) as b:
            done = await until_reversed(b)
            [entry] = await b.store.list_saf()
        print(f"\nfailover (instance stopped -> its reversal acknowledged by the other): {done - stopped:.2f}s")
        sent = reversals(lab.host)
        assert [m.mti for m in sent] == ["0400", "0401"]
        assert without_mac(sent[1]) == without_mac(sent[0])  # B repeated A's message
        assert (entry.state, entry.ack_rc, entry.attempts, entry.lease_owner) == (SafState.DONE, "00", 1, None)
        assert entry.reversal_stan == sent[0].fields["11"]
        # B waited out A's lease (renewed by A's last poll, up to a poll interval before it stopped)
        assert LEASE - 0.2 <= done - stopped < LEASE + 10
        [booked] = [e for e in lab.host.ledger.values() if e.kind == "purchase"]
        assert booked.reversed and lab.host.balance(CARD_CUP.pan) == OPENING["cup-debit"]
        tg.cancel_scope.cancel()


async def test_a_stalled_instances_late_acknowledgement_doubles_nothing(pg_url, tmp_path):
    # A's 0400 is answered only after A's lease expired (A does not poll meanwhile: a stall)
    lab = TwoInstances(pg_url, tmp_path, faults=(Fault("delay", seconds=LEASE + 2.0, mti=("0400",), limit=1),))
    async with anyio.create_task_group() as tg:
        lab.host_port = await tg.start(lab.host.serve, LOOPBACK, 0)
        async with gateway(lab.config("gw-a", host_timeout=LONG, poll=LONG)) as a:
            term = await lab.terminal(a)
            sale = await term.purchase(7_000, CARD_CUP)
            assert sale.approved and (await term.reversal(sale, "96")).rc == "00"
            await eventually(lambda: _any(reversals(lab.host)), "A's 0400 at the host")
            async with gateway(lab.config("gw-b", host_timeout=2.0)) as b:
                await until_reversed(b)  # B took it over after the lease and its 0401 was acknowledged
                [after_b] = await b.store.list_saf()
                assert (after_b.state, after_b.attempts, after_b.total_attempts) == (SafState.DONE, 1, 1)

                async def a_acknowledged() -> bool:
                    return (a.metrics.registry.get_sample_value("gateway_reversals_acknowledged_total") or 0) >= 1

                await eventually(a_acknowledged, "A's late acknowledgement", bound=10.0)
                [final] = await b.store.list_saf()
            await term.aclose()
        # A's late word was accepted as the host's, and changed nothing: same entry, same counts
        assert final == after_b
        assert [m.mti for m in reversals(lab.host)] == ["0400", "0401"]  # nothing sent a third time
        [booked] = [e for e in lab.host.ledger.values() if e.kind == "purchase"]
        assert booked.reversed and lab.host.balance(CARD_CUP.pan) == OPENING["cup-debit"]
        tg.cancel_scope.cancel()


async def test_a_stopped_instances_pending_purchase_is_settled_by_the_other(pg_url, tmp_path):
    lab = TwoInstances(pg_url, tmp_path, faults=(Fault("drop", pan=CARD_CUP.pan, mti=("0200",), limit=1),))
    async with anyio.create_task_group() as tg:
        lab.host_port = await tg.start(lab.host.serve, LOOPBACK, 0)
        a_scope = anyio.CancelScope()
        a: RunningGateway = await tg.start(_instance, lab.config("gw-a", host_timeout=LONG), a_scope)
        term = await lab.terminal(a)
        term.timeout = 0.5  # the terminal gives up; A still waits for the host (booked, silent)
        assert (await term.purchase(8_000, CARD_CUP)).timed_out
        await term.aclose()
        [pending] = await a.store.list_transactions()
        assert pending.state is TxnState.PENDING
        # B comes up after A's purchase (the host simulator keeps one set of zone keys: the last instance
        # to sign on MACs with it)
        b: RunningGateway = await tg.start(_instance, lab.config("gw-b", host_timeout=2.0), anyio.CancelScope())
        await anyio.sleep(1.5)
        assert (await b.store.get(pending.txn_id)).state is TxnState.PENDING  # A is alive: A's own
        a_scope.cancel()  # A stops with the purchase in flight
        stopped = time.monotonic()
        done = await until_reversed(b)  # B's sweep claimed A's pending request and reversed it
        rec = await b.store.get(pending.txn_id)
        assert rec is not None and rec.reversed_from is TxnState.TIMED_OUT and rec.reversal_rc == "00"
        print(f"\nfailover (instance stopped -> its pending purchase reversed by the other): {done - stopped:.2f}s")
        assert lab.host.balance(CARD_CUP.pan) == OPENING["cup-debit"]
        tg.cancel_scope.cancel()


async def _instance(config: GatewayConfig, scope: anyio.CancelScope, *,
                    task_status: anyio.abc.TaskStatus[RunningGateway] = anyio.TASK_STATUS_IGNORED) -> None:
    """One instance that `scope.cancel()` stops, while the others go on."""
    with scope:
        async with anyio.create_task_group() as tg:
            gw: RunningGateway = await tg.start(run_gateway, config)
            with anyio.fail_after(10):
                await gw.link.wait_signed_on()
            task_status.started(gw)


async def _any(items: list[Message]) -> bool:
    return bool(items)
