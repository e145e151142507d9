"""The trace file format (version 1): JSON lines, streamed in and out, never loaded whole.

Line 1 is a `TraceHeader` (``"kind": "trace"``). Every further line is a `FrameRecord`
(``"kind": "frame"``) or an `EventRecord` (``"kind": "event"``), in the order the system under test
(SUT: our gateway, anyone's gateway behind `trace proxy`, or whatever an import came from) saw them.

Directions are relative to the SUT, on each leg::

    terminal ──(terminal, in)──▶ SUT ──(host, out)──▶ host
    terminal ◀─(terminal, out)── SUT ◀─(host, in)──── host

`conn` names a TCP connection within the trace ("T1", "T2", … on the terminal leg, "H1", … on the
host leg), so frames of one connection can be paired and replayed on one connection.

Field values are the codec's (`gateway.iso.message.Message`): strings, binary fields as uppercase hex.
Secret fields hold surrogates of the same length and format (so the frame still encodes, and the same
card is the same surrogate everywhere in the trace); `secrets` says which fields were replaced and how
a replay must treat them (`SecretKind`). `wire` is the hex of the framed bytes *as re-encoded from the
surrogate fields* (never the clear original), so `trace check` can re-encode and compare it.

`cause` (optional) is the `seq` of the frame that made the SUT send this one, when the SUT said so:
the host leg's 0200 caused by the terminal's 0200, a reversal 0400 caused by the 0200 that timed out,
a repeat 0401 caused by its 0400. Readers pair legs by it where it is given and fall back to their
heuristics where it is not (older traces, imports, `trace proxy`, which cannot know); a `cause` that
names no frame seen (a rotated-away part) is ignored.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, Final

log = logging.getLogger("gateway.trace.format")

FORMAT_VERSION: Final = 1


class Leg(StrEnum):
    TERMINAL = "terminal"
    HOST = "host"


class Direction(StrEnum):
    IN = "in"  #: towards the SUT (terminal → SUT, host → SUT)
    OUT = "out"  #: from the SUT (SUT → terminal, SUT → host)


class SecretKind(StrEnum):
    """How a surrogate field must be treated by a replay and by comparisons."""

    PAN = "pan"  #: surrogate PAN: same length, same first 6 digits, Luhn-valid, consistent per trace
    TRACK = "track"  #: surrogate track 2/3 built on the surrogate PAN (clear form; re-encrypt if 53.3=1)
    PIN = "pin"  #: PIN block placeholder: a replay computes a fresh one for the surrogate PAN
    MAC = "mac"  #: MAC placeholder: a replay recomputes it; comparisons verify, never compare
    KEY = "key"  #: key material (sign-in field 62, key exchange): placeholder, never compared
    CVV = "cvv"  #: card verification value: placeholder
    CHIP = "chip"  #: ICC data with sensitive tags surrogated


class EventKind(StrEnum):
    CONNECT = "connect"
    CLOSE = "close"  #: `detail` says who closed and why, when known
    #: the SUT gave up waiting for an answer; detail: the request's match key as `format_match_key`
    #: writes it ("class=020 11=000123 41=10000001"), plus " sent=no" when it was never written
    TIMEOUT = "timeout"
    UNDECODABLE = "undecodable"  #: a frame that did not decode (detail: the error; wire kept only if safe)
    #: the SUT decided an answer but could not write it (terminal gone, write timeout); detail: MTI,
    #: STAN, terminal and response code as `format_match_key` writes them (plus "39=..")
    UNDELIVERED = "undelivered"


def format_match_key(parts: dict[str, str]) -> str:
    """An event's `detail` naming a message: "class=020 11=000123 41=10000001" (class = MTI class, as
    `gateway.iso.mti.match_class`; field numbers for the rest). Values never hold spaces or secrets."""
    return " ".join(f"{k}={v.replace(' ', '_')}" for k, v in parts.items())


def parse_match_key(detail: str) -> dict[str, str]:
    """The parts `format_match_key` wrote (unknown words are ignored, so details may carry more)."""
    out: dict[str, str] = {}
    for word in detail.split():
        key, sep, value = word.partition("=")
        if sep:
            out[key] = value
    return out


@dataclass(frozen=True, slots=True)
class TraceHeader:
    source: str  #: "gateway serve", "trace proxy", "import:pcap", "import:jpos-xml", "import:hex", ...
    dialects: dict[str, str]  #: leg → dialect name, e.g. {"terminal": "cup-pos", "host": "iso87-ascii"}
    framings: dict[str, str]  #: leg → framing kind ("cup", "len2", "ascii4")
    created: str = ""  #: ISO 8601 time the recording started
    version: int = FORMAT_VERSION
    notes: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": "trace", "version": self.version, "created": self.created, "source": self.source,
                "dialects": self.dialects, "framings": self.framings, "notes": self.notes}


@dataclass(frozen=True, slots=True)
class FrameRecord:
    seq: int  #: position in the trace, from 1
    t: float  #: seconds since the epoch when the SUT sent or received the frame
    leg: Leg
    dir: Direction
    conn: str
    mti: str
    fields: dict[str, str]
    wire: str = ""  #: hex of the framed bytes, re-encoded from the surrogate fields
    envelope: dict[str, str] | None = None  #: CUP framing: {"tpdu": hex, "header": hex}
    secrets: dict[str, SecretKind] = field(default_factory=dict)  #: field → how it was replaced
    #: fields the source had masked or wiped (imports of masked logs): the value is a placeholder of a
    #: valid form that stands for a value nobody kept; compare such fields as `present`, never `same`
    masked: tuple[str, ...] = ()
    cause: int | None = None  #: seq of the frame that made the SUT send this one (see the module doc)

    def to_json(self) -> dict[str, Any]:
        # enum members as they are: json writes a StrEnum as its string, and `.value` costs a property
        # call per member (the writer process writes every frame of the gateway)
        out: dict[str, Any] = {"kind": "frame", "seq": self.seq, "t": round(self.t, 6), "leg": self.leg,
                               "dir": self.dir, "conn": self.conn, "mti": self.mti, "fields": self.fields}
        if self.envelope is not None:
            out["envelope"] = self.envelope
        if self.secrets:
            out["secrets"] = self.secrets
        if self.masked:
            out["masked"] = list(self.masked)
        if self.cause is not None:
            out["cause"] = self.cause
        if self.wire:
            out["wire"] = self.wire
        return out


@dataclass(frozen=True, slots=True)
class EventRecord:
    seq: int
    t: float
    leg: Leg
    conn: str
    event: EventKind
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"kind": "event", "seq": self.seq, "t": round(self.t, 6), "leg": self.leg.value,
                "conn": self.conn, "event": self.event.value, "detail": self.detail}


Record = FrameRecord | EventRecord


class TraceFormatError(ValueError):
    """A line that is not a valid trace record; the message names the line number."""


def _time(obj: dict[str, Any], lineno: int) -> float:
    """A record's time: seconds, a finite number (NaN compares false with every window and pace; an
    infinity would have a paced replay sleep for ever)."""
    t = float(obj["t"])
    if not math.isfinite(t):
        raise TraceFormatError(f"line {lineno}: time {obj['t']!r} is not a finite number of seconds")
    return t


def parse_line(line: str, lineno: int) -> TraceHeader | Record:
    try:
        obj = json.loads(line)
        kind = obj["kind"]
        if kind == "trace":
            if obj.get("version") != FORMAT_VERSION:
                raise TraceFormatError(f"line {lineno}: trace format version {obj.get('version')!r} "
                                       f"is not {FORMAT_VERSION}")
            return TraceHeader(source=str(obj.get("source", "")), dialects=dict(obj["dialects"]),
                               framings=dict(obj["framings"]), created=str(obj.get("created", "")),
                               notes=dict(obj.get("notes", {})))
        if kind == "frame":
            fields = obj["fields"]
            if not isinstance(fields, dict) or not all(isinstance(v, str) for v in fields.values()):
                raise TraceFormatError(f"line {lineno}: fields must be an object of strings")
            env = obj.get("envelope")
            cause = obj.get("cause")
            if cause is not None and (type(cause) is not int or cause < 1):
                raise TraceFormatError(f"line {lineno}: cause must be the seq of a frame (a positive integer)")
            return FrameRecord(seq=int(obj["seq"]), t=_time(obj, lineno), leg=Leg(obj["leg"]),
                               dir=Direction(obj["dir"]), conn=str(obj["conn"]), mti=str(obj["mti"]),
                               fields={str(k): v for k, v in fields.items()},
                               wire=str(obj.get("wire", "")), envelope=dict(env) if env is not None else None,
                               secrets={str(k): SecretKind(v) for k, v in obj.get("secrets", {}).items()},
                               masked=tuple(str(k) for k in obj.get("masked", ())), cause=cause)
        if kind == "event":
            return EventRecord(seq=int(obj["seq"]), t=_time(obj, lineno), leg=Leg(obj["leg"]), conn=str(obj["conn"]),
                               event=EventKind(obj["event"]), detail=str(obj.get("detail", "")))
        raise TraceFormatError(f"line {lineno}: unknown record kind {kind!r}")
    except TraceFormatError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise TraceFormatError(f"line {lineno}: not a trace record ({type(exc).__name__}: {exc})") from None


def read_trace(path: Path) -> tuple[TraceHeader, Iterator[Record]]:
    """The header, and an iterator over the records that reads the file as it goes (constant memory).
    The file is closed when the iterator is exhausted or garbage-collected."""
    f = path.open(encoding="utf-8")
    try:
        try:
            first = f.readline()
        except UnicodeDecodeError:
            raise TraceFormatError(f"{path}: line 1 is not UTF-8 text, not a trace") from None
        if not first:
            raise TraceFormatError(f"{path}: empty file, not a trace")
        header = parse_line(first, 1)
        if not isinstance(header, TraceHeader):
            raise TraceFormatError(f"{path}: line 1 is not a trace header")
    except BaseException:
        f.close()
        raise
    return header, _records(f)


def _records(f: IO[str]) -> Iterator[Record]:
    with f:
        lineno = 1
        try:
            for lineno, line in enumerate(f, start=2):
                if line.strip():
                    try:
                        rec = parse_line(line, lineno)
                    except TraceFormatError as exc:
                        if line.endswith("\n"):
                            raise
                        # no newline: the file's last line, cut off by a crash mid-write; what came
                        # before it is a whole trace, so it is read rather than lost with it
                        log.warning("%s: the last line (%d) is cut off, read up to the line before: %s",
                                    f.name, lineno, exc)
                        return
                    if isinstance(rec, TraceHeader):
                        raise TraceFormatError(f"line {lineno}: a second trace header")
                    yield rec
        except UnicodeDecodeError:
            raise TraceFormatError(f"{f.name}: not UTF-8 text after line {lineno}") from None


@dataclass(slots=True)
class FrameTally:
    """What a reader of a trace saw of its frames, counted on the way through (`count`). A run over a
    trace with no frame that decodes compared nothing, and passing it would certify a capture of the
    wrong dialect or framing (or an empty file) as conformant: check, diff and replay all ask
    `nothing_to_compare` and fail, or refuse, with its reason."""

    frames: int = 0
    undecodable: int = 0
    last_undecodable: str = ""  #: the detail of the last `undecodable` event (its error, never bytes)

    def count(self, records: Iterable[Record]) -> Iterator[Record]:
        for rec in records:
            self.see(rec)
            yield rec

    def see(self, rec: Record) -> None:
        if isinstance(rec, FrameRecord):
            self.frames += 1
        elif rec.event is EventKind.UNDECODABLE:
            self.undecodable += 1
            self.last_undecodable = rec.detail

    def nothing_to_compare(self) -> str | None:
        """None when a frame decoded; else why the trace cannot stand for anything."""
        if self.frames:
            return None
        if self.undecodable:
            return (f"no frame of the trace decodes ({self.undecodable:,} undecodable, the last: "
                    f"{self.last_undecodable})")
        return "the trace holds no frames"


def validate_trace(path: Path) -> tuple[TraceHeader, FrameTally]:
    """Read a whole trace once, as `read_trace` would (streamed): its header and a tally of its
    frames, or the `TraceFormatError` naming the first bad line. A replay calls it before it
    listens or connects, so a malformed trace is refused at once, not after the SUT has signed on."""
    header, records = read_trace(path)
    tally = FrameTally()
    for _ in tally.count(records):
        pass
    return header, tally


def write_records(out: IO[str], header: TraceHeader, records: Iterable[Record]) -> int:
    """Write a whole trace (header first); returns the number of records written."""
    out.write(json.dumps(header.to_json(), separators=(",", ":")) + "\n")
    n = 0
    for rec in records:
        out.write(json.dumps(rec.to_json(), separators=(",", ":")) + "\n")
        n += 1
    return n
