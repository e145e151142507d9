"""The compare engine, sans-I/O: one observed message against its recorded counterpart, field by
field (and sub-field by sub-field where a rule names one), under the rules of `gateway.trace.rules`.

Each difference becomes a `Finding` that names the message (case, terminal, STAN, MTI), the field,
what was expected, what came, and the rule that failed. Secret values never appear in a finding:
PANs are masked 6+4, tracks, PIN blocks, keys and chip data are reduced to "differs at position N".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from gateway.iso.errors import IsoError
from gateway.iso.message import REDACTED_FIELDS, Message, mask_pan
from gateway.iso.subfields import FORMAT_CHECKS, Layout, Part, layout
from gateway.iso.validate import FlowSpec, dialect_settings, identify
from gateway.trace.format import FrameRecord, SecretKind
from gateway.trace.report import Finding, FindingKind
from gateway.trace.rules import ANY, ECHO_FROM_FLOW, SAME, Captures, Check, MessageKey, Mode, Rule, RuleSet

#: how a field the recording marks secret is compared when no rule names it
SECRET_DEFAULTS: Final[Mapping[SecretKind, Rule]] = {
    SecretKind.PIN: Rule(Check.SECRET, text="secret", origin="secret:pin"),
    SecretKind.KEY: Rule(Check.SECRET, text="secret", origin="secret:key"),
    SecretKind.CVV: Rule(Check.SECRET, text="secret", origin="secret:cvv"),
    SecretKind.MAC: Rule(Check.VERIFY, text="verify", origin="secret:mac"),
}
#: in a diff, surrogates of two traces differ (each trace has its own surrogate key): the same card must
#: be the same surrogate throughout, which a one-to-one mapping of A's surrogates to B's checks
SURROGATE: Final = Rule(Check.SAME, text="surrogate", origin="secret:surrogate")
MASKED: Final = Rule(Check.PRESENT, text="present", origin="masked in the source")
SURROGATE_KINDS: Final = frozenset({SecretKind.PAN, SecretKind.TRACK, SecretKind.CHIP})
#: fields whose values a finding never shows, beyond the codec's redacted set (48 may carry keys)
_HIDDEN: Final = REDACTED_FIELDS | {"48", "64", "128"}


@dataclass(frozen=True, slots=True)
class Seen:
    """One message as one side of a comparison saw it."""

    mti: str
    fields: Mapping[str, str]
    secrets: Mapping[str, SecretKind] = field(default_factory=dict)
    seq: int | None = None
    #: fields the source had masked (imports of masked logs): placeholders, compared as present
    masked: frozenset[str] = frozenset()

    @classmethod
    def of(cls, rec: FrameRecord) -> Seen:
        return cls(rec.mti, rec.fields, rec.secrets, rec.seq, frozenset(rec.masked))


@dataclass(frozen=True, slots=True)
class Where:
    """Names a message in findings."""

    case: str
    leg: str
    terminal: str = ""
    stan: str = ""


def flow_of(dialect: str, mti: str, fields: Mapping[str, str]) -> FlowSpec | None:
    try:
        return identify(dialect, Message(mti, dict(fields)))
    except IsoError:
        return None


def _field_order(fid: str) -> tuple[int, int]:
    head, _, part = fid.partition(".")
    return (int(head) if head.isdigit() else 9999, int(part) if part.isdigit() else 0)


def _layout_of(dialect: str, flow: FlowSpec | None, fid: str) -> Layout | None:
    if flow is not None:
        for key, lay in flow.layouts:
            if key == fid:
                return lay
        return None
    try:
        settings = dialect_settings(dialect)
    except IsoError:
        return None
    name = dict(settings.layouts).get(fid)
    return layout(name) if name else None


def show(fid: str, value: str | None) -> str:
    """A value as a finding may show it."""
    if value is None:
        return "(absent)"
    head = fid.partition(".")[0]
    if head == "2":
        return mask_pan(value)
    if head in _HIDDEN:
        return f"<{len(value)} characters>"
    return repr(value)


def _difference(fid: str, expected: str | None, got: str | None) -> tuple[str, str, str]:
    """(expected, got, note) for a finding; hidden values say only where they differ."""
    e, g = show(fid, expected), show(fid, got)
    if expected is not None and got is not None and fid.partition(".")[0] in _HIDDEN | {"2"}:
        pos = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b),
                   min(len(expected), len(got)))
        return e, g, f" (they differ from position {pos + 1})"
    return e, g, ""


@dataclass(slots=True)
class Comparison:
    """Everything one comparison needs besides the two messages."""

    rules: RuleSet
    key: MessageKey
    where: Where
    captures: Captures
    flow: FlowSpec | None = None
    #: the request this message answers, as this run sent it (for `echo`); None for requests
    request: Mapping[str, str] | None = None
    #: field → "" when a MAC / PIN block / key block verified, else why not; absent: not verifiable
    verified: Mapping[str, str] = field(default_factory=dict)
    #: a template case's own rules; with them, fields no rule names are not compared (jPOS-EE style)
    overrides: Mapping[str, Rule] | None = None
    #: the recorded request and answer of this exchange: a flow's echo list applies to a field only where
    #: the recording echoed it (a settlement answer's 48 carries the verdicts, not the request's totals)
    recorded_request: Mapping[str, str] | None = None
    recorded_answer: Mapping[str, str] | None = None

    def _echoed_in_recording(self, fid: str) -> bool:
        if self.recorded_request is None or self.recorded_answer is None:
            return True
        return self.recorded_request.get(fid) == self.recorded_answer.get(fid)

    def rule(self, fid: str, secret: SecretKind | None) -> Rule:
        if self.overrides is not None:  # a template: its own rules, nothing else (jPOS-EE style)
            return self.overrides.get(fid, ANY)
        found = self.rules.rule_for(self.key, fid)
        if found is not None:
            return found
        if self.flow is not None and self.key.mti[2:3] in ("1", "3", "5", "7", "9") \
                and fid in self.flow.response.echo and self._echoed_in_recording(fid):
            return ECHO_FROM_FLOW  # an answer: the flow's echoed fields must equal the request's
        if secret is not None and secret in SECRET_DEFAULTS:
            return SECRET_DEFAULTS[secret]
        if secret in SURROGATE_KINDS and self.key.mode is Mode.DIFF:
            return SURROGATE
        return SAME


def compare(cmp: Comparison, expected: Seen | None, got: Seen) -> list[Finding]:
    """Findings for `got` against `expected` (None: a template case, no recording)."""
    findings: list[Finding] = []
    if expected is not None and expected.mti != got.mti:
        findings.append(_finding(cmp, got, "mti", expected.mti, got.mti, SAME, "", FindingKind.FIELD))
    ids = set(got.fields)
    if expected is not None:
        ids |= set(expected.fields)
    if cmp.overrides is not None:
        ids |= {k.partition(".")[0] for k in cmp.overrides if k != "*"}
    secrets = expected.secrets if expected is not None else got.secrets
    masked = expected.masked if expected is not None else frozenset()
    for fid in sorted(ids, key=_field_order):
        rule = cmp.rule(fid, secrets.get(fid))
        if fid in masked and rule.check is Check.SAME:
            rule = MASKED  # the recording kept no value for it: only its presence can be compared
        e = expected.fields.get(fid) if expected is not None else None
        g = got.fields.get(fid)
        if cmp.overrides is not None:
            part_ids = {k for k in cmp.overrides if k.startswith(fid + ".")}
        else:
            part_ids = set(cmp.rules.part_ids(cmp.key, fid))
        lay = _layout_of(cmp.key.dialect, cmp.flow, fid) if part_ids else None
        if lay is not None and expected is not None and (e is None) != (g is None):
            lay = None  # the whole field is absent on one side: one finding, not one per sub-field
        if lay is None:
            _check(cmp, findings, got, expected is not None, fid, rule, e, g, None)
            continue
        for part in lay.parts:
            prule = cmp.rule(part.id, None) if part.id in part_ids else rule
            _check(cmp, findings, got, expected is not None, part.id, prule, _slice(e, part), _slice(g, part), part)
        tail = lay.header_len
        if (e is not None and len(e) > tail) or (g is not None and len(g) > tail):
            _check(cmp, findings, got, expected is not None, fid, rule,
                   None if e is None else e[tail:], None if g is None else g[tail:], None, tail=tail)
    return findings


def _slice(value: str | None, part: Part) -> str | None:
    if value is None or len(value) < part.end:
        return None
    return value[part.start : part.end]


def _request_value(cmp: Comparison, fid: str, part: Part | None, tail: int = 0) -> str | None:
    """The request's value of `fid` (its `part`, or what runs past the layout from `tail` on)."""
    if cmp.request is None:
        return None
    head = fid.partition(".")[0]
    value = cmp.request.get(head)
    if part is not None:
        return _slice(value, part)
    return value[tail:] if value is not None else None


