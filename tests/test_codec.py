"""Codec: the reference's worked CUP vectors, round trips in both dialects, and every kind of bad
input turning into a CodecError that names field and offset without leaking field data."""

from __future__ import annotations

import iso8583
import pytest

from gateway.iso.codec import Codec
from gateway.iso.errors import CodecError
from gateway.iso.framing import make_framer
from gateway.iso.message import Message
from gateway.iso.spec import load_dialect
from gateway.iso.stan import StanAllocator

CUP = Codec(load_dialect("cup-pos"))
ISO87 = Codec(load_dialect("iso87-ascii"))

PAN = "6225885916163289123"
TRACK2 = "6225885916163289D1703201" + "0" * 13  # 37 digits: '...3289D1703...' as in reference §1.5


def asc(text: str) -> str:
    return text.encode("ascii").hex()


# --- reference §1.5 worked vectors -----------------------------------------------------------------

SIGN_IN_HEX = (
    "0800"  # MTI, 2 BCD bytes
    "0020000000C00012"  # bitmap: 11, 41, 42, 60, 63
    "000456"  # 11
    + asc("12345678")  # 41
    + asc("123456789012345")  # 42
    + "0011"
    + "001234560030"  # 60: LLL 0011 digits, left-justified, pad nibble
    + "0002"
    + asc("03")  # 63: LLL 0002 bytes
)

BALANCE_HEX = (
    "0200"
    "202004C020C09811"  # bitmap: 3, 11, 22, 25, 26, 35, 41, 42, 49, 52, 53, 60, 64
    "310000"  # 3
    "000789"  # 11 (value not given in the reference; any STAN)
    "0210"  # 22 = 021, left-justified
    "00"  # 25
    "06"  # 26
    "37"
    + TRACK2
    + "0"  # 35: LL 37 digits → 19 bytes
    + asc("12345678")  # 41
    + asc("123456789012345")  # 42
    + asc("156")  # 49
    + "A1B2C3D4E5F60718"  # 52 (any 8 bytes)
    + "2600000000000000"  # 53
    + "0013"
    + "01000001000500"  # 60: 13 digits → 7 bytes
    + asc("8456B1CD")  # 64: 8 ASCII hex characters
)


def test_sign_in_vector_decodes_to_reference_values() -> None:
    msg = CUP.decode(bytes.fromhex(SIGN_IN_HEX))
    assert msg.mti == "0800"
    assert msg.fields == {
        "11": "000456",
        "41": "12345678",
        "42": "123456789012345",
        "60": "00123456003",  # "00" + "123456" + "003"
        "63": "03",
    }
    assert CUP.encode(msg) == bytes.fromhex(SIGN_IN_HEX)


def test_balance_inquiry_vector_decodes_to_reference_values() -> None:
    msg = CUP.decode(bytes.fromhex(BALANCE_HEX))
    assert msg.mti == "0200"
    assert sorted(msg.fields, key=int) == [
        "3",
        "11",
        "22",
        "25",
        "26",
        "35",
        "41",
        "42",
        "49",
        "52",
        "53",
        "60",
        "64",
    ]
    assert msg["3"] == "310000"
    assert msg["22"] == "021"
    assert msg["25"] == "00"
    assert msg["26"] == "06"
    assert msg["35"] == TRACK2 and len(msg["35"]) == 37 and "3289D1703" in msg["35"]
    assert msg["53"] == "2600000000000000"
    assert msg["60"] == "0100000100050"
    sub = msg["60"]
    assert (sub[0:2], sub[2:8], sub[8:11], sub[11], sub[12]) == ("01", "000001", "000", "5", "0")
    assert msg["64"] == "3834353642314344"  # the 8 bytes "8456B1CD", as hex
    assert msg["52"] == "A1B2C3D4E5F60718"
    assert CUP.encode(msg) == bytes.fromhex(BALANCE_HEX)


