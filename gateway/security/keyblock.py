"""Keys encrypted under a key-encrypting key, with check values:

- the CUP sign-in working-key block of field 62 (0810), layouts 001/003/004 read from
  `specs/cup-keyblock.toml`: `build_key_block` (gateway side) and `parse_key_block` (terminal side,
  rejects a block whose check values do not match: the terminal then keeps its old keys);
- the ISO 8583:1987 host key exchange: `make_zone_key_under_zmk` (host side) and `unwrap_zone_key`
  (gateway side, verifies the KCV before the key is installed).

Keys are wrapped in ECB under the KEK (single DES for an 8-byte KEK, 2-key TDES for a 16-byte one),
as CUP terminals and hosts expect: no key-block binding (TR-31) exists in this protocol.
"""

from __future__ import annotations

import functools
import hmac
import itertools
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from gateway.security.des import DesKey, KeyLike, as_des_key, generate_key, has_odd_parity, is_weak
from gateway.security.errors import KcvMismatchError, KeyBlockError, KeyFormatError
from gateway.security.keys import WORKING_USAGES, KeyUsage

SPEC_NAME: Final = "cup-keyblock.toml"
_HERE = Path(__file__).resolve().parent
#: the wheel's gateway/_specs when installed, else the repository's specs/ (as gateway.iso.spec does)
SPEC_DIRS: Final = (_HERE.parent / "_specs", _HERE.parents[1] / "specs")


@dataclass(frozen=True, slots=True)
class KeySlot:
    usage: KeyUsage
    offset: int  #: first byte of the encrypted key
    length: int  #: key length issued in this mode
    slot: int  #: bytes reserved for the encrypted key (zero-filled after a shorter key)
    cv_offset: int  #: first byte of the check value


@dataclass(frozen=True, slots=True)
class KeyBlockLayout:
    mode: str  #: 60.3 network management code: "001", "003", "004"
    total: int
    cv_length: int
    keys: tuple[KeySlot, ...]
    description: str = ""

    def slot(self, usage: KeyUsage) -> KeySlot | None:
        for s in self.keys:
            if s.usage is usage:
                return s
        return None

    @property
    def usages(self) -> tuple[KeyUsage, ...]:
        return tuple(s.usage for s in self.keys)


def _int(table: Mapping[str, Any], key: str, where: str) -> int:
    value = table.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise KeyBlockError(f"{where}.{key}: expected a non-negative integer")
    return value


def _parse_layout(mode: str, table: Mapping[str, Any], cv_length: int) -> KeyBlockLayout:
    where = f"layouts.{mode}"
    total = _int(table, "total", where)
    raw_keys = table.get("keys")
    if not isinstance(raw_keys, list) or not raw_keys:
        raise KeyBlockError(f"{where}.keys: expected a non-empty array")
    slots: list[KeySlot] = []
    taken: list[tuple[int, int, str]] = []
    for i, entry in enumerate(raw_keys):
        w = f"{where}.keys[{i}]"
        if not isinstance(entry, dict):
            raise KeyBlockError(f"{w}: expected a table")
        usage_text = entry.get("usage")
        if usage_text not in {u.value for u in WORKING_USAGES}:
            raise KeyBlockError(f"{w}.usage: expected one of PIK, MAK, TDK")
        s = KeySlot(KeyUsage(usage_text), _int(entry, "offset", w), _int(entry, "length", w),
                    _int(entry, "slot", w), _int(entry, "cv_offset", w))
        if s.length not in (8, 16) or s.slot not in (8, 16) or s.length > s.slot:
            raise KeyBlockError(f"{w}: length must be 8 or 16 and fit its slot (8 or 16)")
        taken += [(s.offset, s.offset + s.slot, f"{s.usage} key"), (s.cv_offset, s.cv_offset + cv_length,
                                                                     f"{s.usage} check value")]
        slots.append(s)
    if len({s.usage for s in slots}) != len(slots):
        raise KeyBlockError(f"{where}: a key usage appears twice")
    if not {KeyUsage.PIK, KeyUsage.MAK} <= {s.usage for s in slots}:
        raise KeyBlockError(f"{where}: a layout needs at least a PIK and a MAK")
    taken.sort()
    for (_, end, what), (next_start, _, next_what) in itertools.pairwise(taken):
        if next_start < end:
            raise KeyBlockError(f"{where}: {what} overlaps {next_what}")
    if taken[-1][1] > total:
        raise KeyBlockError(f"{where}: {taken[-1][2]} ends at {taken[-1][1]}, past total {total}")
    return KeyBlockLayout(mode, total, cv_length, tuple(slots), str(table.get("description", "")))


def parse_layouts(doc: Mapping[str, Any]) -> dict[str, KeyBlockLayout]:
    cv_length = _int(doc, "cv_length", "cup-keyblock")
    if not 3 <= cv_length <= 8:
        raise KeyBlockError("cv_length: expected 3 to 8 bytes")
    layouts = doc.get("layouts")
    if not isinstance(layouts, dict) or not layouts:
        raise KeyBlockError("layouts: expected at least one [layouts.\"MODE\"] table")
    out = {}
    for mode, table in layouts.items():
        if not isinstance(table, dict):
            raise KeyBlockError(f"layouts.{mode}: expected a table")
        out[mode] = _parse_layout(mode, table, cv_length)
    return out


def spec_path() -> Path:
    for directory in SPEC_DIRS:
        candidate = directory / SPEC_NAME
        if candidate.is_file():
            return candidate
    raise KeyBlockError(f"{SPEC_NAME} not found in {', '.join(str(d) for d in SPEC_DIRS)}")


