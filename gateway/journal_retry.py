"""Journal writes that could not be made, kept in memory until the journal takes them again.

A journal write can fail while the gateway runs on: disk full, a file size limit, an I/O error. A
transaction already journalled `pending` and sent upstream must still get its outcome on record, or its
money is neither delivered nor reversed until the next start. So every step that settles such a
transaction (a timeout's reversal, an undeliverable or untrusted approval's reversal, a delivered
approval's completion, a decline) goes through `JournalRetry.attempt`: tried at once, and when the
journal fails, kept here and tried again every `interval`, and at once when any other journal write
succeeds. Late host answers are kept the same way (they carry no outcome, so they are the first to be
dropped when the queue is full).

Bounded: at most `capacity` steps. `full` tells the service to refuse new financial requests before
journalling them (it refuses them anyway while the journal fails), so an outcome step is never dropped.

A backstop sweep: each transaction journalled by this process is tracked from `opened` until its
outcome is written (`settled`). One whose exchange is over (`finished`) that is neither settled nor
waiting here was lost (a bug, or a step that failed in a way nobody expected): the sweep reads the
`pending` rows and settles those as start-up recovery would (reverse what is reversible). It looks only
at this process's transactions, never at another instance's in-flight rows.

Readiness: `healthy` is False from a failed write until every kept step is written.

Which failures are worth a retry: `StoreIOError` (the disk) and `StoreClosed` (kept, counted as left
for recovery at exit). Any other `StoreError` (a state conflict: e.g. the terminal's own reversal won)
is final for that step and is raised to the caller at once; a step retried later that meets one is
dropped with a log line.
"""

from __future__ import annotations

import functools
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import anyio
import anyio.abc

from gateway.metrics import Metrics
from gateway.ratelog import RateLimitedLog
from gateway.store.base import Store
from gateway.store.errors import StoreClosed, StoreError, StoreIOError
from gateway.store.records import TxnRecord, TxnState

log = logging.getLogger("gateway.journal")

#: steps kept at most (outcome steps; late answers count too)
DEFAULT_CAPACITY: Final = 10_000
#: the key of the "journal is failing" episode in the rate-limited log
JOURNAL_FAULT: Final = "journal write failed"

Step = Callable[[], Awaitable[object]]
#: settles a transaction found lost by the sweep (the service reverses what is reversible)
SettleLost = Callable[[TxnRecord], Awaitable[object]]

RETRYABLE: Final = (StoreIOError, StoreClosed)


@dataclass(slots=True)
class _Kept:
    txn_id: int | None
    what: str  #: for log lines: "completion of txn 12"
    step: Step
    outcome: bool  #: False for a late answer: droppable
    since: float


