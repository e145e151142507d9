"""What only the PostgreSQL store has, against the real server: migrations when instances start at once,
the instance lock, SAF leases between two store instances (one stops: the other takes over after the
lease; a late word from the expired holder doubles nothing), orphaned pending rows, and group commit's
round trips counted on the wire (libpq's protocol trace of the commit connection)."""

from __future__ import annotations

import json
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import psycopg
import pytest
from test_store_support import PAN_KEY, request

from gateway.store import InvalidRecord, SafState, SchemaError, StateConflict, StoreError, TxnState, pg_migrations
from gateway.store.errors import LeaseLost
from gateway.store.postgres import PostgresStore

pytestmark = pytest.mark.anyio

#: short enough for tests, long against a loaded machine's hiccups
LEASE = 1.0


def store(url: str, instance_id: str, **options: Any) -> Any:
    options.setdefault("pan_key", PAN_KEY)
    options.setdefault("heartbeat_interval", 0.2)
    options.setdefault("lease", LEASE)
    return PostgresStore.open(url, instance_id=instance_id, **options)


# --- migrations and the instance lock --------------------------------------------------------------


def test_concurrent_migrations_apply_each_step_once(pg_url: str) -> None:
    """Four connections migrate an empty schema at the same moment: one applies the steps, the others
    wait for the advisory lock and find nothing to do."""
    start = threading.Barrier(4)
    applied: list[list[int]] = []
    errors: list[BaseException] = []

    def migrate() -> None:
        try:
            with psycopg.connect(pg_url, autocommit=True) as conn:
                start.wait(timeout=10)
                applied.append(pg_migrations.migrate(conn))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert sorted(applied) == [[], [], [], [v.version for v in pg_migrations.MIGRATIONS]]
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
    assert [r[0] for r in rows] == [v.version for v in pg_migrations.MIGRATIONS]


async def test_stores_opening_at_once_share_one_schema(pg_url: str) -> None:
    opened: list[str] = []

    async def open_one(n: int) -> None:
        async with store(pg_url, f"gw-{n}") as s:
            opened.append(s.instance_id)
            await s.record_request(request(f"{n:06d}"))

    async with anyio.create_task_group() as tg:
        for n in range(1, 4):
            tg.start_soon(open_one, n)
    assert sorted(opened) == ["gw-1", "gw-2", "gw-3"]
    async with store(pg_url, "reader") as s:
        rows = await s.list_transactions()
        assert sorted(r.terminal_stan for r in rows) == ["000001", "000002", "000003"]


async def test_a_newer_schema_is_refused(pg_url: str) -> None:
    async with store(pg_url, "gw"):
        pass
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations (version, description) VALUES (999, 'from the future')")
    with pytest.raises(StoreError) as err:
        async with store(pg_url, "gw"):
            pass
    assert isinstance(err.value.__cause__, SchemaError) or isinstance(err.value, SchemaError)


async def test_an_instance_id_in_use_is_refused_until_its_holder_stops(pg_url: str) -> None:
    async with store(pg_url, "gw-a"):
        with pytest.raises(StoreError, match="in use"):
            async with store(pg_url, "gw-a"):
                pass
    async with store(pg_url, "gw-a") as again:  # released when the first one closed
        assert again.instance_id == "gw-a"
    with pytest.raises(InvalidRecord):
        PostgresStore(pg_url, instance_id="x" * 65)


# --- leases ------------------------------------------------------------------------------------------


async def test_two_instances_never_claim_the_same_entry(pg_url: str) -> None:
    async with store(pg_url, "gw-a") as a, store(pg_url, "gw-b") as b:
        for n in range(1, 41):
            txn = await a.record_request(request(f"{n:06d}"))
            await a.record_timeout_and_queue_reversal(txn)
        claimed: dict[str, list[int]] = {"gw-a": [], "gw-b": []}

        async def claim(s: PostgresStore) -> None:
            for _ in range(5):  # polls: the first claims, the next ones renew what it holds
                claimed[s.instance_id] += [e.saf_id for e in await s.due_reversals(1e12, limit=25)]

        async with anyio.create_task_group() as tg:
            tg.start_soon(claim, a)
            tg.start_soon(claim, b)
        # an instance renews its own claims (they come back to it), never takes the other's
        assert not set(claimed["gw-a"]) & set(claimed["gw-b"])
        assert len(set(claimed["gw-a"]) | set(claimed["gw-b"])) == 40
        owners = {e.saf_id: e.lease_owner for e in await a.list_saf()}
        assert all(owners[i] == "gw-a" for i in claimed["gw-a"])
        assert all(owners[i] == "gw-b" for i in claimed["gw-b"])