def _format_ok(cmp: Comparison, fid: str, value: str, part: Part | None) -> bool | None:
    """None when the dialect gives no format for the field."""
    if part is not None:
        return len(value) == part.length and FORMAT_CHECKS[part.fmt](value)
    try:
        fmt = dialect_settings(cmp.key.dialect).formats.get(fid)
    except IsoError:
        return None
    if fmt is None:
        return None
    return fmt.min_len <= len(value) <= fmt.max_len and FORMAT_CHECKS[fmt.kind](value)


def _check(cmp: Comparison, out: list[Finding], got: Seen, recorded: bool, fid: str, rule: Rule,
           e: str | None, g: str | None, part: Part | None, *, tail: int = 0) -> None:
    """`tail`: e and g are what runs past the field's layout from that offset on (an echo compares the
    request's value from there too)."""
    problem = _problem(cmp, recorded, fid, rule, e, g, part, tail)
    if problem is not None:
        expected_text, note = problem
        kind = FindingKind.FIELD
        out.append(_finding(cmp, got, fid, expected_text, show(fid, g), rule, note, kind))
    if rule.capture:
        cmp.captures.record(rule.capture, e if recorded else None, g)


def _presence(recorded: bool, e: str | None, g: str | None, fid: str) -> tuple[str, str] | None:
    if recorded and (e is None) != (g is None):
        return show(fid, e) if e is not None else "(absent)", ""
    return None


