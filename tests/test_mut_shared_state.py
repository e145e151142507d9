"""Kill tests for gateway/store/shared_state.py's mutation survivors (issue 16), against the real server (a
schema of the test's own): the day's usage seeded from the journal counts against the cap (a restart never
hands a terminal a fresh limit) and never overwrites a row another instance already counts in; a release
the database did not take is counted, never silently lost; a closed shared state refuses by name."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit, urlunsplit

import anyio
import pg_support
import psycopg
import pytest
from psycopg import sql
from test_shared_state import MID, TID, database, instance, migrated

from gateway.config import GatewayConfig, LimitsConfig, SecurityConfig, StoreConfig
from gateway.security.algorithms import generate_key
from gateway.security.keystore import LMK_ENV, KeyStore, LocalMasterKey, write_lmk_file
from gateway.security.module import SecurityModule, SoftwareSecurityModule
from gateway.store import StoreError
from gateway.store.errors import StoreIOError
from gateway.store.shared_state import (
    STAN_BLOCK,
    STAN_LOW_WATER,
    BlockStanAllocator,
    SharedDatabase,
    SharedLimits,
    _lmk_for,
    block_range,
    share_state,
)

if TYPE_CHECKING:
    from gateway.net.host_link import HostLink
    from gateway.service import GatewayService
    from gateway.store.base import Store

pytestmark = pytest.mark.anyio

DAY = "20260101"


async def test_the_days_usage_seeded_from_the_journal_counts_against_the_cap(pg_url: str) -> None:
    url = migrated(pg_url)
    config = LimitsConfig(per_transaction=1_000, per_day=1_000)
    async with database(url) as db, anyio.create_task_group() as tg:
        limits = SharedLimits(db, config)
        await tg.start(limits.run)
        limits.seed(DAY, {TID: 900, "10000002": 100})  # today's completed purchases, from the journal
        await limits.write_seed()
        assert await limits.reserve(TID, 101, DAY) == "61"  # 900 + 101 > 1,000
        assert await limits.reserve(TID, 100, DAY) is None
        assert limits.used(TID) == 1_000
        # a second instance starting later seeds too: the row that counts every reservation stays
        again = SharedLimits(db, config)
        again.seed(DAY, {TID: 900})
        await again.write_seed()
        with psycopg.connect(url) as conn:
            rows = conn.execute("SELECT terminal_id, used FROM risk_usage ORDER BY terminal_id").fetchall()
        assert rows == [(TID, 1_000), ("10000002", 100)]
        tg.cancel_scope.cancel()


async def test_a_release_the_database_did_not_take_is_counted(pg_url: str) -> None:
    url = migrated(pg_url)
    async with database(url) as db, anyio.create_task_group() as tg:
        limits = SharedLimits(db, LimitsConfig(per_transaction=1_000, per_day=1_000))
        await tg.start(limits.run)
        assert await limits.reserve(TID, 600, DAY) is None
        limits.committer.close()  # stopping: no more writes
        limits.release(TID, 600, DAY)
        assert limits.releases_lost == 1
        assert limits.used(TID) == 0  # this instance's own view moves on; the database keeps counting it
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT used FROM risk_usage").fetchall() == [(600,)]
        tg.cancel_scope.cancel()


async def test_a_closed_shared_state_refuses_by_name(pg_url: str) -> None:
    db = SharedDatabase(migrated(pg_url))
    with pytest.raises(StoreError, match="the shared state is closed"):
        await db.call(lambda c: c.execute("SELECT 1"))
    with pytest.raises(StoreError, match="the shared state is closed"):
        db.writer()


async def test_a_closed_batch_keeps_the_terminals_key_mode(pg_url: str) -> None:
    """A settlement moves the batch on; how the terminal's keys are used (its key mode) stays."""
    url, tmk, lmk = migrated(pg_url), generate_key(16), LocalMasterKey.generate()
    async with instance(url, "gw-a", tmk, lmk) as a:
        a.security.issue_working_keys(TID)
        await a.sign_in(TID, MID, "000001", "004")
        assert await a.close_batch(TID) == "000002"
        session = a.get(TID)
        assert session is not None and (session.batch, session.key_mode, session.merchant_id) == ("000002", "004", MID)


