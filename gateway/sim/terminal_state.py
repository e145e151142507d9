"""Where simulated terminals keep their batch number between runs, so a rerun is not a duplicate.

The gateway journals every financial request under terminal id + batch + STAN and answers a repeat 94.
A simulated terminal starts its STANs at 1, so a second load run in the same batch would be refused
whole. A real terminal keeps its batch and trace number in non-volatile memory; ours keep the batch in
a small JSON file and every run opens a new batch (as after a settlement), so its STANs can start at 1
again:

    {"version": 1, "batches": {"127.0.0.1:5000 LT000001": {"batch": 42, "updated": "2026-11-23T17:45:02Z"}}}

- The batch is advanced and written *before* the run's first request, under an exclusive lock (flock on
  a lock file beside it), so a run that crashes midway still leaves the next run a fresh batch, and two
  runs starting at once get different ones. The write is atomic (temporary file + rename).
- Without a file (first run, or `--state none`) the batch is drawn at random from 1..999999, so runs
  from fresh machines (CI) against a gateway that keeps its journal collide only with a probability of
  one in a million per pair of runs.
- The key is the target and the first terminal id of a driver, so each load worker process (distinct
  terminal ids) and each gateway has its own line.

Why a file rather than always a random batch: a file makes reruns certain and repeatable (batch 42 is
followed by 43) and keeps the batches of one machine's runs apart for good; the random draw is the
fallback where there is nowhere to keep state.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

BATCH_MIN: Final = 1
BATCH_MAX: Final = 999_999
FILE_VERSION: Final = 1


class TerminalStateError(Exception):
    """The state file cannot be read or written (names the file and the cause)."""


def default_state_path(environ: dict[str, str] | None = None) -> Path:
    """$XDG_STATE_HOME/gateway/terminals.json, else ~/.local/state/gateway/terminals.json."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "gateway" / "terminals.json"


def random_batch() -> int:
    return BATCH_MIN + secrets.randbelow(BATCH_MAX - BATCH_MIN + 1)


def following_batch(batch: int) -> int:
    """batch + 1, wrapping from 999999 to 1 (the same rule as the gateway's `next_batch`)."""
    return BATCH_MIN if batch >= BATCH_MAX else batch + 1


def format_batch(batch: int) -> str:
    """Field 60.2's form: 42 → "000042"."""
    return f"{batch:06d}"


class TerminalStateFile:
    """The batch numbers of simulated terminal groups, one JSON file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def next_batch(self, key: str) -> int:
        """Open a new batch for `key`: the one after the last recorded, or a random one the first time;
        recorded before it is returned."""
        with self._locked():
            data = self._read()
            entry = data["batches"].get(key)
            last = entry.get("batch") if isinstance(entry, dict) else None
            batch = following_batch(last) if isinstance(last, int) and BATCH_MIN <= last <= BATCH_MAX \
                else random_batch()
            data["batches"][key] = {"batch": batch, "updated": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
            self._write(data)
        return batch

    def last_batch(self, key: str) -> int | None:
        """The batch recorded for `key` (None when there is none), without changing anything."""
        entry = self._read()["batches"].get(key)
        value = entry.get("batch") if isinstance(entry, dict) else None
        return value if isinstance(value, int) else None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise TerminalStateError(f"terminal state {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _read(self) -> dict[str, Any]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {"version": FILE_VERSION, "batches": {}}
        except OSError as exc:
            raise TerminalStateError(f"terminal state {self.path}: {exc.strerror or exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TerminalStateError(f"terminal state {self.path} is not JSON ({exc}); remove it to start "
                                     "from a random batch") from None
        if not isinstance(data, dict) or not isinstance(data.get("batches"), dict):
            raise TerminalStateError(f"terminal state {self.path} has no 'batches' table; remove it to start "
                                     "from a random batch")
        return data

    def _write(self, data: dict[str, Any]) -> None:
        try:
            fd, temp = tempfile.mkstemp(prefix=self.path.name + ".", dir=self.path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(data, out, indent=2, sort_keys=True)
                out.write("\n")
            os.replace(temp, self.path)
        except OSError as exc:
            raise TerminalStateError(f"terminal state {self.path}: {exc.strerror or exc}") from None
