"""Journal writes that could not be made, kept in memory until the journal takes them again.

A journal write can fail while the gateway runs on: disk full, a file size limit, an I/O error. A
transaction already journalled `pending` and sent upstream must still get its outcome on record, or its
money is neither delivered nor reversed until the next start. So every step that settles such a
transaction (a timeout's reversal, an undeliverable or untrusted approval's reversal, a delivered
approval's completion, a decline) goes through `JournalRetry.attempt`: tried at once, and when the
journal fails, kept here and tried again every `interval`, and at once when any other journal write
succeeds. Late host answers and refusals are kept the same way, with less at stake.

Bounded. Outcome steps and late answers count against `capacity`: `full` tells the service to refuse
new financial requests before journalling them (it refuses them anyway while the journal fails), so
an outcome step is never dropped; when full, a late answer is. Refusals have a small allowance of their
own (`max_refusals`, the oldest dropped first): a flood of refused requests cannot crowd out anything
that matters for money. Every drop is counted (metric) and logged.

The refusals kept here are also the journal's probe: the requests refused because the journal failed
are kept (not tried at once), so once the disk is back there is a write that tells so, and /readyz turns
ready again even when no traffic comes.

A backstop sweep: each transaction journalled by this process is tracked from `opened` until its
outcome is written (`settled`). One whose exchange is over (`finished`) that is neither settled nor
waiting here was lost (a bug, or a step that failed in a way nobody expected): the sweep reads the
`pending` rows and settles those as start-up recovery would (reverse what is reversible). It looks only
at this process's transactions, never at another instance's in-flight rows.

Readiness: `healthy` is False from a failed write until every kept step is written.

Which failures are worth a retry: `StoreIOError` (the disk) and `StoreClosed` (kept; counted as left for
recovery at exit). Any other `StoreError` (a state conflict: e.g. the terminal's own reversal won) is
final for that step: `attempt` raises it to the caller at once; a kept step that meets one is dropped
with a log line.
"""

from __future__ import annotations

import functools
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import Final

import anyio
import anyio.abc

from gateway.metrics import Metrics
from gateway.ratelog import RateLimitedLog
from gateway.store.base import Store
from gateway.store.errors import StoreClosed, StoreError, StoreIOError
from gateway.store.records import TxnRecord, TxnState

log = logging.getLogger("gateway.journal")

#: outcome steps and late answers kept at most
DEFAULT_CAPACITY: Final = 10_000
#: refusals kept at most (beyond, the oldest is dropped)
DEFAULT_MAX_REFUSALS: Final = 1_000
#: the key of the "journal is failing" episode in the rate-limited log
JOURNAL_FAULT: Final = "journal write failed"

Step = Callable[[], Awaitable[object]]
#: settles a transaction found lost by the sweep (the service reverses what is reversible)
SettleLost = Callable[[TxnRecord], Awaitable[object]]

RETRYABLE: Final = (StoreIOError, StoreClosed)


class Kind(Enum):
    OUTCOME = "outcome"  #: settles a transaction's money: never dropped
    LATE = "late"  #: a late host answer: dropped when the queue is full
    REFUSAL = "refusal"  #: a refusal on record: its own small allowance


@dataclass(slots=True)
class _Kept:
    txn_id: int | None
    what: str  #: for log lines: "completion of txn 12"
    step: Step
    kind: Kind
    since: float