async def test_a_stan_block_fetched_on_the_hot_path_is_counted(pg_url: str) -> None:
    url = migrated(pg_url)
    async with database(url) as db:
        stans = BlockStanAllocator(db)  # no background task: nobody fetches the next block ahead
        await stans.prime()
        first = stans.next()
        start, end = block_range(first // STAN_BLOCK)  # block 0 has no STAN 0: 999 STANs
        drawn = [first] + [stans.next() for _ in range(end - start)]
        assert drawn == list(range(start, end + 1)) and stans.blocking_fetches == 0
        drawn += await anyio.to_thread.run_sync(lambda: [stans.next() for _ in range(2)])
        assert stans.blocking_fetches == 1 and stans.blocks == 2
        assert len(set(drawn)) == len(drawn) == end - start + 3


async def test_a_failed_background_stan_block_fetch_is_tried_again(pg_url: str) -> None:
    """The database failing one background fetch costs nothing: it is tried again, and the next block is
    there before the current one runs out (no fetch on the hot path)."""
    url = migrated(pg_url)
    async with database(url) as db, anyio.create_task_group() as tg:
        stans = BlockStanAllocator(db)
        await stans.prime()
        call, attempts, fetched = db.call, [0], [0]

        async def flaky(fn: Any) -> Any:
            attempts[0] += 1
            if attempts[0] == 1:
                raise StoreIOError("shared state on PostgreSQL failed: the test's")
            result = await call(fn)
            fetched[0] += 1
            return result

        db.call = flaky  # type: ignore[method-assign]
        await tg.start(stans.run)
        first = stans.next()
        start, end = block_range(first // STAN_BLOCK)
        drawn = [first] + [stans.next() for _ in range(end - start - STAN_LOW_WATER + 2)]  # past the low water
        with anyio.fail_after(5):
            while not fetched[0]:
                await anyio.sleep(0.01)
        assert attempts[0] == 2
        drawn += await anyio.to_thread.run_sync(lambda: [stans.next() for _ in range(end + 2 - drawn[-1])])
        assert stans.blocking_fetches == 0 and stans.blocks == 2
        assert len(set(drawn)) == len(drawn) and drawn[:end - start + 1] == list(range(start, end + 1))
        tg.cancel_scope.cancel()


def _named(url: str, name: str) -> str:
    return f"{url}&application_name={name}" if "?" in url else f"{url}?application_name={name}"


def _connections(url: str, name: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (name,)).fetchone()
    assert row is not None
    return int(row[0])


async def test_an_idle_shared_state_holds_one_pooled_connection(pg_url: str) -> None:
    """The pool grows with the load, up to its size: an instance that has nothing to do holds one
    connection of it (PostgreSQL's connection slots are shared by every instance)."""
    url = migrated(pg_url)
    name = "mut_idle_" + uuid.uuid4().hex[:12]
    async with database(_named(url, name)):
        assert _connections(url, name) == 1


async def test_the_shared_state_runs_at_most_four_statements_at_once_by_default(pg_url: str) -> None:
    url = migrated(pg_url)
    lock, running, peak = threading.Lock(), [0], [0]

    def slow(conn: psycopg.Connection[Any]) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            conn.execute("SELECT pg_sleep(0.2)")
        finally:
            with lock:
                running[0] -= 1

    async with database(url) as db, anyio.create_task_group() as tg:
        with anyio.fail_after(10):
            for _ in range(8):
                tg.start_soon(db.call, slow)
    assert peak[0] == 4


async def test_a_wrong_lmk_is_refused_by_name(tmp_path: Path) -> None:
    """Shared working keys are sealed under the LMK: one that does not open this instance's key store is
    refused at start, saying so."""
    store = KeyStore.create(tmp_path / "keys.store", LocalMasterKey.generate())
    other = tmp_path / "other.lmk"
    write_lmk_file(other)
    config = GatewayConfig(security=SecurityConfig(lmk_file=other))
    with pytest.raises(StoreError) as refused:
        _lmk_for(config, SoftwareSecurityModule(store))
    assert str(refused.value) == ("the LMK given does not open this instance's key store: shared working keys need"
                                  " the key store's own LMK")


async def test_no_lmk_keeps_sessions_per_instance_and_says_what_it_costs(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(LMK_ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger="gateway.store.shared"):
        assert _lmk_for(GatewayConfig(), SoftwareSecurityModule()) is None
    [record] = [r for r in caplog.records if r.name == "gateway.store.shared"]
    assert record.getMessage().startswith("no LMK to seal shared working keys under (")
    assert "terminal sessions stay per instance, a terminal must sign in on each instance it reaches" in (
        record.getMessage())


async def test_a_call_that_gets_no_connection_fails_within_the_connect_timeout(pg_url: str) -> None:
    """When PostgreSQL gives no further connection (here: a role allowed one), a call waiting for one fails
    with a store error after the connect timeout, not the pool's own default of 30 s: the terminal is
    answered in time."""
    role = "mut_one_conn_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN CONNECTION LIMIT 1").format(sql.Identifier(role)))
    try:
        parts = urlsplit(pg_url)
        url = urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}"))
        db = SharedDatabase(url, pool_size=2, connect_timeout=1)
        await db.open()  # one connection: the role's only one
        try:
            outcome: list[tuple[str, float]] = []

            async def second() -> None:
                await anyio.sleep(0.3)  # the first call holds the connection by then
                started = time.monotonic()
                try:
                    await db.call(lambda c: c.execute("SELECT 1"))
                    outcome.append(("answered", time.monotonic() - started))
                except StoreIOError:
                    outcome.append(("refused", time.monotonic() - started))

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(second)
                    await db.call(lambda c: c.execute("SELECT pg_sleep(4)"))
            [(what, after)] = outcome
            assert what == "refused" and 0.9 <= after < 3.5  # the connect timeout is 1 s; the pool's own, 30 s
        finally:
            await db.close()
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


