"""Two and three gateway instances on one PostgreSQL database (the real server), one host simulator, real
loopback sockets: terminals switch instances between their messages, as CUP terminals behind a TCP load
balancer do (a new connection per transaction).

- A terminal signs in on A and buys on B and C; a repeated STAN is 94 on another instance; a void, a
  refund and a terminal reversal find their originals journalled by another instance.
- A re-sign-in on one instance (new working keys) is honoured at once by another that held the old ones;
  a sign-off on one instance is a "sign in again" on the others.
- Purchases of one terminal racing through two instances never approve past its daily limit.
- Host STANs of all instances never collide (each takes its own blocks of the shared sequence).

The host simulator keeps one set of zone keys (the last key exchange wins): instance A exchanges them,
the others start with A's (`key_exchange = false`), as instances sharing one host zone would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import psycopg
import pytest
from test_e2e_reversal import eventually

from gateway.config import GatewayConfig, LimitsConfig, StoreConfig
from gateway.iso.stan import StanAllocator
from gateway.lab import CARD_CUP, CARD_CUP_2, LAB_ACCOUNTS, LAB_CARDS, LOOPBACK, MERCHANT_ID, lab_config, terminal_ids
from gateway.security.algorithms import generate_key
from gateway.security.keys import KeyUsage
from gateway.security.keystore import LMK_ENV, LocalMasterKey
from gateway.security.module import SoftwareSecurityModule
from gateway.serve import RunningGateway, run_gateway
from gateway.sim.host import HostSimConfig, HostSimulator
from gateway.sim.host_rules import HostRulesConfig
from gateway.sim.terminal import TerminalSimulator
from gateway.store import TxnState
from gateway.store.shared_state import SharedSessions

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _lmk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every instance has the same LMK (as they share the key store): working keys are sealed under it."""
    monkeypatch.setenv(LMK_ENV, LocalMasterKey.generate().to_hex())


class Cluster:
    def __init__(self, pg_url: str, tmp_path: Any, limits: LimitsConfig | None = None,
                 commit_delay: dict[str, float] | None = None) -> None:
        self.commit_delay = commit_delay or {}
        self.zmk = generate_key(16)
        self.tmks = {tid: generate_key(16) for tid in terminal_ids(1)}
        [self.terminal_id] = self.tmks
        self.host = HostSimulator(HostSimConfig(zmk=self.zmk, rules=HostRulesConfig(accounts=LAB_ACCOUNTS)))
        self.pg_url, self.tmp_path, self.limits = pg_url, tmp_path, limits
        self.host_port = 0
        self.gateways: list[RunningGateway] = []

    def config(self, name: str, *, key_exchange: bool) -> GatewayConfig:
        config = lab_config(self.tmp_path, self.host_port, self.tmks, self.zmk, admin=False, limits=self.limits,
                            host_options={"key_exchange": key_exchange})
        return dataclasses.replace(config, store=StoreConfig(
            url=self.pg_url, instance_id=name, pan_hash_key_hex="11" * 32, heartbeat_interval=0.2, orphan_after=5.0,
            commit_delay=self.commit_delay.get(name, 0.002)))

    async def start(self, tg: anyio.abc.TaskGroup, n: int) -> list[RunningGateway]:
        self.host_port = await tg.start(self.host.serve, LOOPBACK, 0)
        first: RunningGateway = await tg.start(run_gateway, self.config("gw-a", key_exchange=True))
        with anyio.fail_after(10):
            await first.link.wait_signed_on()
        zone_keys = [first.link.security.store.find(u) for u in (KeyUsage.ZPK, KeyUsage.ZAK)]  # type: ignore[attr-defined]
        self.gateways = [first]
        for name in ("gw-b", "gw-c")[: n - 1]:
            config = self.config(name, key_exchange=False)
            security = SoftwareSecurityModule.from_config(config.security, config.terminals)
            security.store.put_all([k for k in zone_keys if k is not None], save=False)
            gw: RunningGateway = await tg.start(lambda c=config, s=security, **kw: run_gateway(c, security=s, **kw))
            with anyio.fail_after(10):
                await gw.link.wait_signed_on()
            self.gateways.append(gw)
        return self.gateways

    def terminal(self, gw: RunningGateway, *, stan: int = 1) -> TerminalSimulator:
        term = TerminalSimulator(LOOPBACK, gw.terminal_port, self.terminal_id, MERCHANT_ID, self.tmks[self.terminal_id],
                                 cards=LAB_CARDS, timeout=5.0, auto_reverse=False)
        term.stans = StanAllocator(start=stan)
        return term


