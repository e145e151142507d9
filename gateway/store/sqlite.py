"""The durable store: SQLite in WAL mode, writes through a group committer.

- Writes: one connection, used only by the group committer's own thread. Each batch is one
  `BEGIN IMMEDIATE … COMMIT` (one WAL fsync with `synchronous=FULL`); each write inside it runs under
  its own SAVEPOINT, so a write that fails (duplicate, wrong state) is undone alone and its caller gets
  the typed error while the rest of the batch commits.
- Reads: a second, query-only connection, one call at a time. In WAL mode it reads the last committed
  state without blocking the writer, and a write that has returned is visible to it.
- The file is created 0600 (it holds masked PANs and card fingerprints); the WAL and shared-memory
  files inherit that mode.

`synchronous=FULL` (default): a commit survives power loss. `NORMAL`: WAL commits are not synced until
the next checkpoint, so a power loss may lose the last commits (a process crash loses nothing).
`OFF`: no syncs at all; for tests and benchmarks only.
"""

from __future__ import annotations

import contextlib
import operator
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final, TypeVar

import anyio
import anyio.abc

from gateway.iso.totals import SettlementTotals
from gateway.store import machine, migrations
from gateway.store.base import NullObserver, StoreObserver
from gateway.store.errors import (
    DuplicateRequest,
    InvalidRecord,
    NotFound,
    OriginalRefused,
    StateConflict,
    StoreClosed,
    StoreError,
    StoreIOError,
)
from gateway.store.group_commit import DEFAULT_MAX_BATCH, GroupCommitter, Write
from gateway.store.machine import Change, SafView, TxnView
from gateway.store.records import (
    CHECKED_CREDIT_KINDS,
    CREDIT_KINDS,
    DEBIT_KINDS,
    DEFAULT_MAX_REFUSALS,
    LATE_COLUMNS,
    OPEN_SAF_STATES,
    OUTCOME_STATES,
    RC_ORIGINAL_NOT_FOUND,
    REFUSAL_COLUMNS,
    REFUSAL_RECORD_COLUMNS,
    REQUEST_COLUMNS,
    SAF_COLUMNS,
    TXN_COLUMNS,
    LateAnswer,
    LateRecorded,
    QueuedReversal,
    Refusal,
    RefusalRecord,
    ReversalInitiator,
    SafEntry,
    SafState,
    SafSummary,
    TxnKind,
    TxnQuery,
    TxnRecord,
    TxnRequest,
    TxnState,
    check_id,
    check_ident,
    check_late_args,
    check_limit,
    check_outcome_args,
    check_rc,
    check_reason,
    check_unknown_rc,
    clip_text,
    credit_refusal,
    outcome_sources,
    pan_fingerprint,
    parse_enum,
    parse_outcome,
    reversal_from,
    reversal_refusal,
    saf_from_row,
    totals_from_groups,
    txn_from_row,
)

T = TypeVar("T")

SYNC_MODES: Final = frozenset({"FULL", "NORMAL", "OFF"})

_TXN_SELECT: Final = f"SELECT {', '.join(TXN_COLUMNS)} FROM txn"
_SAF_SELECT: Final = (
    f"SELECT {', '.join('s.' + c for c in SAF_COLUMNS)}, {', '.join('t.' + c for c in TXN_COLUMNS)}"
    " FROM saf s JOIN txn t ON t.txn_id = s.txn_id"
)
_INSERT_TXN: Final = (
    f"INSERT INTO txn ({', '.join(REQUEST_COLUMNS)}, state, created_at, updated_at)"
    f" VALUES ({', '.join('?' * (len(REQUEST_COLUMNS) + 3))})"
)
_request_values: Final = operator.attrgetter(*REQUEST_COLUMNS)
#: record_outcome's UPDATE for each outcome, the states it may come from written into the text: one
#: fixed text per outcome (SQLite's statement cache prepares each once), no text built per write
_RECORD_OUTCOME: Final = {
    state: "UPDATE txn SET state = ?, rc = coalesce(?, rc), auth_code = coalesce(?, auth_code),"
    " rrn = coalesce(?, rrn), updated_at = ?"
    f" WHERE txn_id = ? AND state IN ({', '.join(repr(str(s)) for s in outcome_sources(state))})"
    for state in OUTCOME_STATES
}
_INSERT_REFUSAL: Final = (
    f"INSERT INTO refusal ({', '.join(REFUSAL_RECORD_COLUMNS)}, refused_at)"
    f" VALUES ({', '.join('?' * (len(REFUSAL_RECORD_COLUMNS) + 1))})"
)
_refusal_values: Final = operator.attrgetter(*REFUSAL_RECORD_COLUMNS)
_OPEN_SAF: Final = f"state IN ({', '.join(repr(str(s)) for s in OPEN_SAF_STATES)})"
_SETTLED_KINDS: Final = ", ".join(repr(str(k)) for k in sorted(DEBIT_KINDS | CREDIT_KINDS))


