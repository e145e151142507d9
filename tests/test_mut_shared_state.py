"""Kill tests for gateway/store/shared_state.py's mutation survivors (issue 16), against the real server (a
schema of the test's own): the day's usage seeded from the journal counts against the cap (a restart never
hands a terminal a fresh limit) and never overwrites a row another instance already counts in; a release
the database did not take is counted, never silently lost; a closed shared state refuses by name."""

from __future__ import annotations

import anyio
import psycopg
import pytest
from test_shared_state import MID, TID, database, instance, migrated

from gateway.config import LimitsConfig
from gateway.security.algorithms import generate_key
from gateway.security.keystore import LocalMasterKey
from gateway.store import StoreError
from gateway.store.shared_state import STAN_BLOCK, BlockStanAllocator, SharedDatabase, SharedLimits, block_range

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
