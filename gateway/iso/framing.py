"""Message framing on a TCP byte stream, sans-I/O: bytes in → whole frames out, frames → bytes.

Kinds (`make_framer(kind)`):

* ``len2``   2-byte big-endian binary length, then the body (jPOS NACChannel without TPDU).
* ``ascii4`` 4 ASCII decimal digits of length, then the body (jPOS ASCIIChannel).
* ``cup``    CUP POS: 2-byte big-endian length, then 5-byte TPDU + 6-byte CUP header + body; the
             length counts TPDU + header + body (reference cup-pos-dialect.md §1.1-§1.3).

A `FrameDecoder` never assumes that one read is one frame: it buffers partial frames, returns every
complete frame in a chunk, and checks a length prefix (and the TPDU id) as soon as those bytes
arrive, so an absurd length fails at once instead of waiting for megabytes. Any `FramingError`
leaves the stream desynchronised (there is no way to find the next frame boundary), so the decoder
is poisoned: every later `feed` raises too, and the caller closes the connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Final

from gateway.iso.errors import FramingError

TPDU_LEN: Final = 5
HEADER_LEN: Final = 6
TPDU_ID: Final = 0x60
ENVELOPE_LEN: Final = TPDU_LEN + HEADER_LEN
FRAMINGS: Final = ("len2", "ascii4", "cup")


@dataclass(frozen=True, slots=True)
class CupEnvelope:
    """The CUP POS TPDU (id 0x60, destination and source addresses, BCD) and the 6-byte message
    header (application category, spec version, terminal status + processing requirement, software
    sub-version), kept as raw bytes."""

    tpdu: bytes
    header: bytes

    def __post_init__(self) -> None:
        if len(self.tpdu) != TPDU_LEN:
            raise FramingError(f"TPDU must be {TPDU_LEN} bytes, got {len(self.tpdu)}")
        if len(self.header) != HEADER_LEN:
            raise FramingError(f"CUP header must be {HEADER_LEN} bytes, got {len(self.header)}")

    @classmethod
    def from_hex(cls, tpdu: str, header: str) -> CupEnvelope:
        try:
            return cls(bytes.fromhex(tpdu), bytes.fromhex(header))
        except ValueError:
            raise FramingError("TPDU and header must be hex strings") from None

    @property
    def tpdu_id(self) -> int:
        return self.tpdu[0]

    @property
    def destination(self) -> str:
        """Destination address (NII), 4 BCD digits as a string, e.g. "0003"."""
        return self.tpdu[1:3].hex().upper()

    @property
    def source(self) -> str:
        return self.tpdu[3:5].hex().upper()

    @property
    def application(self) -> str:
        """Header byte 0, application category: 60 magstripe, 61 IC, 62/63 value-added."""
        return self.header[0:1].hex().upper()

    @property
    def version(self) -> str:
        """Header byte 1, the acquirer's spec version, e.g. "31"."""
        return self.header[1:2].hex().upper()

    @property
    def terminal_status(self) -> int:
        """High nibble of header byte 2: 0 normal, 1 test."""
        return self.header[2] >> 4

    @property
    def processing_requirement(self) -> int:
        """Low nibble of header byte 2 (处理要求), set by the host in responses: 0 none,
        1 download parameters, 3 sign in again, 4 update CAPKs, 5 IC parameters, ... (§1.3)."""
        return self.header[2] & 0x0F

    @property
    def software_version(self) -> str:
        """Header bytes 3-5, the terminal software sub-version (6 BCD digits)."""
        return self.header[3:6].hex().upper()

    def reply(self, processing_requirement: int | None = None) -> CupEnvelope:
        """The envelope for the answer: TPDU destination and source swapped, header copied, and the
        processing requirement nibble set when given (e.g. 3 = re-sign-in)."""
        tpdu = self.tpdu
        swapped = tpdu[0:1] + tpdu[3:5] + tpdu[1:3]
        header = self.header
        if processing_requirement is not None:
            if not 0 <= processing_requirement <= 0x0F:
                raise FramingError("processing requirement must be 0..15")
            header = header[:2] + bytes([(header[2] & 0xF0) | processing_requirement]) + header[3:]
        return CupEnvelope(swapped, header)

    def as_dict(self) -> dict[str, str | int]:
        """The envelope broken out, for JSON output."""
        return {
            "tpdu": self.tpdu.hex().upper(),
            "tpdu_id": f"{self.tpdu_id:02X}",
            "destination": self.destination,
            "source": self.source,
            "header": self.header.hex().upper(),
            "application": self.application,
            "version": self.version,
            "terminal_status": self.terminal_status,
            "processing_requirement": self.processing_requirement,
            "software_version": self.software_version,
        }


