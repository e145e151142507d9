"""Rules as data: how each field of each message is compared between a recording and a run.

A rule file is TOML (the shipped defaults are `specs/trace-rules.toml`; a run's own file sits beside
the trace as ``NAME.rules.toml`` or is given with ``--rules``). Each ``[[rules]]`` table is a selector
plus a map of fields to rules::

    [[rules]]
    leg = "terminal"          # terminal | host                 (absent: any)
    dir = "out"               # in (towards the SUT) | out      (absent: any)
    mti = "0210"              # exact, or with x for any digit: "02x0", "04xx"
    flow = "purchase"         # a flow name of specs/flows.toml
    dialect = "cup-pos"
    when = "diff"             # replay | diff (absent: both)
    fields = { "12" = "format", "37" = "same capture rrn", "61.3" = "ref txn_date", "39" = "one-of 00 10" }

Rule text: ``same`` (default) · ``present`` · ``absent`` · ``echo`` (equals the field of the request
this message answers) · ``format`` (the dialect's n/an/ans/h format and length, specs/flows.toml) ·
``any`` · ``one-of V…`` · ``ref NAME`` · ``verify`` (a MAC, PIN block or key block: checked
cryptographically where keys are known, never compared) · ``secret`` (present as recorded, value never
compared), each optionally followed by ``capture NAME`` (``capture NAME`` alone means ``present``).
A rule may also be an inline table: ``{ check = "one-of", values = ["00", "10"], capture = "rc" }``.
Field ids are field numbers, sub-fields of a layout of specs/subfields.toml ("61.3", "90.2"), or "*".

Which rule applies to a field: rules of the run's own file beat the defaults; within one file the
more specific selector wins (a field number beats "*"), and of equal ones the later. Where no rule
matches, the flow's echo list (specs/flows.toml response.echo) gives ``echo``, a field the recording
marks secret gets its kind's treatment (PIN, key, CVV: ``secret``; MAC: ``verify``; surrogate PAN and
track: ``same``, surrogates compare as surrogates), and everything else is ``same``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final


class RulesError(ValueError):
    """A rules file that cannot be used; the message names the file and the table."""


class Check(StrEnum):
    SAME = "same"
    PRESENT = "present"
    ABSENT = "absent"
    ECHO = "echo"
    FORMAT = "format"
    ANY = "any"
    ONE_OF = "one-of"
    REF = "ref"
    VERIFY = "verify"
    SECRET = "secret"


class Mode(StrEnum):
    REPLAY = "replay"
    DIFF = "diff"


@dataclass(frozen=True, slots=True)
class Rule:
    check: Check
    values: frozenset[str] = frozenset()  #: one-of
    ref: str = ""  #: ref NAME
    capture: str = ""  #: capture NAME: remember (recorded → observed) and the latest observed value
    text: str = ""  #: as written, for reports
    origin: str = ""  #: where it came from: a file name, "flows.toml echo", "secret:pin", "default"

    @property
    def label(self) -> str:
        return self.text or self.check.value


SAME: Final = Rule(Check.SAME, text="same", origin="default")
ANY: Final = Rule(Check.ANY, text="any", origin="default")
ECHO_FROM_FLOW: Final = Rule(Check.ECHO, text="echo", origin="flows.toml echo")
_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_FIELD_RE: Final = re.compile(r"\*|[0-9]{1,3}(\.[0-9]{1,2})?")
_MTI_RE: Final = re.compile(r"[0-9x]{4}")


def _name(token: str | None, where: str, what: str) -> str:
    if token is None or not _NAME_RE.fullmatch(token):
        raise RulesError(f"{where}: {what} needs a name (letters, digits, _ . -)")
    return token


def parse_rule(spec: object, where: str, origin: str = "") -> Rule:
    """A rule from its text ("same capture rrn") or inline table."""
    if isinstance(spec, Mapping):
        return _rule_from_table(spec, where, origin)
    if not isinstance(spec, str) or not spec.split():
        raise RulesError(f"{where}: a rule is a non-empty string or an inline table")
    tokens = spec.split()
    capture = ""
    if "capture" in tokens:
        i = tokens.index("capture")
        if i != len(tokens) - 2:
            raise RulesError(f"{where}: 'capture NAME' must end the rule")
        capture = _name(tokens[i + 1], where, "capture")
        tokens = tokens[:i] or ["present"]
    head, rest = tokens[0], tokens[1:]
    try:
        check = Check(head)
    except ValueError:
        raise RulesError(f"{where}: unknown rule {head!r} (known: {', '.join(c.value for c in Check)})") from None
    values: frozenset[str] = frozenset()
    ref = ""
    if check is Check.ONE_OF:
        if not rest:
            raise RulesError(f"{where}: one-of needs at least one value")
        values = frozenset(rest)
    elif check is Check.REF:
        if len(rest) != 1:
            raise RulesError(f"{where}: ref takes exactly one name")
        ref = _name(rest[0], where, "ref")
    elif rest:
        raise RulesError(f"{where}: {check.value} takes no argument (got {' '.join(rest)!r})")
    return Rule(check, values, ref, capture, " ".join(spec.split()), origin)


def _rule_from_table(spec: Mapping[str, Any], where: str, origin: str) -> Rule:
    unknown = set(spec) - {"check", "values", "name", "capture"}
    if unknown:
        raise RulesError(f"{where}: unknown keys {sorted(unknown)} (check, values, name, capture)")
    raw_check = spec.get("check", "present" if "capture" in spec else None)
    try:
        check = Check(raw_check)
    except ValueError:
        raise RulesError(f"{where}: unknown rule {raw_check!r}") from None
    values = spec.get("values", [])
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise RulesError(f"{where}: values must be a list of strings")
    if check is Check.ONE_OF and not values:
        raise RulesError(f"{where}: one-of needs at least one value")
    ref = _name(spec.get("name"), where, "ref") if check is Check.REF else ""
    capture = _name(spec["capture"], where, "capture") if "capture" in spec else ""
    text = check.value + (" " + " ".join(values) if values else "") + (f" {ref}" if ref else "")
    return Rule(check, frozenset(values), ref, capture, text + (f" capture {capture}" if capture else ""), origin)


@dataclass(frozen=True, slots=True)
class MessageKey:
    """What a rule selector looks at: one message of one leg, direction and flow, in one mode."""

    dialect: str
    leg: str
    dir: str
    mti: str
    flow: str  #: "" when the message belongs to no known flow
    mode: Mode = Mode.REPLAY


@dataclass(frozen=True, slots=True)
class Selector:
    dialect: str | None = None
    leg: str | None = None
    dir: str | None = None
    mti: str | None = None
    flow: str | None = None
    when: Mode | None = None

    def matches(self, key: MessageKey) -> bool:
        if self.mti is not None and not all(p in ("x", c) for p, c in zip(self.mti, key.mti, strict=False)):
            return False
        return ((self.dialect is None or self.dialect == key.dialect) and (self.leg is None or self.leg == key.leg)
                and (self.dir is None or self.dir == key.dir) and (self.flow is None or self.flow == key.flow)
                and (self.when is None or self.when is key.mode))

    @property
    def specificity(self) -> int:
        score = sum(v is not None for v in (self.dialect, self.leg, self.dir, self.flow, self.when))
        if self.mti is not None:
            score += 2 - ("x" in self.mti)
        return score


@dataclass(frozen=True, slots=True)
class RuleEntry:
    selector: Selector
    field: str
    rule: Rule
    rank: tuple[int, int, int, int]  #: (file rank, selector specificity, field-specific, order): higher wins


_SELECTOR_KEYS: Final = ("dialect", "leg", "dir", "mti", "flow", "when")


def parse_entries(tables: object, source: str, file_rank: int, first_order: int = 0) -> list[RuleEntry]:
    """The ``[[rules]]`` array of one file."""
    if tables is None:
        return []
    if not isinstance(tables, list):
        raise RulesError(f"{source}: rules must be an array of tables ([[rules]])")
    out: list[RuleEntry] = []
    order = first_order
    for i, table in enumerate(tables):
        where = f"{source}: rules[{i}]"
        if not isinstance(table, dict):
            raise RulesError(f"{where}: expected a table")
        unknown = set(table) - {*_SELECTOR_KEYS, "fields", "why"}
        if unknown:
            raise RulesError(f"{where}: unknown keys {sorted(unknown)}")
        sel = _selector(table, where)
        fields = table.get("fields")
        if not isinstance(fields, dict) or not fields:
            raise RulesError(f"{where}: fields must be a non-empty table of field = rule")
        for fid, spec in fields.items():
            if not _FIELD_RE.fullmatch(fid):
                raise RulesError(f"{where}: {fid!r} is not a field id (e.g. \"39\", \"61.3\" or \"*\")")
            rule = parse_rule(spec, f"{where}.fields.{fid}", origin=source)
            order += 1
            out.append(RuleEntry(sel, fid, rule, (file_rank, sel.specificity, fid != "*", order)))
    return out


def _selector(table: Mapping[str, Any], where: str) -> Selector:
    values: dict[str, Any] = {}
    for key in _SELECTOR_KEYS:
        v = table.get(key)
        if v is None:
            continue
        if not isinstance(v, str) or not v:
            raise RulesError(f"{where}: {key} must be a non-empty string")
        values[key] = v
    if values.get("leg") not in (None, "terminal", "host"):
        raise RulesError(f"{where}: leg must be terminal or host")
    if values.get("dir") not in (None, "in", "out"):
        raise RulesError(f"{where}: dir must be in or out")
    if "mti" in values and not _MTI_RE.fullmatch(values["mti"]):
        raise RulesError(f"{where}: mti must be 4 digits, x for any digit (e.g. 0210, 02x0)")
    if "when" in values:
        try:
            values["when"] = Mode(values["when"])
        except ValueError:
            raise RulesError(f"{where}: when must be replay or diff") from None
    return Selector(**values)


class RuleSet:
    """Every rule entry of the defaults and the run's file, resolved per (message, field) and cached."""

    def __init__(self, entries: Iterable[RuleEntry]) -> None:
        self._by_field: dict[str, list[RuleEntry]] = {}
        for e in sorted(entries, key=lambda e: e.rank, reverse=True):
            self._by_field.setdefault(e.field, []).append(e)
        self._cache: dict[tuple[MessageKey, str], Rule | None] = {}
        self._parts: dict[tuple[MessageKey, str], tuple[str, ...]] = {}

    def rule_for(self, key: MessageKey, field_id: str) -> Rule | None:
        """The rule the files give this field (None: none does, the caller's defaults apply)."""
        cache_key = (key, field_id)
        if cache_key in self._cache:
            return self._cache[cache_key]
        best: RuleEntry | None = None
        for fid in (field_id, "*") if "." not in field_id else (field_id,):
            for entry in self._by_field.get(fid, ()):
                if entry.selector.matches(key):
                    if best is None or entry.rank > best.rank:
                        best = entry
                    break
        rule = best.rule if best is not None else None
        if len(self._cache) > 50_000:  # bounded: keys are few in practice, but never grow without end
            self._cache.clear()
        self._cache[cache_key] = rule
        return rule

    def part_ids(self, key: MessageKey, field_id: str) -> tuple[str, ...]:
        """Sub-field ids of `field_id` ("61.3") some rule names for this message."""
        cache_key = (key, field_id)
        found = self._parts.get(cache_key)
        if found is None:
            prefix = field_id + "."
            found = tuple(sorted(fid for fid, entries in self._by_field.items() if fid.startswith(prefix)
                                 and any(e.selector.matches(key) for e in entries)))
            if len(self._parts) > 50_000:
                self._parts.clear()
            self._parts[cache_key] = found
        return found

    def names(self) -> tuple[set[str], set[str]]:
        """(capture names, ref names) used anywhere: a ref without a capture is a mistake in the file."""
        captures = {e.rule.capture for es in self._by_field.values() for e in es if e.rule.capture}
        refs = {e.rule.ref for es in self._by_field.values() for e in es if e.rule.ref}
        return captures, refs