def _problem(cmp: Comparison, recorded: bool, fid: str, rule: Rule, e: str | None, g: str | None,
             part: Part | None, tail: int = 0) -> tuple[str, str] | None:
    """(expected as shown, note) when `g` breaks `rule`, else None."""
    check = rule.check
    if check is Check.ANY:
        return None
    if check is Check.PRESENT:
        return ("(present)", "") if g is None else None
    if check is Check.ABSENT:
        return ("(absent)", "") if g is not None else None
    if check is Check.ONE_OF:
        if g is None or g not in rule.values:
            return "one of " + ", ".join(sorted(rule.values)), ""
        return None
    if check is Check.SECRET:
        return _presence(recorded, e, g, fid)
    if check is Check.VERIFY:
        missing = _presence(recorded, e, g, fid)
        if missing is not None or g is None:
            return missing
        why = cmp.verified.get(fid)
        return ("(a value that verifies)", f": {why}") if why else None
    if check is Check.FORMAT:
        missing = _presence(recorded, e, g, fid)
        if missing is not None or g is None:
            return missing
        ok = _format_ok(cmp, fid, g, part)
        if ok is False:
            spec = (f"{part.fmt}{part.length}" if part is not None
                    else dialect_settings(cmp.key.dialect).formats[fid].text)
            return f"format {spec}", ""
        return None
    if check is Check.ECHO:
        want = _request_value(cmp, fid, part, tail)
        if want is None:
            check = Check.SAME  # nothing to echo: the recorded value is what was expected
        elif g != want:
            return show(fid, want) + " (the request's)", ""
        else:
            return None
    if check is Check.REF:
        if recorded and e is None:
            return ("(absent)", "") if g is not None else None
        wanted = cmp.captures.candidates(rule.ref, e if recorded else None)
        if not wanted:
            if not recorded:
                return f"the value captured as {rule.ref}", ": nothing was captured under that name"
            if g == e:
                return None
            return show(fid, e), f"; no value of this run stands for the recorded one under {rule.ref}"
        return None if g in wanted else (show(fid, wanted[-1]) + f" (ref {rule.ref})", "")
    # SAME
    if not recorded:
        return None
    if rule is SURROGATE:
        return _surrogate(cmp, fid, e, g)
    if e == g:
        return None
    expected_text, _, note = _difference(fid, e, g)
    return expected_text, note


