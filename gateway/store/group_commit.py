"""Group commit: many concurrent writers share one transaction and one fsync.

A writer `await`s `submit(op, *args)`. Its op joins the open batch. One long-lived commit thread of
our own applies the batches, oldest first: all the ops of a batch in one transaction (the backend's
`apply_batch`), one commit, then it hands the batch back to the event loop with a single call, which
wakes every waiter of the batch with its own result or exception and gives the thread the next batch.
While one batch is being committed the next one fills up, so under load the batch size grows by itself
and the commit rate, not the transaction rate, is bounded by the disk's sync time.

Why one thread, fed by a queue, rather than a worker-thread call per batch: one connection, used by
exactly one thread, so no locking and no "database is locked" between our own writers; and a batch
costs one queue `put` to reach the thread and one callback to come back, where a pool call costs a
capacity limiter, a checkpoint and the pool's own hand-offs (at low rates every write is its own batch,
so this is paid per write). The connection is opened in another thread, hence `check_same_thread=False`.

When the thread is idle, the first write of a new batch does not hand it over at once: its task first
lets the other runnable tasks run (one checkpoint), so writers woken together (a burst) share one
commit. With a `commit_delay` (PostgreSQL's idea of the same name) it waits that long instead, so that
at moderate rates, where writes trickle in one by one, several still share a commit: each commit costs
an fsync and two thread wake-ups, far more CPU than a write (bench/gateway.py at 800 txn/s: 2 ms of
delay took 17 % off the gateway's CPU per transaction, for 2 ms more latency per write). The delay is
paid only when the thread is idle; under load the batch fills while the previous one commits.

`submit_soon` is for a write nobody needs to wait for (a delivered approval's "completed": the
terminal has its answer already): it joins the open batch without leading it, so it rides along with
the next awaited write's commit instead of costing a commit of its own; if no other write comes, the
backstop commits it `soon_delay` later. Its failure goes to its `on_error`. `flush()` waits until
everything submitted so far is committed: the stores call it before every read, so a read in this
process always sees this process's writes.

Waiting is shielded from cancellation: once submitted, an op is applied or failed as a whole and its
caller learns which, then the cancellation is delivered (at the caller's next checkpoint). A caller
that gives up early could otherwise not know whether its journal row exists.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel

from gateway.store.base import NullObserver, StoreObserver
from gateway.store.errors import StoreClosed, StoreIOError

log = logging.getLogger("gateway.store")

C = TypeVar("C")  # the backend's connection type
T = TypeVar("T")

DEFAULT_MAX_BATCH = 512
#: a longer delay would be a latency bug, not a tuning choice
MAX_COMMIT_DELAY = 0.1
#: how long a `submit_soon` write may wait for another write's commit before it gets its own
DEFAULT_SOON_DELAY = 0.02


class Write(Generic[C]):
    """One op in a batch: `apply_batch` calls `op(conn, *args)` and sets exactly one of `result` /
    `error` on each write. The arguments travel apart from the function so that a backend can tell
    its kinds of op apart by `op` alone, and no closure or partial is built per write."""

    __slots__ = ("args", "error", "on_error", "op", "result")

    def __init__(self, op: Callable[..., Any], args: tuple[Any, ...],
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        self.op = op
        self.args = args
        self.result: Any = None
        self.error: BaseException | None = None
        #: set for a write nobody waits for (`submit_soon`): how its failure is reported
        self.on_error = on_error


class _Batch(Generic[C]):
    __slots__ = ("done", "writes")

    def __init__(self) -> None:
        self.writes: list[Write[C]] = []
        self.done = anyio.Event()


class _CommitThread(Generic[C]):
    """The thread that owns the connection: takes batches from `inbox` (None: stop) and reports each,
    applied or failed, with one `report(batch, seconds)` call scheduled on the event loop (without
    waiting for it to run)."""

    def __init__(
        self,
        apply_batch: Callable[[Sequence[Write[C]]], None],
        report: Callable[[_Batch[C], float], None],
        token: anyio.lowlevel.EventLoopToken,
    ) -> None:
        self.inbox: queue.SimpleQueue[_Batch[C] | None] = queue.SimpleQueue()
        self._apply_batch = apply_batch
        self._report = report
        self._token = token
        # a daemon, so that an event loop torn down without running `run`'s cleanup (which stops the
        # thread) cannot keep the process alive; `run` never returns while the thread holds a batch
        self._thread = threading.Thread(target=self._serve, name="journal-commit", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        inbox, apply_batch, report, token = self.inbox, self._apply_batch, self._report, self._token
        while True:
            batch = inbox.get()
            if batch is None:
                return
            started = time.perf_counter()
            try:
                apply_batch(batch.writes)
            except BaseException as exc:  # apply_batch is meant not to raise: fail the batch, keep serving
                log.exception("group commit failed")
                failure = StoreIOError(f"commit failed: {type(exc).__name__}")
                for write in batch.writes:
                    write.result, write.error = None, failure
            elapsed = time.perf_counter() - started
            # Scheduled, not waited for: the thread goes straight back to `inbox.get()`, and the report
            # is what puts the next batch there, so at most one batch is ever in the thread all the
            # same. (`anyio.from_thread.run_sync` would also park this thread on a Future per batch
            # until the loop has run the report: a lock and a wake-up per commit for nothing.)
            try:
                token.backend_class.run_sync_soon(report, (batch, elapsed), token.native_token)
            except anyio.RunFinishedError:  # the event loop is gone, and with it every waiter
                return
            except Exception:  # never die silently with a batch unreported: its writers would hang
                log.exception("could not report a committed batch to the event loop")


class GroupCommitter(Generic[C]):
    """`apply_batch(writes)` runs in the commit thread: it applies every op in one transaction,
    commits, and records per-write results/errors (an op's own failure must not fail the others); if
    the commit fails it sets an error on every write. `after_batch()` runs on the event loop after each
    batch, before the next one is handed to the thread."""

    def __init__(
        self,
        apply_batch: Callable[[Sequence[Write[C]]], None],
        *,
        observer: StoreObserver | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        after_batch: Callable[[], None] | None = None,
        commit_delay: float = 0.0,
        soon_delay: float = DEFAULT_SOON_DELAY,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if not 0.0 <= commit_delay <= MAX_COMMIT_DELAY:
            raise ValueError(f"commit_delay must be within 0..{MAX_COMMIT_DELAY} seconds")
        self._commit_delay = commit_delay
        self._soon_delay = soon_delay
        #: set when a `submit_soon` write waits in a batch nobody leads: the backstop task's cue
        self._soon_waiting = anyio.Event()
        self._apply_batch = apply_batch
        self._observer = observer or NullObserver()
        self._max_batch = max_batch
        self._after_batch = after_batch
        #: batches waiting for the thread, oldest first; only the last one still takes writes
        self._batches: deque[_Batch[C]] = deque()
        #: the batch the thread holds; at most one, so the thread never queues work the event loop
        #: could still fail on cancellation, and `after_batch` sees the state of its own batch
        self._in_flight: _Batch[C] | None = None
        self._leader_pending = False  # a writer is about to hand the oldest batch to the idle thread
        self._thread: _CommitThread[C] | None = None
        self._drained: anyio.Event | None = None
        self._accepting = False
        self._running = False
        self._closed = False
        #: totals since start, for tests and diagnostics
        self.commits = 0
        self.writes = 0

    @property
    def running(self) -> bool:
        return self._running

    async def submit(self, op: Callable[..., T], *args: Any) -> T:
        """Apply `op(conn, *args)` in the next group commit; its return value once durable, or its
        exception."""
        if not self._accepting:
            raise StoreClosed("the store is not open for writes")
        leader = False
        batch = self._open_batch()
        # the thread is idle and nobody is about to feed it (the open batch is new, or holds only
        # `submit_soon` writes): this write's task hands the oldest batch over, after a checkpoint or
        # the commit delay so that other writes can join
        if self._in_flight is None and not self._leader_pending:
            self._leader_pending = leader = True
        write: Write[C] = Write(op, args)
        batch.writes.append(write)
        try:
            if leader:
                try:
                    if self._commit_delay:
                        await anyio.sleep(self._commit_delay)
                    else:
                        await anyio.lowlevel.checkpoint()
                finally:  # cancelled while waiting or not: the batch must reach the thread
                    self._leader_handoff()
            await batch.done.wait()
        except anyio.get_cancelled_exc_class():
            # Cancelled with the write in the pipeline: learn its fate first. A shield only here, not
            # around every wait, because a cancel scope costs more than the rest of `submit`. The
            # cancellation of a cancel scope is delivered again at the caller's next checkpoint, so
            # the caller gets its result now and the cancellation right after, as with a shield
            # throughout. Any other cancellation (a bare `Task.cancel()` on asyncio) would not come
            # back: that one is raised again here, once the batch is done.
            with anyio.CancelScope(shield=True):
                await batch.done.wait()
            if anyio.current_effective_deadline() != -math.inf:
                raise
        if write.error is not None:
            raise write.error
        return write.result  # type: ignore[no-any-return]

    def submit_soon(self, op: Callable[..., Any], *args: Any, on_error: Callable[[BaseException], None]) -> None:
        """Apply `op(conn, *args)` in a coming commit without waiting for it (see the module doc);
        `on_error(exc)` is called on the event loop if it fails. Raises StoreClosed at once when the
        committer takes no more writes."""
        if not self._accepting:
            raise StoreClosed("the store is not open for writes")
        self._open_batch().writes.append(Write(op, args, on_error))
        if self._in_flight is None and not self._leader_pending:
            self._soon_waiting.set()  # nothing is about to carry it to the thread: the backstop will

    def _open_batch(self) -> _Batch[C]:
        """The batch a new write joins: the newest, unless it is full."""
        batches = self._batches
        if batches and len(batches[-1].writes) < self._max_batch:
            return batches[-1]
        batch: _Batch[C] = _Batch()
        batches.append(batch)
        return batch

    async def flush(self) -> None:
        """Until every write submitted so far is committed (or failed)."""
        newest = self._batches[-1] if self._batches else self._in_flight
        if newest is None:
            return
        if not self._leader_pending:
            self._handoff()  # an unled batch (`submit_soon` writes only): no reason to wait for the backstop
        await newest.done.wait()

    async def _backstop(self) -> None:
        """Hands an unled batch to the idle thread `soon_delay` after a `submit_soon` write found
        nothing to ride along with."""
        while True:
            await self._soon_waiting.wait()
            self._soon_waiting = anyio.Event()
            await anyio.sleep(self._soon_delay)
            if not self._leader_pending:
                self._handoff()

    def close(self) -> None:
        """Stop accepting writes for good; `run` commits what is queued, then returns."""
        self._closed = True
        self._accepting = False
        if not self._leader_pending:
            self._handoff()  # `submit_soon` writes nobody leads are committed too
        self._check_drained()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start the commit thread and serve until `close()` and every queued write is committed.
        Cancelled, it fails the writes the thread has not taken, waits for the batch it holds, and
        stops the thread."""
        token = anyio.lowlevel.current_token()
        thread = _CommitThread(self._apply_batch, self._batch_done, token)
        thread.start()
        self._thread = thread
        self._drained = anyio.Event()
        self._accepting = not self._closed
        self._running = True
        task_status.started()
        try:
            self._check_drained()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._backstop)
                await self._drained.wait()
                tg.cancel_scope.cancel()
        finally:
            self._accepting = False
            self._thread = None  # the thread takes no further batch
            in_flight = self._in_flight
            if in_flight is not None:  # it is inside its transaction: let it finish and report
                with anyio.CancelScope(shield=True):
                    await in_flight.done.wait()
            thread.inbox.put(None)
            closed = StoreClosed("the store closed before this write was committed")
            pending = list(self._batches)
            self._batches.clear()
            for batch in pending:
                for write in batch.writes:
                    write.result, write.error = None, closed
                batch.done.set()
                _report_soon_failures(batch)
            self._running = False

    # --- event loop side of the hand-offs ----------------------------------------------------------

    def _leader_handoff(self) -> None:
        self._leader_pending = False
        self._handoff()
        self._check_drained()

    def _handoff(self) -> None:
        thread = self._thread
        if self._in_flight is None and self._batches and thread is not None:
            batch = self._batches.popleft()
            self._in_flight = batch
            thread.inbox.put(batch)

    def _batch_done(self, batch: _Batch[C], elapsed: float) -> None:
        """On the event loop, once per batch: wake its writers, report, give the thread the next one.
        Runs as a plain callback, where an exception would reach the event loop itself: none may
        escape."""
        try:
            self._in_flight = None
            batch.done.set()
            _report_soon_failures(batch)
            size = len(batch.writes)
            self.commits += 1
            self.writes += size
            self._notify(size, elapsed)
            self._handoff()
            self._check_drained()
        except Exception:
            log.exception("group commit hand-back failed")

    def _check_drained(self) -> None:
        drained = self._drained
        if (
            drained is not None
            and not self._accepting
            and not self._batches
            and self._in_flight is None
            and not self._leader_pending
        ):
            drained.set()

    def _notify(self, size: int, elapsed: float) -> None:
        try:
            self._observer.commit(size, elapsed)
        except Exception:  # a metrics bug must not stop the journal
            log.exception("store observer failed")
        if self._after_batch is not None:
            try:
                self._after_batch()
            except Exception:
                log.exception("store after-batch hook failed")


def _report_soon_failures(batch: _Batch[Any]) -> None:
    """`submit_soon` writes have no waiter to raise to: their failures go to their `on_error`."""
    for write in batch.writes:
        if write.on_error is not None and write.error is not None:
            try:
                write.on_error(write.error)
            except Exception:
                log.exception("a journal write's error handler failed")