def test_full_frame_vector_tpdu_header_and_bitmap() -> None:
    body_fields = BALANCE_HEX[20:]  # after MTI + bitmap
    amount = "000000012345"
    body_hex = "0200" + "302004C020C09811" + body_fields[:6] + amount + body_fields[6:]
    envelope = "6000030000" + "603100310730"
    frame_hex = f"{(len(body_hex) // 2 + 11):04X}" + envelope + body_hex
    frames = make_framer("cup").decoder().feed(bytes.fromhex(frame_hex))
    assert len(frames) == 1
    env = frames[0].envelope
    assert env is not None
    assert env.tpdu.hex() == "6000030000" and env.header.hex() == "603100310730"
    assert (env.tpdu_id, env.destination, env.source) == (0x60, "0003", "0000")
    assert (env.application, env.version, env.terminal_status, env.processing_requirement) == (
        "60",
        "31",
        0,
        0,
    )
    assert env.software_version == "310730"
    msg = CUP.decode(frames[0].body)
    assert msg.mti == "0200"
    assert frames[0].body[2:10].hex().upper() == "302004C020C09811"
    assert sorted(msg.fields, key=int) == [
        "3", "4", "11", "22", "25", "26", "35", "41", "42", "49", "52", "53", "60", "64"
    ]  # fmt: skip
    assert msg["4"] == amount


# --- round trips ------------------------------------------------------------------------------------

CUP_MESSAGES = [
    Message("0800", {"11": "000001", "41": "12345678", "42": "123456789012345", "60": "00000001003", "63": "01 "}),
    Message(
        "0810",
        {
            "11": "000001",
            "12": "235959",
            "13": "1231",
            "32": "01020000",
            "37": "123456789012",
            "39": "00",
            "41": "12345678",
            "42": "123456789012345",
            "60": "00000001003",
            "62": "00112233445566778899AABBCCDDEEFF" + "01234567" + "8" * 40,
        },
    ),
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
            "35": TRACK2,
            "36": "99" + PAN + "D156" + "0" * 30 + "D" + "1" * 11,
            "41": "12345678",
            "42": "123456789012345",
            "49": "156",
            "52": "0123456789ABCDEF",
            "53": "2600000000000000",
            "55": "9F2608" + "AB" * 8 + "9F2701809F1007" + "00" * 7,
            "60": "22000001000500",
            "64": "3041314232433344",  # field 64 is binary: the bytes of "0A1B2C3D"
        },
    ),
    Message(
        "0210",
        {
            "2": PAN,
            "3": "000000",
            "4": "000000010000",
            "11": "000002",
            "12": "101010",
            "13": "0101",
            "15": "0102",
            "25": "00",
            "32": "12345678901",
            "37": "000000000001",
            "38": "A1B2C3",
            "39": "00",
            "41": "12345678",
            "42": "123456789012345",
            "44": "12345678901" + "10987654321",
            "49": "156",
            "54": "1002156C000000010000",
            "60": "22000001",
            "63": "CUP" + "交易成功".ljust(10),  # 63.2 carries GBK text
            "64": "4646464646464646",
        },
    ),
    Message("0400", {"3": "000000", "4": "000000010000", "11": "000002", "39": "98", "61": "000001000002"}),
    Message("0500", {"11": "000009", "48": "0" * 62, "49": "156", "60": "00000001201", "63": "01 "}),
]

ISO87_MESSAGES = [
    Message(
        "0200",
        {
            "2": PAN,
            "3": "000000",
            "4": "000000010000",
            "7": "1231235959",
            "11": "000002",
            "22": "051",
            "28": "C00000100",
            "35": "6225885916163289=17032010000000000000",
            "41": "12345678",
            "42": "123456789012345",
            "43": "ACME STORE".ljust(40),
            "48": "free text: anything printable ~!@#",
            "49": "156",
            "52": "0123456789ABCDEF",
            "55": "9F2608" + "AB" * 8,
            "64": "A1C72E74EA3FA9B6",
        },
    ),
    Message("0800", {"7": "0101000000", "11": "000003", "70": "301"}),  # echo: secondary bitmap
    Message(
        "0420",
        {
            "2": PAN,
            "3": "000000",
            "4": "000000010000",
            "11": "000004",
            "39": "98",
            "90": "0200" + "000002" + "1231235959" + "00000001234" + "00000000000",
            "97": "D0000000000010000",
            "128": "0011223344556677",
        },
    ),
    Message("0810", {"7": "0101000000", "11": "000003", "39": "00", "70": "001", "96": "FEDCBA9876543210"}),
]


@pytest.mark.parametrize("msg", CUP_MESSAGES, ids=lambda m: m.mti)
def test_cup_round_trip(msg: Message) -> None:
    body = CUP.encode(msg)
    again = CUP.decode(body)
    assert again.mti == msg.mti and again.fields == msg.fields
    assert CUP.encode(again) == body


@pytest.mark.parametrize("msg", ISO87_MESSAGES, ids=lambda m: m.mti)
def test_iso87_round_trip(msg: Message) -> None:
    body = ISO87.encode(msg)
    again = ISO87.decode(body)
    assert again.mti == msg.mti and again.fields == msg.fields
    assert ISO87.encode(again) == body


