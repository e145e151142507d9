"""The durable backend: group commit, per-write failures inside a batch, durability across reopen,
secrets never on disk, file permissions, migrations, closing."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import anyio
import pytest
from test_store_support import OTHER_PAN, PAN_KEY, TEST_PAN, Recorder, request

from gateway.store import (
    DuplicateRequest,
    SchemaError,
    SqliteStore,
    StateConflict,
    StoreClosed,
    StoreError,
    StoreIOError,
    TxnState,
)
from gateway.store.migrations import LATEST_VERSION, MIGRATIONS, migrate, schema_version

pytestmark = pytest.mark.anyio


async def test_concurrent_writers_share_commits(tmp_path: Path) -> None:
    observer = Recorder()
    async with SqliteStore.open(tmp_path / "j.db", observer=observer) as store:
        ids: dict[int, int] = {}

        async def writer(i: int) -> None:
            ids[i] = await store.record_request(request(f"{i:06d}"))
            await store.record_outcome(ids[i], "completed", rc="00")

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(200):
                    tg.start_soon(writer, i)
        writes = sum(size for size, _ in observer.commits)
        assert writes == 400 == store.committer.writes
        # 400 durable writes, far fewer fsyncs: the batches are what make durability affordable
        assert len(observer.commits) <= 40, observer.commits
        assert max(size for size, _ in observer.commits) >= 20
        assert all(seconds >= 0 for _, seconds in observer.commits)
        assert len(set(ids.values())) == 200
        done = await store.list_transactions(state="completed", limit=1000)
        assert sorted(r.txn_id for r in done) == sorted(ids.values())


async def test_a_failing_write_does_not_fail_its_batch(tmp_path: Path) -> None:
    observer = Recorder()
    async with SqliteStore.open(tmp_path / "j.db", observer=observer) as store:
        declined = await store.record_request(request("000001"))
        await store.record_outcome(declined, "declined", rc="05")
        observer.commits.clear()
        results: dict[str, object] = {}

        async def attempt(name: str, coro: object) -> None:
            try:
                results[name] = await coro  # type: ignore[misc]
            except Exception as exc:
                results[name] = exc

        async with anyio.create_task_group() as tg:
            # started together, so they land in the same batch
            tg.start_soon(attempt, "ok1", store.record_request(request("000002")))
            tg.start_soon(attempt, "dup", store.record_request(request("000001")))
            tg.start_soon(attempt, "conflict", store.record_outcome(declined, "completed", rc="00"))
            tg.start_soon(attempt, "reverse", store.queue_reversal(declined, "06"))
            tg.start_soon(attempt, "ok2", store.record_request(request("000003")))
        assert len(observer.commits) == 1 and observer.commits[0][0] == 5
        assert isinstance(results["dup"], DuplicateRequest)
        assert isinstance(results["conflict"], StateConflict)
        assert isinstance(results["reverse"], StateConflict)
        ok = [results["ok1"], results["ok2"]]
        assert all(isinstance(i, int) for i in ok)
        assert [(await store.get(i)).state for i in ok] == [TxnState.PENDING] * 2  # type: ignore[arg-type]
        assert (await store.get(declined)).state == TxnState.DECLINED
        assert await store.list_saf() == []  # the refused reversal left nothing behind


async def test_a_failed_commit_fails_its_writes_and_the_store_recovers(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    async with SqliteStore.open(path, busy_timeout=0.05) as store:
        first = await store.record_request(request("000001"))
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock past our busy timeout
        try:
            with pytest.raises(StoreIOError):
                await store.record_request(request("000002"))
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        second = await store.record_request(request("000002"))  # nothing of the failed write remained
        assert second > first
        assert [r.terminal_stan for r in await store.list_transactions()] == ["000002", "000001"]


async def test_a_cancelled_caller_still_gets_its_write(tmp_path: Path) -> None:
    async with SqliteStore.open(tmp_path / "j.db") as store:
        with anyio.CancelScope() as scope:
            scope.cancel()  # cancelled before the call: the write, once queued, completes and returns
            txn_id = await store.record_request(request("000001"))
        assert scope.cancelled_caught is False
        assert (await store.get(txn_id)) is not None


async def test_writes_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    async with SqliteStore.open(path) as store:
        txn = await store.record_request(request("000001"))
        await store.record_outcome(txn, "completed", rc="00", rrn="RRN000000001")
        saf = await store.queue_reversal(txn, "96", initiator="terminal")
    with pytest.raises(StoreClosed):
        await store.record_request(request("000002"))
    with pytest.raises(StoreClosed):
        await store.get(txn)
    async with SqliteStore.open(path, synchronous="normal") as store:
        rec = await store.get(txn)
        assert (rec.state, rec.rrn, rec.reversed_from) == (
            TxnState.REVERSAL_QUEUED,
            "RRN000000001",
            "completed",
        )
        assert [e.saf_id for e in await store.list_saf()] == [saf.saf_id]
        assert await store.saf_depth() == 1


async def test_no_secret_reaches_the_database_files(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    async with SqliteStore.open(path, pan_key=PAN_KEY) as store:
        for i, pan in enumerate([TEST_PAN, OTHER_PAN] * 20):
            txn = await store.record_request(
                request(f"{i:06d}", pan=pan, pan_fingerprint=store.fingerprint(pan))
            )
            await store.record_outcome(txn, "completed", rc="00")
        await store.record_timeout_and_queue_reversal(await store.record_request(request("999999")))
        blobs = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("j.db"))
    assert len(blobs) > 10_000
    for pan in (TEST_PAN, OTHER_PAN):
        assert pan.encode() not in blobs
        assert pan[6:-4].encode() not in blobs  # not even the hidden middle digits
        assert pan[:6].encode() + b"******" in blobs  # the masked form is what is kept
    assert PAN_KEY not in blobs


async def test_database_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "j.db"  # parents are created
    async with SqliteStore.open(path) as store:
        await store.record_request(request("000001"))
        for file in path.parent.iterdir():
            assert stat.S_IMODE(file.stat().st_mode) & 0o077 == 0, file.name
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


async def test_bad_options_are_typed_errors(tmp_path: Path) -> None:
    from gateway.store import InvalidRecord

    with pytest.raises(InvalidRecord):
        SqliteStore(tmp_path / "j.db", synchronous="SOMETIMES")
    with pytest.raises(InvalidRecord):
        SqliteStore(tmp_path / "j.db", pan_key=b"short")
    with pytest.raises(StoreIOError):
        async with SqliteStore.open(tmp_path):  # a directory is not a database
            pass


# --- migrations --------------------------------------------------------------------------------------


def _v1_database(path: Path) -> None:
    """A database as the first release left it, with one journalled purchase in it."""
    conn = sqlite3.connect(path, isolation_level=None)
    assert migrate(conn, target=1) == [1]
    conn.execute(
        "INSERT INTO txn (terminal_id, merchant_id, batch, terminal_stan, terminal_mti, processing_code,"
        " kind, amount, currency, pan_masked, pan_fingerprint, card_org, state, rc, created_at, updated_at)"
        " VALUES ('T0000001', 'M00000000000001', '000001', '000001', '0200', '000000', 'purchase', 1500,"
        " '156', '622202*********4321', '', 'CUP', 'completed', '00', 1.0, 1.0)"
    )
    conn.close()


async def test_opening_an_old_database_upgrades_it(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    _v1_database(path)
    async with SqliteStore.open(path) as store:
        old = await store.get(1)
        assert (old.amount, old.state, old.late_rc) == (1500, TxnState.COMPLETED, None)
        # what versions 2 and 3 added works on the upgraded file
        await store.record_late_answer(1, "00")
        upgraded = await store.get(1)
        assert (upgraded.late_rc, upgraded.late_approved_at is not None) == ("00", True)
        assert (await store.settlement_totals("T0000001", "000001")).domestic.debit_amount == 1500
    conn = sqlite3.connect(path, isolation_level=None)
    assert schema_version(conn) == LATEST_VERSION == MIGRATIONS[-1].version
    assert migrate(conn) == []  # nothing left to do
    conn.close()


async def test_a_newer_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {LATEST_VERSION + 1}")
    conn.close()
    with pytest.raises(SchemaError, match="newer"):
        async with SqliteStore.open(path):
            pass


def test_a_failed_migration_step_leaves_the_previous_version(tmp_path: Path) -> None:
    path = tmp_path / "half.db"
    _v1_database(path)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE late_answer (x)")  # makes step 2 fail half-way through
    with pytest.raises(SchemaError, match="migration 2"):
        migrate(conn)
    assert schema_version(conn) == 1
    columns = {row[1] for row in conn.execute("PRAGMA table_info(txn)")}
    assert "late_rc" not in columns  # the step's earlier statements were rolled back with it
    conn.close()


async def test_errors_in_the_body_come_out_unwrapped(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    with pytest.raises(StateConflict):  # not an ExceptionGroup around it
        async with SqliteStore.open(path) as store:
            txn = await store.record_request(request("000001"))
            await store.record_outcome(txn, "declined", rc="05")
            await store.record_outcome(txn, "completed", rc="00")
    async with SqliteStore.open(path) as store:  # closed cleanly: the file opens again
        assert (await store.get(txn)).state == TxnState.DECLINED  # type: ignore[union-attr]


async def test_state_change_and_saf_entry_commit_together_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    async with SqliteStore.open(path) as store:
        txn = await store.record_request(request("000001"))
        other = await store.record_request(request("000002"))
        side = sqlite3.connect(path, isolation_level=None)
        # the SAF insert fails after the state update has already run inside the same write
        side.execute("CREATE TRIGGER no_saf BEFORE INSERT ON saf BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
        try:
            with pytest.raises(StoreError) as err:
                await store.record_timeout_and_queue_reversal(txn)
            assert "disk says no" in str(err.value.__cause__)  # it failed at the SAF insert, after the update
            rec = await store.get(txn)
            assert (rec.state, rec.reversal_reason, rec.reversed_from) == (TxnState.PENDING, None, None)
            assert await store.list_saf() == []
            await store.record_outcome(other, "completed", rc="00")  # the store goes on working
        finally:
            side.execute("DROP TRIGGER no_saf")
            side.close()
        assert (await store.record_timeout_and_queue_reversal(txn)).created
        assert (await store.get(txn)).state == TxnState.REVERSAL_QUEUED
