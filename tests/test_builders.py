"""Message builders of both dialects and the response builder: each builds what the reference says
(field by field), validates clean, and refuses bad input with a typed error naming the field."""

from __future__ import annotations

import pytest

from gateway.iso.build import OriginalData, TerminalIdent, cup, iso87, response, security_control
from gateway.iso.errors import ValidationError
from gateway.iso.message import Message
from gateway.iso.totals import BatchItem, CardTotals, SettlementTotals
from gateway.iso.validate import identify, validate

CUP = "cup-pos"
ISO = "iso87-ascii"
T = TerminalIdent("POS00001", "898440353110001")
PAN = "6225880123456789"
TRACK2 = PAN + "=2412101123456"
PIN = "0123456789abcdef"
ICC = "9F2608A1B2C3D4E5F607089F2701809F10070601"
DT = "0315103000"
ACQ = "1234"


def _clean(dialect: str, msg: Message, flow: str) -> Message:
    found = identify(dialect, msg)
    assert found is not None and found.name == flow
    assert validate(dialect, msg) == []
    return msg


# --- CUP: management -------------------------------------------------------------------------------


def test_cup_sign_in() -> None:
    msg = _clean(CUP, cup.sign_in(T, "000011", "000123"), "sign_in")
    assert msg.mti == "0800"
    assert msg.fields == {
        "11": "000011",
        "41": "POS00001",
        "42": "898440353110001",
        "60": "00000123004",
        "63": "01 ",
    }
    assert cup.sign_in(T, "000011", "000123", key_mode="001", operator="7")["60"][-3:] == "001"
    assert cup.sign_in(T, "000011", "000123", operator="7")["63"] == "7  "
    with pytest.raises(ValidationError) as info:
        cup.sign_in(T, "000011", "000123", key_mode="002")
    assert info.value.field == "60.3"


def test_cup_sign_off_and_echo() -> None:
    off = _clean(CUP, cup.sign_off(T, "000012", "000123"), "sign_off")
    assert (off.mti, off["60"]) == ("0820", "00000123002")
    ping = _clean(CUP, cup.echo(T, "000123"), "echo")
    assert (ping.mti, ping["60"]) == ("0820", "00000123301")
    assert "11" not in ping  # LY sends no STAN with an echo test
    assert "64" not in off and "64" not in ping


def test_cup_settlement() -> None:
    totals = SettlementTotals(CardTotals(150000, 3, 20000, 1))
    msg = _clean(CUP, cup.settlement(T, "000050", "000123", totals), "settlement")
    assert msg.mti == "0500"
    assert SettlementTotals.from_field48(msg["48"]) == totals
    assert (msg["49"], msg["60"], msg["63"]) == ("156", "00000123201", "01 ")
    assert "3" not in msg and "64" not in msg


def test_cup_batch_upload_and_end() -> None:
    items = [BatchItem("00", f"{i:06d}", PAN, 1000 + i) for i in range(1, 9)]
    up = _clean(CUP, cup.batch_upload(T, "000051", "000123", items), "batch_upload")
    assert (up.mti, up["60"], up["48"][:2]) == ("0320", "00000123201", "08")
    with pytest.raises(ValidationError) as info:
        cup.batch_upload(T, "000051", "000123", [*items, items[0]])
    assert info.value.field == "48"
    balanced = _clean(CUP, cup.batch_upload_end(T, "000052", "000123", 42, True), "batch_upload_end")
    assert (balanced["48"], balanced["60"]) == ("0042", "00000123207")
    assert cup.batch_upload_end(T, "000052", "000123", 42, False)["60"] == "00000123202"


# --- CUP: financial --------------------------------------------------------------------------------