async def move(term: TerminalSimulator, gw: RunningGateway) -> TerminalSimulator:
    """The terminal's next transaction on a new connection, which the balancer sends to `gw`."""
    await term.aclose()
    term.port = gw.terminal_port
    await term.connect()
    return term


def clone(term: TerminalSimulator, gw: RunningGateway, *, stan: int) -> TerminalSimulator:
    """Another connection of the same (signed-in) terminal, with STANs of its own from `stan` on."""
    other = TerminalSimulator(LOOPBACK, gw.terminal_port, term.ident.terminal_id, term.ident.merchant_id,
                              term._tmk, cards=LAB_CARDS, timeout=5.0, auto_reverse=False, batch=term.batch)
    other._keys = dict(term._keys)
    other.stans = StanAllocator(start=stan)
    return other


@asynccontextmanager
async def cluster(pg_url: str, tmp_path: Any, n: int, **options: Any) -> AsyncIterator[Cluster]:
    lab = Cluster(pg_url, tmp_path, **options)
    async with anyio.create_task_group() as tg:
        await lab.start(tg, n)
        yield lab
        tg.cancel_scope.cancel()


async def test_a_terminal_signs_in_on_a_and_buys_on_b_and_c(pg_url, tmp_path):
    async with cluster(pg_url, tmp_path, 3) as lab:
        a, b, c = lab.gateways
        term = lab.terminal(a)
        await term.connect()
        await term.sign_in()
        sale_b = await (await move(term, b)).purchase(1_000, CARD_CUP)
        assert sale_b.approved, sale_b
        sale_c = await (await move(term, c)).purchase(2_000, CARD_CUP_2)
        assert sale_c.approved, sale_c
        # each instance read the session once, at the terminal's first request there
        assert [isinstance(g.service.sessions, SharedSessions) for g in lab.gateways] == [True] * 3
        assert [g.service.sessions.taken_over for g in lab.gateways] == [0, 1, 1]  # type: ignore[attr-defined]

        # the same batch and STAN again, on another instance: 94 (the shared journal's unique index)
        term.stans = StanAllocator(start=int(sale_b.stan))
        again = await (await move(term, a)).purchase(1_000, CARD_CUP)
        assert again.rc == "94"
        term.stans = StanAllocator(start=int(sale_c.stan) + 1)

        # originals journalled by another instance: a void on A of C's sale, a refund on B of B's... on C
        void = await (await move(term, a)).void(sale_c)
        assert void.approved, void
        refund = await (await move(term, c)).refund(400, CARD_CUP, original=sale_b)
        assert refund.approved, refund
        # a terminal reversal on A of a sale made on B
        sale_b2 = await (await move(term, b)).purchase(3_000, CARD_CUP)
        assert sale_b2.approved
        assert (await (await move(term, a)).reversal(sale_b2, "96")).rc == "00"
        await term.aclose()

        rows = {r.txn_id: r for r in await a.store.list_transactions(limit=50)}

        async def reversed_b2() -> bool:
            return any(e.reversed for e in lab.host.ledger.values() if e.amount == 3_000)

        await eventually(reversed_b2, "the reversal of B's sale at the host")
        by_kind = {(r.kind, r.amount): r for r in rows.values()}
        assert by_kind[("void", 2_000)].orig_txn_id == by_kind[("purchase", 2_000)].txn_id
        assert by_kind[("refund", 400)].orig_txn_id == by_kind[("purchase", 1_000)].txn_id
        # host STANs: every request of every instance (sign-on, key exchange, money) had its own
        stans = [m.fields["11"] for m in lab.host.seen if m.mti[2] in "02"]
        assert len(stans) == len(set(stans)), sorted(stans)
        journalled = [r.host_stan for r in rows.values() if r.host_stan]  # 2 + 1 purchases, the void, the refund
        journalled += [e.reversal_stan for e in await a.store.list_saf() if e.reversal_stan]
        assert len(journalled) == len(set(journalled)) == 6
        sale_b2_id = by_kind[("purchase", 3_000)].txn_id

        async def journalled_reversed() -> bool:  # the host reverses before its 0410 is journalled as the ack
            row = await a.store.get(sale_b2_id)
            return row is not None and row.state is TxnState.REVERSED

        await eventually(journalled_reversed, "the journal's record of the reversal of B's sale")


