"""Response-code decisions for terminal requests. Pure functions: a request and some state in, a code
or an answer out; unit-testable without sockets.

Codes (reference §3.9, §5): 77 not signed in / batch mismatch (with the header's re-sign-in flag),
97 terminal not registered, A0 bad MAC (answer carries no MAC), 99 PIN block, A7 security failure,
30 format/validation error, 40 unsupported transaction, 61 limits, 25 original not found,
12 invalid original (declined / already reversed), 64 amount differs from the original, 94 duplicate,
91 host unavailable, 98 host timeout, 96 system error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime

from gateway.core.clock import local_now
from gateway.core.sessions import TerminalSession
from gateway.iso.build import response
from gateway.iso.message import Message
from gateway.store.records import RC_PARTIAL_APPROVAL, TxnKind, TxnRecord, TxnState, credit_refusal

TERMINAL_DIALECT = "cup-pos"

#: called with True when the answer reached the terminal, False when it could not be written
OnDelivery = Callable[[bool], Awaitable[None]]

#: request MTIs the terminal side knows; any other request MTI is a format error (30),
#: a known one with an unknown processing code / 60.3 is an unsupported transaction (40)
KNOWN_REQUEST_MTIS = frozenset({"0100", "0200", "0220", "0320", "0400", "0401", "0500", "0620", "0800", "0820"})

#: requests that may move money and that a terminal reversal may refer to while they are in flight
FINANCIAL_REQUEST_MTIS = frozenset({"0200", "0220"})

#: originals whose reversal must go to the host (queue_reversal is idempotent for those already queued)
REVERSIBLE_STATES = frozenset({
    TxnState.PENDING, TxnState.COMPLETED, TxnState.TIMED_OUT, TxnState.UNDELIVERABLE,
    TxnState.HOST_REJECTED, TxnState.REVERSAL_QUEUED,
})


def answer(request: Message, rc: str, **extra: str) -> Message:
    """The terminal-dialect response with the flow's echoed fields (and a MAC placeholder where due)."""
    return response(request, rc, TERMINAL_DIALECT, **extra)


#: the same builder; the name says at the call site that this answer turns the request down
refuse = answer


def unsupported_rc(request: Message) -> str:
    return "40" if request.mti in KNOWN_REQUEST_MTIS else "30"


def batch_of(request: Message) -> str:
    """60.2, the terminal's current batch."""
    return request.fields.get("60", "")[2:8]


def screen_session(request: Message, session: TerminalSession | None) -> str | None:
    """77 when the terminal is not signed in or its batch differs from the one it signed in with."""
    if session is None or batch_of(request) != session.batch:
        return "77"
    return None


def sign_in_request(request: Message, default_mode: str) -> tuple[str, str]:
    """(batch, key mode) of a sign-in: 60.2 and 60.3 (001 / 003 / 004)."""
    f60 = request.fields.get("60", "")
    batch = f60[2:8] if len(f60) >= 8 and f60[2:8].isdigit() else "000001"
    mode = f60[8:11] if f60[8:11] in ("001", "003", "004") else default_mode
    return batch, mode


def local_time_fields(now: datetime | None = None) -> dict[str, str]:
    if now is None:
        local = local_now()
        return {"field_12": local.hhmmss, "field_13": local.mmdd}
    return {"field_12": now.strftime("%H%M%S"), "field_13": now.strftime("%m%d")}


def sign_in_answer(request: Message, key_block: bytes, acquirer_id: str, rrn: str) -> Message:
    return answer(request, "00", field_32=acquirer_id, field_37=rrn, field_62=key_block.hex().upper(),
                  **local_time_fields())


def check_host_answer(host_request: Message, host_answer: Message, mac_ok: bool) -> str | None:
    """Why an approval from the host cannot be trusted, or None. An untrusted approval is reversed."""
    if not mac_ok:
        return "the host's MAC does not verify"
    if host_answer.fields.get("39") == RC_PARTIAL_APPROVAL:
        return "a partial approval (10), which the gateway does not offer terminals"
    for key in ("3", "4", "41"):
        if host_answer.fields.get(key, host_request.fields.get(key)) != host_request.fields.get(key):
            return f"field {key} differs from the request"
    for key in ("2", "49"):  # the card and the currency it approves, where the request named them
        asked = host_request.fields.get(key)
        if asked is not None and host_answer.fields.get(key, asked) != asked:
            return f"field {key} differs from the request"
    return None


def original_problem(request: Message, original: TxnRecord | None, earlier: Sequence[TxnRecord], *,
                     flow_name: str) -> str | None:
    """For voids and refunds, before the request goes out: `records.credit_refusal`'s answer (25, 12,
    64 or None) for the request's amount (field 4)."""
    kind = TxnKind.VOID if flow_name == "void" else TxnKind.REFUND
    return credit_refusal(kind, int(request.fields.get("4", "0") or 0), original, earlier)


def terminal_reversal_rc(request: Message, original: TxnRecord | None, unknown_rc: str,
                         reverses: Sequence[str] = ("purchase",)) -> str:
    """A terminal's 0400: 00 once the original is (or will be) reversed, or was never approved; the
    configured code (25 or 00) when the gateway never saw the original; 12 when the original is not a
    kind this reversal may undo (a purchase reversal naming a refund); 64 for a different amount."""
    if original is None:
        return unknown_rc
    if original.kind not in reverses:
        return "12"
    if int(request.fields.get("4", "0") or 0) != original.amount:
        return "64"
    return "00"


def needs_host_reversal(original: TxnRecord) -> bool:
    return original.state in REVERSIBLE_STATES
