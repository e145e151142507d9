"""Kill tests for gateway/store/postgres.py's mutation survivors (issue 16), against the real server (a
schema of the test's own): a write the database refuses half-way leaves neither its state change nor its
SAF entry; a lost writer connection fails its writes with the reason, and the store reconnects by itself;
the instance lock stays on one session while it beats. (The contract every backend shares is in
test_mut_store_sqlite.py, which runs on PostgreSQL too.)"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit, urlunsplit

import anyio
import psycopg
import pytest
from test_store_support import PAN_KEY, request

from gateway.store import InvalidRecord, StoreError, StoreIOError, TxnState
from gateway.store.postgres import PostgresStore

pytestmark = pytest.mark.anyio

#: nothing listens on port 1 of the loopback: a connection there is refused at once
UNREACHABLE = "postgresql://postgres@127.0.0.1:1/nowhere"


def store(url: str, instance_id: str = "gw", **options: Any) -> Any:
    options.setdefault("pan_key", PAN_KEY)
    options.setdefault("heartbeat_interval", 0.2)
    options.setdefault("lease", 1.0)
    return PostgresStore.open(url, instance_id=instance_id, **options)


def side(url: str, *statements: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
    """Run statements on a connection of the test's own (as another process would); the last one's rows."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows: list[tuple[Any, ...]] = []
        for text in statements:
            cur = conn.execute(text, params if text is statements[-1] else ())
            rows = cur.fetchall() if cur.description else []
        return rows


async def test_a_reversal_the_database_refuses_half_way_leaves_nothing(pg_url: str) -> None:
    """The state change and the SAF entry commit together or not at all: here the SAF insert fails after
    the transaction's UPDATE ran, inside the same write. The error says what failed and keeps its cause."""
    async with store(pg_url) as s:
        txn = await s.record_request(request("000001"))
        other = await s.record_request(request("000002"))
        await anyio.to_thread.run_sync(lambda: side(
            pg_url,
            "CREATE FUNCTION no_saf() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN RAISE EXCEPTION 'disk says no'; END $$",
            "CREATE TRIGGER no_saf BEFORE INSERT ON saf FOR EACH ROW EXECUTE FUNCTION no_saf()",
        ))
        try:
            with pytest.raises(StoreError) as err:
                await s.record_timeout_and_queue_reversal(txn)
            cause = err.value.__cause__
            assert isinstance(cause, psycopg.errors.RaiseException) and "disk says no" in str(cause)
            assert str(err.value) == "journal write failed: RaiseException"
            rec = await s.get(txn)
            assert rec is not None
            assert (rec.state, rec.reversal_reason, rec.reversed_from) == (TxnState.PENDING, None, None)
            assert await s.list_saf() == []
            await s.record_outcome(other, "completed", rc="00")  # the store goes on working
        finally:
            await anyio.to_thread.run_sync(lambda: side(pg_url, "DROP TRIGGER no_saf ON saf"))
        assert (await s.record_timeout_and_queue_reversal(txn)).created
        assert (await s.get(txn)).state is TxnState.REVERSAL_QUEUED  # type: ignore[union-attr]


