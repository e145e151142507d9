"""Promises of gateway/core that mutation testing (issue 16) found unasserted: the amount checks of
voids and terminal reversals treat a missing field 4 as zero (refused for the amount, never a crash);
a terminal that never used its limit has used 0; batch numbers run 000001..999999 and wrap to 000001;
signing off a terminal that is not signed in is harmless; field 90 is well formed even for an
original journalled without its host leg's references."""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime
from typing import Any

import pytest
from test_store_support import PAN_KEY, request

from gateway.config import HostConfig, LimitsConfig
from gateway.core import clock, decisions, translate
from gateway.core.limits import RiskLimits
from gateway.core.reversal import build_host_reversal
from gateway.core.sessions import SessionTable, next_batch
from gateway.core.state import LocalLimits, LocalSessions
from gateway.iso.build import TerminalIdent, cup
from gateway.iso.errors import ValidationError
from gateway.iso.message import Message
from gateway.store import MemoryStore
from gateway.store.records import TxnKind, TxnRecord, TxnState


def record(amount: int = 1_000, **changes: Any) -> TxnRecord:
    rec = TxnRecord(
        txn_id=1, state=TxnState.COMPLETED, terminal_id="10000001", merchant_id="898100012340001",
        batch="000001", terminal_stan="000010", terminal_mti="0200", processing_code="000000",
        kind=TxnKind.PURCHASE, amount=amount, currency="156", pan_masked="622202*********0123",
        pan_fingerprint="", created_at=0.0, updated_at=0.0,
    )
    return dataclasses.replace(rec, **changes)


NO_AMOUNT = Message("0200", {"3": "200000", "11": "000011"})


def test_a_void_without_an_amount_is_refused_for_the_amount():
    assert decisions.original_problem(NO_AMOUNT, record(), [], flow_name="void") == "64"
    # ... and matches an original of amount zero, the value a missing amount stands for
    assert decisions.original_problem(NO_AMOUNT, record(amount=0), [], flow_name="void") is None


def test_a_refund_without_an_amount_refunds_nothing():
    assert decisions.original_problem(NO_AMOUNT, record(), [], flow_name="refund") is None


def test_a_terminal_reversal_without_an_amount_is_refused_for_the_amount():
    assert decisions.terminal_reversal_rc(NO_AMOUNT, record(), "25") == "64"
    assert decisions.terminal_reversal_rc(NO_AMOUNT, record(amount=0), "25") == "00"


def test_a_terminal_that_never_spent_has_used_nothing():
    limits = RiskLimits(LimitsConfig(per_transaction=1_000, per_day=2_000))
    assert limits.used("10000009") == 0
    assert limits.reserve("10000001", 700, "20261202") is None
    assert (limits.used("10000001"), limits.used("10000009")) == (700, 0)


def test_batch_numbers_run_to_999999_then_wrap_to_000001():
    assert next_batch("000001") == "000002"
    assert next_batch("999998") == "999999"
    assert next_batch("999999") == "000001"


def test_signing_off_a_terminal_that_is_not_signed_in_is_harmless():
    table = SessionTable()
    table.sign_off("10000001")
    table.sign_in("10000002", "898100012340001", "000001", "004")
    table.sign_off("10000001")
    assert table.get("10000002") is not None and len(table) == 1


def test_field_90_is_well_formed_without_the_originals_host_references():
    data = translate.original_data(record(), "12345678")
    assert (data.mti, data.stan, data.transmission_dt, data.acquirer_id) == \
        ("0200", "000000", "0000000000", "12345678")


def test_field_90_carries_the_originals_host_references():
    rec = record(host_mti="0220", host_stan="000123", transmission_datetime="1202183000")
    data = translate.original_data(rec, "12345678")
    assert (data.mti, data.stan, data.transmission_dt) == ("0220", "000123", "1202183000")


# --- the terminal's answer carries what the host gave for the receipt -------------------------------

