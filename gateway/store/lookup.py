"""Operator lookups (`gateway journal find`): one transaction's whole story, for the day the paper is
gone and the customer wants a refund.

A `Case` is a journalled transaction with what the operator needs around it: what the receipt said
(masked card, amount, auth code, RRN), what the code meant, whether and how it was reversed (the SAF
entry: attempts, errors, the host's answer), late host answers, and the voids/refunds/reversals that
refer to it. Lookups by card take the PAN from the operator, hash it with the gateway's fingerprint
key and search by fingerprint: the PAN itself is never stored, printed or put in an error.

Sans-CLI: the command in `gateway.store.cli` parses arguments and prints; this module asks the store.
"""

from __future__ import annotations

import getpass
import sys
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, TextIO

from gateway.store.base import Store
from gateway.store.records import LateAnswer, Refusal, SafEntry, TxnQuery, TxnRecord, TxnState

#: field 39 in words (Q/CUP 006.6 A.2 and the gateway's own codes; shared/reference/cup-pos-dialect.md §5)
RESPONSE_MEANING: Final[dict[str, str]] = {
    "00": "approved", "01": "refer to card issuer", "03": "invalid merchant", "04": "pick up card",
    "05": "cardholder authentication failed", "06": "error", "12": "invalid original transaction",
    "13": "invalid amount", "14": "invalid card number", "15": "no such issuer",
    "22": "suspected malfunction / related transaction error", "25": "original transaction not found",
    "30": "format error", "33": "expired card", "34": "suspected fraud", "38": "PIN tries exceeded",
    "40": "function not supported", "41": "lost card", "43": "stolen card", "45": "fallback not allowed",
    "51": "insufficient funds", "54": "expired card", "55": "incorrect PIN", "57": "not allowed for this card",
    "58": "not allowed at this terminal", "59": "suspected fraud (CVN)", "61": "amount limit exceeded",
    "62": "restricted card", "64": "amount differs from the original", "65": "too many transactions",
    "75": "PIN tries exceeded", "77": "terminal must sign in again", "90": "cut-off in progress",
    "91": "issuer or host unavailable", "92": "cannot route", "94": "duplicate transaction",
    "96": "system malfunction", "97": "terminal not registered", "98": "no answer from the host in time",
    "99": "PIN block error", "A0": "MAC verification failed", "A7": "security processing failed",
}

STATE_MEANING: Final[dict[str, str]] = {
    TxnState.PENDING: "outcome unknown (in flight, or the gateway stopped; recovery reverses it)",
    TxnState.COMPLETED: "approved and delivered to the terminal: the receipt printed",
    TxnState.DECLINED: "refused: no money moved",
    TxnState.TIMED_OUT: "no host answer in time",
    TxnState.UNDELIVERABLE: "approved, but the answer never reached the terminal",
    TxnState.HOST_REJECTED: "the host's approval failed the gateway's checks",
    TxnState.REVERSAL_QUEUED: "being reversed (store-and-forward queue)",
    TxnState.REVERSED: "the host has undone it: no money moved in the end",
    TxnState.REVERSAL_FAILED: "reversal parked: an operator must retry or drop it (`gateway saf`)",
    TxnState.REVERSAL_DROPPED: "reversal closed by an operator (see the SAF note)",
}

#: ISO 4217 currencies without minor units; every other one is shown with two decimals
_NO_DECIMALS: Final = frozenset({"392", "410", "704"})


def meaning(rc: str | None) -> str:
    return RESPONSE_MEANING.get(rc or "", "") if rc else ""


def money(amount: int, currency: str) -> str:
    if currency in _NO_DECIMALS:
        return f"{amount}"
    return f"{amount // 100}.{amount % 100:02d}"