# --- connections -----------------------------------------------------------------------------------


def _create_private(path: Path) -> None:
    """Create the database file readable by its owner only, before SQLite creates it world-readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def _connect(path: Path, *, synchronous: str, busy_timeout: float, query_only: bool) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreIOError(f"cannot switch {path.name} to WAL mode (got {mode})")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA temp_store=MEMORY")
        if query_only:
            conn.execute("PRAGMA query_only=ON")
    except BaseException:
        conn.close()
        raise
    return conn


def _open_connections(
    path: Path, synchronous: str, busy_timeout: float
) -> tuple[sqlite3.Connection, sqlite3.Connection]:
    _create_private(path)
    writer = _connect(path, synchronous=synchronous, busy_timeout=busy_timeout, query_only=False)
    try:
        migrations.migrate(writer)
        reader = _connect(path, synchronous=synchronous, busy_timeout=busy_timeout, query_only=True)
    except BaseException:
        writer.close()
        raise
    return writer, reader


# --- row helpers (a thread off the event loop) -----------------------------------------------------


def _one_txn(conn: sqlite3.Connection, where: str, params: Sequence[object]) -> TxnRecord | None:
    row = conn.execute(f"{_TXN_SELECT} WHERE {where}", params).fetchone()
    return None if row is None else txn_from_row(row)


def _txns(conn: sqlite3.Connection, where: str, params: Sequence[object]) -> list[TxnRecord]:
    return [txn_from_row(r) for r in conn.execute(f"{_TXN_SELECT} WHERE {where}", params)]


def _safs(conn: sqlite3.Connection, where: str, params: Sequence[object]) -> list[SafEntry]:
    split = len(SAF_COLUMNS)
    rows = conn.execute(f"{_SAF_SELECT} WHERE {where}", params)
    return [saf_from_row(r[:split], txn_from_row(r[split:])) for r in rows]


def _saf(conn: sqlite3.Connection, saf_id: int) -> SafEntry:
    found = _safs(conn, "s.saf_id = ?", (saf_id,))
    if not found:
        raise NotFound("SAF entry", saf_id)
    return found[0]


def _txn_view(conn: sqlite3.Connection, txn_id: int) -> TxnView:
    row = conn.execute("SELECT state, reversal_rc, late_approved_at FROM txn WHERE txn_id = ?", (txn_id,)).fetchone()
    if row is None:
        raise NotFound("transaction", txn_id)
    return TxnView(txn_id, TxnState(row[0]), row[1], row[2])


def _saf_view(conn: sqlite3.Connection, where: str, params: Sequence[object]) -> SafView | None:
    row = conn.execute(
        "SELECT saf_id, txn_id, state, attempts, total_attempts, reversal_stan, lease_owner FROM saf"
        f" WHERE {where}", params,
    ).fetchone()
    return None if row is None else SafView(row[0], row[1], SafState(row[2]), *row[3:])


def _saf_by_id(conn: sqlite3.Connection, saf_id: int) -> SafView:
    view = _saf_view(conn, "saf_id = ?", (saf_id,))
    if view is None:
        raise NotFound("SAF entry", saf_id)
    return view


def _update(conn: sqlite3.Connection, table: str, key: str, ident: int, change: Change) -> None:
    """Write what the state machine decided (column names come from `machine`, never from input)."""
    if change:
        sets = ", ".join(f"{column} = ?" for column in change)
        conn.execute(f"UPDATE {table} SET {sets} WHERE {key} = ?", (*change.values(), ident))


def _persist(conn: sqlite3.Connection, saf: SafView, step: machine.Step | None) -> None:
    if step is not None:
        _update(conn, "txn", "txn_id", saf.txn_id, step.txn)
        _update(conn, "saf", "saf_id", saf.saf_id, step.saf)


# --- write ops (commit thread, inside the batch transaction) ---------------------------------------


def _op_record_request(conn: sqlite3.Connection, values: tuple[object, ...], rec: TxnRequest) -> int:
    if rec.kind in CHECKED_CREDIT_KINDS and rec.orig_txn_id is not None:
        # the one writer's transaction: no other void or refund can be journalled between this read
        # and the insert (and this batch's earlier writes are visible to it)
        original = _one_txn(conn, "txn_id = ?", (rec.orig_txn_id,))
        earlier = _txns(conn, "orig_txn_id = ?", (rec.orig_txn_id,))
        refusal = credit_refusal(rec.kind, rec.amount, original, earlier) if original else None
        if refusal is not None:  # (no such original: the foreign key refuses the insert below)
            raise OriginalRefused(rec.orig_txn_id, refusal)
    try:
        cur = conn.execute(_INSERT_TXN, values)
    except sqlite3.IntegrityError as exc:
        text = str(exc)
        if "UNIQUE" in text:
            raise DuplicateRequest(rec.terminal_id, rec.batch, rec.terminal_stan) from None
        if "FOREIGN KEY" in text:
            raise InvalidRecord("no such journal entry", field="orig_txn_id") from None
        raise InvalidRecord("rejected by a journal constraint", field="record") from exc
    return int(cur.lastrowid or 0)


def _op_record_outcome(
    conn: sqlite3.Connection, txn_id: int, state: TxnState, rc: str | None, auth_code: str | None,
    rrn: str | None, now: float,
) -> None:
    # the fast path: one UPDATE whose WHERE holds the machine's allowed source states; on no match the
    # machine says why (and raises), from the row as it is
    cur = conn.execute(_RECORD_OUTCOME[state], (state, rc, auth_code, rrn, now, txn_id))
    if cur.rowcount == 0:
        machine.outcome(_txn_view(conn, txn_id), state, rc=rc, auth_code=auth_code, rrn=rrn, now=now)
        raise StateConflict("transaction", txn_id, "changed", f"record outcome {state}")


def _op_queue_reversal(
    conn: sqlite3.Connection, txn_id: int, reason: str, state: TxnState | None, rc: str | None,
    auth_code: str | None, rrn: str | None, initiator: ReversalInitiator, not_before: float | None,
    now: float,
) -> QueuedReversal:
    view = _txn_view(conn, txn_id)
    new = machine.queue_reversal(view, reason=reason, outcome=state, initiator=initiator, rc=rc,
                                 auth_code=auth_code, rrn=rrn, not_before=not_before, now=now)
    if new is None:
        existing = _safs(conn, "s.txn_id = ?", (txn_id,))
        if not existing:
            raise machine.missing_saf(view)
        return QueuedReversal(existing[0], created=False)
    if initiator is ReversalInitiator.TERMINAL:
        # the one writer's transaction: no void or refund of this sale can be journalled between this
        # read and the reversal (raised before any write, so the rest of the batch stands)
        original = _one_txn(conn, "txn_id = ?", (txn_id,))
        referencing = _txns(conn, "orig_txn_id = ?", (txn_id,))
        refusal = reversal_refusal(original, referencing) if original else None
        if refusal:
            raise OriginalRefused(txn_id, refusal)
    _update(conn, "txn", "txn_id", txn_id, new.txn)
    cur = conn.execute(
        f"INSERT INTO saf ({', '.join(new.saf)}) VALUES ({', '.join('?' * len(new.saf))})", tuple(new.saf.values())
    )
    return QueuedReversal(_saf(conn, int(cur.lastrowid or 0)), created=True)


def _op_record_late_answer(
    conn: sqlite3.Connection, txn_id: int | None, rc: str, authenticated: bool, unknown_rc: str,
    auth_code: str | None, rrn: str | None, host_mti: str | None, host_stan: str | None, terminal_id: str | None,
    amount: int | None, now: float,
) -> LateRecorded:
    reopened = False
    if txn_id is not None:
        change, after = machine.late_answer(_txn_view(conn, txn_id), rc, authenticated=authenticated, now=now)
        _update(conn, "txn", "txn_id", txn_id, change)
        if machine.wants_reopen(after, rc, authenticated=authenticated, unknown_rc=unknown_rc):
            saf = _saf_view(conn, "txn_id = ?", (txn_id,))
            step = machine.reopen(after, saf, now=now, unknown_rc=unknown_rc)
            if saf is not None and step is not None:
                _persist(conn, saf, step)
                reopened = True
    cur = conn.execute(
        f"INSERT INTO late_answer ({', '.join(LATE_COLUMNS[1:])})"
        f" VALUES ({', '.join('?' * (len(LATE_COLUMNS) - 1))})",
        (txn_id, rc, auth_code, rrn, host_mti, host_stan, terminal_id, amount, now),
    )
    return LateRecorded(int(cur.lastrowid or 0), reopened)


def _op_mark_attempt(
    conn: sqlite3.Connection, saf_id: int, attempted_at: float, next_attempt_at: float, error: str,
    now: float,
) -> int:
    saf = _saf_by_id(conn, saf_id)
    change = machine.attempt(saf, instance=None, attempted_at=attempted_at, next_attempt_at=next_attempt_at,
                             error=error, now=now)
    _update(conn, "saf", "saf_id", saf_id, change)
    return int(change["attempts"])  # type: ignore[call-overload]


def _op_ack(conn: sqlite3.Connection, saf_id: int, rc: str, attempt_at: float | None, now: float) -> bool:
    saf = _saf_by_id(conn, saf_id)
    decided = machine.ack(saf, _txn_view(conn, saf.txn_id), rc, attempt_at=attempt_at, now=now)
    _persist(conn, saf, decided.step)
    return decided.accepted


def _op_park(
    conn: sqlite3.Connection, saf_id: int, reason: str, final_attempt_at: float | None, now: float
) -> None:
    saf = _saf_by_id(conn, saf_id)
    _persist(conn, saf, machine.park(saf, instance=None, reason=reason, final_attempt_at=final_attempt_at, now=now))


def _op_retry(conn: sqlite3.Connection, saf_id: int, now: float) -> SafEntry:
    saf = _saf_by_id(conn, saf_id)
    _persist(conn, saf, machine.retry(saf, now=now))
    return _saf(conn, saf_id)


def _op_drop(conn: sqlite3.Connection, saf_id: int, note: str, now: float) -> SafEntry:
    saf = _saf_by_id(conn, saf_id)
    _persist(conn, saf, machine.drop(saf, note=note, now=now))
    return _saf(conn, saf_id)


def _op_reversal_ident(conn: sqlite3.Connection, saf_id: int, stan: str, transmission_datetime: str,
                       now: float) -> tuple[str, str]:
    saf = _saf_by_id(conn, saf_id)
    change = machine.reversal_ident(saf, instance=None, stan=stan, transmission_datetime=transmission_datetime,
                                    now=now)
    if change is not None:
        _update(conn, "saf", "saf_id", saf_id, change)
    row = conn.execute("SELECT reversal_stan, reversal_datetime FROM saf WHERE saf_id = ?", (saf_id,)).fetchone()
    return str(row[0]), str(row[1])


def _count_open_saf(conn: sqlite3.Connection) -> int:
    return int(conn.execute(f"SELECT count(*) FROM saf WHERE {_OPEN_SAF}").fetchone()[0])


def _saf_summary(conn: sqlite3.Connection) -> SafSummary:
    counts = {SafState.PENDING: (0, None), SafState.PARKED: (0, None)}
    for state, n, oldest in conn.execute(
        "SELECT state, count(*), min(queued_at) FROM saf WHERE state IN (?, ?) GROUP BY state",
        (SafState.PENDING, SafState.PARKED),
    ):
        counts[SafState(state)] = (int(n), oldest)
    pending, oldest_pending = counts[SafState.PENDING]
    return SafSummary(pending, counts[SafState.PARKED][0], oldest_pending)


def _op_record_refusal(conn: sqlite3.Connection, values: tuple[object, ...], keep: int) -> None:
    refusal_id = conn.execute(_INSERT_REFUSAL, values).lastrowid
    if refusal_id is not None and refusal_id > keep:
        # the primary key grows by one per refusal: everything older than the newest `keep` goes
        conn.execute("DELETE FROM refusal WHERE refusal_id <= ?", (refusal_id - keep,))


#: writes that change the SAF queue: the depth is re-counted after their commit
_SAF_OPS: Final[frozenset[Callable[..., object]]] = frozenset(
    {_op_queue_reversal, _op_mark_attempt, _op_ack, _op_park, _op_retry, _op_drop, _op_record_late_answer,
     _op_reversal_ident}
)
#: writes that change the database with at most one statement and raise only before it or when it
#: failed: SQLite undoes a failed statement by itself, so they need no savepoint (the two writes of
#: every transaction are such; a savepoint and its release cost about 1.5 µs)
_ONE_STATEMENT_OPS: Final[frozenset[Callable[..., object]]] = frozenset({_op_record_request, _op_record_outcome})


# --- the store -------------------------------------------------------------------------------------


class SqliteStore:
    """Durable journal + SAF queue. Open with `async with SqliteStore.open(path) as store:`, which runs
    the group committer in its own task group and drains it on exit. To run the committer in a task
    group of your own instead: `store = SqliteStore(path)`, `await store.connect()`,
    `await tg.start(store.run)`, and finally `await store.aclose()`."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "FULL",
        observer: StoreObserver | None = None,
        pan_key: bytes | None = None,
        busy_timeout: float = 5.0,
        max_batch: int = DEFAULT_MAX_BATCH,
        commit_delay: float = 0.0,
        clock: Callable[[], float] = time.time,
        max_refusals: int = DEFAULT_MAX_REFUSALS,
    ) -> None:
        mode = str(synchronous).upper()
        if mode not in SYNC_MODES:
            raise InvalidRecord(f"expected one of {', '.join(sorted(SYNC_MODES))}", field="synchronous")
        if pan_key is not None:
            pan_fingerprint(pan_key, "0000000000000000")  # checks the key's length now, not at first use
        self.path = Path(path)
        self.synchronous = mode
        self._observer: StoreObserver = observer or NullObserver()
        self._pan_key = pan_key
        self._busy_timeout = busy_timeout
        self._clock = clock
        self._max_refusals = check_limit(max_refusals)
        self._committer: GroupCommitter[sqlite3.Connection] = GroupCommitter(
            self._apply_batch, observer=self._observer, max_batch=max_batch, after_batch=self._after_batch,
            commit_delay=commit_delay,
        )
        #: writes go straight to the committer: `await self._write(op, *args)`
        self._write = self._committer.submit
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._read_limiter: anyio.CapacityLimiter | None = None
        self._stopped: anyio.Event | None = None
        self._depth_after_commit: int | None = None

    # --- lifecycle ---------------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def open(cls, path: str | os.PathLike[str], **options: Any) -> AsyncIterator[SqliteStore]:
        store = cls(path, **options)
        await store.connect()
        single: BaseException | None = None
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(store._serve)
                try:
                    yield store
                finally:
                    store._committer.close()
        except BaseExceptionGroup as group:
            # the task group wraps whatever the body raised; callers should see their own exception
            # (a StateConflict, say), not a group around it
            if len(group.exceptions) != 1:
                raise
            single = group.exceptions[0]
        finally:
            await store._disconnect()
        if single is not None:
            raise single

    async def connect(self) -> None:
        """Open (creating and migrating if needed) the database; report the SAF depth."""
        if self._writer is not None:
            return
        try:
            self._writer, self._reader = await anyio.to_thread.run_sync(
                _open_connections, self.path, self.synchronous, self._busy_timeout
            )
        except sqlite3.Error as exc:
            raise StoreIOError(f"cannot open the journal {self.path}: {exc}") from exc
        self._read_limiter = anyio.CapacityLimiter(1)
        self._observer.saf_depth(await self.saf_depth())

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The group committer, for a task group of the caller's. Cancelling it fails queued writes."""
        if self._writer is None:
            raise StoreClosed("connect() the store before running it")
        self._stopped = anyio.Event()
        try:
            await self._committer.run(task_status=task_status)
        finally:
            self._stopped.set()

    async def _serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        # shielded: `open` always calls close(), so this ends by draining every queued write, even
        # when the body of the `async with` fails or is cancelled
        with anyio.CancelScope(shield=True):
            await self.run(task_status=task_status)

    async def aclose(self) -> None:
        """Stop taking writes, let the committer commit what is queued, close the database."""
        self._committer.close()
        if self._committer.running and self._stopped is not None:
            with anyio.CancelScope(shield=True):
                await self._stopped.wait()
        await self._disconnect()

    async def _disconnect(self) -> None:
        writer, reader = self._writer, self._reader
        self._writer = self._reader = None
        if self._read_limiter is not None:  # let a read in progress finish with its connection
            with anyio.CancelScope(shield=True):
                async with self._read_limiter:
                    pass

        def close_all() -> None:
            for conn in (reader, writer):
                if conn is not None:
                    conn.close()

        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(close_all)

    # --- plumbing ----------------------------------------------------------------------------------

    def _apply_batch(self, writes: Sequence[Write[sqlite3.Connection]]) -> None:
        """Commit thread: one transaction for the whole batch, one savepoint per write that needs one."""
        conn = self._writer
        if conn is None:
            closed = StoreClosed("the store is closed")
            for write in writes:
                write.result, write.error = None, closed
            return
        touched_saf = False
        try:
            conn.execute("BEGIN IMMEDIATE")
            for write in writes:
                op = write.op
                savepoint = op not in _ONE_STATEMENT_OPS
                if savepoint:
                    conn.execute("SAVEPOINT w")
                try:
                    write.result = op(conn, *write.args)
                    touched_saf = touched_saf or op in _SAF_OPS
                except (sqlite3.OperationalError, sqlite3.InterfaceError, sqlite3.InternalError):
                    raise  # disk, lock or connection trouble: the whole batch fails below
                except Exception as exc:  # this write's own failure: undo it alone
                    if savepoint:
                        conn.execute("ROLLBACK TO w")
                    write.error = exc if isinstance(exc, StoreError) else _wrap(exc)
                if savepoint:
                    conn.execute("RELEASE w")
            conn.execute("COMMIT")
        except BaseException as exc:
            # never leave the connection inside a transaction: the next batch could not BEGIN
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):  # a broken connection: the next BEGIN says so
                    conn.execute("ROLLBACK")
            cause = exc if isinstance(exc, sqlite3.Error) else type(exc).__name__
            failure = StoreIOError(f"journal commit failed: {cause}")
            for write in writes:
                write.result, write.error = None, failure
            if not isinstance(exc, sqlite3.Error):
                raise
            return
        if touched_saf:
            try:
                self._depth_after_commit = _count_open_saf(conn)
            except sqlite3.Error:
                self._depth_after_commit = None

    def _after_batch(self) -> None:
        depth, self._depth_after_commit = self._depth_after_commit, None
        if depth is not None:
            self._observer.saf_depth(depth)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        reader, limiter = self._reader, self._read_limiter
        if reader is None or limiter is None:
            raise StoreClosed("the store is not open")
        await self._committer.flush()  # read this process's writes, `record_outcome_soon`'s included
        try:
            return await anyio.to_thread.run_sync(fn, reader, limiter=limiter)
        except sqlite3.Error as exc:
            raise StoreIOError(f"journal read failed: {exc}") from exc

    @property
    def committer(self) -> GroupCommitter[sqlite3.Connection]:
        """The group committer (its `commits` / `writes` counters show the batching)."""
        return self._committer

    def fingerprint(self, pan: str) -> str:
        if self._pan_key is None:
            raise InvalidRecord("the store was opened without a PAN fingerprint key", field="pan_key")
        return pan_fingerprint(self._pan_key, pan)

    # --- journal writes ----------------------------------------------------------------------------

    async def record_request(self, rec: TxnRequest) -> int:
        if not isinstance(rec, TxnRequest) or isinstance(rec, TxnRecord):
            raise InvalidRecord("expected a TxnRequest", field="record")
        now = self._clock()
        return await self._write(_op_record_request, (*_request_values(rec), TxnState.PENDING, now, now), rec)

    async def record_outcome(
        self, txn_id: int, state: TxnState | str, *, rc: str | None = None, auth_code: str | None = None,
        rrn: str | None = None,
    ) -> None:
        new = parse_outcome(state)
        check_outcome_args(txn_id, rc, auth_code, rrn)
        await self._write(_op_record_outcome, txn_id, new, rc, auth_code, rrn, self._clock())

    def record_outcome_soon(
        self, txn_id: int, state: TxnState | str, *, on_error: Callable[[BaseException], None],
        rc: str | None = None, auth_code: str | None = None, rrn: str | None = None,
    ) -> None:
        new = parse_outcome(state)
        check_outcome_args(txn_id, rc, auth_code, rrn)
        self._committer.submit_soon(_op_record_outcome, txn_id, new, rc, auth_code, rrn, self._clock(),
                                    on_error=on_error)

    async def queue_reversal(
        self, txn_id: int, reason: str, *, state: TxnState | str | None = None, rc: str | None = None,
        auth_code: str | None = None, rrn: str | None = None,
        initiator: ReversalInitiator | str = ReversalInitiator.GATEWAY, not_before: float | None = None,
    ) -> QueuedReversal:
        outcome = None if state is None else parse_enum(TxnState, state, "state")
        if outcome is not None:
            reversal_from(TxnState.PENDING, outcome)  # rejects outcomes a reversal cannot record
        check_outcome_args(txn_id, rc, auth_code, rrn)
        who = parse_enum(ReversalInitiator, initiator, "initiator")
        return await self._write(
            _op_queue_reversal, txn_id, check_reason(reason), outcome, rc, auth_code, rrn, who, not_before,
            self._clock(),
        )

    async def record_timeout_and_queue_reversal(self, txn_id: int, reason: str = "98") -> QueuedReversal:
        return await self.queue_reversal(txn_id, reason, state=TxnState.TIMED_OUT)

    async def record_late_answer(
        self, txn_id: int | None, rc: str, *, auth_code: str | None = None, rrn: str | None = None,
        host_mti: str | None = None, host_stan: str | None = None, terminal_id: str | None = None,
        amount: int | None = None, authenticated: bool = True,
        unknown_rc: str = RC_ORIGINAL_NOT_FOUND,
    ) -> LateRecorded:
        if txn_id is not None:
            check_id(txn_id, "txn_id")
        check_late_args(rc, amount)
        check_unknown_rc(unknown_rc)
        return await self._write(
            _op_record_late_answer, txn_id, rc, authenticated, unknown_rc, auth_code, rrn, host_mti, host_stan,
            terminal_id, amount, self._clock(),
        )

    def record_refusal_soon(self, rec: RefusalRecord, *, on_error: Callable[[BaseException], None]) -> None:
        if not isinstance(rec, RefusalRecord) or isinstance(rec, Refusal):
            raise InvalidRecord("expected a RefusalRecord", field="record")
        self._committer.submit_soon(_op_record_refusal, (*_refusal_values(rec), self._clock()),
                                    self._max_refusals, on_error=on_error)

    # --- journal reads -----------------------------------------------------------------------------

    async def get(self, txn_id: int) -> TxnRecord | None:
        check_id(txn_id, "txn_id")
        return await self._read(lambda c: _one_txn(c, "txn_id = ?", (txn_id,)))

    async def search(self, query: TxnQuery, *, limit: int = 100) -> list[TxnRecord]:
        check_limit(limit)
        where, params = _and("1 = 1", [], **query.equalities())
        where, params = _between(where, params, "created_at", query.since, query.until)
        return await self._read(lambda c: _txns(c, f"{where} ORDER BY txn_id DESC LIMIT ?", (*params, limit)))

    async def refusals(
        self, *, terminal_id: str | None = None, pan_fingerprint: str | None = None, rc: str | None = None,
        since: float | None = None, until: float | None = None, limit: int = 100,
    ) -> list[Refusal]:
        check_limit(limit)
        where, params = _and("1 = 1", [], terminal_id=terminal_id, pan_fingerprint=pan_fingerprint, rc=rc)
        where, params = _between(where, params, "refused_at", since, until)

        def query(conn: sqlite3.Connection) -> list[Refusal]:
            rows = conn.execute(
                f"SELECT {', '.join(REFUSAL_COLUMNS)} FROM refusal WHERE {where} ORDER BY refusal_id DESC LIMIT ?",
                (*params, limit),
            )
            return [Refusal(**dict(zip(REFUSAL_COLUMNS, r, strict=True))) for r in rows]

        return await self._read(query)

    async def saf_for_txn(self, txn_id: int) -> SafEntry | None:
        check_id(txn_id, "txn_id")
        found = await self._read(lambda c: _safs(c, "s.txn_id = ?", (txn_id,)))
        return found[0] if found else None

    async def find_original(self, terminal_id: str, batch: str, stan: str) -> TxnRecord | None:
        return await self._read(lambda c: _one_txn(
            c, "terminal_id = ? AND batch = ? AND terminal_stan = ? AND kind <> 'reversal'",
            (terminal_id, batch, stan),
        ))

    async def find_by_rrn(self, rrn: str, *, terminal_id: str | None = None) -> TxnRecord | None:
        where, params = _and("rrn = ?", [rrn], terminal_id=terminal_id)
        return await self._read(lambda c: _one_txn(c, f"{where} ORDER BY txn_id DESC LIMIT 1", params))

    async def find_by_host_stan(
        self, host_stan: str, *, transmission_datetime: str | None = None, terminal_id: str | None = None
    ) -> TxnRecord | None:
        where, params = _and("host_stan = ?", [host_stan], transmission_datetime=transmission_datetime,
                             terminal_id=terminal_id)
        return await self._read(lambda c: _one_txn(c, f"{where} ORDER BY txn_id DESC LIMIT 1", params))

    async def find_referencing(self, orig_txn_id: int) -> list[TxnRecord]:
        check_id(orig_txn_id, "orig_txn_id")
        return await self._read(lambda c: _txns(c, "orig_txn_id = ? ORDER BY txn_id", (orig_txn_id,)))

    async def find_by_fingerprint(self, fingerprint: str, *, limit: int = 50) -> list[TxnRecord]:
        check_limit(limit)
        if not fingerprint:
            return []
        return await self._read(lambda c: _txns(
            c, "pan_fingerprint = ? AND pan_fingerprint <> '' ORDER BY txn_id DESC LIMIT ?",
            (fingerprint, limit),
        ))

    async def unknown_outcomes(self) -> list[TxnRecord]:
        return await self._read(lambda c: _txns(c, "state = 'pending' ORDER BY txn_id", ()))

    async def settlement_totals(self, terminal_id: str, batch: str) -> SettlementTotals:
        def query(conn: sqlite3.Connection) -> SettlementTotals:
            rows = conn.execute(
                "SELECT kind, card_org, count(*), coalesce(sum(amount), 0) FROM txn"
                # `kind <> 'reversal'` lets SQLite use the (partial) terminal/batch/STAN index
                " WHERE terminal_id = ? AND batch = ? AND kind <> 'reversal' AND state = ?"
                f" AND kind IN ({_SETTLED_KINDS}) GROUP BY kind, card_org",
                (terminal_id, batch, TxnState.COMPLETED),
            ).fetchall()
            return totals_from_groups(rows)

        return await self._read(query)

    async def purchase_totals_since(self, since: float) -> dict[str, int]:
        def query(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute(
                "SELECT terminal_id, sum(amount) FROM txn WHERE created_at >= ? AND kind = ? AND state = ?"
                " GROUP BY terminal_id",
                (since, TxnKind.PURCHASE, TxnState.COMPLETED),
            )
            return {tid: int(total) for tid, total in rows}

        return await self._read(query)

    async def list_transactions(
        self, *, terminal_id: str | None = None, batch: str | None = None,
        state: TxnState | str | None = None, limit: int = 100,
    ) -> list[TxnRecord]:
        check_limit(limit)
        wanted = None if state is None else parse_enum(TxnState, state, "state")
        where, params = _and("1 = 1", [], terminal_id=terminal_id, batch=batch, state=wanted)
        return await self._read(lambda c: _txns(c, f"{where} ORDER BY txn_id DESC LIMIT ?", (*params, limit)))

    async def late_answers(self, *, txn_id: int | None = None, limit: int = 100) -> list[LateAnswer]:
        check_limit(limit)
        where, params = _and("1 = 1", [], txn_id=txn_id)

        def query(conn: sqlite3.Connection) -> list[LateAnswer]:
            rows = conn.execute(
                f"SELECT {', '.join(LATE_COLUMNS)} FROM late_answer WHERE {where}"
                " ORDER BY late_id DESC LIMIT ?",
                (*params, limit),
            )
            return [LateAnswer(**dict(zip(LATE_COLUMNS, r, strict=True))) for r in rows]

        return await self._read(query)

    # --- store and forward -------------------------------------------------------------------------

    async def due_reversals(self, now: float, limit: int = 64) -> list[SafEntry]:
        check_limit(limit)
        return await self._read(lambda c: _safs(
            c, "s.state = ? AND s.next_attempt_at <= ? ORDER BY s.saf_id LIMIT ?",
            (SafState.PENDING, now, limit),
        ))

    async def mark_reversal_attempt(self, saf_id: int, now: float, next_attempt_at: float, error: str) -> int:
        check_id(saf_id, "saf_id")
        return await self._write(
            _op_mark_attempt, saf_id, now, next_attempt_at, clip_text(error, "error"), self._clock()
        )

    async def ack_reversal(self, saf_id: int, rc: str, *, attempt_at: float | None = None) -> bool:
        check_id(saf_id, "saf_id")
        check_rc(rc)
        return await self._write(_op_ack, saf_id, rc, attempt_at, self._clock())

    async def park_reversal(self, saf_id: int, reason: str, *, final_attempt_at: float | None = None) -> None:
        check_id(saf_id, "saf_id")
        await self._write(
            _op_park, saf_id, clip_text(reason, "reason", required=True), final_attempt_at, self._clock()
        )

    async def list_saf(self, state: SafState | str | None = None, *, limit: int = 1000) -> list[SafEntry]:
        check_limit(limit)
        if state is None:
            return await self._read(lambda c: _safs(c, "1 = 1 ORDER BY s.saf_id LIMIT ?", (limit,)))
        wanted = parse_enum(SafState, state, "state")
        return await self._read(lambda c: _safs(c, "s.state = ? ORDER BY s.saf_id LIMIT ?", (wanted, limit)))

    async def get_saf(self, saf_id: int) -> SafEntry | None:
        check_id(saf_id, "saf_id")
        found = await self._read(lambda c: _safs(c, "s.saf_id = ?", (saf_id,)))
        return found[0] if found else None

    async def retry_saf(self, saf_id: int) -> SafEntry:
        check_id(saf_id, "saf_id")
        return await self._write(_op_retry, saf_id, self._clock())

    async def drop_saf(self, saf_id: int, operator_note: str) -> SafEntry:
        check_id(saf_id, "saf_id")
        note = clip_text(operator_note, "operator_note", required=True)
        return await self._write(_op_drop, saf_id, note, self._clock())

    async def saf_depth(self) -> int:
        return await self._read(_count_open_saf)

    async def saf_summary(self) -> SafSummary:
        return await self._read(_saf_summary)

    async def record_reversal_ident(self, saf_id: int, stan: str, transmission_datetime: str) -> tuple[str, str]:
        check_id(saf_id, "saf_id")
        check_ident(stan, transmission_datetime)
        return await self._write(_op_reversal_ident, saf_id, stan, transmission_datetime, self._clock())

    async def claim_orphaned_pending(self, stale_after: float) -> list[TxnRecord]:
        """One file, one gateway: nobody else's requests to take over (a second process on the same file
        is refused by nothing here, and must not be run)."""
        return []


def _and(base: str, params: list[object], **optional: object) -> tuple[str, list[object]]:
    """`base` plus `AND column = ?` for every optional filter that is given."""
    where = base
    for column, value in optional.items():
        if value is not None:
            where += f" AND {column} = ?"
            params.append(value)
    return where, params


def _between(where: str, params: list[object], column: str, since: float | None,
             until: float | None) -> tuple[str, list[object]]:
    """`where` plus a half-open time range on `column` (`since` ≤ column < `until`), either end optional."""
    if since is not None:
        where += f" AND {column} >= ?"
        params.append(since)
    if until is not None:
        where += f" AND {column} < ?"
        params.append(until)
    return where, params


def _wrap(exc: Exception) -> StoreError:
    """An unexpected failure of one write, as a typed error that keeps the cause chained."""
    error = StoreError(f"journal write failed: {type(exc).__name__}")
    error.__cause__ = exc
    return error