@dataclass(slots=True)
class Frame:
    body: bytes
    envelope: CupEnvelope | None = None


class FrameDecoder:
    """Incremental decoder for one connection. Subclasses define the prefix and what a frame holds."""

    __slots__ = ("_buf", "_error", "_max", "_offset")

    #: bytes before the counted part (the length prefix)
    prefix_len: ClassVar[int] = 2

    def __init__(self, max_frame: int) -> None:
        self._buf = bytearray()
        self._max = max_frame
        self._error: str | None = None
        self._offset = 0  # stream offset of the first buffered byte, for error messages

    @property
    def buffered(self) -> int:
        """Bytes held back waiting for the rest of a frame."""
        return len(self._buf)

    @property
    def failed(self) -> bool:
        return self._error is not None

    def feed(self, data: bytes) -> list[Frame]:
        """Every frame completed by `data`, in order. Raises FramingError on a bad prefix/envelope;
        when good frames came before the bad prefix in the same chunk they are returned first and
        `failed` is set (the next call raises)."""
        if self._error is not None:
            raise FramingError(f"stream is desynchronised after an earlier error ({self._error})")
        buf = self._buf
        if buf:
            buf += data
            view: bytes | bytearray = buf
        else:
            view = data if type(data) is bytes else bytes(data)  # memoryview slices lack isdigit()
        size = len(view)
        pos = 0
        frames: list[Frame] = []
        prefix = self.prefix_len
        try:
            while size - pos >= prefix:
                length = self._length(view, pos, size)
                end = pos + prefix + length
                if end > size:
                    break
                frames.append(self._frame(view, pos + prefix, end))
                pos = end
        except FramingError as exc:
            self._error = str(exc)
            self._buf = bytearray()
            if not frames:
                raise
            # whole frames before the bad prefix are real requests: hand them out (they must be
            # answered or reversed, not silently lost); `failed` tells the caller to close after them
            return frames
        if view is buf:
            del buf[:pos]
        elif pos < size:
            buf += memoryview(view)[pos:]
        self._offset += pos
        return frames

    def _fail(self, reason: str, pos: int) -> FramingError:
        return FramingError(f"{reason} (stream offset {self._offset + pos})")

    def _check_length(self, length: int, pos: int) -> int:
        if length == 0:
            raise self._fail("zero-length frame", pos)
        if length > self._max:
            raise self._fail(f"frame length {length} exceeds the maximum {self._max}", pos)
        return length

    def _length(self, view: bytes | bytearray, pos: int, size: int) -> int:
        """The counted length at `pos` (validated); `size` tells how much of the frame is here."""
        raise NotImplementedError

    def _frame(self, view: bytes | bytearray, start: int, end: int) -> Frame:
        return Frame(bytes(view[start:end]))


class _Len2Decoder(FrameDecoder):
    __slots__ = ()

    def _length(self, view: bytes | bytearray, pos: int, size: int) -> int:
        return self._check_length((view[pos] << 8) | view[pos + 1], pos)


class _Ascii4Decoder(FrameDecoder):
    __slots__ = ()
    prefix_len = 4

    def _length(self, view: bytes | bytearray, pos: int, size: int) -> int:
        digits = view[pos : pos + 4]
        if not digits.isdigit():  # bytes.isdigit: ASCII 0-9 only
            raise self._fail("length prefix is not 4 ASCII digits", pos)
        return self._check_length(int(digits), pos)


