"""The simulators' TEST KEYS file: the clear keys of a lab made by `gateway init`, so nobody computes a
TMK by hand. The gateway never reads it (its keys are in the encrypted key store); the host simulator
takes the ZMK from it, the terminal simulator and the load tool the terminals and their TMKs, and
`gateway trace replay --keys` the same.

The format is a contract between those tools; keep it exactly:

    # TEST KEYS ... simulators only ... never for real cards      (header comment)
    zmk = "<32 hex>"

    [[terminals]]
    terminal_id = "10000001"
    merchant_id = "898100012340001"
    tmk = "<32 hex>"
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from gateway.security.algorithms import parse_hex_key
from gateway.security.errors import SecurityError

HEADER = """\
# TEST KEYS: for the simulators only (gateway sim-host / sim-terminal / load / trace replay --keys).
# These are the CLEAR master keys of a lab made by `gateway init`: never use them for real cards,
# never load them into a real terminal or HSM, never commit this file. The gateway itself does not
# read it; its copies of these keys are in the encrypted key store.
"""


class KeyFileError(ValueError):
    """A test-keys file that cannot be read or does not have the expected shape."""


@dataclass(frozen=True, slots=True)
class LabTerminal:
    terminal_id: str
    merchant_id: str
    tmk: bytes

    def __repr__(self) -> str:  # a key, even a test key, never lands in a log
        return f"LabTerminal({self.terminal_id}, {self.merchant_id}, tmk=<hidden>)"


@dataclass(frozen=True, slots=True)
class LabKeys:
    zmk: bytes
    terminals: tuple[LabTerminal, ...]

    def __repr__(self) -> str:
        return f"LabKeys(zmk=<hidden>, {len(self.terminals)} terminals)"

    def terminal(self, terminal_id: str | None = None) -> LabTerminal:
        """The named terminal, or the first one."""
        if not self.terminals:
            raise KeyFileError("the test-keys file lists no terminals")
        if terminal_id is None:
            return self.terminals[0]
        for entry in self.terminals:
            if entry.terminal_id == terminal_id:
                return entry
        raise KeyFileError(f"terminal {terminal_id} is not in the test-keys file")


def render_test_keys(keys: LabKeys) -> str:
    lines = [HEADER, f'zmk = "{keys.zmk.hex().upper()}"', ""]
    for t in keys.terminals:
        lines += ["[[terminals]]", f'terminal_id = "{t.terminal_id}"', f'merchant_id = "{t.merchant_id}"',
                  f'tmk = "{t.tmk.hex().upper()}"', ""]
    return "\n".join(lines)


def write_test_keys(path: Path, keys: LabKeys) -> None:
    """Owner-only, and never over an existing file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(render_test_keys(keys))


def read_test_keys(path: str | Path) -> LabKeys:
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise KeyFileError(f"{path}: not a TOML test-keys file: {exc}") from None
    try:
        zmk = _key(doc.get("zmk"), "zmk")
        raw_terminals = doc.get("terminals", [])
        if not isinstance(raw_terminals, list):
            raise KeyFileError("terminals: expected [[terminals]] tables")
        terminals = tuple(_terminal(entry, i) for i, entry in enumerate(raw_terminals))
    except KeyFileError as exc:
        raise KeyFileError(f"{path}: {exc}") from None
    return LabKeys(zmk, terminals)


def _key(value: object, where: str) -> bytes:
    if not isinstance(value, str):
        raise KeyFileError(f"{where}: expected a hex key")
    try:
        key = parse_hex_key(value, where)
    except SecurityError as exc:
        raise KeyFileError(str(exc)) from None
    if len(key) != 16:
        raise KeyFileError(f"{where}: expected a double-length key (32 hex characters)")
    return key


def _terminal(entry: object, index: int) -> LabTerminal:
    where = f"terminals[{index}]"
    if not isinstance(entry, dict):
        raise KeyFileError(f"{where}: expected a table")
    tid, mid = entry.get("terminal_id"), entry.get("merchant_id")
    if not isinstance(tid, str) or len(tid) != 8:
        raise KeyFileError(f"{where}.terminal_id: expected 8 characters")
    if not isinstance(mid, str) or len(mid) != 15:
        raise KeyFileError(f"{where}.merchant_id: expected 15 characters")
    return LabTerminal(tid, mid, _key(entry.get("tmk"), f"{where}.tmk"))
