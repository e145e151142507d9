"""`Codec`: bytes ⇄ `Message` for one dialect: pyiso8583's field walking plus our checks.

Two implementations of the same behaviour sit behind `Codec(dialect, *, lenient=False)`:

* `PureCodec` (this file): pyiso8583 does the field walking, this layer adds the checks below. It is
  the specification and the test oracle, and the fallback wherever the compiled one is missing.
* the compiled codec (`gateway/iso/_ccodec.c`, built by `pip install` where a C compiler is present):
  the same walk and checks in one pass of C, byte-identical to `PureCodec` on every input (same
  Message, same bytes, a CodecError with the same reason, field and offset; differential tests in
  tests/test_codec_differential.py prove it), about 30× faster than bare pyiso8583 (bench/codec.py).

`Codec` picks the compiled one at import unless `GATEWAY_CODEC=pure` (see gateway/iso/_compiled.py);
`codec_implementation()` says which is in use, `Codec(...).implementation` which one an instance got.

Options (both implementations honour them):

* `lenient=False` (the live path): `xn` amounts (ISO 8583 x+n, e.g. DE 28) must be 'C' or 'D'
  followed by digits. `lenient=True` accepts any character in the sign position, still followed by
  at least one digit and nothing else: for importing foreign traces (jPOS's own ISO 8583:1987 test
  image carries '0' there). Strict by default; only trace import should ask for lenient.

What the codec checks on top of pyiso8583; every failure is a `CodecError` that names the field and
byte offset but never carries field data:

* the MTI must be one the dialect accepts (checked on the raw bytes, before anything else);
* ASCII length prefixes must be digits (pyiso8583 uses int(), which accepts " 12" and "+12");
* the bitmap may only name fields the dialect defines, and bit 1 only where a secondary bitmap
  exists (CUP POS has none); hex-text bitmaps must be hex (`bytes.fromhex` would skip spaces);
* `n` values must be digits: BCD fields are hex-decoded by pyiso8583, so nibbles A-F get through it;
* `z` (track) values are digits plus the separator ('D' nibble in BCD, '=' in ASCII). Exception:
  when field 53 position 3 is '1' the track is TDK-encrypted (reference §4.4) and any hex is valid;
* `b` fields carried as hex text (ISO 8583:1987 52/64/96/128) must be hex; lower case is
  accepted and upper-cased, so the Message value is always uppercase hex;
* `xn` values are 'C'/'D' followed by digits (`lenient`: any sign character).

PureCodec's cost (the codec dominates the gateway's CPU, see reference limits.md): which fields need
which check depends only on which fields are present, so that is worked out once per distinct bitmap
(decode) or per distinct field-key sequence (encode) and cached as a `_Plan`; a message then costs a
dict lookup plus, per format, one `"".join(itemgetter(...)(doc)).encode().translate(None, ALPHABET)`
over all its fields of that format together.
Error diagnosis (which field, which offset) only runs once something is known to be wrong.
`bench/codec.py` measures both implementations against bare pyiso8583.

z values: the decoder returns the wire form ('D' separators in the BCD dialect); the encoder accepts
'=' there too and sends it as 'D', so `decode(encode(m))` may differ from `m` by exactly that.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from operator import itemgetter
from typing import Any, Final

from iso8583.decoder import DecodeError
from iso8583.decoder import decode as _iso_decode
from iso8583.encoder import EncodeError
from iso8583.encoder import encode as _iso_encode

from gateway.iso import _compiled
from gateway.iso.errors import CodecError
from gateway.iso.message import Message
from gateway.iso.spec import Dialect

_UPPER_HEX: Final = frozenset("0123456789ABCDEF")
_TRACK_SEPARATORS: Final = ("D", "=")
# Group checks: `"".join(values).encode().translate(None, ALPHABET)` is empty exactly when every
# character is in ALPHABET (non-ASCII characters encode to bytes >= 0x80, which are never deleted).
# It is several times faster than str.isdigit() or a set/regex test per field.
_DIGIT_BYTES: Final = b"0123456789"
_TRACK_BYTES: Final = b"0123456789D="
_HEX_BYTES: Final = b"0123456789ABCDEF"
#: cached plans per codec; a flood of distinct bitmaps (fuzzing, garbage) just restarts the cache
_MAX_PLANS: Final = 512
#: field 53 position 3 ("53.3") = '1': tracks 35/36 are TDK-encrypted
_SECURITY_FIELD: Final = "53"


def _digits(value: str) -> bool:
    return not value or (value.isascii() and value.isdigit())


def _track(value: str) -> bool:
    for sep in _TRACK_SEPARATORS:
        value = value.replace(sep, "")
    return not value or _digits(value)


def _signed_amount(value: str) -> bool:
    return len(value) > 1 and value[0] in "CD" and _digits(value[1:])


def _unsigned_amount(value: str) -> bool:
    """The lenient x+n check: any character where the sign goes, then digits."""
    return len(value) > 1 and _digits(value[1:])


_Getter = Callable[[Mapping[str, str]], Any]


def _getter(keys: tuple[str, ...]) -> _Getter | None:
    """An itemgetter returning a tuple of the values of `keys`, for `"".join()`.

    itemgetter of a single key returns the bare str, which join() would walk character by character
    (10x slower); asking for that key twice keeps the tuple shape, and the checks only care about
    which characters occur."""
    if not keys:
        return None
    return itemgetter(*keys) if len(keys) > 1 else itemgetter(keys[0], keys[0])


class _Plan:
    """The checks a message with one particular set of fields needs, as C-level callables."""

    __slots__ = ("ascii_lengths", "hex_keys", "hex_text", "numeric", "numeric_keys", "track_keys", "tracks", "xn")

    def __init__(self, codec: PureCodec, keys: Iterable[str]) -> None:
        present = sorted(keys, key=int)
        self.numeric_keys = tuple(k for k in present if k in codec._numeric)
        self.numeric = _getter(self.numeric_keys)
        self.track_keys = tuple(k for k in present if k in codec._tracks)
        self.tracks = _getter(self.track_keys)
        self.hex_keys = tuple(k for k in present if k in codec._hex_text)
        self.hex_text = _getter(self.hex_keys)
        self.xn = tuple(k for k in present if k in codec._xn)
        self.ascii_lengths = tuple(k for k in present if k in codec._ascii_lengths)


class PureCodec:
    """Decode and encode message bodies (MTI + bitmap + fields; no length prefix, TPDU or header)
    with pyiso8583 plus our checks. Use `Codec`; this class is its fallback and its oracle."""

    __slots__ = (
        "_ascii_lengths",
        "_bad_primary",
        "_bad_secondary",
        "_bitmap_binary",
        "_bitmap_len",
        "_bitmap_start",
        "_decode_plans",
        "_defined",
        "_encode_plans",
        "_hex_text",
        "_mti_len",
        "_mti_wire",
        "_mtis",
        "_numeric",
        "_signed",
        "_spec",
        "_tracks",
        "_tracks_bcd",
        "_xn",
        "dialect",
        "lenient",
    )

    def __init__(self, dialect: Dialect, *, lenient: bool = False) -> None:
        self.dialect = dialect
        self.lenient = lenient
        self._signed = _unsigned_amount if lenient else _signed_amount
        spec = dialect.spec
        self._spec = spec
        self._defined = frozenset(dialect.formats)
        self._numeric = dialect.fields_of_format("n")
        self._tracks = dialect.fields_of_format("z")
        self._tracks_bcd = frozenset(k for k in self._tracks if spec[k]["data_enc"] == "b")
        self._xn = dialect.fields_of_format("xn")
        self._hex_text = frozenset(k for k in dialect.binary_fields if spec[k]["data_enc"] != "b")
        self._mtis = dialect.mtis
        # pyiso8583 reads ASCII length prefixes with int(), which also takes " 12", "+12" and "1_2"
        self._ascii_lengths = frozenset(
            k for k in dialect.formats if spec[k]["len_type"] and spec[k]["len_enc"] == "ascii"
        )
        mti_binary = spec["t"]["data_enc"] == "b"
        self._mti_len = 2 if mti_binary else 4
        self._mti_wire = frozenset(
            bytes.fromhex(m) if mti_binary else m.encode(spec["t"]["data_enc"]) for m in dialect.mtis
        )
        self._bitmap_binary = spec["p"]["data_enc"] == "b"
        self._bitmap_start = self._mti_len
        self._bitmap_len = 8 if self._bitmap_binary else 16
        # the bit for field f in a 64-bit bitmap word is 1 << (64 - f)
        defined_nums = {int(k) for k in dialect.formats}
        bad_primary = sum(1 << (64 - f) for f in range(2, 65) if f not in defined_nums)
        if not dialect.secondary_bitmap:
            bad_primary |= 1 << 63
        self._bad_primary = bad_primary
        self._bad_secondary = sum(1 << (128 - f) for f in range(65, 129) if f not in defined_nums)
        #: raw bitmap bytes (primary, or primary + secondary) → plan; only valid bitmaps get here
        self._decode_plans: dict[bytes, _Plan] = {}
        #: tuple of field keys in Message order → plan; only keys the dialect defines get here
        self._encode_plans: dict[tuple[str, ...], _Plan] = {}

    # --- decode ------------------------------------------------------------------------------------

    def decode(self, body: bytes) -> Message:
        """A message body → Message. Raises CodecError for anything that is not a valid message."""
        if type(body) is not bytes:
            body = self._as_bytes(body)
        if body[: self._mti_len] not in self._mti_wire:
            raise self._bad_mti(body)
        start = self._bitmap_start
        plan = self._decode_plans.get(body[start : start + self._bitmap_len])
        if plan is None:
            # with a secondary bitmap (bit 1 set) the plan is keyed by both bitmaps together
            plan = self._decode_plans.get(body[start : start + 2 * self._bitmap_len]) or self._decode_plan(body)
        try:
            doc, enc = _iso_decode(body, self._spec)
        except DecodeError as exc:
            raise CodecError(exc.msg, field=exc.field, offset=exc.pos) from None
        except Exception:  # pyiso8583 should raise DecodeError only; never let anything else out
            raise CodecError("undecodable message") from None
        mti = doc.pop("t")
        del doc["p"]
        if plan.ascii_lengths and not b"".join([enc[k]["len"] for k in plan.ascii_lengths]).isdigit():
            bad = next(k for k in plan.ascii_lengths if not enc[k]["len"].isdigit())
            raise CodecError("length prefix is not decimal digits", field=bad, offset=_offset(enc, bad))
        if plan.numeric is not None and "".join(plan.numeric(doc)).encode().translate(None, _DIGIT_BYTES):
            bad = next(k for k in plan.numeric_keys if not _digits(doc[k]))
            raise CodecError(_NUMERIC_ERROR, field=bad, offset=_offset(enc, bad))
        if plan.tracks is not None and "".join(plan.tracks(doc)).encode().translate(None, _TRACK_BYTES):
            for k in plan.track_keys:
                if not _track(doc[k]) and not self._encrypted_track(doc, k):
                    raise CodecError(_TRACK_ERROR, field=k, offset=_offset(enc, k))
        if plan.hex_text is not None and "".join(plan.hex_text(doc)).encode().translate(None, _HEX_BYTES):
            for k in plan.hex_keys:
                value = doc[k].upper()
                if not _UPPER_HEX.issuperset(value):
                    raise CodecError(_HEX_ERROR, field=k, offset=_offset(enc, k))
                doc[k] = value
        if plan.xn:
            for k in plan.xn:
                if not self._signed(doc[k]):
                    raise CodecError(_XN_ERROR, field=k, offset=_offset(enc, k))
        if "1" in doc:
            del doc["1"]
        return Message(mti, doc)

    @staticmethod
    def _as_bytes(body: object) -> bytes:
        if isinstance(body, bytes | bytearray | memoryview):
            return bytes(body)
        raise CodecError(f"message body must be bytes, not {type(body).__name__}")

    def _bad_mti(self, body: bytes) -> CodecError:
        if len(body) < self._mti_len:
            return CodecError(f"message is {len(body)} bytes, too short for an MTI", field="t", offset=0)
        return CodecError("MTI is not a message type this dialect accepts", field="t", offset=0)

    def _decode_plan(self, body: bytes) -> _Plan:
        """Validate the bitmap(s) and build the plan for the fields they name (cache miss path)."""
        start, width = self._bitmap_start, self._bitmap_len
        word = self._bitmap_word(body, start, "p")
        if word & self._bad_primary:
            if word >> 63 and not self.dialect.secondary_bitmap:
                raise CodecError("bitmap sets bit 1 but this dialect has no secondary bitmap", field="p", offset=start)
            bad = _first_bit(word & self._bad_primary, 0)
            raise CodecError(f"bitmap names field {bad}, which the dialect does not define", field="p", offset=start)
        fields = _bits(word, 0)
        key = body[start : start + width]
        if word >> 63:
            second = self._bitmap_word(body, start + width, "1")
            if second & self._bad_secondary:
                bad = _first_bit(second & self._bad_secondary, 64)
                raise CodecError(
                    f"bitmap names field {bad}, which the dialect does not define",
                    field="1",
                    offset=start + width,
                )
            fields = [f for f in fields if f != 1] + _bits(second, 64)
            key = body[start : start + 2 * width]
        plan = _Plan(self, (str(f) for f in fields))
        if len(self._decode_plans) >= _MAX_PLANS:
            self._decode_plans.clear()
        self._decode_plans[key] = plan
        return plan

    def _bitmap_word(self, body: bytes, start: int, field: str) -> int:
        """One 64-bit bitmap word as an int."""
        raw = body[start : start + self._bitmap_len]
        if len(raw) < self._bitmap_len:
            raise CodecError(f"bitmap is {len(raw)} bytes, expecting {self._bitmap_len}", field=field, offset=start)
        if self._bitmap_binary:
            return int.from_bytes(raw, "big")
        # int(..., 16) would accept '_', a sign and surrounding whitespace; isalnum() rules those out
        if raw.isalnum():
            try:
                return int(raw, 16)
            except ValueError:
                pass
        raise CodecError("bitmap is not hexadecimal", field=field, offset=start)

    def _encrypted_track(self, doc: Mapping[str, str], key: str) -> bool:
        """TDK-encrypted tracks (53.3 = '1') carry ciphertext nibbles: any uppercase hex is fine."""
        security = doc.get(_SECURITY_FIELD, "")
        return len(security) >= 3 and security[2] == "1" and _UPPER_HEX.issuperset(doc[key])

    # --- encode ------------------------------------------------------------------------------------

    def encode(self, msg: Message) -> bytes:
        """Message → body bytes. Raises CodecError naming the field for any value that does not fit."""
        try:
            fields = msg.fields
            keys = tuple(fields)
            plan = self._encode_plans.get(keys)
            if plan is None:
                plan = self._encode_plan(keys)
            mti = msg.mti
            if mti not in self._mtis:
                raise CodecError("MTI is not a message type this dialect accepts", field="t")
            doc: dict[str, Any] = {"t": mti, **fields}
            if plan.numeric is not None and "".join(plan.numeric(doc)).encode().translate(None, _DIGIT_BYTES):
                bad = next(k for k in plan.numeric_keys if not _digits(doc[k]))
                raise CodecError(_NUMERIC_ERROR, field=bad)
            if plan.tracks is not None:
                joined = "".join(plan.tracks(doc))
                if (self._tracks_bcd and "=" in joined) or joined.encode().translate(None, _TRACK_BYTES):
                    self._encode_tracks(doc, plan.track_keys)
            if plan.hex_text is not None and "".join(plan.hex_text(doc)).encode().translate(None, _HEX_BYTES):
                for k in plan.hex_keys:
                    value = doc[k].upper()
                    if not _UPPER_HEX.issuperset(value):
                        raise CodecError(_HEX_ERROR, field=k)
                    doc[k] = value
            if plan.xn:
                for k in plan.xn:
                    if not self._signed(doc[k]):
                        raise CodecError(_XN_ERROR, field=k)
            raw, _enc = _iso_encode(doc, self._spec)
        except CodecError:
            raise
        except EncodeError as exc:
            raise CodecError(exc.msg, field=exc.field) from None
        except Exception:
            raise self._diagnose(msg) from None
        return bytes(raw)

    def _encode_plan(self, keys: tuple[str, ...]) -> _Plan:
        for key in keys:
            if key not in self._defined:
                name = key if isinstance(key, str) and len(key) <= 8 else type(key).__name__
                raise CodecError(f"field {name} is not defined in dialect {self.dialect.name}", field=str(name))
        plan = _Plan(self, keys)
        if len(self._encode_plans) >= _MAX_PLANS:
            self._encode_plans.clear()
        self._encode_plans[keys] = plan
        return plan

    def _encode_tracks(self, doc: dict[str, Any], tracks: tuple[str, ...]) -> None:
        for k in tracks:
            value = doc[k]
            if not _track(value) and not self._encrypted_track(doc, k):
                raise CodecError(_TRACK_ERROR, field=k)
            if "=" in value and k in self._tracks_bcd:
                doc[k] = value.replace("=", "D")  # BCD has no '=': the separator travels as nibble D

    def _diagnose(self, msg: object) -> CodecError:
        """Name the culprit after an unexpected failure (wrong types, mostly)."""
        fields = getattr(msg, "fields", None)
        if not isinstance(fields, dict):
            return CodecError("message fields must be a dict of strings")
        if not isinstance(getattr(msg, "mti", None), str):
            return CodecError("MTI must be a string", field="t")
        for key, value in fields.items():
            if not isinstance(value, str):
                return CodecError(f"value is {type(value).__name__}, not str", field=str(key)[:8])
            try:
                value.encode()
            except UnicodeEncodeError:
                return CodecError("value is not valid text", field=str(key)[:8])
        return CodecError("message cannot be encoded")


class Codec:
    """Decode and encode message bodies (MTI + bitmap + fields; no length prefix, TPDU or header).

    `decode(body) -> Message` and `encode(msg) -> bytes` raise `CodecError` for anything invalid.
    They are the chosen implementation's own methods (no extra call layer on the hot path).
    `implementation`: None follows the import-time selection ("compiled" where available);
    "pure" or "compiled" asks for one (tests, benchmarks); "compiled" raises if it cannot be had.
    """

    __slots__ = ("decode", "dialect", "encode", "implementation", "lenient")

    decode: Callable[[bytes], Message]
    encode: Callable[[Message], bytes]
    #: "compiled" or "pure": what this instance runs
    implementation: str

    def __init__(self, dialect: Dialect, *, lenient: bool = False, implementation: str | None = None) -> None:
        if implementation not in (None, "pure", "compiled"):
            raise ValueError(f"implementation must be 'pure' or 'compiled', not {implementation!r}")
        self.dialect = dialect
        self.lenient = lenient
        pure = PureCodec(dialect, lenient=lenient)
        chosen: PureCodec | Any = pure
        self.implementation = "pure"
        if implementation == "compiled" or (implementation is None and _compiled.COMPILED is not None):
            try:
                chosen = _compiled.build(pure)
                self.implementation = "compiled"
            except _compiled.UnsupportedDialect as exc:
                if implementation == "compiled":
                    raise RuntimeError(f"no compiled codec for dialect {dialect.name}: {exc}") from None
        self.decode = chosen.decode
        self.encode = chosen.encode

    def __repr__(self) -> str:
        return f"Codec({self.dialect.name!r}, {self.implementation}{', lenient' if self.lenient else ''})"


def codec_implementation() -> str:
    """Which codec implementation `Codec` uses, for `gateway --version` and the benchmarks."""
    if _compiled.COMPILED is not None:
        return "compiled (C extension gateway.iso._ccodec)"
    return f"pure-python (pyiso8583; {_compiled.WHY_NOT})"


_NUMERIC_ERROR: Final = "non-digit in numeric field"
_TRACK_ERROR: Final = "track data holds characters other than digits and separator"
_HEX_ERROR: Final = "binary field is not hexadecimal"
_XN_ERROR: Final = "amount must be C or D followed by digits"


def _bits(word: int, base: int) -> list[int]:
    """Field numbers whose bits are set in a 64-bit bitmap word (field base+1 is the MSB)."""
    return [base + 64 - i for i in range(64) if word >> i & 1]


def _first_bit(word: int, base: int) -> int:
    """The lowest-numbered field whose bit is set in a 64-bit bitmap word."""
    return base + 65 - word.bit_length()


def _offset(enc: Mapping[str, Mapping[str, bytes]], key: str) -> int:
    """Byte offset of field `key` in the body, from pyiso8583's per-field encoded parts (in wire order)."""
    offset = 0
    for name, part in enc.items():
        if name == key:
            return offset
        offset += len(part["len"]) + len(part["data"])
    return offset