async def test_a_stopped_holders_entry_is_taken_over_after_the_lease_and_its_late_word_doubles_nothing(
    pg_url: str,
) -> None:
    async with store(pg_url, "gw-a") as a, store(pg_url, "gw-b") as b:
        txn = await a.record_request(request("000001"))
        saf_id = (await a.record_timeout_and_queue_reversal(txn)).saf_id
        [held] = await a.due_reversals(1e12)
        assert held.lease_owner == "gw-a" and held.lease_expires_at is not None
        assert await a.record_reversal_ident(saf_id, "400001", "1123101500") == ("400001", "1123101500")
        # A sent its 0400 and went silent (it stops polling, so its lease is not renewed)
        assert await b.due_reversals(1e12) == []  # A's lease is live: B keeps off
        await anyio.sleep(LEASE + 0.3)
        [taken] = await b.due_reversals(1e12)
        assert (taken.saf_id, taken.lease_owner) == (saf_id, "gw-b")
        assert taken.is_repeat  # its STAN was fixed: B sends the 0401, identical
        # B cannot change the STAN A fixed: the first write wins
        assert await b.record_reversal_ident(saf_id, "499999", "1123101600") == ("400001", "1123101500")
        # A comes back: it may record nothing but the host's acknowledgement
        with pytest.raises(LeaseLost) as err:
            await a.mark_reversal_attempt(saf_id, 1.0, 2.0, "timeout")
        assert err.value.holder == "gw-b"
        with pytest.raises(LeaseLost):
            await a.park_reversal(saf_id, "gave up", final_attempt_at=1.0)
        with pytest.raises(LeaseLost):
            await a.record_reversal_ident(saf_id, "400002", "1123101700")
        entry = await b.get_saf(saf_id)
        assert (entry.state, entry.attempts, entry.total_attempts) == (SafState.PENDING, 0, 0)  # untouched
        # the host answered A's 0400 after all: its word ends the entry, once
        assert await a.ack_reversal(saf_id, "00", attempt_at=5.0) is True
        # ... and B's answer to its identical 0401 changes nothing more
        assert await b.ack_reversal(saf_id, "00", attempt_at=6.0) is True
        entry = await b.get_saf(saf_id)
        assert (entry.state, entry.ack_rc, entry.attempts, entry.total_attempts, entry.last_attempt_at) == (
            SafState.DONE, "00", 1, 1, 5.0)
        assert entry.lease_owner is None
        assert (await b.get(txn)).state is TxnState.REVERSED
        with pytest.raises(StateConflict):
            await b.mark_reversal_attempt(saf_id, 7.0, 8.0, "timeout")  # done: B has nothing to count


async def test_a_live_holder_keeps_its_lease_by_polling(pg_url: str) -> None:
    async with store(pg_url, "gw-a") as a, store(pg_url, "gw-b") as b:
        txn = await a.record_request(request("000001"))
        await a.record_timeout_and_queue_reversal(txn)
        for _ in range(4):  # A's sender polls (its attempt is in flight) for longer than a lease
            assert len(await a.due_reversals(1e12)) == 1
            assert await b.due_reversals(1e12) == []
            await anyio.sleep(LEASE / 2)


async def test_a_failed_attempt_releases_the_lease(pg_url: str) -> None:
    async with store(pg_url, "gw-a") as a, store(pg_url, "gw-b") as b:
        txn = await a.record_request(request("000001"))
        saf_id = (await a.record_timeout_and_queue_reversal(txn)).saf_id
        await a.due_reversals(1e12)
        assert await a.mark_reversal_attempt(saf_id, 1.0, 2.0, "host answered 96") == 1
        [entry] = await b.due_reversals(1e12)  # due again: whoever is free takes it
        assert (entry.lease_owner, entry.attempts) == ("gw-b", 1)


# --- orphaned pending rows --------------------------------------------------------------------------


async def test_pending_rows_of_a_stopped_instance_are_claimed_once_by_a_live_one(pg_url: str) -> None:
    async with store(pg_url, "gw-b") as b, store(pg_url, "gw-c") as c:
        async with store(pg_url, "gw-a") as a:
            mine = [await a.record_request(request(f"{n:06d}")) for n in range(1, 4)]
            await a.record_outcome(mine[0], "completed", rc="00")
            own_b = await b.record_request(request("000010"))
            assert await b.claim_orphaned_pending(5.0) == []  # A is alive: its requests are its own
        # A stopped (or died: its heartbeat then goes stale); B and C sweep at the same moment
        claims: list[list[int]] = []

        async def sweep(s: PostgresStore) -> None:
            claims.append([r.txn_id for r in await s.claim_orphaned_pending(0.5)])

        async with anyio.create_task_group() as tg:
            tg.start_soon(sweep, b)
            tg.start_soon(sweep, c)
        assert sorted(claims) == [[], mine[1:]]  # one of them has both, in order; never both of them
        assert await b.claim_orphaned_pending(0.5) == [] and await c.claim_orphaned_pending(0.5) == []
        assert [r.txn_id for r in await b.unknown_outcomes()] in ([own_b], sorted([own_b, *mine[1:]]))
    async with store(pg_url, "gw-a") as a:  # A restarted: those are not its own any more
        assert await a.unknown_outcomes() == []


