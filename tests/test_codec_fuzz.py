"""Fuzzing the codec and the framers: whatever bytes arrive, only CodecError / FramingError come out,
error text never carries the PAN, and whatever decodes re-encodes to a message that decodes the same.

Per dialect: 10,000 mutated valid bodies (bit flips, truncations, insertions, deletions, length-byte
corruption, splices) from a seeded `random.Random`, 10,000 random plus 10,000 structured-random
bodies (valid MTI and bitmap, random fields). Per framer: 10,000 mutated streams fed in random
chunks. Plus hypothesis properties with a few hundred examples each. `GATEWAY_HEAVY=1` multiplies
all of it by 10 (about 45 s instead of 5 s).
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable

import iso8583
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.iso.codec import Codec
from gateway.iso.errors import CodecError, FramingError
from gateway.iso.framing import CupEnvelope, make_framer
from gateway.iso.message import Message
from gateway.iso.spec import Dialect, load_dialect

pytestmark = pytest.mark.slow

HEAVY = 10 if os.environ.get("GATEWAY_HEAVY") == "1" else 1
MUTATED_CASES = 10_000 * HEAVY
RANDOM_CASES = 10_000 * HEAVY
EXAMPLES = 300 * HEAVY

PAN = "6225885916163289123"
DIALECTS = ["cup-pos", "iso87-ascii"]
CODECS = {name: Codec(load_dialect(name)) for name in DIALECTS}
ENVELOPE = CupEnvelope(bytes.fromhex("6000030000"), bytes.fromhex("603100310730"))

SEEDS: dict[str, list[Message]] = {
    "cup-pos": [
        Message("0800", {"11": "000456", "41": "12345678", "42": "123456789012345", "60": "00123456003", "63": "03"}),
        Message(
            "0200",
            {
                "2": PAN,
                "3": "000000",
                "4": "000000010000",
                "11": "000002",
                "14": "2912",
                "22": "051",
                "23": "001",
                "25": "00",
                "26": "12",
                "35": "6225885916163289D17032010000000000000",
                "41": "12345678",
                "42": "123456789012345",
                "49": "156",
                "52": "0123456789ABCDEF",
                "53": "2600000000000000",
                "55": "9F2608" + "AB" * 8 + "9F2701809F1007" + "00" * 7,
                "60": "22000001000500",
                "63": "CUP",
                "64": "3041314232433344",  # field 64 is binary: the bytes of "0A1B2C3D"
            },
        ),
        Message("0500", {"11": "000009", "48": "0" * 62, "49": "156", "60": "00000001201", "62": "00FF" * 30}),
    ],
    "iso87-ascii": [
        Message(
            "0200",
            {
                "2": PAN,
                "3": "000000",
                "4": "000000010000",
                "7": "1231235959",
                "11": "000002",
                "28": "C00000100",
                "35": "6225885916163289=17032010000000000000",
                "41": "12345678",
                "43": "ACME STORE".ljust(40),
                "48": "free text",
                "52": "0123456789ABCDEF",
                "64": "A1C72E74EA3FA9B6",
            },
        ),
        Message("0800", {"7": "0101000000", "11": "000003", "70": "301"}),
        Message(
            "0420",
            {
                "2": PAN,
                "11": "000004",
                "90": "0200000002123123595900000001234" + "0" * 11,
                "97": "D0000000000010000",
                "128": "0011223344556677",
            },
        ),
    ],
}
BODIES = {name: [CODECS[name].encode(m) for m in SEEDS[name]] for name in DIALECTS}


def length_offsets(codec: Codec, body: bytes) -> list[int]:
    """Byte offsets of the length prefixes in a valid body (targets for length corruption)."""
    _doc, enc = iso8583.decode(body, codec.dialect.spec)
    offsets, pos = [], 0
    for part in enc.values():
        offsets.extend(range(pos, pos + len(part["len"])))
        pos += len(part["len"]) + len(part["data"])
    return offsets


LENGTH_OFFSETS = {name: [length_offsets(CODECS[name], b) for b in BODIES[name]] for name in DIALECTS}


def mutate(rng: random.Random, body: bytes, lengths: list[int]) -> bytes:
    data = bytearray(body)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        op = rng.randrange(8)
        if op == 0 and data:  # flip bits
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # truncate
            del data[rng.randrange(len(data) + 1) :]
        elif op == 2:  # insert random bytes
            i = rng.randrange(len(data) + 1)
            data[i:i] = rng.randbytes(rng.randrange(1, 6))
        elif op == 3 and data:  # delete a range
            i = rng.randrange(len(data))
            del data[i : i + rng.randrange(1, 6)]
        elif op == 4 and lengths:  # corrupt a length prefix byte
            i = rng.choice(lengths)
            if i < len(data):
                data[i] = rng.choice((0x00, 0x01, 0x09, 0x10, 0x99, 0x9A, 0xFF, ord("0"), ord("9"), rng.randrange(256)))
        elif op == 5 and data:  # overwrite a byte with a "nasty" value
            data[rng.randrange(len(data))] = rng.choice((0x00, 0x3D, 0x7F, 0x80, 0xAF, 0xFF, ord("="), ord("D")))
        elif op == 6 and data:  # duplicate a slice
            i = rng.randrange(len(data))
            j = min(len(data), i + rng.randrange(1, 20))
            data[j:j] = data[i:j]
        else:  # trailing garbage
            data += rng.randbytes(rng.randrange(1, 4))
    return bytes(data)


def check_decode(codec: Codec, body: bytes) -> Message | None:
    """The fuzz property: a CodecError without the PAN in its text, or a message that round-trips."""
    try:
        msg = codec.decode(body)
    except CodecError as exc:
        text = f"{exc} {exc.reason!r} {exc.field!r}"
        assert PAN not in text and PAN[:12] not in text
        return None
    again = codec.decode(codec.encode(msg))  # whatever decodes must encode, and decode the same
    assert again.mti == msg.mti and again.fields == msg.fields
    return msg


@pytest.mark.parametrize("name", DIALECTS)
def test_mutated_bodies(name: str) -> None:
    codec, rng = CODECS[name], random.Random(f"mutate-{name}")
    decoded = 0
    for _ in range(MUTATED_CASES):
        index = rng.randrange(len(BODIES[name]))
        if check_decode(codec, mutate(rng, BODIES[name][index], LENGTH_OFFSETS[name][index])) is not None:
            decoded += 1
    # the mutations must not be so wild that nothing ever decodes (then field checks go untested)
    assert 0 < decoded < MUTATED_CASES
    for body in BODIES[name]:  # and valid input still decodes afterwards (plan cache churn)
        assert check_decode(codec, body) is not None


def structured_random(rng: random.Random, dialect: Dialect) -> bytes:
    """Valid MTI + a bitmap naming defined fields + random field bytes: gets past the header checks."""
    mti = rng.choice(sorted(dialect.mtis))
    fields = rng.sample(dialect.fields, rng.randrange(1, 8))
    primary = sum(1 << (64 - int(f)) for f in fields if int(f) <= 64)
    secondary = sum(1 << (128 - int(f)) for f in fields if int(f) > 64)
    if secondary:
        primary |= 1 << 63
    if dialect.spec["p"]["data_enc"] == "b":
        head = bytes.fromhex(mti) + primary.to_bytes(8, "big") + (secondary.to_bytes(8, "big") if secondary else b"")
    else:
        head = mti.encode() + (f"{primary:016X}" + (f"{secondary:016X}" if secondary else "")).encode()
    alphabet = rng.choice((b"0123456789", b"0123456789ABCDEF=D ", bytes(range(256))))
    tail = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 80)))
    return head + tail


@pytest.mark.parametrize("name", DIALECTS)
def test_random_bodies(name: str) -> None:
    codec, rng = CODECS[name], random.Random(f"random-{name}")
    for _ in range(RANDOM_CASES):
        check_decode(codec, rng.randbytes(rng.randrange(0, 120)))
        check_decode(codec, structured_random(rng, codec.dialect))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(DIALECTS), data=st.binary(max_size=300))
def test_hypothesis_arbitrary_bytes(name: str, data: bytes) -> None:
    check_decode(CODECS[name], data)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(DIALECTS),
    index=st.integers(0, 2),
    edits=st.lists(st.tuples(st.integers(0, 600), st.binary(max_size=4), st.integers(0, 4)), min_size=1, max_size=4),
)
def test_hypothesis_spliced_bodies(name: str, index: int, edits: list[tuple[int, bytes, int]]) -> None:
    data = bytearray(BODIES[name][index])
    for at, insert, remove in edits:
        at %= len(data) + 1
        data[at : at + remove] = insert
    check_decode(CODECS[name], bytes(data))


# --- valid messages generated from the dialect spec round-trip ------------------------------------


def value_strategy(dialect: Dialect, key: str) -> st.SearchStrategy[str]:
    field = dialect.spec[key]
    fmt = dialect.formats[key]
    fixed = field["len_type"] == 0
    size = field["max_len"]
    if field["data_enc"] == "b" and fmt == "b":  # raw bytes: max_len counts bytes
        n_bytes = st.just(size) if fixed else st.integers(0, min(size, 40))
        return n_bytes.flatmap(lambda n: st.binary(min_size=n, max_size=n)).map(lambda b: b.hex().upper())
    length = st.just(size) if fixed else st.integers(0, min(size, 60))
    if fmt == "n":
        alphabet = "0123456789"
    elif fmt == "z":
        alphabet = "0123456789D" if field["data_enc"] == "b" else "0123456789="
    elif fmt == "b":
        alphabet = "0123456789ABCDEF"
    elif fmt == "xn":
        return st.tuples(st.sampled_from("CD"), st.text("0123456789", min_size=size - 1, max_size=size - 1)).map(
            "".join
        )
    else:
        alphabet = "".join(chr(c) for c in range(0x20, 0x7F))
    return length.flatmap(lambda n: st.text(alphabet, min_size=n, max_size=n))


def message_strategy(name: str) -> st.SearchStrategy[Message]:
    dialect = CODECS[name].dialect
    keys = st.lists(st.sampled_from(dialect.fields), min_size=1, max_size=20, unique=True)
    return st.tuples(st.sampled_from(sorted(dialect.mtis)), keys).flatmap(
        lambda mk: st.fixed_dictionaries({k: value_strategy(dialect, k) for k in mk[1]}).map(
            lambda fields: Message(mk[0], fields)
        )
    )


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(DIALECTS).flatmap(lambda n: st.tuples(st.just(n), message_strategy(n))))
def test_hypothesis_generated_messages_round_trip(case: tuple[str, Message]) -> None:
    name, msg = case
    codec = CODECS[name]
    body = codec.encode(msg)
    again = codec.decode(body)
    assert again.mti == msg.mti and again.fields == msg.fields
    assert codec.encode(again) == body


# --- framers -------------------------------------------------------------------------------------


def framed_stream(kind: str, count: int) -> tuple[bytes, list[bytes]]:
    framer = make_framer(kind)
    bodies = [body for name in DIALECTS for body in BODIES[name]][:count]
    envelope = ENVELOPE if kind == "cup" else None
    return b"".join(framer.encode(b, envelope) for b in bodies), bodies


def feed_in_chunks(kind: str, data: bytes, cuts: Callable[[int], list[int]]) -> list[bytes] | None:
    """Feed `data` split at `cuts`; the bodies decoded, or None if a FramingError stopped it."""
    decoder = make_framer(kind, max_frame=2048).decoder()
    bounds = [0, *sorted(cuts(len(data))), len(data)]
    out: list[bytes] = []
    try:
        for a, b in itertools.pairwise(bounds):
            out.extend(f.body for f in decoder.feed(data[a:b]))
    except FramingError:
        with pytest.raises(FramingError):  # poisoned: the stream cannot be trusted any more
            decoder.feed(b"\x00")
        return None
    assert decoder.buffered <= len(data)
    return out


@pytest.mark.parametrize("kind", ["len2", "ascii4", "cup"])
def test_framers_on_mutated_streams(kind: str) -> None:
    rng = random.Random(f"frames-{kind}")
    data, bodies = framed_stream(kind, 6)
    prefix_at = []  # offsets of each frame's length prefix
    pos = 0
    framer = make_framer(kind)
    for body in bodies:
        prefix_at.append(pos)
        pos += len(framer.encode(body, ENVELOPE if kind == "cup" else None))
    for _ in range(MUTATED_CASES):
        mutated = bytearray(data)
        for _ in range(rng.randrange(1, 3)):
            if rng.random() < 0.5:
                i = rng.choice(prefix_at) + rng.randrange(4)
                if i < len(mutated):
                    mutated[i] = rng.randrange(256)
            else:
                mutated = bytearray(mutate(rng, bytes(mutated), []))
        feed_in_chunks(kind, bytes(mutated), lambda n: [rng.randrange(n + 1) for _ in range(rng.randrange(4))])
    # intact streams in random chunks always give back exactly the bodies
    for _ in range(200):
        assert feed_in_chunks(kind, data, lambda n: [rng.randrange(n + 1) for _ in range(rng.randrange(8))]) == bodies


@settings(max_examples=EXAMPLES, deadline=None)
@given(kind=st.sampled_from(["len2", "ascii4", "cup"]), chunks=st.lists(st.binary(max_size=40), max_size=12))
def test_hypothesis_framers_arbitrary_chunks(kind: str, chunks: list[bytes]) -> None:
    decoder = make_framer(kind, max_frame=256).decoder()
    failed = False
    for chunk in chunks:
        try:
            for frame in decoder.feed(chunk):
                assert 0 < len(frame.body) <= 256
                assert (frame.envelope is not None) == (kind == "cup")
        except FramingError:
            failed = True
            break
    if failed:
        with pytest.raises(FramingError):
            decoder.feed(b"")
