"""The byte protocol between the recorder (inside the gateway) and its writer process: fixed headers,
no pickling. Each record: `HEAD` (type, time, leg, direction, connection number, aux length, payload
length), then aux (frame: the 11-byte CUP envelope or nothing; event: the event kind), then payload
(frame: the message body; event: the detail, UTF-8). Sans-I/O: `pack_*` make bytes, `RecordReader`
turns a stream of chunks back into records.

Frames are numbered by their order in the stream, from 1 (the recorder's `frame()` returns the
number); a `FRAME_CAUSED` record is a frame whose aux starts with the 8-byte number of the frame that
caused it (the trace's `cause`), then the envelope."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from gateway.iso.framing import ENVELOPE_LEN, TPDU_LEN, CupEnvelope
from gateway.trace.format import Direction, EventKind, Leg

HEAD: Final = struct.Struct(">BdBBIHI")
FRAME: Final = 1
EVENT: Final = 2
FRAME_CAUSED: Final = 3
CAUSE: Final = struct.Struct(">Q")
LEGS: Final = (Leg.TERMINAL, Leg.HOST)
DIRECTIONS: Final = (Direction.IN, Direction.OUT)
LEG_CODE: Final = {Leg.TERMINAL: 0, Leg.HOST: 1}
DIR_CODE: Final = {Direction.IN: 0, Direction.OUT: 1}
#: connection labels by leg: T1, T2, ... / H1, H2, ...
LABEL_PREFIX: Final = ("T", "H")


@dataclass(frozen=True, slots=True)
class RawFrame:
    t: float
    leg: Leg
    direction: Direction
    conn: str
    body: bytes
    envelope: CupEnvelope | None
    cause: int | None = None  #: number of the frame (in this stream) that caused this one


@dataclass(frozen=True, slots=True)
class RawEvent:
    t: float
    leg: Leg
    conn: str
    kind: EventKind
    detail: str


def pack_frame(t: float, leg: int, direction: int, conn: int, body: bytes, envelope: CupEnvelope | None,
               cause: int | None = None) -> bytes:
    env = b"" if envelope is None else envelope.tpdu + envelope.header
    if cause is None:
        return HEAD.pack(FRAME, t, leg, direction, conn, len(env), len(body)) + env + body
    aux = CAUSE.pack(cause) + env
    return HEAD.pack(FRAME_CAUSED, t, leg, direction, conn, len(aux), len(body)) + aux + body


def pack_event(t: float, leg: int, conn: int, kind: EventKind, detail: str) -> bytes:
    aux = kind.value.encode("ascii")
    payload = detail.encode("utf-8", "replace")[:60_000]
    return HEAD.pack(EVENT, t, leg, 0, conn, len(aux), len(payload)) + aux + payload


class RecordReader:
    """Incremental: `feed(chunk)` returns the records completed by it."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> list[RawFrame | RawEvent]:
        buf = self._buf
        buf += chunk
        out: list[RawFrame | RawEvent] = []
        pos = 0
        size = len(buf)
        head = HEAD.size
        while size - pos >= head:
            kind, t, leg, direction, conn, aux_len, payload_len = HEAD.unpack_from(buf, pos)
            end = pos + head + aux_len + payload_len
            if end > size:
                break
            aux = bytes(buf[pos + head : pos + head + aux_len])
            payload = bytes(buf[pos + head + aux_len : end])
            label = f"{LABEL_PREFIX[leg]}{conn}"
            if kind in (FRAME, FRAME_CAUSED):
                cause = None
                if kind == FRAME_CAUSED:
                    (cause,) = CAUSE.unpack_from(aux)
                    aux = aux[CAUSE.size :]
                env = CupEnvelope(aux[:TPDU_LEN], aux[TPDU_LEN:]) if len(aux) == ENVELOPE_LEN else None
                out.append(RawFrame(t, LEGS[leg], DIRECTIONS[direction], label, payload, env, cause))
            else:
                out.append(RawEvent(t, LEGS[leg], label, EventKind(aux.decode("ascii")),
                                    payload.decode("utf-8", "replace")))
            pos = end
        del buf[:pos]
        return out
