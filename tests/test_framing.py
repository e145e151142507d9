"""Framing: frames split at every byte boundary, many frames per chunk, every error poisons the
decoder, CUP envelopes (TPDU swap, processing requirement)."""

from __future__ import annotations

import pytest

from gateway.iso.errors import FramingError
from gateway.iso.framing import CupEnvelope, Frame, make_framer

ENVELOPE = CupEnvelope(bytes.fromhex("6000030000"), bytes.fromhex("603100310730"))
BODIES = [b"\x08\x00" + bytes(range(8)) + b"A", b"B" * 300, b"\x00", bytes(range(256)) * 3]
KINDS = ["len2", "ascii4", "cup"]


def stream(kind: str, bodies: list[bytes]) -> bytes:
    framer = make_framer(kind)
    envelope = ENVELOPE if kind == "cup" else None
    return b"".join(framer.encode(body, envelope) for body in bodies)


def expected_frames(kind: str, bodies: list[bytes]) -> list[Frame]:
    return [Frame(body, ENVELOPE if kind == "cup" else None) for body in bodies]


def test_prefixes() -> None:
    assert make_framer("len2").encode(b"abc") == b"\x00\x03abc"
    assert make_framer("ascii4").encode(b"abc") == b"0003abc"
    assert (
        make_framer("cup").encode(b"abc", ENVELOPE) == b"\x00\x0e" + ENVELOPE.tpdu + ENVELOPE.header + b"abc"
    )


@pytest.mark.parametrize("kind", KINDS)
def test_split_at_every_byte_boundary(kind: str) -> None:
    data = stream(kind, BODIES[:2])
    for cut in range(len(data) + 1):
        decoder = make_framer(kind).decoder()
        frames = decoder.feed(data[:cut])
        frames += decoder.feed(data[cut:])
        assert frames == expected_frames(kind, BODIES[:2]), cut
        assert decoder.buffered == 0


@pytest.mark.parametrize("kind", KINDS)
def test_split_at_every_pair_of_boundaries(kind: str) -> None:
    data = stream(kind, BODIES[:1] * 2)
    for first in range(len(data) + 1):
        for second in range(first, len(data) + 1):
            decoder = make_framer(kind).decoder()
            frames = (
                decoder.feed(data[:first]) + decoder.feed(data[first:second]) + decoder.feed(data[second:])
            )
            assert frames == expected_frames(kind, BODIES[:1] * 2)


@pytest.mark.parametrize("kind", KINDS)
def test_one_byte_at_a_time(kind: str) -> None:
    data = stream(kind, BODIES)
    decoder = make_framer(kind).decoder()
    ends = []
    for body in BODIES:
        ends.append((ends[-1] if ends else 0) + len(stream(kind, [body])))
    frames: list[Frame] = []
    for i in range(len(data)):
        got = decoder.feed(data[i : i + 1])
        assert len(got) == (1 if i + 1 in ends else 0)
        frames += got
        last_end = max([e for e in ends if e <= i + 1], default=0)
        assert decoder.buffered == i + 1 - last_end
    assert frames == expected_frames(kind, BODIES)
    assert decoder.buffered == 0


@pytest.mark.parametrize("kind", KINDS)
def test_many_frames_in_one_chunk_plus_a_partial_one(kind: str) -> None:
    bodies = BODIES * 5
    data = stream(kind, bodies)
    tail = stream(kind, [b"tail"])
    decoder = make_framer(kind).decoder()
    assert decoder.feed(data + tail[:3]) == expected_frames(kind, bodies)
    assert decoder.buffered == 3
    assert decoder.feed(b"") == []
    assert decoder.feed(tail[3:]) == expected_frames(kind, [b"tail"])
    assert decoder.buffered == 0


def test_frame_body_is_bytes_even_from_a_bytearray_buffer() -> None:
    decoder = make_framer("len2").decoder()
    decoder.feed(b"\x00")
    (frame,) = decoder.feed(bytearray(b"\x02hi"))
    assert type(frame.body) is bytes and frame.body == b"hi"


@pytest.mark.parametrize(
    ("kind", "data", "match"),
    [
        ("len2", b"\x00\x00", "zero-length"),
        ("len2", b"\x20\x01", "exceeds"),
        ("ascii4", b"0000", "zero-length"),
        ("ascii4", b"9000", "exceeds"),
        ("ascii4", b"00a1xyz", "not 4 ASCII digits"),
        ("ascii4", b" 123", "not 4 ASCII digits"),
        ("ascii4", b"+123", "not 4 ASCII digits"),
        ("cup", b"\x00\x00", "zero-length"),
        ("cup", b"\x20\x01", "exceeds"),
        ("cup", b"\x00\x0b", "no message"),
        ("cup", b"\x00\x05" + ENVELOPE.tpdu, "no message"),
        ("cup", b"\x00\x20\x61", "TPDU id"),
    ],
)
def test_errors_poison_the_decoder(kind: str, data: bytes, match: str) -> None:
    decoder = make_framer(kind).decoder()
    with pytest.raises(FramingError, match=match):
        decoder.feed(data)
    assert decoder.failed
    with pytest.raises(FramingError, match="desynchronised"):
        decoder.feed(stream(kind, [b"ok"]))


