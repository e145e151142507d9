"""What the journal accepts and how it reads it back (`gateway/store/records.py`), for mutation testing
(issue 16): the edges of every check a record passes before it is journalled (a malformed one must be
refused with the field named, never half written; a clear PAN must never reach the disk), the credit
rules (a void or refund can never credit more than the sale), the settlement split, and what a record
read back says (repeat or first attempt, approved or not).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from test_store_support import PAN_KEY, TEST_PAN, request

from gateway.store.errors import InvalidRecord
from gateway.store.records import (
    MAX_TEXT,
    REQUEST_COLUMNS,
    SAF_COLUMNS,
    TXN_COLUMNS,
    QueuedReversal,
    RefusalRecord,
    ReversalInitiator,
    SafEntry,
    SafState,
    TxnKind,
    TxnQuery,
    TxnRecord,
    TxnState,
    check_id,
    check_ident,
    check_late_args,
    check_limit,
    check_outcome_args,
    check_reason,
    check_unknown_rc,
    clip_text,
    credit_refusal,
    is_domestic,
    not_found_overtaken,
    outcome_sources,
    pan_fingerprint,
    parse_enum,
    parse_outcome,
    printable,
    reversal_from,
    reversal_refusal,
    saf_from_row,
    txn_from_row,
)

T = TxnState


def record(**overrides: object) -> TxnRecord:
    fields = {f.name: getattr(request(), f.name) for f in dataclasses.fields(request())}
    fields.update({"txn_id": 1, "state": T.COMPLETED, "created_at": 100.0, "updated_at": 100.0})
    fields.update(overrides)
    return TxnRecord(**fields)  # type: ignore[arg-type]


def refused(field: str, fn: object, *args: object, **kwargs: object) -> InvalidRecord:
    with pytest.raises(InvalidRecord) as err:
        fn(*args, **kwargs)  # type: ignore[operator]
    assert err.value.field == field, err.value
    return err.value


# --- requests at the edges --------------------------------------------------------------------------


def test_the_largest_amount_and_zero_are_journalled() -> None:
    assert request(amount=10**12 - 1).amount == 10**12 - 1
    assert request(amount=0).amount == 0


@pytest.mark.parametrize(("field", "good", "bad"), [
    ("host_mti", None, "020"), ("host_stan", None, "00001"), ("transmission_datetime", None, "112310150"),
    ("pos_entry_mode", "0211", "02111"), ("pos_entry_mode", "0", ""), ("pos_condition_code", "00", "000"),
    ("orig_batch", "000001", "00001"), ("orig_stan", "000002", "0000021"), ("orig_rrn", "123456789012", ""),
    ("orig_rrn", "1", "1234567890123"), ("orig_date", "0115", "01150"), ("orig_auth_code", "123456", "1234567"),
    ("orig_auth_code", "1", ""), ("orig_txn_id", 9, True), ("card_org", "", "VISA"), ("card_org", "VIS", "\x00"),
    ("terminal_id", "T0000002", "T00000001"), ("merchant_id", "M00000000000002", "M0000000000000"),
    ("currency", "156", "15"), ("batch", "000002", "0000012"), ("processing_code", "200000", "2000000"),
])
def test_each_field_is_checked_at_its_edges(field: str, good: object, bad: object) -> None:
    good_one: dict[str, Any] = {field: good}
    assert getattr(request(**good_one), field) == good
    refused(field, request, **{field: bad})


def test_a_masked_pan_shows_at_most_ten_digits_in_at_most_19_characters() -> None:
    assert request(pan_masked="622202*********4321").pan_masked == "622202*********4321"
    refused("pan_masked", request, pan_masked="622202**********4321")  # 20 characters
    refused("pan_masked", request, pan_masked="6222021****4321")  # 11 digits shown
    refused("pan_masked", request, pan_masked=None)


def test_a_fingerprint_is_64_lowercase_hex_or_empty() -> None:
    fp = pan_fingerprint(PAN_KEY, TEST_PAN)
    assert request(pan_fingerprint=fp).pan_fingerprint == fp
    refused("pan_fingerprint", request, pan_fingerprint=fp[:63])
    refused("pan_fingerprint", request, pan_fingerprint=fp + "0")
    refused("pan_fingerprint", request, pan_fingerprint="g" * 64)
    refused("pan_fingerprint", request, pan_fingerprint=None)


def test_a_pan_fingerprint_takes_8_to_19_digits_and_a_key_of_16_bytes() -> None:
    assert len(pan_fingerprint(b"k" * 16, "12345678")) == 64
    assert len(pan_fingerprint(b"k" * 16, "1" * 19)) == 64
    refused("pan_key", pan_fingerprint, b"k" * 15, "12345678")
    refused("pan_key", pan_fingerprint, "k" * 16, "12345678")
    refused("pan", pan_fingerprint, b"k" * 16, "1234567")
    refused("pan", pan_fingerprint, b"k" * 16, "1" * 20)
    refused("pan", pan_fingerprint, b"k" * 16, 12345678)


# --- argument checks --------------------------------------------------------------------------------


def test_ids_and_limits_are_integers_never_booleans() -> None:
    assert check_id(0, "txn_id") == 0 and check_limit(1) == 1
    refused("saf_id", check_id, True, "saf_id")
    refused("txn_id", check_id, "7", "txn_id")
    for bad in (0, -1, True, 1.0):
        refused("limit", check_limit, bad)


def test_a_reversal_reason_is_two_letters_or_digits() -> None:
    assert check_reason("A0") == "A0"
    for bad in ("9", "981", "9 ", None):
        refused("reason", check_reason, bad)


def test_a_reversal_ident_is_a_stan_and_a_field_7() -> None:
    check_ident("000001", "0115120000")
    refused("reversal_stan", check_ident, "00001", "0115120000")
    refused("reversal_datetime", check_ident, "000001", "011512000")


def test_an_outcome_carries_at_most_a_2_character_rc_6_character_code_and_12_character_rrn() -> None:
    check_outcome_args(1, "00", "123456", "123456789012")
    check_outcome_args(1, None, None, None)
    refused("txn_id", check_outcome_args, "1", "00", None, None)
    refused("rc", check_outcome_args, 1, "000", None, None)
    refused("rc", check_outcome_args, 1, "0", None, None)
    refused("auth_code", check_outcome_args, 1, "00", "1234567", None)
    refused("rrn", check_outcome_args, 1, "00", None, "1234567890123")


def test_a_late_answer_is_journalled_whatever_its_code_but_not_a_negative_amount() -> None:
    check_late_args("", None)
    check_late_args("00", 0)
    refused("rc", check_late_args, "000", None)
    refused("rc", check_late_args, None, None)
    for bad in (-1, True, "5"):
        refused("amount", check_late_args, "00", bad)


def test_states_are_parsed_strictly() -> None:
    assert parse_enum(SafState, "parked", "state") is SafState.PARKED
    err = refused("state", parse_enum, SafState, "lost", "state")
    assert "SafState" in str(err)
    refused("state", parse_enum, SafState, 1, "state")
    assert parse_outcome("declined") is T.DECLINED
    err = refused("state", parse_outcome, "reversed")
    assert "reversed is not an outcome" in str(err)


def test_free_text_is_clipped_and_a_pan_in_it_is_masked() -> None:
    text = clip_text(f"host said: card {TEST_PAN} refused", "last_error")
    assert TEST_PAN not in text and "622202" in text and TEST_PAN[-4:] in text
    assert clip_text("x" * (MAX_TEXT + 10), "last_error") == "x" * MAX_TEXT
    assert clip_text("", "last_error") == ""
    refused("reason", clip_text, "  ", "reason", required=True)
    refused("note", clip_text, None, "note")
    assert "non-empty" in str(refused("reason", clip_text, "", "reason", required=True))


def test_a_refusal_keeps_what_the_terminal_sent_shown_safely() -> None:
    rec = RefusalRecord(terminal_id="T\x01" + "x" * 20, mti="02000", rc="A0", reason=f"bad MAC {TEST_PAN}",
                        batch="0000017", stan="12345678", merchant_id="M" * 20, amount=0)
    assert rec.terminal_id == "T?" + "x" * 14 and rec.mti == "0200"
    assert (rec.batch, rec.stan, rec.merchant_id) == ("000001", "123456", "M" * 15)
    assert TEST_PAN not in rec.reason
    assert printable(TEST_PAN, 19) != TEST_PAN and printable(12, 4) == "12"
    with pytest.raises(InvalidRecord):
        RefusalRecord(terminal_id="T1", mti="0200", rc="A0", reason="x", amount=10**12)
    with pytest.raises(InvalidRecord):
        RefusalRecord(terminal_id="T1", mti="0200", rc="A0", reason="x", amount=-1)
    with pytest.raises(InvalidRecord):
        RefusalRecord(terminal_id="T1", mti="0200", rc="A0", reason="x", kind="k" * 21)
    assert RefusalRecord(terminal_id="T1", mti="0200", rc="A0", reason="x", amount=10**12 - 1).amount


# --- credits ----------------------------------------------------------------------------------------


def test_a_void_or_refund_needs_a_completed_purchase() -> None:
    sale = record(amount=500)
    assert credit_refusal(TxnKind.REFUND, 100, None, []) == "25"
    assert credit_refusal(TxnKind.REFUND, 100, record(kind=TxnKind.PREAUTH), []) == "12"
    assert credit_refusal(TxnKind.REFUND, 100, record(state=T.REVERSED), []) == "12"
    assert credit_refusal(TxnKind.VOID, 500, sale, []) is None
    assert credit_refusal(TxnKind.VOID, 499, sale, []) == "64"


def test_refunds_together_never_exceed_the_sale_and_in_flight_ones_count() -> None:
    sale = record(amount=500)
    done = record(txn_id=2, kind=TxnKind.REFUND, amount=300, state=T.COMPLETED)
    flying = record(txn_id=3, kind=TxnKind.REFUND, amount=100, state=T.PENDING)
    failed = record(txn_id=4, kind=TxnKind.REFUND, amount=400, state=T.DECLINED)
    assert credit_refusal(TxnKind.REFUND, 200, sale, [done]) is None
    assert credit_refusal(TxnKind.REFUND, 201, sale, [done]) == "64"
    assert credit_refusal(TxnKind.REFUND, 101, sale, [done, flying]) == "64"
    assert credit_refusal(TxnKind.REFUND, 100, sale, [done, flying, failed]) is None


def test_a_voided_sale_takes_no_more_credits_and_a_void_waits_for_no_refund() -> None:
    sale = record(amount=500)
    void = record(txn_id=2, kind=TxnKind.VOID, amount=500, state=T.PENDING)
    refund = record(txn_id=3, kind=TxnKind.REFUND, amount=1, state=T.COMPLETED)
    assert credit_refusal(TxnKind.REFUND, 1, sale, [void]) == "12"
    assert credit_refusal(TxnKind.VOID, 500, sale, [void]) == "12"
    assert credit_refusal(TxnKind.VOID, 500, sale, [refund]) == "12"
    assert credit_refusal(TxnKind.VOID, 500, sale, [record(txn_id=2, kind=TxnKind.VOID, state=T.DECLINED)]) is None


# --- reading back -----------------------------------------------------------------------------------


def test_a_row_reads_back_as_the_record_with_its_enums() -> None:
    rec = record(state=T.REVERSED, reversed_from=T.TIMED_OUT, reversal_initiator=ReversalInitiator.TERMINAL,
                 rc="11")
    row = tuple(str(v) if isinstance(v, TxnKind | TxnState | ReversalInitiator) else v
                for v in (getattr(rec, c) for c in TXN_COLUMNS))
    back = txn_from_row(row)
    assert back == rec
    assert back.kind is TxnKind.PURCHASE and back.state is T.REVERSED and back.reversed_from is T.TIMED_OUT
    assert back.reversal_initiator is ReversalInitiator.TERMINAL
    assert back.approved and not record(rc="10").approved and not record(rc=None).approved
    plain = txn_from_row(tuple(getattr(record(), c) for c in TXN_COLUMNS))
    assert plain.reversed_from is None and plain.reversal_initiator is None


def entry(**overrides: object) -> SafEntry:
    values: dict[str, object] = {"saf_id": 3, "txn_id": 1, "state": "pending", "reason": "98", "initiator": "gateway",
                                 "attempts": 0, "total_attempts": 0, "queued_at": 1.0, "next_attempt_at": 1.0,
                                 "updated_at": 1.0}
    values.update(overrides)
    row = tuple(values.get(c) for c in SAF_COLUMNS)
    return saf_from_row(row, record())


def test_a_reversal_is_sent_as_a_repeat_once_an_attempt_may_have_reached_the_host() -> None:
    first = entry()
    assert first.state is SafState.PENDING and first.initiator is ReversalInitiator.GATEWAY
    assert not first.is_repeat
    assert entry(attempts=1).is_repeat
    assert entry(reversal_stan="000001").is_repeat
    queued = QueuedReversal(first, created=False)
    assert not queued and queued.saf_id == 3 and QueuedReversal(first, created=True)


def test_a_25_stands_unless_the_original_was_approved_late() -> None:
    assert not_found_overtaken("25", 5.0)
    assert not not_found_overtaken("25", None)
    assert not not_found_overtaken("00", 5.0)


def test_an_operator_search_matches_every_given_filter_and_the_time_window() -> None:
    rec = record(created_at=100.0)
    assert TxnQuery().matches(rec)
    assert TxnQuery(terminal_id="T0000001", amount=1000, since=100.0, until=100.5).matches(rec)
    assert not TxnQuery(terminal_id="T0000002").matches(rec)
    assert not TxnQuery(since=100.5).matches(rec)
    assert not TxnQuery(until=100.0).matches(rec)  # until is exclusive
    assert TxnQuery(amount=1000, state=T.COMPLETED).equalities() == {"amount": 1000, "state": T.COMPLETED}
    assert TxnQuery(since=1.0).equalities() == {}


def test_cards_with_an_unknown_organisation_settle_as_domestic() -> None:
    assert is_domestic("CUP") and is_domestic("000") and is_domestic("")
    assert not is_domestic("VIS")


# --- what a refusal says: the reason and the field, as the operator's API and the log show them --------

LONG_FP = "a" * 64


@pytest.mark.parametrize(("field", "bad", "said"), [
    ("kind", "bogus", "unknown transaction kind (field kind)"),
    ("kind", 5, "unknown transaction kind (field kind)"),
    ("kind", ["purchase"], "unknown transaction kind (field kind)"),  # e.g. a JSON list: refused, no TypeError
    ("terminal_id", "T1", "expected 8..8 printable characters (field terminal_id)"),
    ("merchant_id", "M1", "expected 15..15 printable characters (field merchant_id)"),
    ("batch", "1", "expected 6 digits (field batch)"),
    ("terminal_stan", "00001", "expected 6 digits (field terminal_stan)"),
    ("terminal_stan", "00000a", "expected 6 digits (field terminal_stan)"),
    ("terminal_mti", "02000", "expected 4 digits (field terminal_mti)"),
    ("terminal_mti", None, "expected 4 digits (field terminal_mti)"),
    ("processing_code", "0", "expected 6 digits (field processing_code)"),
    ("amount", -1, "expected an integer amount in minor units, 0 ≤ amount < 10^12 (field amount)"),
    ("amount", 10**12, "expected an integer amount in minor units, 0 ≤ amount < 10^12 (field amount)"),
    ("amount", True, "expected an integer amount in minor units, 0 ≤ amount < 10^12 (field amount)"),
    ("amount", 1.0, "expected an integer amount in minor units, 0 ≤ amount < 10^12 (field amount)"),
    ("amount", "5", "expected an integer amount in minor units, 0 ≤ amount < 10^12 (field amount)"),
    ("currency", "15", "expected 3..3 printable characters (field currency)"),
    ("currency", None, "expected 3..3 printable characters (field currency)"),
    ("terminal_id", None, "expected 8..8 printable characters (field terminal_id)"),
    ("pan_masked", None, "expected a masked PAN of at most 19 characters (field pan_masked)"),
    ("pan_masked", TEST_PAN[:11] + "****", "more than 10 digits shown: mask the PAN (6+4) (field pan_masked)"),
    ("pan_fingerprint", "A" * 64, "expected 64 lowercase hex characters (or empty) (field pan_fingerprint)"),
    ("card_org", "VISA", "expected 0..3 printable characters (field card_org)"),
    ("host_mti", "020", "expected 4 digits (field host_mti)"),
    ("host_stan", "1", "expected 6 digits (field host_stan)"),
    ("transmission_datetime", "1", "expected 10 digits (field transmission_datetime)"),
    ("pos_entry_mode", "", "expected 1..4 printable characters (field pos_entry_mode)"),
    ("pos_condition_code", "000", "expected 1..2 printable characters (field pos_condition_code)"),
    ("orig_txn_id", "1", "expected an integer id (field orig_txn_id)"),
    ("orig_batch", "1", "expected 6 digits (field orig_batch)"),
    ("orig_stan", "1", "expected 6 digits (field orig_stan)"),
    ("orig_rrn", "", "expected 1..12 printable characters (field orig_rrn)"),
    ("orig_date", "1", "expected 4 digits (field orig_date)"),
    ("orig_auth_code", "", "expected 1..6 printable characters (field orig_auth_code)"),
])
def test_a_refused_request_names_the_field_and_what_it_must_be(field: str, bad: object, said: str) -> None:
    err = refused(field, request, **{field: bad})
    assert str(err) == said


def test_every_optional_field_of_a_request_may_be_left_out() -> None:
    optional = ("host_mti", "host_stan", "transmission_datetime", "pos_entry_mode", "pos_condition_code",
                "orig_txn_id", "orig_batch", "orig_stan", "orig_rrn", "orig_date", "orig_auth_code")
    nothing: dict[str, Any] = dict.fromkeys(optional)
    rec = request(**nothing)
    assert all(getattr(rec, name) is None for name in optional)
    assert request(orig_txn_id=0).orig_txn_id == 0


def test_a_request_of_a_known_kind_keeps_it_as_the_enum() -> None:
    for kind in TxnKind:
        assert request(kind=str(kind)).kind is kind


@pytest.mark.parametrize(("call", "said"), [
    (lambda: check_outcome_args(True, "00", None, None), "expected an integer id (field txn_id)"),
    (lambda: check_outcome_args(1, "0", None, None), "expected 2..2 printable characters (field rc)"),
    (lambda: check_outcome_args(1, "0\n", None, None), "expected 2..2 printable characters (field rc)"),
    (lambda: check_outcome_args(1, "00", "", None), "expected 1..6 printable characters (field auth_code)"),
    (lambda: check_outcome_args(1, "00", None, ""), "expected 1..12 printable characters (field rrn)"),
    (lambda: check_late_args("000", None), "expected a response code of at most 2 characters (field rc)"),
    (lambda: check_late_args("00", -1), "expected a non-negative integer amount (field amount)"),
    (lambda: check_reason("9"), "expected a 2-character reversal reason code (field reason)"),
    (lambda: check_reason("9-"), "expected a 2-character reversal reason code (field reason)"),
    (lambda: check_limit(0), "expected a positive integer (field limit)"),
    (lambda: check_id(None, "saf_id"), "expected an integer id (field saf_id)"),
    (lambda: check_ident("00001", "0115120000"), "expected 6 digits (field reversal_stan)"),
    (lambda: check_ident("000001", "01151200000"), "expected 10 digits (field reversal_datetime)"),
    (lambda: check_ident(None, "0115120000"), "expected 6 digits (field reversal_stan)"),
    (lambda: check_ident("000001", None), "expected 10 digits (field reversal_datetime)"),
    (lambda: parse_enum(SafState, "lost", "state"), "not a valid SafState (field state)"),
    (lambda: parse_enum(TxnState, None, "new_state"), "not a valid TxnState (field new_state)"),
    (lambda: parse_outcome("reversed"), "reversed is not an outcome (field state)"),
    (lambda: parse_outcome(7), "not a valid TxnState (field state)"),
    (lambda: clip_text(None, "note"), "expected a text (field note)"),
    (lambda: clip_text(" ", "note", required=True), "expected a non-empty text (field note)"),
    (lambda: pan_fingerprint(b"k" * 15, TEST_PAN), "the key must be at least 16 bytes (field pan_key)"),
    (lambda: pan_fingerprint(b"k" * 16, "1234567"), "a PAN is 8 to 19 digits (field pan)"),
    (lambda: pan_fingerprint(b"k" * 16, "1234567a"), "a PAN is 8 to 19 digits (field pan)"),
])
def test_a_refused_argument_says_what_it_must_be(call: Any, said: str) -> None:
    with pytest.raises(InvalidRecord) as err:
        call()
    assert str(err.value) == said


def test_a_pan_fingerprint_is_the_hmac_sha256_of_the_digits_under_the_key() -> None:
    import hashlib
    import hmac
    key = bytearray(b"k" * 16)
    expected = hmac.new(bytes(key), TEST_PAN.encode(), hashlib.sha256).hexdigest()
    assert pan_fingerprint(key, TEST_PAN) == expected  # type: ignore[arg-type]  # a bytearray key is taken too == pan_fingerprint(bytes(key), TEST_PAN)
    assert pan_fingerprint(b"j" * 16, TEST_PAN) != expected


def test_the_shape_of_codes_and_ids_at_their_edges() -> None:
    check_outcome_args(0, "A0", "1", "1")
    check_late_args("0", 0)
    check_late_args("", 10**15)
    assert check_limit(10**6) == 10**6
    assert check_reason("06") == "06"
    refused("limit", check_limit, "5")
    refused("amount", check_late_args, "00", 1.5)


@pytest.mark.parametrize(("field", "bad", "said"), [
    ("rc", "000", "expected 2..2 printable characters (field rc)"),
    ("reason", "", "expected a non-empty text (field reason)"),
    ("kind", "k" * 21, "expected 0..20 printable characters (field kind)"),
    ("amount", -1, "expected a non-negative integer amount (field amount)"),
    ("amount", True, "expected a non-negative integer amount (field amount)"),
    ("amount", 1.0, "expected a non-negative integer amount (field amount)"),
    ("amount", 10**12, "expected a non-negative integer amount (field amount)"),
    ("pan_masked", TEST_PAN, "more than 10 digits shown: mask the PAN (6+4) (field pan_masked)"),
    ("pan_masked", TEST_PAN + "0", "expected a masked PAN of at most 19 characters (field pan_masked)"),
    ("pan_fingerprint", "0" * 63, "expected 64 lowercase hex characters (or empty) (field pan_fingerprint)"),
])
def test_a_refusal_record_refuses_what_it_cannot_show_safely(field: str, bad: object, said: str) -> None:
    args: dict[str, Any] = {"terminal_id": "T1", "mti": "0200", "rc": "A0", "reason": "x", field: bad}
    with pytest.raises(InvalidRecord) as err:
        RefusalRecord(**args)
    assert str(err.value) == said


def test_a_refusal_record_keeps_the_terminals_values_and_its_own() -> None:
    rec = RefusalRecord(terminal_id="T0000001", mti="0200", rc="61", reason="over the daily limit",
                        merchant_id="MERCHANT0000001", batch="000001", stan="000042", kind="purchase", amount=1,
                        pan_masked="622202*********4321", pan_fingerprint=LONG_FP)
    assert (rec.terminal_id, rec.mti, rec.rc, rec.reason, rec.merchant_id, rec.batch, rec.stan, rec.kind,
            rec.amount, rec.pan_masked, rec.pan_fingerprint) == (
        "T0000001", "0200", "61", "over the daily limit", "MERCHANT0000001", "000001", "000042", "purchase", 1,
        "622202*********4321", LONG_FP)
    bare = RefusalRecord(terminal_id="", mti="", rc=None, reason="garbage")  # type: ignore[arg-type]
    assert (bare.terminal_id, bare.merchant_id, bare.amount, bare.kind) == ("", None, None, None)
    odd: dict[str, Any] = {"terminal_id": b"\x01T" * 20, "mti": 7}  # what a broken decoder might hand over
    assert RefusalRecord(**odd, rc="30", reason="x").terminal_id == printable(b"\x01T" * 20, 16)


def test_a_row_that_does_not_match_the_columns_is_refused_not_read_askew() -> None:
    # a journal table with a column more or less than this code knows (a migration not applied, or
    # applied twice) must fail loudly: values read one column off would misstate amounts and states
    row = tuple(getattr(record(), c) for c in TXN_COLUMNS)
    with pytest.raises(ValueError):
        txn_from_row((*row, None))
    values = {"saf_id": 3, "txn_id": 1, "state": "pending", "reason": "98", "initiator": "gateway", "attempts": 0,
              "total_attempts": 0, "queued_at": 1.0, "next_attempt_at": 1.0, "updated_at": 1.0}
    saf_row = tuple(values.get(c) for c in SAF_COLUMNS)
    with pytest.raises(ValueError):
        saf_from_row((*saf_row, None), record())


@pytest.mark.parametrize("state", [T.PENDING, T.DECLINED, T.REVERSED])
def test_a_reversal_records_only_an_outcome_after_which_money_may_have_moved(state: TxnState) -> None:
    with pytest.raises(InvalidRecord) as err:
        reversal_from(T.PENDING, state)
    assert str(err.value) == f"a reversal cannot record outcome {state} (field state)"
    assert reversal_from(T.PENDING, T.HOST_REJECTED) is T.HOST_REJECTED


def test_a_pan_in_a_terminal_value_is_shown_masked_6_4_not_dropped() -> None:
    assert printable(f"card {TEST_PAN}", 40) == f"card {TEST_PAN[:6]}*********{TEST_PAN[-4:]}"


def test_a_fingerprint_with_a_character_that_is_not_hex_is_refused() -> None:
    for bad in ("f" * 63 + "X", "X" + "0" * 63, "0" * 63 + " "):
        refused("pan_fingerprint", request, pan_fingerprint=bad)


def test_a_currency_is_three_characters_and_a_condition_code_one_or_two() -> None:
    refused("currency", request, currency="1560")
    assert request(pos_condition_code="6").pos_condition_code == "6"
    assert request(pos_entry_mode="0211").pos_entry_mode == "0211"


def test_a_state_no_outcome_leads_to_has_no_sources() -> None:
    # an empty tuple, not None: the backends build their conditional UPDATE's IN (...) from it
    for state in (T.PENDING, T.REVERSED, T.REVERSAL_QUEUED):
        assert outcome_sources(state) == ()


# --- a terminal's 0400 of a sale a credit stands against; the host's not-booked answer ------------


def _record(kind: str, state: str, txn_id: int = 1) -> TxnRecord:
    fields = {name: getattr(request("000001"), name) for name in REQUEST_COLUMNS}
    fields.update(kind=TxnKind(kind), amount=800)
    return TxnRecord(**fields, txn_id=txn_id, state=TxnState(state), created_at=0.0, updated_at=0.0)


@pytest.mark.parametrize(("original", "referencing", "expected"), [
    (("purchase", "completed"), [], None),
    (("purchase", "completed"), [("void", "pending")], "12"),  # in flight: it may credit the card
    (("purchase", "completed"), [("refund", "completed")], "12"),
    (("purchase", "completed"), [("refund", "declined"), ("void", "reversed")], None),  # no money moved
    (("purchase", "completed"), [("refund", "declined"), ("void", "timed_out")], "12"),
    # only a sale is credited back by a void or refund; a pre-authorisation's completion is no credit
    (("void", "completed"), [("refund", "completed")], None),
    (("preauth", "completed"), [("completion", "completed")], None),
])
def test_a_terminal_reversal_is_refused_only_while_a_credit_of_the_sale_stands(
        original: tuple[str, str], referencing: list[tuple[str, str]], expected: str | None) -> None:
    refs = [_record(k, s, txn_id=2 + i) for i, (k, s) in enumerate(referencing)]
    assert reversal_refusal(_record(*original), refs) == expected


def test_the_hosts_not_booked_answer_is_25_or_00_and_nothing_else() -> None:
    assert [check_unknown_rc(rc) for rc in ("25", "00")] == ["25", "00"]
    for bad in ("12", "", None, 25):
        with pytest.raises(InvalidRecord) as err:
            check_unknown_rc(bad)
        assert err.value.field == "unknown_rc" and "25, 00" in str(err.value)
