"""Every check of tests/test_codec.py, run on the pure-Python codec (`PureCodec`) in this process.

`Codec` picks the compiled codec wherever it is built, so test_codec.py alone never runs the pure
walker: a bug there (the specification, the oracle of the differential tests and the fallback on a
machine without a C compiler) would go unnoticed, which is what mutation testing (issue 16) showed.
This module loads test_codec.py a second time with the import-time selection set to pure (as
`GATEWAY_CODEC=pure` does, but in process), so the same promises are asserted of both codecs; the
tests below it cover what test_codec.py does not reach in the pure walker.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from gateway.iso import _compiled
from gateway.iso.codec import Codec, PureCodec, codec_implementation
from gateway.iso.errors import CodecError
from gateway.iso.message import Message
from gateway.iso.spec import Dialect, load_dialect

#: the compiled codec class as the import-time selection found it (the fixture below hides it)
_COMPILED = _compiled.COMPILED


def _load_pure_copy() -> ModuleType:
    source = Path(__file__).with_name("test_codec.py")
    spec = importlib.util.spec_from_file_location("test_codec_on_pure", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    saved = _compiled.COMPILED
    _compiled.COMPILED = None  # the selection `Codec(...)` consults: what GATEWAY_CODEC=pure yields
    try:
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    finally:
        _compiled.COMPILED = saved
    return module


_pure = _load_pure_copy()
assert _pure.CUP.implementation == "pure" and _pure.ISO87.implementation == "pure"

# the same test functions (with their parametrisation, which names the pure codecs), collected here
globals().update({name: obj for name, obj in vars(_pure).items() if name.startswith("test_")})


@pytest.fixture(autouse=True)
def fresh_pure_codecs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets pure codecs built inside it, with empty plan caches: codecs built once at import
    would answer every later test from plans cached by the first, so a broken bitmap walk or check
    selection would go unseen. The objects are refilled in place because the parametrised tests hold
    them since collection."""
    monkeypatch.setattr(_compiled, "COMPILED", None)
    for name, dialect in (("CUP", "cup-pos"), ("ISO87", "iso87-ascii")):
        fresh = Codec(load_dialect(dialect))
        assert fresh.implementation == "pure"
        held = getattr(_pure, name)
        for slot in ("decode", "dialect", "encode", "implementation", "lenient"):
            setattr(held, slot, getattr(fresh, slot))


# --- what the pure codec promises beyond test_codec.py (mutation testing, issue 16) ---------------
#
# These build their codecs inside each test (PureCodec directly, or Codec with the selection set), so
# no plan cached by an earlier test can answer for the code under test.

PAN = "6225885916163289123"


def _fresh(name: str = "cup-pos", *, lenient: bool = False) -> PureCodec:
    return PureCodec(load_dialect(name), lenient=lenient)


def _decode_error(codec: PureCodec | Codec, body: object) -> tuple[str, str | None, int | None]:
    with pytest.raises(CodecError) as err:
        codec.decode(body)  # type: ignore[arg-type]
    return err.value.reason, err.value.field, err.value.offset


def _encode_error(codec: PureCodec | Codec, msg: object) -> tuple[str, str | None, int | None]:
    with pytest.raises(CodecError) as err:
        codec.encode(msg)  # type: ignore[arg-type]
    return err.value.reason, err.value.field, err.value.offset


#: the dialect the tests below need and neither shipped one has: no field 2, a variable-length x+n
#: amount, a BCD track (35) next to an ASCII one (36), and a variable-length field 53
MIXED_DIALECT = """
[dialect]
name = "mut-mixed"
default_framing = "len2"
mac_field = "64"
mac_wire_len = 8

[dialect.mti]
versions = ["0"]
classes = ["2", "8"]
functions = ["0", "1"]
origins = ["0"]

[fields]
h = { data_enc = "ascii", len_enc = "ascii", len_type = 0, max_len = 0 }
t = { data_enc = "ascii", len_enc = "ascii", len_type = 0, max_len = 4 }
p = { data_enc = "ascii", len_enc = "ascii", len_type = 0, max_len = 16 }
3 = { fmt = "n", data_enc = "ascii", len_enc = "ascii", len_type = 0, max_len = 6 }
28 = { fmt = "xn", data_enc = "ascii", len_enc = "ascii", len_type = 2, max_len = 17 }
35 = { fmt = "z", data_enc = "b", len_enc = "bcd", len_type = 1, max_len = 37, len_count = "nibbles", right_pad = "0" }
36 = { fmt = "z", data_enc = "ascii", len_enc = "ascii", len_type = 3, max_len = 104 }
53 = { fmt = "n", data_enc = "ascii", len_enc = "ascii", len_type = 2, max_len = 16 }
64 = { fmt = "b", data_enc = "b", len_enc = "b", len_type = 0, max_len = 8 }
"""


