"""Group commit: many concurrent writers share one transaction and one fsync.

A writer `await`s `submit(op)`. Its op joins the open batch; a single background task (`run`) takes
the oldest batch, applies all its ops in one transaction in a worker thread (the backend's
`apply_batch`), commits once, then wakes every waiter of that batch with its own result or exception.
While one batch is being committed the next one fills up, so under load the batch size grows by itself
and the commit rate, not the transaction rate, is bounded by the disk's sync time.

Why one task: one connection, used by exactly one thread call at a time, so no locking and no
"database is locked" between our own writers. The worker thread may differ from call to call
(anyio's pool), which is why the connection is opened with `check_same_thread=False`.

Waiting is shielded from cancellation: once submitted, an op is applied or failed as a whole and its
caller learns which, then the cancellation is delivered. A caller that gives up early could otherwise
not know whether its journal row exists.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import anyio
import anyio.abc

from gateway.store.base import NullObserver, StoreObserver
from gateway.store.errors import StoreClosed, StoreIOError

log = logging.getLogger("gateway.store")

C = TypeVar("C")  # the backend's connection type
T = TypeVar("T")

DEFAULT_MAX_BATCH = 512


class Write(Generic[C]):
    """One op in a batch. `apply_batch` sets exactly one of `result` / `error` on each."""

    __slots__ = ("error", "op", "result")

    def __init__(self, op: Callable[[C], Any]) -> None:
        self.op = op
        self.result: Any = None
        self.error: BaseException | None = None


class _Batch(Generic[C]):
    __slots__ = ("done", "writes")

    def __init__(self) -> None:
        self.writes: list[Write[C]] = []
        self.done = anyio.Event()


class GroupCommitter(Generic[C]):
    """`apply_batch(writes)` runs in a worker thread: it applies every op in one transaction, commits,
    and records per-write results/errors (an op's own failure must not fail the others); if the commit
    fails it sets an error on every write. `after_batch()` runs on the event loop after each batch."""

    def __init__(
        self,
        apply_batch: Callable[[Sequence[Write[C]]], None],
        *,
        observer: StoreObserver | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        after_batch: Callable[[], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._apply_batch = apply_batch
        self._observer = observer or NullObserver()
        self._max_batch = max_batch
        self._after_batch = after_batch
        self._batches: deque[_Batch[C]] = deque()
        self._wake = anyio.Event()
        self._accepting = False
        self._running = False
        self._closed = False
        #: totals since start, for tests and diagnostics
        self.commits = 0
        self.writes = 0

    @property
    def running(self) -> bool:
        return self._running

    async def submit(self, op: Callable[[C], T]) -> T:
        """Apply `op(conn)` in the next group commit; its return value once durable, or its exception."""
        if not self._accepting:
            raise StoreClosed("the store is not open for writes")
        batches = self._batches
        if batches and len(batches[-1].writes) < self._max_batch:
            batch = batches[-1]
        else:
            batch = _Batch()
            batches.append(batch)
        write: Write[C] = Write(op)
        batch.writes.append(write)
        self._wake.set()
        with anyio.CancelScope(shield=True):
            await batch.done.wait()
        if write.error is not None:
            raise write.error
        return write.result  # type: ignore[no-any-return]

    def close(self) -> None:
        """Stop accepting writes for good; `run` commits what is queued, then returns."""
        self._closed = True
        self._accepting = False
        self._wake.set()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        # a limiter of our own: the commit never waits behind other users of anyio's default pool
        limiter = anyio.CapacityLimiter(1)
        self._accepting = not self._closed
        self._running = True
        task_status.started()
        current: _Batch[C] | None = None
        try:
            while True:
                if not self._batches:
                    if not self._accepting:
                        return
                    await self._wake.wait()
                    self._wake = anyio.Event()
                    continue
                current = self._batches.popleft()
                started = time.perf_counter()
                try:
                    await anyio.to_thread.run_sync(self._apply_batch, current.writes, limiter=limiter)
                except Exception as exc:  # apply_batch is meant not to raise: fail the batch, keep serving
                    log.exception("group commit failed")
                    failure = StoreIOError(f"commit failed: {type(exc).__name__}")
                    for write in current.writes:
                        write.result, write.error = None, failure
                elapsed = time.perf_counter() - started
                current.done.set()
                size = len(current.writes)
                current = None
                self.commits += 1
                self.writes += size
                self._notify(size, elapsed)
        finally:
            self._accepting = False
            self._running = False
            closed = StoreClosed("the store closed before this write was committed")
            pending = ([current] if current is not None else []) + list(self._batches)
            self._batches.clear()
            for batch in pending:
                for write in batch.writes:
                    write.result, write.error = None, closed
                batch.done.set()

    def _notify(self, size: int, elapsed: float) -> None:
        try:
            self._observer.commit(size, elapsed)
            if self._after_batch is not None:
                self._after_batch()
        except Exception:  # a metrics bug must not stop the journal
            log.exception("store observer failed")
