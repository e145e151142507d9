"""The PostgreSQL store: the journal and SAF queue of several gateway instances on one database.

Threads, not asyncio drivers: asyncpg and psycopg's async API run on asyncio only, and the gateway runs
on trio too. So, as in the SQLite store, every database call is a plain (psycopg 3) call in a thread:

- Writes: one connection owned by the group committer's thread (`group_commit`). A batch is ONE round
  trip: BEGIN, every write's statement and COMMIT go out together in pipeline mode and are answered
  together. That holds for the writes of the money path (a request's INSERT, an outcome's conditional
  UPDATE, a refusal, a lease claim), each a single statement that never fails for an expected reason:
  a duplicate is an `ON CONFLICT DO NOTHING` that returns no row, a wrong state an UPDATE whose WHERE
  (the state machine's allowed sources) matches nothing. The rarer SAF and late-answer writes read
  their rows `FOR UPDATE`, let `machine` decide, and write: one more round trip each. A write that
  fails inside the database (a constraint, a bug) aborts the batch; the batch is then run again with
  one savepoint per write, so only that write fails, as the `Store` contract says.
- Reads: a `psycopg_pool.ConnectionPool` (autocommit connections), one worker thread per read; a read
  first waits for this process's queued writes (`flush`), so it sees them.
- One more connection holds this instance's advisory lock (a second live process with the same
  instance id is refused at open) and writes its heartbeat every `heartbeat_interval` seconds.

Several instances (see `machine` for the rules):
- `due_reversals` claims due SAF entries with a lease (`FOR UPDATE SKIP LOCKED`: two instances never
  claim one entry; lease owner = instance id, expiry in the database's clock). This instance's own
  entries come first and are renewed at every poll, so an attempt in flight keeps its lease while its
  sender lives; a dead instance's leases expire after `lease` seconds and another instance takes its
  queued and in-flight reversals. Attempts, parking and the reversal's STAN are recorded only by the
  lease holder (`LeaseLost` otherwise); an acknowledgement from anyone ends the entry, idempotently.
- Each request row names the instance that journalled it (`owner`). `unknown_outcomes` returns this
  instance's own pending rows (its previous life: the id is stable across restarts);
  `claim_orphaned_pending` takes over the pending rows of instances whose heartbeat is stale, in one
  UPDATE, so that a live instance settles them without waiting for the dead one to come back.
- Migrations run at open under an advisory lock (`pg_migrations`): safe when instances start at once.

Times in rows are epoch seconds from the store's `clock` (as in SQLite); leases and heartbeats use the
database's clock, the one clock all instances share.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any, Final, TypeVar

import anyio
import anyio.abc
import psycopg
import psycopg.errors
from psycopg_pool import ConnectionPool

from gateway.iso.totals import SettlementTotals
from gateway.store import machine, pg_migrations
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

log = logging.getLogger("gateway.store")

T = TypeVar("T")
#: what a write op returns: called once the batch's round trip is over, it gives the op's result
Finisher = Callable[[], Any]
Conn = psycopg.Connection[Any]

DEFAULT_LEASE: Final = 15.0
DEFAULT_HEARTBEAT: Final = 1.0
DEFAULT_POOL_SIZE: Final = 4
#: this instance's advisory lock, with the schema's name and the instance id
INSTANCE_LOCK: Final = "iso8583-gateway instance "
#: the database's clock, in epoch seconds (leases, heartbeats)
DB_NOW: Final = "extract(epoch FROM clock_timestamp())::float8"

_TXN_SELECT: Final = f"SELECT {', '.join(TXN_COLUMNS)} FROM txn"


def _saf_pick(alias: str) -> str:
    """The columns of a SAF entry (alias.) and of its transaction (t.), in `_saf_rows` order."""
    return f"{', '.join(f'{alias}.{c}' for c in SAF_COLUMNS)}, {', '.join('t.' + c for c in TXN_COLUMNS)}"


_SAF_SELECT: Final = f"SELECT {_saf_pick('s')} FROM saf s JOIN txn t ON t.txn_id = s.txn_id"
_INSERT_TXN: Final = (
    f"INSERT INTO txn ({', '.join(REQUEST_COLUMNS)}, state, created_at, updated_at, owner)"
    f" VALUES ({', '.join(['%s'] * (len(REQUEST_COLUMNS) + 4))})"
    " ON CONFLICT (terminal_id, batch, terminal_stan) WHERE kind <> 'reversal' DO NOTHING RETURNING txn_id"
)
#: record_outcome for each outcome: one UPDATE whose WHERE holds the machine's allowed source states,
#: and the state as it was (same snapshot) for the error when it matched nothing
_RECORD_OUTCOME: Final = {
    state: "WITH upd AS (UPDATE txn SET state = %s, rc = coalesce(%s, rc), auth_code = coalesce(%s, auth_code),"
    " rrn = coalesce(%s, rrn), updated_at = %s"
    f" WHERE txn_id = %s AND state IN ({', '.join(repr(str(s)) for s in outcome_sources(state))}) RETURNING 1)"
    " SELECT (SELECT count(*) FROM upd), (SELECT state FROM txn WHERE txn_id = %s)"
    for state in OUTCOME_STATES
}
_INSERT_REFUSAL: Final = (
    f"WITH ins AS (INSERT INTO refusal ({', '.join(REFUSAL_RECORD_COLUMNS)}, refused_at)"
    f" VALUES ({', '.join(['%s'] * (len(REFUSAL_RECORD_COLUMNS) + 1))}) RETURNING refusal_id)"
    # ids grow by one per refusal: everything older than the newest `keep` goes
    " DELETE FROM refusal WHERE refusal_id <= (SELECT refusal_id FROM ins) - %s"
)
#: due entries not leased by a live other instance, this instance's first (renewed), claimed in one step
_CLAIM_DUE: Final = (
    f"WITH clock AS (SELECT {DB_NOW} AS now),"
    " due AS (SELECT s.saf_id FROM saf s, clock WHERE s.state = 'pending' AND s.next_attempt_at <= %s"
    " AND (s.lease_owner IS NULL OR s.lease_owner = %s OR s.lease_expires_at < clock.now)"
    " ORDER BY (s.lease_owner IS NOT DISTINCT FROM %s) DESC, s.saf_id LIMIT %s FOR UPDATE OF s SKIP LOCKED),"
    " claimed AS (UPDATE saf s SET lease_owner = %s, lease_expires_at = clock.now + %s FROM due, clock"
    " WHERE s.saf_id = due.saf_id RETURNING s.*)"
    f" SELECT {_saf_pick('c')} FROM claimed c JOIN txn t ON t.txn_id = c.txn_id ORDER BY c.saf_id"
)
_CLAIM_ORPHANS: Final = (
    f"WITH clock AS (SELECT {DB_NOW} AS now),"
    " dead AS (SELECT instance_id FROM instance, clock WHERE instance_id <> %s AND heartbeat_at < clock.now - %s)"
    " UPDATE txn SET owner = %s WHERE state = 'pending' AND owner IN (SELECT instance_id FROM dead)"
    f" RETURNING {', '.join(TXN_COLUMNS)}"
)
_OPEN_SAF: Final = f"state IN ({', '.join(repr(str(s)) for s in OPEN_SAF_STATES)})"
_SETTLED_KINDS: Final = ", ".join(repr(str(k)) for k in sorted(DEBIT_KINDS | CREDIT_KINDS))


# --- row helpers -----------------------------------------------------------------------------------


def _saf_rows(rows: Sequence[Sequence[Any]]) -> list[SafEntry]:
    split = len(SAF_COLUMNS)
    return [saf_from_row(tuple(r[:split]), txn_from_row(tuple(r[split:]))) for r in rows]


def _txns(conn: Conn, where: str, params: Sequence[object]) -> list[TxnRecord]:
    return [txn_from_row(tuple(r)) for r in conn.execute(f"{_TXN_SELECT} WHERE {where}", params).fetchall()]


def _one_txn(conn: Conn, where: str, params: Sequence[object]) -> TxnRecord | None:
    found = _txns(conn, where, params)
    return found[0] if found else None


def _safs(conn: Conn, where: str, params: Sequence[object]) -> list[SafEntry]:
    return _saf_rows(conn.execute(f"{_SAF_SELECT} WHERE {where}", params).fetchall())


#: every journal write's transaction. READ COMMITTED whatever the server's default_transaction_isolation:
#: the writes lock a row (FOR UPDATE) and then read what others committed meanwhile (a void's or refund's
#: earlier credits, a transaction's state); under REPEATABLE READ that read would see the snapshot from
#: before the lock wait, and two instances could both pass a check only one may pass
#: seconds a journal write waits for a row lock held by another session (see _bound_lock_waits)
DEFAULT_LOCK_TIMEOUT: Final = 2.0
_BEGIN: Final = "BEGIN ISOLATION LEVEL READ COMMITTED"


def _lock_txn(conn: Conn, txn_id: int) -> TxnView:
    row = conn.execute("SELECT state, reversal_rc, late_approved_at FROM txn WHERE txn_id = %s FOR UPDATE",
                       (txn_id,)).fetchone()
    if row is None:
        raise NotFound("transaction", txn_id)
    return TxnView(txn_id, TxnState(row[0]), row[1], row[2])


_SAF_VIEW: Final = "s.saf_id, s.txn_id, s.state, s.attempts, s.total_attempts, s.reversal_stan, s.lease_owner"


def _saf_view(row: Sequence[Any]) -> SafView:
    return SafView(row[0], row[1], SafState(row[2]), *row[3:7])


def _lock_saf(conn: Conn, saf_id: int) -> tuple[SafView, TxnView]:
    """The entry and its transaction, both locked (one statement, so one round trip)."""
    row = conn.execute(
        f"SELECT {_SAF_VIEW}, t.state, t.reversal_rc, t.late_approved_at FROM saf s"
        " JOIN txn t ON t.txn_id = s.txn_id WHERE s.saf_id = %s FOR UPDATE", (saf_id,),
    ).fetchone()
    if row is None:
        raise NotFound("SAF entry", saf_id)
    return _saf_view(row), TxnView(row[1], TxnState(row[7]), row[8], row[9])


def _update(conn: Conn, table: str, key: str, ident: int, change: Change) -> None:
    """Write what the state machine decided (column names come from `machine`, never from input)."""
    if change:
        sets = ", ".join(f"{column} = %s" for column in change)
        conn.execute(f"UPDATE {table} SET {sets} WHERE {key} = %s", (*change.values(), ident))


def _persist(conn: Conn, saf: SafView, step: machine.Step | None) -> None:
    if step is not None:
        _update(conn, "txn", "txn_id", saf.txn_id, step.txn)
        _update(conn, "saf", "saf_id", saf.saf_id, step.saf)


def _entry_after(conn: Conn, saf_id: int) -> Finisher:
    """The entry as this batch leaves it (read in the same round trip as the batch's other writes)."""
    cur = conn.execute(f"{_SAF_SELECT} WHERE s.saf_id = %s", (saf_id,))
    return lambda: _saf_rows(cur.fetchall())[0]


def _done(value: T) -> Callable[[], T]:
    return lambda: value


# --- write ops: `op(conn, *args)` queues its statements and returns its finisher --------------------


def _op_record_request(conn: Conn, values: tuple[object, ...], rec: TxnRequest) -> Finisher:
    if rec.kind in CHECKED_CREDIT_KINDS and rec.orig_txn_id is not None:
        # Another instance may journal a void or refund of the same sale at the same moment: every such
        # write locks the original's row first, and (READ COMMITTED) the read after the lock sees what
        # the other committed. A round trip, on the rare credit path only.
        original = _one_txn(conn, "txn_id = %s FOR UPDATE", (rec.orig_txn_id,))
        earlier = _txns(conn, "orig_txn_id = %s", (rec.orig_txn_id,))
        refusal = credit_refusal(rec.kind, rec.amount, original, earlier) if original else None
        if refusal is not None:  # (no such original: the foreign key refuses the insert below)
            raise OriginalRefused(rec.orig_txn_id, refusal)
    cur = conn.execute(_INSERT_TXN, values)

    def finish() -> int:
        row = cur.fetchone()
        if row is None:  # ON CONFLICT DO NOTHING: the first request keeps its entry
            raise DuplicateRequest(rec.terminal_id, rec.batch, rec.terminal_stan)
        return int(row[0])

    return finish


def _op_record_outcome(conn: Conn, txn_id: int, state: TxnState, rc: str | None, auth_code: str | None,
                       rrn: str | None, now: float) -> Finisher:
    cur = conn.execute(_RECORD_OUTCOME[state], (state, rc, auth_code, rrn, now, txn_id, txn_id))

    def finish() -> None:
        row = cur.fetchone()
        updated, current = (row[0], row[1]) if row else (0, None)
        if updated:
            return
        if current is None:
            raise NotFound("transaction", txn_id)
        # the UPDATE's WHERE is the machine's own rule: it says why, as for the other backends
        machine.outcome(TxnView(txn_id, TxnState(current)), state, rc=rc, auth_code=auth_code, rrn=rrn, now=now)
        raise StateConflict("transaction", txn_id, current, f"record outcome {state}")

    return finish


def _op_record_refusal(conn: Conn, values: tuple[object, ...], keep: int) -> Finisher:
    conn.execute(_INSERT_REFUSAL, (*values, keep))
    return _done(None)


def _op_queue_reversal(conn: Conn, txn_id: int, reason: str, state: TxnState | None, rc: str | None,
                       auth_code: str | None, rrn: str | None, initiator: ReversalInitiator,
                       not_before: float | None, now: float) -> Finisher:
    view = _lock_txn(conn, txn_id)
    new = machine.queue_reversal(view, reason=reason, outcome=state, initiator=initiator, rc=rc,
                                 auth_code=auth_code, rrn=rrn, not_before=not_before, now=now)
    if new is None:
        existing = _safs(conn, "s.txn_id = %s", (txn_id,))
        if not existing:
            raise machine.missing_saf(view)
        return _done(QueuedReversal(existing[0], created=False))
    if initiator is ReversalInitiator.TERMINAL:
        # the sale's row is locked (above), as every void or refund of it locks it before its own check:
        # read after the lock (READ COMMITTED), what another instance journalled against it is seen here
        original = _one_txn(conn, "txn_id = %s", (txn_id,))
        referencing = _txns(conn, "orig_txn_id = %s", (txn_id,))
        refusal = reversal_refusal(original, referencing) if original else None
        if refusal:
            raise OriginalRefused(txn_id, refusal)
    _update(conn, "txn", "txn_id", txn_id, new.txn)
    conn.execute(f"INSERT INTO saf ({', '.join(new.saf)}) VALUES ({', '.join(['%s'] * len(new.saf))})",
                 tuple(new.saf.values()))
    cur = conn.execute(f"{_SAF_SELECT} WHERE s.txn_id = %s", (txn_id,))
    return lambda: QueuedReversal(_saf_rows(cur.fetchall())[0], created=True)


def _op_record_late_answer(conn: Conn, txn_id: int | None, rc: str, authenticated: bool, unknown_rc: str,
                           auth_code: str | None, rrn: str | None, host_mti: str | None, host_stan: str | None,
                           terminal_id: str | None, amount: int | None, now: float) -> Finisher:
    reopened = False
    if txn_id is not None:
        change, after = machine.late_answer(_lock_txn(conn, txn_id), rc, authenticated=authenticated, now=now)
        _update(conn, "txn", "txn_id", txn_id, change)
        if machine.wants_reopen(after, rc, authenticated=authenticated, unknown_rc=unknown_rc):
            row = conn.execute(f"SELECT {_SAF_VIEW} FROM saf s WHERE s.txn_id = %s FOR UPDATE", (txn_id,)).fetchone()
            saf = None if row is None else _saf_view(row)
            step = machine.reopen(after, saf, now=now, unknown_rc=unknown_rc)
            if saf is not None and step is not None:
                _persist(conn, saf, step)
                reopened = True
    cur = conn.execute(
        f"INSERT INTO late_answer ({', '.join(LATE_COLUMNS[1:])})"
        f" VALUES ({', '.join(['%s'] * (len(LATE_COLUMNS) - 1))}) RETURNING late_id",
        (txn_id, rc, auth_code, rrn, host_mti, host_stan, terminal_id, amount, now),
    )
    return lambda: LateRecorded(int(cur.fetchone()[0]), reopened)  # type: ignore[index]


def _op_mark_attempt(conn: Conn, instance: str, saf_id: int, attempted_at: float, next_attempt_at: float,
                     error: str, now: float) -> Finisher:
    saf, _ = _lock_saf(conn, saf_id)
    change = machine.attempt(saf, instance=instance, attempted_at=attempted_at, next_attempt_at=next_attempt_at,
                             error=error, now=now)
    _update(conn, "saf", "saf_id", saf_id, change)
    return _done(change["attempts"])


def _op_ack(conn: Conn, saf_id: int, rc: str, attempt_at: float | None, now: float) -> Finisher:
    saf, txn = _lock_saf(conn, saf_id)
    decided = machine.ack(saf, txn, rc, attempt_at=attempt_at, now=now)
    _persist(conn, saf, decided.step)
    return _done(decided.accepted)


def _op_park(conn: Conn, instance: str, saf_id: int, reason: str, final_attempt_at: float | None,
             now: float) -> Finisher:
    saf, _ = _lock_saf(conn, saf_id)
    _persist(conn, saf, machine.park(saf, instance=instance, reason=reason, final_attempt_at=final_attempt_at,
                                     now=now))
    return _done(None)


def _op_retry(conn: Conn, saf_id: int, now: float) -> Finisher:
    saf, _ = _lock_saf(conn, saf_id)
    _persist(conn, saf, machine.retry(saf, now=now))
    return _entry_after(conn, saf_id)


def _op_drop(conn: Conn, saf_id: int, note: str, now: float) -> Finisher:
    saf, _ = _lock_saf(conn, saf_id)
    _persist(conn, saf, machine.drop(saf, note=note, now=now))
    return _entry_after(conn, saf_id)


def _op_reversal_ident(conn: Conn, instance: str, saf_id: int, stan: str, transmission_datetime: str,
                       now: float) -> Finisher:
    saf, _ = _lock_saf(conn, saf_id)
    change = machine.reversal_ident(saf, instance=instance, stan=stan, transmission_datetime=transmission_datetime,
                                    now=now)
    if change is not None:
        _update(conn, "saf", "saf_id", saf_id, change)
    cur = conn.execute("SELECT reversal_stan, reversal_datetime FROM saf WHERE saf_id = %s", (saf_id,))

    def finish() -> tuple[str, str]:
        row = cur.fetchone()
        assert row is not None
        return str(row[0]), str(row[1])

    return finish


def _op_claim_due(conn: Conn, instance: str, now: float, limit: int, lease: float) -> Finisher:
    cur = conn.execute(_CLAIM_DUE, (now, instance, instance, limit, instance, lease))
    return lambda: _saf_rows(cur.fetchall())


def _op_claim_orphans(conn: Conn, instance: str, stale_after: float) -> Finisher:
    cur = conn.execute(_CLAIM_ORPHANS, (instance, stale_after, instance))
    return lambda: sorted((txn_from_row(tuple(r)) for r in cur.fetchall()), key=lambda r: r.txn_id)


#: writes that change the SAF queue's depth: it is re-counted after their commit
_SAF_OPS: Final[frozenset[Callable[..., object]]] = frozenset(
    {_op_queue_reversal, _op_ack, _op_park, _op_retry, _op_drop, _op_record_late_answer}
)


#: errors after which the whole transaction is gone (not only the write that met them)
_TRANSACTION_LOST: Final = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)


