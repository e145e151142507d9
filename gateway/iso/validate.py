"""Which flow a message belongs to, and whether it follows that flow's rules (specs/flows.toml).

`identify` is a dict lookup on (request MTI, selector) where the selector is the one sub-field that
tells flows of one MTI apart (CUP 60.1 or 60.3, ISO 8583:1987 field 70 or the first digits of 3).
`validate` runs on every request, so everything it needs is precomputed into tuples and frozensets
when the spec is loaded; it returns every problem found, `check` raises the first.

An unidentifiable message yields `UnsupportedFlow` (the gateway answers 40, "function not supported")
when its selector is present, or a plain `ValidationError` for the absent selector field (30, format
error). Error texts name fields, never their content.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Final

from gateway.iso.errors import SubfieldError, ValidationError
from gateway.iso.message import Message
from gateway.iso.mti import original_mti
from gateway.iso.spec import SECONDARY_FIELDS
from gateway.iso.subfields import FORMAT_CHECKS, Layout, LayoutSpecError, layout, spec_path, verify_layout

SPEC_FILE: Final = "flows.toml"

#: where each selector reads its value, and the field an absent selector is reported on
_SELECTOR_FIELD: Final[dict[str, str]] = {
    "txn_type": "60",
    "net_code": "60",
    "proc": "3",
    "nmic": "70",
    "none": "t",
}


class UnsupportedFlow(ValidationError):
    """A well-formed message whose MTI/processing code/60.1/70 names no flow this dialect supports."""

    kind = "unsupported"


def _select(kind: str, fields: Mapping[str, str]) -> str | None:
    if kind == "txn_type":
        v = fields.get("60")
        return v[:2] if v is not None and len(v) >= 2 else None
    if kind == "net_code":
        v = fields.get("60")
        return v[8:11] if v is not None and len(v) >= 11 else None
    if kind == "proc":
        v = fields.get("3")
        return v[:2] if v is not None and len(v) >= 2 else None
    if kind == "nmic":
        return fields.get("70")
    return ""


# --- compiled spec ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Expectation:
    """Allowed values of a field, or of a sub-field (characters start:end of the field, valid once
    the field's layout has been verified)."""

    id: str  #: "3" or "60.3", as reported in errors
    field: str
    start: int | None
    end: int | None
    allowed: frozenset[str]


@dataclass(frozen=True, slots=True)
class MessageRules:
    """What one direction (request or response) of a flow must, may and must not carry. Fields in
    neither list are tolerated: terminals add vendor fields (62, 63) the gateway ignores."""

    mandatory: tuple[str, ...]
    conditional: frozenset[str]
    forbidden: tuple[str, ...]
    any_of: tuple[tuple[str, ...], ...]
    requires: tuple[tuple[str, tuple[str, ...]], ...]
    expect: tuple[Expectation, ...]
    echo: tuple[str, ...] = ()  #: responses: copied from the request
    approved: tuple[str, ...] = ()  #: responses: mandatory when 39 = 00

    @property
    def allowed(self) -> frozenset[str]:
        return frozenset(self.mandatory) | self.conditional | frozenset(self.approved)


@dataclass(frozen=True, slots=True)
class FlowSpec:
    """One flow of one dialect, compiled from specs/flows.toml."""

    dialect: str
    name: str
    mti: str  #: request MTI (first attempt)
    selector: str
    selector_values: frozenset[str]
    mac: bool
    reversible: bool
    reverses: tuple[str, ...]  #: reversal flows: the flows they reverse
    nonzero_amount: bool
    layouts: tuple[tuple[str, Layout], ...]  #: field → layout checked when the field is present
    request: MessageRules
    response: MessageRules

    @property
    def response_mti(self) -> str:
        return f"{self.mti[:2]}{int(self.mti[2]) + 1}0"

    def __repr__(self) -> str:
        return f"FlowSpec({self.dialect}:{self.name} {self.mti})"


@dataclass(frozen=True, slots=True)
class FieldFormat:
    text: str  #: as written in the spec, e.g. "n..19"
    kind: str  #: n, an, ans, h
    min_len: int
    max_len: int


@dataclass(frozen=True, slots=True)
class DialectSettings:
    name: str
    mac_field: str
    mac_field_secondary: str | None  #: the MAC field when a secondary bitmap is present (ISO87: 128)
    mac_placeholder: str
    track2_separator: str
    response_mac: str  #: "approved" (only when 39 = 00) or "always"
    no_mac_codes: frozenset[str]
    reversal_reason_field: bool
    reversal_reasons: frozenset[str]
    default_echo: tuple[str, ...]
    must_match: tuple[str, ...]
    must_match_approved: tuple[str, ...]
    partial_approval_codes: frozenset[str]
    layouts: tuple[tuple[str, str], ...]
    formats: dict[str, FieldFormat]
    #: formats as (min, max, checker or None for digits): tuple unpacking beats attribute access
    fast_formats: dict[str, tuple[int, int, Callable[[str], bool] | None]]

    @property
    def mac_fields(self) -> tuple[str, ...]:
        return (
            (self.mac_field,)
            if self.mac_field_secondary is None
            else (self.mac_field, self.mac_field_secondary)
        )

    def mac_field_for(self, fields: Mapping[str, str]) -> str:
        """The MAC field a message with these fields carries: the last field of its body, so 128 (where
        the dialect has it) once any field above 64 brings in a secondary bitmap."""
        if self.mac_field_secondary is not None and not SECONDARY_FIELDS.isdisjoint(fields):
            return self.mac_field_secondary
        return self.mac_field

    def response_has_mac(self, rc: str | None) -> bool:
        """Whether a response to a MAC'd request carries a MAC, given its response code."""
        if rc in self.no_mac_codes:
            return False
        return self.response_mac == "always" or rc == "00"


@dataclass(frozen=True, slots=True)
class _Dialect:
    settings: DialectSettings
    flows: dict[str, FlowSpec]
    selectors: dict[str, str]  #: request MTI → selector kind
    index: dict[tuple[str, str], FlowSpec]


_FORMAT_RE: Final = re.compile(r"(ans|an|n|h)(\.\.)?(\d+)")


def _field_format(text: str) -> FieldFormat:
    m = _FORMAT_RE.fullmatch(text)
    if m is None:
        raise LayoutSpecError(f"{SPEC_FILE}: bad field format {text!r}")
    size = int(m.group(3))
    return FieldFormat(text, m.group(1), 1 if m.group(2) else size, size)


def _strs(raw: object, where: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise LayoutSpecError(f"{SPEC_FILE}: {where} must be a list of strings")
    return tuple(raw)


def _expectations(raw: object, layouts: Mapping[str, str], where: str) -> tuple[Expectation, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise LayoutSpecError(f"{SPEC_FILE}: {where}.expect must be a table")
    out = []
    for ident, values in raw.items():
        allowed = frozenset(_strs(values, f"{where}.expect.{ident}"))
        field_key = ident.split(".", 1)[0]
        if "." not in ident:
            out.append(Expectation(ident, field_key, None, None, allowed))
            continue
        lay_name = layouts.get(field_key)
        part = layout(lay_name).part_by_id(ident) if lay_name else None
        if part is None:
            raise LayoutSpecError(f"{SPEC_FILE}: {where}: no layout part {ident}")
        out.append(Expectation(ident, field_key, part.start, part.end, allowed))
    return tuple(out)


def _rules(
    raw: object, layouts: Mapping[str, str], shared: tuple[Expectation, ...], where: str
) -> MessageRules:
    raw = raw or {}
    if not isinstance(raw, dict):
        raise LayoutSpecError(f"{SPEC_FILE}: {where} must be a table")
    requires = raw.get("requires") or {}
    return MessageRules(
        mandatory=_strs(raw.get("mandatory"), f"{where}.mandatory"),
        conditional=frozenset(_strs(raw.get("conditional"), f"{where}.conditional")),
        forbidden=_strs(raw.get("forbidden"), f"{where}.forbidden"),
        any_of=tuple(_strs(g, f"{where}.any_of") for g in raw.get("any_of") or ()),
        requires=tuple((k, _strs(v, f"{where}.requires")) for k, v in requires.items()),
        expect=shared + _expectations(raw.get("expect"), layouts, where),
        echo=_strs(raw.get("echo"), f"{where}.echo"),
        approved=_strs(raw.get("approved"), f"{where}.approved"),
    )


def _settings(name: str, raw: dict[str, object]) -> DialectSettings:
    layouts = raw.get("layouts") or {}
    formats = raw.get("formats") or {}
    if not isinstance(layouts, dict) or not isinstance(formats, dict):
        raise LayoutSpecError(f"{SPEC_FILE}: dialect {name}: layouts/formats must be tables")
    for lay in layouts.values():
        layout(lay)  # fail at load time on a typo
    try:
        return DialectSettings(
            name=name,
            mac_field=str(raw["mac_field"]),
            mac_field_secondary=None
            if raw.get("mac_field_secondary") is None
            else str(raw["mac_field_secondary"]),
            mac_placeholder=str(raw["mac_placeholder"]),
            track2_separator=str(raw["track2_separator"]),
            response_mac=str(raw["response_mac"]),
            no_mac_codes=frozenset(_strs(raw.get("no_mac_codes"), "no_mac_codes")),
            reversal_reason_field=bool(raw.get("reversal_reason_field", True)),
            reversal_reasons=frozenset(_strs(raw.get("reversal_reasons"), "reversal_reasons")),
            default_echo=_strs(raw.get("default_echo"), "default_echo"),
            must_match=_strs(raw.get("must_match"), "must_match"),
            must_match_approved=_strs(raw.get("must_match_approved"), "must_match_approved"),
            partial_approval_codes=frozenset(
                _strs(raw.get("partial_approval_codes"), "partial_approval_codes")
            ),
            layouts=tuple((str(k), str(v)) for k, v in layouts.items()),
            formats=(fmts := {str(k): _field_format(str(v)) for k, v in formats.items()}),
            fast_formats={
                k: (f.min_len, f.max_len, None if f.kind == "n" else FORMAT_CHECKS[f.kind])
                for k, f in fmts.items()
            },
        )
    except KeyError as exc:
        raise LayoutSpecError(f"{SPEC_FILE}: dialect {name} lacks {exc.args[0]}") from None


def _flow(dialect: DialectSettings, name: str, raw: dict[str, object]) -> FlowSpec:
    where = f"{dialect.name}.{name}"
    mti = str(raw.get("mti", ""))
    if len(mti) != 4 or not mti.isdigit() or int(mti[2]) % 2:
        raise LayoutSpecError(f"{SPEC_FILE}: {where}: mti must be a request MTI")
    match = raw.get("match") or {}
    if not isinstance(match, dict) or len(match) > 1 or not set(match) <= set(_SELECTOR_FIELD):
        raise LayoutSpecError(f"{SPEC_FILE}: {where}: match takes one of {sorted(_SELECTOR_FIELD)}")
    selector, values = next(iter(match.items()), ("none", [""]))
    values = [values] if isinstance(values, str) else values
    layouts = dict(dialect.layouts)
    extra = raw.get("layouts") or {}
    if not isinstance(extra, dict):
        raise LayoutSpecError(f"{SPEC_FILE}: {where}: layouts must be a table")
    for lay in extra.values():
        layout(lay)
    layouts.update(extra)
    shared = _expectations(raw.get("expect"), layouts, where)
    request = _rules(raw.get("request"), layouts, shared, f"{where}.request")
    reverses = _strs(raw.get("reverses"), f"{where}.reverses")
    if reverses and dialect.reversal_reasons and dialect.reversal_reason_field:
        # a reversal's 39 is its reason, from a closed set (reference §4.5)
        reason = Expectation("39", "39", None, None, dialect.reversal_reasons)
        request = MessageRules(
            request.mandatory,
            request.conditional,
            request.forbidden,
            request.any_of,
            request.requires,
            (*request.expect, reason),
        )
    return FlowSpec(
        dialect=dialect.name,
        name=name,
        mti=mti,
        selector=selector,
        selector_values=frozenset(_strs(list(values), f"{where}.match")),
        mac=bool(raw.get("mac", False)),
        reversible=bool(raw.get("reversible", False)),
        reverses=reverses,
        nonzero_amount=bool(raw.get("nonzero_amount", False)),
        layouts=tuple((k, layout(v)) for k, v in layouts.items()),
        request=request,
        response=_rules(raw.get("response"), layouts, shared, f"{where}.response"),
    )


@cache
def _spec() -> dict[str, _Dialect]:
    try:
        data = tomllib.loads(spec_path(SPEC_FILE).read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise LayoutSpecError(f"{SPEC_FILE}: {exc}") from None
    out: dict[str, _Dialect] = {}
    for name, raw in data.get("dialects", {}).items():
        settings = _settings(name, raw)
        flows: dict[str, FlowSpec] = {}
        selectors: dict[str, str] = {}
        index: dict[tuple[str, str], FlowSpec] = {}
        for flow_name, flow_raw in data.get("flows", {}).get(name, {}).items():
            flow = _flow(settings, flow_name, flow_raw)
            if selectors.setdefault(flow.mti, flow.selector) != flow.selector:
                raise LayoutSpecError(f"{SPEC_FILE}: {name}: flows of MTI {flow.mti} use different selectors")
            for value in flow.selector_values:
                if index.setdefault((flow.mti, value), flow) is not flow:
                    raise LayoutSpecError(f"{SPEC_FILE}: {name}: two flows for {flow.mti}/{value}")
            flows[flow_name] = flow
        out[name] = _Dialect(settings, flows, selectors, index)
    return out


def _dialect(name: str) -> _Dialect:
    spec = _spec()
    found = spec.get(name)
    if found is None:  # a dialect given as a spec path: specs/cup-pos.toml
        found = spec.get(name.removesuffix(".toml").rpartition("/")[2])
    if found is None:
        raise ValidationError(f"unknown dialect {name!r}", field="t")
    return found


def dialect_settings(dialect: str) -> DialectSettings:
    return _dialect(dialect).settings


def flows(dialect: str) -> dict[str, FlowSpec]:
    """Every flow of a dialect by name (a copy: callers may not change the loaded spec)."""
    return dict(_dialect(dialect).flows)


def flow(dialect: str, name: str) -> FlowSpec:
    found = _dialect(dialect).flows.get(name)
    if found is None:
        raise ValidationError(f"no flow {name!r} in dialect {dialect}", field="t")
    return found


# --- identify / validate ---------------------------------------------------------------------------


def _request_mti(mti: str) -> str | None:
    if len(mti) != 4 or not mti.isascii() or not mti.isdigit():
        return None
    function = int(mti[2])
    if function % 2:
        return f"{mti[:2]}{function - 1}0"
    return original_mti(mti)


def identify(dialect: str, msg: Message) -> FlowSpec | None:
    """The flow a request or response belongs to; None when the dialect has no such flow."""
    return _identify(_dialect(dialect), msg)


def _identify(d: _Dialect, msg: Message) -> FlowSpec | None:
    req_mti = _request_mti(msg.mti)
    if req_mti is None:
        return None
    kind = d.selectors.get(req_mti)
    if kind is None:
        return None
    value = _select(kind, msg.fields)
    if value is None:
        return None
    return d.index.get((req_mti, value))


def _unidentified(d: _Dialect, msg: Message) -> ValidationError:
    req_mti = _request_mti(msg.mti)
    if req_mti is None:
        return ValidationError("not a valid MTI", field="t")
    kind = d.selectors.get(req_mti)
    if kind is None:
        return UnsupportedFlow("message type not supported", field="t")
    if _select(kind, msg.fields) is None:
        return ValidationError(
            "field that selects the transaction is absent or short", field=_SELECTOR_FIELD[kind]
        )
    where = {"txn_type": "60.1", "net_code": "60.3", "proc": "3", "nmic": "70"}[kind]
    return UnsupportedFlow("transaction type not supported", field=where)


def _value_of(e: Expectation, fields: Mapping[str, str], broken: set[str]) -> str | None:
    v = fields.get(e.field)
    if v is None or e.start is None or e.end is None:
        return v
    if e.field in broken or len(v) < e.end:
        return None  # the layout error is reported already / an optional part that is absent
    return v[e.start : e.end]


def _check_rules(
    flow: FlowSpec, settings: DialectSettings, msg: Message, is_response: bool, errors: list[ValidationError]
) -> None:
    fields = msg.fields
    rules = flow.response if is_response else flow.request
    for k in rules.mandatory:
        if k not in fields:
            errors.append(ValidationError("mandatory field absent", field=k))
    rc = fields.get("39")
    if is_response and rc == "00":
        for k in rules.approved:
            if k not in fields:
                errors.append(ValidationError("mandatory field absent in an approval", field=k))
    # A MAC on a flow that needs none is tolerated: acquirers differ on MAC'ing 0500/0320/0820 (§7.2)
    if flow.mac:
        mac_field = settings.mac_field_for(fields)
        if is_response and rc in settings.no_mac_codes:
            present = next((k for k in settings.mac_fields if k in fields), None)
            if present is not None:
                errors.append(
                    ValidationError("MAC present on a response that must not carry one", field=present)
                )
        elif mac_field not in fields and (not is_response or settings.response_has_mac(rc)):
            errors.append(ValidationError("MAC absent", field=mac_field))
    for k in rules.forbidden:
        if k in fields:
            errors.append(ValidationError("field not allowed in this message", field=k))
    for group in rules.any_of:
        if not any(k in fields for k in group):
            errors.append(ValidationError("one of these fields is required", field="/".join(group)))
    for k, deps in rules.requires:
        if k in fields:
            for dep in deps:
                if dep not in fields:
                    errors.append(ValidationError(f"required when field {k} is present", field=dep))


def validate(dialect: str, msg: Message) -> list[ValidationError]:
    """Every rule of the message's flow that it breaks (empty when it is fine)."""
    d = _dialect(dialect)
    flow = _identify(d, msg)
    if flow is None:
        return [_unidentified(d, msg)]
    settings = d.settings
    errors: list[ValidationError] = []
    is_response = int(msg.mti[2]) % 2 == 1
    fields = msg.fields
    _check_rules(flow, settings, msg, is_response, errors)
    get_format = settings.fast_formats.get
    for k, v in fields.items():
        fmt = get_format(k)
        if fmt is None:
            continue
        lo, hi, chk = fmt
        # inlined digit check for the common numeric case: this loop runs on every request
        if lo <= len(v) <= hi and ((v.isdigit() and v.isascii()) if chk is None else chk(v)):
            continue
        errors.append(ValidationError(f"bad format, expected {settings.formats[k].text}", field=k))
    broken: set[str] = set()
    for k, lay in flow.layouts:
        composite = fields.get(k)
        if composite is None:
            continue
        try:
            verify_layout(lay, composite)
        except SubfieldError as exc:
            broken.add(k)
            errors.append(ValidationError(f"sub-field layout broken: {exc.reason}", field=exc.field))
    rules = flow.response if is_response else flow.request
    for e in rules.expect:
        actual = _value_of(e, fields, broken)
        if actual is not None and actual not in e.allowed:
            reason = (
                "inconsistent with the flow's transaction type"
                if e.id in ("3", "60.1")
                else "value not allowed"
            )
            errors.append(ValidationError(f"{reason} ({flow.name})", field=e.id))
    if flow.nonzero_amount and not is_response:
        amount = fields.get("4")
        if amount is not None and amount.isdigit() and int(amount) == 0:
            errors.append(ValidationError("amount is zero", field="4"))
    return errors


def check(dialect: str, msg: Message) -> FlowSpec:
    """The message's flow; raises the first `ValidationError` (or `UnsupportedFlow`) when it breaks a rule."""
    errors = validate(dialect, msg)
    if errors:
        raise errors[0]
    flow = identify(dialect, msg)
    if flow is None:  # unreachable: validate() reports an unidentifiable message as an error
        raise UnsupportedFlow("transaction not supported", field="t")
    return flow


def echo_mismatches(dialect: str, request: Message, response: Message) -> list[ValidationError]:
    """Fields a terminal (or the gateway, for host answers) checks against its request (LY
    ProcRspPacket): 3, 11, 41 always; 4 unless partially approved; 42 when approved."""
    settings = _dialect(dialect).settings
    errors: list[ValidationError] = []
    if _request_mti(response.mti) != original_mti(request.mti) or response.mti == request.mti:
        errors.append(ValidationError("response MTI does not answer the request", field="t"))
    rc = response.fields.get("39")
    keys = settings.must_match + (settings.must_match_approved if rc == "00" else ())
    for k in keys:
        if k == "4" and rc in settings.partial_approval_codes:
            continue
        want = request.fields.get(k)
        if want is not None and response.fields.get(k) != want:
            errors.append(ValidationError("differs from the request", field=k))
    return errors
