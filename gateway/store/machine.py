"""The journal's state machine, written once for every backend.

Each function takes what the rules need to know of a transaction (`TxnView`) and of its SAF entry
(`SafView`), decides, and returns the change to make as plain column → value dicts (`Change`), or
raises the typed error (`StateConflict`, `NotReversible`, `LeaseLost`). It does no I/O: the memory,
SQLite and PostgreSQL stores read the rows (locked, where the database has row locks), call the
function, and persist what it returns in the same transaction. The transition tables themselves
(which outcome may follow which state, which states are reversible) are data in `records.py`; the SQL
fast paths (`record_outcome` as one conditional UPDATE) are built from those same tables.

Transaction states (`TxnState`) and SAF entry states (`SafState`) move together::

    pending ──▶ completed | declined | timed_out | undeliverable | host_rejected      outcome()
    completed ──▶ undeliverable                                                      outcome()
    pending | completed | timed_out | undeliverable | host_rejected
        ──▶ reversal_queued + SAF pending                                             queue_reversal()
    SAF pending: a failed attempt (attempts + 1, back-off)                            attempt()
    SAF pending | parked | dropped ──▶ done, txn reversed (the host's word wins)       ack()
    txn reversed, SAF done, answered 25, then an authenticated late approval
        ──▶ SAF pending (as a repeat), txn reversal_queued                            late_answer() + reopen()
    SAF pending | parked ──▶ parked, txn reversal_failed                              park()
    SAF parked ──▶ pending (attempts 0: a 0400 again), txn reversal_queued            retry()
    SAF pending | parked ──▶ dropped, txn reversal_dropped                            drop()

Leases (several instances on one database, PostgreSQL): an entry may carry the instance id of the
sender that holds it (`SafView.lease_owner`). Only that instance (or anyone, when nobody holds it)
may record an attempt, park it or fix its STAN: a sender whose lease was taken over gets `LeaseLost`
and must let the entry go. An acknowledgement is accepted from anyone: it is the host's word that
the reversal is done, so it can only end the entry (idempotently), never count or send anything twice.
Single-instance stores never set a lease, so these checks always pass there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from gateway.store.errors import LeaseLost, NotReversible, StateConflict
from gateway.store.records import (
    CHARGED_RCS,
    MISSING_SAF,
    ONLY_PARKED,
    RC_ORIGINAL_NOT_FOUND,
    REOPENED_BY_LATE_APPROVAL,
    REVERSAL_STATES,
    REVERSIBLE_STATES,
    ReversalInitiator,
    SafState,
    TxnState,
    not_found_overtaken,
    outcome_allowed,
    reversal_from,
)

#: column → new value; what a backend writes (an absent column keeps its value)
Change = dict[str, object]

#: SAF states an operator (or the sender giving up) may still close
_OPEN: Final = (SafState.PENDING, SafState.PARKED)


@dataclass(frozen=True, slots=True)
class TxnView:
    """What the rules need to know of a transaction."""

    txn_id: int
    state: TxnState
    reversal_rc: str | None = None
    late_approved_at: float | None = None


@dataclass(frozen=True, slots=True)
class SafView:
    """What the rules need to know of a SAF entry."""

    saf_id: int
    txn_id: int
    state: SafState
    attempts: int
    total_attempts: int
    reversal_stan: str | None = None
    lease_owner: str | None = None  #: the instance whose sender holds the entry, if any


@dataclass(frozen=True, slots=True)
class Step:
    """A change to a transaction and/or its SAF entry, to be written in one transaction."""

    txn: Change
    saf: Change


# --- journal ---------------------------------------------------------------------------------------


def outcome(txn: TxnView, new: TxnState, *, rc: str | None, auth_code: str | None, rrn: str | None,
            now: float) -> Change:
    """`record_outcome`: the transaction's change; `StateConflict` when `new` may not follow its state
    (e.g. its reversal is already queued: the answer is then a late answer). An argument left out keeps
    what was recorded."""
    if not outcome_allowed(txn.state, new):
        raise StateConflict("transaction", txn.txn_id, txn.state, f"record outcome {new}")
    change: Change = {"state": new, "updated_at": now}
    for name, value in (("rc", rc), ("auth_code", auth_code), ("rrn", rrn)):
        if value is not None:
            change[name] = value
    return change


@dataclass(frozen=True, slots=True)
class NewReversal:
    """What `queue_reversal` writes: the transaction's change and the new SAF entry's columns."""

    txn: Change
    saf: Change


def queue_reversal(
    txn: TxnView, *, reason: str, outcome: TxnState | None, initiator: ReversalInitiator, rc: str | None,
    auth_code: str | None, rrn: str | None, not_before: float | None, now: float,
) -> NewReversal | None:
    """`queue_reversal`: None when the transaction has its reversal already (the caller returns that
    entry, `created=False`); `NotReversible` when no money moved; `StateConflict` when `outcome` cannot
    be recorded from its state."""
    current = txn.state
    if current in REVERSAL_STATES:
        return None
    if current not in REVERSIBLE_STATES:
        raise NotReversible("transaction", txn.txn_id, current, "reverse it: no money moved")
    if outcome is not None and outcome != current and not outcome_allowed(current, outcome):
        raise StateConflict("transaction", txn.txn_id, current, f"record outcome {outcome}")
    change: Change = {
        "state": TxnState.REVERSAL_QUEUED, "reversed_from": reversal_from(current, outcome),
        "reversal_reason": reason, "reversal_initiator": initiator, "updated_at": now,
    }
    for name, value in (("rc", rc), ("auth_code", auth_code), ("rrn", rrn)):
        if value is not None:
            change[name] = value
    entry: Change = {
        "txn_id": txn.txn_id, "state": SafState.PENDING, "reason": reason, "initiator": initiator,
        "attempts": 0, "total_attempts": 0, "queued_at": now, "updated_at": now,
        "next_attempt_at": now if not_before is None else max(now, not_before),
    }
    return NewReversal(change, entry)


def missing_saf(txn: TxnView) -> StateConflict:
    """The error for a transaction in a reversal state without its SAF entry (a broken journal)."""
    return StateConflict("transaction", txn.txn_id, txn.state, MISSING_SAF)


def late_answer(txn: TxnView, rc: str, *, authenticated: bool, now: float) -> tuple[Change, TxnView]:
    """`record_late_answer`: the transaction's change (late_rc/late_at, and `late_approved_at` for an
    authenticated approval, never cleared) and the view after it, for `reopen`."""
    approved = authenticated and rc in CHARGED_RCS
    approved_at = txn.late_approved_at if txn.late_approved_at is not None else (now if approved else None)
    change: Change = {"late_rc": rc, "late_at": now, "updated_at": now, "late_approved_at": approved_at}
    return change, TxnView(txn.txn_id, txn.state, txn.reversal_rc, approved_at)


def _overtaken(txn: TxnView, unknown_rc: str) -> bool:
    """Reversed on an answer that may have reversed nothing (25, or `unknown_rc`: what this host answers
    for an original it has not booked), and the host has approved that original late since."""
    return txn.state is TxnState.REVERSED and (
        not_found_overtaken(txn.reversal_rc, txn.late_approved_at)
        or (txn.reversal_rc == unknown_rc and txn.late_approved_at is not None))


def wants_reopen(txn: TxnView, rc: str, *, authenticated: bool, unknown_rc: str = RC_ORIGINAL_NOT_FOUND) -> bool:
    """Whether a late answer may reopen the transaction's reversal (then the backend reads the SAF
    entry and calls `reopen`): an authenticated approval of a transaction reversed on a 25 — or on a
    00 from a host that answers 00 for originals it has not booked (`unknown_rc` "00",
    `host.unknown_reversal_rc`): there the 00 may have come before the booking, as a 25 does."""
    return authenticated and rc in CHARGED_RCS and _overtaken(txn, unknown_rc)


def reopen(txn: TxnView, saf: SafView | None, *, now: float, unknown_rc: str = RC_ORIGINAL_NOT_FOUND) -> Step | None:
    """A reversal the host answered 25 (or `unknown_rc`) whose original it has now approved (after
    `late_answer`) goes again: as a repeat (one attempt counted, the rest of the budget fresh), with a
    new STAN (the host answered the old one), due now. None when there is nothing to reopen."""
    if not _overtaken(txn, unknown_rc):
        return None
    if saf is None or saf.state is not SafState.DONE:
        return None
    return Step(
        txn={"state": TxnState.REVERSAL_QUEUED, "reversal_rc": None, "updated_at": now},
        saf={"state": SafState.PENDING, "attempts": 1, "next_attempt_at": now, "ack_rc": None,
             "last_error": REOPENED_BY_LATE_APPROVAL, "updated_at": now, **_NO_IDENT, **_NO_LEASE},
    )


# --- store and forward -----------------------------------------------------------------------------

_NO_IDENT: Final[Change] = {"reversal_stan": None, "reversal_datetime": None}
_NO_LEASE: Final[Change] = {"lease_owner": None, "lease_expires_at": None}


def _check_lease(saf: SafView, instance: str | None, wanted: str) -> None:
    if saf.lease_owner is not None and saf.lease_owner != instance:
        raise LeaseLost(saf.saf_id, saf.lease_owner, wanted)


def attempt(saf: SafView, *, instance: str | None, attempted_at: float, next_attempt_at: float, error: str,
            now: float) -> Change:
    """`mark_reversal_attempt`: a failed attempt (a timeout counts). Only for a pending entry, by the
    lease holder."""
    if saf.state is not SafState.PENDING:
        raise StateConflict("SAF entry", saf.saf_id, saf.state, "record an attempt")
    _check_lease(saf, instance, "record an attempt")
    # the lease goes with the attempt: whichever instance is free when the entry is due next takes it
    return {"attempts": saf.attempts + 1, "total_attempts": saf.total_attempts + 1, "last_attempt_at": attempted_at,
            "next_attempt_at": next_attempt_at, "last_error": error, "updated_at": now, **_NO_LEASE}


@dataclass(frozen=True, slots=True)
class Ack:
    """What `ack_reversal` decided: `accepted` is its return value; `step` None when nothing changes."""

    accepted: bool
    step: Step | None


def ack(saf: SafView, txn: TxnView, rc: str, *, attempt_at: float | None, now: float) -> Ack:
    """`ack_reversal`: the host acknowledged. Idempotent; also for a parked or dropped entry, and from a
    sender whose lease was taken over (the host's word wins). Refused (False, nothing changes) for a
    25 when the host has approved the original late."""
    if saf.state is SafState.DONE:
        return Ack(True, None)  # a repeated acknowledgement changes nothing
    if not_found_overtaken(rc, txn.late_approved_at):
        return Ack(False, None)  # the host approved the original late: "not found" is no longer true
    counted = 0 if attempt_at is None else 1  # the attempt the host acknowledged is an attempt too
    change: Change = {"state": SafState.DONE, "ack_rc": rc, "attempts": saf.attempts + counted,
                      "total_attempts": saf.total_attempts + counted, "updated_at": now, **_NO_LEASE}
    if attempt_at is not None:
        change["last_attempt_at"] = attempt_at
    return Ack(True, Step(txn={"state": TxnState.REVERSED, "reversal_rc": rc, "updated_at": now}, saf=change))


def park(saf: SafView, *, instance: str | None, reason: str, final_attempt_at: float | None, now: float) -> Step:
    """`park_reversal`: the sender gives up; the entry waits for an operator."""
    if saf.state not in _OPEN:
        raise StateConflict("SAF entry", saf.saf_id, saf.state, "park it")
    _check_lease(saf, instance, "park it")
    counted = 0 if final_attempt_at is None else 1
    change: Change = {"state": SafState.PARKED, "parked_reason": reason, "attempts": saf.attempts + counted,
                      "total_attempts": saf.total_attempts + counted, "updated_at": now, **_NO_LEASE}
    if final_attempt_at is not None:
        change["last_attempt_at"] = final_attempt_at
    return Step(txn={"state": TxnState.REVERSAL_FAILED, "updated_at": now}, saf=change)


def retry(saf: SafView, *, now: float) -> Step:
    """Operator: parked → pending, attempts reset (the next send is a 0400 again, with a new STAN)."""
    if saf.state is not SafState.PARKED:
        raise StateConflict("SAF entry", saf.saf_id, saf.state, ONLY_PARKED)
    return Step(
        txn={"state": TxnState.REVERSAL_QUEUED, "updated_at": now},
        saf={"state": SafState.PENDING, "attempts": 0, "next_attempt_at": now, "parked_reason": None,
             "updated_at": now, **_NO_IDENT, **_NO_LEASE},
    )


def drop(saf: SafView, *, note: str, now: float) -> Step:
    """Operator: pending/parked → dropped, with a note (an operator overrides any lease)."""
    if saf.state not in _OPEN:
        raise StateConflict("SAF entry", saf.saf_id, saf.state, "drop it")
    return Step(txn={"state": TxnState.REVERSAL_DROPPED, "updated_at": now},
                saf={"state": SafState.DROPPED, "operator_note": note, "updated_at": now, **_NO_LEASE})


def reversal_ident(saf: SafView, *, instance: str | None, stan: str, transmission_datetime: str,
                   now: float) -> Change | None:
    """`record_reversal_ident`: the STAN and field 7 every attempt of this reversal carries (an identical
    repeat), kept before the first attempt is sent. None when the entry has them already (the first
    write wins: a second sender or a restarted one must send the same message). Only for a pending
    entry, by the lease holder."""
    if saf.state is not SafState.PENDING:
        raise StateConflict("SAF entry", saf.saf_id, saf.state, "fix its STAN")
    _check_lease(saf, instance, "fix its STAN")
    if saf.reversal_stan is not None:
        return None
    return {"reversal_stan": stan, "reversal_datetime": transmission_datetime, "updated_at": now}