@pytest.mark.parametrize(("codec", "msg"), [(CUP, m) for m in CUP_MESSAGES] + [(ISO87, m) for m in ISO87_MESSAGES])
def test_same_bytes_as_bare_pyiso8583(codec: Codec, msg: Message) -> None:
    raw, _ = iso8583.encode({"t": msg.mti, **msg.fields}, codec.dialect.spec)
    assert codec.encode(msg) == bytes(raw)


def test_encode_does_not_mutate_the_message() -> None:
    msg = Message("0200", dict(ISO87_MESSAGES[0].fields))
    before = dict(msg.fields)
    ISO87.encode(msg)
    assert msg.fields == before and msg.mti == "0200"


def test_iso87_secondary_bitmap_on_the_wire() -> None:
    body = ISO87.encode(ISO87_MESSAGES[1])
    assert body[:4] == b"0800"
    assert body[4:20] == b"8220000000000000"  # bits 1, 7, 11
    assert body[20:36] == b"0400000000000000"  # bit 70
    assert ISO87.dialect.mac_field_for(ISO87_MESSAGES[2].fields) == "128"


def test_cup_wire_details() -> None:
    body = CUP.encode(Message("0200", {"2": "1234567890123", "22": "021", "23": "001", "64": "3041314232433344"}))
    # PAN: LL = 13 digits, left-justified with a trailing pad nibble
    assert body[10:18].hex() == "13" + "12345678901230"
    assert body[18:20].hex() == "0210"  # 22 left-justified
    assert body[20:22].hex() == "0001"  # 23 right-justified
    assert body[-8:] == b"0A1B2C3D"  # MAC: last, 8 ASCII bytes


def test_cup_track_equals_sign_is_sent_as_nibble_d() -> None:
    with_equals = TRACK2.replace("D", "=")
    body = CUP.encode(Message("0200", {"35": with_equals}))
    assert body == CUP.encode(Message("0200", {"35": TRACK2}))
    assert CUP.decode(body)["35"] == TRACK2  # the decoded value keeps the wire form


def test_lowercase_hex_text_is_accepted_and_upper_cased() -> None:
    body = ISO87.encode(Message("0200", {"52": "0123456789abcdef"}))
    assert body.endswith(b"0123456789ABCDEF")
    lower = body[:-16] + b"0123456789abcdef"
    assert ISO87.decode(lower)["52"] == "0123456789ABCDEF"


def test_encrypted_track_passes_when_53_3_is_set() -> None:
    cipher_track = "62258859D" + "9A3F00C1E2B47D58" + "7"  # TDK-encrypted window holds hex letters
    fields = {"35": cipher_track, "53": "2610000000000000"}
    msg = CUP.decode(CUP.encode(Message("0200", fields)))
    assert msg["35"] == cipher_track
    with pytest.raises(CodecError) as err:
        CUP.encode(Message("0200", {"35": cipher_track, "53": "2600000000000000"}))
    assert err.value.field == "35"


def test_empty_variable_field_round_trips() -> None:
    msg = Message("0200", {"2": "", "63": ""})
    assert CUP.decode(CUP.encode(msg)).fields == {"2": "", "63": ""}


# --- decode errors ---------------------------------------------------------------------------------


def decode_error(codec: Codec, body: bytes) -> CodecError:
    with pytest.raises(CodecError) as err:
        codec.decode(body)
    return err.value


def test_bcd_hex_nibble_in_numeric_field_is_rejected_with_offset() -> None:
    body = bytearray(bytes.fromhex(BALANCE_HEX))
    body[10] = 0x3A  # field 3 starts after MTI (2) + bitmap (8): "31" → "3A"
    err = decode_error(CUP, bytes(body))
    assert (err.field, err.offset) == ("3", 10)


def test_bad_pan_error_does_not_leak_the_pan() -> None:
    body = CUP.encode(Message("0200", {"2": PAN, "3": "000000"}))
    spoiled = body[:12] + b"\xab" + body[13:]  # a nibble A-F inside the PAN
    err = decode_error(CUP, spoiled)
    assert err.field == "2" and err.offset == 10
    for text in (str(err), repr(err), err.reason):
        assert PAN[:6] not in text and PAN[-4:] not in text


def test_ascii_numeric_field_with_letters_is_rejected() -> None:
    body = ISO87.encode(Message("0200", {"3": "000000", "4": "000000010000"}))
    spoiled = body.replace(b"000000010000", b"00000001000X")
    err = decode_error(ISO87, spoiled)
    assert (err.field, err.offset) == ("4", 4 + 16 + 6)


