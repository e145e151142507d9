"""The byte protocol between the recorder (inside the gateway) and its writer process: fixed headers,
no pickling. Each record: `HEAD` (type, time, leg, direction, connection number, aux length, payload
length), then aux (frame: the 11-byte CUP envelope or nothing; event: the event kind), then payload
(frame: the message body; event: the detail, UTF-8). Sans-I/O: `pack_*` make bytes, `RecordReader`
turns a stream of chunks back into records."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from gateway.iso.framing import ENVELOPE_LEN, TPDU_LEN, CupEnvelope
from gateway.trace.format import Direction, EventKind, Leg

HEAD: Final = struct.Struct(">BdBBIHI")
FRAME: Final = 1
EVENT: Final = 2
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


@dataclass(frozen=True, slots=True)
class RawEvent:
    t: float
    leg: Leg
    conn: str
    kind: EventKind
    detail: str


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
            if kind == FRAME:
                env = CupEnvelope(aux[:TPDU_LEN], aux[TPDU_LEN:]) if aux_len == ENVELOPE_LEN else None
                out.append(RawFrame(t, LEGS[leg], DIRECTIONS[direction], label, payload, env))
            else:
                out.append(RawEvent(t, LEGS[leg], label, EventKind(aux.decode("ascii")),
                                    payload.decode("utf-8", "replace")))
            pos = end
        del buf[:pos]
        return out
