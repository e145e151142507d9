"""Sub-field layouts of composite fields (60, 61, 48, 44, 54, 63, 90, ...) as data.

The layouts live in `specs/subfields.toml`; they are compiled once, on first use, into slice tables,
so `unpack` is a handful of string slices plus one format check per part (one for the whole value when
every part is numeric).

`pack`/`unpack` are strict: every part has its exact length and format; padding is the caller's job
(builders know whether a value is zero-filled or space-padded). Errors are `SubfieldError`s naming the
sub-field ("60.3") and the character offset, never the data.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Final

from gateway.iso.errors import SpecError, SubfieldError
from gateway.iso.message import Message, mask_pan

SPEC_FILE: Final = "subfields.toml"

_AN: Final = re.compile(r"[A-Za-z0-9 ]*")
_HEX: Final = re.compile(r"[0-9A-F]*")


def _is_n(s: str) -> bool:
    return s.isascii() and s.isdigit()


def _is_an(s: str) -> bool:
    return _AN.fullmatch(s) is not None


def _is_ans(s: str) -> bool:
    return s.isprintable()


def _is_h(s: str) -> bool:
    return _HEX.fullmatch(s) is not None


#: format name → checker; `ans` admits non-ASCII printables (CUP 63.2 carries GBK text)
FORMAT_CHECKS: Final[dict[str, Callable[[str], bool]]] = {
    "n": _is_n,
    "an": _is_an,
    "ans": _is_ans,
    "h": _is_h,
}


class LayoutSpecError(SpecError):
    """specs/subfields.toml or specs/flows.toml is missing or malformed: a deployment error, not bad
    input."""


def spec_path(name: str) -> Path:
    """A file of the `specs/` directory: inside the installed package (wheel) or at the repo root."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "_specs" / name, package.parent / "specs" / name):
        if candidate.is_file():
            return candidate
    raise LayoutSpecError(f"spec file {name} not found")


@dataclass(frozen=True, slots=True)
class Part:
    id: str
    name: str
    start: int
    end: int
    fmt: str
    optional: bool
    values: frozenset[str] | None
    mask: str | None

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Repeat:
    name: str
    count: str | None  #: name of the header part that holds the number of items
    min: int
    max: int
    parts: tuple[Part, ...]  #: offsets relative to the start of an item
    size: int


@dataclass(frozen=True, slots=True)
class Layout:
    name: str
    field: str
    parts: tuple[Part, ...]
    lengths: frozenset[int]  #: valid header lengths (every optional-part boundary)
    header_len: int
    #: every part is `n` without a value set: one digit check covers the whole value
    plain_numeric: bool
    repeat: Repeat | None

    def part_by_id(self, part_id: str) -> Part | None:
        return next((p for p in self.parts if p.id == part_id), None)


@dataclass(frozen=True, slots=True)
class BreakoutRule:
    layout: str
    mti: frozenset[str] | None
    net_code: frozenset[str] | None
    nmic: frozenset[str] | None

    def applies(self, message: Message) -> bool:
        if self.mti is not None and message.mti not in self.mti:
            return False
        if self.net_code is not None and message.fields.get("60", "")[8:11] not in self.net_code:
            return False
        return self.nmic is None or message.fields.get("70") in self.nmic


# --- loading ---------------------------------------------------------------------------------------


def _compile_parts(owner: str, raw: object, *, allow_optional: bool) -> tuple[Part, ...]:
    if not isinstance(raw, list):
        raise LayoutSpecError(f"layout {owner}: parts must be a list")
    parts: list[Part] = []
    offset = 0
    seen_optional = False
    for item in raw:
        if not isinstance(item, dict):
            raise LayoutSpecError(f"layout {owner}: each part must be a table")
        try:
            pid, name, length, fmt = str(item["id"]), str(item["name"]), int(item["len"]), str(item["fmt"])
        except (KeyError, TypeError, ValueError):
            raise LayoutSpecError(f"layout {owner}: a part lacks id/name/len/fmt") from None
        if fmt not in FORMAT_CHECKS or length <= 0:
            raise LayoutSpecError(f"layout {owner}: part {pid} has a bad format or length")
        optional = bool(item.get("optional", False))
        if optional and not allow_optional:
            raise LayoutSpecError(f"layout {owner}: optional parts are not allowed here")
        if seen_optional and not optional:
            raise LayoutSpecError(f"layout {owner}: mandatory part {pid} after an optional one")
        seen_optional = seen_optional or optional
        values = item.get("values")
        mask = item.get("mask")
        if mask not in (None, "pan", "secret"):
            raise LayoutSpecError(f"layout {owner}: part {pid} has an unknown mask")
        parts.append(
            Part(
                pid,
                name,
                offset,
                offset + length,
                fmt,
                optional,
                frozenset(str(v) for v in values) if values is not None else None,
                mask,
            )
        )
        offset += length
    if len({p.name for p in parts}) != len(parts):
        raise LayoutSpecError(f"layout {owner}: duplicate part names")
    return tuple(parts)