def test_track_with_letters_is_rejected() -> None:
    body = ISO87.encode(Message("0200", {"35": "6225885916163289=1703"}))
    err = decode_error(ISO87, body.replace(b"=1703", b"=17X3"))
    assert err.field == "35"
    assert "6225" not in str(err)


def test_cup_bitmap_with_bit_one_is_a_codec_error() -> None:
    body = bytearray(bytes.fromhex(SIGN_IN_HEX))
    body[2] |= 0x80
    err = decode_error(CUP, bytes(body))
    assert (err.field, err.offset) == ("p", 2)
    assert "secondary" in err.reason


def test_bitmap_naming_undefined_field_is_rejected() -> None:
    body = bytearray(bytes.fromhex(SIGN_IN_HEX))
    body[2 + 5] |= 0x08  # field 45: not in the CUP dialect
    err = decode_error(CUP, bytes(body))
    assert err.field == "p" and "45" in err.reason


def test_iso87_bitmap_bit_65_is_rejected() -> None:
    body = ISO87.encode(ISO87_MESSAGES[1])
    spoiled = body[:20] + b"8" + body[21:]  # secondary bitmap's first bit = field 65
    err = decode_error(ISO87, spoiled)
    assert (err.field, err.offset) == ("1", 20) and "65" in err.reason


@pytest.mark.parametrize("bitmap", [b"00200000 0000000", b"0020_00000000000", b"002000000000000G", b"+020000000000000"])
def test_iso87_non_hex_bitmap_is_rejected(bitmap: bytes) -> None:
    err = decode_error(ISO87, b"0800" + bitmap + b"000001")
    assert (err.field, err.offset) == ("p", 4)


@pytest.mark.parametrize("mti", [b"\x09\x00", b"\x0a\x00", b"\x07\x00", b"\x10\x00", b"\x02\x60"])
def test_cup_unknown_mti_is_rejected(mti: bytes) -> None:
    err = decode_error(CUP, mti + bytes.fromhex(SIGN_IN_HEX)[2:])
    assert (err.field, err.offset) == ("t", 0)


@pytest.mark.parametrize("mti", [b"02A0", b"0700", b"1200", b" 200", b"\xff200"])
def test_iso87_unknown_mti_is_rejected(mti: bytes) -> None:
    err = decode_error(ISO87, mti + b"0020000000000000000001")
    assert (err.field, err.offset) == ("t", 0)


def test_trailing_data_is_rejected() -> None:
    err = decode_error(CUP, bytes.fromhex(SIGN_IN_HEX) + b"\x00")
    assert "Extra data" in err.reason and err.offset == len(bytes.fromhex(SIGN_IN_HEX))


@pytest.mark.parametrize("cut", [0, 1, 2, 5, 10, 12, 20, -3, -1])
def test_truncated_body_is_rejected(cut: int) -> None:
    decode_error(CUP, bytes.fromhex(SIGN_IN_HEX)[:cut])


def test_length_over_maximum_is_rejected() -> None:
    body = bytearray(bytes.fromhex(BALANCE_HEX))
    index = bytes(body).index(bytes.fromhex("37" + TRACK2[:6]))
    body[index] = 0x39  # LL 39 > max 37
    err = decode_error(CUP, bytes(body))
    assert (err.field, err.offset) == ("35", index)


def test_invalid_bcd_length_is_rejected() -> None:
    body = bytearray(bytes.fromhex(SIGN_IN_HEX))
    index = bytes(body).index(bytes.fromhex("0011001234"))
    body[index + 1] = 0x1A
    err = decode_error(CUP, bytes(body))
    assert err.field == "60"


def test_non_ascii_text_field_is_rejected() -> None:
    body = bytes.fromhex(SIGN_IN_HEX).replace(b"12345678", b"1234567\xff", 1)
    err = decode_error(CUP, body)
    assert err.field == "41"


def test_bad_pad_nibble_is_rejected() -> None:
    body = bytes.fromhex(SIGN_IN_HEX).replace(bytes.fromhex("001234560030"), bytes.fromhex("00123456003F"))
    assert decode_error(CUP, body).field == "60"


def test_non_bytes_body() -> None:
    assert CUP.decode(bytearray(bytes.fromhex(SIGN_IN_HEX))).mti == "0800"
    assert CUP.decode(memoryview(bytes.fromhex(SIGN_IN_HEX))).mti == "0800"
    with pytest.raises(CodecError):
        CUP.decode(SIGN_IN_HEX)  # type: ignore[arg-type]