def test_error_after_good_frames_names_the_stream_offset() -> None:
    decoder = make_framer("len2", max_frame=100).decoder()
    good = stream("len2", [b"abc"])  # 5 bytes
    assert decoder.feed(good) == [Frame(b"abc")]
    # the good frame before the bad prefix is handed out (a real request must not be lost) ...
    assert decoder.feed(good + b"\x00\x65" + b"x" * 101) == [Frame(b"abc")]
    assert decoder.failed
    # ... and the stream is poisoned, naming where it broke
    with pytest.raises(FramingError, match="stream offset 10"):
        decoder.feed(b"")


def test_tpdu_id_checked_as_soon_as_it_arrives() -> None:
    decoder = make_framer("cup").decoder()
    assert decoder.feed(b"\x00\x40") == []
    with pytest.raises(FramingError, match="0x70"):
        decoder.feed(b"\x70")


def test_length_checked_before_the_body_arrives() -> None:
    decoder = make_framer("ascii4", max_frame=512).decoder()
    with pytest.raises(FramingError, match="exceeds"):
        decoder.feed(b"0513")


def test_max_frame_boundary() -> None:
    framer = make_framer("len2", max_frame=10)
    assert framer.decoder().feed(framer.encode(b"x" * 10)) == [Frame(b"x" * 10)]
    with pytest.raises(FramingError):
        framer.encode(b"x" * 11)
    cup = make_framer("cup", max_frame=20)
    cup.encode(b"x" * 9, ENVELOPE)  # 11 + 9 = 20
    with pytest.raises(FramingError):
        cup.encode(b"x" * 10, ENVELOPE)


def test_encode_errors() -> None:
    with pytest.raises(FramingError):
        make_framer("len2").encode(b"")
    with pytest.raises(FramingError):
        make_framer("len2").encode(b"abc", ENVELOPE)
    with pytest.raises(FramingError, match="TPDU"):
        make_framer("cup").encode(b"abc")
    with pytest.raises(FramingError):
        make_framer("cup").encode(b"", ENVELOPE)
    default = make_framer("cup", envelope=ENVELOPE)
    assert default.encode(b"abc") == make_framer("cup").encode(b"abc", ENVELOPE)
    with pytest.raises(ValueError, match="unknown framing"):
        make_framer("len3")
    with pytest.raises(ValueError):
        make_framer("ascii4", max_frame=10_000)


def test_envelope_properties_and_reply() -> None:
    request = CupEnvelope(bytes.fromhex("6005370012"), bytes.fromhex("611110310003"))
    assert (request.tpdu_id, request.destination, request.source) == (0x60, "0537", "0012")
    assert (request.application, request.version) == ("61", "11")
    assert (request.terminal_status, request.processing_requirement) == (1, 0)
    assert request.software_version == "310003"

    answer = request.reply()
    assert answer.tpdu == bytes.fromhex("6000120537")
    assert answer.header == request.header
    assert (answer.destination, answer.source) == ("0012", "0537")

    resign = request.reply(3)
    assert resign.processing_requirement == 3
    assert resign.terminal_status == 1  # the high nibble is kept
    assert resign.header == bytes.fromhex("611113310003")
    assert resign.reply(0).processing_requirement == 0
    assert answer.reply().tpdu == request.tpdu  # swapping twice restores the addresses
    with pytest.raises(FramingError):
        request.reply(16)


def test_envelope_validation() -> None:
    with pytest.raises(FramingError):
        CupEnvelope(b"\x60\x00", ENVELOPE.header)
    with pytest.raises(FramingError):
        CupEnvelope(ENVELOPE.tpdu, b"\x60")
    with pytest.raises(FramingError):
        CupEnvelope.from_hex("60000300zz", "603100310730")
    assert CupEnvelope.from_hex("6000030000", "603100310730") == ENVELOPE
    assert ENVELOPE.as_dict()["destination"] == "0003"


@pytest.mark.parametrize("kind", KINDS)
def test_memoryview_and_bytearray_input(kind: str) -> None:
    data = stream(kind, BODIES[:2])
    decoder = make_framer(kind).decoder()
    frames = decoder.feed(memoryview(data)[:7]) + decoder.feed(bytearray(data[7:]))
    assert frames == expected_frames(kind, BODIES[:2])
    fresh = make_framer(kind).decoder()
    assert fresh.feed(memoryview(data)) == expected_frames(kind, BODIES[:2])
