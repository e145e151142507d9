"""Hand-written cases (jPOS-EE style) in the rules file, run by `trace replay` beside the recorded ones
or alone: a request (a flow with a few values, and any fields given literally) and rules for the
expected answer. As in jPOS-EE's client simulator, fields the expectation does not name are not
compared; the MAC of the answer is always verified.

    [[case]]
    name = "purchase over the risk limit is refused"
    terminal = "10000001"            # default: the first terminal of the keys file
    flow = "purchase"                # purchase, balance_inquiry, refund, void, reversal, sign_in, echo
    amount = 2000000                 # minor units
    card = "6222021234567890123"     # track 2 is built from it (entry = "manual" sends field 2 instead)
    pin = "123456"                   # default: the run's lab PIN; "" sends no PIN block
    request = { "63" = "CUP" }       # fields added or replaced; "${NAME}" is a value captured earlier
    expect = { "39" = "one-of 61", "11" = "echo", "64" = "absent" }
    upstream = false                 # the SUT must not ask the host (default: it may)
    host = { "39" = "00" }           # what the trace host answers if the SUT asks upstream (default 00)
    host_delay = 0.0                 # seconds before that answer; host = "silent" never answers
    expect_upstream = { "4" = "one-of 000002000000" }   # rules for the SUT's upstream request

A reversal names the case it reverses: ``flow = "reversal"``, ``original = "NAME"``, ``reason = "98"``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from gateway.iso.build import TerminalIdent, cup, security_control
from gateway.iso.errors import IsoError
from gateway.iso.message import Message
from gateway.trace.format import SecretKind
from gateway.trace.rules import Captures, Rule, RulesError, parse_rule

FLOWS: Final = ("purchase", "balance_inquiry", "refund", "void", "reversal", "sign_in", "echo")
_VAR_RE: Final = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_.-]*)\}")
_KEYS: Final = frozenset({"name", "terminal", "merchant", "flow", "mti", "amount", "card", "entry", "pin",
                          "stan", "batch", "request", "expect", "upstream", "host", "host_delay",
                          "expect_upstream", "original", "reason", "key_mode"})


@dataclass(frozen=True, slots=True)
class Template:
    name: str
    terminal: str | None
    merchant: str | None
    flow: str | None
    mti: str | None
    amount: int | None
    card: str | None
    entry: str
    pin: str | None  #: None: the run's lab PIN
    stan: str | None
    batch: str | None
    request: Mapping[str, str]
    expect: Mapping[str, Rule]
    upstream: bool | None  #: False: must not ask the host; True: must; None: may
    host: Mapping[str, str] | None  #: None: the host stays silent
    host_delay: float
    expect_upstream: Mapping[str, Rule]
    original: str | None
    reason: str
    key_mode: str


def _str(raw: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str | None:
    v = raw.get(key, default)
    if v is not None and not isinstance(v, str):
        raise RulesError(f"{where}: {key} must be a string")
    return v


def _fields(raw: object, where: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(k, str) and k.isdigit() and isinstance(v, str)
                                            for k, v in raw.items()):
        raise RulesError(f"{where}: expected a table of field number = string value")
    return dict(raw)


def _rules(raw: object, where: str) -> dict[str, Rule]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RulesError(f"{where}: expected a table of field = rule")
    return {fid: parse_rule(spec, f"{where}.{fid}", origin="template") for fid, spec in raw.items()}


def parse_templates(raw: object, source: str) -> list[Template]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise RulesError(f"{source}: case must be an array of tables ([[case]])")
    out: list[Template] = []
    names: set[str] = set()
    for i, table in enumerate(raw):
        where = f"{source}: case[{i}]"
        if not isinstance(table, dict):
            raise RulesError(f"{where}: expected a table")
        unknown = set(table) - _KEYS
        if unknown:
            raise RulesError(f"{where}: unknown keys {sorted(unknown)}")
        name = _str(table, "name", where) or f"case {i + 1}"
        if name in names:
            raise RulesError(f"{where}: a second case named {name!r}")
        names.add(name)
        flow, mti = _str(table, "flow", where), _str(table, "mti", where)
        if flow is None and mti is None:
            raise RulesError(f"{where}: give flow ({', '.join(FLOWS)}) or mti with request fields")
        if flow is not None and flow not in FLOWS:
            raise RulesError(f"{where}: flow must be one of {', '.join(FLOWS)}")
        amount = table.get("amount")
        if amount is not None and (isinstance(amount, bool) or not isinstance(amount, int) or amount < 0):
            raise RulesError(f"{where}: amount must be a whole number of minor units")
        host_raw = table.get("host", {})
        host = None if host_raw == "silent" else _fields(host_raw, f"{where}.host")
        upstream = table.get("upstream")
        if upstream is not None and not isinstance(upstream, bool):
            raise RulesError(f"{where}: upstream must be true or false")
        delay = table.get("host_delay", 0.0)
        if isinstance(delay, bool) or not isinstance(delay, int | float) or delay < 0:
            raise RulesError(f"{where}: host_delay must be a number of seconds")
        entry = _str(table, "entry", where, "swipe") or "swipe"
        if entry not in ("swipe", "manual"):
            raise RulesError(f"{where}: entry must be swipe or manual")
        if flow == "reversal" and not table.get("original"):
            raise RulesError(f"{where}: a reversal names the case it reverses (original = \"NAME\")")
        out.append(Template(
            name=name, terminal=_str(table, "terminal", where), merchant=_str(table, "merchant", where),
            flow=flow, mti=mti, amount=amount, card=_str(table, "card", where), entry=entry,
            pin=_str(table, "pin", where), stan=_str(table, "stan", where), batch=_str(table, "batch", where),
            request=_fields(table.get("request"), f"{where}.request"),
            expect=_rules(table.get("expect"), f"{where}.expect"), upstream=upstream, host=host,
            host_delay=float(delay), expect_upstream=_rules(table.get("expect_upstream"), f"{where}.expect_upstream"),
            original=_str(table, "original", where), reason=_str(table, "reason", where, "98") or "98",
            key_mode=_str(table, "key_mode", where, "004") or "004",
        ))
    return out


def expand(value: str, captures: Captures) -> str:
    """`${NAME}` → the value captured last under NAME (unchanged when nothing was captured)."""
    return _VAR_RE.sub(lambda m: captures.latest(m.group(1)) or m.group(0), value)


def unresolved(value: str) -> list[str]:
    return _VAR_RE.findall(value)


@dataclass(slots=True)
class BuiltRequest:
    """A template's request in the form the player sends a recorded one: clear track and secret marks."""

    message: Message
    secrets: dict[str, SecretKind] = field(default_factory=dict)
    pin: str | None = None


