"""What the journal keeps: transaction records, SAF entries, late answers, and the tables of which state
may follow which (`machine` holds the transitions themselves). Pure data and pure functions, shared by
every backend.

A record keeps what settlement, refunds, reversals and investigations need, and nothing secret: the
PAN only masked (6+4) and as a keyed fingerprint (HMAC-SHA256) for matching; never the PIN block,
track data, CVV or the clear PAN. `TxnRequest` is what is known before the request goes upstream;
`TxnRecord` adds what the store and the outcome add.

States of a transaction::

    pending ──▶ completed | declined | timed_out | undeliverable | host_rejected
    completed ──▶ undeliverable                  (the approval was journalled, then could not be written)
    pending | completed | timed_out | undeliverable | host_rejected ──▶ reversal_queued
    reversal_queued ──▶ reversed | reversal_failed (parked) | reversal_dropped (operator)
    reversal_failed ──▶ reversal_queued (operator retry) | reversed | reversal_dropped
    reversal_dropped ──▶ reversed                (the host acknowledged after all: its word wins)

`reversed_from` keeps the state a transaction had when its reversal was queued, so "timed out",
"undeliverable" and "host rejected" stay visible after the reversal.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, TypeVar

from gateway.iso.message import mask_pan
from gateway.iso.totals import CardTotals, SettlementTotals
from gateway.store.errors import InvalidRecord

_E = TypeVar("_E", bound=StrEnum)


class TxnKind(StrEnum):
    PURCHASE = "purchase"
    VOID = "void"
    REFUND = "refund"
    BALANCE_INQUIRY = "balance_inquiry"
    PREAUTH = "preauth"
    PREAUTH_VOID = "preauth_void"
    COMPLETION = "completion"  #: pre-authorisation completion
    COMPLETION_VOID = "completion_void"
    OFFLINE_SALE = "offline_sale"
    #: a terminal's own 0400, journalled for the record; it is never itself settled or reversed
    REVERSAL = "reversal"

    @classmethod
    def _missing_(cls, value: object) -> TxnKind | None:
        return _KIND_ALIASES.get(value) if isinstance(value, str) else None


_KIND_ALIASES: Final[dict[str, TxnKind]] = {
    "balance": TxnKind.BALANCE_INQUIRY,
    "void_reversal": TxnKind.REVERSAL,
}


class TxnState(StrEnum):
    PENDING = "pending"  #: journalled before sending upstream; outcome unknown
    COMPLETED = "completed"  #: approved and delivered to the terminal
    DECLINED = "declined"  #: the host (or the gateway) refused it: no money moved
    TIMED_OUT = "timed_out"  #: no host answer in time (non-reversible kinds stay here)
    UNDELIVERABLE = "undeliverable"  #: approved, but the answer could not be written to the terminal
    HOST_REJECTED = "host_rejected"  #: an approval that failed validation (bad host MAC, wrong amount)
    REVERSAL_QUEUED = "reversal_queued"
    REVERSED = "reversed"
    REVERSAL_FAILED = "reversal_failed"  #: parked: the SAF gave up, an operator must act
    REVERSAL_DROPPED = "reversal_dropped"  #: an operator closed the reversal by hand


class SafState(StrEnum):
    PENDING = "pending"  #: waiting for its next attempt
    DONE = "done"  #: the host acknowledged the reversal
    PARKED = "parked"  #: given up; needs an operator (retry or drop)
    DROPPED = "dropped"  #: closed by an operator, with a note


class ReversalInitiator(StrEnum):
    GATEWAY = "gateway"  #: timeout, undeliverable approval, rejected approval, restart recovery
    TERMINAL = "terminal"  #: the terminal sent a 0400
    OPERATOR = "operator"


#: field 39 of a 0400: why it is reversed (reference §4.5)
REASON_TIMEOUT: Final = "98"
REASON_TERMINAL_FAILURE: Final = "96"  #: approved, but could not be completed (e.g. undeliverable)
REASON_MAC_FAILURE: Final = "A0"  #: the approval's MAC did not verify
REASON_OTHER: Final = "06"

OUTCOME_STATES: Final = frozenset({
    TxnState.COMPLETED, TxnState.DECLINED, TxnState.TIMED_OUT, TxnState.UNDELIVERABLE, TxnState.HOST_REJECTED,
})
#: record_outcome: current state → states it may move to
OUTCOME_TRANSITIONS: Final[dict[TxnState, frozenset[TxnState]]] = {
    TxnState.PENDING: OUTCOME_STATES,
    TxnState.COMPLETED: frozenset({TxnState.UNDELIVERABLE}),
}
#: states from which a reversal may be queued (money moved, or may have)
REVERSIBLE_STATES: Final = frozenset(
    {TxnState.PENDING, TxnState.COMPLETED, TxnState.TIMED_OUT, TxnState.UNDELIVERABLE, TxnState.HOST_REJECTED}
)
#: states a transaction is in once a reversal exists for it (queueing again is a no-op)
REVERSAL_STATES: Final = frozenset(
    {TxnState.REVERSAL_QUEUED, TxnState.REVERSED, TxnState.REVERSAL_FAILED, TxnState.REVERSAL_DROPPED}
)
#: StateConflict texts shared by the backends
MISSING_SAF: Final = "queue a reversal: its SAF entry is missing"
ONLY_PARKED: Final = "retry it (only a parked entry can be retried)"
#: SAF entries still needing action: the queue depth reported to the observer
OPEN_SAF_STATES: Final = (SafState.PENDING, SafState.PARKED)
#: the host's "original not found" to a reversal: final (nothing was booked) unless the host approves
#: that original afterwards after all, e.g. when the reversal overtook a slow original on the host's side
RC_ORIGINAL_NOT_FOUND: Final = "25"
#: host answers that approve the whole amount (reference §5: 00; 11 VIP approval; A2/A4/A5/A6 "defective
#: success", which terminals treat as success): the customer is charged, so each is delivered or reversed
APPROVAL_RCS: Final = frozenset({"00", "11", "A2", "A4", "A5", "A6"})
#: partial approval: part of the amount was charged. The gateway offers no partial approval to terminals,
#: so such an answer is reversed as one it cannot carry (the terminal gets 96)
RC_PARTIAL_APPROVAL: Final = "10"
#: host answers after which money moved: a late one of these (with a MAC that verified) booked the original
CHARGED_RCS: Final = APPROVAL_RCS | {RC_PARTIAL_APPROVAL}
#: the last_error of a reversal reopened by a late approval
REOPENED_BY_LATE_APPROVAL: Final = "the host approved the original after answering its reversal 25"


#: what a host may answer to a reversal of an original it has not booked (`host.unknown_reversal_rc`)
UNKNOWN_REVERSAL_RCS: Final = (RC_ORIGINAL_NOT_FOUND, "00")


def check_unknown_rc(value: object) -> str:
    if value not in UNKNOWN_REVERSAL_RCS:
        raise InvalidRecord(f"not one of {', '.join(UNKNOWN_REVERSAL_RCS)}", field="unknown_rc")
    return str(value)


def not_found_overtaken(reversal_rc: str | None, late_approved_at: float | None) -> bool:
    """Whether a reversal answered "original not found" is contradicted by an (authenticated) late
    approval of that original: then the reversal must go again, or the card stays charged."""
    return reversal_rc == RC_ORIGINAL_NOT_FOUND and late_approved_at is not None


@dataclass(frozen=True, slots=True)
class LateRecorded:
    """What `Store.record_late_answer` did."""

    late_id: int
    #: the late answer was an approval that reopened a reversal the host had answered 25
    reopened: bool = False


#: settlement (reference §3.7): a voided purchase stays in debit and the void is counted in credit
DEBIT_KINDS: Final = frozenset({TxnKind.PURCHASE, TxnKind.COMPLETION, TxnKind.OFFLINE_SALE})
CREDIT_KINDS: Final = frozenset({TxnKind.VOID, TxnKind.REFUND, TxnKind.COMPLETION_VOID})
#: card organisations settled as 内卡 (CUP); "000" is what terminals send when they do not know
DOMESTIC_CARD_ORGS: Final = frozenset({"CUP", "000", ""})


#: the kinds whose amount is checked against their original's, before they go out and again when written
CHECKED_CREDIT_KINDS: Final = frozenset({TxnKind.VOID, TxnKind.REFUND})
#: the states of a void or refund after which it surely did not move money
_NO_MONEY_MOVED: Final = frozenset({TxnState.DECLINED, TxnState.REVERSED})


def credit_refusal(kind: TxnKind | str, amount: int, original: TxnRecord | None,
                   earlier: Iterable[TxnRecord]) -> str | None:
    """For a void or refund of `amount` against `original`: 25 no original, 12 the original is not a
    completed purchase or was voided already, 64 the amount does not fit (a void must equal the
    original; refunds together may not exceed it). `earlier` are the voids/refunds already journalled
    against the original: every one counts unless it is known that no money moved (declined, or
    reversed). In flight, timed out (a refund is not reversible: the host may have credited it),
    undeliverable or rejected after the host approved it, or a void whose reversal is still open: the
    host may hold it, so a second one could credit the cardholder twice; an operator settles those.
    The service asks before sending; the stores ask again inside the write that journals the request,
    where no other void or refund can slip in between. A void after a standing refund is refused too
    (12): it would credit the whole sale again."""
    if original is None:
        return "25"
    if original.kind != TxnKind.PURCHASE or original.state is not TxnState.COMPLETED:
        return "12"
    standing = [r for r in earlier if r.state not in _NO_MONEY_MOVED]
    if any(r.kind == TxnKind.VOID for r in standing):
        return "12"
    if kind == TxnKind.VOID:
        if any(r.kind == TxnKind.REFUND for r in standing):
            return "12"  # the void credits the whole sale: with a refund standing it would credit more
        return "64" if amount != original.amount else None
    refunded = sum(r.amount for r in standing if r.kind == TxnKind.REFUND)
    return "64" if refunded + amount > original.amount else None


def reversal_refusal(original: TxnRecord, referencing: Iterable[TxnRecord]) -> str | None:
    """For a terminal's 0400 of `original`: 12 while a void or refund of that sale stands (it may have
    credited the card; reversing the sale too would credit it twice — the terminal may reverse the void
    instead). `referencing` are the journal entries whose original it is. The service asks before
    queueing; the stores ask again inside the write that queues the reversal, where a void journalled
    on another connection or instance at the same moment cannot slip in between."""
    if original.kind != TxnKind.PURCHASE:
        return None
    if any(r.kind in CHECKED_CREDIT_KINDS and r.state not in _NO_MONEY_MOVED for r in referencing):
        return "12"
    return None


def outcome_allowed(current: TxnState, new: TxnState) -> bool:
    """Whether `record_outcome` may move a transaction from `current` to `new`. Repeating the same
    outcome is allowed (a retried write after an error that left the caller unsure)."""
    return (new == current and new in OUTCOME_STATES) or new in OUTCOME_TRANSITIONS.get(current, ())


def outcome_sources(new: TxnState) -> tuple[TxnState, ...]:
    """The states `record_outcome` may move to `new` from."""
    return _OUTCOME_SOURCES.get(new, ())


_OUTCOME_SOURCES: Final = {new: tuple(s for s in TxnState if outcome_allowed(s, new)) for new in OUTCOME_STATES}


def reversal_from(current: TxnState, state: TxnState | None) -> TxnState:
    """The state recorded as `reversed_from` when a reversal is queued from `current`, optionally
    recording outcome `state` in the same step. Raises `InvalidRecord` when `state` cannot be."""
    if state is None:
        return current
    if state not in REVERSIBLE_STATES or state == TxnState.PENDING:
        raise InvalidRecord(f"a reversal cannot record outcome {state}", field="state")
    return state


# --- argument checks shared by the backends -----------------------------------------------------------

MAX_TEXT: Final = 500  #: error texts, park reasons and operator notes are clipped to this


def parse_enum(enum: type[_E], value: object, name: str) -> _E:
    if not isinstance(value, str):
        raise InvalidRecord(f"not a valid {enum.__name__}", field=name)
    try:
        return enum(value)
    except ValueError:
        raise InvalidRecord(f"not a valid {enum.__name__}", field=name) from None


def parse_outcome(value: object) -> TxnState:
    """The state `record_outcome` is asked to record: one of OUTCOME_STATES."""
    state = parse_enum(TxnState, value, "state")
    if state not in OUTCOME_STATES:
        raise InvalidRecord(f"{state} is not an outcome", field="state")
    return state


def check_reason(reason: object) -> str:
    """A reversal reason is a 2-character field 39 (98 / 96 / A0 / 06)."""
    if not isinstance(reason, str) or len(reason) != 2 or not reason.isalnum():
        raise InvalidRecord("expected a 2-character reversal reason code", field="reason")
    return reason


def check_limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidRecord("expected a positive integer", field="limit")
    return limit


def check_id(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRecord("expected an integer id", field=name)
    return value


def check_ident(stan: object, transmission_datetime: object) -> None:
    """A reversal's own field 11 (6 digits) and field 7 (MMDDhhmmss)."""
    _digits(stan, 6, "reversal_stan")
    _digits(transmission_datetime, 10, "reversal_datetime")


