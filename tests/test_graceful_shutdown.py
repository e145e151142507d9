"""Issue 11 item 11: SIGTERM with 16 transactions in flight. A real `gateway serve` process, a host
simulator in this process (12 purchases answered after 1 s, 4 never answered), 16 terminal simulators.

The first signal drains: the listener closes (a new terminal is refused), /readyz says "draining", the
12 approvals are delivered, the 4 unanswered time out (98) and their reversals reach the host in the
SAF's last try, a summary is logged, and the process exits 0 with nothing left pending. A second
signal stops at once; the next start's recovery reverses what was left.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

import anyio
import pytest
from crash_support import free_port
from fault_support import ChildSetup, PipedGateway, http_get, wait_until_up, write_child_config

from gateway.lab import CARD_CUP, CARD_CUP_2, LAB_ACCOUNTS, LOOPBACK, MERCHANT_ID, terminal_ids
from gateway.security.algorithms import generate_key
from gateway.sim.host import HostSimConfig, HostSimulator
from gateway.sim.host_rules import Fault, HostRulesConfig
from gateway.sim.terminal import TerminalConnectionError, TerminalSimulator, TxnResult

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

HOST_TIMEOUT = 2.0
ANSWERED_AFTER = 1.0  #: the host's delay for the purchases it answers
IN_FLIGHT = 16
NEVER_ANSWERED = 4  #: of those, the host books but never answers (CARD_CUP)


def states(journal: Path) -> Counter[str]:
    with closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5.0)) as conn:
        return Counter(s for (s,) in conn.execute("SELECT state FROM txn"))


class Bench:
    """Host, gateway child and signed-in terminals for one test."""

    def __init__(self, tmp_path: Path, backend: str) -> None:
        self.zmk = generate_key(16)
        self.tids = terminal_ids(IN_FLIGHT)
        self.tmks = {tid: generate_key(16) for tid in self.tids}
        self.host = HostSimulator(HostSimConfig(zmk=self.zmk, rules=HostRulesConfig(accounts=LAB_ACCOUNTS,
                                                                                     limit=2_000_000)))
        self.tmp_path = tmp_path
        self.backend = backend
        self.journal = tmp_path / "journal.db"
        self.terminals: list[TerminalSimulator] = []
        self.results: dict[int, TxnResult] = {}
        self.lost = 0

    async def start_gateway(self, tg: anyio.abc.TaskGroup, host_port: int) -> PipedGateway:
        if not hasattr(self, "setup"):
            self.setup = ChildSetup(free_port(), free_port(), host_port, self.zmk, self.tmks, MERCHANT_ID,
                                    self.journal, HOST_TIMEOUT)
        gateway = PipedGateway(write_child_config(self.tmp_path / "gateway.toml", self.setup), self.backend)
        await gateway.start(tg)
        await wait_until_up(gateway, self.setup.admin_port)
        return gateway

    async def sign_in_all(self) -> None:
        for tid in self.tids:
            term = TerminalSimulator(LOOPBACK, self.setup.terminal_port, tid, MERCHANT_ID, self.tmks[tid],
                                     cards=(CARD_CUP, CARD_CUP_2), timeout=3 * HOST_TIMEOUT, auto_reverse=False)
            self.terminals.append(term)
            await term.connect()
            await term.sign_in()

    async def buy(self, i: int) -> None:
        """One purchase; a connection that dies under it leaves no result (`lost`)."""
        card = CARD_CUP if i < NEVER_ANSWERED else CARD_CUP_2
        try:
            self.results[i] = await self.terminals[i].purchase(1_000 + i, card)
        except TerminalConnectionError:
            self.lost += 1

    async def all_at_the_host(self, sent_before: int) -> None:
        with anyio.fail_after(10):
            while self.host.stats.messages["0200"] < sent_before + IN_FLIGHT:
                await anyio.sleep(0.005)

    async def close(self) -> None:
        for term in self.terminals:
            await term.aclose()


async def test_sigterm_drains_the_transactions_in_flight_and_exits_0(
        tmp_path: Path, anyio_backend: tuple[str, dict[str, object]]) -> None:
    bench = Bench(tmp_path, anyio_backend[0])
    host = bench.host
    async with anyio.create_task_group() as tg:
        host_port = await tg.start(host.serve, LOOPBACK, 0)
        gateway = await bench.start_gateway(tg, host_port)
        try:
            await bench.sign_in_all()
            host.faults.set([Fault("drop", pan=CARD_CUP.pan, mti=("0200",)),
                             Fault("delay", seconds=ANSWERED_AFTER, pan=CARD_CUP_2.pan, mti=("0200",))])
            sent_before = host.stats.messages["0200"]
            async with anyio.create_task_group() as buyers:
                for i in range(IN_FLIGHT):
                    buyers.start_soon(bench.buy, i)
                await bench.all_at_the_host(sent_before)
                gateway.signal(signal.SIGTERM)
                signalled = time.monotonic()
                await anyio.sleep(0.3)
                with pytest.raises(OSError):  # no longer accepting terminals
                    await anyio.connect_tcp(LOOPBACK, bench.setup.terminal_port)
                status, body = await http_get(bench.setup.admin_port, "/readyz")
                assert status == 503 and json.loads(body)["not_ready"] == ["not_draining"], body
            code = await gateway.wait(3 * HOST_TIMEOUT + 5)
            took = time.monotonic() - signalled
        finally:
            await bench.close()
            await gateway.stop_quietly()
        tg.cancel_scope.cancel()

    rcs = Counter(r.rc for r in bench.results.values())
    rcs["connection lost"] = bench.lost
    print(f"\nshutdown ({anyio_backend[0]}): exit {code} after {took:.2f}s; terminals {dict(rcs)}; "
          f"journal {dict(states(bench.journal))}")
    assert code == 0, gateway.tail()
    assert +rcs == Counter({"00": IN_FLIGHT - NEVER_ANSWERED, "98": NEVER_ANSWERED}), rcs
    assert all(bench.results[i].approved for i in range(NEVER_ANSWERED, IN_FLIGHT))
    assert states(bench.journal) == Counter({"completed": 12, "reversed": 4})  # nothing left for recovery
    booked = [e for e in host.rules.ledger.values() if e.kind == "purchase" and e.approved]
    assert len(booked) == IN_FLIGHT
    assert sorted(e.amount for e in booked if not e.reversed) == sorted(
        r.amount for r in bench.results.values() if r.approved)  # every standing charge has its receipt
    assert took < HOST_TIMEOUT + 2 + HOST_TIMEOUT + 3, f"the drain took {took:.1f}s"
    summary = [line for line in gateway.text.splitlines() if "drained in" in line]
    assert summary and "16 answered, 4 reversals queued, 0 reversals still to send, 0 left for recovery" \
        in summary[0], summary


async def test_a_second_signal_stops_at_once_and_recovery_settles_the_rest(
        tmp_path: Path, anyio_backend: tuple[str, dict[str, object]]) -> None:
    bench = Bench(tmp_path, anyio_backend[0])
    host = bench.host
    async with anyio.create_task_group() as tg:
        host_port = await tg.start(host.serve, LOOPBACK, 0)
        gateway = await bench.start_gateway(tg, host_port)
        try:
            await bench.sign_in_all()
            host.faults.set([Fault("delay", seconds=HOST_TIMEOUT * 0.9, mti=("0200",))])
            sent_before = host.stats.messages["0200"]
            async with anyio.create_task_group() as buyers:
                for i in range(IN_FLIGHT):
                    buyers.start_soon(bench.buy, i)
                await bench.all_at_the_host(sent_before)
                gateway.signal(signal.SIGTERM)
                await anyio.sleep(0.1)
                gateway.signal(signal.SIGINT)
                signalled = time.monotonic()
                code = await gateway.wait(HOST_TIMEOUT)
                took = time.monotonic() - signalled
            assert code == 0, gateway.tail()
            assert bench.lost == IN_FLIGHT  # stopped at once: the terminals lost their connections
            assert took < HOST_TIMEOUT * 0.5, f"the second signal took {took:.1f}s to stop the gateway"
            left = states(bench.journal)["pending"]
            assert left == IN_FLIGHT, states(bench.journal)
            await gateway.stop_quietly()
            await bench.close()

            host.faults.clear()
            gateway = await bench.start_gateway(tg, host_port)  # recovery reverses what was left
            with anyio.fail_after(15):
                while states(bench.journal) != Counter({"reversed": IN_FLIGHT}):
                    await anyio.sleep(0.05)
            assert all(e.reversed for e in host.rules.ledger.values() if e.kind == "purchase" and e.approved)
            gateway.signal(signal.SIGTERM)
            assert await gateway.wait(3 * HOST_TIMEOUT + 5) == 0
        finally:
            await bench.close()
            await gateway.stop_quietly()
        tg.cancel_scope.cancel()