class JournalRetry:
    def __init__(self, store: Store, metrics: Metrics, *, interval: float, settle_lost: SettleLost,
                 capacity: int = DEFAULT_CAPACITY, faults: RateLimitedLog | None = None) -> None:
        if interval <= 0 or capacity < 1:
            raise ValueError("interval must be positive and capacity at least 1")
        self.store = store
        self.metrics = metrics
        self.interval = interval
        self.capacity = capacity
        self._settle_lost = settle_lost
        self.faults = faults or RateLimitedLog(log)
        self._kept: deque[_Kept] = deque()
        self._kept_txns: dict[int, int] = {}  #: txn id → steps kept for it
        self._open: set[int] = set()  #: journalled by this process, outcome not yet written
        self._busy: set[int] = set()  #: their exchange is still running
        self._failing = False
        self._wake = anyio.Event()
        #: totals since start (for the shutdown summary and tests)
        self.written_late = 0
        self.dropped = 0

    # --- state ---------------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """The last journal write worked and nothing is waiting here."""
        return not self._failing and not self._kept

    @property
    def backlog(self) -> int:
        return len(self._kept)

    @property
    def full(self) -> bool:
        return len(self._kept) >= self.capacity

    def holds(self, txn_id: int) -> bool:
        """A step of this transaction waits here (its state in the journal is not the last word)."""
        return txn_id in self._kept_txns

    def kept(self) -> list[str]:
        """What waits here, oldest first (for the shutdown summary)."""
        return [k.what for k in self._kept]

    # --- a transaction's life in this process --------------------------------------------------------

    def opened(self, txn_id: int) -> None:
        """`txn_id` was journalled `pending`; its exchange starts."""
        self._open.add(txn_id)
        self._busy.add(txn_id)

    def finished(self, txn_id: int) -> None:
        """Its exchange is over (answer written or not); its outcome was written or is kept here, or
        else the sweep settles it."""
        self._busy.discard(txn_id)
        if txn_id in self._open and txn_id not in self._kept_txns:
            self._wake.set()

    def settled(self, txn_id: int | None) -> None:
        if txn_id is not None:
            self._open.discard(txn_id)

    def lost(self) -> set[int]:
        """Transactions of this process whose exchange is over with no outcome written or kept."""
        return {t for t in self._open if self._is_lost(t)}

    def _is_lost(self, txn_id: int) -> bool:
        return txn_id in self._open and txn_id not in self._busy and txn_id not in self._kept_txns

    # --- writing ---------------------------------------------------------------------------------------

    def note_success(self) -> None:
        """Some journal write worked: if the journal was failing, retry what is kept now."""
        if self._failing:
            self._failing = False
            self._wake.set()
            if not self._kept:
                self.faults.end(JOURNAL_FAULT, "journal writes work again")

    def note_failure(self) -> None:
        self._failing = True

    async def attempt(self, txn_id: int | None, what: str, step: Step, *, outcome: bool = True) -> bool:
        """Run `step` now. True when it is written; False when the journal failed and it is kept for a
        retry. Other errors are raised (nothing is kept)."""
        try:
            await step()
        except RETRYABLE as exc:
            self.note_failure()
            self.faults.error(JOURNAL_FAULT, "%s could not be journalled (%s): kept in memory, retried until "
                              "the journal takes it", what, exc, exc_info=True)
            self._keep(_Kept(txn_id, what, step, outcome, anyio.current_time()))
            return False
        self.note_success()
        self.settled(txn_id)
        return True

    def _keep(self, kept: _Kept) -> None:
        if self.full:
            # only late answers are dropped; outcomes never are (the service journals nothing new while
            # the queue is full, so outcomes can go past the capacity only by those already in flight)
            victim = kept if not kept.outcome else next((k for k in self._kept if not k.outcome), None)
            if victim is not None:
                self.dropped += 1
                self.metrics.journal_retry_dropped.inc()
                self.faults.error("journal retry queue full", "journal retry queue full (%d): dropped %s",
                                  self.capacity, victim.what)
                if victim is kept:
                    return
                self._kept.remove(victim)
                self._forget(victim)
        self._kept.append(kept)
        if kept.txn_id is not None:
            self._kept_txns[kept.txn_id] = self._kept_txns.get(kept.txn_id, 0) + 1
        self.metrics.journal_retry_backlog.set(len(self._kept))

    def _forget(self, kept: _Kept) -> None:
        if kept.txn_id is not None:
            left = self._kept_txns.get(kept.txn_id, 0) - 1
            if left > 0:
                self._kept_txns[kept.txn_id] = left
            else:
                self._kept_txns.pop(kept.txn_id, None)

    # --- the retry task --------------------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            with anyio.move_on_after(self.interval):
                await self._wake.wait()
            self._wake = anyio.Event()
            try:
                await self.retry()
                await self.sweep()
            except Exception:  # the retry task must outlive any surprise: the money depends on it
                log.exception("journal retry pass failed; trying again in %.1fs", self.interval)

    async def retry(self) -> bool:
        """Write what is kept: the oldest step first, as a probe (one failure: the journal is still
        failing, stop), then the rest together so they share commits. True when nothing is left."""
        if not self._kept:
            return True
        probe = self._kept[0]
        if not await self._retry_one(probe):
            return False
        batch = list(self._kept)
        async with anyio.create_task_group() as tg:
            for kept in batch:
                tg.start_soon(self._retry_one, kept)
        if not self._kept:
            self.faults.end(JOURNAL_FAULT, "journal writes work again: everything kept in memory is journalled")
        return not self._kept

    async def _retry_one(self, kept: _Kept) -> bool:
        if kept not in self._kept:
            return True  # written (or dropped) meanwhile
        try:
            await kept.step()
        except RETRYABLE:
            self.note_failure()
            return False
        except StoreError as exc:
            # final: e.g. the terminal's own reversal or an operator changed the transaction meanwhile
            log.error("%s dropped from the journal retry queue: %s", kept.what, exc)
        except Exception:
            log.exception("%s dropped from the journal retry queue after an unexpected error", kept.what)
        else:
            self.note_success()
            self.settled(kept.txn_id)
            if not kept.outcome:
                self.written_late += 1
            log.info("%s journalled after %.1fs in memory", kept.what, anyio.current_time() - kept.since)
        if kept in self._kept:
            self._kept.remove(kept)
            self._forget(kept)
            self.metrics.journal_retry_backlog.set(len(self._kept))
        return True

    async def sweep(self) -> int:
        """Settle this process's transactions that were lost (see the module doc). Returns how many."""
        lost = self.lost()
        if not lost:
            return 0
        try:
            pending = await self.store.unknown_outcomes()
        except RETRYABLE:
            self.note_failure()
            return 0
        still = {rec.txn_id: rec for rec in pending if rec.txn_id in lost and rec.state is TxnState.PENDING}
        for txn_id in lost - still.keys():
            self.settled(txn_id)  # its outcome reached the journal another way (a terminal reversal, ...)
        settled = 0
        for rec in still.values():
            if not self._is_lost(rec.txn_id):
                continue  # picked up meanwhile
            log.error("txn %s (terminal %s stan %s) was left pending with its exchange over: settling it now",
                      rec.txn_id, rec.terminal_id, rec.terminal_stan)
            try:
                if await self.attempt(rec.txn_id, f"settlement of lost txn {rec.txn_id}",
                                      functools.partial(self._settle_lost, rec)):
                    settled += 1
            except StoreError as exc:
                log.error("txn %s could not be settled: %s", rec.txn_id, exc)
                self.settled(rec.txn_id)
        return settled

    async def flush(self, timeout: float) -> bool:
        """For shutdown: retry what is kept until it is written or `timeout` passes, then sweep. True
        when nothing is left here."""
        with anyio.move_on_after(timeout):
            while not await self.retry():
                await anyio.sleep(min(self.interval, 0.1))
            await self.sweep()
        return not self._kept
