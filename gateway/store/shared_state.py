"""What several gateway instances on one PostgreSQL database share besides the journal: terminal sessions
with their working keys, the day's risk-limit usage and host STANs (tables of `pg_migrations` step 2).

CUP terminals open a new connection per transaction and a TCP load balancer spreads them, so a terminal
signs in on one instance and buys on another. Each piece keeps the hot path free of round trips where
it can be exact without one:

- **Sessions** (`SharedSessions`): each instance answers `get` from its own cache; a sign-in, sign-off or
  batch change is written to `terminal_session` (working keys sealed under the LMK) before the terminal
  gets its answer, and announced with NOTIFY, so the other instances drop their stale copy within
  milliseconds. A request that the cached copy would refuse (unknown terminal, other batch, MAC failure
  after a re-sign-in elsewhere) makes the service `refresh` from the table first: one round trip, only
  then. So a terminal's first request on an instance costs one read, the others none.
- **Daily limits** (`SharedLimits`): a purchase reserves its amount with one conditional upsert
  (`... DO UPDATE SET used = used + x WHERE used + x <= cap RETURNING used`): the row lock serialises two
  instances, so they can never both approve past the cap. One single-row autocommit statement, apart
  from the journal's batches: it can never deadlock with them. That is the one extra round trip a
  purchase pays on PostgreSQL. Releases (no money moved) are written in the background.
- **Host STANs** (`BlockStanAllocator`): a sequence hands out blocks of 1,000 (block k is k*1000 ..
  k*1000+999, STAN 0 excluded, CYCLE wraps after 999999); the next block is fetched in the background
  when the current one runs low, so `next()` stays a few instructions.

`share_state` puts them in place of the in-process ones (`gateway.core.state`) when `[store] url` is
set; every call runs psycopg's sync API in a worker thread, as the PostgreSQL store does, so it works
under asyncio and trio alike.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, TypeVar

import anyio
import anyio.abc
import psycopg
from anyio.streams.memory import MemoryObjectSendStream
from psycopg import sql
from psycopg_pool import ConnectionPool

from gateway.config import GatewayConfig, LimitsConfig
from gateway.core.limits import RC_LIMIT_EXCEEDED
from gateway.core.sessions import TerminalSession, next_batch
from gateway.iso.stan import STAN_MAX, STAN_MIN, StanAllocator
from gateway.security.errors import SecurityError
from gateway.security.keys import WORKING_USAGES
from gateway.security.keystore import LocalMasterKey, load_lmk
from gateway.security.module import SecurityModule, SoftwareSecurityModule
from gateway.security.working_keys import install_working_keys, seal_working_keys
from gateway.store.errors import StoreError, StoreIOError

log = logging.getLogger("gateway.store.shared")

T = TypeVar("T")
Conn = psycopg.Connection[Any]

STAN_BLOCK: Final = 1000
#: STANs left in the current block when the next one is fetched (a round trip is well under a
#: millisecond; this many STANs last longer than that at any rate one instance reaches)
STAN_LOW_WATER: Final = 500
#: how long one wait of the notification thread lasts (also the longest a shutdown waits for it)
NOTICE_WAIT: Final = 0.25

_SESSION_SIGN_IN: Final = (
    "WITH up AS (INSERT INTO terminal_session (terminal_id, merchant_id, batch, key_mode, generation, working_keys,"
    " instance_id, updated_at) VALUES (%s, %s, %s, %s, nextval('session_generation'), %s, %s, %s)"
    " ON CONFLICT (terminal_id) DO UPDATE SET merchant_id = EXCLUDED.merchant_id, batch = EXCLUDED.batch,"
    " key_mode = EXCLUDED.key_mode, generation = EXCLUDED.generation, working_keys = EXCLUDED.working_keys,"
    " instance_id = EXCLUDED.instance_id, updated_at = EXCLUDED.updated_at RETURNING generation)"
    " SELECT generation, pg_notify(%s, %s || ' ' || generation) FROM up"
)
_SESSION_BATCH: Final = (
    "WITH up AS (UPDATE terminal_session SET batch = %s, generation = nextval('session_generation'),"
    " instance_id = %s, updated_at = %s WHERE terminal_id = %s AND batch = %s RETURNING generation)"
    " SELECT generation, pg_notify(%s, %s || ' ' || generation) FROM up"
)
#: a sign-off takes a generation too: an older notice never drops a newer sign-in
_SESSION_SIGN_OFF: Final = (
    "WITH gone AS (DELETE FROM terminal_session WHERE terminal_id = %s RETURNING 1)"
    " SELECT pg_notify(%s, %s || ' ' || nextval('session_generation') || ' off') FROM gone"
)
_SESSION_GET: Final = ("SELECT merchant_id, batch, key_mode, generation, working_keys FROM terminal_session"
                       " WHERE terminal_id = %s")
_RESERVE: Final = (
    "INSERT INTO risk_usage (terminal_id, day, used) SELECT %(t)s, %(d)s, %(a)s WHERE %(a)s <= %(cap)s"
    " ON CONFLICT (terminal_id, day) DO UPDATE SET used = risk_usage.used + EXCLUDED.used"
    " WHERE risk_usage.used + EXCLUDED.used <= %(cap)s RETURNING used"
)
_RELEASE: Final = "UPDATE risk_usage SET used = greatest(0, used - %s) WHERE terminal_id = %s AND day = %s"


def _release(conn: Conn, *, terminal_id: str, amount: int, day: str) -> None:
    conn.execute(_RELEASE, (amount, terminal_id, day))


_SEED: Final = "INSERT INTO risk_usage (terminal_id, day, used) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING"


class SharedDatabase:
    """The shared state's connections: a small pool of autocommit connections (one statement per call)
    and the connection that LISTENs for session changes."""

    def __init__(self, url: str, *, pool_size: int = 4, connect_timeout: float = 10.0) -> None:
        self.url = url
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._pool: ConnectionPool[Conn] | None = None
        self._limiter = anyio.CapacityLimiter(pool_size)
        self._listener: Conn | None = None
        #: NOTIFY channels are per database, not per schema: the schema's own (tests share a database)
        self.channel = ""
        #: calls made (each one round trip): the figures the tests and benches report
        self.calls = 0

    async def open(self) -> None:
        try:
            await anyio.to_thread.run_sync(self._open)
        except psycopg.Error as exc:
            await self.close()
            raise StoreIOError(f"cannot open the shared state on PostgreSQL: {exc}") from exc

    def _open(self) -> None:
        self._pool = ConnectionPool(self.url, min_size=1, max_size=self._pool_size, open=False,
                                    kwargs={"autocommit": True}, timeout=self._connect_timeout,
                                    name="shared-state")
        self._pool.open(wait=True, timeout=self._connect_timeout)
        with self._pool.connection() as conn:
            row = conn.execute("SELECT current_schema()").fetchone()
        schema = str(row[0]) if row else "public"
        self.channel = "gw_sessions_" + hashlib.sha256(schema.encode()).hexdigest()[:16]

    @property
    def listener(self) -> Conn | None:
        return self._listener

    def listen(self) -> Conn:
        """(thread) The listening connection, (re)connected and LISTENing."""
        conn = self._listener
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                conn.close()
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, int(self._connect_timeout)))
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
            self._listener = conn
        return conn

    async def close(self) -> None:
        pool, listener = self._pool, self._listener
        self._pool = self._listener = None

        def close_all() -> None:
            if pool is not None:
                pool.close()
            if listener is not None:
                listener.close()

        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(close_all)

    def call_sync(self, fn: Callable[[Conn], T]) -> T:
        pool = self._pool
        if pool is None:
            raise StoreError("the shared state is closed")
        self.calls += 1
        try:
            with pool.connection() as conn:
                return fn(conn)
        except psycopg.Error as exc:
            raise StoreIOError(f"shared state on PostgreSQL failed: {exc}") from exc

    async def call(self, fn: Callable[[Conn], T]) -> T:
        return await anyio.to_thread.run_sync(self.call_sync, fn, limiter=self._limiter)


# --- sessions --------------------------------------------------------------------------------------


class SharedSessions:
    """`gateway.core.state.Sessions` on PostgreSQL, with a cache per instance (see the module's text)."""

    def __init__(self, db: SharedDatabase, security: SoftwareSecurityModule, lmk: LocalMasterKey,
                 instance_id: str) -> None:
        self.db = db
        self.security = security
        self.lmk = lmk
        self.instance_id = instance_id
        self._cache: dict[str, TerminalSession] = {}
        self._generation: dict[str, int] = {}
        self.get = self._cache.get  # the hot path: the dict lookup itself
        #: refreshes that found a newer shared copy (a terminal that came from another instance)
        self.taken_over = 0

    def __len__(self) -> int:
        return len(self._cache)

    def _keep(self, session: TerminalSession, generation: int) -> TerminalSession:
        self._cache[session.terminal_id] = session
        self._generation[session.terminal_id] = generation
        return session

    def _forget(self, terminal_id: str, *, keys: bool) -> None:
        self._cache.pop(terminal_id, None)
        self._generation.pop(terminal_id, None)
        if keys:
            self.security.store.remove(WORKING_USAGES, terminal_id, save=False)

    async def sign_in(self, terminal_id: str, merchant_id: str, batch: str, key_mode: str) -> TerminalSession:
        sealed = seal_working_keys(self.security, terminal_id, self.lmk)
        args = (terminal_id, merchant_id, batch, key_mode, sealed, self.instance_id, time.time(), self.db.channel,
                terminal_id)
        try:
            row = await self.db.call(lambda c: c.execute(_SESSION_SIGN_IN, args).fetchone())
        except BaseException:
            # the terminal gets no approval of this sign-in: keys nobody else knows must not verify anything
            self._forget(terminal_id, keys=True)
            raise
        assert row is not None
        return self._keep(TerminalSession(terminal_id, merchant_id, batch, key_mode), int(row[0]))

    async def sign_off(self, terminal_id: str) -> None:
        self._forget(terminal_id, keys=False)  # the service drops the keys
        await self.db.call(lambda c: c.execute(_SESSION_SIGN_OFF, (terminal_id, self.db.channel, terminal_id)))

    async def close_batch(self, terminal_id: str) -> str | None:
        session = self._cache.get(terminal_id)
        if session is None and await self.refresh(terminal_id):
            session = self._cache.get(terminal_id)
        if session is None:
            return None
        new = next_batch(session.batch)
        args = (new, self.instance_id, time.time(), terminal_id, session.batch, self.db.channel, terminal_id)
        row = await self.db.call(lambda c: c.execute(_SESSION_BATCH, args).fetchone())
        if row is None:  # moved on (or signed off) elsewhere meanwhile: the shared copy says where it is
            await self.refresh(terminal_id)
            current = self._cache.get(terminal_id)
            return current.batch if current is not None else None
        return self._keep(TerminalSession(terminal_id, session.merchant_id, new, session.key_mode), int(row[0])).batch

    async def refresh(self, terminal_id: str) -> bool:
        before = self._generation.get(terminal_id)  # what the caller saw
        row = await self.db.call(lambda c: c.execute(_SESSION_GET, (terminal_id,)).fetchone())
        if row is None:
            known = terminal_id in self._cache
            self._forget(terminal_id, keys=known)
            return known
        merchant_id, batch, key_mode, generation, sealed = row
        if self._generation.get(terminal_id) == generation:
            return before != generation  # a concurrent refresh of the same terminal may have installed it
        try:
            install_working_keys(self.security, terminal_id, bytes(sealed), self.lmk)
        except SecurityError as exc:
            log.error("the shared working keys of terminal %s cannot be used here: %s", terminal_id, exc)
            self._forget(terminal_id, keys=True)
            return False
        self._keep(TerminalSession(terminal_id, str(merchant_id), str(batch), str(key_mode)), int(generation))
        self.taken_over += 1
        return True

    def notice(self, payload: str) -> None:
        """Another instance (or this one) changed a session: drop a copy older than the change."""
        parts = payload.split()
        if len(parts) < 2 or not parts[1].isdigit():
            return
        terminal_id, generation = parts[0], int(parts[1])
        mine = self._generation.get(terminal_id)
        if mine is not None and mine < generation:
            self._forget(terminal_id, keys=parts[2:] == ["off"])

    def forget_all(self) -> None:
        """Notices may have been missed (the listening connection broke): every copy is suspect."""
        self._cache.clear()
        self._generation.clear()

    async def listen(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await anyio.to_thread.run_sync(self.db.listen)
        task_status.started()
        while True:
            try:
                payloads = await anyio.to_thread.run_sync(self._wait_notices)
            except psycopg.Error as exc:
                log.warning("session notices from PostgreSQL lost (%s): every cached session is read again", exc)
                self.forget_all()
                await anyio.sleep(NOTICE_WAIT)
                with contextlib.suppress(psycopg.Error):
                    await anyio.to_thread.run_sync(self.db.listen)
                continue
            for payload in payloads:
                self.notice(payload)

    def _wait_notices(self) -> list[str]:
        conn = self.db.listener
        if conn is None or conn.closed or conn.broken:  # reconnected later, after every copy is dropped
            raise psycopg.OperationalError("the listening connection is gone")
        return [n.payload for n in conn.notifies(timeout=NOTICE_WAIT)]


# --- daily limits ----------------------------------------------------------------------------------


class SharedLimits:
    """`gateway.core.state.Limits` on PostgreSQL: the day's usage per terminal in `risk_usage`."""

    def __init__(self, db: SharedDatabase, config: LimitsConfig) -> None:
        self.db = db
        self.config = config
        self._used: dict[str, int] = {}  #: the usage as last seen by this instance (`used`)
        #: releases for `run` to write (open while it runs)
        self._send: MemoryObjectSendStream[tuple[str, int, str]] | None = None
        #: releases the database has not taken (the usage stays counted: refusals come earlier, never later)
        self.releases_lost = 0

    async def reserve(self, terminal_id: str, amount: int, day: str) -> str | None:
        if amount > self.config.per_transaction:
            return RC_LIMIT_EXCEEDED
        params = {"t": terminal_id, "d": day, "a": amount, "cap": self.config.per_day}
        row = await self.db.call(lambda c: c.execute(_RESERVE, params).fetchone())
        if row is None:
            return RC_LIMIT_EXCEEDED
        self._used[terminal_id] = int(row[0])
        return None

    def release(self, terminal_id: str, amount: int, day: str) -> None:
        self._used[terminal_id] = max(0, self._used.get(terminal_id, 0) - amount)
        try:
            if self._send is None:
                raise anyio.ClosedResourceError
            self._send.send_nowait((terminal_id, amount, day))
        except anyio.ClosedResourceError:  # not running (stopping): the usage stays counted
            self.releases_lost += 1

    def seed(self, day: str, totals: dict[str, int]) -> None:
        """Today's completed purchases from the journal, for terminals the table has no row of yet (the
        first instance to start on a day seeds it; the rows then count every reservation)."""
        self._seed = [(terminal_id, day, amount) for terminal_id, amount in totals.items()]

    async def write_seed(self) -> None:
        rows = getattr(self, "_seed", [])
        if rows:
            await self.db.call(lambda c: c.cursor().executemany(_SEED, rows))

    def used(self, terminal_id: str) -> int:
        return self._used.get(terminal_id, 0)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        send, receive = anyio.create_memory_object_stream[tuple[str, int, str]](math.inf)
        self._send = send
        task_status.started()
        with send, receive:
            async for terminal_id, amount, day in receive:
                try:
                    await self.db.call(functools.partial(_release, terminal_id=terminal_id, amount=amount, day=day))
                except StoreError as exc:
                    self.releases_lost += 1
                    log.warning("risk-limit release of terminal %s not written (%s): its usage stays counted",
                                terminal_id, exc)


# --- host STANs --------------------------------------------------------------------------------------


def block_range(block: int) -> tuple[int, int]:
    """The first and last STAN of sequence value `block` (0..999)."""
    return max(STAN_MIN, block * STAN_BLOCK), min(STAN_MAX, block * STAN_BLOCK + STAN_BLOCK - 1)


def fetch_stan_block(conn: Conn) -> int:
    row = conn.execute("SELECT nextval('host_stan_block')").fetchone()
    assert row is not None
    return int(row[0])


class BlockStanAllocator(StanAllocator):
    """STANs from blocks that no other instance holds (see the module's text). `next()` never waits: the
    next block is fetched in the background (`run`) once the current one is half used; should it not
    have arrived when the block runs out, it is fetched right there (counted in `blocking_fetches`)."""

    __slots__ = ("_asked", "_db", "_end", "_next", "_spare", "_want", "blocking_fetches", "blocks")

    def __init__(self, db: SharedDatabase) -> None:
        super().__init__()
        self._db = db
        self._next = self._end = 0  # empty until `prime`
        self._spare: int | None = None
        self._asked = False
        self._want = anyio.Event()
        self.blocking_fetches = 0
        self.blocks = 0  #: blocks taken

    async def prime(self) -> None:
        self._start(await self._db.call(fetch_stan_block))

    def _start(self, block: int) -> None:
        self._next, self._end = block_range(block)
        self.blocks += 1

    def next(self) -> int:
        stan = self._next
        if stan > self._end:
            spare, self._spare = self._spare, None
            if spare is None:
                self.blocking_fetches += 1
                spare = self._db.call_sync(fetch_stan_block)
            self._start(spare)
            self._asked = False
            stan = self._next
        self._next = stan + 1
        self._last = stan
        if not self._asked and self._spare is None and self._end - stan < STAN_LOW_WATER:
            self._asked = True
            self._want.set()
        return stan

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._want.wait()
            self._want = anyio.Event()
            try:
                block = await self._db.call(fetch_stan_block)
            except StoreError as exc:
                log.warning("next host STAN block not fetched (%s): trying again", exc)
                self._asked = False
                await anyio.sleep(0.1)
                continue
            if self._spare is None:
                self._spare = block
            else:  # cannot happen (asked only without a spare); the block would be wasted, never reused
                log.warning("host STAN block %s fetched twice over: left unused", block)


# --- assembly ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class SharedState:
    db: SharedDatabase
    stans: BlockStanAllocator
    limits: SharedLimits
    sessions: SharedSessions | None  #: None: sessions stay per instance (no LMK, or not a software module)
    notes: list[str] = field(default_factory=list)


def _lmk_for(config: GatewayConfig, security: SecurityModule) -> LocalMasterKey | None:
    if not isinstance(security, SoftwareSecurityModule):
        log.warning("the security module is not the software one: terminal sessions stay per instance")
        return None
    try:
        lmk = load_lmk(config.security.lmk_file)
    except SecurityError as exc:
        log.warning("no LMK to seal shared working keys under (%s): terminal sessions stay per instance, a "
                    "terminal must sign in on each instance it reaches", exc)
        return None
    check = security.store.lmk_check
    if check is not None and check != lmk.check:
        raise StoreError("the LMK given does not open this instance's key store: shared working keys need the "
                         "key store's own LMK")
    return lmk


async def share_state(config: GatewayConfig, store: Any, security: SecurityModule, service: Any, link: Any, *,
                      instance_id: str,
                      task_status: anyio.abc.TaskStatus[SharedState] = anyio.TASK_STATUS_IGNORED) -> None:
    """Put the shared sessions, limits and STAN blocks in place of the in-process ones of `service` and
    `link`, run their background tasks until cancelled, then close the connections."""
    db = SharedDatabase(config.store.url or "", pool_size=config.store.pool_size)
    await db.open()
    try:
        async with anyio.create_task_group() as tg:
            stans = BlockStanAllocator(db)
            await stans.prime()
            limits = SharedLimits(db, config.limits)
            midnight = datetime.now().replace(hour=0, minute=0, second=0, microsecond=0)
            limits.seed(midnight.strftime("%Y%m%d"), await store.purchase_totals_since(midnight.timestamp()))
            await limits.write_seed()
            lmk = _lmk_for(config, security)
            sessions = None
            if lmk is not None and isinstance(security, SoftwareSecurityModule):
                security.persist_working_keys = False  # they live on the database, not in each key store file
                sessions = SharedSessions(db, security, lmk, instance_id)
                await tg.start(sessions.listen)
                service.sessions = sessions
            link.stans = stans
            service.limits = limits
            await tg.start(stans.run)
            await tg.start(limits.run)
            task_status.started(SharedState(db, stans, limits, sessions))
            await anyio.sleep_forever()
    finally:
        await db.close()