class JournalRetry:
    def __init__(self, store: Store, metrics: Metrics, *, interval: float, settle_lost: SettleLost,
                 capacity: int = DEFAULT_CAPACITY, max_refusals: int = DEFAULT_MAX_REFUSALS,
                 faults: RateLimitedLog | None = None) -> None:
        if interval <= 0 or capacity < 1 or max_refusals < 1:
            raise ValueError("interval must be positive, capacity and max_refusals at least 1")
        self.store = store
        self.metrics = metrics
        self.interval = interval
        self.capacity = capacity
        self.max_refusals = max_refusals
        self._settle_lost = settle_lost
        self.faults = faults or RateLimitedLog(log)
        self._kept: deque[_Kept] = deque()
        self._counts = dict.fromkeys(Kind, 0)
        self._kept_txns: dict[int, int] = {}  #: txn id → steps kept for it
        self._open: set[int] = set()  #: journalled by this process, outcome not yet written
        self._busy: set[int] = set()  #: their exchange is still running
        self._failing = False
        self._wake = anyio.Event()
        #: totals since start (for tests and diagnostics)
        self.written_later = 0
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
        """No room for more work: the service takes on no new transaction."""
        return self._counts[Kind.OUTCOME] + self._counts[Kind.LATE] >= self.capacity

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
        if self._is_lost(txn_id):
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

    async def attempt(self, txn_id: int | None, what: str, step: Step, *, kind: Kind = Kind.OUTCOME) -> bool:
        """Run `step` now. True when it is written; False when the journal failed and it is kept for a
        retry. Other errors are raised (nothing is kept)."""
        try:
            await step()
        except RETRYABLE as exc:
            self.note_failure()
            self.faults.error(JOURNAL_FAULT, "%s could not be journalled (%s): kept in memory, retried until "
                              "the journal takes it", what, exc, exc_info=True)
            self.keep(txn_id, what, step, kind=kind)
            return False
        self.note_success()
        self.settled(txn_id)
        return True

    def keep(self, txn_id: int | None, what: str, step: Step, *, kind: Kind = Kind.OUTCOME) -> None:
        """Keep `step` for the next retry without trying it now."""
        if kind is Kind.REFUSAL and self._counts[Kind.REFUSAL] >= self.max_refusals:
            self._drop(next(k for k in self._kept if k.kind is Kind.REFUSAL))
        elif kind is not Kind.REFUSAL and self.full:
            # outcomes are never dropped (nothing new is journalled while full, so outcomes go past the
            # capacity only by those already in flight); a late answer is
            victim = next((k for k in self._kept if k.kind is Kind.LATE), None) if kind is Kind.OUTCOME else None
            if kind is Kind.LATE:
                self._drop(_Kept(txn_id, what, step, kind, anyio.current_time()), queued=False)
                return
            if victim is not None:
                self._drop(victim)
        self._kept.append(_Kept(txn_id, what, step, kind, anyio.current_time()))
        self._counts[kind] += 1
        if txn_id is not None:
            self._kept_txns[txn_id] = self._kept_txns.get(txn_id, 0) + 1
        self.metrics.journal_retry_backlog.set(len(self._kept))

    def _drop(self, victim: _Kept, *, queued: bool = True) -> None:
        self.dropped += 1
        self.metrics.journal_retry_dropped.inc()
        self.faults.error(f"journal retry queue full: {victim.kind.value}",
                          "journal retry queue full: dropped %s", victim.what)
        if queued:
            self._remove(victim)

    def _remove(self, kept: _Kept) -> None:
        self._kept.remove(kept)
        self._counts[kept.kind] -= 1
        if kept.txn_id is not None:
            left = self._kept_txns.get(kept.txn_id, 0) - 1
            if left > 0:
                self._kept_txns[kept.txn_id] = left
            else:
                self._kept_txns.pop(kept.txn_id, None)
        self.metrics.journal_retry_backlog.set(len(self._kept))

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
        if not await self._retry_one(self._kept[0]):
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
            self.written_later += 1
            log.info("%s journalled after %.1fs in memory", kept.what, anyio.current_time() - kept.since)
        if kept in self._kept:
            self._remove(kept)
        return True

    async def sweep(self) -> int:
        """Settle this process's transactions that were lost (see the module doc). Returns how many."""
        lost = self.lost()
        if not lost:
            return 0
        try:
            pending = await self.store.unknown_outcomes()
        except RETRYABLE:
            return 0  # a read: the next pass tries again
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