def check_outcome_args(txn_id: object, rc: object, auth_code: object, rrn: object) -> None:
    check_id(txn_id, "txn_id")
    check_rc(rc)
    _text(auth_code, 1, 6, "auth_code", optional=True)
    _text(rrn, 1, 12, "rrn", optional=True)


def check_late_args(rc: object, amount: object) -> None:
    """A late answer is journalled whatever it holds, so only its shape is checked (rc may be empty)."""
    if not isinstance(rc, str) or len(rc) > 2:
        raise InvalidRecord("expected a response code of at most 2 characters", field="rc")
    if amount is not None and (isinstance(amount, bool) or not isinstance(amount, int) or amount < 0):
        raise InvalidRecord("expected a non-negative integer amount", field="amount")


_PAN_LIKE: Final = re.compile(r"\d{13,19}")


def clip_text(value: object, name: str, *, required: bool = False) -> str:
    """Free text (errors, reasons, notes): a string, clipped to MAX_TEXT characters, with anything that
    looks like a PAN (13 to 19 digits in a row) masked 6+4, in case an error message quoted one."""
    if not isinstance(value, str) or (required and not value.strip()):
        raise InvalidRecord("expected a non-empty text" if required else "expected a text", field=name)
    return _PAN_LIKE.sub(lambda m: mask_pan(m.group()), value)[:MAX_TEXT]


