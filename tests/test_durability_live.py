"""Issue 16 item 3: the durability settings, read back from the live connections of a running store,
not from the configuration that asked for them. "Durable on return" (`Store`) rests on them: SQLite in
WAL mode with `synchronous=FULL` on the connection that commits (a commit survives power loss), and on
PostgreSQL a `synchronous_commit` that waits for the flush (README "PostgreSQL store": the server's
setting, `on` by default) with `fsync` on.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio
import pytest
from test_store_support import PAN_KEY, request

from gateway.lab import open_lab
from gateway.store import SqliteStore

pytestmark = pytest.mark.anyio

#: PRAGMA synchronous reads back as a number
SQLITE_SYNC = {"OFF": 0, "NORMAL": 1, "FULL": 2, "EXTRA": 3}
#: synchronous_commit values after which a committed transaction is on the primary's disk
PG_DURABLE_COMMIT = frozenset({"on", "local", "remote_write", "remote_apply"})


def pragmas(conn: sqlite3.Connection) -> tuple[int, str]:
    return conn.execute("PRAGMA synchronous").fetchone()[0], conn.execute("PRAGMA journal_mode").fetchone()[0]


async def test_sqlite_store_commits_with_synchronous_full_in_wal_mode(tmp_path: Path) -> None:
    async with SqliteStore.open(tmp_path / "journal.db", pan_key=PAN_KEY) as store:
        await store.record_request(request())  # a commit went through this connection
        writer, reader = store._writer, store._reader
        assert writer is not None and reader is not None
        assert pragmas(writer) == (SQLITE_SYNC["FULL"], "wal")
        assert pragmas(reader)[1] == "wal"
        assert (tmp_path / "journal.db-wal").exists()


@pytest.mark.parametrize("mode", ["NORMAL", "OFF"])
async def test_sqlite_store_applies_the_synchronous_mode_it_was_given(tmp_path: Path, mode: str) -> None:
    """The read-back is not a constant: a store asked for less gets less (so the FULL above is real)."""
    async with SqliteStore.open(tmp_path / "journal.db", pan_key=PAN_KEY, synchronous=mode) as store:
        assert store._writer is not None
        assert pragmas(store._writer) == (SQLITE_SYNC[mode], "wal")


async def test_the_running_gateways_journal_is_synchronous_full(tmp_path: Path) -> None:
    """The store `gateway serve` opens from its configuration (the default: FULL), as it runs."""
    async with open_lab(tmp_path, terminals=1) as lab:
        store = lab.gateway.store
        assert isinstance(store, SqliteStore) and store._writer is not None
        assert lab.config.store.synchronous == "FULL"
        assert pragmas(store._writer) == (SQLITE_SYNC["FULL"], "wal")


async def test_postgres_store_commits_with_a_durable_synchronous_commit(pg_url: str) -> None:
    from gateway.store.postgres import PostgresStore

    async with PostgresStore.open(pg_url, instance_id="durability", pan_key=PAN_KEY) as store:
        await store.record_request(request())
        writer = store._writer
        assert writer is not None

        def settings() -> tuple[str, str, bool]:
            sync = writer.execute("SHOW synchronous_commit").fetchone()
            fsync = writer.execute("SHOW fsync").fetchone()
            assert sync is not None and fsync is not None
            return str(sync[0]), str(fsync[0]), writer.autocommit

        sync_commit, fsync, autocommit = await anyio.to_thread.run_sync(settings)
        assert sync_commit in PG_DURABLE_COMMIT, f"synchronous_commit={sync_commit}: a commit may be lost"
        assert fsync == "on", "fsync=off on the server: nothing is durable"
        assert autocommit  # each batch is its own explicit transaction (no implicit one left open)


async def test_postgres_store_makes_its_commits_durable_when_the_server_default_is_off(
        pg_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A role or database set to synchronous_commit=off (a common "tuning") acknowledges a commit
    before it is on disk; the store's writer connection asks for `on` itself and says so."""
    from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

    import psycopg

    from gateway.store.postgres import PostgresStore

    parts = urlsplit(pg_url)
    query = dict(parse_qsl(parts.query))
    query["options"] = (query.get("options", "") + " -csynchronous_commit=off").strip()
    lax_url = urlunsplit(parts._replace(query=urlencode(query, quote_via=quote)))
    with psycopg.connect(lax_url, autocommit=True) as plain:  # the setting the test means to override
        row = plain.execute("SHOW synchronous_commit").fetchone()
        assert row is not None and row[0] == "off"
    async with PostgresStore.open(lax_url, instance_id="durability-off", pan_key=PAN_KEY) as store:
        await store.record_request(request())
        writer = store._writer
        assert writer is not None

        def synchronous_commit() -> str:
            row = writer.execute("SHOW synchronous_commit").fetchone()
            assert row is not None
            return str(row[0])

        assert await anyio.to_thread.run_sync(synchronous_commit) == "on"
        # the server restarts or the network breaks: the writer's next session must ask again
        await anyio.to_thread.run_sync(writer.close)
        await store.record_request(request("000002"))
        writer = store._writer
        assert writer is not None and not writer.closed
        assert await anyio.to_thread.run_sync(synchronous_commit) == "on"
    assert any("synchronous_commit is off" in r.getMessage() for r in caplog.records)
