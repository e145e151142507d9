"""Dialects as data: a TOML file per dialect holds a complete pyiso8583 spec dict plus metadata.

`load_dialect("cup-pos")`, `load_dialect("iso87-ascii")` or `load_dialect("path/to/mine.toml")`
returns a frozen `Dialect`. Adding a dialect means writing a TOML file (see `specs/cup-pos.toml`, whose
header comment documents every key); no Python changes.

File layout:

    [dialect]            name, description, default_framing, mac_field, mac_fields, mac_wire_len
    [dialect.mti]        versions / classes / functions / origins: the MTI digits this dialect accepts
    [fields]             "h", "t", "p", optional "1", and "2".."128" (never "65"): pyiso8583 field
                         properties plus our `fmt` (n, z, an, ans, b, xn)

Every file is validated on load, so a typo fails at start-up with a `SpecError` that names the file
and the dotted key, not with a KeyError deep inside pyiso8583 on the first message.

Named dialects are looked up in the installed package first (`gateway/_specs`, where the wheel puts
`specs/`) and then in the source checkout's `specs/`.
"""

from __future__ import annotations

import codecs
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any, Final

import gateway
from gateway.iso.errors import SpecError

#: framings a dialect may name as its default (see gateway.iso.framing)
FRAMINGS: Final = frozenset({"none", "len2", "ascii4", "cup"})
#: value formats the codec checks (pyiso8583 alone would accept hex in BCD "numerics" etc.)
FORMATS: Final = frozenset({"n", "z", "an", "ans", "b", "xn"})

_NAME: Final = re.compile(r"[a-z0-9][a-z0-9._-]*")
_FIELD_PROPS: Final = frozenset(
    {"fmt", "desc", "data_enc", "len_enc", "len_type", "max_len", "len_count", "left_pad", "right_pad"}
)
_DIALECT_KEYS: Final = frozenset(
    {"name", "description", "default_framing", "mac_field", "mac_fields", "mac_wire_len", "mti"}
)
_MTI_KEYS: Final = ("versions", "classes", "functions", "origins")
_HEX_DIGITS: Final = frozenset("0123456789ABCDEF")
#: the field keys a secondary bitmap carries (65..128): a set test instead of int() per key
SECONDARY_FIELDS: Final = frozenset(str(f) for f in range(65, 129))


def spec_dirs() -> tuple[Path, ...]:
    """Where named dialects are looked up, in order: installed wheel, then source checkout."""
    package = Path(gateway.__file__).resolve().parent
    return (package / "_specs", package.parent / "specs")


@dataclass(frozen=True, eq=False)
class Dialect:
    """One ISO 8583 dialect. `spec` is the pyiso8583 spec dict: hand it to pyiso8583, never mutate it.

    `formats` maps every data field ("2".."128") to its value format; `binary_fields` are the fields
    whose Message value is an uppercase hex string. The MAC field is always the last field of an
    encoded body and occupies `mac_wire_len` bytes there, so MAB = `body[:-mac_wire_len]`. In both
    shipped dialects the MAC field's wire bytes are its value's ASCII (`value.encode("ascii")`).
    """

    name: str
    description: str
    spec: dict[str, dict[str, Any]]
    formats: Mapping[str, str]
    default_framing: str
    mac_field: str
    mac_fields: tuple[str, ...]
    mac_wire_len: int
    binary_fields: frozenset[str]
    #: every MTI this dialect accepts (version × class × function × origin digits from the file)
    mtis: frozenset[str]
    source: Path

    @property
    def fields(self) -> tuple[str, ...]:
        """The data fields the dialect defines, ascending."""
        return tuple(self.formats)

    @property
    def secondary_bitmap(self) -> bool:
        return "1" in self.spec

    def fields_of_format(self, *fmts: str) -> frozenset[str]:
        return frozenset(k for k, f in self.formats.items() if f in fmts)

    def mac_field_for(self, keys: Iterable[str]) -> str:
        """The MAC field a message with these fields carries: with a secondary bitmap present (any
        field above 64) that is the dialect's MAC field above 64 (ISO 8583:1987: 128), otherwise the
        primary one (64)."""
        secondary = not SECONDARY_FIELDS.isdisjoint(keys)
        for candidate in self.mac_fields:
            if (int(candidate) > 64) == secondary:
                return candidate
        return self.mac_field

    def __repr__(self) -> str:
        return f"Dialect({self.name!r}, {len(self.formats)} fields, source={str(self.source)!r})"