@pytest.fixture
def mixed(tmp_path: Path) -> Dialect:
    path = tmp_path / "mut-mixed.toml"
    path.write_text(MIXED_DIALECT)
    return load_dialect(str(path))


# --- every check's error: reason, field and offset ---------------------------------------------------
# The reason is what an operator reads (ValidationError and the logs carry it) and what the compiled
# codec must reproduce byte for byte; field and offset say where; none of it may carry field data.

ISO_HEAD = b"0200"


def _iso(bitmap: str, data: bytes) -> bytes:
    return ISO_HEAD + bitmap.encode() + data


DECODE_ERRORS = [
    # too short for an MTI: how long it was, at the MTI
    ("cup-pos", b"\x08", ("message is 1 bytes, too short for an MTI", "t", 0)),
    ("iso87-ascii", b"080", ("message is 3 bytes, too short for an MTI", "t", 0)),
    ("cup-pos", b"\x09\x00" + bytes(8), ("MTI is not a message type this dialect accepts", "t", 0)),
    # exactly an MTI's length: long enough, so it is the MTI that is wrong
    ("cup-pos", b"\x09\x00", ("MTI is not a message type this dialect accepts", "t", 0)),
    ("iso87-ascii", b"0900", ("MTI is not a message type this dialect accepts", "t", 0)),
    ("cup-pos", b"\x08\x00" + bytes.fromhex("8020000000000000") + bytes.fromhex("000001"),
     ("bitmap sets bit 1 but this dialect has no secondary bitmap", "p", 2)),
    # a bitmap cut short: at the bitmap's own offset, primary and secondary
    ("cup-pos", b"\x08\x00\x00\x20", ("bitmap is 2 bytes, expecting 8", "p", 2)),
    ("iso87-ascii", b"08000020", ("bitmap is 4 bytes, expecting 16", "p", 4)),
    ("iso87-ascii", b"0800" + b"8220000000000000" + b"0400", ("bitmap is 4 bytes, expecting 16", "1", 20)),
    ("iso87-ascii", b"0800" + b"002000000000000G" + b"000001", ("bitmap is not hexadecimal", "p", 4)),
    ("iso87-ascii", b"0800" + b"8220000000000000" + b"04000000000000G0",
     ("bitmap is not hexadecimal", "1", 20)),
    # the checks after pyiso8583's walk, each at its field's offset (MTI 4 + bitmap 16 = 20)
    ("iso87-ascii", _iso("4000000000000000", b" 9" + b"123456789"), ("length prefix is not decimal digits", "2", 20)),
    ("iso87-ascii", _iso("6000000000000000", b"04" + b"1234" + b"31000X"), ("non-digit in numeric field", "3", 26)),
    ("iso87-ascii", _iso("2000000020000000", b"310000" + b"096225=17X3"),
     ("track data holds characters other than digits and separator", "35", 26)),
    ("iso87-ascii", _iso("2000000000001000", b"310000" + b"0123456789ABCDEG"),
     ("binary field is not hexadecimal", "52", 26)),
    ("iso87-ascii", _iso("2000001000000000", b"310000" + b"X00000100"),
     ("amount must be C or D followed by digits", "28", 26)),
]


@pytest.mark.parametrize(("dialect", "body", "expected"), DECODE_ERRORS)
def test_decode_errors_say_what_and_where(dialect: str, body: bytes, expected: tuple[str, str, int]) -> None:
    assert _decode_error(_fresh(dialect), body) == expected


def test_a_body_that_is_not_bytes_is_named_by_its_type() -> None:
    assert _decode_error(_fresh(), "0800") == ("message body must be bytes, not str", None, None)
    assert _decode_error(_fresh(), None) == ("message body must be bytes, not NoneType", None, None)


ENCODE_ERRORS = [
    ("cup-pos", Message("0900", {"3": "310000"}), ("MTI is not a message type this dialect accepts", "t", None)),
    ("cup-pos", Message("0200", {"35": "6225X1234"}),
     ("track data holds characters other than digits and separator", "35", None)),
    ("iso87-ascii", Message("0200", {"52": "0123456789ABCDEG"}), ("binary field is not hexadecimal", "52", None)),
    # a binary (data_enc b) field is hex-parsed by pyiso8583 itself, which says so in its own words
    ("cup-pos", Message("0200", {"52": "0123456789ABCDEG"}), ("Failed to encode field, non-hex data", "52", None)),
    ("iso87-ascii", Message("0200", {"3": "31000A"}), ("non-digit in numeric field", "3", None)),
    ("iso87-ascii", Message("0200", {"28": "100000000"}), ("amount must be C or D followed by digits", "28", None)),
]


