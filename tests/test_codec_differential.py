"""The compiled codec is the pure codec: same Message, same bytes, same CodecError (reason, field and
offset) on every input, good or bad.

Inputs: both shipped dialects, strict and lenient; random dialects built through the TOML validation
(every field property a dialect can declare: data_enc b / ascii / latin-1 / utf-8 / gbk / cp500 / ...,
len_enc b / bcd / text, len_type 0-4, nibbles with left or right pads, secondary bitmaps, hex-text
and EBCDIC MTIs); generated messages, good and nasty; the fuzz corpora and generators of
tests/test_codec_fuzz.py (mutations of valid bodies, random and structured-random bodies).
Sized for CI (about 20 s); `GATEWAY_HEAVY=1` runs ten times as many.
"""

from __future__ import annotations

import itertools
import os
import random
from pathlib import Path

import iso8583
import pytest
from codec_support import codec_pair, dialects, messages, round_trip, same_decode, same_encode, structured_body
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_codec_fuzz import BODIES, LENGTH_OFFSETS, SEEDS, mutate, structured_random

from gateway.iso import _compiled
from gateway.iso.codec import Codec
from gateway.iso.message import Message
from gateway.iso.spec import _build, load_dialect

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_compiled.COMPILED is None, reason=f"no compiled codec to compare: {_compiled.WHY_NOT}"),
]