def test_xn_amount_is_checked() -> None:
    body = ISO87.encode(Message("0200", {"28": "C00000100"}))
    assert decode_error(ISO87, body.replace(b"C00000100", b"X00000100")).field == "28"


# --- encode errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("codec", "mti", "fields", "field"),
    [
        (CUP, "0200", {"45": "x"}, "45"),  # not defined in the dialect
        (CUP, "0200", {"70": "301"}, "70"),  # no secondary bitmap in CUP
        (ISO87, "0200", {"65": "1"}, "65"),
        (ISO87, "0200", {"t": "0200"}, "t"),
        (CUP, "0200", {"3": "31000A"}, "3"),  # hex letter in BCD numeric
        (CUP, "0200", {"3": "３１００００"}, "3"),  # full-width digits are not ASCII digits
        (CUP, "0200", {"3": "31000"}, "3"),  # wrong fixed length
        (CUP, "0200", {"2": "1" * 20}, "2"),  # over max
        (CUP, "0200", {"35": "6225X1234"}, "35"),
        (CUP, "0200", {"52": "0123456789ABCDEG"}, "52"),
        (CUP, "0200", {"64": "0A1B2C3D"}, "64"),  # 4 bytes: field 64 is 8
        (CUP, "0200", {"64": "303132333435363Z"}, "64"),  # not hex
        (ISO87, "0200", {"52": "0123456789ABCDEG"}, "52"),
        (ISO87, "0200", {"41": "1234567é"}, "41"),  # not ASCII
        (ISO87, "0200", {"28": "100000000"}, "28"),
        (CUP, "0200", {"3": 310000}, "3"),  # not a string
        (CUP, "0200", {"41": "\ud800" * 8}, "41"),  # lone surrogate
        (CUP, "02000", {"3": "310000"}, "t"),
        (CUP, "0900", {"3": "310000"}, "t"),
        (ISO87, "02a0", {"3": "310000"}, "t"),
    ],
)
def test_encode_errors_name_the_field(codec: Codec, mti: str, fields: dict, field: str) -> None:
    with pytest.raises(CodecError) as err:
        codec.encode(Message(mti, fields))
    assert err.value.field == field
    assert err.value.offset is None


def test_encode_error_text_has_no_field_data() -> None:
    with pytest.raises(CodecError) as err:
        CUP.encode(Message("0200", {"2": PAN + "1", "3": "000000"}))
    assert err.value.field == "2"
    assert PAN not in str(err.value) and PAN[:6] not in str(err.value)


def test_non_string_mti() -> None:
    with pytest.raises(CodecError) as err:
        CUP.encode(Message(["0200"], {"3": "000000"}))  # type: ignore[arg-type]
    assert err.value.field == "t"


@pytest.mark.parametrize("prefix", [b"+9", b" 9", b"9 ", b"_9"])
def test_iso87_length_prefix_must_be_digits(prefix: bytes) -> None:
    # pyiso8583 parses prefixes with int(), which would take all of these as 9
    err = decode_error(ISO87, b"0200" + b"4000000000000000" + prefix + b"123456789")
    assert (err.field, err.offset) == ("2", 20)
    assert ISO87.decode(b"0200" + b"4000000000000000" + b"09" + b"123456789")["2"] == "123456789"


# --- STAN allocation (field 11 of messages the gateway originates) -------------------------------


def test_stan_sequence_wraps_to_one_and_never_issues_zero() -> None:
    stans = StanAllocator()
    assert stans.last is None
    assert [stans.next() for _ in range(3)] == [1, 2, 3]
    assert stans.last == 3
    near_end = StanAllocator(999_998)
    assert [near_end.next() for _ in range(4)] == [999_998, 999_999, 1, 2]
    full_cycle = StanAllocator()
    seen = {full_cycle.next() for _ in range(999_999)}
    assert len(seen) == 999_999 and 0 not in seen and full_cycle.next() == 1


def test_stan_format_and_limits() -> None:
    assert StanAllocator.format(42) == "000042"
    assert StanAllocator().format(999_999) == "999999"
    msg = Message("0800", {"11": StanAllocator.format(StanAllocator(7).next()), "70": "301"})
    assert ISO87.decode(ISO87.encode(msg))["11"] == "000007"
    for bad in (0, 1_000_000, -1):
        with pytest.raises(ValueError):
            StanAllocator.format(bad)
        with pytest.raises(ValueError):
            StanAllocator(bad)