# --- PAN fingerprint -------------------------------------------------------------------------------

MIN_PAN_KEY_BYTES: Final = 16


def pan_fingerprint(key: bytes, pan: str) -> str:
    """HMAC-SHA256 of the PAN digits under `key`, 64 lowercase hex characters: matches the same card
    across transactions without storing the PAN. Keep the key out of the database (configuration)."""
    if not isinstance(key, bytes | bytearray) or len(key) < MIN_PAN_KEY_BYTES:
        raise InvalidRecord(f"the key must be at least {MIN_PAN_KEY_BYTES} bytes", field="pan_key")
    if not isinstance(pan, str) or not pan.isdigit() or not 8 <= len(pan) <= 19:
        raise InvalidRecord("a PAN is 8 to 19 digits", field="pan")  # never echo the value
    return hmac.new(bytes(key), pan.encode("ascii"), hashlib.sha256).hexdigest()


# --- records ---------------------------------------------------------------------------------------


def _digits(value: object, length: int, name: str, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or len(value) != length or not value.isdigit():
        raise InvalidRecord(f"expected {length} digits", field=name)


def _text(value: object, low: int, high: int, name: str, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not low <= len(value) <= high or not value.isprintable():
        raise InvalidRecord(f"expected {low}..{high} printable characters", field=name)


def check_rc(value: object, name: str = "rc") -> None:
    """Response codes are 2 characters ("00", "A0")."""
    _text(value, 2, 2, name, optional=True)


def check_masked_pan(value: object) -> None:
    if not isinstance(value, str) or len(value) > 19:
        raise InvalidRecord("expected a masked PAN of at most 19 characters", field="pan_masked")
    if sum(c.isdigit() for c in value) > 10:  # 6 + 4 shown at most; more is (part of) a clear PAN
        raise InvalidRecord("more than 10 digits shown: mask the PAN (6+4)", field="pan_masked")


def check_fingerprint(value: object) -> None:
    if not isinstance(value, str) or (
        value and (len(value) != 64 or value.strip("0123456789abcdef") != "")
    ):
        raise InvalidRecord("expected 64 lowercase hex characters (or empty)", field="pan_fingerprint")


@dataclass(frozen=True, slots=True, kw_only=True)
class TxnRequest:
    """A financial request as journalled before it goes upstream. Validated on construction."""

    terminal_id: str  #: field 41, 8 characters
    merchant_id: str  #: field 42, 15 characters
    batch: str  #: 60.2, 6 digits
    terminal_stan: str  #: the terminal's field 11
    terminal_mti: str
    processing_code: str  #: field 3
    kind: TxnKind
    amount: int  #: minor units
    currency: str  #: field 49, e.g. "156"
    pan_masked: str  #: 6+4, e.g. "622202******1234"; "" when the request carried no PAN
    pan_fingerprint: str  #: `pan_fingerprint(key, pan)`; "" when no PAN
    card_org: str = "CUP"  #: CUP for 内卡; VIS, MCC, JCB, AMX ... for 外卡
    host_mti: str | None = None  #: the MTI sent upstream (field 90's original MTI)
    host_stan: str | None = None  #: the host link's field 11
    transmission_datetime: str | None = None  #: the host request's field 7, MMDDhhmmss (field 90)
    pos_entry_mode: str | None = None  #: field 22, copied into a reversal
    pos_condition_code: str | None = None  #: field 25, copied into a reversal
    orig_txn_id: int | None = None  #: the journal entry a void/refund/reversal refers to, when known
    orig_batch: str | None = None  #: 61.1
    orig_stan: str | None = None  #: 61.2
    orig_rrn: str | None = None  #: field 37 of a void/refund
    orig_date: str | None = None  #: 61.3, MMDD
    orig_auth_code: str | None = None  #: field 38 of a void

    def __post_init__(self) -> None:
        validate_request(self)


def validate_request(rec: TxnRequest) -> None:
    try:
        object.__setattr__(rec, "kind", TxnKind(rec.kind))
    except ValueError:
        raise InvalidRecord("unknown transaction kind", field="kind") from None
    _text(rec.terminal_id, 8, 8, "terminal_id")
    _text(rec.merchant_id, 15, 15, "merchant_id")
    _digits(rec.batch, 6, "batch")
    _digits(rec.terminal_stan, 6, "terminal_stan")
    _digits(rec.terminal_mti, 4, "terminal_mti")
    _digits(rec.processing_code, 6, "processing_code")
    if isinstance(rec.amount, bool) or not isinstance(rec.amount, int) or not 0 <= rec.amount < 10**12:
        raise InvalidRecord("expected an integer amount in minor units, 0 ≤ amount < 10^12", field="amount")
    _text(rec.currency, 3, 3, "currency")
    check_masked_pan(rec.pan_masked)
    check_fingerprint(rec.pan_fingerprint)
    _text(rec.card_org, 0, 3, "card_org")
    _digits(rec.host_mti, 4, "host_mti", optional=True)
    _digits(rec.host_stan, 6, "host_stan", optional=True)
    _digits(rec.transmission_datetime, 10, "transmission_datetime", optional=True)
    _text(rec.pos_entry_mode, 1, 4, "pos_entry_mode", optional=True)
    _text(rec.pos_condition_code, 1, 2, "pos_condition_code", optional=True)
    if rec.orig_txn_id is not None:
        check_id(rec.orig_txn_id, "orig_txn_id")
    _digits(rec.orig_batch, 6, "orig_batch", optional=True)
    _digits(rec.orig_stan, 6, "orig_stan", optional=True)
    _text(rec.orig_rrn, 1, 12, "orig_rrn", optional=True)
    _digits(rec.orig_date, 4, "orig_date", optional=True)
    _text(rec.orig_auth_code, 1, 6, "orig_auth_code", optional=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class TxnRecord(TxnRequest):
    """A journal entry: the request plus its id, state and outcome. Built by the store only."""

    txn_id: int
    state: TxnState
    rc: str | None = None  #: the host's field 39 (or the gateway's own answer)
    auth_code: str | None = None  #: field 38
    rrn: str | None = None  #: field 37 assigned by the host
    reversal_reason: str | None = None  #: 98 / 96 / A0 / 06
    reversal_initiator: ReversalInitiator | None = None
    reversed_from: TxnState | None = None  #: the state when the reversal was queued
    reversal_rc: str | None = None  #: the host's answer to the reversal
    late_rc: str | None = None  #: the latest host answer that came after the timeout
    late_at: float | None = None
    #: when a late approval whose MAC verified came (never cleared by later late answers)
    late_approved_at: float | None = None
    created_at: float
    updated_at: float

    def __post_init__(self) -> None:
        pass  # validated when it was journalled; rows read back are trusted

    @property
    def approved(self) -> bool:
        return self.rc in APPROVAL_RCS


#: column order of the journal table; the SQL backend selects exactly these
TXN_COLUMNS: Final = tuple(TxnRecord.__dataclass_fields__)
REQUEST_COLUMNS: Final = tuple(TxnRequest.__dataclass_fields__)


def txn_from_row(row: tuple[object, ...]) -> TxnRecord:
    """A `TxnRecord` from a row in `TXN_COLUMNS` order (enums restored)."""
    values: dict[str, Any] = dict(zip(TXN_COLUMNS, row, strict=True))
    values["kind"] = TxnKind(values["kind"])
    values["state"] = TxnState(values["state"])
    if values["reversed_from"] is not None:
        values["reversed_from"] = TxnState(values["reversed_from"])
    if values["reversal_initiator"] is not None:
        values["reversal_initiator"] = ReversalInitiator(values["reversal_initiator"])
    return TxnRecord(**values)


@dataclass(frozen=True, slots=True, kw_only=True)
class SafEntry:
    """One queued reversal with everything needed to build its 0400/0401 (or 0420/0421): the journal
    record of the original (`txn`, no PAN) and the attempt count. Attempt 0 goes as 0400, repeats as
    0401 (`is_repeat`)."""

    saf_id: int
    txn_id: int
    state: SafState
    reason: str  #: field 39 of the reversal (98 / 96 / A0 / 06)
    initiator: ReversalInitiator
    attempts: int  #: attempts since queued (or since the last operator retry); a timeout counts
    total_attempts: int  #: never reset: every attempt ever made
    queued_at: float
    next_attempt_at: float
    last_attempt_at: float | None = None
    last_error: str | None = None
    ack_rc: str | None = None
    parked_reason: str | None = None
    operator_note: str | None = None
    updated_at: float
    #: field 11 and 7 of this reversal, fixed before its first attempt went out so that every repeat is
    #: the same message (None: not sent yet, or sent with a fresh STAN per attempt)
    reversal_stan: str | None = None
    reversal_datetime: str | None = None
    #: the instance whose SAF sender holds the entry, and until when (database clock); None on the
    #: single-instance stores
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    txn: TxnRecord

    @property
    def is_repeat(self) -> bool:
        """Send as a repeat (0401/0421): an earlier attempt may have reached the host (one was counted,
        or its STAN was fixed for sending)."""
        return self.attempts > 0 or self.reversal_stan is not None


SAF_COLUMNS: Final = tuple(name for name in SafEntry.__dataclass_fields__ if name != "txn")


def saf_from_row(row: tuple[object, ...], txn: TxnRecord) -> SafEntry:
    values: dict[str, Any] = dict(zip(SAF_COLUMNS, row, strict=True))
    values["state"] = SafState(values["state"])
    values["initiator"] = ReversalInitiator(values["initiator"])
    return SafEntry(**values, txn=txn)


@dataclass(frozen=True, slots=True)
class QueuedReversal:
    """What `queue_reversal` did. True only when this call created the SAF entry, so
    `if await store.queue_reversal(...):` reads "a new reversal was queued (wake the sender)"; a repeat
    for the same transaction returns the existing entry with `created=False`."""

    entry: SafEntry
    created: bool

    @property
    def saf_id(self) -> int:
        return self.entry.saf_id

    def __bool__(self) -> bool:
        return self.created


@dataclass(frozen=True, slots=True, kw_only=True)
class LateAnswer:
    """A host answer that came after its request timed out: journalled, never forwarded."""

    late_id: int
    txn_id: int | None  #: None when it matched nothing journalled
    rc: str
    auth_code: str | None = None
    rrn: str | None = None
    host_mti: str | None = None
    host_stan: str | None = None
    terminal_id: str | None = None
    amount: int | None = None
    received_at: float


LATE_COLUMNS: Final = tuple(LateAnswer.__dataclass_fields__)


# --- refusals --------------------------------------------------------------------------------------

#: the journal keeps at most this many refusals by default: the oldest go first, so a flood of garbage
#: from a terminal (or an attacker) cannot fill the disk
DEFAULT_MAX_REFUSALS: Final = 100_000


@dataclass(frozen=True, slots=True, kw_only=True)
class RefusalRecord:
    """A request the gateway refused itself, before any money moved (A0, 77, 97, 03, 61, 94, 30, 40,
    91, 96 …): kept so an operator can say why a merchant's refund "shows system error". No money
    state; the PAN only masked and as a fingerprint. Values that came from the terminal are clipped
    and checked for shape, never trusted."""

    terminal_id: str  #: field 41 as sent (maybe unregistered), at most 16 printable characters
    mti: str  #: the request's MTI
    rc: str  #: the code the terminal got
    reason: str  #: why, in words (clipped, PAN-like digit runs masked)
    merchant_id: str | None = None
    batch: str | None = None
    stan: str | None = None
    kind: str | None = None  #: the flow (purchase, refund, ...) when it was identified
    amount: int | None = None
    pan_masked: str = ""
    pan_fingerprint: str = ""

    def __post_init__(self) -> None:
        # what the terminal sent is kept as well as it can be shown, never refused: a refusal of garbage
        # must be recorded too
        for name, limit in _TERMINAL_TEXT_LIMITS.items():
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, printable(value, limit))
        check_rc(self.rc)
        object.__setattr__(self, "reason", clip_text(self.reason, "reason", required=True))
        _text(self.kind, 0, 20, "kind", optional=True)
        if self.amount is not None and (
            isinstance(self.amount, bool) or not isinstance(self.amount, int) or not 0 <= self.amount < 10**12
        ):
            raise InvalidRecord("expected a non-negative integer amount", field="amount")
        check_masked_pan(self.pan_masked)
        check_fingerprint(self.pan_fingerprint)


@dataclass(frozen=True, slots=True, kw_only=True)
class Refusal(RefusalRecord):
    """A journalled refusal."""

    refusal_id: int
    refused_at: float

    def __post_init__(self) -> None:
        pass  # validated when it was journalled


_TERMINAL_TEXT_LIMITS: Final = {"terminal_id": 16, "mti": 4, "merchant_id": 15, "batch": 6, "stan": 6}


def printable(value: object, limit: int) -> str:
    """A value from the wire as a short printable text: other characters become '?', clipped to
    `limit`, and a run of 13+ digits (a PAN where it does not belong) masked 6+4."""
    text = value if isinstance(value, str) else repr(value)
    shown = "".join(c if c.isprintable() else "?" for c in text[: limit * 4])
    return _PAN_LIKE.sub(lambda m: mask_pan(m.group()), shown)[:limit]


REFUSAL_RECORD_COLUMNS: Final = tuple(RefusalRecord.__dataclass_fields__)
REFUSAL_COLUMNS: Final = tuple(Refusal.__dataclass_fields__)


# --- operator lookups ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TxnQuery:
    """What an operator looks a transaction up by (`Store.search`); every given filter must match.
    `since`/`until` bound `created_at` (epoch seconds, `until` exclusive). The card is searched by its
    fingerprint: the operator types the PAN, the store never sees it."""

    terminal_id: str | None = None
    batch: str | None = None
    terminal_stan: str | None = None
    host_stan: str | None = None
    rrn: str | None = None
    auth_code: str | None = None
    amount: int | None = None
    kind: TxnKind | None = None
    state: TxnState | None = None
    pan_fingerprint: str | None = None
    since: float | None = None
    until: float | None = None

    def matches(self, rec: TxnRecord) -> bool:
        """The same filter in Python (the memory backend; a check for the SQL ones)."""
        for name in _EQUALITY_FILTERS:
            wanted = getattr(self, name)
            if wanted is not None and getattr(rec, name) != wanted:
                return False
        if self.since is not None and rec.created_at < self.since:
            return False
        return self.until is None or rec.created_at < self.until

    def equalities(self) -> dict[str, object]:
        """column → value for every equality filter that is given (the SQL backends' WHERE)."""
        return {name: getattr(self, name) for name in _EQUALITY_FILTERS if getattr(self, name) is not None}


_EQUALITY_FILTERS: Final = ("terminal_id", "batch", "terminal_stan", "host_stan", "rrn", "auth_code", "amount",
                            "kind", "state", "pan_fingerprint")


# --- settlement ------------------------------------------------------------------------------------


def is_domestic(card_org: str) -> bool:
    return card_org in DOMESTIC_CARD_ORGS


def totals_from_groups(groups: Iterable[tuple[str, str, int, int]]) -> SettlementTotals:
    """Settlement totals from (kind, card_org, count, amount) groups of *completed* transactions."""
    sides = {True: CardTotals(), False: CardTotals()}
    for kind, card_org, count, amount in groups:
        domestic = is_domestic(card_org)
        t = sides[domestic]
        if kind in DEBIT_KINDS:
            t = CardTotals(t.debit_amount + amount, t.debit_count + count, t.credit_amount, t.credit_count)
        elif kind in CREDIT_KINDS:
            t = CardTotals(t.debit_amount, t.debit_count, t.credit_amount + amount, t.credit_count + count)
        sides[domestic] = t
    return SettlementTotals(domestic=sides[True], foreign=sides[False])


@dataclass(frozen=True, slots=True)
class SafSummary:
    """The queue at a glance, for metrics and alerts (`Store.saf_summary`)."""

    pending: int
    parked: int
    #: `queued_at` of the oldest pending reversal (epoch seconds); None when none is pending
    oldest_pending_queued_at: float | None