HEAVY = 10 if os.environ.get("GATEWAY_HEAVY") == "1" else 1
DIALECTS = ["cup-pos", "iso87-ascii"]
PAIRS = {
    (name, lenient): codec_pair(load_dialect(name), lenient=lenient)
    for name in DIALECTS
    for lenient in (False, True)
    if _compiled.COMPILED is not None
}
SETTINGS = settings(
    max_examples=400 * HEAVY, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
CORPUS_CASES = 4_000 * HEAVY


def test_both_implementations_are_present() -> None:
    """Every other test here compares the two; make sure it is not comparing pure with pure."""
    for pure, compiled in PAIRS.values():
        assert pure.implementation == "pure"
        assert compiled.implementation == "compiled"


# --- the shipped dialects -------------------------------------------------------------------------


@pytest.mark.parametrize("name", DIALECTS)
@pytest.mark.parametrize("lenient", [False, True])
def test_seed_messages(name: str, lenient: bool) -> None:
    pure, compiled = PAIRS[name, lenient]
    for msg in SEEDS[name]:
        assert same_encode(pure, compiled, msg)[0] == "bytes"
        round_trip(pure, compiled, pure.encode(msg))


@SETTINGS
@given(data=st.data(), name=st.sampled_from(DIALECTS), lenient=st.booleans())
def test_generated_messages(data: st.DataObject, name: str, lenient: bool) -> None:
    pure, compiled = PAIRS[name, lenient]
    msg = data.draw(messages(pure.dialect))
    result = same_encode(pure, compiled, msg)
    if result[0] == "bytes":
        round_trip(pure, compiled, result[1])


@SETTINGS
@given(name=st.sampled_from(DIALECTS), body=st.binary(max_size=400))
def test_arbitrary_bytes(name: str, body: bytes) -> None:
    pure, compiled = PAIRS[name, False]
    same_decode(pure, compiled, body)


@SETTINGS
@given(
    name=st.sampled_from(DIALECTS),
    index=st.integers(0, 2),
    edits=st.lists(st.tuples(st.integers(0, 600), st.binary(max_size=4), st.integers(0, 4)), min_size=1, max_size=4),
)
def test_spliced_seed_bodies(name: str, index: int, edits: list[tuple[int, bytes, int]]) -> None:
    data = bytearray(BODIES[name][index])
    for at, insert, remove in edits:
        at %= len(data) + 1
        data[at : at + remove] = insert
    round_trip(*PAIRS[name, False], bytes(data))


@pytest.mark.parametrize("name", DIALECTS)
def test_fuzz_corpus_mutations(name: str) -> None:
    """tests/test_codec_fuzz.py's mutation generator, same seeds."""
    pure, compiled = PAIRS[name, False]
    rng = random.Random(f"mutate-{name}")
    decoded = 0
    for _ in range(CORPUS_CASES):
        index = rng.randrange(len(BODIES[name]))
        body = mutate(rng, BODIES[name][index], LENGTH_OFFSETS[name][index])
        round_trip(pure, compiled, body)
        decoded += _decodes(pure, body)
    assert 0 < decoded < CORPUS_CASES  # both the error paths and the success path were exercised


@pytest.mark.parametrize("name", DIALECTS)
def test_fuzz_corpus_random_bodies(name: str) -> None:
    pure, compiled = PAIRS[name, False]
    rng = random.Random(f"random-{name}")
    for _ in range(CORPUS_CASES // 2):
        same_decode(pure, compiled, rng.randbytes(rng.randrange(0, 120)))
        round_trip(pure, compiled, structured_random(rng, pure.dialect))


def _decodes(codec: Codec, body: bytes) -> bool:
    try:
        codec.decode(body)
    except Exception:
        return False
    return True


# --- random dialects ------------------------------------------------------------------------------


@settings(
    max_examples=150 * HEAVY,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
@given(data=st.data(), dialect=dialects(), lenient=st.booleans())
def test_random_dialects(data: st.DataObject, dialect, lenient: bool) -> None:
    pure, compiled = codec_pair(dialect, lenient=lenient)
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    good_bodies = []
    for msg in data.draw(st.lists(messages(dialect, nasty=False), min_size=1, max_size=6)):
        result = same_encode(pure, compiled, msg)
        if result[0] == "bytes":
            good_bodies.append(result[1])
            round_trip(pure, compiled, result[1])
    for msg in data.draw(st.lists(messages(dialect), min_size=1, max_size=6)):
        same_encode(pure, compiled, msg)
    for body in good_bodies:  # the field walk's error paths, on bodies close to valid ones
        for _ in range(8):
            round_trip(pure, compiled, mutate(rng, body, []))
    for _ in range(4):
        round_trip(pure, compiled, structured_body(rng, dialect))


# --- inputs of the wrong type, and other corners ---------------------------------------------------


class FakeMessage:
    def __init__(self, mti: object, fields: object) -> None:
        self.mti = mti
        self.fields = fields


@pytest.mark.parametrize("name", DIALECTS)
def test_wrong_types(name: str) -> None:
    pure, compiled = PAIRS[name, False]
    body = BODIES[name][0]
    for arg in (bytearray(body), memoryview(body), "text", None, 12, [1, 2], type("B", (bytes,), {})(body)):
        same_decode(pure, compiled, arg)
    good = dict(SEEDS[name][0].fields)
    for msg in (
        Message("0800", {**good, "11": 123}),  # type: ignore[dict-item]
        Message("0800", {**good, 11: "000001"}),  # type: ignore[dict-item]
        Message(800, good),  # type: ignore[arg-type]
        Message(["0800"], good),  # type: ignore[arg-type]
        Message("0800", {**good, "52": b"0123456789ABCDEF"}),  # type: ignore[dict-item]
        Message("0800", {**good, "41": "\udc80" * 8}),
        Message("0800", {**good, "11": "\udc80" * 6}),
        Message("0800", list(good.items())),  # type: ignore[arg-type]
        FakeMessage("0800", good),
        object.__new__(Message),  # slots never set
        FakeMessage("0800", "not a dict"),
        "not a message",
        None,
    ):
        same_encode(pure, compiled, msg)


def test_lenient_is_honoured_by_both() -> None:
    """jPOS's ISO 8583:1987 test image carries '0' in DE 28's sign position."""
    for lenient in (False, True):
        pure, compiled = PAIRS["iso87-ascii", lenient]
        msg = Message("0200", {"11": "000001", "28": "000000100"})
        expected = same_encode(pure, compiled, msg)
        assert (expected[0] == "bytes") is lenient
        body = PAIRS["iso87-ascii", True][0].encode(msg)
        expected = same_decode(pure, compiled, body)
        assert (expected[0] == "Message") is lenient
        # still digits after the sign, and still at least two characters, either way
        assert body.endswith(b"000000100")  # field 28 is the last field
        assert same_decode(pure, compiled, body[:-9] + b"0000001X0")[0] == "CodecError"


def _prefix_offset(codec: Codec, body: bytes, key: str) -> int:
    """Where field `key`'s length prefix starts in a valid body (from pyiso8583's encoded parts)."""
    _doc, parts = iso8583.decode(body, codec.dialect.spec)
    offset = 0
    for name, part in parts.items():
        if name == key:
            return offset
        offset += len(part["len"]) + len(part["data"])
    raise AssertionError(f"field {key} not in the body")


@pytest.mark.parametrize(
    ("name", "fields", "key"),
    [
        ("iso87-ascii", {"2": "6225880000000001", "11": "000001"}, "2"),  # LL, first field
        ("iso87-ascii", {"11": "000001", "48": "x" * 120, "64": "A" * 16}, "48"),  # LLL, data after it
        ("iso87-ascii", {"11": "000001", "48": "x" * 5}, "48"),  # LLL, last field
    ],
)
def test_text_length_prefix_corners(name: str, fields: dict[str, str], key: str) -> None:
    """pyiso8583 reads text prefixes with int(): ' 12', '+12', '1_2', '-1', '-99' all parse (a negative
    length even slices from the end of the body); our check rejects what is not plain digits, but only
    after the walk, so which error wins depends on the rest of the body. Every combination of a few
    characters, at every prefix width."""
    pure, compiled = PAIRS[name, False]
    body = pure.encode(Message("0200", fields))
    at = _prefix_offset(pure, body, key)
    width = pure.dialect.spec[key]["len_type"]
    for chars in itertools.product(" +-_0159\t", repeat=width):
        prefix = "".join(chars).encode()
        same_decode(pure, compiled, body[:at] + prefix + body[at + width :])
    for prefix in ("١٢".encode()[:width], b"\xff" * width, b"-" + b"9" * (width - 1)):
        same_decode(pure, compiled, body[:at] + prefix.ljust(width, b"0") + body[at + width :])


def test_binary_and_bcd_length_prefix_corners() -> None:
    pure, compiled = PAIRS["cup-pos", False]
    body = pure.encode(SEEDS["cup-pos"][1])
    for key in ("2", "35", "55", "60", "63"):
        at = _prefix_offset(pure, body, key)
        width = pure.dialect.spec[key]["len_type"]
        for value in range(256):
            prefix = bytes([value]) * width
            same_decode(pure, compiled, body[:at] + prefix + body[at + width :])
            same_decode(pure, compiled, body[:at] + bytes([value]) + body[at + 1 :])


def _encoded(text: str, enc: str) -> bytes:
    try:
        return text.encode(enc, "replace")
    except LookupError:  # a codec that is not a text encoding (rot13)
        return text.encode("ascii", "replace")


def _prefix_dialect(len_enc: str, len_type: int):
    raw = {
        "dialect": {
            "name": f"prefix-{len_enc}",
            "default_framing": "len2",
            "mac_field": "64",
            "mac_wire_len": 8,
            "mti": {"versions": ["0"], "classes": ["2"], "functions": ["0"], "origins": ["0"]},
        },
        "fields": {
            "h": {"data_enc": "ascii", "len_enc": "ascii", "len_type": 0, "max_len": 0},
            "t": {"data_enc": "ascii", "len_enc": "ascii", "len_type": 0, "max_len": 4},
            "p": {"data_enc": "b", "len_enc": "b", "len_type": 0, "max_len": 8},
            "2": {"fmt": "ans", "data_enc": "ascii", "len_enc": len_enc, "len_type": len_type, "max_len": 99},
            "3": {"fmt": "n", "data_enc": "ascii", "len_enc": "ascii", "len_type": 0, "max_len": 2},
            "64": {"fmt": "b", "data_enc": "b", "len_enc": "b", "len_type": 0, "max_len": 8},
        },
    }
    return _build(raw, "<prefix>", Path("<prefix>"), None)


@pytest.mark.parametrize(
    ("len_enc", "len_type"),
    [("utf-8", 4), ("cp500", 2), ("latin-1", 3), ("utf-16-le", 4), ("utf-16", 4), ("rot13", 2), ("punycode", 3)],
)
def test_generic_codec_length_prefixes(len_enc: str, len_type: int) -> None:
    """Length prefixes in other codecs go through bytes.decode() + int() in both codecs: Unicode
    digits ('١٢' is 12 to int()), EBCDIC digits, undecodable bytes."""
    dialect = _prefix_dialect(len_enc, len_type)
    pure, compiled = codec_pair(dialect)
    same_encode(pure, compiled, Message("0200", {"2": "hello", "3": "12"}))  # utf-16: "0005" is too wide
    at = 4 + 8
    body = b"0200" + (0x6000000000000000).to_bytes(8, "big") + b"\x00" * len_type + b"hello12"
    rng = random.Random(f"prefix-{len_enc}")
    candidates = [_encoded(text, len_enc) for text in ("١٢", "٠٥", "05", " 5", "-1", "+5", "5_", "１２")]
    candidates += [rng.randbytes(len_type) for _ in range(300)]
    candidates += [bytes([0xF0 + rng.randrange(10) for _ in range(len_type)]) for _ in range(50)]
    for prefix in candidates:
        prefix = prefix[:len_type].ljust(len_type, b"\x00")
        same_decode(pure, compiled, body[:at] + prefix + body[at + len_type :])


@pytest.mark.parametrize("name", DIALECTS)
def test_tdk_encrypted_tracks(name: str) -> None:
    """53.3 = '1' lets tracks carry any upper-case hex (ciphertext); lower case or other letters never."""
    pure, compiled = PAIRS[name, False]
    rng = random.Random(f"tdk-{name}")
    binary = pure.dialect.spec["35"]["data_enc"] == "b"
    for _ in range(400):
        security = rng.choice(("2610000000000000", "2600000000000000", "0010000000000000"))
        alphabet = rng.choice(("0123456789ABCDEF", "0123456789abcdef", "0123456789D=", "0123456789ABCDEFGZ="))
        fields = {"11": "000001", "53": security}
        for key in rng.sample(("35", "36"), rng.randrange(1, 3)):
            size = rng.randrange(1, 38 if key == "35" else 60)
            fields[key] = "".join(rng.choice(alphabet) for _ in range(size))
        msg = Message("0200", fields)
        result = same_encode(pure, compiled, msg)
        if result[0] == "bytes":
            round_trip(pure, compiled, result[1])
        if binary:  # BCD tracks decode to hex: nibbles A-F reach the check straight from the wire
            body = pure.encode(Message("0200", {**fields, "35": "1" * 20, "36": "1" * 20}))
            at = _prefix_offset(pure, body, "35") + 1
            corrupted = body[:at] + rng.randbytes(10) + body[at + 10 :]
            same_decode(pure, compiled, corrupted)


def test_hex_bitmap_corners() -> None:
    """The pure codec reads hex-text bitmaps with int(raw, 16), which takes a '0x' prefix; pyiso8583's
    bytes.fromhex() then refuses it. Lower case, signs, spaces and underscores never pass."""
    pure, compiled = PAIRS["iso87-ascii", False]
    body = pure.encode(SEEDS["iso87-ascii"][2])  # primary and secondary bitmaps
    primary, secondary = body[4:20], body[20:36]
    variants = [b"0x" + primary[2:], b"0X" + primary[2:], b"0x" + b"F" * 14, b"0x" + b"0" * 14, primary.lower()]
    variants += [b"+" + primary[1:], b" " + primary[1:], primary[:15] + b"_", b"0x" + primary[2:15] + b"g"]
    for variant in variants:
        same_decode(pure, compiled, body[:4] + variant + body[20:])
        same_decode(pure, compiled, body[:20] + variant.replace(primary, secondary) + body[36:])
        same_decode(pure, compiled, body[:20] + b"0x" + secondary[2:] + body[36:])


def _text_dialect(data_enc: str):
    raw = {
        "dialect": {
            "name": f"text-{data_enc}",
            "default_framing": "len2",
            "mac_field": "64",
            "mac_wire_len": 8,
            "mti": {"versions": ["0"], "classes": ["2"], "functions": ["0"], "origins": ["0"]},
        },
        "fields": {
            "h": {"data_enc": "ascii", "len_enc": "ascii", "len_type": 0, "max_len": 0},
            "t": {"data_enc": "ascii", "len_enc": "ascii", "len_type": 0, "max_len": 4},
            "p": {"data_enc": "b", "len_enc": "b", "len_type": 0, "max_len": 8},
            "2": {"fmt": "ans", "data_enc": data_enc, "len_enc": "ascii", "len_type": 2, "max_len": 40},
            "3": {"fmt": "ans", "data_enc": data_enc, "len_enc": "ascii", "len_type": 0, "max_len": 4},
            "4": {"fmt": "n", "data_enc": data_enc, "len_enc": "ascii", "len_type": 2, "max_len": 12},
            "5": {"fmt": "z", "data_enc": data_enc, "len_enc": "ascii", "len_type": 2, "max_len": 12},
            "6": {"fmt": "b", "data_enc": data_enc, "len_enc": "ascii", "len_type": 2, "max_len": 12},
            "7": {"fmt": "xn", "data_enc": data_enc, "len_enc": "ascii", "len_type": 2, "max_len": 12},
            "8": {"fmt": "b", "data_enc": "b", "len_enc": "bcd", "len_type": 0, "max_len": 4, "len_count": "nibbles"},
            "64": {"fmt": "b", "data_enc": "b", "len_enc": "b", "len_type": 0, "max_len": 8},
        },
    }
    return _build(raw, "<text>", Path("<text>"), None)


#: the fast paths (ascii, latin-1), CPython codecs of every kind, and codecs a spec may name that str.encode
#: and bytes.decode refuse (rot13: "not a text encoding", a LookupError) or that yield lone surrogates
#: (unicode_escape), where the pure codec's own checks raise and the compiled one hands over to it
TEXT_CODECS = [
    "ascii", "latin-1", "iso8859-1", "cp1252", "gbk", "utf-8", "cp500", "utf-16-le", "utf-16", "utf-7",
    "punycode", "rot13", "unicode_escape", "raw_unicode_escape",
]  # fmt: skip


@pytest.mark.parametrize("data_enc", TEXT_CODECS)
def test_text_encodings(data_enc: str) -> None:
    """ascii and latin-1 take the compiled codec's fast paths, the others CPython's codecs; every one
    must accept and refuse exactly what str.encode / bytes.decode do."""
    pure, compiled = codec_pair(_text_dialect(data_enc))
    texts = ["hello", "héllo", "ßüÿ", "中文", "\x80\x9f", "€uro", "\udc80x", "", "abcd", "ab", "éé", "中"]
    for text in texts:
        for other in ("abcd", "éüab", "中文"):
            result = same_encode(pure, compiled, Message("0200", {"2": text, "3": other}))
            if result[0] == "bytes":
                round_trip(pure, compiled, result[1])
    for key, good in (("4", "123"), ("5", "12=3D"), ("6", "0aF1"), ("7", "C12"), ("8", "123")):
        for text in (good, *texts, "١٢", "\\u0031", "+AGE-"):
            result = same_encode(pure, compiled, Message("0200", {"2": "x", key: text}))
            if result[0] == "bytes":
                round_trip(pure, compiled, result[1])
    rng = random.Random(data_enc)
    head = b"0200" + (0x6000000000000000).to_bytes(8, "big")
    for _ in range(300):
        data = rng.randbytes(rng.randrange(0, 12))
        same_decode(pure, compiled, head + b"%02d" % len(data) + data + rng.randbytes(4))
    for bit in (60, 59, 58, 57):  # odd bytes reaching the checks of fields 4 (n), 5 (z), 6 (b), 7 (xn)
        for data in (b"12", b"\\ud800", b"\\x41", b"+2D8-", b"\xf1\xf2", rng.randbytes(6)):
            body = b"0200" + (1 << bit).to_bytes(8, "big") + b"%02d" % len(data) + data
            same_decode(pure, compiled, body)