def test_cup_purchase_swipe_with_pin() -> None:
    msg = _clean(
        CUP,
        cup.purchase(T, "000101", "000123", 12345, track2=TRACK2, pin_block=PIN, expiry="2412"),
        "purchase",
    )
    assert msg.mti == "0200"
    assert (msg["3"], msg["4"], msg["22"], msg["25"]) == ("000000", "000000012345", "021", "00")
    assert msg["35"] == PAN + "D2412101123456"  # BCD track data: '=' travels as nibble D
    assert (msg["26"], msg["52"], msg["53"]) == ("12", PIN.upper(), "2600000000000000")
    assert (msg["49"], msg["60"]) == ("156", "2200012300050")
    assert msg["64"] == "0" * 16


def test_cup_purchase_without_pin_has_no_pin_fields() -> None:
    msg = _clean(
        CUP,
        cup.purchase(
            T,
            "000102",
            "000123",
            1,
            pan=PAN,
            entry_mode="052",
            card_seq="001",
            icc=ICC.lower(),
            fallback=False,
        ),
        "purchase",
    )
    assert not {"26", "52", "53"} & set(msg.fields)
    assert (msg["2"], msg["23"], msg["55"]) == (PAN, "001", ICC)


def test_cup_purchase_security_control_variants() -> None:
    assert security_control() == "2600000000000000"
    assert security_control(pin_with_pan=False, triple_des=False, track_encrypted=True) == "1010000000000000"
    ciphertext = "6225880123456789A1B2C3D4E5F60718"  # TDK-encrypted nibbles: no separator left
    encrypted = _clean(
        CUP,
        cup.purchase(
            T,
            "000103",
            "000123",
            1,
            track2=ciphertext,
            security_control=security_control(track_encrypted=True),
        ),
        "purchase",
    )
    assert encrypted["53"] == "2610000000000000" and "52" not in encrypted
    assert encrypted["35"] == ciphertext
    with pytest.raises(ValidationError):
        cup.purchase(T, "000103", "000123", 1, track2=ciphertext)  # not flagged as encrypted
    fallback = cup.purchase(T, "000104", "000123", 1, track2=TRACK2, fallback=True, read_capability="6")
    assert fallback["60"] == "2200012300062"


def test_cup_void() -> None:
    msg = _clean(
        CUP,
        cup.void(
            T,
            "000105",
            "000123",
            12345,
            orig_rrn="123456789012",
            orig_batch="000123",
            orig_trace="000101",
            orig_auth="AB12",
            track2=TRACK2,
        ),
        "void",
    )
    assert (msg.mti, msg["3"], msg["60"][:2]) == ("0200", "200000", "23")
    assert (msg["37"], msg["38"], msg["61"]) == ("123456789012", "AB12  ", "000123000101")
    assert msg["64"] == "0" * 16


def test_cup_refund() -> None:
    msg = _clean(
        CUP,
        cup.refund(
            T,
            "000106",
            "000123",
            500,
            orig_rrn="123456789012",
            orig_date="0314",
            orig_batch="000122",
            orig_trace="000077",
            card_org="CUP",
            pan=PAN,
        ),
        "refund",
    )
    assert (msg.mti, msg["3"], msg["60"][:2]) == ("0220", "200000", "25")
    assert (msg["37"], msg["61"], msg["63"]) == ("123456789012", "0001220000770314", "CUP")
    unknown = cup.refund(T, "000107", "000123", 500, orig_rrn="123456789012", orig_date="0314", pan=PAN)
    assert (unknown["61"], unknown["63"]) == ("0000000000000314", "000")


def test_cup_balance_inquiry() -> None:
    msg = _clean(
        CUP, cup.balance_inquiry(T, "000108", "000123", track2=TRACK2, pin_block=PIN), "balance_inquiry"
    )
    assert (msg["3"], msg["60"][:2]) == ("310000", "01")
    assert "4" not in msg and msg["64"] == "0" * 16