async def test_a_lost_writer_fails_its_writes_with_the_reason_and_the_store_reconnects(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The server ends the commit connection (a restart, a failover): the batch on it fails as a journal
    error (the caller knows nothing was journalled), and so does every batch while the server cannot be
    reached; once it can, the next write reconnects, with nothing logged as a bug on the way."""
    async with store(pg_url) as s:
        txn = await s.record_request(request("000001"))
        conn = s.writer_connection
        assert conn is not None
        lost_pid, url = conn.info.backend_pid, s.url
        s.url = UNREACHABLE  # reconnections go nowhere until the url is put back
        await anyio.to_thread.run_sync(lambda: side(pg_url, "SELECT pg_terminate_backend(%s)", params=(lost_pid,)))
        with caplog.at_level(logging.WARNING, logger="gateway.store"):
            with pytest.raises(StoreIOError) as first:
                await s.record_outcome(txn, "completed", rc="00")
            assert str(first.value).startswith("journal commit failed")
            with pytest.raises(StoreIOError) as second:
                await s.record_outcome(txn, "completed", rc="00")
            assert str(second.value).startswith("journal unreachable")
            s.url = url
            await s.record_outcome(txn, "completed", rc="00")
        rec = await s.get(txn)
        assert rec is not None and (rec.state, rec.rc) == (TxnState.COMPLETED, "00")
        conn = s.writer_connection
        assert conn is not None and conn.info.backend_pid != lost_pid
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_heartbeats_keep_the_instance_lock_on_one_session(pg_url: str) -> None:
    """A beat never lets go of the instance lock (a second gateway with the same id could take it in the
    gap): the same backend holds it before and after."""
    holders = (
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    async with store(pg_url, heartbeat_interval=30.0, lease=60.0) as s:
        before = await anyio.to_thread.run_sync(lambda: side(pg_url, holders))
        assert len(before) == 1
        for _ in range(3):
            await s.heartbeat()
        assert await anyio.to_thread.run_sync(lambda: side(pg_url, holders)) == before
        beats = await anyio.to_thread.run_sync(lambda: side(
            pg_url, "SELECT heartbeat_at > extract(epoch FROM now()) - 60 FROM instance WHERE instance_id = 'gw'"))
        assert beats == [(True,)]


async def test_a_lost_transaction_fails_every_write_of_its_batch_and_journals_none(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A deadlock or serialization failure takes the whole transaction: no write of the batch may be
    reported journalled (nor half-committed), each fails as a journal error, and the next batch works."""
    async with store(pg_url) as s:
        await s.record_request(request("000001"))  # warmed up: the next two share a batch
        await anyio.to_thread.run_sync(lambda: side(
            pg_url,
            "CREATE FUNCTION lost() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " IF NEW.terminal_stan = '000099' THEN RAISE EXCEPTION 'lost' USING ERRCODE = '40001'; END IF;"
            " RETURN NEW; END $$",
            "CREATE TRIGGER lost BEFORE INSERT ON txn FOR EACH ROW EXECUTE FUNCTION lost()",
        ))
        failures: dict[str, BaseException] = {}

        async def write(stan: str) -> None:
            try:
                await s.record_request(request(stan))
            except StoreError as exc:
                failures[stan] = exc

        try:
            with caplog.at_level(logging.WARNING, logger="gateway.store"):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(write, "000002")
                    tg.start_soon(write, "000099")
        finally:
            # bounded: a writer left inside the lost transaction would hold its locks on txn for ever
            await anyio.to_thread.run_sync(lambda: side(pg_url, "SET lock_timeout = '5s'", "DROP TRIGGER lost ON txn"))
        assert sorted(failures) == ["000002", "000099"]
        assert all(isinstance(e, StoreIOError) and str(e).startswith("journal commit failed")
                   for e in failures.values())
        assert [r.terminal_stan for r in await s.list_transactions()] == ["000001"]
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
        await s.record_request(request("000002"))  # the caller may write it again


@pytest.mark.parametrize("instance_id", ["", "x" * 65, "gw\n1", 7])
def test_a_bad_instance_id_is_refused_by_name(instance_id: object) -> None:
    with pytest.raises(InvalidRecord) as err:
        PostgresStore(UNREACHABLE, instance_id=instance_id)  # type: ignore[arg-type]
    assert err.value.field == "instance_id"


def with_session_option(url: str, option: str) -> str:
    """`url` with one more server setting for the sessions it opens (libpq's `options`, as a role's or
    a database's ALTER ... SET would give them)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    query["options"] = [" ".join([*query.get("options", []), option])]
    return urlunsplit(parts._replace(query=urlencode(query, doseq=True, quote_via=quote)))


async def test_the_writer_makes_its_commits_durable_and_says_so_only_when_it_had_to(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Write-before-send needs a commit on disk when COMMIT returns: a server whose sessions default to
    synchronous_commit=off gets `on` from the journal's writer, with a warning; a server set up right
    gets no warning."""
    with caplog.at_level(logging.WARNING, logger="gateway.store"):
        async with store(pg_url) as s:
            await s.record_request(request("000001"))
        assert [r for r in caplog.records if "synchronous_commit" in r.getMessage()] == []
        lax = with_session_option(pg_url, "-csynchronous_commit=off")
        assert await anyio.to_thread.run_sync(lambda: side(lax, "SHOW synchronous_commit")) == [("off",)]
        async with store(lax) as s:
            conn = s.writer_connection
            assert conn is not None
            assert await anyio.to_thread.run_sync(
                lambda: conn.execute("SHOW synchronous_commit").fetchone()) == ("on",)
            await s.record_request(request("000002"))
    [warned] = [r.getMessage() for r in caplog.records if "synchronous_commit" in r.getMessage()]
    assert "synchronous_commit is off" in warned and "sets it on" in warned


class FakeServer:
    """Stands for a writer connection on a server configured as given (fsync=off cannot be set per
    session, and no test may reconfigure the shared server): answers SHOW, records SET."""

    def __init__(self, **settings: str) -> None:
        self.settings = settings
        self.sets: list[str] = []
        self.shown = ""

    def execute(self, text: str) -> FakeServer:
        if text.startswith("SET "):
            self.sets.append(text)
        self.shown = text.removeprefix("SHOW ")
        return self

    def fetchone(self) -> tuple[str]:
        return (self.settings[self.shown],)


def test_a_server_without_fsync_is_logged_as_an_error_naming_the_risk(caplog: pytest.LogCaptureFixture) -> None:
    s = PostgresStore(UNREACHABLE, instance_id="gw")
    server = FakeServer(synchronous_commit="on", fsync="off")
    with caplog.at_level(logging.WARNING, logger="gateway.store"):
        s._make_commits_durable(server)  # type: ignore[arg-type]
    assert server.sets == []  # synchronous_commit was on already
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert record.getMessage() == (
        "PostgreSQL journal: the server runs with fsync=off: no commit survives a crash of the server's"
        " machine; approvals may be charged with no journal record")


async def test_a_second_gateway_with_the_same_id_is_told_how_to_fix_it(pg_url: str) -> None:
    async with store(pg_url, "gw-same"):
        with pytest.raises(StoreError) as err:
            async with store(pg_url, "gw-same"):
                pass
    assert str(err.value) == ("instance id 'gw-same' is in use by another running gateway on this journal: give"
                              " each instance its own ([store] instance_id)")


def test_lock_timeout_is_bounded_and_its_refusal_says_how() -> None:
    """store.lock_timeout: 600 s at most (the bound itself allowed); 0, negative or longer is refused by
    name before anything connects."""
    assert PostgresStore(UNREACHABLE, instance_id="gw", lock_timeout=600).lock_timeout == 600.0
    for bad in (0, -1.0, 600.5):
        with pytest.raises(InvalidRecord) as err:
            PostgresStore(UNREACHABLE, instance_id="gw", lock_timeout=bad)
        assert (err.value.field, err.value.reason) == ("lock_timeout", "expected 0 < lock_timeout <= 600 seconds")


async def test_arguments_are_refused_by_name_and_nothing_is_written(pg_url: str) -> None:
    """What an operator command or a caller gets wrong comes back as InvalidRecord naming the argument,
    before the database is asked; the transaction is left as it was."""
    async with store(pg_url) as s:
        txn = await s.record_request(request("000001"))
        assert s.batches_failed_over == 0  # a store starts with no batch run write by write
        calls: list[tuple[Any, str]] = [
            (lambda: s.get("1"), "txn_id"),
            (lambda: s.saf_for_txn("1"), "txn_id"),
            (lambda: s.record_outcome(txn, "completed", rc="00", auth_code="1234567"), "auth_code"),
            (lambda: s.queue_reversal(txn, "98", state="timed_out", rc="000"), "rc"),
            (lambda: s.queue_reversal(txn, "98", state="timed_out", initiator="cashier"), "initiator"),
            (lambda: s.drop_saf(1, "  "), "operator_note"),
        ]
        for call, field in calls:
            with pytest.raises(InvalidRecord) as err:
                await call()
            assert err.value.field == field, (field, err.value)
        row = await s.get(txn)
        assert row is not None and row.state is TxnState.PENDING
        assert await s.saf_for_txn(txn) is None


async def test_a_late_answer_keeps_the_amount_the_host_named(pg_url: str) -> None:
    """A late answer is journalled with what it said, the amount too: an operator matching it with the
    host's statement needs it (and a late approval's amount is what stays charged)."""
    async with store(pg_url) as s:
        txn = await s.record_request(request("000001", amount=4_321))
        await s.record_timeout_and_queue_reversal(txn)
        await s.record_late_answer(txn, "00", host_mti="0210", host_stan="000900", terminal_id="10000001",
                                   amount=4_321)
        [late] = await s.late_answers(txn_id=txn)
        assert (late.rc, late.amount, late.host_stan, late.terminal_id) == ("00", 4_321, "000900", "10000001")