def build_request(t: Template, *, terminal: str, merchant: str, stan: str, batch: str, lab_pin: str,
                  captures: Captures, originals: Mapping[str, Message]) -> BuiltRequest:
    """The request of a template case. Raises `RulesError` naming the case when it cannot be built."""
    ident = TerminalIdent(terminal, merchant)
    pin = lab_pin if t.pin is None else t.pin
    secrets: dict[str, SecretKind] = {}
    try:
        msg = _build(t, ident, stan, batch, pin, originals)
    except IsoError as exc:
        raise RulesError(f"case {t.name!r}: cannot build the request: {exc}") from None
    for k, v in t.request.items():
        msg.fields[k] = expand(v, captures)
        missing = unresolved(msg.fields[k])
        if missing:
            raise RulesError(f"case {t.name!r}: field {k} uses ${{{missing[0]}}}, which nothing captured")
    if "35" in msg.fields:
        secrets["35"] = SecretKind.TRACK
    if "52" in msg.fields:
        secrets["52"] = SecretKind.PIN
    if "64" in msg.fields:
        secrets["64"] = SecretKind.MAC
    return BuiltRequest(msg, secrets, pin or None)


def _card(t: Template, pin: str) -> dict[str, Any]:
    if t.card is None:
        raise RulesError(f"case {t.name!r}: flow {t.flow} needs a card")
    data: dict[str, Any] = {}
    if t.entry == "manual":
        data["pan"], data["expiry"] = t.card, "3012"
        data["entry_mode"] = "011" if pin else "012"
    else:
        data["track2"] = f"{t.card}D30121010000000000"
        data["entry_mode"] = "021" if pin else "022"
    if pin:
        data["pin_block"] = "0" * 16  # the player computes the real one under the PIK
    if pin or t.entry != "manual":
        data["security_control"] = security_control(track_encrypted=t.entry != "manual")
    return data


def _build(t: Template, ident: TerminalIdent, stan: str, batch: str, pin: str,
           originals: Mapping[str, Message]) -> Message:
    if t.flow is None:
        assert t.mti is not None
        return Message(t.mti, {"11": stan, "41": ident.terminal_id, "42": ident.merchant_id})
    amount = t.amount or 0
    if t.flow == "sign_in":
        return cup.sign_in(ident, stan, batch, t.key_mode)
    if t.flow == "echo":
        return cup.echo(ident, batch)
    if t.flow == "purchase":
        return cup.purchase(ident, stan, batch, amount, **_card(t, pin))
    if t.flow == "balance_inquiry":
        return cup.balance_inquiry(ident, stan, batch, **_card(t, pin))
    if t.flow == "refund":
        return cup.refund(ident, stan, batch, amount, orig_rrn="000000000000", orig_date="0101", **_card(t, pin))
    if t.flow == "void":
        return cup.void(ident, stan, batch, amount, orig_rrn="000000000000", orig_batch=batch,
                        orig_trace="000000", **_card(t, pin))
    original = originals.get(t.original or "")
    if original is None:
        raise RulesError(f"case {t.name!r}: reverses {t.original!r}, which has not run (or sent nothing)")
    return cup.reversal(original, t.reason)