class _CupDecoder(FrameDecoder):
    __slots__ = ()

    def _length(self, view: bytes | bytearray, pos: int, size: int) -> int:
        length = self._check_length((view[pos] << 8) | view[pos + 1], pos)
        if length <= ENVELOPE_LEN:
            raise self._fail(f"frame length {length} leaves no message after the TPDU and header", pos)
        if size - pos > 2 and view[pos + 2] != TPDU_ID:
            raise self._fail(f"TPDU id is 0x{view[pos + 2]:02X}, expecting 0x60", pos + 2)
        return length

    def _frame(self, view: bytes | bytearray, start: int, end: int) -> Frame:
        envelope = CupEnvelope(
            bytes(view[start : start + TPDU_LEN]), bytes(view[start + TPDU_LEN : start + ENVELOPE_LEN])
        )
        return Frame(bytes(view[start + ENVELOPE_LEN : end]), envelope)


class Framer:
    """One framing kind with its limit: makes per-connection decoders and frames outgoing bodies."""

    kind: ClassVar[str]
    _decoder_class: ClassVar[type[FrameDecoder]]

    def __init__(self, max_frame: int = 8192) -> None:
        if not 1 <= max_frame <= self.limit:
            raise ValueError(f"max_frame must be 1..{self.limit} for {self.kind} framing")
        self.max_frame = max_frame

    #: the largest length the prefix can express
    limit: ClassVar[int] = 0xFFFF

    def decoder(self) -> FrameDecoder:
        return self._decoder_class(self.max_frame)

    def encode(self, body: bytes, envelope: CupEnvelope | None = None) -> bytes:
        if envelope is not None:
            raise FramingError(f"{self.kind} framing carries no TPDU/header envelope")
        return self._prefix(self._checked_length(len(body))) + body

    def _checked_length(self, length: int) -> int:
        if length == 0:
            raise FramingError("cannot frame an empty message")
        if length > self.max_frame:
            raise FramingError(f"frame length {length} exceeds the maximum {self.max_frame}")
        return length

    def _prefix(self, length: int) -> bytes:
        return length.to_bytes(2, "big")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_frame={self.max_frame})"


class Len2Framer(Framer):
    kind = "len2"
    _decoder_class = _Len2Decoder


class Ascii4Framer(Framer):
    kind = "ascii4"
    limit = 9999
    _decoder_class = _Ascii4Decoder

    def _prefix(self, length: int) -> bytes:
        return b"%04d" % length


class CupFramer(Framer):
    """CUP POS framing. `envelope` is the default TPDU/header for outgoing frames that do not carry
    their own (a gateway talking to a CUP host); answers to terminals pass `frame.envelope.reply()`."""

    kind = "cup"
    _decoder_class = _CupDecoder

    def __init__(self, max_frame: int = 8192, envelope: CupEnvelope | None = None) -> None:
        super().__init__(max_frame)
        self.envelope = envelope

    def encode(self, body: bytes, envelope: CupEnvelope | None = None) -> bytes:
        env = envelope or self.envelope
        if env is None:
            raise FramingError("cup framing needs a TPDU and header (no envelope given)")
        if not body:
            raise FramingError("cannot frame an empty message")
        length = self._checked_length(ENVELOPE_LEN + len(body))
        return length.to_bytes(2, "big") + env.tpdu + env.header + body


_FRAMERS: Final[dict[str, type[Framer]]] = {"len2": Len2Framer, "ascii4": Ascii4Framer, "cup": CupFramer}


def make_framer(kind: str, max_frame: int = 8192, *, envelope: CupEnvelope | None = None) -> Framer:
    """A framer by name: "len2", "ascii4" or "cup" (`envelope`: cup's default outgoing TPDU/header)."""
    cls = _FRAMERS.get(kind)
    if cls is None:
        raise ValueError(f"unknown framing {kind!r} (choose from {', '.join(FRAMINGS)})")
    if cls is CupFramer:
        return CupFramer(max_frame, envelope)
    if envelope is not None:
        raise ValueError(f"{kind} framing takes no envelope")
    return cls(max_frame)