def load_layouts(path: Path | None = None) -> dict[str, KeyBlockLayout]:
    """Read the layouts file (default: the bundled `cup-keyblock.toml`)."""
    path = path or spec_path()
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise KeyBlockError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise KeyBlockError(f"{path}: not valid TOML: {exc}") from None
    return parse_layouts(doc)


@functools.cache
def default_layouts() -> Mapping[str, KeyBlockLayout]:
    return load_layouts()


def get_layout(mode: str | KeyBlockLayout,
               layouts: Mapping[str, KeyBlockLayout] | None = None) -> KeyBlockLayout:
    if isinstance(mode, KeyBlockLayout):
        return mode
    table = default_layouts() if layouts is None else layouts
    layout = table.get(mode)
    if layout is None:
        raise KeyBlockError(f"unknown key mode {mode!r}; known: {', '.join(sorted(table))}")
    return layout


def build_key_block(tmk: KeyLike, working: Mapping[KeyUsage, KeyLike], layout: str | KeyBlockLayout,
                    layouts: Mapping[str, KeyBlockLayout] | None = None) -> bytes:
    """Field 62: each working key encrypted under the TMK, followed by its check value.

    A key may be shorter than its slot (the rest stays 0x00) or fill it (a double-length MAK).
    """
    lay = get_layout(layout, layouts)
    kek = as_des_key(tmk, "TMK")
    block = bytearray(lay.total)
    for s in lay.keys:
        given = working.get(s.usage)
        if given is None:
            raise KeyBlockError(f"key mode {lay.mode} needs a {s.usage}")
        key = as_des_key(given, str(s.usage))
        if key.length > s.slot:
            raise KeyBlockError(
                f"a {key.length}-byte {s.usage} does not fit its {s.slot}-byte slot in mode {lay.mode}"
            )
        if key.length > kek.length:
            # a key wrapped under a weaker key is only as strong as the wrapper
            raise KeyFormatError(
                f"a {key.length}-byte {s.usage} cannot be protected by an {kek.length}-byte TMK"
            )
        block[s.offset : s.offset + key.length] = kek.encrypt(key.material)
        block[s.cv_offset : s.cv_offset + lay.cv_length] = key.check_value(lay.cv_length)
    return bytes(block)


def parse_key_block(tmk: KeyLike, block: bytes, layout: str | KeyBlockLayout,
                    layouts: Mapping[str, KeyBlockLayout] | None = None,
                    *, check_parity: bool = True) -> dict[KeyUsage, bytes]:
    """Terminal side: decrypt every working key and check its check value, all or nothing.

    Returns the clear keys by usage. Raises KcvMismatchError naming the first key whose check value
    does not match (the terminal keeps its old keys), KeyBlockError for a block of the wrong length.
    """
    lay = get_layout(layout, layouts)
    kek = as_des_key(tmk, "TMK")
    if len(block) != lay.total:
        raise KeyBlockError(f"key block for mode {lay.mode} must be {lay.total} bytes, got {len(block)}")
    keys: dict[KeyUsage, bytes] = {}
    for s in lay.keys:
        raw = block[s.offset : s.offset + s.slot]
        # a shorter key is followed by zeros; a non-zero tail means the slot holds a longer key
        encrypted = raw[: s.length] if s.length < s.slot and not any(raw[s.length :]) else raw
        clear = kek.decrypt(bytes(encrypted))
        expected = block[s.cv_offset : s.cv_offset + lay.cv_length]
        candidate = DesKey(clear, check_parity=False, what=str(s.usage))
        if not hmac.compare_digest(candidate.check_value(lay.cv_length), bytes(expected)):
            raise KcvMismatchError(
                f"{s.usage} check value in the key block does not match; keys not installed"
            )
        if check_parity and not has_odd_parity(clear):
            raise KeyFormatError(f"{s.usage} from the key block does not have odd DES parity")
        keys[s.usage] = clear
    return keys


def make_zone_key_under_zmk(zmk: KeyLike, length: int = 16,
                            kcv_length: int = 3) -> tuple[bytes, bytes, bytes]:
    """Host side of a key exchange: a fresh zone key (ZPK or ZAK), the same key encrypted under the
    ZMK (ECB) and its check value. Returns (clear_key, key_under_zmk, kcv)."""
    kek = as_des_key(zmk, "ZMK")
    if length > kek.length:
        raise KeyFormatError(f"a {length}-byte zone key cannot be protected by an {kek.length}-byte ZMK")
    clear = generate_key(length)
    return clear, kek.encrypt(clear), DesKey(clear).check_value(kcv_length)


def unwrap_zone_key(zmk: KeyLike, key_under_zmk: bytes, kcv: bytes, what: str = "zone key") -> DesKey:
    """Gateway side: decrypt a zone key under the ZMK and verify its check value (3-8 bytes) before
    anyone may use it; then its parity and strength."""
    if len(key_under_zmk) not in (8, 16, 24):
        raise KeyFormatError(f"encrypted {what} must be 8, 16 or 24 bytes, got {len(key_under_zmk)}")
    if not 3 <= len(kcv) <= 8:
        raise KeyFormatError(f"{what} check value must be 3-8 bytes, got {len(kcv)}")
    clear = as_des_key(zmk, "ZMK").decrypt(bytes(key_under_zmk))
    candidate = DesKey(clear, check_parity=False, what=what)
    if not hmac.compare_digest(candidate.check_value(len(kcv)), bytes(kcv)):
        raise KcvMismatchError(
            f"{what} check value does not match (wrong ZMK or corrupted key); not installed"
        )
    if not has_odd_parity(clear):
        raise KeyFormatError(f"{what} does not have odd DES parity")
    if is_weak(clear):
        raise KeyFormatError(f"{what} is a weak DES key")
    return candidate