@pytest.mark.parametrize(("dialect", "msg", "expected"), ENCODE_ERRORS)
def test_encode_errors_say_what_and_which_field(dialect: str, msg: Message, expected: tuple) -> None:
    assert _encode_error(_fresh(dialect), msg) == expected


def test_of_several_bad_fields_the_first_on_the_wire_is_named() -> None:
    """Field 3 comes before field 11 on the wire (fields go in number order, not text order)."""
    codec = _fresh("iso87-ascii")
    body = codec.encode(Message("0200", {"3": "310000", "11": "000001"}))
    spoiled = body.replace(b"310000", b"31000X").replace(b"000001", b"00000X")
    assert _decode_error(codec, spoiled) == ("non-digit in numeric field", "3", 20)
    assert _encode_error(codec, Message("0200", {"3": "31000X", "11": "00000X"}))[1] == "3"


# --- x+n amounts: strict on the live path, lenient for imports ----------------------------------------


@pytest.mark.parametrize("value", ["C00000100", "D00000100"])
def test_strict_xn_takes_a_credit_or_debit_sign(value: str) -> None:
    codec = _fresh("iso87-ascii")
    assert codec.decode(codec.encode(Message("0200", {"28": value})))["28"] == value


@pytest.mark.parametrize("value", ["000000100", "X00000100", "CC0000100", "C0000010X", "CX0000100"])
def test_strict_xn_refuses_anything_but_sign_then_digits(value: str) -> None:
    strict = PureCodec(load_dialect("iso87-ascii"))  # strict unless lenient is asked for
    error = ("amount must be C or D followed by digits", "28", None)
    assert _encode_error(strict, Message("0200", {"28": value})) == error
    assert _encode_error(Codec(load_dialect("iso87-ascii")), Message("0200", {"28": value})) == error
    wire = _fresh("iso87-ascii", lenient=True).encode(Message("0200", {"28": "C00000100"}))
    assert _decode_error(strict, wire.replace(b"C00000100", value.encode())) == (error[0], "28", 20)


def test_lenient_xn_takes_any_sign_but_still_digits_after_it() -> None:
    lenient = _fresh("iso87-ascii", lenient=True)
    for value in ("000000100", "X00000100", "C00000100"):  # jPOS's 1987 image carries '0' there
        assert lenient.decode(lenient.encode(Message("0200", {"28": value})))["28"] == value
    for value in ("0000001X0", "CC0000100"):
        assert _encode_error(lenient, Message("0200", {"28": value}))[1] == "28"


def test_an_xn_amount_needs_a_digit_after_its_sign(mixed: Dialect) -> None:
    """With a variable-length x+n field, a lone sign is a length-1 value pyiso8583 would carry."""
    for lenient in (False, True):
        codec = PureCodec(mixed, lenient=lenient)
        assert _encode_error(codec, Message("0200", {"28": "C"})) == (
            "amount must be C or D followed by digits", "28", None)
        assert codec.encode(Message("0200", {"28": "C1"})).endswith(b"02C1")


def test_codec_passes_lenient_to_the_pure_codec() -> None:
    codec = Codec(load_dialect("iso87-ascii"), lenient=True)  # the fixture has made the selection pure
    assert codec.implementation == "pure" and codec.lenient
    assert codec.decode(codec.encode(Message("0200", {"28": "000000100"})))["28"] == "000000100"


# --- bitmaps and the plan cache ---------------------------------------------------------------------


def test_a_message_with_a_secondary_bitmap_still_checks_its_primary_fields() -> None:
    codec = _fresh("iso87-ascii")
    good = codec.encode(Message("0420", {"2": PAN, "11": "000004", "90": "0" * 42}))
    assert codec.decode(good)["2"] == PAN
    bad_pan = good.replace(PAN.encode(), PAN[:-1].encode() + b"X")
    assert _decode_error(codec, bad_pan) == ("non-digit in numeric field", "2", 36)
    assert good[57:63] == b"000004"  # field 11, after MTI, both bitmaps and the LL PAN
    bad_stan = good[:57] + b"00000X" + good[63:]
    assert _decode_error(codec, bad_stan)[:2] == ("non-digit in numeric field", "11")