def _compile_layout(name: str, raw: dict[str, object]) -> Layout:
    field = str(raw.get("field", ""))
    parts = _compile_parts(name, raw.get("parts", []), allow_optional=True)
    header_len = parts[-1].end if parts else 0
    lengths = {header_len} | {p.start for p in parts if p.optional}
    repeat = None
    raw_repeat = raw.get("repeat")
    if raw_repeat is not None:
        if not isinstance(raw_repeat, dict) or any(p.optional for p in parts):
            raise LayoutSpecError(f"layout {name}: a repeating layout needs a fixed header")
        item_parts = _compile_parts(name, raw_repeat.get("parts", []), allow_optional=False)
        if not item_parts:
            raise LayoutSpecError(f"layout {name}: repeat has no parts")
        count = raw_repeat.get("count")
        if count is not None and not any(p.name == count and p.fmt == "n" for p in parts):
            raise LayoutSpecError(f"layout {name}: repeat count {count!r} is not a numeric header part")
        repeat = Repeat(
            str(raw_repeat.get("name", "item")),
            None if count is None else str(count),
            int(raw_repeat.get("min", 0)),
            int(raw_repeat.get("max", 99)),
            item_parts,
            item_parts[-1].end,
        )
    every = parts + (repeat.parts if repeat else ())
    plain_numeric = all(p.fmt == "n" and p.values is None for p in every)
    return Layout(name, field, parts, frozenset(lengths), header_len, plain_numeric, repeat)


def _as_set(value: object) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise LayoutSpecError("breakout conditions must be lists")
    return frozenset(str(v) for v in value)


@dataclass(frozen=True, slots=True)
class _Spec:
    layouts: dict[str, Layout]
    breakout: dict[str, dict[str, tuple[BreakoutRule, ...]]]