_cache: dict[str, Dialect] = {}


def load_dialect(name_or_path: str) -> Dialect:
    """A dialect by name ("cup-pos", "iso87-ascii", or any `<name>.toml` in the spec directories)
    or by path to a TOML file. Loaded once and cached (by name, or by resolved path)."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise SpecError("dialect must be a name or a path to a .toml file")
    is_name = _NAME.fullmatch(name_or_path) is not None and not name_or_path.endswith(".toml")
    if is_name:
        key = name_or_path
        if key in _cache:
            return _cache[key]
        path = _find_named(name_or_path)
    else:
        path = Path(name_or_path).expanduser().resolve()
        key = str(path)
        if key in _cache:
            return _cache[key]
        if not path.is_file():
            raise SpecError(f"dialect file {name_or_path} not found")
    dialect = _load_file(path, expected_name=name_or_path if is_name else None)
    _cache[key] = dialect
    return dialect


def _find_named(name: str) -> Path:
    for directory in spec_dirs():
        candidate = directory / f"{name}.toml"
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(d) for d in spec_dirs())
    raise SpecError(f"unknown dialect {name!r} (no {name}.toml in {looked})")


def _load_file(path: Path, *, expected_name: str | None) -> Dialect:
    src = str(path)
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except OSError as exc:
        raise SpecError(f"cannot read: {exc.strerror or exc}", source=src) from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"not valid TOML: {exc}", source=src) from None
    return _build(raw, src, path, expected_name)


# --- validation ------------------------------------------------------------------------------------


def _fail(src: str, key: str, reason: str) -> SpecError:
    return SpecError(reason, source=src, key=key)


def _table(raw: Mapping[str, Any], key: str, src: str, dotted: str) -> dict[str, Any]:
    value = raw.get(key)
    if not isinstance(value, dict):
        raise _fail(src, dotted, "missing table" if value is None else "must be a table")
    return value


def _str(table: Mapping[str, Any], key: str, src: str, dotted: str, *, default: str | None = None) -> str:
    value = table.get(key, default)
    if value is None:
        raise _fail(src, dotted, "missing")
    if not isinstance(value, str) or not value:
        raise _fail(src, dotted, "must be a non-empty string")
    return value


def _int(table: Mapping[str, Any], key: str, src: str, dotted: str, *, lo: int, hi: int) -> int:
    value = table.get(key)
    if value is None:
        raise _fail(src, dotted, "missing")
    if type(value) is not int or not lo <= value <= hi:
        raise _fail(src, dotted, f"must be an integer {lo}..{hi}")
    return value


def _encoding(table: Mapping[str, Any], key: str, src: str, dotted: str, *, extra: tuple[str, ...]) -> str:
    value = _str(table, key, src, dotted)
    if value in extra:
        return value
    try:
        codecs.lookup(value)
    except LookupError:
        raise _fail(
            src, dotted, f"unknown encoding {value!r} (use {', '.join(extra)} or a Python codec)"
        ) from None
    return value


def _max_prefix_value(len_enc: str, len_type: int) -> int:
    if len_enc == "b":
        return 256**len_type - 1
    if len_enc == "bcd":
        return 10 ** (2 * len_type) - 1
    return 10**len_type - 1


def _field(key: str, raw: object, src: str) -> tuple[dict[str, Any], str | None]:
    """Validate one field's properties; return the pyiso8583 field spec and its `fmt`.

    The MTI and bitmaps ("t", "p", "1") have fixed wire sizes in pyiso8583; their `fmt` is informative."""
    base = f"fields.{key}"
    if not isinstance(raw, dict):
        raise _fail(src, base, "must be a table")
    for prop in raw:
        if prop not in _FIELD_PROPS:
            raise _fail(
                src, f"{base}.{prop}", f"unknown property (allowed: {', '.join(sorted(_FIELD_PROPS))})"
            )
    data_enc = _encoding(raw, "data_enc", src, f"{base}.data_enc", extra=("b",))
    len_enc = _encoding(raw, "len_enc", src, f"{base}.len_enc", extra=("b", "bcd"))
    len_type = _int(raw, "len_type", src, f"{base}.len_type", lo=0, hi=4)
    max_len = _int(raw, "max_len", src, f"{base}.max_len", lo=0, hi=99_999)
    len_count = raw.get("len_count", "bytes")
    if len_count not in ("bytes", "nibbles"):
        raise _fail(src, f"{base}.len_count", 'must be "bytes" or "nibbles"')
    if len_count == "nibbles" and data_enc != "b":
        raise _fail(src, f"{base}.len_count", 'counting nibbles needs data_enc = "b" (BCD / hex data)')
    if len_type and max_len > _max_prefix_value(len_enc, len_type):
        raise _fail(
            src, f"{base}.max_len", f"{max_len} does not fit a {len_type}-byte {len_enc} length prefix"
        )
    pads = [p for p in ("left_pad", "right_pad") if p in raw]
    if len(pads) > 1:
        raise _fail(src, f"{base}.right_pad", "give left_pad or right_pad, not both")
    for pad in pads:
        value = raw[pad]
        if not isinstance(value, str) or len(value) != 1 or value not in _HEX_DIGITS:
            raise _fail(src, f"{base}.{pad}", "must be one hex digit 0-9 / A-F")
        if len_count != "nibbles":
            raise _fail(src, f"{base}.{pad}", 'padding applies only to len_count = "nibbles" fields')
    odd_possible = len_type > 0 or max_len % 2 == 1
    if len_count == "nibbles" and odd_possible and not pads:
        raise _fail(src, base, "an odd number of nibbles is possible here: give left_pad or right_pad")
    fmt = raw.get("fmt")
    if fmt is not None and fmt not in FORMATS:
        raise _fail(src, f"{base}.fmt", f"unknown format {fmt!r} (allowed: {', '.join(sorted(FORMATS))})")
    if fmt in ("n", "z") and data_enc == "b" and len_count != "nibbles" and key not in ("t", "p", "1"):
        raise _fail(src, f"{base}.len_count", 'BCD n / z fields must count nibbles (len_count = "nibbles")')
    desc = raw.get("desc", f"Field {key}")
    if not isinstance(desc, str):
        raise _fail(src, f"{base}.desc", "must be a string")
    spec: dict[str, Any] = {
        "data_enc": data_enc,
        "len_enc": len_enc,
        "len_type": len_type,
        "max_len": max_len,
        "desc": desc,
    }
    if len_count == "nibbles":
        spec["len_count"] = "nibbles"
    for pad in pads:
        spec[pad] = raw[pad]
    return spec, fmt


def wire_len(field_spec: Mapping[str, Any]) -> int | None:
    """On-wire byte length of a fixed field (None for variable ones)."""
    if field_spec["len_type"]:
        return None
    if field_spec.get("len_count") == "nibbles":
        return (field_spec["max_len"] + 1) // 2
    return int(field_spec["max_len"])


def _special_fields(fields: Mapping[str, Any], src: str) -> dict[str, dict[str, Any]]:
    spec: dict[str, dict[str, Any]] = {}
    for key in ("h", "t", "p", "1"):
        if key not in fields:
            if key == "1":
                continue
            raise _fail(src, f"fields.{key}", "missing")
        field_spec, _fmt = _field(key, fields[key], src)
        if field_spec["len_type"]:
            raise _fail(src, f"fields.{key}.len_type", "must be 0 (fixed)")
        binary = field_spec["data_enc"] == "b"
        want = {"h": 0, "t": 2 if binary else 4, "p": 8 if binary else 16, "1": 8 if binary else 16}[key]
        if field_spec["max_len"] != want:
            why = {"h": "headers belong to the framing, not the codec"}.get(key, "fixed by the encoding")
            raise _fail(src, f"fields.{key}.max_len", f"must be {want} ({why})")
        spec[key] = field_spec
    if "1" in spec and spec["1"]["data_enc"] != spec["p"]["data_enc"]:
        raise _fail(src, "fields.1.data_enc", "must match fields.p.data_enc")
    return spec


def _mtis(table: Mapping[str, Any], src: str) -> frozenset[str]:
    parts: list[list[str]] = []
    for key in table:
        if key not in _MTI_KEYS:
            raise _fail(src, f"dialect.mti.{key}", f"unknown key (allowed: {', '.join(_MTI_KEYS)})")
    for key in _MTI_KEYS:
        value = table.get(key)
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(d, str) and len(d) == 1 and d.isdigit() for d in value)
        ):
            raise _fail(
                src, f"dialect.mti.{key}", 'must be a non-empty list of single digits, e.g. ["0", "1"]'
            )
        parts.append(value)
    return frozenset("".join(p) for p in product(*parts))


def _build(raw: Mapping[str, Any], src: str, path: Path, expected_name: str | None) -> Dialect:
    for top in raw:
        if top not in ("dialect", "fields"):
            raise _fail(src, top, "unknown table (allowed: dialect, fields)")
    meta = _table(raw, "dialect", src, "dialect")
    for key in meta:
        if key not in _DIALECT_KEYS:
            raise _fail(src, f"dialect.{key}", f"unknown key (allowed: {', '.join(sorted(_DIALECT_KEYS))})")
    name = _str(meta, "name", src, "dialect.name")
    if _NAME.fullmatch(name) is None:
        raise _fail(src, "dialect.name", "must be lower-case letters, digits, '.', '_' or '-'")
    if expected_name is not None and name != expected_name:
        raise _fail(src, "dialect.name", f"is {name!r} but the file is looked up as {expected_name!r}")
    description = _str(meta, "description", src, "dialect.description", default=name)
    framing = _str(meta, "default_framing", src, "dialect.default_framing")
    if framing not in FRAMINGS:
        raise _fail(src, "dialect.default_framing", f"must be one of {', '.join(sorted(FRAMINGS))}")
    mtis = _mtis(_table(meta, "mti", src, "dialect.mti"), src)

    fields = _table(raw, "fields", src, "fields")
    spec = _special_fields(fields, src)
    formats: dict[str, str] = {}
    data_keys = [k for k in fields if k not in ("h", "t", "p", "1")]
    for key in data_keys:
        if not (key.isascii() and key.isdigit() and key == str(int(key)) and 2 <= int(key) <= 128):
            raise _fail(src, f"fields.{key}", 'data fields are "2".."128"')
        if key == "65":
            raise _fail(
                src, "fields.65", "bit 65 flags pyiso8583's tertiary bitmap; it cannot be a data field"
            )
        if int(key) > 64 and "1" not in spec:
            raise _fail(src, f"fields.{key}", 'fields above 64 need a secondary bitmap (fields."1")')
    for key in sorted(data_keys, key=int):
        field_spec, fmt = _field(key, fields[key], src)
        if fmt is None:
            raise _fail(src, f"fields.{key}.fmt", "missing")
        if not field_spec["max_len"]:
            raise _fail(src, f"fields.{key}.max_len", "must be at least 1")
        spec[key] = field_spec
        formats[key] = fmt
    if not formats:
        raise _fail(src, "fields", "defines no data fields")

    mac_field = _str(meta, "mac_field", src, "dialect.mac_field")
    mac_list = meta.get("mac_fields", [mac_field])
    if (
        not isinstance(mac_list, list)
        or not all(isinstance(k, str) for k in mac_list)
        or mac_field not in mac_list
    ):
        raise _fail(src, "dialect.mac_fields", "must be a list of field keys including dialect.mac_field")
    mac_wire_len = _int(meta, "mac_wire_len", src, "dialect.mac_wire_len", lo=1, hi=64)
    for key in mac_list:
        if key not in formats:
            raise _fail(src, "dialect.mac_fields", f"field {key} is not defined in [fields]")
        if formats[key] != "b" or wire_len(spec[key]) != mac_wire_len:
            raise _fail(
                src,
                f"fields.{key}",
                f"a MAC field must be fixed, fmt b, {mac_wire_len} bytes on the wire (mac_wire_len)",
            )
        # the MAC is the last field of its bitmap: the MAB is everything before it
        if any(int(key) < int(k) <= (64 if int(key) <= 64 else 128) for k in formats):
            raise _fail(src, "dialect.mac_fields", f"MAC field {key} must be the last field of its bitmap")

    return Dialect(
        name=name,
        description=description,
        spec=spec,
        formats=formats,
        default_framing=framing,
        mac_field=mac_field,
        mac_fields=tuple(mac_list),
        mac_wire_len=mac_wire_len,
        binary_fields=frozenset(k for k, f in formats.items() if f == "b"),
        mtis=mtis,
        source=path,
    )
