"""Promises of gateway/iso/framing.py that mutation testing (issue 16) found unasserted: the smallest
frame (a one-byte body) decodes alone in one chunk; an error names where in the stream it broke, even
after several chunks; a poisoned decoder holds nothing back; the limits (1..prefix maximum, 8192 by
default) are the documented ones at both ends; every refusal says what was wrong in words an operator
can act on; the CUP envelope's JSON breakdown and its 0..15 processing requirement."""

from __future__ import annotations

import re

import pytest

from gateway.iso.errors import FramingError
from gateway.iso.framing import (
    Ascii4Framer,
    CupEnvelope,
    CupFramer,
    Frame,
    Len2Framer,
    make_framer,
)

ENVELOPE = CupEnvelope(bytes.fromhex("6000030000"), bytes.fromhex("603100310730"))


def message(exc: pytest.ExceptionInfo[BaseException]) -> str:
    return str(exc.value)


@pytest.mark.parametrize(
    ("kind", "data", "body"),
    [
        ("len2", b"\x00\x01X", b"X"),
        ("ascii4", b"0001X", b"X"),
        ("cup", b"\x00\x0c" + ENVELOPE.tpdu + ENVELOPE.header + b"X", b"X"),
    ],
)
def test_a_one_byte_message_alone_in_one_chunk(kind: str, data: bytes, body: bytes) -> None:
    decoder = make_framer(kind).decoder()
    assert decoder.feed(data) == [Frame(body, ENVELOPE if kind == "cup" else None)]
    assert decoder.buffered == 0
    # and two of them back to back, then a third split over two chunks
    assert decoder.feed(data + data + data[:2]) == [Frame(body, ENVELOPE if kind == "cup" else None)] * 2
    assert decoder.feed(data[2:]) == [Frame(body, ENVELOPE if kind == "cup" else None)]


def test_the_error_offset_counts_every_byte_consumed_across_chunks() -> None:
    decoder = make_framer("len2").decoder()
    good = make_framer("len2").encode(b"abc")  # 5 bytes
    assert decoder.feed(good) == [Frame(b"abc")]
    assert decoder.feed(good) == [Frame(b"abc")]
    assert decoder.feed(good + b"\x00\x00") == [Frame(b"abc")]
    with pytest.raises(FramingError) as exc:
        decoder.feed(b"")
    assert message(exc) == "stream is desynchronised after an earlier error (zero-length frame (stream offset 15))"


def test_a_poisoned_decoder_holds_nothing_back() -> None:
    decoder = make_framer("len2").decoder()
    assert decoder.feed(b"\x00\x05ab") == []
    assert decoder.buffered == 4
    # the frame completed before the bad prefix is handed out; the rest is dropped, not kept
    assert decoder.feed(b"cde\x00\x00\x00") == [Frame(b"abcde")]
    assert decoder.buffered == 0
    assert decoder.failed
    # and when the chunk held no good frame: the error is raised, the buffered byte dropped
    decoder = make_framer("len2").decoder()
    assert decoder.feed(b"\x00") == []
    with pytest.raises(FramingError, match="zero-length"):
        decoder.feed(b"\x00rest")
    assert decoder.buffered == 0


@pytest.mark.parametrize(
    ("kind", "data", "text"),
    [
        ("len2", b"\x00\x00", "zero-length frame (stream offset 0)"),
        ("len2", b"\x20\x01", "frame length 8193 exceeds the maximum 8192 (stream offset 0)"),
        ("ascii4", b"12a4", "length prefix is not 4 ASCII digits (stream offset 0)"),
        ("cup", b"\x00\x0b", "frame length 11 leaves no message after the TPDU and header (stream offset 0)"),
        ("cup", b"\x00\x20\x61", "TPDU id is 0x61, expecting 0x60 (stream offset 2)"),
    ],
)
def test_decoder_errors_say_what_and_where(kind: str, data: bytes, text: str) -> None:
    decoder = make_framer(kind).decoder()
    with pytest.raises(FramingError) as exc:
        decoder.feed(data)
    assert message(exc) == text


def test_the_tpdu_id_offset_is_that_of_the_id_byte_after_good_frames() -> None:
    cup = make_framer("cup", envelope=ENVELOPE)
    good = cup.encode(b"abc")  # 2 + 11 + 3 = 16 bytes
    decoder = cup.decoder()
    assert decoder.feed(good + b"\x00\x20\x61") == [Frame(b"abc", ENVELOPE)]
    with pytest.raises(FramingError, match=re.escape("expecting 0x60 (stream offset 18))")):
        decoder.feed(b"")


