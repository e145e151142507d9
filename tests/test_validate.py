"""Flow identification and validation (specs/flows.toml, gateway/iso/validate.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from gateway.iso.build import OriginalData, TerminalIdent, cup, iso87, response
from gateway.iso.errors import ValidationError
from gateway.iso.message import Message
from gateway.iso.totals import BatchItem, CardTotals, SettlementTotals
from gateway.iso.validate import (
    UnsupportedFlow,
    check,
    dialect_settings,
    echo_mismatches,
    flow,
    flows,
    identify,
    validate,
)

CUP = "cup-pos"
ISO = "iso87-ascii"
T = TerminalIdent("POS00001", "898440353110001")
PAN = "6225880123456789"
TRACK2 = PAN + "=2412101123456"
PIN = "0123456789ABCDEF"
DT = "0315103000"
ACQ = "1234"


def _iso_purchase() -> Message:
    return iso87.purchase(T, "000010", DT, ACQ, 700, pan=PAN, pin_block=PIN)


#: a valid request for every flow of both dialects, built by the builders
REQUESTS: dict[tuple[str, str], Callable[[], Message]] = {
    (CUP, "sign_in"): lambda: cup.sign_in(T, "000001", "000123"),
    (CUP, "sign_off"): lambda: cup.sign_off(T, "000002", "000123"),
    (CUP, "echo"): lambda: cup.echo(T, "000123"),
    (CUP, "settlement"): lambda: cup.settlement(T, "000003", "000123", SettlementTotals(CardTotals(5, 1))),
    (CUP, "batch_upload"): lambda: cup.batch_upload(
        T, "000004", "000123", [BatchItem("00", "000009", PAN, 5)]
    ),
    (CUP, "batch_upload_end"): lambda: cup.batch_upload_end(T, "000005", "000123", 1, False),
    (CUP, "purchase"): lambda: cup.purchase(T, "000006", "000123", 100, track2=TRACK2, pin_block=PIN),
    (CUP, "void"): lambda: cup.void(
        T, "000007", "000123", 100, orig_rrn="123456789012", orig_batch="000123", orig_trace="000006", pan=PAN
    ),
    (CUP, "refund"): lambda: cup.refund(
        T, "000008", "000123", 50, orig_rrn="123456789012", orig_date="0314", pan=PAN
    ),
    (CUP, "balance_inquiry"): lambda: cup.balance_inquiry(T, "000009", "000123", pan=PAN),
    (CUP, "reversal"): lambda: cup.reversal(cup.purchase(T, "000006", "000123", 100, pan=PAN), "98"),
    (CUP, "void_reversal"): lambda: cup.reversal(
        cup.void(
            T,
            "000007",
            "000123",
            100,
            orig_rrn="123456789012",
            orig_batch="000123",
            orig_trace="000006",
            pan=PAN,
        ),
        "06",
    ),
    (ISO, "sign_on"): lambda: iso87.sign_on("000001", DT, ACQ),
    (ISO, "sign_off"): lambda: iso87.sign_off("000002", DT, ACQ),
    (ISO, "echo"): lambda: iso87.echo("000003", DT, ACQ),
    (ISO, "key_request"): lambda: iso87.key_request("000004", DT, "ZPK", ACQ),
    (ISO, "purchase"): _iso_purchase,
    (ISO, "refund"): lambda: iso87.refund(T, "000011", DT, ACQ, 50, orig_rrn="123456789012", pan=PAN),
    (ISO, "void"): lambda: iso87.void(
        T, "000012", DT, ACQ, 700, OriginalData.from_request(_iso_purchase()), pan=PAN
    ),
    (ISO, "balance_inquiry"): lambda: iso87.balance_inquiry(T, "000013", DT, ACQ, track2=TRACK2),
    (ISO, "reversal"): lambda: iso87.reversal(_iso_purchase(), "68"),
    (ISO, "reversal_advice"): lambda: iso87.reversal(_iso_purchase(), "68", advice=True),
}

#: what an approval of each flow needs on top of the echo (the builder's caller supplies it)
APPROVAL_EXTRAS: dict[str, dict[str, str]] = {
    "sign_in": {
        "field_12": "103000",
        "field_13": "0315",
        "field_32": "12345",
        "field_37": "000000000001",
        "field_62": "AB" * 60,
    },
    "settlement": {"field_12": "103000", "field_13": "0315"},
    "purchase": {"field_12": "103000", "field_13": "0315", "field_32": "12345", "field_37": "000000000006"},
    "void": {"field_12": "103000", "field_13": "0315", "field_32": "12345", "field_37": "000000000007"},
    "refund": {"field_12": "103000", "field_13": "0315", "field_32": "12345", "field_37": "000000000008"},
    "balance_inquiry": {
        "field_12": "103000",
        "field_13": "0315",
        "field_32": "12345",
        "field_37": "000000000009",
    },
    "reversal": {"field_12": "103000", "field_13": "0315"},
    "void_reversal": {"field_12": "103000", "field_13": "0315"},
    "key_request": {"field_48": "0" * 32 + "ABCDEF01"},
}

CASES = sorted(REQUESTS)


def _approval(dialect: str, name: str) -> Message:
    extras = APPROVAL_EXTRAS.get(name, {}) if dialect == CUP or name == "key_request" else {}
    return response(REQUESTS[dialect, name](), "00", dialect, **extras)


def test_every_flow_has_a_sample() -> None:
    assert {(d, n) for d in (CUP, ISO) for n in flows(d)} == set(REQUESTS)


@pytest.mark.parametrize(("dialect", "name"), CASES)
def test_flow_spec_is_consistent(dialect: str, name: str) -> None:
    spec = flow(dialect, name)
    req, rsp = spec.request, spec.response
    assert not set(req.mandatory) & req.conditional
    assert not set(req.forbidden) & req.allowed
    # whatever a response must carry is either its code or echoed from a field the request must carry
    for k in rsp.mandatory:
        assert k == "39" or (k in rsp.echo and k in req.mandatory), (name, k)
    assert set(rsp.echo) <= req.allowed, name
    assert spec.response_mti == f"{spec.mti[:2]}{int(spec.mti[2]) + 1}0"


@pytest.mark.parametrize(("dialect", "name"), CASES)
def test_identify_requests_and_responses(dialect: str, name: str) -> None:
    req = REQUESTS[dialect, name]()
    assert identify(dialect, req) is flow(dialect, name)
    answer = _approval(dialect, name)
    assert identify(dialect, answer) is flow(dialect, name)
    assert answer.mti == flow(dialect, name).response_mti
    assert validate(dialect, req) == []
    assert validate(dialect, answer) == []
    assert check(dialect, req) is flow(dialect, name)


@pytest.mark.parametrize(("dialect", "name"), CASES)
def test_each_missing_mandatory_request_field_is_reported(dialect: str, name: str) -> None:
    spec = flow(dialect, name)
    for k in spec.request.mandatory:
        msg = REQUESTS[dialect, name]()
        del msg.fields[k]
        errors = validate(dialect, msg)
        assert k in {e.field for e in errors}, (name, k, errors)
    if spec.mac:
        msg = REQUESTS[dialect, name]()
        mac_field = dialect_settings(dialect).mac_field_for(msg.fields)
        del msg.fields[mac_field]
        assert [e.field for e in validate(dialect, msg)] == [mac_field]


@pytest.mark.parametrize(("dialect", "name"), CASES)
def test_each_missing_mandatory_response_field_is_reported(dialect: str, name: str) -> None:
    spec = flow(dialect, name)
    for k in (*spec.response.mandatory, *spec.response.approved):
        msg = _approval(dialect, name)
        if k not in msg.fields:
            continue  # e.g. 11 of an echo answer: the request had none to echo
        del msg.fields[k]
        assert k in {e.field for e in validate(dialect, msg)}, (name, k)


def test_reversal_flows_know_what_they_reverse() -> None:
    assert flow(CUP, "reversal").reverses == ("purchase",)
    assert flow(CUP, "void_reversal").reverses == ("void",)
    assert set(flow(ISO, "reversal").reverses) == {"purchase", "refund", "void"}
    reversible = {n for n, f in flows(CUP).items() if f.reversible}
    assert reversible == {"purchase", "void"}
    mac = {n for n, f in flows(CUP).items() if f.mac}
    assert mac == {"purchase", "void", "refund", "balance_inquiry", "reversal", "void_reversal"}


def test_repeat_reversal_maps_to_the_reversal_flow() -> None:
    assert identify(ISO, Message("0401", {"3": "000000"})) is flow(ISO, "reversal")
    assert identify(ISO, Message("0410", {})) is flow(ISO, "reversal")
    assert identify(ISO, Message("0421", {"3": "000000"})) is flow(ISO, "reversal_advice")
    assert identify(ISO, Message("0430", {})) is flow(ISO, "reversal_advice")


# --- specific rules --------------------------------------------------------------------------------


def _fields(errors: list[ValidationError]) -> list[str]:
    return [e.field for e in errors]


def test_malformed_field_60() -> None:
    msg = REQUESTS[CUP, "purchase"]()
    assert _fields(validate(CUP, msg.with_fields(field_60="22000123000"[:10]))) == ["60.3"]
    assert _fields(validate(CUP, msg.with_fields(field_60="2200A12300050"))) == ["60.2"]
    # 60.3 of a financial message is 000
    assert _fields(validate(CUP, msg.with_fields(field_60="2200012300150"))) == ["60.3"]


def test_60_1_inconsistent_with_processing_code() -> None:
    msg = REQUESTS[CUP, "purchase"]().with_fields(field_3="200000")
    errors = validate(CUP, msg)
    assert _fields(errors) == ["3"]
    assert "inconsistent" in errors[0].reason
    sign_in = REQUESTS[CUP, "sign_in"]().with_fields(field_60="22000123004")
    assert _fields(validate(CUP, sign_in)) == ["60.1"]


def test_amount_zero_and_currency() -> None:
    msg = REQUESTS[CUP, "purchase"]()
    assert _fields(validate(CUP, msg.with_fields(field_4="000000000000"))) == ["4"]
    assert _fields(validate(CUP, msg.with_fields(field_49="CNY"))) == ["49"]
    assert _fields(validate(CUP, msg.with_fields(field_4="00000000001"))) == ["4"]  # 11 digits


def test_forbidden_fields_and_dependencies() -> None:
    rev = REQUESTS[CUP, "reversal"]()
    assert _fields(validate(CUP, rev.with_fields(field_52=PIN))) == ["52"]
    assert _fields(validate(CUP, rev.with_fields(field_39="00"))) == ["39"]  # not a reversal reason
    purchase = REQUESTS[CUP, "purchase"]()
    del purchase.fields["53"]
    assert _fields(validate(CUP, purchase)) == ["53"]
    no_card = REQUESTS[CUP, "purchase"]()
    del no_card.fields["35"]
    assert _fields(validate(CUP, no_card)) == ["2/35"]
    balance = REQUESTS[CUP, "balance_inquiry"]().with_fields(field_4="000000000100")
    assert _fields(validate(CUP, balance)) == ["4"]
    iso_refund = REQUESTS[ISO, "refund"]()
    del iso_refund.fields["37"]
    assert _fields(validate(ISO, iso_refund)) == ["90/37"]


def test_settlement_request_carries_result_code_zero() -> None:
    msg = REQUESTS[CUP, "settlement"]()
    claimed = SettlementTotals.from_field48(msg["48"])
    reconciled = claimed.reconciled(claimed).to_field48()
    assert _fields(validate(CUP, msg.with_fields(field_48=reconciled))) == ["48.5", "48.10"]
    assert _fields(validate(CUP, msg.with_fields(field_48=msg["48"][:-1]))) == ["48.10"]


def test_batch_upload_48_layout_depends_on_60_3() -> None:
    end = REQUESTS[CUP, "batch_upload_end"]()
    items = REQUESTS[CUP, "batch_upload"]()
    assert _fields(validate(CUP, end.with_fields(field_48=items["48"]))) == ["48"]
    assert _fields(validate(CUP, items.with_fields(field_48="0001"))) == ["48"]


def test_iso87_field_90_must_fit_its_layout() -> None:
    rev = REQUESTS[ISO, "reversal"]()
    assert _fields(validate(ISO, rev.with_fields(field_90=rev["90"][:-1]))) == ["90", "90.5"]


def test_iso87_mac_moves_to_128_with_a_secondary_bitmap() -> None:
    settings = dialect_settings(ISO)
    assert settings.mac_field_for(REQUESTS[ISO, "purchase"]().fields) == "64"
    rev = REQUESTS[ISO, "reversal"]()
    assert settings.mac_field_for(rev.fields) == "128"
    assert "64" not in rev and rev["128"] == "0" * 16
    misplaced = Message(rev.mti, {k: v for k, v in rev.fields.items() if k != "128"} | {"64": "0" * 16})
    assert _fields(validate(ISO, misplaced)) == ["128"]
    assert dialect_settings(CUP).mac_field_for({"90": ""}) == "64"  # CUP has no secondary bitmap


def test_response_mac_rules() -> None:
    approved = _approval(CUP, "purchase")
    del approved.fields["64"]
    assert _fields(validate(CUP, approved)) == ["64"]
    mac_failure = response(REQUESTS[CUP, "purchase"](), "A0", CUP).with_fields(field_64="0" * 16)
    assert _fields(validate(CUP, mac_failure)) == ["64"]
    declined = response(REQUESTS[CUP, "purchase"](), "51", CUP)
    assert validate(CUP, declined) == []
    iso_declined = response(REQUESTS[ISO, "purchase"](), "05", ISO)
    del iso_declined.fields["64"]
    assert _fields(validate(ISO, iso_declined)) == ["64"]
    # a MAC on a flow that needs none is tolerated: acquirers differ on MAC'ing 0500
    assert validate(CUP, REQUESTS[CUP, "settlement"]().with_fields(field_64="0" * 16)) == []


def test_approval_only_fields() -> None:
    approval = _approval(CUP, "sign_in")
    del approval.fields["62"]
    assert _fields(validate(CUP, approval)) == ["62"]
    refused = response(REQUESTS[CUP, "sign_in"](), "97", CUP)
    assert validate(CUP, refused) == []


# --- unidentifiable messages -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dialect", "msg", "field", "unsupported"),
    [
        (CUP, Message("0200", {"3": "000000", "60": "9900012300050"}), "60.1", True),
        (CUP, Message("0800", {"60": "00000123999"}), "60.3", True),
        (CUP, Message("0800", {"60": "00000123"}), "60", False),
        (CUP, Message("0200", {"3": "000000"}), "60", False),
        (CUP, Message("0600", {}), "t", True),
        (CUP, Message("02X0", {}), "t", False),
        (CUP, Message("", {}), "t", False),
        (ISO, Message("0800", {"70": "999"}), "70", True),
        (ISO, Message("0800", {}), "70", False),
        (ISO, Message("0200", {"3": "400000"}), "3", True),
        (ISO, Message("0220", {"3": "000000"}), "t", True),
    ],
)
def test_unidentifiable_messages(dialect: str, msg: Message, field: str, unsupported: bool) -> None:
    assert identify(dialect, msg) is None
    errors = validate(dialect, msg)
    assert len(errors) == 1
    assert errors[0].field == field
    assert isinstance(errors[0], UnsupportedFlow) is unsupported
    with pytest.raises(ValidationError):
        check(dialect, msg)


def test_unknown_dialect_is_a_typed_error() -> None:
    with pytest.raises(ValidationError):
        validate("martian", Message("0200", {}))
    assert dialect_settings("specs/cup-pos.toml") is dialect_settings(CUP)


def test_error_texts_carry_no_field_data() -> None:
    msg = REQUESTS[CUP, "purchase"]().with_fields(field_2="62258801234567X9")
    errors = validate(CUP, msg)
    assert _fields(errors) == ["2"]
    assert "62258801234567X9" not in str(errors[0]) and "6225880" not in repr(errors)


# --- echo checks -----------------------------------------------------------------------------------


def test_echo_mismatches() -> None:
    req = REQUESTS[CUP, "purchase"]()
    ok = _approval(CUP, "purchase")
    assert echo_mismatches(CUP, req, ok) == []
    assert _fields(echo_mismatches(CUP, req, ok.with_fields(field_11="999999"))) == ["11"]
    assert _fields(echo_mismatches(CUP, req, ok.with_fields(field_42="X" * 15))) == ["42"]
    declined = response(req, "05", CUP).with_fields(field_42="X" * 15)
    assert echo_mismatches(CUP, req, declined) == []  # 42 is checked only on approvals
    partial = response(req, "10", CUP).with_fields(field_4="000000000050")
    assert echo_mismatches(CUP, req, partial) == []
    assert _fields(echo_mismatches(CUP, req, ok.with_fields(mti="0230"))) == ["t"]
    rev = REQUESTS[ISO, "reversal"]().with_fields(mti="0401")
    assert echo_mismatches(ISO, rev, response(rev, "00", ISO)) == []