@dataclass(slots=True)
class Captures:
    """Values remembered by ``capture NAME`` and looked up by ``ref NAME``.

    A capture keeps, per name, which observed values stood for each recorded one (the RRN the SUT gave
    this run for the RRN of the recording), so a ``ref`` maps the recorded value of a later message to
    this run's; and the latest observed value, for template cases that have no recording. A recorded
    value may stand for several observed ones (field 7 has a resolution of one second: two requests
    recorded in the same second may be sent in two seconds now); a ``ref`` accepts any of them. The
    maps are bounded (oldest entries go first), so a long run stays in constant memory."""

    limit: int = 20_000
    per_value: int = 16
    _maps: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    _latest: dict[str, str] = field(default_factory=dict)

    def record(self, name: str, recorded: str | None, observed: str | None) -> None:
        if observed is None:
            return
        self._latest[name] = observed
        if recorded is None:
            return
        table = self._maps.setdefault(name, {})
        seen = table.pop(recorded, [])
        if observed in seen:
            seen.remove(observed)
        seen.append(observed)
        table[recorded] = seen[-self.per_value :]
        if len(table) > self.limit:
            del table[next(iter(table))]

    def candidates(self, name: str, recorded: str | None) -> list[str]:
        """This run's values for `recorded` under `name` (newest last); without a recorded value, the
        latest one."""
        if recorded is not None:
            return list(self._maps.get(name, {}).get(recorded, ()))
        latest = self._latest.get(name)
        return [] if latest is None else [latest]

    def resolve(self, name: str, recorded: str | None) -> str | None:
        """The newest of `candidates`, or None."""
        found = self.candidates(name, recorded)
        return found[-1] if found else None

    def latest(self, name: str) -> str | None:
        return self._latest.get(name)