def iso(ts: float | None) -> str | None:
    """An epoch time as ISO 8601 in local time with its offset (what operators compare with paper)."""
    return None if ts is None else datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def parse_time(text: str, *, end_of_day: bool = False) -> float:
    """ISO 8601 date or date-time (local time unless it names an offset) → epoch seconds. A bare date
    as an upper bound means the end of that day."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 date or date-time (e.g. 2026-12-01 or "
                         f"2026-12-01T14:30)") from None
    if end_of_day and len(text.strip()) == 10:
        when = when.replace(hour=23, minute=59, second=59, microsecond=999_999)
    return when.timestamp()


class PanInputError(ValueError):
    """The operator's card number input is unusable (the message never contains it)."""


def read_pan(stream: TextIO | None = None, *, prompt: bool | None = None) -> str:
    """The PAN from a hidden prompt (a terminal) or one line of `stream` (a pipe). Spaces and dashes
    as printed on cards are dropped; 12 to 19 digits are required."""
    stream = stream or sys.stdin
    interactive = stream.isatty() if prompt is None else prompt
    text = getpass.getpass("card number (not shown): ") if interactive else stream.readline()
    pan = "".join(c for c in text if c not in " -\t\r\n")
    if not pan.isdigit() or not 12 <= len(pan) <= 19:
        raise PanInputError("the card number must be 12 to 19 digits")
    return pan


@dataclass(frozen=True, slots=True)
class Case:
    txn: TxnRecord
    reversal: SafEntry | None = None
    late_answers: tuple[LateAnswer, ...] = ()
    original: TxnRecord | None = None  #: what a void / refund / terminal reversal refers to
    related: tuple[TxnRecord, ...] = ()  #: voids, refunds and reversals that refer to this one


@dataclass(frozen=True, slots=True)
class Findings:
    cases: tuple[Case, ...]
    refusals: tuple[Refusal, ...] = field(default=())


async def build_case(store: Store, txn: TxnRecord) -> Case:
    reversal = await store.saf_for_txn(txn.txn_id)
    late = await store.late_answers(txn_id=txn.txn_id)
    original = await store.get(txn.orig_txn_id) if txn.orig_txn_id is not None else None
    related = await store.find_referencing(txn.txn_id)
    return Case(txn, reversal, tuple(late), original, tuple(related))


async def find(store: Store, query: TxnQuery, *, limit: int = 20, refusals: bool = False) -> Findings:
    """The transactions matching `query`, newest first, each as a `Case`; with `refusals`, also the
    requests the gateway refused itself for the same card / terminal / time range."""
    records = await store.search(query, limit=limit)
    cases = tuple([await build_case(store, rec) for rec in records])
    refused: list[Refusal] = []
    if refusals:
        refused = await store.refusals(terminal_id=query.terminal_id, pan_fingerprint=query.pan_fingerprint,
                                       since=query.since, until=query.until, limit=limit)
    return Findings(cases, tuple(refused))


# --- rendering ------------------------------------------------------------------------------------

_TIME_FIELDS: Final = frozenset({"created_at", "updated_at", "late_at", "late_approved_at", "queued_at",
                                 "next_attempt_at", "last_attempt_at", "received_at", "refused_at"})
#: never shown: the fingerprint identifies a card across the journal, like a PAN would
_HIDDEN_FIELDS: Final = frozenset({"pan_fingerprint"})


def record_json(obj: object) -> dict[str, Any]:
    """A store record as JSON-ready data: times ISO 8601, enums as text, no fingerprint."""
    out: dict[str, Any] = {}
    for name in getattr(obj, "__dataclass_fields__", {}):
        if name in _HIDDEN_FIELDS:
            continue
        value = getattr(obj, name)
        if name in _TIME_FIELDS:
            value = iso(value)
        elif isinstance(value, str):
            value = str(value)
        elif hasattr(value, "__dataclass_fields__"):
            value = record_json(value)
        out[name] = value
    return out


def case_json(case: Case) -> dict[str, Any]:
    txn = record_json(case.txn)
    txn["rc_meaning"] = meaning(case.txn.rc)
    txn["state_meaning"] = STATE_MEANING.get(case.txn.state, "")
    reversal = None
    if case.reversal is not None:
        reversal = record_json(case.reversal)
        reversal.pop("txn", None)
    return {
        "transaction": txn,
        "reversal": reversal,
        "late_answers": [record_json(late) for late in case.late_answers],
        "original": record_json(case.original) if case.original else None,
        "related": [record_json(r) for r in case.related],
    }