def test_frame_limits_default_and_bounds() -> None:
    # the default limit is 8192 bytes of message for every kind
    for framer in (Len2Framer(), Ascii4Framer(), CupFramer(), make_framer("len2")):
        assert framer.max_frame == 8192
        assert repr(framer) == f"{type(framer).__name__}(max_frame=8192)"
    with pytest.raises(FramingError):
        Len2Framer().encode(b"x" * 8193)
    with pytest.raises(FramingError):
        CupFramer(envelope=ENVELOPE).encode(b"x" * (8193 - 11))
    # 1 byte and the prefix's maximum are both allowed limits; 0 and one past it are not
    assert make_framer("len2", max_frame=1).encode(b"x") == b"\x00\x01x"
    assert make_framer("len2", max_frame=0xFFFF).decoder().feed(b"\xff\xff" + b"x" * 0xFFFF) == [
        Frame(b"x" * 0xFFFF)
    ]
    assert make_framer("ascii4", max_frame=9999).encode(b"x" * 9999)[:4] == b"9999"
    with pytest.raises(ValueError) as exc:
        make_framer("len2", max_frame=0)
    assert message(exc) == "max_frame must be 1..65535 for len2 framing"
    with pytest.raises(ValueError) as exc:
        make_framer("ascii4", max_frame=10_000)
    assert message(exc) == "max_frame must be 1..9999 for ascii4 framing"
    with pytest.raises(ValueError):
        make_framer("cup", max_frame=0x10000)


def test_encode_errors_say_what_was_wrong() -> None:
    cases: list[tuple[object, str]] = [
        (lambda: make_framer("len2").encode(b""), "cannot frame an empty message"),
        (lambda: make_framer("len2", max_frame=3).encode(b"abcd"), "frame length 4 exceeds the maximum 3"),
        (lambda: make_framer("ascii4").encode(b"ab", ENVELOPE), "ascii4 framing carries no TPDU/header envelope"),
        (lambda: make_framer("cup").encode(b"abc"), "cup framing needs a TPDU and header (no envelope given)"),
        (lambda: make_framer("cup").encode(b"", ENVELOPE), "cannot frame an empty message"),
        (lambda: make_framer("cup", max_frame=12).encode(b"ab", ENVELOPE), "frame length 13 exceeds the maximum 12"),
    ]
    for call, text in cases:
        with pytest.raises(FramingError) as exc:
            call()  # type: ignore[operator]
        assert message(exc) == text


def test_make_framer_refusals_name_the_choices() -> None:
    with pytest.raises(ValueError) as exc:
        make_framer("len3")
    assert message(exc) == "unknown framing 'len3' (choose from len2, ascii4, cup)"
    with pytest.raises(ValueError) as exc:
        make_framer("len2", envelope=ENVELOPE)
    assert message(exc) == "len2 framing takes no envelope"


def test_cup_length_prefix_is_big_endian() -> None:
    framed = make_framer("cup", max_frame=1000).encode(b"x" * 500, ENVELOPE)
    assert framed[:2] == (511).to_bytes(2, "big") == b"\x01\xff"
    assert make_framer("len2", max_frame=1000).encode(b"x" * 500)[:2] == b"\x01\xf4"


def test_envelope_errors_say_what_was_wrong() -> None:
    with pytest.raises(FramingError) as exc:
        CupEnvelope(b"\x60\x00", ENVELOPE.header)
    assert message(exc) == "TPDU must be 5 bytes, got 2"
    with pytest.raises(FramingError) as exc:
        CupEnvelope(ENVELOPE.tpdu, b"\x60")
    assert message(exc) == "CUP header must be 6 bytes, got 1"
    with pytest.raises(FramingError) as exc:
        CupEnvelope.from_hex("60000300zz", "603100310730")
    assert message(exc) == "TPDU and header must be hex strings"


def test_processing_requirement_takes_every_nibble_value() -> None:
    request = CupEnvelope(bytes.fromhex("6005370012"), bytes.fromhex("611110310003"))
    assert request.reply(15).header == bytes.fromhex("61111F310003")
    assert request.reply(0).processing_requirement == 0
    for bad in (-1, 16):
        with pytest.raises(FramingError) as exc:
            request.reply(bad)
        assert message(exc) == "processing requirement must be 0..15"


def test_envelope_as_dict_breaks_out_every_field() -> None:
    envelope = CupEnvelope(bytes.fromhex("60053700ab"), bytes.fromhex("6131a0cdef12"))
    assert envelope.as_dict() == {
        "tpdu": "60053700AB",
        "tpdu_id": "60",
        "destination": "0537",
        "source": "00AB",
        "header": "6131A0CDEF12",
        "application": "61",
        "version": "31",
        "terminal_status": 10,
        "processing_requirement": 0,
        "software_version": "CDEF12",
    }
