"""Shared pieces of the compiled-codec tests: run one input through the pure and the compiled codec and
insist on the same outcome, and hypothesis strategies for random (but valid) dialects and for
messages, good and bad, in any dialect.

"Same outcome" is strict: the same Message (MTI, field values and field order) or the same bytes, or
an exception of the same type with the same text; for CodecError also the same reason, field and
offset.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from gateway.iso.codec import Codec
from gateway.iso.errors import CodecError
from gateway.iso.message import Message
from gateway.iso.spec import Dialect, _build

_names = itertools.count()


def codec_pair(dialect: Dialect, *, lenient: bool = False) -> tuple[Codec, Codec]:
    return (
        Codec(dialect, lenient=lenient, implementation="pure"),
        Codec(dialect, lenient=lenient, implementation="compiled"),
    )


def outcome(fn: Any, arg: object) -> tuple[Any, ...]:
    try:
        result = fn(arg)
    except CodecError as exc:
        return ("CodecError", exc.reason, exc.field, exc.offset, str(exc))
    except Exception as exc:  # the pure codec lets a few exotic ones through; the compiled must match
        return (type(exc).__name__, str(exc))
    if isinstance(result, Message):
        return ("Message", result.mti, list(result.fields.items()))
    return ("bytes", result)


def same_decode(pure: Codec, compiled: Codec, body: object) -> tuple[Any, ...]:
    expected = outcome(pure.decode, body)
    got = outcome(compiled.decode, body)
    assert got == expected, f"decode of {body!r}:\n pure     {expected}\n compiled {got}"
    return expected


def same_encode(pure: Codec, compiled: Codec, msg: object) -> tuple[Any, ...]:
    before = _state(msg)
    expected = outcome(pure.encode, msg)
    got = outcome(compiled.encode, msg)
    assert got == expected, f"encode of {msg!r}:\n pure     {expected}\n compiled {got}"
    assert _state(msg) == before  # neither may touch the message
    return expected


def _state(msg: object) -> tuple[object, object]:
    return getattr(msg, "mti", None), copy.copy(getattr(msg, "fields", None))


def round_trip(pure: Codec, compiled: Codec, body: bytes) -> None:
    """Decode both ways; whatever decodes must re-encode identically too."""
    result = same_decode(pure, compiled, body)
    if result[0] == "Message":
        same_encode(pure, compiled, Message(result[1], dict(result[2])))


# --- random dialects ------------------------------------------------------------------------------

#: text encodings a dialect may name: the fast paths (ascii, latin-1) and generic CPython codecs,
#: single-byte (cp500 is EBCDIC), multi-byte (gbk, utf-8) and one that is not ASCII-compatible
TEXT_ENCODINGS = ("ascii", "ascii", "latin-1", "utf-8", "gbk", "cp500", "cp1252", "utf-16-le")
LEN_ENCODINGS = ("b", "bcd", "ascii", "ascii", "latin-1", "cp500")
#: the MTI may be EBCDIC (the compiled codec's dictionary path); bitmaps must be ASCII-compatible
MTI_ENCODINGS = ("b", "ascii", "cp500", "latin-1")
BITMAP_ENCODINGS = ("b", "ascii", "latin-1", "utf-8")
FORMATS = ("n", "z", "an", "ans", "b", "xn")


def _max_prefix(len_enc: str, len_type: int) -> int:
    if len_enc == "b":
        return 256**len_type - 1
    if len_enc == "bcd":
        return 10 ** (2 * len_type) - 1
    return 10**len_type - 1


@st.composite
def field_specs(draw: st.DrawFn) -> dict[str, Any]:
    """One data field's TOML properties, valid under gateway.iso.spec's rules."""
    fmt = draw(st.sampled_from(FORMATS))
    if fmt in ("n", "z"):
        data_enc = draw(st.sampled_from(("b", "b", "ascii", "latin-1", "cp500")))
    elif fmt == "b":
        data_enc = draw(st.sampled_from(("b", "b", "ascii", "utf-8")))
    else:
        data_enc = draw(st.sampled_from(("b", *TEXT_ENCODINGS)))
    len_type = draw(st.sampled_from((0, 0, 1, 2, 3, 4)))
    len_enc = draw(st.sampled_from(LEN_ENCODINGS))
    cap = _max_prefix(len_enc, len_type) if len_type else 99_999
    max_len = draw(st.integers(1, min(cap, 40)) | st.integers(1, min(cap, 999)))
    out: dict[str, Any] = {
        "fmt": fmt,
        "data_enc": data_enc,
        "len_enc": len_enc,
        "len_type": len_type,
        "max_len": max_len,
    }
    nibbles = data_enc == "b" and (fmt in ("n", "z") or draw(st.booleans()))
    if nibbles:
        out["len_count"] = "nibbles"
        if len_type or max_len % 2:
            out[draw(st.sampled_from(("left_pad", "right_pad")))] = draw(st.sampled_from("0F0D"))
        elif draw(st.booleans()):
            out[draw(st.sampled_from(("left_pad", "right_pad")))] = "0"
    return out


@st.composite
def dialects(draw: st.DrawFn) -> Dialect:
    """A random dialect, through the same validation as a TOML file."""
    mti_enc = draw(st.sampled_from(MTI_ENCODINGS))
    bitmap_enc = draw(st.sampled_from(BITMAP_ENCODINGS))
    secondary = draw(st.booleans())
    numbers = draw(
        st.lists(
            st.integers(2, 128 if secondary else 63).filter(lambda f: f not in (64, 65)),
            min_size=1,
            max_size=14,
            unique=True,
        )
    )
    fields: dict[str, Any] = {
        "h": {"data_enc": "ascii", "len_enc": "ascii", "len_type": 0, "max_len": 0},
        "t": {"data_enc": mti_enc, "len_enc": "ascii", "len_type": 0, "max_len": 2 if mti_enc == "b" else 4},
        "p": {"data_enc": bitmap_enc, "len_enc": "ascii", "len_type": 0, "max_len": 8 if bitmap_enc == "b" else 16},
    }
    if secondary:
        fields["1"] = dict(fields["p"])
    for number in numbers:
        fields[str(number)] = draw(field_specs())
    mac_binary = draw(st.booleans())
    fields["64"] = {
        "fmt": "b",
        "data_enc": "b" if mac_binary else "ascii",
        "len_enc": "ascii",
        "len_type": 0,
        "max_len": 8 if mac_binary else 16,
    }
    digits = st.lists(st.sampled_from("0123456789"), min_size=1, max_size=3, unique=True)
    raw = {
        "dialect": {
            "name": f"random-{next(_names)}",
            "default_framing": "len2",
            "mac_field": "64",
            "mac_wire_len": 8 if mac_binary else 16,
            "mti": {
                "versions": draw(digits),
                "classes": draw(digits),
                "functions": draw(digits),
                "origins": draw(digits),
            },
        },
        "fields": fields,
    }
    return _build(raw, "<random>", Path("<random>"), None)


# --- messages -------------------------------------------------------------------------------------

NASTY = "0123456789abcdefABCDEF=DC ~é中\udc80ﬀ\x00+-_"


def _units(field: dict[str, Any]) -> tuple[int, int]:
    """(min, max) value length in characters for a value that fits the field."""
    size = field["max_len"]
    if field["data_enc"] == "b" and field.get("len_count") != "nibbles":
        size *= 2  # bytes as hex characters
    if field["len_type"] == 0:
        return size, size
    return 0, min(size, 48)


@st.composite
def good_value(draw: st.DrawFn, dialect: Dialect, key: str) -> str:
    field = dialect.spec[key]
    fmt = dialect.formats[key]
    lo, hi = _units(field)
    n = draw(st.integers(lo, hi))
    binary = field["data_enc"] == "b"
    if fmt == "xn" and n >= 2:
        sign = draw(st.sampled_from("CD0" if not binary else "CD"))
        body = draw(st.text("0123456789", min_size=n - 1, max_size=n - 1))
        return sign + body
    if fmt == "n":
        alphabet = "0123456789"
    elif fmt == "z":
        alphabet = "0123456789D" if binary else "0123456789=D"
    elif binary or fmt == "b":
        alphabet = "0123456789ABCDEF" + ("abcdef" if draw(st.booleans()) else "")
    else:
        alphabet = "".join(chr(c) for c in range(0x20, 0x7F))
        if draw(st.booleans()):  # beyond ASCII, where the field's encoding has it
            alphabet += "".join(c for c in "éüß中文" if _encodable(c, field["data_enc"]))
    return draw(st.text(alphabet, min_size=n, max_size=n))


def _encodable(char: str, enc: str) -> bool:
    try:
        char.encode(enc)
    except UnicodeEncodeError:
        return False
    return True


@st.composite
def any_value(draw: st.DrawFn, dialect: Dialect, key: str) -> str:
    if draw(st.integers(0, 3)):
        return draw(good_value(dialect, key))
    lo, hi = _units(dialect.spec[key])
    return draw(st.text(NASTY, min_size=max(0, lo - 2), max_size=hi + 2))


@st.composite
def messages(draw: st.DrawFn, dialect: Dialect, *, nasty: bool = True) -> Message:
    keys = draw(st.lists(st.sampled_from(dialect.fields), min_size=0, max_size=12, unique=True))
    values = any_value if nasty else good_value
    fields = {k: draw(values(dialect, k)) for k in keys}
    if nasty and draw(st.integers(0, 9)) == 0:
        fields[draw(st.sampled_from(("1", "65", "t", "02", "999999999", "")))] = "0"
    mti = draw(st.sampled_from(sorted(dialect.mtis)))
    if nasty and draw(st.integers(0, 9)) == 0:
        mti = draw(st.sampled_from(("0999", "99", "02000", "", "٠٢٠٠")))
    return Message(mti, fields)


def structured_body(rng: Any, dialect: Dialect) -> bytes:
    """A valid MTI and a bitmap naming defined fields, then random bytes: gets past the header checks
    (like tests/test_codec_fuzz.py's `structured_random`, for any dialect)."""
    spec = dialect.spec
    mti = rng.choice(sorted(dialect.mtis))
    fields = rng.sample(dialect.fields, rng.randrange(1, min(8, len(dialect.fields)) + 1))
    primary = sum(1 << (64 - int(f)) for f in fields if int(f) <= 64)
    secondary = sum(1 << (128 - int(f)) for f in fields if int(f) > 64)
    if secondary:
        primary |= 1 << 63
    head = bytes.fromhex(mti) if spec["t"]["data_enc"] == "b" else mti.encode(spec["t"]["data_enc"])
    if spec["p"]["data_enc"] == "b":
        head += primary.to_bytes(8, "big") + (secondary.to_bytes(8, "big") if secondary else b"")
    else:
        text = f"{primary:016X}" + (f"{secondary:016X}" if secondary else "")
        head += (text.lower() if rng.random() < 0.2 else text).encode("ascii")
    alphabet = rng.choice((b"0123456789", b"0123456789ABCDEF=D ", bytes(range(256)), b"\x00\x01\x02\x09\x10\x99"))
    return head + bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 80)))