@cache
def _spec() -> _Spec:
    try:
        data = tomllib.loads(spec_path(SPEC_FILE).read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise LayoutSpecError(f"{SPEC_FILE}: {exc}") from None
    layouts = {name: _compile_layout(name, raw) for name, raw in data.get("layouts", {}).items()}
    breakout: dict[str, dict[str, tuple[BreakoutRule, ...]]] = {}
    for dialect, rules in data.get("breakout", {}).items():
        per_field: dict[str, list[BreakoutRule]] = {}
        for rule in rules:
            layout = str(rule.get("layout"))
            if layout not in layouts:
                raise LayoutSpecError(f"breakout {dialect}: unknown layout {layout}")
            per_field.setdefault(str(rule.get("field")), []).append(
                BreakoutRule(
                    layout, _as_set(rule.get("mti")), _as_set(rule.get("net_code")), _as_set(rule.get("nmic"))
                )
            )
        breakout[dialect] = {f: tuple(r) for f, r in per_field.items()}
    return _Spec(layouts, breakout)


def layout(name: str) -> Layout:
    """The compiled layout `name` (e.g. "cup.60"); `SubfieldError` when there is no such layout."""
    found = _spec().layouts.get(name)
    if found is None:
        raise SubfieldError(f"unknown sub-field layout {name!r}", field="?")
    return found


def layout_names() -> tuple[str, ...]:
    return tuple(_spec().layouts)


# --- unpack / pack ---------------------------------------------------------------------------------


def _bad_part(parts: tuple[Part, ...], value: str, base: int, field: str) -> SubfieldError | None:
    """The first part of `value` (starting at `base`) whose content breaks its format or value set."""
    for p in parts:
        chunk = value[base + p.start : base + p.end]
        if len(chunk) < p.length:
            break
        if not FORMAT_CHECKS[p.fmt](chunk):
            return SubfieldError(f"not {p.fmt} data", field=_part_field(field, p), offset=base + p.start)
        if p.values is not None and chunk not in p.values:
            return SubfieldError(
                "value outside the allowed set", field=_part_field(field, p), offset=base + p.start
            )
    return None


def _part_field(field: str, part: Part) -> str:
    return part.id if "." in part.id or part.id == field else f"{field}.{part.id}"


def _check(lay: Layout, value: str) -> None:
    if lay.plain_numeric and _is_n(value):
        return
    err = _bad_part(lay.parts, value, 0, lay.field)
    if err is None and lay.repeat is not None:
        r = lay.repeat
        for i in range((len(value) - lay.header_len) // r.size):
            err = _bad_part(r.parts, value, lay.header_len + i * r.size, f"{lay.field}.{r.name}{i + 1}")
            if err is not None:
                break
    if err is not None:
        raise err


def unpack(layout_name: str, value: str) -> dict[str, str]:
    """Split a composite field into its named parts. Raises `SubfieldError` on a length or format
    mismatch. Optional trailing parts that are absent are absent from the dict."""
    return unpack_layout(layout(layout_name), value)


def _length_error(lay: Layout, n: int) -> SubfieldError:
    """Name the sub-field where a value of the wrong length stops (or the field, when it runs on)."""
    if n > lay.header_len:
        return SubfieldError(
            f"{n - lay.header_len} characters after the last sub-field",
            field=lay.field,
            offset=lay.header_len,
        )
    cut = next(p for p in lay.parts if p.end > n)
    if cut.start < n:
        return SubfieldError(
            "value ends inside this sub-field", field=_part_field(lay.field, cut), offset=cut.start
        )
    return SubfieldError("mandatory sub-field absent", field=_part_field(lay.field, cut), offset=cut.start)


def verify_layout(lay: Layout, value: str) -> None:
    """Raise `SubfieldError` unless `value` fits the layout: what `unpack` checks, without building
    the dict (the validator runs this on every request)."""
    n = len(value)
    if lay.repeat is None:
        if n not in lay.lengths:
            raise _length_error(lay, n)
        _check(lay, value)
        return
    r = lay.repeat
    body = n - lay.header_len
    if body < 0 or body % r.size:
        raise SubfieldError(
            f"length {n} is not a header plus whole {r.size}-character items",
            field=lay.field,
            offset=min(n, lay.header_len),
        )
    count = body // r.size
    if not r.min <= count <= r.max:
        raise SubfieldError(
            f"{count} items, expected {r.min}..{r.max}", field=lay.field, offset=lay.header_len
        )
    _check(lay, value)
    if r.count is not None:
        counter = next(p for p in lay.parts if p.name == r.count)
        said = int(value[counter.start : counter.end])
        if said != count:
            raise SubfieldError(
                f"count says {said} items, data holds {count}",
                field=_part_field(lay.field, counter),
                offset=counter.start,
            )


def unpack_layout(lay: Layout, value: str) -> dict[str, str]:
    """`unpack` for a layout already looked up."""
    verify_layout(lay, value)
    n = len(value)
    out = {p.name: value[p.start : p.end] for p in lay.parts if p.end <= n}
    r = lay.repeat
    if r is not None:
        base = lay.header_len
        for i in range(1, (n - base) // r.size + 1):
            for p in r.parts:
                out[f"{r.name}{i}.{p.name}"] = value[base + p.start : base + p.end]
            base += r.size
    return out


def _pack_one(field: str, p: Part, v: object, offset: int) -> str:
    if not isinstance(v, str):
        raise SubfieldError("sub-field value is not a string", field=_part_field(field, p), offset=offset)
    if len(v) != p.length:
        raise SubfieldError(
            f"length {len(v)}, expected {p.length}", field=_part_field(field, p), offset=offset
        )
    if not FORMAT_CHECKS[p.fmt](v):
        raise SubfieldError(f"not {p.fmt} data", field=_part_field(field, p), offset=offset)
    if p.values is not None and v not in p.values:
        raise SubfieldError("value outside the allowed set", field=_part_field(field, p), offset=offset)
    return v


def pack(layout_name: str, parts: Mapping[str, str]) -> str:
    """Join named parts into the field value. Optional trailing parts may be left out (all of them
    after the first absent one); a repeating layout takes items "<name><i>.<part>" from i=1 and fills
    its count part when absent."""
    lay = layout(layout_name)
    used: set[str] = set()
    chunks: list[str] = []
    offset = 0
    stopped: Part | None = None
    for p in lay.parts:
        if p.name not in parts:
            if p.optional:
                stopped = stopped or p
                continue
            if lay.repeat is not None and p.name == lay.repeat.count:
                chunks.append("")  # filled in below, once the items are counted
                offset += p.length
                continue
            raise SubfieldError("mandatory sub-field absent", field=_part_field(lay.field, p), offset=offset)
        if stopped is not None:
            raise SubfieldError(
                f"given after absent optional sub-field {stopped.id}",
                field=_part_field(lay.field, p),
                offset=offset,
            )
        chunks.append(_pack_one(lay.field, p, parts[p.name], offset))
        used.add(p.name)
        offset += p.length
    if lay.repeat is not None:
        r = lay.repeat
        count = 0
        while f"{r.name}{count + 1}.{r.parts[0].name}" in parts:
            count += 1
            for p in r.parts:
                key = f"{r.name}{count}.{p.name}"
                if key not in parts:
                    raise SubfieldError("item sub-field absent", field=f"{lay.field}.{key}", offset=offset)
                chunks.append(_pack_one(f"{lay.field}.{r.name}{count}", p, parts[key], offset))
                used.add(key)
                offset += p.length
        if not r.min <= count <= r.max:
            raise SubfieldError(f"{count} items, expected {r.min}..{r.max}", field=lay.field, offset=offset)
        if r.count is not None:
            i, counter = next((i, p) for i, p in enumerate(lay.parts) if p.name == r.count)
            text = f"{count:0{counter.length}d}"
            if r.count in parts and parts[r.count] != text:
                raise SubfieldError(
                    f"count part disagrees with the {count} items given",
                    field=_part_field(lay.field, counter),
                    offset=counter.start,
                )
            if len(text) != counter.length:
                raise SubfieldError(
                    "too many items for the count part",
                    field=_part_field(lay.field, counter),
                    offset=counter.start,
                )
            chunks[i] = text
    unknown = set(parts) - used - ({lay.repeat.count} if lay.repeat and lay.repeat.count else set())
    if unknown:
        raise SubfieldError(f"unknown sub-field names {sorted(unknown)}", field=lay.field)
    return "".join(chunks)


# --- display ---------------------------------------------------------------------------------------


def _masked_parts(lay: Layout, parts: dict[str, str]) -> dict[str, str]:
    masks = {p.name: p.mask for p in lay.parts if p.mask}
    item_masks = {p.name: p.mask for p in lay.repeat.parts if p.mask} if lay.repeat else {}
    if not masks and not item_masks:
        return parts
    out = {}
    for key, value in parts.items():
        mask = masks.get(key) or item_masks.get(key.rpartition(".")[2] if "." in key else "")
        if mask == "pan":
            out[key] = mask_pan(value.lstrip("0"))
        elif mask == "secret":
            out[key] = f"<redacted {len(value)}>"
        else:
            out[key] = value
    return out


def _dialect_key(dialect_name: str) -> str:
    # `gateway decode --dialect specs/cup-pos.toml` passes a path; its stem is the dialect name
    return Path(dialect_name).stem if dialect_name.endswith(".toml") else dialect_name


def break_out(dialect_name: str, message: Message) -> dict[str, dict[str, str]]:
    """The sub-fields of every present field that has a layout for this dialect and message, for
    display: secrets masked, and a field whose data does not fit its layout shown as
    `{"!error": "<reason>"}` rather than raising (the decode CLI shows the rest of the message)."""
    rules = _spec().breakout.get(_dialect_key(dialect_name), {})
    out: dict[str, dict[str, str]] = {}
    for field in sorted(rules.keys() & message.fields.keys(), key=int):
        rule = next((r for r in rules[field] if r.applies(message)), None)
        if rule is None:
            continue
        try:
            out[field] = _masked_parts(layout(rule.layout), unpack(rule.layout, message.fields[field]))
        except SubfieldError as exc:
            out[field] = {"!error": str(exc)}
    return out