def _full_purchase() -> Message:
    msg = cup.purchase(
        T,
        "000201",
        "000123",
        999,
        pan=PAN,
        track2=TRACK2,
        expiry="2412",
        card_seq="001",
        pin_block=PIN,
        icc=ICC,
        entry_mode="051",
    )
    # vendor fields a terminal may add; a reversal must not carry them either
    msg.fields["36"] = "1234"
    msg.fields["62"] = "0102"
    msg.fields["63"] = "01 "
    return msg


def test_cup_reversal_copies_and_drops_exactly_the_reference_fields() -> None:
    original = _full_purchase()
    rev = _clean(CUP, cup.reversal(original, "98"), "reversal")
    assert rev.mti == "0400"
    kept = {"2", "3", "4", "11", "14", "22", "23", "25", "41", "42", "49", "55", "60"}
    assert set(rev.fields) == kept | {"39", "64"}
    for k in kept:
        assert rev[k] == original[k]
    assert (rev["39"], rev["64"]) == ("98", "0" * 16)
    with_auth = cup.reversal(original, "96", auth_code="123456", icc="9F2701")
    assert (with_auth["38"], with_auth["55"]) == ("123456", "9F2701")


def test_cup_reversal_of_a_void_keeps_61() -> None:
    void = cup.void(
        T,
        "000202",
        "000123",
        5,
        orig_rrn="123456789012",
        orig_batch="000123",
        orig_trace="000201",
        pan=PAN,
        pin_block=PIN,
    )
    rev = _clean(CUP, cup.reversal(void, "A0"), "void_reversal")
    assert rev["61"] == "000123000201" and rev["3"] == "200000"
    assert not {"37", "52", "53", "26"} & set(rev.fields)


@pytest.mark.parametrize(
    "original",
    [
        cup.refund(T, "000203", "000123", 5, orig_rrn="123456789012", orig_date="0314", pan=PAN),
        cup.balance_inquiry(T, "000204", "000123", pan=PAN),
        cup.sign_in(T, "000205", "000123"),
        Message("0210", {"3": "000000", "60": "2200012300050"}),
    ],
)
def test_cup_reversal_refuses_what_is_not_reversible(original: Message) -> None:
    with pytest.raises(ValidationError) as info:
        cup.reversal(original, "98")
    assert info.value.field == "t"


def test_cup_reversal_reason_must_be_a_reversal_reason() -> None:
    with pytest.raises(ValidationError) as info:
        cup.reversal(_full_purchase(), "00")
    assert info.value.field == "39"


# --- ISO 8583:1987 ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "flow", "nmic"),
    [(iso87.sign_on, "sign_on", "001"), (iso87.sign_off, "sign_off", "002"), (iso87.echo, "echo", "301")],
)
def test_iso87_network_management(build: object, flow: str, nmic: str) -> None:
    msg = build("000001", DT, ACQ)  # type: ignore[operator]
    _clean(ISO, msg, flow)
    assert msg.mti == "0800"
    assert msg.fields == {"7": DT, "11": "000001", "32": ACQ, "70": nmic}


def test_iso87_key_request_and_response() -> None:
    req = _clean(ISO, iso87.key_request("000002", DT, "ZAK", ACQ), "key_request")
    assert (req["70"], req["53"][:2]) == ("101", "26")
    assert iso87.requested_key_type(req) == "ZAK"
    assert iso87.requested_key_type(iso87.key_request("000003", DT, "ZPK"))[:3] == "ZPK"
    key, kcv = bytes(range(16)), bytes.fromhex("A1B2C3D4")
    answer = iso87.key_response(req, key, kcv)
    assert answer.mti == "0810" and validate(ISO, answer) == []
    assert (answer["53"], answer["70"], answer["11"], answer["7"]) == (req["53"], "101", "000002", DT)
    assert iso87.parse_key_response(answer) == (key, kcv)
    refused = iso87.key_response(req, key, kcv, rc="96")
    assert "48" not in refused and validate(ISO, refused) == []
    with pytest.raises(ValidationError) as info:
        iso87.parse_key_response(refused)
    assert info.value.field == "48"
    with pytest.raises(ValidationError):
        iso87.key_request("000002", DT, "TMK")


