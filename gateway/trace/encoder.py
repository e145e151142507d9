"""Raw frames → trace records, with surrogates (sans-I/O). The recorder's writer process, the proxy
and the importers all build their records here, so every trace is masked the same way.

`wire` is re-encoded from the surrogate fields with our own codec and framer: the clear bytes never
reach a record. A frame with nothing secret in it (or only its MAC, the fixed-size last field) keeps its
own bytes (the MAC's replaced by the placeholder's): the same bytes re-encoding gives, for half the
cost, and `trace check` then tests our codec against the bytes really sent. A frame that does not
decode becomes an `undecodable` event without its bytes (they may hold a PAN), and so does one whose
surrogate would not encode (a bug guard: never the clear form).
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.iso.codec import Codec
from gateway.iso.errors import IsoError
from gateway.iso.framing import CupEnvelope
from gateway.iso.message import Message
from gateway.iso.spec import Dialect, load_dialect
from gateway.trace.codecs import make_codec, make_trace_framer
from gateway.trace.format import (
    Direction,
    EventKind,
    EventRecord,
    FrameRecord,
    Leg,
    Record,
    SecretKind,
    TraceHeader,
)
from gateway.trace.surrogate import Surrogates, mask_message


class TraceEncoder:
    """Numbers the records of one trace and masks its frames. One per trace (one surrogate key)."""

    def __init__(self, dialects: Mapping[str, str], framings: Mapping[str, str], *, lenient: bool,
                 surrogates: Surrogates | None = None) -> None:
        self.dialects = dict(dialects)
        self.framings = dict(framings)
        self.surrogates = surrogates if surrogates is not None else Surrogates()
        self._dialect: dict[str, Dialect] = {leg: load_dialect(name) for leg, name in self.dialects.items()}
        self._codec = {leg: make_codec(d, lenient=lenient) for leg, d in self._dialect.items()}
        self._framer = {leg: make_trace_framer(kind) for leg, kind in self.framings.items()}
        self.seq = 0

    def codec(self, leg: Leg) -> Codec:
        return self._codec[leg]

    def header(self, source: str, created: str, **notes: object) -> TraceHeader:
        return TraceHeader(source=source, dialects=dict(self.dialects), framings=dict(self.framings),
                           created=created, notes=dict(notes))

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def frame(self, t: float, leg: Leg, direction: Direction, conn: str, body: bytes,
              envelope: CupEnvelope | None = None, cause: int | None = None) -> Record:
        """`cause`: the seq of the record of the frame that made the SUT send this one (or None)."""
        codec = self._codec[leg]
        try:
            msg = codec.decode(body)
        except IsoError as exc:
            return EventRecord(self._next(), t, leg, conn, EventKind.UNDECODABLE, f"{direction.value}: {exc}")
        fields, kinds = mask_message(self._dialect[leg], msg, self.surrogates)
        framer = self._framer[leg]
        dialect = self._dialect[leg]
        if not kinds or (len(kinds) == 1 and dialect.mac_field_for(fields) in kinds):
            # nothing secret, or only the MAC (the last field, fixed size): the frame as it was, with the
            # MAC's bytes replaced by the placeholder's — what re-encoding would give, for half the cost
            if kinds:
                mac = next(iter(kinds))
                spec = dialect.spec[mac]
                placeholder = (bytes.fromhex(fields[mac]) if spec["data_enc"] == "b"
                               else fields[mac].encode(spec["data_enc"]))
                body = body[: len(body) - len(placeholder)] + placeholder
            try:
                wire = framer.encode(body, envelope)
            except IsoError as exc:
                return EventRecord(self._next(), t, leg, conn, EventKind.UNDECODABLE,
                                   f"{direction.value}: {msg.mti} cannot be framed ({exc})")
            return self._record(t, leg, direction, conn, msg.mti, fields, wire, envelope, kinds, (), cause)
        return self.message(t, leg, direction, conn, msg, envelope, fields=fields, kinds=kinds, cause=cause)

    def message(self, t: float, leg: Leg, direction: Direction, conn: str, msg: Message,
                envelope: CupEnvelope | None = None, masked: tuple[str, ...] = (), *,
                fields: dict[str, str] | None = None, kinds: dict[str, SecretKind] | None = None,
                cause: int | None = None) -> Record:
        """A decoded message (imports that carry fields, not bytes, start here): re-encoded from its
        surrogate fields."""
        if fields is None or kinds is None:
            fields, kinds = mask_message(self._dialect[leg], msg, self.surrogates)
        try:
            body = self._codec[leg].encode(Message(msg.mti, dict(fields)))
            wire = self._framer[leg].encode(body, envelope)
        except IsoError as exc:
            return EventRecord(self._next(), t, leg, conn, EventKind.UNDECODABLE,
                               f"{direction.value}: {msg.mti} cannot be encoded ({exc})")
        return self._record(t, leg, direction, conn, msg.mti, fields, wire, envelope, kinds, masked, cause)

    def _record(self, t: float, leg: Leg, direction: Direction, conn: str, mti: str, fields: dict[str, str],
                wire: bytes, envelope: CupEnvelope | None, kinds: dict[str, SecretKind],
                masked: tuple[str, ...], cause: int | None = None) -> FrameRecord:
        env = None if envelope is None else {"tpdu": envelope.tpdu.hex().upper(),
                                             "header": envelope.header.hex().upper()}
        return FrameRecord(self._next(), t, leg, direction, conn, mti, fields, wire.hex().upper(), env, kinds, masked,
                           cause)

    def event(self, t: float, leg: Leg, conn: str, kind: EventKind, detail: str = "") -> EventRecord:
        return EventRecord(self._next(), t, leg, conn, kind, detail)