def test_the_terminal_answer_carries_the_hosts_rrn_auth_code_balance_and_settlement_date():
    ident = TerminalIdent("10000001", "898100012340001")
    req = cup.purchase(ident, "000010", "000001", 1000, track2="6222021234567890123D30121010000000000")
    host = Message("0210", {"39": "00", "37": "123456789012", "38": "AB1234", "54": "1002156C000000010000",
                            "15": "1202"})
    out = translate.to_terminal(req, host, "12345678", "6222021234567890123")
    assert {k: out.fields.get(k) for k in ("39", "37", "38", "54", "15", "32", "63")} == {
        "39": "00", "37": "123456789012", "38": "AB1234", "54": "1002156C000000010000", "15": "1202",
        "32": "12345678", "63": "CUP"}
    bare = translate.to_terminal(req, Message("0210", {"39": "51"}), "12345678", "6222021234567890123")
    assert not {"37", "38", "54", "15"} & set(bare.fields)


def test_an_untrusted_host_approval_says_it_was_the_mac():
    req = Message("0200", {"3": "000000", "4": "000000001000", "41": "10000001"})
    assert decisions.check_host_answer(req, Message("0210", dict(req.fields, **{"39": "00"})), False) == \
        "the host's MAC does not verify"


# --- risk limits: a released reservation gives back exactly its amount ------------------------------

def test_releasing_gives_back_the_amount_and_never_goes_below_zero():
    limits = RiskLimits(LimitsConfig(per_transaction=1_000, per_day=2_000))
    day = "20261202"
    assert limits.reserve("10000001", 700, day) is None
    limits.release("10000001", 700, day)
    assert limits.used("10000001") == 0
    limits.release("10000002", 300, day)  # nothing reserved: stays at 0, not negative, not 1
    assert limits.used("10000002") == 0
    assert limits.reserve("10000002", 1_000, day) is None and limits.reserve("10000002", 1_000, day) is None


# --- the host reversal: the original's data, its own fixed STAN and field 7 --------------------------

async def saf_entry(**overrides: object):
    store = MemoryStore(pan_key=PAN_KEY)
    fields: dict[str, Any] = {"amount": 12_345, "pos_entry_mode": "051", "pos_condition_code": "06", **overrides}
    txn = await store.record_request(request("000042", **fields))
    await store.queue_reversal(txn, "98", state="timed_out")
    (entry,) = await store.list_saf()
    return store, entry


@pytest.mark.anyio
async def test_the_host_reversal_carries_the_originals_data():
    _, entry = await saf_entry()
    msg = build_host_reversal(entry, repeat=False, acquirer_id="00000001234", forwarding_id="00000005678")
    assert msg.mti == "0400"
    assert {k: msg.fields.get(k) for k in ("3", "4", "22", "25", "32", "33", "41", "42", "49")} == {
        "3": "000000", "4": "000000012345", "22": "051", "25": "06", "32": "00000001234", "33": "00000005678",
        "41": "T0000001", "42": "M00000000000001", "49": "156"}
    assert msg.fields["90"].startswith("0200" "000042" "1123101500")
    assert msg.fields["39"] == "98"
    assert build_host_reversal(entry, repeat=True, acquirer_id="00000001234", forwarding_id="0").mti == "0401"
    assert "33" not in build_host_reversal(entry, repeat=False, acquirer_id="00000001234",
                                           forwarding_id="00000000000").fields


@pytest.mark.anyio
async def test_a_host_reversal_of_an_original_without_host_references_is_well_formed():
    _, entry = await saf_entry(host_mti=None, host_stan=None, transmission_datetime=None, pos_entry_mode=None,
                               pos_condition_code=None)
    msg = build_host_reversal(entry, repeat=False, acquirer_id="00000001234", forwarding_id="0")
    assert (msg.mti, msg.fields["22"], msg.fields["25"]) == ("0400", "000", "00")
    assert msg.fields["90"].startswith("0200" "000000" "0000000000")


@pytest.mark.anyio
async def test_a_reversal_with_its_ident_fixed_carries_it_and_one_without_does_not():
    store, entry = await saf_entry()
    loose = build_host_reversal(entry, repeat=False, acquirer_id="00000001234", forwarding_id="0")
    assert loose.fields.get("11") != "777777"
    await store.record_reversal_ident(entry.saf_id, "777777", "1202193000")
    (entry,) = await store.list_saf()
    msg = build_host_reversal(entry, repeat=True, acquirer_id="00000001234", forwarding_id="0")
    assert (msg.fields["11"], msg.fields["7"]) == ("777777", "1202193000")
    half = dataclasses.replace(entry, reversal_datetime=None)
    assert build_host_reversal(half, repeat=True, acquirer_id="00000001234", forwarding_id="0").fields.get("11") \
        != "777777"
    half = dataclasses.replace(entry, reversal_stan=None)
    assert build_host_reversal(half, repeat=True, acquirer_id="00000001234", forwarding_id="0").fields.get("7") \
        != "1202193000"


