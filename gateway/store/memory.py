"""The in-memory store: the same interface and the same rules (`machine`) as `SqliteStore`, no I/O.

For benchmarks (the cost of everything but durability) and for unit tests of the core. Nothing
survives the process. Each operation runs without an await between its checks and its changes, so it
is atomic on the event loop, like a transaction; the checkpoint before it keeps writers fair and makes
a cancelled call a call that did nothing.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import anyio.lowlevel

from gateway.iso.totals import SettlementTotals
from gateway.store import machine
from gateway.store.base import NullObserver, StoreObserver
from gateway.store.errors import DuplicateRequest, InvalidRecord, NotFound, OriginalRefused, StoreError
from gateway.store.machine import SafView, TxnView
from gateway.store.records import (
    CHECKED_CREDIT_KINDS,
    DEFAULT_MAX_REFUSALS,
    OPEN_SAF_STATES,
    RC_ORIGINAL_NOT_FOUND,
    REQUEST_COLUMNS,
    SAF_COLUMNS,
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
    pan_fingerprint,
    parse_enum,
    parse_outcome,
    reversal_from,
    reversal_refusal,
    totals_from_groups,
)


class MemoryStore:
    def __init__(
        self,
        *,
        observer: StoreObserver | None = None,
        pan_key: bytes | None = None,
        clock: Callable[[], float] = time.time,
        max_refusals: int = DEFAULT_MAX_REFUSALS,
    ) -> None:
        if pan_key is not None:
            pan_fingerprint(pan_key, "0000000000000000")  # checks the key's length now
        self._refusals: deque[Refusal] = deque(maxlen=check_limit(max_refusals))
        self._refusal_seq = 0
        self._observer: StoreObserver = observer or NullObserver()
        self._pan_key = pan_key
        self._clock = clock
        self._txns: dict[int, TxnRecord] = {}
        self._by_terminal_stan: dict[tuple[str, str, str], int] = {}
        self._saf: dict[int, dict[str, Any]] = {}  #: saf_id → the SafEntry fields except `txn`
        self._saf_by_txn: dict[int, int] = {}
        self._late: list[LateAnswer] = []

    @classmethod
    @asynccontextmanager
    async def open(cls, **options: Any) -> AsyncIterator[MemoryStore]:
        """Same shape as `SqliteStore.open`, so tests and benchmarks can swap backends."""
        yield cls(**options)

    def fingerprint(self, pan: str) -> str:
        if self._pan_key is None:
            raise InvalidRecord("the store was opened without a PAN fingerprint key", field="pan_key")
        return pan_fingerprint(self._pan_key, pan)

    # --- helpers -----------------------------------------------------------------------------------

    def _txn(self, txn_id: int) -> TxnRecord:
        rec = self._txns.get(txn_id)
        if rec is None:
            raise NotFound("transaction", txn_id)
        return rec

    def _saf_row(self, saf_id: int) -> dict[str, Any]:
        row = self._saf.get(saf_id)
        if row is None:
            raise NotFound("SAF entry", saf_id)
        return row

    def _entry(self, row: dict[str, Any]) -> SafEntry:
        return SafEntry(**row, txn=self._txns[row["txn_id"]])

    def _set(self, txn_id: int, **changes: Any) -> None:
        self._txns[txn_id] = replace(self._txns[txn_id], **changes)

    def _view(self, txn_id: int) -> TxnView:
        rec = self._txn(txn_id)
        return TxnView(txn_id, rec.state, rec.reversal_rc, rec.late_approved_at)

    @staticmethod
    def _saf_view(row: dict[str, Any]) -> SafView:
        return SafView(row["saf_id"], row["txn_id"], row["state"], row["attempts"], row["total_attempts"],
                       row["reversal_stan"], row["lease_owner"])

    def _apply(self, txn_id: int, step: machine.Step | None, row: dict[str, Any] | None = None) -> None:
        """Persist what the state machine decided: the transaction's and the SAF entry's changes."""
        if step is None:
            return
        if step.txn:
            self._set(txn_id, **step.txn)
        if row is not None and step.saf:
            row.update(step.saf)
        self._saf_changed()

    def _saf_changed(self) -> None:
        self._observer.saf_depth(sum(1 for row in self._saf.values() if row["state"] in OPEN_SAF_STATES))

    @staticmethod
    def _newest(records: Iterable[TxnRecord]) -> TxnRecord | None:
        return max(records, key=lambda r: r.txn_id, default=None)

    # --- journal writes ----------------------------------------------------------------------------

    async def record_request(self, rec: TxnRequest) -> int:
        if not isinstance(rec, TxnRequest) or isinstance(rec, TxnRecord):
            raise InvalidRecord("expected a TxnRequest", field="record")
        await anyio.lowlevel.checkpoint()
        key = (rec.terminal_id, rec.batch, rec.terminal_stan)
        if rec.kind != TxnKind.REVERSAL and key in self._by_terminal_stan:
            raise DuplicateRequest(*key)
        if rec.orig_txn_id is not None and rec.orig_txn_id not in self._txns:
            raise InvalidRecord("no such journal entry", field="orig_txn_id")
        if rec.kind in CHECKED_CREDIT_KINDS and rec.orig_txn_id is not None:
            earlier = [t for t in self._txns.values() if t.orig_txn_id == rec.orig_txn_id]
            refusal = credit_refusal(rec.kind, rec.amount, self._txns[rec.orig_txn_id], earlier)
            if refusal is not None:
                raise OriginalRefused(rec.orig_txn_id, refusal)
        now = self._clock()
        txn_id = len(self._txns) + 1
        self._txns[txn_id] = TxnRecord(
            **{c: getattr(rec, c) for c in REQUEST_COLUMNS},
            txn_id=txn_id, state=TxnState.PENDING, created_at=now, updated_at=now,
        )
        if rec.kind != TxnKind.REVERSAL:
            self._by_terminal_stan[key] = txn_id
        return txn_id

    async def record_outcome(
        self, txn_id: int, state: TxnState | str, *, rc: str | None = None, auth_code: str | None = None,
        rrn: str | None = None,
    ) -> None:
        new = parse_outcome(state)
        check_outcome_args(txn_id, rc, auth_code, rrn)
        await anyio.lowlevel.checkpoint()
        self._apply_outcome(txn_id, new, rc, auth_code, rrn)

    def _apply_outcome(self, txn_id: int, new: TxnState, rc: str | None, auth_code: str | None,
                       rrn: str | None) -> None:
        change = machine.outcome(self._view(txn_id), new, rc=rc, auth_code=auth_code, rrn=rrn, now=self._clock())
        self._set(txn_id, **change)

    def record_outcome_soon(
        self, txn_id: int, state: TxnState | str, *, on_error: Callable[[BaseException], None],
        rc: str | None = None, auth_code: str | None = None, rrn: str | None = None,
    ) -> None:
        """Applied at once (memory has no commit to share); a failure goes to `on_error`, as with SQLite."""
        new = parse_outcome(state)
        check_outcome_args(txn_id, rc, auth_code, rrn)
        try:
            self._apply_outcome(txn_id, new, rc, auth_code, rrn)
        except StoreError as exc:
            on_error(exc)

    async def queue_reversal(
        self, txn_id: int, reason: str, *, state: TxnState | str | None = None, rc: str | None = None,
        auth_code: str | None = None, rrn: str | None = None,
        initiator: ReversalInitiator | str = ReversalInitiator.GATEWAY, not_before: float | None = None,
    ) -> QueuedReversal:
        outcome = None if state is None else parse_enum(TxnState, state, "state")
        if outcome is not None:
            reversal_from(TxnState.PENDING, outcome)  # rejects outcomes a reversal cannot record
        check_outcome_args(txn_id, rc, auth_code, rrn)
        check_reason(reason)
        who = parse_enum(ReversalInitiator, initiator, "initiator")
        await anyio.lowlevel.checkpoint()
        view = self._view(txn_id)
        new = machine.queue_reversal(view, reason=reason, outcome=outcome, initiator=who, rc=rc, auth_code=auth_code,
                                     rrn=rrn, not_before=not_before, now=self._clock())
        if new is None:
            saf_id = self._saf_by_txn.get(txn_id)
            if saf_id is None:
                raise machine.missing_saf(view)
            return QueuedReversal(self._entry(self._saf[saf_id]), created=False)
        if who is ReversalInitiator.TERMINAL:  # as the other stores, inside the write (one thread: no gap)
            referencing = [t for t in self._txns.values() if t.orig_txn_id == txn_id]
            refusal = reversal_refusal(self._txns[txn_id], referencing)
            if refusal:
                raise OriginalRefused(txn_id, refusal)
        self._set(txn_id, **new.txn)
        saf_id = len(self._saf) + 1
        row: dict[str, Any] = dict.fromkeys(SAF_COLUMNS)
        row.update(new.saf, saf_id=saf_id)
        self._saf[saf_id] = row
        self._saf_by_txn[txn_id] = saf_id
        self._saf_changed()
        return QueuedReversal(self._entry(row), created=True)

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
        await anyio.lowlevel.checkpoint()
        now = self._clock()
        reopened = False
        if txn_id is not None:
            change, after = machine.late_answer(self._view(txn_id), rc, authenticated=authenticated, now=now)
            self._set(txn_id, **change)
            if machine.wants_reopen(after, rc, authenticated=authenticated, unknown_rc=unknown_rc):
                row = self._saf.get(self._saf_by_txn.get(txn_id, 0))
                step = machine.reopen(after, None if row is None else self._saf_view(row), now=now,
                                      unknown_rc=unknown_rc)
                self._apply(txn_id, step, row)
                reopened = step is not None
        late_id = len(self._late) + 1
        self._late.append(LateAnswer(
            late_id=late_id, txn_id=txn_id, rc=rc, auth_code=auth_code, rrn=rrn, host_mti=host_mti,
            host_stan=host_stan, terminal_id=terminal_id, amount=amount, received_at=now,
        ))
        return LateRecorded(late_id, reopened)

    def record_refusal_soon(self, rec: RefusalRecord, *, on_error: Callable[[BaseException], None]) -> None:
        """Applied at once (memory has no commit to share)."""
        if not isinstance(rec, RefusalRecord) or isinstance(rec, Refusal):
            raise InvalidRecord("expected a RefusalRecord", field="record")
        self._refusal_seq += 1
        self._refusals.append(Refusal(**{c: getattr(rec, c) for c in rec.__dataclass_fields__},
                                      refusal_id=self._refusal_seq, refused_at=self._clock()))

    # --- journal reads -----------------------------------------------------------------------------

    async def get(self, txn_id: int) -> TxnRecord | None:
        check_id(txn_id, "txn_id")
        await anyio.lowlevel.checkpoint()
        return self._txns.get(txn_id)

    async def search(self, query: TxnQuery, *, limit: int = 100) -> list[TxnRecord]:
        check_limit(limit)
        await anyio.lowlevel.checkpoint()
        return [r for r in reversed(self._txns.values()) if query.matches(r)][:limit]

    async def refusals(
        self, *, terminal_id: str | None = None, pan_fingerprint: str | None = None, rc: str | None = None,
        since: float | None = None, until: float | None = None, limit: int = 100,
    ) -> list[Refusal]:
        check_limit(limit)
        await anyio.lowlevel.checkpoint()
        found = [
            r for r in reversed(self._refusals)
            if (terminal_id is None or r.terminal_id == terminal_id)
            and (pan_fingerprint is None or r.pan_fingerprint == pan_fingerprint)
            and (rc is None or r.rc == rc) and (since is None or r.refused_at >= since)
            and (until is None or r.refused_at < until)
        ]
        return found[:limit]

    async def saf_for_txn(self, txn_id: int) -> SafEntry | None:
        check_id(txn_id, "txn_id")
        await anyio.lowlevel.checkpoint()
        saf_id = self._saf_by_txn.get(txn_id)
        return None if saf_id is None else self._entry(self._saf[saf_id])

    async def find_original(self, terminal_id: str, batch: str, stan: str) -> TxnRecord | None:
        await anyio.lowlevel.checkpoint()
        txn_id = self._by_terminal_stan.get((terminal_id, batch, stan))
        return None if txn_id is None else self._txns[txn_id]

    async def find_by_rrn(self, rrn: str, *, terminal_id: str | None = None) -> TxnRecord | None:
        await anyio.lowlevel.checkpoint()
        return self._newest(
            r for r in self._txns.values()
            if r.rrn == rrn and (terminal_id is None or r.terminal_id == terminal_id)
        )

    async def find_by_host_stan(
        self, host_stan: str, *, transmission_datetime: str | None = None, terminal_id: str | None = None
    ) -> TxnRecord | None:
        await anyio.lowlevel.checkpoint()
        return self._newest(
            r for r in self._txns.values()
            if r.host_stan == host_stan
            and (transmission_datetime is None or r.transmission_datetime == transmission_datetime)
            and (terminal_id is None or r.terminal_id == terminal_id)
        )

    async def find_referencing(self, orig_txn_id: int) -> list[TxnRecord]:
        check_id(orig_txn_id, "orig_txn_id")
        await anyio.lowlevel.checkpoint()
        return [r for r in self._txns.values() if r.orig_txn_id == orig_txn_id]

    async def find_by_fingerprint(self, fingerprint: str, *, limit: int = 50) -> list[TxnRecord]:
        check_limit(limit)
        await anyio.lowlevel.checkpoint()
        if not fingerprint:
            return []
        found = [r for r in reversed(self._txns.values()) if r.pan_fingerprint == fingerprint]
        return found[:limit]

    async def unknown_outcomes(self) -> list[TxnRecord]:
        await anyio.lowlevel.checkpoint()
        return [r for r in self._txns.values() if r.state == TxnState.PENDING]

    async def settlement_totals(self, terminal_id: str, batch: str) -> SettlementTotals:
        await anyio.lowlevel.checkpoint()
        groups: dict[tuple[str, str], list[int]] = {}
        for r in self._txns.values():
            if r.terminal_id == terminal_id and r.batch == batch and r.state == TxnState.COMPLETED:
                group = groups.setdefault((r.kind, r.card_org), [0, 0])
                group[0] += 1
                group[1] += r.amount
        return totals_from_groups((kind, org, n, amount) for (kind, org), (n, amount) in groups.items())

    async def purchase_totals_since(self, since: float) -> dict[str, int]:
        await anyio.lowlevel.checkpoint()
        totals: dict[str, int] = {}
        for r in self._txns.values():
            if r.created_at >= since and r.kind == TxnKind.PURCHASE and r.state == TxnState.COMPLETED:
                totals[r.terminal_id] = totals.get(r.terminal_id, 0) + r.amount
        return totals

    async def list_transactions(
        self, *, terminal_id: str | None = None, batch: str | None = None,
        state: TxnState | str | None = None, limit: int = 100,
    ) -> list[TxnRecord]:
        check_limit(limit)
        wanted = None if state is None else parse_enum(TxnState, state, "state")
        await anyio.lowlevel.checkpoint()
        found = [
            r for r in reversed(self._txns.values())
            if (terminal_id is None or r.terminal_id == terminal_id) and (batch is None or r.batch == batch)
            and (wanted is None or r.state == wanted)
        ]
        return found[:limit]

    async def late_answers(self, *, txn_id: int | None = None, limit: int = 100) -> list[LateAnswer]:
        check_limit(limit)
        await anyio.lowlevel.checkpoint()
        found = [a for a in reversed(self._late) if txn_id is None or a.txn_id == txn_id]
        return found[:limit]

    # --- store and forward -------------------------------------------------------------------------

    async def due_reversals(self, now: float, limit: int = 64) -> list[SafEntry]:
        check_limit(limit)
        await anyio.lowlevel.checkpoint()
        due = [self._entry(row) for row in self._saf.values()
               if row["state"] == SafState.PENDING and row["next_attempt_at"] <= now]
        return due[:limit]

    async def mark_reversal_attempt(self, saf_id: int, now: float, next_attempt_at: float, error: str) -> int:
        check_id(saf_id, "saf_id")
        text = clip_text(error, "error")
        await anyio.lowlevel.checkpoint()
        row = self._saf_row(saf_id)
        change = machine.attempt(self._saf_view(row), instance=None, attempted_at=now,
                                 next_attempt_at=next_attempt_at, error=text, now=self._clock())
        self._apply(row["txn_id"], machine.Step({}, change), row)
        return int(row["attempts"])

    async def ack_reversal(self, saf_id: int, rc: str, *, attempt_at: float | None = None) -> bool:
        check_id(saf_id, "saf_id")
        check_rc(rc)
        await anyio.lowlevel.checkpoint()
        row = self._saf_row(saf_id)
        decided = machine.ack(self._saf_view(row), self._view(row["txn_id"]), rc, attempt_at=attempt_at,
                              now=self._clock())
        self._apply(row["txn_id"], decided.step, row)
        return decided.accepted

    async def park_reversal(self, saf_id: int, reason: str, *, final_attempt_at: float | None = None) -> None:
        check_id(saf_id, "saf_id")
        text = clip_text(reason, "reason", required=True)
        await anyio.lowlevel.checkpoint()
        row = self._saf_row(saf_id)
        step = machine.park(self._saf_view(row), instance=None, reason=text, final_attempt_at=final_attempt_at,
                            now=self._clock())
        self._apply(row["txn_id"], step, row)

    async def list_saf(self, state: SafState | str | None = None, *, limit: int = 1000) -> list[SafEntry]:
        check_limit(limit)
        wanted = None if state is None else parse_enum(SafState, state, "state")
        await anyio.lowlevel.checkpoint()
        found = [self._entry(row) for row in self._saf.values() if wanted is None or row["state"] == wanted]
        return found[:limit]

    async def get_saf(self, saf_id: int) -> SafEntry | None:
        check_id(saf_id, "saf_id")
        await anyio.lowlevel.checkpoint()
        row = self._saf.get(saf_id)
        return None if row is None else self._entry(row)

    async def retry_saf(self, saf_id: int) -> SafEntry:
        check_id(saf_id, "saf_id")
        await anyio.lowlevel.checkpoint()
        row = self._saf_row(saf_id)
        self._apply(row["txn_id"], machine.retry(self._saf_view(row), now=self._clock()), row)
        return self._entry(row)

    async def drop_saf(self, saf_id: int, operator_note: str) -> SafEntry:
        check_id(saf_id, "saf_id")
        note = clip_text(operator_note, "operator_note", required=True)
        await anyio.lowlevel.checkpoint()
        row = self._saf_row(saf_id)
        self._apply(row["txn_id"], machine.drop(self._saf_view(row), note=note, now=self._clock()), row)
        return self._entry(row)

    async def record_reversal_ident(self, saf_id: int, stan: str, transmission_datetime: str) -> tuple[str, str]:
        check_id(saf_id, "saf_id")
        check_ident(stan, transmission_datetime)
        await anyio.lowlevel.checkpoint()
        row = self._saf_row(saf_id)
        change = machine.reversal_ident(self._saf_view(row), instance=None, stan=stan,
                                        transmission_datetime=transmission_datetime, now=self._clock())
        if change is not None:
            row.update(change)
        return row["reversal_stan"], row["reversal_datetime"]

    async def claim_orphaned_pending(self, stale_after: float) -> list[TxnRecord]:
        """One process, one instance: nobody else's requests to take over."""
        await anyio.lowlevel.checkpoint()
        return []

    async def saf_depth(self) -> int:
        await anyio.lowlevel.checkpoint()
        return sum(1 for row in self._saf.values() if row["state"] in OPEN_SAF_STATES)

    async def saf_summary(self) -> SafSummary:
        await anyio.lowlevel.checkpoint()
        pending = [row["queued_at"] for row in self._saf.values() if row["state"] == SafState.PENDING]
        parked = sum(1 for row in self._saf.values() if row["state"] == SafState.PARKED)
        return SafSummary(len(pending), parked, min(pending, default=None))