async def test_a_dead_instances_heartbeat_goes_stale(pg_url: str) -> None:
    """A SIGKILLed instance does not mark itself stopped: its rows wait until its heartbeat is older
    than `stale_after`."""
    # A beats at open, then not for a long while: as if it had died right after
    async with store(pg_url, "gw-b") as b, store(pg_url, "gw-a", heartbeat_interval=50.0, lease=100.0) as a:
        txn = await a.record_request(request("000001"))
        assert await b.claim_orphaned_pending(30.0) == []  # its heartbeat is fresh
        with psycopg.connect(pg_url, autocommit=True) as conn:  # the clock moves on 1000 s for it
            conn.execute("UPDATE instance SET heartbeat_at = heartbeat_at - 1000 WHERE instance_id = 'gw-a'")
        [claimed] = await b.claim_orphaned_pending(500.0)
        assert claimed.txn_id == txn
        await a.heartbeat()  # alive after all: its next heartbeat makes it fresh again, nothing more is taken
        assert await b.claim_orphaned_pending(500.0) == []
        with pytest.raises(InvalidRecord):
            await b.claim_orphaned_pending(0)


# --- group commit on the wire ------------------------------------------------------------------------


@contextmanager
def round_trips(conn: psycopg.Connection[Any]) -> Iterator[list[int]]:
    """Counts the round trips of `conn` while the block runs, from libpq's protocol trace: each Sync
    (extended protocol) or Query (simple protocol) the client sends is one "answer everything so far"
    that it then waits for. (Counting bursts of client messages would overcount: libpq reads answers
    while a long batch is still being written.)"""
    found: list[int] = []
    with tempfile.TemporaryFile() as trace:
        conn.pgconn.trace(trace.fileno())
        conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            yield found
        finally:
            conn.pgconn.untrace()
        trace.seek(0)
        lines = [line.split("\t") for line in trace.read().decode(errors="replace").splitlines()]
        found.append(sum(1 for part in lines if len(part) > 2 and part[0] == "F" and part[2] in ("Sync", "Query")))


async def test_a_batch_of_requests_and_outcomes_is_one_round_trip(pg_url: str) -> None:
    async with store(pg_url, "gw") as s:
        await s.record_request(request("000001"))  # connection warmed up (statements prepared)
        conn = s.writer_connection
        assert conn is not None
        commits, writes = s.committer.commits, s.committer.writes
        with round_trips(conn) as counted:
            ids: list[int] = []

            async def one(n: int) -> None:
                txn = await s.record_request(request(f"{n:06d}"))
                ids.append(txn)
                await s.record_outcome(txn, "completed", rc="00", rrn=f"{n:012d}")

            async with anyio.create_task_group() as tg:
                for n in range(2, 202):
                    tg.start_soon(one, n)
        batches = s.committer.commits - commits
        assert s.committer.writes - writes == 400
        assert batches < 100  # concurrent writes shared batches
        assert counted == [batches], f"{counted[0]} round trips for {batches} batches"
        assert len(await s.list_transactions(state="completed", limit=1000)) == 200


async def test_a_write_the_database_refuses_fails_alone(pg_url: str) -> None:
    async with store(pg_url, "gw") as s:
        good: list[int] = []
        bad: list[BaseException] = []

        async def write(n: int) -> None:
            try:
                # every fifth names an original that does not exist: a foreign key the database enforces
                orig = 424242 if n % 5 == 0 else None
                good.append(await s.record_request(request(f"{n:06d}", kind="void" if orig else "purchase",
                                                           orig_txn_id=orig)))
            except InvalidRecord as exc:
                bad.append(exc)

        async with anyio.create_task_group() as tg:
            for n in range(1, 21):
                tg.start_soon(write, n)
        assert len(good) == 16 and len(bad) == 4
        assert all(isinstance(e, InvalidRecord) and e.field == "orig_txn_id" for e in bad)
        assert s.batches_failed_over >= 1
        assert len(await s.list_transactions()) == 16


# --- operator commands -------------------------------------------------------------------------------


def test_operator_commands_work_on_a_postgresql_journal(pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`gateway saf list|retry --url ...` while a gateway instance has the journal open."""
    from test_store_cli import run_cli

    async def scenario() -> None:
        async with store(pg_url, "gw-a") as gw:
            txn = await gw.record_request(request("000001"))
            saf_id = (await gw.record_timeout_and_queue_reversal(txn)).saf_id
            await gw.park_reversal(saf_id, "gave up after 6 attempts: timeout")
            code, out, _ = await anyio.to_thread.run_sync(run_cli, capsys, "saf", "list", "--url", pg_url, "--json")
            assert code == 0
            [listed] = json.loads(out)
            assert (listed["saf_id"], listed["state"]) == (saf_id, "parked")
            code, out, _ = await anyio.to_thread.run_sync(run_cli, capsys, "saf", "retry", str(saf_id), "--url", pg_url)
            assert code == 0 and "pending again" in out
            assert (await gw.get_saf(saf_id)).state is SafState.PENDING
            with psycopg.connect(pg_url) as conn:  # an operator is no gateway instance
                assert conn.execute("SELECT instance_id FROM instance").fetchall() == [("gw-a",)]

    anyio.run(scenario)