@pytest.mark.anyio
async def test_a_reversal_advice_is_asked_for_not_the_default():
    _, entry = await saf_entry()
    assert build_host_reversal(entry, repeat=False, acquirer_id="00000001234", forwarding_id="0").mti == "0400"
    assert build_host_reversal(entry, repeat=False, acquirer_id="00000001234", forwarding_id="0",
                               advice=True).mti == "0420"


# --- the clock: the fields are those of the current second, whatever second that is -----------------

def test_the_local_and_utc_fields_are_those_of_the_current_second(monkeypatch):
    second = 946_782_245  # 2000-01-02 03:04:05 UTC: far from the real now
    monkeypatch.setattr(time, "time", lambda: second + 0.5)
    local = time.localtime(second)
    now = clock.local_now()
    assert (now.day, now.mmddhhmmss, now.hhmmss, now.mmdd) == (
        time.strftime("%Y%m%d", local), time.strftime("%m%d%H%M%S", local), time.strftime("%H%M%S", local),
        time.strftime("%m%d", local))
    assert clock.utc_mmddhhmmss() == "0102030405"


# --- a sign-in answer: the acquirer, the RRN, the key block as upper hex, our local time ------------

def test_the_sign_in_answer_carries_acquirer_rrn_keys_and_local_time(monkeypatch):
    second = 946_782_245
    monkeypatch.setattr(time, "time", lambda: second + 0.25)
    local = time.localtime(second)
    req = cup.sign_in(TerminalIdent("10000001", "898100012340001"), "000001", "000042", "004")
    out = decisions.sign_in_answer(req, bytes.fromhex("0a1b2c3d4e5f"), "12345678", "000000123456")
    assert {k: out.fields.get(k) for k in ("39", "32", "37", "62", "12", "13")} == {
        "39": "00", "32": "12345678", "37": "000000123456", "62": "0A1B2C3D4E5F",
        "12": time.strftime("%H%M%S", local), "13": time.strftime("%m%d", local)}


# --- an empty amount field is an amount of zero, like a missing one ---------------------------------

EMPTY_AMOUNT = Message("0200", {"3": "200000", "4": "", "11": "000011"})


def test_an_empty_amount_is_zero_for_voids_and_terminal_reversals():
    assert decisions.original_problem(EMPTY_AMOUNT, record(amount=0), [], flow_name="void") is None
    assert decisions.original_problem(EMPTY_AMOUNT, record(amount=1), [], flow_name="void") == "64"
    assert decisions.terminal_reversal_rc(EMPTY_AMOUNT, record(amount=0), "25") == "00"
    assert decisions.terminal_reversal_rc(EMPTY_AMOUNT, record(amount=1), "25") == "64"


# --- a zero release for a terminal with nothing reserved leaves nothing reserved --------------------

def test_releasing_nothing_for_an_idle_terminal_reserves_nothing():
    limits = RiskLimits(LimitsConfig(per_transaction=1_000, per_day=1_000))
    assert limits.reserve("10000001", 1_000, "20261202") is None
    limits.release("10000002", 0, "20261202")
    assert limits.used("10000002") == 0
    assert limits.reserve("10000002", 1_000, "20261202") is None  # its whole day is still there


# --- one instance's sessions and limits behave as the tables they wrap -------------------------------

@pytest.mark.anyio
async def test_local_sessions_keep_what_the_sign_in_said_and_never_refresh():
    sessions = LocalSessions()
    session = await sessions.sign_in("10000001", "898100012340001", "000042", "003")
    assert sessions.get("10000001") == session
    assert (session.terminal_id, session.merchant_id, session.batch, session.key_mode) == (
        "10000001", "898100012340001", "000042", "003")
    # a single instance has no shared copy: nothing else can have signed the terminal in
    assert await sessions.refresh("10000001") is False
    assert await sessions.refresh("10000009") is False
    assert await sessions.close_batch("10000001") == "000043"
    assert len(sessions) == 1
    await sessions.sign_off("10000001")
    assert sessions.get("10000001") is None and len(sessions) == 0