def test_iso87_key_exchange_with_the_security_module() -> None:
    from gateway.security.keyblock import make_zone_key_under_zmk, unwrap_zone_key

    zmk = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
    clear, under_zmk, kcv = make_zone_key_under_zmk(zmk, 16, 4)
    answer = iso87.key_response(iso87.key_request("000005", DT, "ZPK", ACQ), under_zmk, kcv)
    assert clear.hex().upper() not in answer["48"]  # only the ZMK-encrypted form travels
    received, received_kcv = iso87.parse_key_response(answer)
    assert unwrap_zone_key(zmk, received, received_kcv).check_value(4) == kcv


def test_iso87_purchase() -> None:
    msg = _clean(
        ISO,
        iso87.purchase(T, "000010", DT, ACQ, 12345, track2=TRACK2, pin_block=PIN, local_dt="0315183000"),
        "purchase",
    )
    assert msg.mti == "0200"
    assert (msg["3"], msg["4"], msg["7"], msg["11"]) == ("000000", "000000012345", DT, "000010")
    assert (msg["12"], msg["13"], msg["25"], msg["32"]) == ("183000", "0315", "00", ACQ)
    assert msg["35"] == TRACK2  # ASCII track data keeps '='
    assert (msg["52"], msg["53"]) == (PIN.upper(), "2600000000000000")
    assert "26" not in msg
    assert msg["64"] == "0" * 16
    assert iso87.purchase(T, "000010", DT, ACQ, 1, pan=PAN)["12"] == "103000"  # local time defaults to 7


def test_iso87_refund_void_balance() -> None:
    original = iso87.purchase(T, "000020", DT, ACQ, 700, pan=PAN)
    orig = OriginalData.from_request(original)
    refund = _clean(ISO, iso87.refund(T, "000021", DT, ACQ, 300, original=orig, pan=PAN), "refund")
    assert refund["3"] == "200000" and refund["90"] == "0200000020" + DT + "00000001234" + "0" * 11
    assert refund["128"] == "0" * 16 and "64" not in refund
    by_rrn = _clean(ISO, iso87.refund(T, "000022", DT, ACQ, 300, orig_rrn="123456789012", pan=PAN), "refund")
    assert by_rrn["37"] == "123456789012" and "90" not in by_rrn and by_rrn["64"] == "0" * 16
    with pytest.raises(ValidationError) as info:
        iso87.refund(T, "000023", DT, ACQ, 300, pan=PAN)
    assert info.value.field == "90/37"
    void = _clean(ISO, iso87.void(T, "000024", DT, ACQ, 700, orig, orig_auth="A1", pan=PAN), "void")
    assert (void["3"], void["90"], void["38"]) == ("020000", refund["90"], "A1    ")
    balance = _clean(ISO, iso87.balance_inquiry(T, "000025", DT, ACQ, pan=PAN), "balance_inquiry")
    assert balance["3"] == "310000" and "4" not in balance


def test_original_data_elements() -> None:
    orig = OriginalData("0200", "000123", DT, "1234", "99")
    value = orig.pack()
    assert value == "0200" + "000123" + DT + "00000001234" + "00000000099"
    assert OriginalData.parse(value) == OriginalData("0200", "000123", DT, "00000001234", "00000000099")
    with pytest.raises(ValidationError) as info:
        OriginalData.from_request(Message("0200", {"11": "000001", "32": ACQ}))
    assert info.value.field == "7"
    with pytest.raises(ValidationError):
        OriginalData("0200", "12345", DT, "1234").pack()