def findings_json(findings: Findings) -> dict[str, Any]:
    return {
        "transactions": [case_json(c) for c in findings.cases],
        "refusals": [record_json(r) | {"rc_meaning": meaning(r.rc)} for r in findings.refusals],
    }


def _code(rc: str | None) -> str:
    if not rc:
        return "-"
    text = meaning(rc)
    return f"{rc} ({text})" if text else rc


def render_case(case: Case) -> list[str]:
    t = case.txn
    lines = [
        f"txn {t.txn_id}  {t.kind}  {iso(t.created_at)}  {t.state}: {STATE_MEANING.get(t.state, '')}",
        f"  merchant {t.merchant_id}  terminal {t.terminal_id}  batch {t.batch}  STAN {t.terminal_stan}",
        f"  card {t.pan_masked or '-'} ({t.card_org})  amount {money(t.amount, t.currency)} "
        f"(currency {t.currency})",
        f"  answer {_code(t.rc)}  auth {t.auth_code or '-'}  RRN {t.rrn or '-'}  host STAN "
        f"{t.host_stan or '-'}  field 7 {t.transmission_datetime or '-'}",
    ]
    if case.original is not None:
        o = case.original
        lines.append(f"  refers to txn {o.txn_id} ({o.kind} {iso(o.created_at)}, STAN {o.terminal_stan}, "
                     f"RRN {o.rrn or '-'}, {o.state})")
    elif t.orig_rrn or t.orig_stan:
        lines.append(f"  refers to RRN {t.orig_rrn or '-'} batch {t.orig_batch or '-'} STAN {t.orig_stan or '-'}"
                     " (not in this journal)")
    for r in case.related:
        lines.append(f"  referred to by txn {r.txn_id}: {r.kind} {iso(r.created_at)} answer {_code(r.rc)}, {r.state}")
    rev = case.reversal
    if rev is not None:
        lines.append(f"  reversal {rev.saf_id}: {rev.state}, reason {_code(rev.reason)}, by {rev.initiator}, "
                     f"queued {iso(rev.queued_at)}")
        last = f", last {iso(rev.last_attempt_at)}" if rev.last_attempt_at else ""
        lines.append(f"    attempts {rev.attempts} (ever {rev.total_attempts}){last}"
                     + (f", next {iso(rev.next_attempt_at)}" if rev.state == "pending" else ""))
        for label, value in (("last error", rev.last_error), ("host answered", _code(rev.ack_rc) if rev.ack_rc
                             else None), ("parked", rev.parked_reason), ("operator note", rev.operator_note)):
            if value:
                lines.append(f"    {label}: {value}")
    elif t.reversal_reason:
        lines.append(f"  reversal reason {_code(t.reversal_reason)}, host answered {_code(t.reversal_rc)}")
    for late in case.late_answers:
        lines.append(f"  late host answer {iso(late.received_at)}: {_code(late.rc)} auth {late.auth_code or '-'} "
                     f"RRN {late.rrn or '-'} (journalled, never forwarded)")
    return lines


def render_refusal(r: Refusal) -> str:
    what = " ".join(x for x in (r.kind or r.mti, f"amount {r.amount}" if r.amount is not None else "",
                                r.pan_masked) if x)
    return (f"refused {iso(r.refused_at)}  terminal {r.terminal_id}  STAN {r.stan or '-'}  {what}: "
            f"{_code(r.rc)}: {r.reason}")


def render_findings(findings: Findings) -> str:
    if not findings.cases and not findings.refusals:
        return "(none)"
    blocks = ["\n".join(render_case(c)) for c in findings.cases]
    if findings.refusals:
        blocks.append("refused by the gateway itself (no money moved):\n"
                      + "\n".join("  " + render_refusal(r) for r in findings.refusals))
    return "\n\n".join(blocks)