@pytest.mark.anyio
async def test_local_limits_count_per_terminal_and_per_day():
    limits = LocalLimits(LimitsConfig(per_transaction=1_000, per_day=1_500))
    assert await limits.reserve("10000001", 1_000, "20261202") is None
    assert await limits.reserve("10000002", 1_000, "20261202") is None  # another terminal, its own day
    assert (limits.used("10000001"), limits.used("10000002")) == (1_000, 1_000)
    assert await limits.reserve("10000001", 600, "20261202") == "61"
    # the next day starts from nothing
    assert await limits.reserve("10000001", 1_000, "20261203") is None
    assert limits.used("10000001") == 1_000 and limits.used("10000002") == 0
    limits.release("10000001", 400, "20261203")
    assert limits.used("10000001") == 600
    limits.seed("20261203", {"10000002": 900})
    assert await limits.reserve("10000002", 700, "20261203") == "61"


# --- card data without field 53: a clear track, a PIN block bound to the PAN ---------------------------

class _RecordingSecurity:
    """The two security-module calls card_data makes, recorded (it must not decrypt a clear track)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def decrypt_track2(self, terminal_id: str, track: str) -> str:
        self.calls.append(("decrypt", terminal_id, track))
        return track

    def translate_pin_to_host(self, terminal_id: str, pin_block: bytes, pan: str | None) -> bytes:
        self.calls.append(("pin", terminal_id, pin_block.hex(), str(pan)))
        return b"\x11" * 8


def test_card_data_without_field_53_takes_the_track_as_clear_and_binds_the_pin_to_the_pan():
    track = "6222021234567890123D30121010000000000"
    req = Message("0200", {"35": track, "41": "10000001", "52": "A1B2C3D4E5F60718"})
    security = _RecordingSecurity()
    card = translate.card_data(req, security)  # type: ignore[arg-type]
    assert card.pan == "6222021234567890123"
    assert card.fields == {"track2": track, "pin_block": "1111111111111111"}
    assert security.calls == [("pin", "10000001", "a1b2c3d4e5f60718", "6222021234567890123")]


def test_the_pan_of_a_track_is_what_precedes_its_first_separator():
    # the codec lets a second separator through in the discretionary data; the account number (for
    # the mask and the fingerprint the journal keeps) is still the digits before the first one
    security = _RecordingSecurity()
    for track in ("6222021234567890123D3012101D000", "6222021234567890123=3012101=000"):
        card = translate.card_data(Message("0200", {"35": track, "41": "10000001"}), security)  # type: ignore[arg-type]
        assert card.pan == "6222021234567890123"
    assert security.calls == []


# --- a sign-in's key mode, the local time of a given moment ------------------------------------------

@pytest.mark.parametrize("mode", ["001", "003", "004"])
def test_the_sign_in_key_mode_is_60_3_whatever_follows_it(mode):
    assert decisions.sign_in_request(Message("0800", {"60": "00000042" + mode}), "009") == ("000042", mode)
    # 60 may carry more after 60.3 (a network management code): the mode is still those 3 digits
    assert decisions.sign_in_request(Message("0800", {"60": "00000042" + mode + "0"}), "009") == ("000042", mode)
    assert decisions.sign_in_request(Message("0800", {"60": "00000042" + "002"}), mode) == ("000042", mode)


def test_local_time_fields_of_a_given_moment():
    assert decisions.local_time_fields(datetime(2026, 12, 2, 9, 5, 7)) == {"field_12": "090507", "field_13": "1202"}


# --- the host's approval is trusted only when it echoes what was asked --------------------------------

HOST_REQUEST = Message("0200", {"3": "000000", "4": "000000001000", "41": "10000001"})


def test_a_partial_approval_is_not_trusted_and_says_why():
    host = Message("0210", dict(HOST_REQUEST.fields, **{"39": "10", "4": "000000000500"}))
    assert decisions.check_host_answer(HOST_REQUEST, host, True) == \
        "a partial approval (10), which the gateway does not offer terminals"


@pytest.mark.parametrize(("key", "value"), [("3", "200000"), ("4", "000000009999"), ("41", "10000002")])
def test_an_approval_for_another_processing_code_amount_or_terminal_is_not_trusted(key, value):
    host = Message("0210", dict(HOST_REQUEST.fields, **{"39": "00", key: value}))
    assert decisions.check_host_answer(HOST_REQUEST, host, True) == f"field {key} differs from the request"


def test_an_approval_that_leaves_out_the_echoed_fields_is_trusted():
    # hosts need not echo 3, 4 and 41: what is absent cannot differ
    assert decisions.check_host_answer(HOST_REQUEST, Message("0210", {"39": "00"}), True) is None


# --- 63.1, the card organisation, from the BIN: it decides the terminal's settlement group -----------

@pytest.mark.parametrize(("pan", "org"), [
    ("6222021234567890123", "CUP"), ("4111111111111111", "VIS"),
    ("5105105105105100", "MCC"), ("5200828282828210", "MCC"), ("5300000000000006", "MCC"),
    ("5400000000000005", "MCC"), ("5500000000000004", "MCC"), ("2221000000000009", "MCC"),
    ("3530111333300000", "JCB"), ("340000000000009", "AMX"), ("370000000000002", "AMX"),
    ("3600000000000008", "000"), ("5600000000000003", "000"), ("6011000000000004", "000"),
    ("", "000"), (None, "000"),
])
def test_card_organisation_by_bin(pan, org):
    assert translate.card_org(pan) == org


# --- the host request: the terminal's amount, currency and condition, our local time -----------------

HOST = HostConfig(acquirer_id="12345678")
SALE_PAN = "6222021234567890123"
SECOND = 946_782_245  # 2000-01-02 03:04:05 UTC: far from the real now and from the field 7 given below
HOST_DT = "1231235959"  # field 7 as the caller stamps it (UTC): never the local time of SECOND


def terminal_request(mti: str = "0200", **fields: str | None) -> Message:
    base: dict[str, str | None] = {"3": "000000", "4": "000000001000", "11": "000010", "41": "10000001",
                                   "42": "898100012340001", "60": "22000042"}
    base.update(fields)
    return Message(mti, {k: v for k, v in base.items() if v is not None})


def pan_card(**extra: str) -> translate.CardData:
    return translate.CardData(SALE_PAN, {"pan": SALE_PAN, **extra})


def host_fields(msg: Message, *keys: str) -> dict[str, str | None]:
    return {k: msg.fields.get(k) for k in keys}


def test_the_host_purchase_carries_the_terminals_amount_currency_condition_and_our_local_time(monkeypatch):
    monkeypatch.setattr(time, "time", lambda: SECOND + 0.5)
    local = time.strftime("%m%d%H%M%S", time.localtime(SECOND))
    req = terminal_request(**{"49": "840", "25": "06"})
    msg = translate.to_host(req, "purchase", pan_card(entry_mode="051"), HOST, "000777", HOST_DT, None)
    assert msg.mti == "0200"
    assert host_fields(msg, "2", "3", "4", "7", "11", "12", "13", "22", "25", "32", "41", "42", "49") == {
        "2": SALE_PAN, "3": "000000", "4": "000000001000", "7": HOST_DT, "11": "000777", "12": local[4:],
        "13": local[:4], "22": "051", "25": "06", "32": "12345678", "41": "10000001", "42": "898100012340001",
        "49": "840"}


def test_a_host_request_without_the_terminals_currency_condition_or_amount_takes_the_defaults(monkeypatch):
    monkeypatch.setattr(time, "time", lambda: SECOND + 0.5)
    req = terminal_request(**{"4": None})
    msg = translate.to_host(req, "purchase", pan_card(), HOST, "000777", HOST_DT, None)
    # CNY, a normal presentment, and an amount of zero (never a made-up one)
    assert host_fields(msg, "4", "25", "49") == {"4": "000000000000", "25": "00", "49": "156"}


def test_the_host_balance_inquiry_has_no_amount_and_the_terminals_fields(monkeypatch):
    monkeypatch.setattr(time, "time", lambda: SECOND + 0.5)
    local = time.strftime("%m%d%H%M%S", time.localtime(SECOND))
    req = terminal_request(**{"3": "310000", "4": None, "49": "344", "25": "06"})
    msg = translate.to_host(req, "balance_inquiry", pan_card(), HOST, "000778", HOST_DT, None)
    assert "4" not in msg.fields
    assert host_fields(msg, "2", "3", "7", "11", "12", "13", "25", "49") == {
        "2": SALE_PAN, "3": "310000", "7": HOST_DT, "11": "000778", "12": local[4:], "13": local[:4],
        "25": "06", "49": "344"}


ORIGINAL = record(host_mti="0200", host_stan="000123", transmission_datetime="1202183000")


def test_the_host_void_names_its_original_in_field_90_and_carries_its_rrn_and_auth_code(monkeypatch):
    monkeypatch.setattr(time, "time", lambda: SECOND + 0.5)
    local = time.strftime("%m%d%H%M%S", time.localtime(SECOND))
    req = terminal_request(**{"3": "200000", "37": "123456789012", "38": "AB1234", "49": "840", "25": "06"})
    msg = translate.to_host(req, "void", pan_card(), HOST, "000779", HOST_DT, ORIGINAL)
    assert host_fields(msg, "3", "4", "7", "11", "12", "13", "25", "37", "38", "49") == {
        "3": "020000", "4": "000000001000", "7": HOST_DT, "11": "000779", "12": local[4:], "13": local[:4],
        "25": "06", "37": "123456789012", "38": "AB1234", "49": "840"}
    assert msg.fields["90"] == translate.original_data(ORIGINAL, "12345678").pack()
    assert msg.fields["90"].startswith("0200" "000123" "1202183000")


def test_the_host_refund_names_its_original_when_known_and_its_rrn(monkeypatch):
    monkeypatch.setattr(time, "time", lambda: SECOND + 0.5)
    local = time.strftime("%m%d%H%M%S", time.localtime(SECOND))
    req = terminal_request(**{"3": "200000", "4": "000000000500", "37": "123456789012", "38": "AB1234",
                              "49": "840", "25": "06"})
    msg = translate.to_host(req, "refund", pan_card(), HOST, "000780", HOST_DT, ORIGINAL)
    assert host_fields(msg, "3", "4", "7", "11", "12", "13", "25", "37", "49") == {
        "3": "200000", "4": "000000000500", "7": HOST_DT, "11": "000780", "12": local[4:], "13": local[:4],
        "25": "06", "37": "123456789012", "49": "840"}
    assert msg.fields["90"] == translate.original_data(ORIGINAL, "12345678").pack()
    assert "38" not in msg.fields  # a refund carries no original authorisation code
    # an original the gateway never journalled: the refund goes by the RRN alone
    bare = translate.to_host(req, "refund", pan_card(), HOST, "000781", HOST_DT, None)
    assert "90" not in bare.fields and bare.fields["37"] == "123456789012"


def test_a_flow_without_a_host_translation_is_refused_by_name():
    with pytest.raises(ValueError, match=r"^no host translation for flow 'preauth'$"):
        translate.to_host(terminal_request(), "preauth", pan_card(), HOST, "000782", HOST_DT, None)


def test_a_host_answer_without_a_code_reaches_the_terminal_as_a_system_error():
    out = translate.to_terminal(terminal_request(), Message("0210", {}), "12345678", SALE_PAN)
    assert out.fields["39"] == "96"


# --- what the journal keeps of a request ---------------------------------------------------------------

FINGERPRINT = "ab" * 32


def test_the_journal_keeps_the_request_and_its_host_leg_never_the_clear_pan():
    req = terminal_request(**{"3": "200000", "22": "051", "25": "06", "49": "840", "61": "000001000123",
                              "37": "123456789012", "38": "AB1234"})
    host = Message("0200", {"3": "020000", "7": HOST_DT, "11": "000779"})
    rec = translate.journal_record(req, host, "void", pan_card(), FINGERPRINT, ORIGINAL)
    assert dataclasses.asdict(rec) == {
        "terminal_id": "10000001", "merchant_id": "898100012340001", "batch": "000042", "terminal_stan": "000010",
        "terminal_mti": "0200", "processing_code": "020000", "kind": TxnKind.VOID, "amount": 1000,
        "currency": "840", "pan_masked": "622202*********0123", "pan_fingerprint": FINGERPRINT, "card_org": "CUP",
        "host_mti": "0200", "host_stan": "000779", "transmission_datetime": HOST_DT, "pos_entry_mode": "051",
        "pos_condition_code": "06", "orig_txn_id": ORIGINAL.txn_id, "orig_batch": "000001", "orig_stan": "000123",
        "orig_rrn": "123456789012", "orig_date": None, "orig_auth_code": "AB1234"}


def test_the_journal_keeps_a_refunds_rrn_but_no_auth_code_and_a_purchases_neither():
    req = terminal_request(**{"61": "0000010001231202", "37": "123456789012", "38": "AB1234"})
    host = Message("0200", {"3": "200000", "7": HOST_DT, "11": "000780"})
    refund = translate.journal_record(req, host, "refund", pan_card(), FINGERPRINT, None)
    assert (refund.kind, refund.orig_rrn, refund.orig_auth_code, refund.orig_txn_id, refund.orig_date) == (
        TxnKind.REFUND, "123456789012", None, None, "1202")
    sale = translate.journal_record(req, host, "purchase", pan_card(), FINGERPRINT, None)
    assert (sale.orig_rrn, sale.orig_auth_code) == (None, None)


def test_the_journal_of_a_request_without_pan_currency_amount_or_pos_fields():
    req = terminal_request(**{"4": None})
    host = Message("0200", {"3": "000000", "7": HOST_DT, "11": "000781"})
    rec = translate.journal_record(req, host, "purchase", translate.CardData(None, {}), "", None)
    assert (rec.amount, rec.currency, rec.pan_masked, rec.card_org, rec.pos_entry_mode, rec.pos_condition_code) \
        == (0, "156", "", "000", None, None)


# --- card data: an encrypted track is decrypted, a PIN block without PAN is translated without one -----

CLEAR_TRACK = "6222021234567890123D30121010000000000"


class _TrackSecurity(_RecordingSecurity):
    def decrypt_track2(self, terminal_id: str, track: str) -> str:
        super().decrypt_track2(terminal_id, track)
        return CLEAR_TRACK


def test_an_encrypted_track_is_decrypted_and_its_pan_read_from_the_clear_track():
    security = _TrackSecurity()
    req = Message("0200", {"35": "0123456789ABCDEF", "41": "10000001", "53": "2610000000000000",
                           "52": "A1B2C3D4E5F60718"})
    card = translate.card_data(req, security)  # type: ignore[arg-type]
    assert card.pan == SALE_PAN
    assert card.fields == {"track2": CLEAR_TRACK, "pin_block": "1111111111111111"}
    assert security.calls == [("decrypt", "10000001", "0123456789ABCDEF"),
                              ("pin", "10000001", "a1b2c3d4e5f60718", SALE_PAN)]


def test_a_pin_block_without_pan_is_translated_without_one():
    security = _RecordingSecurity()
    req = Message("0200", {"2": SALE_PAN, "41": "10000001", "53": "1600000000000000", "52": "A1B2C3D4E5F60718"})
    card = translate.card_data(req, security)  # type: ignore[arg-type]
    assert card.fields == {"pan": SALE_PAN, "pin_block": "1111111111111111"}
    assert security.calls == [("pin", "10000001", "a1b2c3d4e5f60718", "None")]


def test_the_card_fields_are_field_2_and_the_terminals_card_details():
    security = _RecordingSecurity()
    req = Message("0200", {"2": SALE_PAN, "35": "6222020000000000000D30121010000000000", "41": "10000001",
                           "14": "3012", "22": "051", "23": "001", "55": "9F2608AABBCCDDEEFF0011"})
    card = translate.card_data(req, security)  # type: ignore[arg-type]
    assert card.pan == SALE_PAN  # field 2 names the account, not the track's digits
    assert card.fields == {"pan": SALE_PAN, "track2": "6222020000000000000D30121010000000000", "expiry": "3012",
                           "entry_mode": "051", "card_seq": "001", "icc": "9F2608AABBCCDDEEFF0011"}
    assert security.calls == []


@pytest.mark.anyio
async def test_a_forwarding_id_that_is_not_digits_is_refused_not_dropped_from_the_reversal():
    # field 33 / 90.5 are digits: a mistyped configuration must stop the reversal loudly, never make it
    # go out quietly without the forwarding institution
    _, entry = await saf_entry()
    with pytest.raises(ValidationError):
        build_host_reversal(entry, repeat=False, acquirer_id="00000001234", forwarding_id="X0")


# --- an empty amount, a sign-in's batch at its edges, field 61 at its edges ---------------------------

def test_an_empty_amount_field_is_zero_on_the_host_request_and_in_the_journal(monkeypatch):
    monkeypatch.setattr(time, "time", lambda: SECOND + 0.5)
    req = terminal_request(**{"4": ""})
    assert translate.to_host(req, "purchase", pan_card(), HOST, "000777", HOST_DT, None).fields["4"] == \
        "000000000000"
    host = Message("0200", {"3": "000000", "7": HOST_DT, "11": "000777"})
    assert translate.journal_record(req, host, "purchase", pan_card(), FINGERPRINT, None).amount == 0


@pytest.mark.parametrize(("f60", "batch"), [
    ("00000042", "000042"),  # exactly 60.1 + 60.2: the batch is there
    ("0000042", "000001"),  # one digit short: no batch
    ("00000042X04", "000042"),  # what follows 60.2 does not matter to it
    ("00A00042004", "000001"),  # not digits: no batch
    ("0000004A004", "000001"),
])
def test_a_sign_in_takes_60_2_as_its_batch_only_when_it_is_six_digits(f60, batch):
    assert decisions.sign_in_request(Message("0800", {"60": f60}), "004")[0] == batch


def test_a_sign_in_without_field_60_gets_the_first_batch_and_the_default_mode():
    assert decisions.sign_in_request(Message("0800", {"11": "000001"}), "003") == ("000001", "003")


def test_field_61_at_its_edges():
    assert translate.original_refs(Message("0200", {"61": "000001"})) == ("000001", None, None)
    assert translate.original_refs(Message("0200", {"61": "00000"})) == (None, None, None)
    # 61 may carry more after 61.3: the date is still its 4 digits
    assert translate.original_refs(Message("0200", {"61": "00000100012312020000"})) == ("000001", "000123", "1202")


def test_seeding_the_day_adds_to_what_is_already_reserved():
    limits = RiskLimits(LimitsConfig(per_transaction=1_000, per_day=1_000))
    assert limits.reserve("10000001", 500, "20261202") is None
    limits.seed("20261202", {"10000001": 300})
    assert limits.used("10000001") == 800
    assert limits.reserve("10000001", 300, "20261202") == "61"


class _HexSecurity(_RecordingSecurity):
    def translate_pin_to_host(self, terminal_id: str, pin_block: bytes, pan: str | None) -> bytes:
        super().translate_pin_to_host(terminal_id, pin_block, pan)
        return bytes.fromhex("ABCDEF0123456789")


def test_the_host_pin_block_is_upper_case_hex():
    req = Message("0200", {"2": SALE_PAN, "41": "10000001", "52": "A1B2C3D4E5F60718"})
    assert translate.card_data(req, _HexSecurity()).fields["pin_block"] == "ABCDEF0123456789"  # type: ignore[arg-type]


def test_a_request_without_field_60_has_no_batch_and_is_not_signed_in():
    # empty, not a made-up one: the refusal journal records `batch_of(msg) or None`, i.e. no batch
    req = Message("0200", {"11": "000001", "41": "10000001"})
    assert decisions.batch_of(req) == ""
    assert decisions.screen_session(req, SessionTable().sign_in("10000001", "898100012340001", "000001", "004")) \
        == "77"


# --- an approval must name the card and the currency the request named ---------------------------------

CARD_REQUEST = Message("0200", {"2": SALE_PAN, "3": "000000", "4": "000000001000", "41": "10000001", "49": "156"})


@pytest.mark.parametrize(("key", "value"), [("2", "6222020000000000000"), ("49", "840")])
def test_an_approval_for_another_card_or_currency_is_not_trusted(key, value):
    host = Message("0210", dict(CARD_REQUEST.fields, **{"39": "00", key: value}))
    assert decisions.check_host_answer(CARD_REQUEST, host, True) == f"field {key} differs from the request"


def test_an_approval_that_echoes_or_leaves_out_the_card_and_currency_is_trusted():
    assert decisions.check_host_answer(CARD_REQUEST, Message("0210", dict(CARD_REQUEST.fields, **{"39": "00"})),
                                       True) is None
    assert decisions.check_host_answer(CARD_REQUEST, Message("0210", {"39": "00"}), True) is None
    # a request that named no card (a track only) has no field 2 to compare: the host's may stand
    track_only = Message("0200", {"3": "000000", "4": "000000001000", "41": "10000001"})
    assert decisions.check_host_answer(track_only, Message("0210", {"39": "00", "2": SALE_PAN, "49": "840"}),
                                       True) is None