def test_iso87_reversal_and_repeat() -> None:
    original = iso87.purchase(T, "000030", DT, ACQ, 700, track2=TRACK2, pin_block=PIN, icc=ICC)
    original.fields["33"] = "77"
    rev = _clean(ISO, iso87.reversal(original, "68"), "reversal")
    assert rev.mti == "0400"
    assert rev["90"] == "0200" + "000030" + DT + "00000001234" + "00000000077"
    # 90 brings a secondary bitmap, so the MAC (the last field) moves from 64 to 128
    assert rev["39"] == "68" and rev["128"] == "0" * 16 and "64" not in rev
    assert not {"35", "52", "53", "26"} & set(rev.fields)
    for k in ("3", "4", "22", "25", "32", "41", "42", "49", "55"):
        assert rev[k] == original[k]
    repeat = _clean(ISO, iso87.reversal(original, "68", repeat=True), "reversal")
    assert repeat.mti == "0401" and repeat["90"] == rev["90"]
    with pytest.raises(ValidationError):
        iso87.reversal(iso87.balance_inquiry(T, "000031", DT, ACQ, pan=PAN), "68")


# --- responses -------------------------------------------------------------------------------------


def test_cup_purchase_responses_and_mac_rule() -> None:
    req = cup.purchase(T, "000301", "000123", 500, pan=PAN, pin_block=PIN, expiry="2412")
    extra = {"field_12": "103000", "field_13": "0315", "field_32": "12345", "field_37": "000000000301"}
    ok = response(req, "00", CUP, **extra)
    assert ok.mti == "0210" and validate(CUP, ok) == []
    for k in ("2", "3", "4", "11", "14", "25", "41", "42", "49", "60"):
        assert ok[k] == req[k]
    assert not {"22", "26", "52", "53"} & set(ok.fields)  # request-only fields are not echoed
    assert ok["64"] == "0" * 16
    declined = response(req, "51", CUP)
    assert "64" not in declined and validate(CUP, declined) == []
    mac_failure = response(req, "A0", CUP)
    assert "64" not in mac_failure


def test_cup_responses_for_management_flows() -> None:
    sign_in = cup.sign_in(T, "000302", "000123")
    keys = "AB" * 60
    ok = response(
        sign_in,
        "00",
        CUP,
        field_12="103000",
        field_13="0315",
        field_32="12345",
        field_37="000000000302",
        field_60="00000124004",
        field_62=keys,
    )
    assert ok.mti == "0810" and validate(CUP, ok) == []
    assert (ok["60"], ok["62"], ok["11"]) == ("00000124004", keys, "000302")
    assert "63" not in ok and "64" not in ok
    ping = cup.echo(T, "000123")
    pong = response(ping, "00", CUP)
    assert pong.mti == "0830" and "11" not in pong and validate(CUP, pong) == []
    settle = cup.settlement(T, "000303", "000123", SettlementTotals(CardTotals(10, 1)))
    verdict = SettlementTotals.from_field48(settle["48"]).reconciled(SettlementTotals(CardTotals(10, 1)))
    answer = response(settle, "00", CUP, field_12="103000", field_13="0315", field_48=verdict.to_field48())
    assert validate(CUP, answer) == [] and SettlementTotals.from_field48(answer["48"]).balanced


def test_response_to_an_unsupported_request_uses_the_default_echo() -> None:
    odd = Message(
        "0200",
        {
            "3": "990000",
            "11": "000001",
            "41": T.terminal_id,
            "42": T.merchant_id,
            "60": "9900012300050",
            "64": "0" * 16,
            "52": PIN.upper(),
        },
    )
    answer = response(odd, "40", CUP)
    assert answer.mti == "0210"
    assert answer.fields == {
        "3": "990000",
        "11": "000001",
        "41": T.terminal_id,
        "42": T.merchant_id,
        "60": "9900012300050",
        "39": "40",
    }


