"""Writing a trace to disk with rotation by size: bounded disk, and every file a valid trace.

`path` is the live file; when it passes `max_bytes` it is closed and renamed `path.1` (older parts
shift to `.2`, `.3`, ...; beyond `max_files` in all, the oldest is deleted), and a new `path` starts
with its own header (notes: `part`, counting from 1 over the recording). `trace check` reads parts
in order as one stream: `gateway trace check trace.jsonl.2 trace.jsonl.1 trace.jsonl`.
A `path` left by an earlier recording is rotated away first, so one file never mixes two recordings
(two surrogate keys).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

from gateway.trace.format import Record, TraceHeader


def rotated(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


def shift_parts(path: Path, max_files: int) -> None:
    """path → path.1 → path.2 ...; the part that would pass max_files is deleted."""
    oldest = rotated(path, max_files - 1) if max_files > 1 else path
    if max_files <= 1:
        path.unlink(missing_ok=True)
        return
    oldest.unlink(missing_ok=True)
    for n in range(max_files - 2, 0, -1):
        src = rotated(path, n)
        if src.exists():
            src.rename(rotated(path, n + 1))
    if path.exists():
        path.rename(rotated(path, 1))


class RotatingTraceWriter:
    def __init__(self, path: Path, header: TraceHeader, *, max_bytes: int, max_files: int) -> None:
        if max_files < 1:
            raise ValueError("max_files must be at least 1")
        self.path = path
        self.header = header
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.part = 0
        self.records = 0
        self.records_in_part = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            shift_parts(path, max_files)
        self._file: IO[str] | None = None
        self._size = 0
        self._open()

    def _open(self) -> None:
        self.part += 1
        notes = dict(self.header.notes)
        notes["part"] = self.part
        header = TraceHeader(self.header.source, self.header.dialects, self.header.framings, self.header.created,
                             self.header.version, notes)
        self._file = self.path.open("w", encoding="utf-8")
        line = json.dumps(header.to_json(), separators=(",", ":"), ensure_ascii=False) + "\n"
        self._file.write(line)
        self._size = len(line.encode("utf-8"))

    def write(self, record: Record) -> None:
        line = json.dumps(record.to_json(), separators=(",", ":"), ensure_ascii=False) + "\n"
        size = len(line) if line.isascii() else len(line.encode("utf-8"))
        if self._size + size > self.max_bytes and self._size > 0 and self.records_in_part > 0:
            self._rotate()
        assert self._file is not None
        self._file.write(line)
        self._size += size
        self.records += 1
        self.records_in_part += 1

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        shift_parts(self.path, self.max_files)
        self.records_in_part = 0
        self._open()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
