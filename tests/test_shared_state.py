"""The state instances share (sessions with working keys, daily limits, host STANs), at store level: the
same suite against the in-process implementations (`gateway.core.state`, `StanAllocator`) and the
PostgreSQL ones (`gateway.store.shared_state`, real server), plus what only several instances have:
one instance sees another's sign-in, re-sign-in and sign-off; two race for one limit; STAN blocks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import psycopg
import pytest

from gateway.config import LimitsConfig
from gateway.core.state import LocalLimits, LocalSessions
from gateway.iso.stan import STAN_MAX, StanAllocator
from gateway.security.algorithms import generate_key
from gateway.security.errors import KeyStoreIntegrityError
from gateway.security.keys import KeyUsage
from gateway.security.keystore import LocalMasterKey
from gateway.security.module import SoftwareSecurityModule
from gateway.security.working_keys import install_working_keys, seal_working_keys
from gateway.store import pg_migrations
from gateway.store.shared_state import (
    STAN_BLOCK,
    BlockStanAllocator,
    SharedDatabase,
    SharedLimits,
    SharedSessions,
    block_range,
)

pytestmark = pytest.mark.anyio

TID = "10000001"
MID = "898100000000001"
MAB = b"0200 some message bytes to MAC!!"
BOUND = 5.0  #: seconds a notice may take to reach another instance (it takes milliseconds)


def migrated(url: str) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        pg_migrations.migrate(conn)
    return url


def module(tmk: bytes) -> SoftwareSecurityModule:
    m = SoftwareSecurityModule()
    m.import_clear_key(KeyUsage.TMK, tmk, TID)
    return m


@asynccontextmanager
async def database(url: str) -> AsyncIterator[SharedDatabase]:
    db = SharedDatabase(url)
    await db.open()
    try:
        yield db
    finally:
        await db.close()


@asynccontextmanager
async def instance(url: str, name: str, tmk: bytes, lmk: LocalMasterKey) -> AsyncIterator[SharedSessions]:
    """One instance's sessions, listening for the others' changes."""
    async with database(url) as db, anyio.create_task_group() as tg:
        sessions = SharedSessions(db, module(tmk), lmk, name)
        await tg.start(sessions.listen)
        yield sessions
        tg.cancel_scope.cancel()


async def eventually(probe: Callable[[], bool], what: str) -> None:
    with anyio.fail_after(BOUND):
        while not probe():
            await anyio.sleep(0.01)


async def _append(seen: list[bool], refreshed: Any) -> None:
    seen.append(await refreshed)


# --- the suite, against both implementations --------------------------------------------------------


@pytest.fixture(params=["local", "postgres"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@asynccontextmanager
async def sessions_of(kind: str, request: pytest.FixtureRequest) -> AsyncIterator[tuple[Any, SoftwareSecurityModule]]:
    tmk = generate_key(16)
    if kind == "local":
        m = module(tmk)
        yield LocalSessions(), m
        return
    url = migrated(request.getfixturevalue("pg_url"))
    async with instance(url, "gw-a", tmk, LocalMasterKey.generate()) as shared:
        yield shared, shared.security


@asynccontextmanager
async def limits_of(kind: str, request: pytest.FixtureRequest, config: LimitsConfig) -> AsyncIterator[Any]:
    if kind == "local":
        yield LocalLimits(config)
        return
    url = migrated(request.getfixturevalue("pg_url"))
    async with database(url) as db, anyio.create_task_group() as tg:
        limits = SharedLimits(db, config)
        await tg.start(limits.run)
        yield limits
        tg.cancel_scope.cancel()


async def test_sign_in_batch_and_sign_off(kind: str, request: pytest.FixtureRequest) -> None:
    async with sessions_of(kind, request) as (sessions, security):
        assert sessions.get(TID) is None and len(sessions) == 0
        assert not await sessions.refresh(TID)  # nobody signed it in anywhere
        security.issue_working_keys(TID)
        await sessions.sign_in(TID, MID, "000007", "004")
        session = sessions.get(TID)
        assert (session.batch, session.key_mode, session.merchant_id, len(sessions)) == ("000007", "004", MID, 1)
        assert not await sessions.refresh(TID)  # this instance's copy is the shared one
        assert await sessions.close_batch(TID) == "000008"
        assert sessions.get(TID).batch == "000008"
        await sessions.sign_off(TID)
        assert sessions.get(TID) is None
        assert await sessions.close_batch(TID) is None
        assert not await sessions.refresh(TID)


async def test_the_batch_wraps_after_999999(kind: str, request: pytest.FixtureRequest) -> None:
    async with sessions_of(kind, request) as (sessions, security):
        security.issue_working_keys(TID)
        await sessions.sign_in(TID, MID, "999999", "004")
        assert await sessions.close_batch(TID) == "000001"


async def test_limits_reserve_release_and_roll_over(kind: str, request: pytest.FixtureRequest) -> None:
    async with limits_of(kind, request, LimitsConfig(per_transaction=1_000, per_day=2_500)) as limits:
        assert await limits.reserve(TID, 1_001, "20260101") == "61"  # per transaction
        assert await limits.reserve(TID, 1_000, "20260101") is None
        assert await limits.reserve(TID, 1_000, "20260101") is None
        assert await limits.reserve(TID, 1_000, "20260101") == "61"  # 3,000 > 2,500
        assert limits.used(TID) == 2_000
        limits.release(TID, 1_000, "20260101")
        with anyio.fail_after(BOUND):  # PostgreSQL: the release is written in the background
            while await limits.reserve(TID, 500, "20260101") is not None:
                await anyio.sleep(0.01)
        assert await limits.reserve("10000002", 1_000, "20260101") is None  # per terminal
        assert await limits.reserve(TID, 1_000, "20260102") is None  # a new day


async def test_concurrent_reservations_never_overshoot(kind: str, request: pytest.FixtureRequest) -> None:
    async with limits_of(kind, request, LimitsConfig(per_transaction=1_000, per_day=200)) as limits:
        approved: list[int] = []

        async def buy() -> None:
            if await limits.reserve(TID, 7, "20260101") is None:
                approved.append(7)

        async with anyio.create_task_group() as tg:
            for _ in range(100):
                tg.start_soon(buy)
        assert sum(approved) == 196 and len(approved) == 28  # as many as fit, not one more


async def test_stans_run_1_to_999999_and_wrap(kind: str, request: pytest.FixtureRequest) -> None:
    if kind == "local":
        stans = StanAllocator(start=STAN_MAX - 1)
        assert [stans.next() for _ in range(4)] == [STAN_MAX - 1, STAN_MAX, 1, 2]
        return
    url = migrated(request.getfixturevalue("pg_url"))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT setval('host_stan_block', 998)")  # the next block is the last one
    async with database(url) as db, anyio.create_task_group() as tg:
        stans = BlockStanAllocator(db)
        await stans.prime()
        await tg.start(stans.run)
        drawn = [stans.next() for _ in range(STAN_BLOCK)]
        assert drawn == list(range(999_000, STAN_MAX + 1))
        await anyio.sleep(0.2)  # the background fetch of the next block (started at half the block) is in
        assert [stans.next() for _ in range(3)] == [1, 2, 3]  # block 0, without the STAN 0
        assert stans.blocking_fetches == 0
        tg.cancel_scope.cancel()


# --- only where several instances share one database -------------------------------------------------


def test_block_ranges_cover_every_stan_once() -> None:
    seen = [s for block in range(1000) for s in range(block_range(block)[0], block_range(block)[1] + 1)]
    assert seen == list(range(1, STAN_MAX + 1))


async def test_a_sign_in_on_one_instance_serves_the_others(pg_url: str) -> None:
    url, tmk, lmk = migrated(pg_url), generate_key(16), LocalMasterKey.generate()
    async with instance(url, "gw-a", tmk, lmk) as a, instance(url, "gw-b", tmk, lmk) as b:
        a.security.issue_working_keys(TID)
        await a.sign_in(TID, MID, "000001", "004")
        assert b.get(TID) is None
        assert await b.refresh(TID)  # the terminal's first request on B: one read
        assert b.get(TID).batch == "000001"
        assert b.security.generate_terminal_mac(TID, MAB) == a.security.generate_terminal_mac(TID, MAB)
        assert not await b.refresh(TID)  # nothing new
        b._forget(TID, keys=True)
        async with anyio.create_task_group() as tg:  # a terminal's first requests on B, at once: each may go on
            seen: list[bool] = []
            for _ in range(4):
                tg.start_soon(lambda: _append(seen, b.refresh(TID)))
        assert seen == [True] * 4
        old_mac = b.security.generate_terminal_mac(TID, MAB)

        a.security.issue_working_keys(TID)  # signs in again on A: new keys
        await a.sign_in(TID, MID, "000001", "004")
        await eventually(lambda: b.get(TID) is None, "B drops its stale copy")
        assert await b.refresh(TID)
        new_mac = a.security.generate_terminal_mac(TID, MAB)
        assert new_mac != old_mac and b.security.generate_terminal_mac(TID, MAB) == new_mac

        assert await b.close_batch(TID) == "000002"  # a settlement on B
        await eventually(lambda: a.get(TID) is None, "A drops its copy of the old batch")
        assert await a.refresh(TID) and a.get(TID).batch == "000002"
        assert await a.close_batch(TID) == "000003"

        await b.refresh(TID)
        await a.sign_off(TID)
        await eventually(lambda: b.get(TID) is None, "B hears of the sign-off")
        assert b.security.store.find(KeyUsage.MAK, TID) is None  # its keys are gone too
        assert not await b.refresh(TID)


async def test_a_batch_moved_on_elsewhere_is_not_moved_twice(pg_url: str) -> None:
    url, tmk, lmk = migrated(pg_url), generate_key(16), LocalMasterKey.generate()
    async with instance(url, "gw-a", tmk, lmk) as a, instance(url, "gw-b", tmk, lmk) as b:
        a.security.issue_working_keys(TID)
        await a.sign_in(TID, MID, "000005", "004")
        await b.refresh(TID)
        b._cache[TID].batch = "000005"  # B has not heard yet ...
        b._generation[TID] = 10**9  # ... and ignores notices for this test
        assert await a.close_batch(TID) == "000006"
        assert await b.close_batch(TID) == "000006"  # B's UPDATE finds the batch moved: it reads it


async def test_working_keys_rest_sealed_under_the_lmk(pg_url: str) -> None:
    url, tmk, lmk = migrated(pg_url), generate_key(16), LocalMasterKey.generate()
    async with instance(url, "gw-a", tmk, lmk) as a:
        a.security.issue_working_keys(TID)
        await a.sign_in(TID, MID, "000001", "004")
        with psycopg.connect(url) as conn:
            [(blob,)] = conn.execute("SELECT working_keys FROM terminal_session").fetchall()
        blob = bytes(blob)
        for usage in (KeyUsage.PIK, KeyUsage.MAK, KeyUsage.TDK):
            material = a.security.store.find(usage, TID).cipher.material
            assert material not in blob and material.hex().upper().encode() not in blob
        other = module(tmk)
        with pytest.raises(KeyStoreIntegrityError, match="another LMK"):
            install_working_keys(other, TID, blob, LocalMasterKey.generate())
        with pytest.raises(KeyStoreIntegrityError, match="fail authentication"):  # bound to its terminal
            install_working_keys(other, "10000002", blob, lmk)
        tampered = blob[:-1] + bytes([blob[-1] ^ 1])
        with pytest.raises(KeyStoreIntegrityError):
            install_working_keys(other, TID, tampered, lmk)
        install_working_keys(other, TID, blob, lmk)
        assert other.generate_terminal_mac(TID, MAB) == a.security.generate_terminal_mac(TID, MAB)
        assert seal_working_keys(other, TID, lmk) != blob  # a fresh nonce every time


async def test_two_instances_racing_for_one_limit_never_overshoot(pg_url: str) -> None:
    url = migrated(pg_url)
    config = LimitsConfig(per_transaction=1_000, per_day=1_000)
    async with database(url) as da, database(url) as db:
        a, b = SharedLimits(da, config), SharedLimits(db, config)
        approved: list[str] = []

        async def buy(limits: SharedLimits, who: str) -> None:
            if await limits.reserve(TID, 30, "20260101") is None:
                approved.append(who)

        async with anyio.create_task_group() as tg:
            for i in range(60):
                tg.start_soon(buy, a if i % 2 else b, "ab"[i % 2])
        assert len(approved) == 33  # 33 × 30 = 990 ≤ 1,000 < 1,020
        assert set(approved) == {"a", "b"}  # both took part in the race
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT used FROM risk_usage").fetchall() == [(990,)]


async def test_stan_blocks_of_instances_never_collide(pg_url: str) -> None:
    url = migrated(pg_url)
    async with database(url) as da, database(url) as db, database(url) as dc, anyio.create_task_group() as tg:
        allocators = [BlockStanAllocator(d) for d in (da, db, dc)]
        for stans in allocators:
            await stans.prime()
            await tg.start(stans.run)
        drawn: list[int] = []
        calls_before = sum(d.calls for d in (da, db, dc))
        for _ in range(10):  # interleaved, as three instances under load
            for stans in allocators:
                drawn += [stans.next() for _ in range(450)]
                await anyio.sleep(0.01)  # the background fetch gets its turn
        calls = sum(d.calls for d in (da, db, dc)) - calls_before
        assert len(drawn) == len(set(drawn)) == 13_500
        assert all(1 <= s <= STAN_MAX for s in drawn)
        assert sum(s.blocking_fetches for s in allocators) == 0  # never on the hot path
        # a round trip per block: 13,500 STANs took 12-15 blocks (a block is fetched ahead at half use)
        assert 12 <= calls <= 16
        print(f"\nSTAN blocks: {calls} round trips for {len(drawn)} STANs across 3 instances")
        tg.cancel_scope.cancel()