def test_a_cached_plan_is_keyed_by_both_bitmaps() -> None:
    """Two messages with the same primary bitmap but different secondary fields: the second must get
    the checks of its own secondary fields, not the plan cached for the first. (The first is 48 bytes
    long, so a key cut from the wrong end of the body would be exactly its primary bitmap.)"""
    codec = _fresh("iso87-ascii")
    first = codec.encode(Message("0800", {"11": "000001", "24": "001", "70": "301"}))
    assert len(first) == 48
    assert codec.decode(first)["70"] == "301"
    second = codec.encode(Message("0800", {"11": "000001", "24": "001", "96": "FEDCBA9876543210"}))
    assert first[4:20] == second[4:20] and first[20:36] != second[20:36]
    spoiled = second.replace(b"FEDCBA9876543210", b"FEDCBA987654321G")
    assert _decode_error(codec, spoiled) == ("binary field is not hexadecimal", "96", 45)


def test_a_dialect_without_field_2_refuses_a_bitmap_naming_it(mixed: Dialect) -> None:
    codec = PureCodec(mixed)
    assert _decode_error(codec, b"0200" + b"6000000000000000" + b"0499999931000") == (
        "bitmap names field 2, which the dialect does not define", "p", 4)


def test_a_secondary_bitmap_error_names_the_first_undefined_field(tmp_path: Path) -> None:
    """In a dialect that leaves gaps in 66..128 the error names the undefined field the bitmap sets."""
    path = tmp_path / "mut-gaps.toml"
    path.write_text(MIXED_DIALECT.replace('name = "mut-mixed"', 'name = "mut-gaps"').replace(
        'p = { data_enc = "ascii", len_enc = "ascii", len_type = 0, max_len = 16 }',
        'p = { data_enc = "ascii", len_enc = "ascii", len_type = 0, max_len = 16 }\n'
        '1 = { data_enc = "ascii", len_enc = "ascii", len_type = 0, max_len = 16 }\n'
        '70 = { fmt = "n", data_enc = "ascii", len_enc = "ascii", len_type = 0, max_len = 3 }'))
    codec = PureCodec(load_dialect(str(path)))
    good = codec.encode(Message("0800", {"3": "990000", "70": "301"}))
    assert good[4:36] == b"A000000000000000" + b"0400000000000000"
    spoiled = good[:20] + b"0000004000000000" + good[36:]  # field 90 instead of 70
    assert _decode_error(codec, spoiled) == ("bitmap names field 90, which the dialect does not define", "1", 20)


# --- tracks: clear, separators, TDK-encrypted ----------------------------------------------------------

CIPHER_TRACK = "62258859D" + "9A3F00C1E2B47D58" + "7"  # TDK-encrypted window holds hex letters


def test_clear_track_2_next_to_encrypted_track_3() -> None:
    """53.3 = '1' lets hex through where the track is encrypted; the clear track beside it is still
    a track (digits and separator), in both directions."""
    codec = _fresh()
    clear = "6225885916163289D17032010000000000000"
    fields = {"35": clear, "36": "99" + CIPHER_TRACK, "53": "2610000000000000"}
    body = codec.encode(Message("0200", fields))
    assert codec.decode(body).fields == fields
    # the same frame with 53.3 = '0': the encrypted track 36 is refused, at its own offset
    flag_on, flag_off = bytes.fromhex("2610000000000000"), bytes.fromhex("2600000000000000")
    assert body.count(flag_on) == 1
    spoiled = body.replace(flag_on, flag_off)
    track_3 = body.index(bytes.fromhex("0028" + "99" + CIPHER_TRACK[:8]))
    assert _decode_error(codec, spoiled) == (
        "track data holds characters other than digits and separator", "36", track_3)
    # and with 53.3 = '1' a clear track still may not hold what a cipher would
    with pytest.raises(CodecError) as err:
        codec.encode(Message("0200", {**fields, "35": "6225885916163289=1703X"}))
    assert err.value.field == "35"


def test_a_tdk_track_next_to_a_short_field_53(mixed: Dialect) -> None:
    """Field 53 may be shorter in a dialect that makes it variable: three positions are enough to
    say the track is encrypted."""
    codec = PureCodec(mixed)
    msg = Message("0200", {"35": CIPHER_TRACK, "53": "261"})
    assert codec.decode(codec.encode(msg)).fields == msg.fields
    assert _encode_error(codec, Message("0200", {"35": CIPHER_TRACK, "53": "26"}))[1] == "35"


def test_only_a_bcd_track_sends_its_separator_as_nibble_d(mixed: Dialect) -> None:
    """In one message, '=' becomes nibble D in the BCD track (35) but stays '=' in the ASCII one (36)."""
    codec = PureCodec(mixed)
    body = codec.encode(Message("0200", {"35": "6225885916163289=1703", "36": "6225885916163289=1703"}))
    assert body.endswith(b"0216225885916163289=1703")
    assert bytes.fromhex("216225885916163289D17030") in body
    assert codec.decode(body).fields == {"35": "6225885916163289D1703", "36": "6225885916163289=1703"}