async def test_a_security_module_that_is_not_the_software_one_keeps_sessions_per_instance(
        caplog: pytest.LogCaptureFixture) -> None:
    hsm = cast(SecurityModule, object())  # stands for a hardware module's client: it cannot seal keys under the LMK
    with caplog.at_level(logging.WARNING, logger="gateway.store.shared"):
        assert _lmk_for(GatewayConfig(), hsm) is None
    assert [r.getMessage() for r in caplog.records if r.name == "gateway.store.shared"] == [
        "the security module is not the software one: terminal sessions stay per instance"]


class _Clock(datetime):
    @classmethod
    def now(cls, tz: Any = None) -> _Clock:
        return cls(2026, 3, 7, 13, 45, 30, 123456)


class _Journal:
    def __init__(self, totals: dict[str, int]) -> None:
        self.totals, self.since = totals, list[float]()

    async def purchase_totals_since(self, since: float) -> dict[str, int]:
        self.since = [since]
        return self.totals


async def test_a_starting_instance_counts_todays_purchases_from_midnight(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """At 13:45 the journal's purchases since 00:00:00 of the day (all of today's) seed today's usage row."""
    url = migrated(pg_url)
    monkeypatch.setattr("gateway.store.shared_state.datetime", _Clock)
    monkeypatch.delenv(LMK_ENV, raising=False)
    journal = _Journal({TID: 700})
    service, link = SimpleNamespace(), SimpleNamespace()
    config = GatewayConfig(store=StoreConfig(url=url))
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            state = await tg.start(partial(share_state, config, cast("Store", journal), SoftwareSecurityModule(),
                                           cast("GatewayService", service), cast("HostLink", link), instance_id="gw-a"))
            assert journal.since == [datetime(2026, 3, 7).timestamp()]
            with psycopg.connect(url) as conn:
                assert conn.execute("SELECT terminal_id, day, used FROM risk_usage").fetchall() == [
                    (TID, "20260307", 700)]
            assert link.stans is state.stans and service.limits is state.limits and state.sessions is None
            tg.cancel_scope.cancel()


async def test_deployments_in_two_schemas_never_hear_each_others_session_notices(pg_url: str,
                                                                                  pg_database: str) -> None:
    """NOTIFY channels are per database: each schema (one deployment) has its own, which every instance of
    that deployment shares."""
    other = pg_support.schema_url(pg_database, pg_url + "/other")
    async with database(migrated(pg_url)) as a, database(pg_url) as a2, database(migrated(other)) as b:
        assert a.channel == a2.channel != b.channel


async def test_a_sign_in_here_during_a_refresh_is_reported_as_the_session(pg_url: str) -> None:
    """A refresh whose read found no session, while a sign-in of the same terminal committed here meanwhile,
    reports the terminal as signed in (its request goes on), and keeps the session."""
    url, tmk, lmk = migrated(pg_url), generate_key(16), LocalMasterKey.generate()
    async with instance(url, "gw-a", tmk, lmk) as a:
        call, hook = a.db.call, list[Callable[[], Awaitable[None]]]()

        async def racing(fn: Any) -> Any:
            result = await call(fn)
            if hook:
                await hook.pop()()
            return result

        async def sign_in() -> None:
            a.security.issue_working_keys(TID)
            await a.sign_in(TID, MID, "000001", "004")

        hook.append(sign_in)
        a.db.call = racing  # type: ignore[method-assign]
        assert await a.refresh(TID) is True
        session = a.get(TID)
        assert session is not None and session.batch == "000001"


async def test_shared_keys_sealed_under_another_lmk_leave_the_terminal_unknown_here(pg_url: str) -> None:
    """An instance given another LMK cannot open the keys another one shared: the refresh says the terminal
    is not signed in here (it must sign in again), and nothing breaks."""
    url, tmk = migrated(pg_url), generate_key(16)
    async with instance(url, "gw-a", tmk, LocalMasterKey.generate()) as a, \
            instance(url, "gw-b", tmk, LocalMasterKey.generate()) as b:
        a.security.issue_working_keys(TID)
        await a.sign_in(TID, MID, "000001", "004")
        assert await b.refresh(TID) is False
        assert b.get(TID) is None and b.taken_over == 0