# --- a workload over every path (reference-leak checks) ----------------------------------------------


def _leak_bodies() -> list[object]:
    """Bodies for every decode path: good ones, errors of every stage, other buffer types, wrong types."""
    from test_codec_fuzz import BODIES  # imported late: that module builds codecs at import

    bodies: list[object] = []
    for name in ("cup-pos", "iso87-ascii"):
        for body in BODIES[name]:
            bodies += [body, body[:-1], body + b"x", body[:3], body[:13], bytearray(body), b"\x00" + body[1:]]
            bodies += [body[:20] + b"\xff\xfe" + body[22:], body.replace(b"0", b"a", 3)]
    bodies += ["text", None, memoryview(BODIES["cup-pos"][0])]
    return bodies


def _leak_messages() -> list[object]:
    """Messages for every encode path: hex upper-casing, track '=' → 'D', lenient amounts, errors,
    wrong types and lone surrogates (both handed to the pure codec)."""
    from test_codec_fuzz import SEEDS

    out: list[object] = [m for name in ("cup-pos", "iso87-ascii") for m in SEEDS[name]]
    out += [
        Message("0200", {"11": "000001", "52": "0123456789abcdef", "35": "6225881234567890=2912"}),
        Message("0200", {"11": "00000A"}),
        Message("0200", {"11": 1}),  # type: ignore[dict-item]
        Message("0200", {"1": "x"}),
        Message("9999", {"11": "000001"}),
        Message("0200", {"11": "\udc80" * 6}),
        Message("0200", {"28": "000000100", "11": "000001"}),
        Message("0200", {"2": "1" * 30}),
        "not a message",
    ]
    return out


def exercise(codecs: list[Codec], rounds: int) -> int:
    """Decode and encode the whole leak workload `rounds` times with each codec; returns the calls made."""
    bodies, msgs = _leak_bodies(), _leak_messages()
    for _ in range(rounds):
        for codec in codecs:
            for body in bodies:
                with contextlib.suppress(CodecError):
                    codec.decode(body)  # type: ignore[arg-type]
            for msg in msgs:
                with contextlib.suppress(CodecError):
                    codec.encode(msg)  # type: ignore[arg-type]
    return rounds * len(codecs) * (len(bodies) + len(msgs))