def test_iso87_responses_carry_a_mac_whatever_the_code() -> None:
    req = iso87.purchase(T, "000304", DT, ACQ, 700, pan=PAN)
    for rc in ("00", "05"):
        answer = response(req, rc, ISO, field_37="000000000304", field_38="123456")
        assert answer.mti == "0210" and answer["64"] == "0" * 16 and validate(ISO, answer) == []
        for k in ("2", "3", "4", "7", "11", "12", "13", "32", "41", "42", "49"):
            assert answer[k] == req[k]
    sign_on = iso87.sign_on("000305", DT, ACQ)
    assert response(sign_on, "00", ISO).fields == {
        "7": DT,
        "11": "000305",
        "32": ACQ,
        "70": "001",
        "39": "00",
    }


def test_response_input_errors() -> None:
    req = cup.sign_in(T, "000306", "000123")
    with pytest.raises(ValidationError) as info:
        response(Message("0810", dict(req.fields)), "00", CUP)
    assert info.value.field == "t"
    with pytest.raises(ValidationError) as info:
        response(req, "000", CUP)
    assert info.value.field == "39"
    with pytest.raises(ValidationError):
        response(req, "00", CUP, field_999="x")
    with pytest.raises(ValidationError):
        response(req, "00", "no-such-dialect")


# --- input errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: TerminalIdent("POS1", "898440353110001"), "41"),
        (lambda: TerminalIdent("POS00001", "8984403531100011"), "42"),
        (lambda: cup.purchase(T, "00001", "000123", 1, pan=PAN), "11"),
        (lambda: cup.purchase(T, "000001", "00012A", 1, pan=PAN), "60.2"),
        (lambda: cup.purchase(T, "000001", "000123", -1, pan=PAN), "4"),
        (lambda: cup.purchase(T, "000001", "000123", 10**12, pan=PAN), "4"),
        (lambda: cup.purchase(T, "000001", "000123", True, pan=PAN), "4"),
        (lambda: cup.purchase(T, "000001", "000123", 1), "2/35"),
        (lambda: cup.purchase(T, "000001", "000123", 1, pan="12345"), "2"),
        (lambda: cup.purchase(T, "000001", "000123", 1, track2="6225=88=01"), "35"),
        (lambda: cup.purchase(T, "000001", "000123", 1, pan=PAN, pin_block="XYZ0123456789ABC"), "52"),
        (lambda: cup.purchase(T, "000001", "000123", 1, pan=PAN, icc="ABC"), "55"),
        (lambda: cup.purchase(T, "000001", "000123", 1, pan=PAN, currency="CNY"), "49"),
        (lambda: cup.purchase(T, "000001", "000123", 1, pan=PAN, read_capability="X"), "60.4"),
        (
            lambda: cup.void(T, "000001", "000123", 1, orig_rrn="1", orig_batch="1", orig_trace="1", pan=PAN),
            "37",
        ),
        (lambda: cup.refund(T, "000001", "000123", 1, orig_rrn="1" * 12, orig_date="314", pan=PAN), "61.3"),
        (
            lambda: cup.refund(
                T, "000001", "000123", 1, orig_rrn="1" * 12, orig_date="0314", pan=PAN, card_org="VISA"
            ),
            "63",
        ),
        (lambda: cup.settlement(T, "000001", "000123", SettlementTotals(CardTotals(1, 1000))), "48.2"),
        (lambda: iso87.purchase(T, "000001", "031510300", ACQ, 1, pan=PAN), "12/13"),
        (lambda: iso87.purchase(T, "000001", DT, "123456789012", 1, pan=PAN), "32"),
    ],
)
def test_bad_input_raises_a_typed_error_naming_the_field(call: object, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        call()  # type: ignore[operator]
    assert info.value.field == field


def test_error_texts_carry_no_secrets() -> None:
    bad_pin = "ZZ" + PIN.upper()[2:]
    with pytest.raises(ValidationError) as info:
        cup.purchase(T, "000001", "000123", 1, pan=PAN, pin_block=bad_pin)
    assert bad_pin not in str(info.value) and PIN.upper()[2:] not in str(info.value)
    with pytest.raises(ValidationError) as info:
        cup.purchase(T, "000001", "000123", 1, track2=PAN + "=24=12")
    assert PAN not in str(info.value)
