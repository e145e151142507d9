"""The store interface: what the core and the SAF sender may ask of the journal and the reversal queue.

It is narrow on purpose; `SqliteStore` (durable, the embedded default), `PostgresStore` (several
instances on one database) and `MemoryStore` (no I/O: benchmarks and unit tests of the core) implement
it, all three with the same rules (`machine`).

Contract of every write: when the awaited call returns, the change is durable (committed) in the
durable backend; when it raises, nothing of it was applied. A write whose caller is cancelled while it
is in the commit pipeline still completes (the cancellation is delivered right after), so a caller
never has to guess whether a cancelled `record_request` reached the disk: if it returned it did,
otherwise it is either absent or a `pending` row that recovery reverses.

Operations that move several things (a state change and a SAF entry) do so in one transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from gateway.iso.totals import SettlementTotals
from gateway.store.records import (
    RC_ORIGINAL_NOT_FOUND,
    LateAnswer,
    LateRecorded,
    QueuedReversal,
    Refusal,
    RefusalRecord,
    ReversalInitiator,
    SafEntry,
    SafState,
    SafSummary,
    TxnQuery,
    TxnRecord,
    TxnRequest,
    TxnState,
)


@runtime_checkable
class StoreObserver(Protocol):
    """Metrics hooks. Called on the event loop, never from a worker thread; must not block."""

    def commit(self, batch_size: int, seconds: float) -> None:
        """One durable commit of `batch_size` writes took `seconds` (queueing excluded)."""

    def saf_depth(self, n: int) -> None:
        """SAF entries still needing action (pending + parked), after a change to the queue."""


class NullObserver:
    """The default observer: measures nothing."""

    def commit(self, batch_size: int, seconds: float) -> None:
        pass

    def saf_depth(self, n: int) -> None:
        pass


class Store(Protocol):
    # --- PAN fingerprint -------------------------------------------------------------------------

    def fingerprint(self, pan: str) -> str:
        """`pan_fingerprint(key, pan)` with the key the store was opened with; `InvalidRecord` (field
        `pan_key`) when it was opened without one. Hashes at the boundary; the PAN is never kept."""
        ...

    # --- journal writes ----------------------------------------------------------------------------

    async def record_request(self, rec: TxnRequest) -> int:
        """Journal a request in state `pending`; durable on return. Send upstream only after this.
        `DuplicateRequest` when terminal id + batch + STAN is already journalled."""
        ...

    async def record_outcome(
        self,
        txn_id: int,
        state: TxnState | str,
        *,
        rc: str | None = None,
        auth_code: str | None = None,
        rrn: str | None = None,
    ) -> None:
        """pending → completed | declined | timed_out | undeliverable | host_rejected, or
        completed → undeliverable. `StateConflict` otherwise (e.g. the reversal is already queued: the
        answer is then a late answer)."""
        ...

    def record_outcome_soon(
        self,
        txn_id: int,
        state: TxnState | str,
        *,
        on_error: Callable[[BaseException], None],
        rc: str | None = None,
        auth_code: str | None = None,
        rrn: str | None = None,
    ) -> None:
        """`record_outcome` for an outcome nothing waits for (a delivered approval): it joins the next
        commit instead of costing one, at most a few tens of milliseconds later; reads in this process
        see it at once (they flush first). A failure (e.g. `StateConflict`) goes to `on_error`. Invalid
        arguments raise at once."""
        ...

    async def queue_reversal(
        self,
        txn_id: int,
        reason: str,
        *,
        state: TxnState | str | None = None,
        rc: str | None = None,
        auth_code: str | None = None,
        rrn: str | None = None,
        initiator: ReversalInitiator | str = ReversalInitiator.GATEWAY,
        not_before: float | None = None,
    ) -> QueuedReversal:
        """State → `reversal_queued` and a SAF entry, in one transaction. `state` records the outcome
        that caused it (timed_out / undeliverable / host_rejected) in the same step. Idempotent: for a
        transaction whose reversal already exists, returns that entry with `created=False`.
        `not_before` holds the first attempt back (e.g. until an in-flight original has timed out).
        `NotReversible` for a declined transaction."""
        ...

    async def record_timeout_and_queue_reversal(self, txn_id: int, reason: str = "98") -> QueuedReversal:
        """`queue_reversal(txn_id, reason, state="timed_out")`."""
        ...

    async def record_late_answer(
        self,
        txn_id: int | None,
        rc: str,
        *,
        auth_code: str | None = None,
        rrn: str | None = None,
        host_mti: str | None = None,
        host_stan: str | None = None,
        terminal_id: str | None = None,
        amount: int | None = None,
        authenticated: bool = True,
        unknown_rc: str = RC_ORIGINAL_NOT_FOUND,
    ) -> LateRecorded:
        """Journal a host answer that came after the timeout (never forwarded). `txn_id` None when it
        matches nothing; `authenticated` False when its MAC did not verify (journalled, proves nothing).
        Sets the transaction's `late_rc`/`late_at`, and `late_approved_at` for an authenticated approval
        (00). Does not change the transaction's state, with one exception: an authenticated approval of
        a transaction whose reversal the host answered 25 ("original not found") reopens that reversal
        (SAF entry pending again, due now, one attempt counted so the next goes as a repeat; transaction
        `reversal_queued`, its `reversal_rc` cleared): the host booked the original after all.
        `unknown_rc` is what this host answers for a reversal of an original it has not booked: with
        "00" an authenticated approval after a reversal answered 00 reopens it in the same way (that 00
        may have reversed nothing; repeated, a reversal the host did make is answered again and changes
        nothing)."""
        ...

    def record_refusal_soon(self, rec: RefusalRecord, *, on_error: Callable[[BaseException], None]) -> None:
        """Journal a request the gateway refused itself (no money state). Nothing waits for it: it joins
        the next commit, as `record_outcome_soon` does; a failure goes to `on_error`. The store keeps at
        most `max_refusals` (the oldest are deleted), so a flood cannot fill the disk."""
        ...

    # --- journal reads -----------------------------------------------------------------------------

    async def get(self, txn_id: int) -> TxnRecord | None: ...

    async def search(self, query: TxnQuery, *, limit: int = 100) -> list[TxnRecord]:
        """Operator lookups (RRN, STAN, amount, card fingerprint, time range, ...), newest first."""
        ...

    async def refusals(
        self,
        *,
        terminal_id: str | None = None,
        pan_fingerprint: str | None = None,
        rc: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
    ) -> list[Refusal]:
        """Journalled refusals, newest first; `since`/`until` bound `refused_at` (`until` exclusive)."""
        ...

    async def saf_for_txn(self, txn_id: int) -> SafEntry | None:
        """The reversal queued for a transaction, if any (its history: attempts, errors, outcome)."""
        ...

    async def find_original(self, terminal_id: str, batch: str, stan: str) -> TxnRecord | None:
        """The financial request (not a terminal reversal) with that terminal id, batch and STAN."""
        ...

    async def find_by_rrn(self, rrn: str, *, terminal_id: str | None = None) -> TxnRecord | None:
        """The newest transaction the host gave this RRN."""
        ...

    async def find_by_host_stan(
        self, host_stan: str, *, transmission_datetime: str | None = None, terminal_id: str | None = None
    ) -> TxnRecord | None:
        """The newest transaction sent upstream with this host STAN (to match a late answer)."""
        ...

    async def find_referencing(self, orig_txn_id: int) -> list[TxnRecord]:
        """Voids, refunds and terminal reversals whose `orig_txn_id` is this one, oldest first."""
        ...

    async def find_by_fingerprint(self, fingerprint: str, *, limit: int = 50) -> list[TxnRecord]:
        """Transactions of one card (by PAN fingerprint), newest first."""
        ...

    async def unknown_outcomes(self) -> list[TxnRecord]:
        """`pending` rows, oldest first: at start these are requests whose outcome is unknown. The
        caller reverses the reversible kinds. A store shared by several instances returns only this
        instance's own (those of its previous life: the instance id is stable across restarts)."""
        ...

    async def claim_orphaned_pending(self, stale_after: float) -> list[TxnRecord]:
        """`pending` rows of other instances whose heartbeat is more than `stale_after` seconds old
        (dead, or cut off from the database), taken over by this instance in one step (so two live
        instances never both settle one), oldest first. The caller settles them as at start. Stores
        of one instance return []."""
        ...

    async def settlement_totals(self, terminal_id: str, batch: str) -> SettlementTotals:
        """Completed debits (purchase, completion, offline sale) and credits (void, refund, completion
        void), count and amount, split 内卡 (CUP) / 外卡 by card organisation."""
        ...

    async def purchase_totals_since(self, since: float) -> dict[str, int]:
        """Per terminal: amount of completed purchases journalled at or after `since` (risk limits)."""
        ...

    async def list_transactions(
        self,
        *,
        terminal_id: str | None = None,
        batch: str | None = None,
        state: TxnState | str | None = None,
        limit: int = 100,
    ) -> list[TxnRecord]:
        """Newest first."""
        ...

    async def late_answers(self, *, txn_id: int | None = None, limit: int = 100) -> list[LateAnswer]:
        """Newest first."""
        ...

    # --- store and forward -------------------------------------------------------------------------

    async def due_reversals(self, now: float, limit: int = 64) -> list[SafEntry]:
        """Pending entries whose next attempt is due, in queue order (oldest first). A store shared by
        several instances (PostgreSQL) claims them: each comes with a lease for this instance (entries
        leased by a live other instance are left out; this instance's own come first and are renewed,
        so an attempt in flight keeps its lease while the sender polls)."""
        ...

    async def record_reversal_ident(self, saf_id: int, stan: str, transmission_datetime: str) -> tuple[str, str]:
        """Fix the STAN (11) and transmission date-time (7) every attempt of this reversal carries, before
        its first attempt is sent (durable on return), so a repeat is the same message even after a crash
        or a takeover. The first write wins: returns the pair on record. `StateConflict` unless pending;
        `LeaseLost` when another instance holds the entry."""
        ...

    async def mark_reversal_attempt(self, saf_id: int, now: float, next_attempt_at: float, error: str) -> int:
        """A failed attempt (a timeout counts): attempts + 1, next try at `next_attempt_at`. Returns the
        new attempt count. `StateConflict` unless pending; `LeaseLost` when another instance took the
        entry over (its own attempt counts then, not this one)."""
        ...

    async def ack_reversal(self, saf_id: int, rc: str, *, attempt_at: float | None = None) -> bool:
        """The host acknowledged: entry done, transaction `reversed`; True. Idempotent; also accepted
        for a parked or dropped entry (the host's word wins). False, and nothing changed, for a 25
        ("original not found") when the host has approved that original late (`late_approved_at`): the
        sender counts it as a failed attempt and repeats the reversal."""
        ...

    async def park_reversal(self, saf_id: int, reason: str, *, final_attempt_at: float | None = None) -> None:
        """Give up: entry parked, transaction `reversal_failed`, for an operator. `final_attempt_at`
        counts the attempt that made the sender give up. `LeaseLost` as for `mark_reversal_attempt`."""
        ...

    async def list_saf(self, state: SafState | str | None = None, *, limit: int = 1000) -> list[SafEntry]:
        """Queue order (oldest first)."""
        ...

    async def get_saf(self, saf_id: int) -> SafEntry | None: ...

    async def retry_saf(self, saf_id: int) -> SafEntry:
        """Operator: parked → pending, attempts reset (the next send is a 0400 again), due now."""
        ...

    async def drop_saf(self, saf_id: int, operator_note: str) -> SafEntry:
        """Operator: pending/parked → dropped with a note; transaction `reversal_dropped`."""
        ...

    async def saf_depth(self) -> int:
        """Entries still needing action (pending + parked)."""
        ...

    async def saf_summary(self) -> SafSummary:
        """Pending and parked counts and the oldest pending entry's queue time (one cheap query)."""
        ...