# --- keys and values of the wrong kind ---------------------------------------------------------------


def test_unknown_field_keys_are_named_only_when_short_strings() -> None:
    """An undefined key is named when it is a short string; a long one (it could be a PAN pasted in
    the wrong place) or a non-string is named by its type, so no error text carries it."""
    codec = _fresh()
    assert _encode_error(codec, Message("0200", {"12345678": "1"})) == (
        "field 12345678 is not defined in dialect cup-pos", "12345678", None)
    assert _encode_error(codec, Message("0200", {"123456789": "1"})) == (
        "field str is not defined in dialect cup-pos", "str", None)
    err = _encode_error(codec, Message("0200", {PAN: "1"}))
    assert PAN not in str(err) and err[1] == "str"
    assert _encode_error(codec, Message("0200", {3: "310000"})) == (  # type: ignore[dict-item]
        "field int is not defined in dialect cup-pos", "int", None)


class _Unreadable(dict[str, str]):
    """A mapping that lists its keys but fails to give a value (a broken caller's object)."""

    def __iter__(self) -> Iterator[str]:  # not dict's own: `{**m}` then goes through __getitem__
        return iter(list(dict.keys(self)))

    def __getitem__(self, key: str) -> str:
        raise RuntimeError("no value")


@pytest.mark.parametrize(
    ("msg", "expected"),
    [
        (Message("0200", None), ("message fields must be a dict of strings", None, None)),  # type: ignore[arg-type]
        (object(), ("message fields must be a dict of strings", None, None)),
        (Message(["0200"], {"3": "310000"}), ("MTI must be a string", "t", None)),  # type: ignore[arg-type]
        (Message("0200", {"3": 310000}), ("value is int, not str", "3", None)),  # type: ignore[dict-item]
        (Message("0200", {"3": "\ud800" * 6}), ("value is not valid text", "3", None)),
        (Message("0200", _Unreadable({"3": "310000"})), ("message cannot be encoded", None, None)),
    ],
)
def test_anything_unexpected_becomes_a_codec_error_naming_the_culprit(msg: object, expected: tuple) -> None:
    assert _encode_error(_fresh(), msg) == expected


# --- which codec runs -------------------------------------------------------------------------------------


def test_the_selection_names_the_pure_codec_and_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_compiled, "COMPILED", None)
    monkeypatch.setattr(_compiled, "WHY_NOT", "GATEWAY_CODEC=pure")
    assert codec_implementation() == "pure-python (pyiso8583; GATEWAY_CODEC=pure)"
    codec = Codec(load_dialect("cup-pos"))
    assert codec.implementation == "pure" and repr(codec) == "Codec('cup-pos', pure)"
    assert repr(Codec(load_dialect("iso87-ascii"), lenient=True)) == "Codec('iso87-ascii', pure, lenient)"
    # asking for the compiled codec where there is none is an error that says why, not a silent fallback
    with pytest.raises(RuntimeError) as err:
        Codec(load_dialect("cup-pos"), implementation="compiled")
    assert str(err.value) == "no compiled codec for dialect cup-pos: GATEWAY_CODEC=pure"
    assert Codec(load_dialect("cup-pos"), implementation="pure").implementation == "pure"
    with pytest.raises(ValueError, match="implementation must be 'pure' or 'compiled', not 'PURE'"):
        Codec(load_dialect("cup-pos"), implementation="PURE")


@pytest.mark.skipif(_COMPILED is None, reason=f"compiled codec not built here: {_compiled.WHY_NOT}")
def test_the_selection_takes_the_compiled_codec_where_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_compiled, "COMPILED", _COMPILED)
    assert codec_implementation() == "compiled (C extension gateway.iso._ccodec)"
    for implementation in (None, "compiled"):
        codec = Codec(load_dialect("cup-pos"), implementation=implementation)
        assert codec.implementation == "compiled" and repr(codec) == "Codec('cup-pos', compiled)"
        assert not isinstance(getattr(codec.decode, "__self__", None), PureCodec)
    pure = Codec(load_dialect("cup-pos"), implementation="pure")
    assert pure.implementation == "pure" and isinstance(pure.decode.__self__, PureCodec)  # type: ignore[attr-defined]
    # a lenient compiled codec is lenient too
    lenient = Codec(load_dialect("iso87-ascii"), lenient=True, implementation="compiled")
    assert lenient.decode(lenient.encode(Message("0200", {"28": "000000100"})))["28"] == "000000100"
