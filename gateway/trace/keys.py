"""The lab keys file ("test keys") a replay signs in with: TOML, written by `gateway init` (and by
tests), never production keys.

    zmk = "0123456789ABCDEFFEDCBA9876543210"     # the zone master key the trace host shares with the SUT
    [[terminals]]
    terminal_id = "10000001"
    merchant_id = "898100012340001"
    tmk = "..."                                  # hex, the terminal master key the SUT has for it

The player unwraps the working keys of each 0810 with the terminal's TMK (as a real terminal does);
the trace host issues ZPK/ZAK under the ZMK (as a real host does). Keys never appear in `repr`.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.security.algorithms import parse_hex_key
from gateway.security.errors import SecurityError


class KeysFileError(ValueError):
    """A keys file that cannot be read; the message names the key, never its value."""


@dataclass(frozen=True, slots=True)
class LabTerminal:
    terminal_id: str
    merchant_id: str
    tmk: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class LabKeys:
    zmk: bytes = field(repr=False)
    terminals: Mapping[str, LabTerminal] = field(default_factory=dict)

    def tmk(self, terminal_id: str) -> bytes | None:
        entry = self.terminals.get(terminal_id)
        return entry.tmk if entry is not None else None

    def __repr__(self) -> str:
        return f"LabKeys(zmk=<set>, terminals={sorted(self.terminals)})"


def _key(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise KeysFileError(f"{what}: expected hex text")
    try:
        key = parse_hex_key(text, what)
    except SecurityError as exc:
        raise KeysFileError(f"{what}: {exc}") from None
    if len(key) not in (8, 16, 24):
        raise KeysFileError(f"{what}: expected a DES key of 8, 16 or 24 bytes")
    return key


def parse_keys(doc: Mapping[str, Any], source: str = "keys file") -> LabKeys:
    if "zmk" not in doc:
        raise KeysFileError(f"{source}: zmk is missing")
    zmk = _key(doc["zmk"], "zmk")
    raw = doc.get("terminals", [])
    if not isinstance(raw, list):
        raise KeysFileError(f"{source}: terminals must be an array of tables ([[terminals]])")
    terminals: dict[str, LabTerminal] = {}
    for i, entry in enumerate(raw):
        where = f"terminals[{i}]"
        if not isinstance(entry, dict):
            raise KeysFileError(f"{source}: {where} must be a table")
        tid, mid = entry.get("terminal_id"), entry.get("merchant_id", "")
        if not isinstance(tid, str) or not tid or not isinstance(mid, str):
            raise KeysFileError(f"{source}: {where}: terminal_id and merchant_id must be strings")
        terminals[tid] = LabTerminal(tid, mid, _key(entry.get("tmk"), f"{where}.tmk"))
    return LabKeys(zmk, terminals)


def load_keys(path: Path) -> LabKeys:
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise KeysFileError(f"{path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise KeysFileError(f"{path}: {exc}") from None
    return parse_keys(doc, str(path))


def keys_toml(zmk: bytes, terminals: Mapping[str, tuple[str, bytes]]) -> str:
    """The file's text for a ZMK and {terminal_id: (merchant_id, tmk)} (lab keys only)."""
    lines = ["# lab keys: never production keys", f'zmk = "{zmk.hex().upper()}"', ""]
    for tid, (mid, tmk) in terminals.items():
        lines += ["[[terminals]]", f'terminal_id = "{tid}"', f'merchant_id = "{mid}"',
                  f'tmk = "{tmk.hex().upper()}"', ""]
    return "\n".join(lines)