def _surrogate(cmp: Comparison, fid: str, e: str | None, g: str | None) -> tuple[str, str] | None:
    """A's surrogate stands for one card; B's for that card must always be the same one, and no other
    card of A may have it."""
    if e is None or g is None:
        return None if e is g else (show(fid, e), "")
    forward, backward = f"surrogate:{fid}", f"surrogate-of:{fid}"
    mapped, mapped_back = cmp.captures.resolve(forward, e), cmp.captures.resolve(backward, g)
    if mapped is None and mapped_back is None:
        cmp.captures.record(forward, e, g)
        cmp.captures.record(backward, g, e)
        return None
    if mapped == g and mapped_back == e:
        return None
    return f"the surrogate B gave this card before ({show(fid, mapped)})", " (another card, or the card changed)"


def _finding(cmp: Comparison, got: Seen, fid: str, expected: str, got_text: str, rule: Rule, note: str,
             kind: FindingKind) -> Finding:
    w = cmp.where
    shown_got = got_text if fid != "mti" else got.mti
    message = (f"{w.case}: {w.leg} {got.mti} field {fid}: expected {expected}, got {shown_got} "
               f"(rule {rule.label}{'' if not rule.origin or rule.origin == 'default' else ', ' + rule.origin})"
               f"{note}")
    return Finding(kind, message, leg=w.leg, mti=got.mti, terminal=w.terminal, stan=w.stan, field=fid,
                   expected=expected, got=shown_got, rule=rule.label, seq=got.seq)


def substitute_refs(rules: RuleSet, key: MessageKey, fields: dict[str, str], captures: Captures,
                    flow: FlowSpec | None) -> dict[str, str]:
    """A recorded request made fit for this run: each field (or sub-field) with a ``ref NAME`` rule
    gets this run's value for its recorded one (the RRN the SUT gave this run, not the recording's).
    Values no capture stands for stay as recorded."""
    out = dict(fields)
    for fid, value in fields.items():
        rule = rules.rule_for(key, fid)
        if rule is not None and rule.check is Check.REF:
            mapped = captures.resolve(rule.ref, value)
            if mapped is not None:
                out[fid] = mapped
        parts = rules.part_ids(key, fid)
        lay = _layout_of(key.dialect, flow, fid) if parts else None
        if lay is None:
            continue
        text = out[fid]
        for part in lay.parts:
            prule = rules.rule_for(key, part.id) if part.id in parts else None
            chunk = _slice(text, part)
            if prule is None or prule.check is not Check.REF or chunk is None:
                continue
            mapped = captures.resolve(prule.ref, chunk)
            if mapped is not None and len(mapped) == part.length:
                text = text[: part.start] + mapped + text[part.end :]
        out[fid] = text
    return out


def message_key(dialect: str, leg: str, direction: str, mti: str, flow: FlowSpec | None,
                mode: Mode) -> MessageKey:
    return MessageKey(dialect, leg, direction, mti, flow.name if flow is not None else "", mode)