def _db_error(exc: psycopg.Error) -> StoreError:
    """A write's own failure inside the database, as the typed error the other backends give."""
    if isinstance(exc, psycopg.errors.ForeignKeyViolation):
        return InvalidRecord("no such journal entry", field="orig_txn_id")
    if isinstance(exc, psycopg.IntegrityError):
        return InvalidRecord("rejected by a journal constraint", field="record")
    error = StoreError(f"journal write failed: {type(exc).__name__}")
    error.__cause__ = exc
    return error


def check_instance_id(value: object) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 64 or not value.isprintable():
        raise InvalidRecord("expected 1..64 printable characters", field="instance_id")
    return value


def default_instance_id() -> str:
    """The host's name: stable across restarts, so a restarted instance settles its own pending rows.
    Several instances on one host need ids of their own (`[store] instance_id`)."""
    return check_instance_id(socket.gethostname()[:64] or "gateway")


# --- the store -------------------------------------------------------------------------------------


class PostgresStore:
    """Open with `async with PostgresStore.open(url, instance_id=...) as store:`; it runs its group
    committer and heartbeat in its own task group and drains the committer on exit."""

    def __init__(
        self,
        url: str,
        *,
        instance_id: str | None = None,
        observer: StoreObserver | None = None,
        pan_key: bytes | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        commit_delay: float = 0.0,
        clock: Callable[[], float] = time.time,
        max_refusals: int = DEFAULT_MAX_REFUSALS,
        pool_size: int = DEFAULT_POOL_SIZE,
        lease: float = DEFAULT_LEASE,
        heartbeat_interval: float = DEFAULT_HEARTBEAT,
        connect_timeout: float = 10.0,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        operator: bool = False,
    ) -> None:
        """`operator`: a store for operator commands (`gateway saf …`), not a gateway instance: no
        instance row, lock or heartbeat (it journals no requests and claims nothing)."""
        if pan_key is not None:
            pan_fingerprint(pan_key, "0000000000000000")  # checks the key's length now, not at first use
        if not isinstance(url, str) or not url.startswith(("postgresql://", "postgres://")):
            raise InvalidRecord("expected a postgresql:// URL", field="url")
        if not 0 < lease < 3600 or not 0 < heartbeat_interval < lease:
            raise InvalidRecord("expected 0 < heartbeat_interval < lease < 3600 seconds", field="lease")
        if not 0 < lock_timeout <= 600:
            raise InvalidRecord("expected 0 < lock_timeout <= 600 seconds", field="lock_timeout")
        self.lock_timeout = float(lock_timeout)
        self.url = url
        self.instance_id = check_instance_id(instance_id) if instance_id is not None else default_instance_id()
        self.lease = float(lease)
        self.heartbeat_interval = float(heartbeat_interval)
        self._observer: StoreObserver = observer or NullObserver()
        self._pan_key = pan_key
        self._clock = clock
        self._max_refusals = check_limit(max_refusals)
        self._pool_size = check_limit(pool_size)
        self._connect_timeout = connect_timeout
        self.operator = operator
        self._committer: GroupCommitter[Conn] = GroupCommitter(
            self._apply_batch, observer=self._observer, max_batch=max_batch, after_batch=self._after_batch,
            commit_delay=commit_delay,
        )
        #: writes go to the committer; ops return finishers, so its result type is the finisher's
        self._write: Callable[..., Awaitable[Any]] = self._committer.submit
        self._writer: Conn | None = None
        self._session: Conn | None = None  #: holds the instance lock; heartbeats
        self._pool: ConnectionPool[Conn] | None = None
        self._read_limiter: anyio.CapacityLimiter | None = None
        #: the session connection is used by one thread at a time (heartbeats, close)
        self._session_limiter: anyio.CapacityLimiter | None = None
        self._depth_after_commit: int | None = None
        #: batches the database refused a write of, run again with a savepoint per write
        self.batches_failed_over = 0

    # --- lifecycle ---------------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def open(cls, url: str, **options: Any) -> AsyncIterator[PostgresStore]:
        store = cls(url, **options)
        await store.connect()
        single: BaseException | None = None
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(store._serve)
                if not store.operator:
                    tg.start_soon(store._heartbeats)
                try:
                    yield store
                finally:
                    store._committer.close()
                    tg.cancel_scope.cancel()  # the heartbeats; the committer drains under its shield
        except BaseExceptionGroup as group:
            if len(group.exceptions) != 1:
                raise
            single = group.exceptions[0]
        finally:
            await store._disconnect()
        if single is not None:
            raise single

    async def connect(self) -> None:
        """Connect, migrate (under the advisory lock), take this instance's lock, open the read pool."""
        if self._writer is not None:
            return
        self._session_limiter = anyio.CapacityLimiter(1)
        try:
            await anyio.to_thread.run_sync(self._connect_all)
        except psycopg.Error as exc:
            await self._disconnect()
            raise StoreIOError(f"cannot open the PostgreSQL journal: {exc}") from exc
        except BaseException:
            await self._disconnect()
            raise
        self._read_limiter = anyio.CapacityLimiter(self._pool_size)
        self._observer.saf_depth(await self.saf_depth())

    def _connection(self) -> Conn:
        return psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, int(self._connect_timeout)),
                               application_name=f"iso8583-gateway {self.instance_id}"[:63])

    def _connect_all(self) -> None:
        self._writer = self._connection()
        self._prepare_writer(self._writer)
        pg_migrations.migrate(self._writer)
        if not self.operator:
            self._session = session = self._connection()
            self._lock_instance(session)
        self._pool = ConnectionPool(self.url, min_size=1, max_size=self._pool_size, open=False,
                                    kwargs={"autocommit": True}, timeout=self._connect_timeout,
                                    name=f"journal-read-{self.instance_id}")
        self._pool.open(wait=True, timeout=self._connect_timeout)

    def _prepare_writer(self, writer: Conn) -> None:
        self._make_commits_durable(writer)
        self._bound_lock_waits(writer)

    def _bound_lock_waits(self, writer: Conn) -> None:
        """A write waits at most `lock_timeout` for a row lock another session holds.

        The one writer serves every transaction of this instance, so a wait is everybody's: another
        instance whose connection died mid-transaction (its locks stay until the server notices, which
        TCP keepalive may take hours to), or an operator's open `SELECT ... FOR UPDATE`, would stop the
        whole instance's journal while it holds a sale that a refund or void here must lock. Bounded, the
        batch fails over to one write at a time (`_one_by_one`): only the write that needs the held row
        waits a second time and fails (the service refuses that one request, nothing went upstream);
        the rest of the batch commits.
        """
        writer.execute(f"SET lock_timeout = {round(self.lock_timeout * 1000)}")

    def _make_commits_durable(self, writer: Conn) -> None:
        """Write-before-send needs a commit that is on disk when COMMIT returns.

        A server (or role, or database) configured with synchronous_commit=off acknowledges a commit
        before its WAL is flushed: a crash of the server then loses the last journalled requests while
        their purchases are already at the host. The setting is per session, so the connection that
        commits asks for `on` itself; stronger settings (remote_write, remote_apply) are kept. fsync=off
        cannot be changed by a client: it is logged as an error at every start.
        """
        row = writer.execute("SHOW synchronous_commit").fetchone()
        if row is not None and str(row[0]) == "off":
            writer.execute("SET synchronous_commit = on")
            log.warning("PostgreSQL journal: the server's synchronous_commit is off; the journal's writer"
                        " connection sets it on (a commit is durable before the request is sent)")
        row = writer.execute("SHOW fsync").fetchone()
        if row is not None and str(row[0]) != "on":
            log.error("PostgreSQL journal: the server runs with fsync=%s: no commit survives a crash of"
                      " the server's machine; approvals may be charged with no journal record", row[0])

    def _lock_instance(self, session: Conn) -> None:
        row = session.execute("SELECT pg_try_advisory_lock(hashtextextended(%s || current_schema() || ' ' || %s, 0))",
                              (INSTANCE_LOCK, self.instance_id)).fetchone()
        if not row or not row[0]:
            raise StoreError(f"instance id {self.instance_id!r} is in use by another running gateway on this"
                             " journal: give each instance its own ([store] instance_id)")
        session.execute(
            "INSERT INTO instance (instance_id, host, pid, started_at, heartbeat_at)"
            f" VALUES (%s, %s, %s, {DB_NOW}, {DB_NOW}) ON CONFLICT (instance_id) DO UPDATE SET host = EXCLUDED.host,"
            " pid = EXCLUDED.pid, started_at = EXCLUDED.started_at, heartbeat_at = EXCLUDED.heartbeat_at",
            (self.instance_id, socket.gethostname()[:255], os.getpid()),
        )

    async def _serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        with anyio.CancelScope(shield=True):  # drains every queued write, as in the SQLite store
            await self._committer.run(task_status=task_status)

    async def _heartbeats(self) -> None:
        while True:
            await anyio.sleep(self.heartbeat_interval)
            try:
                await anyio.to_thread.run_sync(self._beat, limiter=self._session_limiter)
            except (psycopg.Error, StoreError) as exc:
                log.warning("journal heartbeat of instance %s failed: %s", self.instance_id, exc)

    def _beat(self) -> None:
        session = self._session
        if session is None or session.closed or session.broken:
            if session is not None:
                session.close()
            self._session = session = self._connection()
            self._lock_instance(session)  # the old connection's lock went with it
        session.execute(f"UPDATE instance SET heartbeat_at = {DB_NOW} WHERE instance_id = %s",
                        (self.instance_id,))

    async def heartbeat(self) -> None:
        """Beat now (tests; the store beats every `heartbeat_interval` by itself)."""
        await anyio.to_thread.run_sync(self._beat, limiter=self._session_limiter)

    async def _disconnect(self) -> None:
        writer, session, pool = self._writer, self._session, self._pool
        self._writer = self._session = self._pool = None

        def close_all() -> None:
            if pool is not None:
                pool.close()
            if session is not None and not session.closed:
                with suppress(psycopg.Error):
                    # stopped: what it left pending is for the live instances now, without waiting
                    session.execute("UPDATE instance SET heartbeat_at = 0 WHERE instance_id = %s", (self.instance_id,))
                    # unlocked before the close returns: the server ends a closed session's backend (and
                    # frees its locks) only some time after the client has gone, so a restart under the
                    # same id could be refused as "in use"
                    session.execute("SELECT pg_advisory_unlock_all()")
                session.close()
            if writer is not None:
                writer.close()

        with anyio.CancelScope(shield=True):  # a read in progress returns its connection, then it is closed
            await anyio.to_thread.run_sync(close_all, limiter=self._session_limiter)

    # --- plumbing ----------------------------------------------------------------------------------

    def _writer_connection(self) -> Conn:
        conn = self._writer
        if conn is None:
            raise StoreClosed("the store is closed")
        if conn.closed or conn.broken:  # the server restarted or the network broke: one new try per batch
            conn.close()
            self._writer = conn = self._connection()
            self._prepare_writer(conn)  # session settings: the new session needs them too
        return conn

    def _apply_batch(self, writes: Sequence[Write[Conn]]) -> None:
        """Commit thread: the batch in one pipelined transaction (one round trip for the money path's
        writes); if the database refuses one write, again with a savepoint per write."""
        try:
            conn = self._writer_connection()
        except (psycopg.Error, StoreError) as exc:
            failure = exc if isinstance(exc, StoreError) else StoreIOError(f"journal unreachable: {exc}")
            for write in writes:
                write.result, write.error = None, failure
            return
        try:
            finishers = self._pipelined(conn, writes)
        except psycopg.Error as exc:
            if conn.broken or conn.closed:  # the connection is gone: nothing of the batch was committed
                self._fail_all(conn, writes, exc)
                return
            # a write the database refused, or a deadlock / statement timeout: undo, then write by write
            self._rollback(conn)
            self.batches_failed_over += 1
            try:
                self._one_by_one(conn, writes)
            except psycopg.Error as again:
                self._fail_all(conn, writes, again)
                return
        else:
            for write, finish in zip(writes, finishers, strict=True):
                try:
                    write.result = finish()
                except StoreError as err:
                    write.error = err
                except Exception as err:  # a bug in a finisher fails its write, not the batch
                    write.error = _wrap(err)
        if any(write.op in _SAF_OPS for write in writes):
            try:
                self._depth_after_commit = _count_open_saf(conn)
            except psycopg.Error:
                self._depth_after_commit = None

    @staticmethod
    def _pipelined(conn: Conn, writes: Sequence[Write[Conn]]) -> list[Finisher]:
        finishers: list[Finisher] = []
        with conn.pipeline():
            conn.execute(_BEGIN)
            for write in writes:
                try:
                    finishers.append(write.op(conn, *write.args))
                except psycopg.Error:
                    raise
                except StoreError as err:  # the machine refused before this op wrote anything
                    finishers.append(_raiser(err))
            conn.execute("COMMIT")
        return finishers

    @staticmethod
    def _one_by_one(conn: Conn, writes: Sequence[Write[Conn]]) -> None:
        conn.execute(_BEGIN)
        for write in writes:
            conn.execute("SAVEPOINT w")
            try:
                write.result = write.op(conn, *write.args)()
                conn.execute("RELEASE SAVEPOINT w")
            except psycopg.Error as exc:
                if conn.broken or conn.closed or isinstance(exc, _TRANSACTION_LOST):
                    raise  # the whole transaction is lost: every write of the batch fails
                conn.execute("ROLLBACK TO SAVEPOINT w")
                write.result, write.error = None, _db_error(exc)
            except StoreError as err:
                conn.execute("ROLLBACK TO SAVEPOINT w")
                write.result, write.error = None, err
        conn.execute("COMMIT")

    @staticmethod
    def _rollback(conn: Conn) -> None:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            with suppress(psycopg.Error):
                conn.execute("ROLLBACK")

    def _fail_all(self, conn: Conn, writes: Sequence[Write[Conn]], exc: BaseException) -> None:
        self._rollback(conn)
        failure = StoreIOError(f"journal commit failed: {exc}")
        for write in writes:
            write.result, write.error = None, failure

    def _after_batch(self) -> None:
        depth, self._depth_after_commit = self._depth_after_commit, None
        if depth is not None:
            self._observer.saf_depth(depth)

    async def _read(self, fn: Callable[[Conn], T]) -> T:
        pool, limiter = self._pool, self._read_limiter
        if pool is None or limiter is None:
            raise StoreClosed("the store is not open")
        await self._committer.flush()  # read this process's writes, `record_outcome_soon`'s included

        def run() -> T:
            with pool.connection() as conn:
                return fn(conn)

        try:
            return await anyio.to_thread.run_sync(run, limiter=limiter)
        except psycopg.Error as exc:
            raise StoreIOError(f"journal read failed: {exc}") from exc

    @property
    def committer(self) -> GroupCommitter[Conn]:
        """The group committer (its `commits` / `writes` counters show the batching)."""
        return self._committer

    @property
    def writer_connection(self) -> Conn | None:
        """The commit thread's connection (tests trace its protocol to count round trips)."""
        return self._writer

    def fingerprint(self, pan: str) -> str:
        if self._pan_key is None:
            raise InvalidRecord("the store was opened without a PAN fingerprint key", field="pan_key")
        return pan_fingerprint(self._pan_key, pan)

    # --- journal writes ----------------------------------------------------------------------------

    async def record_request(self, rec: TxnRequest) -> int:
        if not isinstance(rec, TxnRequest) or isinstance(rec, TxnRecord):
            raise InvalidRecord("expected a TxnRequest", field="record")
        now = self._clock()
        values = (*(getattr(rec, c) for c in REQUEST_COLUMNS), TxnState.PENDING, now, now, self.instance_id)
        return await self._write(_op_record_request, values, rec)

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
        return await self._write(_op_queue_reversal, txn_id, check_reason(reason), outcome, rc, auth_code, rrn,
                                 who, not_before, self._clock())

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
        return await self._write(_op_record_late_answer, txn_id, rc, authenticated, unknown_rc, auth_code, rrn,
                                 host_mti, host_stan, terminal_id, amount, self._clock())

    def record_refusal_soon(self, rec: RefusalRecord, *, on_error: Callable[[BaseException], None]) -> None:
        if not isinstance(rec, RefusalRecord) or isinstance(rec, Refusal):
            raise InvalidRecord("expected a RefusalRecord", field="record")
        values = (*(getattr(rec, c) for c in REFUSAL_RECORD_COLUMNS), self._clock())
        self._committer.submit_soon(_op_record_refusal, values, self._max_refusals, on_error=on_error)

    # --- journal reads -----------------------------------------------------------------------------

    async def get(self, txn_id: int) -> TxnRecord | None:
        check_id(txn_id, "txn_id")
        return await self._read(lambda c: _one_txn(c, "txn_id = %s", (txn_id,)))

    async def search(self, query: TxnQuery, *, limit: int = 100) -> list[TxnRecord]:
        check_limit(limit)
        where, params = _and("true", [], **query.equalities())
        where, params = _between(where, params, "created_at", query.since, query.until)
        return await self._read(lambda c: _txns(c, f"{where} ORDER BY txn_id DESC LIMIT %s", (*params, limit)))

    async def refusals(
        self, *, terminal_id: str | None = None, pan_fingerprint: str | None = None, rc: str | None = None,
        since: float | None = None, until: float | None = None, limit: int = 100,
    ) -> list[Refusal]:
        check_limit(limit)
        where, params = _and("true", [], terminal_id=terminal_id, pan_fingerprint=pan_fingerprint, rc=rc)
        where, params = _between(where, params, "refused_at", since, until)

        def query(conn: Conn) -> list[Refusal]:
            rows = conn.execute(
                f"SELECT {', '.join(REFUSAL_COLUMNS)} FROM refusal WHERE {where}"
                " ORDER BY refusal_id DESC LIMIT %s", (*params, limit),
            ).fetchall()
            return [Refusal(**dict(zip(REFUSAL_COLUMNS, r, strict=True))) for r in rows]

        return await self._read(query)

    async def saf_for_txn(self, txn_id: int) -> SafEntry | None:
        check_id(txn_id, "txn_id")
        found = await self._read(lambda c: _safs(c, "s.txn_id = %s", (txn_id,)))
        return found[0] if found else None

    async def find_original(self, terminal_id: str, batch: str, stan: str) -> TxnRecord | None:
        return await self._read(lambda c: _one_txn(
            c, "terminal_id = %s AND batch = %s AND terminal_stan = %s AND kind <> 'reversal'",
            (terminal_id, batch, stan),
        ))

    async def find_by_rrn(self, rrn: str, *, terminal_id: str | None = None) -> TxnRecord | None:
        where, params = _and("rrn = %s", [rrn], terminal_id=terminal_id)
        return await self._read(lambda c: _one_txn(c, f"{where} ORDER BY txn_id DESC LIMIT 1", params))

    async def find_by_host_stan(
        self, host_stan: str, *, transmission_datetime: str | None = None, terminal_id: str | None = None
    ) -> TxnRecord | None:
        where, params = _and("host_stan = %s", [host_stan], transmission_datetime=transmission_datetime,
                             terminal_id=terminal_id)
        return await self._read(lambda c: _one_txn(c, f"{where} ORDER BY txn_id DESC LIMIT 1", params))

    async def find_referencing(self, orig_txn_id: int) -> list[TxnRecord]:
        check_id(orig_txn_id, "orig_txn_id")
        return await self._read(lambda c: _txns(c, "orig_txn_id = %s ORDER BY txn_id", (orig_txn_id,)))

    async def find_by_fingerprint(self, fingerprint: str, *, limit: int = 50) -> list[TxnRecord]:
        check_limit(limit)
        if not fingerprint:
            return []
        return await self._read(lambda c: _txns(
            c, "pan_fingerprint = %s AND pan_fingerprint <> '' ORDER BY txn_id DESC LIMIT %s", (fingerprint, limit),
        ))

    async def unknown_outcomes(self) -> list[TxnRecord]:
        return await self._read(lambda c: _txns(c, "state = 'pending' AND owner = %s ORDER BY txn_id",
                                                (self.instance_id,)))

    async def claim_orphaned_pending(self, stale_after: float) -> list[TxnRecord]:
        if isinstance(stale_after, bool) or not isinstance(stale_after, int | float) or not stale_after > 0:
            raise InvalidRecord("expected a positive number of seconds", field="stale_after")
        return await self._write(_op_claim_orphans, self.instance_id, float(stale_after))

    async def settlement_totals(self, terminal_id: str, batch: str) -> SettlementTotals:
        def query(conn: Conn) -> SettlementTotals:
            rows = conn.execute(
                "SELECT kind, card_org, count(*), coalesce(sum(amount), 0) FROM txn"
                " WHERE terminal_id = %s AND batch = %s AND kind <> 'reversal' AND state = %s"
                f" AND kind IN ({_SETTLED_KINDS}) GROUP BY kind, card_org",
                (terminal_id, batch, TxnState.COMPLETED),
            ).fetchall()
            return totals_from_groups((k, o, int(n), int(a)) for k, o, n, a in rows)

        return await self._read(query)

    async def purchase_totals_since(self, since: float) -> dict[str, int]:
        def query(conn: Conn) -> dict[str, int]:
            rows = conn.execute(
                "SELECT terminal_id, sum(amount) FROM txn WHERE created_at >= %s AND kind = %s AND state = %s"
                " GROUP BY terminal_id", (since, TxnKind.PURCHASE, TxnState.COMPLETED),
            ).fetchall()
            return {tid: int(total) for tid, total in rows}

        return await self._read(query)

    async def list_transactions(
        self, *, terminal_id: str | None = None, batch: str | None = None,
        state: TxnState | str | None = None, limit: int = 100,
    ) -> list[TxnRecord]:
        check_limit(limit)
        wanted = None if state is None else parse_enum(TxnState, state, "state")
        where, params = _and("true", [], terminal_id=terminal_id, batch=batch, state=wanted)
        return await self._read(lambda c: _txns(c, f"{where} ORDER BY txn_id DESC LIMIT %s", (*params, limit)))

    async def late_answers(self, *, txn_id: int | None = None, limit: int = 100) -> list[LateAnswer]:
        check_limit(limit)
        where, params = _and("true", [], txn_id=txn_id)

        def query(conn: Conn) -> list[LateAnswer]:
            rows = conn.execute(
                f"SELECT {', '.join(LATE_COLUMNS)} FROM late_answer WHERE {where}"
                " ORDER BY late_id DESC LIMIT %s", (*params, limit),
            ).fetchall()
            return [LateAnswer(**dict(zip(LATE_COLUMNS, r, strict=True))) for r in rows]

        return await self._read(query)

    # --- store and forward -------------------------------------------------------------------------

    async def due_reversals(self, now: float, limit: int = 64) -> list[SafEntry]:
        check_limit(limit)
        # a write (it claims): queued behind this process's earlier writes, so it never sees an older view
        return await self._write(_op_claim_due, self.instance_id, now, limit, self.lease)

    async def record_reversal_ident(self, saf_id: int, stan: str, transmission_datetime: str) -> tuple[str, str]:
        check_id(saf_id, "saf_id")
        check_ident(stan, transmission_datetime)
        return await self._write(_op_reversal_ident, self.instance_id, saf_id, stan, transmission_datetime,
                                 self._clock())

    async def mark_reversal_attempt(self, saf_id: int, now: float, next_attempt_at: float, error: str) -> int:
        check_id(saf_id, "saf_id")
        return await self._write(_op_mark_attempt, self.instance_id, saf_id, now, next_attempt_at,
                                 clip_text(error, "error"), self._clock())

    async def ack_reversal(self, saf_id: int, rc: str, *, attempt_at: float | None = None) -> bool:
        check_id(saf_id, "saf_id")
        check_rc(rc)
        return await self._write(_op_ack, saf_id, rc, attempt_at, self._clock())

    async def park_reversal(self, saf_id: int, reason: str, *, final_attempt_at: float | None = None) -> None:
        check_id(saf_id, "saf_id")
        await self._write(_op_park, self.instance_id, saf_id, clip_text(reason, "reason", required=True),
                          final_attempt_at, self._clock())

    async def list_saf(self, state: SafState | str | None = None, *, limit: int = 1000) -> list[SafEntry]:
        check_limit(limit)
        if state is None:
            return await self._read(lambda c: _safs(c, "true ORDER BY s.saf_id LIMIT %s", (limit,)))
        wanted = parse_enum(SafState, state, "state")
        return await self._read(lambda c: _safs(c, "s.state = %s ORDER BY s.saf_id LIMIT %s", (wanted, limit)))

    async def get_saf(self, saf_id: int) -> SafEntry | None:
        check_id(saf_id, "saf_id")
        found = await self._read(lambda c: _safs(c, "s.saf_id = %s", (saf_id,)))
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
        def query(conn: Conn) -> SafSummary:
            counts = {SafState.PENDING: (0, None), SafState.PARKED: (0, None)}
            for state, n, oldest in conn.execute(
                "SELECT state, count(*), min(queued_at) FROM saf WHERE state IN (%s, %s) GROUP BY state",
                (SafState.PENDING, SafState.PARKED),
            ).fetchall():
                counts[SafState(state)] = (int(n), oldest)
            pending, oldest_pending = counts[SafState.PENDING]
            return SafSummary(pending, counts[SafState.PARKED][0], oldest_pending)

        return await self._read(query)


def _count_open_saf(conn: Conn) -> int:
    row = conn.execute(f"SELECT count(*) FROM saf WHERE {_OPEN_SAF}").fetchone()
    return int(row[0]) if row else 0


def _raiser(error: StoreError) -> Finisher:
    def finish() -> None:
        raise error

    return finish


def _and(base: str, params: list[object], **optional: object) -> tuple[str, list[object]]:
    """`base` plus `AND column = %s` for every optional filter that is given."""
    where = base
    for column, value in optional.items():
        if value is not None:
            where += f" AND {column} = %s"
            params.append(value)
    return where, params


def _between(where: str, params: list[object], column: str, since: float | None,
             until: float | None) -> tuple[str, list[object]]:
    if since is not None:
        where += f" AND {column} >= %s"
        params.append(since)
    if until is not None:
        where += f" AND {column} < %s"
        params.append(until)
    return where, params


def _wrap(exc: Exception) -> StoreError:
    error = StoreError(f"journal write failed: {type(exc).__name__}")
    error.__cause__ = exc
    return error