async def test_re_sign_in_and_sign_off_reach_the_other_instances(pg_url, tmp_path):
    async with cluster(pg_url, tmp_path, 2) as lab:
        a, b = lab.gateways
        term = lab.terminal(a)
        await term.connect()
        await term.sign_in()
        assert (await term.purchase(1_000, CARD_CUP)).approved
        assert (await (await move(term, b)).purchase(1_100, CARD_CUP)).approved  # B holds the keys now
        await term.sign_in()  # again, on B: new working keys
        # straight back to A, which may not have heard yet: its MAC check takes the shared keys
        assert (await (await move(term, a)).purchase(1_200, CARD_CUP)).approved
        ghost = clone(term, b, stan=500)  # a connection that keeps the keys of before the sign-off
        await term.sign_off()  # on A
        await eventually(lambda: _async(b.service.sessions.get(lab.terminal_id) is None), "B hears of the sign-off")
        async with ghost:
            refused = await ghost.purchase(1_300, CARD_CUP)
        assert refused.rc != "00" and refused.needs_sign_in, refused
        await move(term, b)
        await term.sign_in()  # on B
        assert (await (await move(term, a)).purchase(1_400, CARD_CUP)).approved
        await term.aclose()


async def test_a_void_right_after_its_sale_on_another_instance_waits_for_the_sales_outcome(pg_url, tmp_path):
    # B journals the sale's completion up to 0.1 s after the approval went out (its commit delay): the
    # void reaches C before that, finds the sale still pending, and waits for B's word instead of a 12
    async with cluster(pg_url, tmp_path, 3, commit_delay={"gw-b": 0.1}) as lab:
        a, b, c = lab.gateways
        term = lab.terminal(a)
        await term.connect()
        await term.sign_in()
        sale = await (await move(term, b)).purchase(2_500, CARD_CUP)
        assert sale.approved
        void = await (await move(term, c)).void(sale)
        await term.aclose()
        assert void.approved, void
        [voided] = [e for e in lab.host.ledger.values() if e.kind == "purchase"]
        assert voided.voided


async def _async(value: bool) -> bool:
    return value


async def test_a_limit_race_between_two_instances_never_overshoots(pg_url, tmp_path):
    limits = LimitsConfig(per_transaction=5_000, per_day=10_000)
    async with cluster(pg_url, tmp_path, 2, limits=limits) as lab:
        a, b = lab.gateways
        first = lab.terminal(a)
        await first.connect()
        await first.sign_in()
        # 8 purchases of 3,000 at once, one connection each, alternately through A and B: 3 fit in 10,000
        terms = [clone(first, (a, b)[i % 2], stan=100 * (i + 1)) for i in range(8)]
        results: list[Any] = []

        async def buy(term: TerminalSimulator) -> None:
            async with term:
                results.append(await term.purchase(3_000, CARD_CUP))

        async with anyio.create_task_group() as tg:
            for term in terms:
                tg.start_soon(buy, term)
        await first.aclose()
        approved = [r for r in results if r.approved]
        assert len(approved) == 3 and sorted(r.rc for r in results) == ["00"] * 3 + ["61"] * 5, results
        charged = [e for e in lab.host.ledger.values() if e.kind == "purchase"]
        assert len(charged) == 3  # the host saw only what the limit let through
        with psycopg.connect(pg_url) as conn:
            assert conn.execute("SELECT used FROM risk_usage").fetchall() == [(9_000,)]


async def test_round_trips_a_purchase_adds_on_postgresql(pg_url, tmp_path):
    """The figure for the report: shared-state calls (each one round trip) per purchase, after the
    terminal's first request on an instance."""
    async with cluster(pg_url, tmp_path, 2) as lab:
        a, b = lab.gateways
        term = lab.terminal(a)
        await term.connect()
        await term.sign_in()
        await move(term, b)
        assert (await term.purchase(1_000, CARD_CUP)).approved  # B reads the session: its first request
        async with AsyncExitStack():
            calls = [g.service.limits.db.calls for g in lab.gateways]  # type: ignore[attr-defined]
            for i in range(20):
                assert (await term.purchase(1_000 + i, CARD_CUP)).approved
            await term.aclose()
            extra = sum(g.service.limits.db.calls for g in lab.gateways) - sum(calls)  # type: ignore[attr-defined]
        print(f"\nshared-state round trips per purchase on PostgreSQL: {extra / 20:.2f}")
        assert extra == 20  # the limit's reservation; sessions from the cache, STANs from the block
