"""Pure parts of the store: record validation, PAN fingerprints, transition rules, settlement sums."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from test_store_support import PAN_KEY, TEST_PAN, request

from gateway.store import InvalidRecord, TxnKind, TxnState, pan_fingerprint
from gateway.store.records import (
    OUTCOME_STATES,
    REVERSIBLE_STATES,
    outcome_allowed,
    outcome_sources,
    reversal_from,
    totals_from_groups,
)


def test_fingerprint_is_a_keyed_hmac() -> None:
    fp = pan_fingerprint(PAN_KEY, TEST_PAN)
    assert fp == hmac.new(PAN_KEY, TEST_PAN.encode(), hashlib.sha256).hexdigest()
    assert fp != pan_fingerprint(b"another-key-of-sufficient-size!!", TEST_PAN)
    assert fp != hashlib.sha256(TEST_PAN.encode()).hexdigest()  # not guessable without the key


@pytest.mark.parametrize("pan", ["", "12345", "6222 0212 3456 7894", "62220212345678943210000", "62220A"])
def test_fingerprint_refuses_what_is_not_a_pan_without_echoing_it(pan: str) -> None:
    with pytest.raises(InvalidRecord) as err:
        pan_fingerprint(PAN_KEY, pan)
    assert err.value.field == "pan"
    assert not pan or pan not in str(err.value)


def test_fingerprint_key_must_be_long_enough() -> None:
    with pytest.raises(InvalidRecord) as err:
        pan_fingerprint(b"0123456789", TEST_PAN)
    assert err.value.field == "pan_key"


def test_a_clear_pan_is_refused_as_masked_pan() -> None:
    with pytest.raises(InvalidRecord) as err:
        request(pan_masked=TEST_PAN)
    assert err.value.field == "pan_masked"
    assert TEST_PAN not in str(err.value)
    with pytest.raises(InvalidRecord):
        request(pan_masked="622202123****4321")  # 11 digits shown: more than 6 + 4


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("terminal_id", "T1"),
        ("merchant_id", "M1"),
        ("batch", "1"),
        ("terminal_stan", "00001A"),
        ("terminal_mti", "200"),
        ("processing_code", "0"),
        ("kind", "lottery"),
        ("amount", -1),
        ("amount", 10**12),
        ("amount", True),
        ("amount", "100"),
        ("currency", "1560"),
        ("pan_fingerprint", "abc"),
        ("pan_fingerprint", "A" * 64),
        ("host_stan", "1"),
        ("transmission_datetime", "1123"),
        ("orig_txn_id", "7"),
        ("orig_date", "112"),
        ("card_org", "VISA"),
    ],
)
def test_invalid_fields_are_named(field: str, value: object) -> None:
    with pytest.raises(InvalidRecord) as err:
        request(**{field: value})
    assert err.value.field == field


def test_kind_is_normalised_and_aliases_are_accepted() -> None:
    assert request(kind="purchase").kind is TxnKind.PURCHASE
    assert request(kind="balance").kind is TxnKind.BALANCE_INQUIRY
    assert request(kind="void_reversal").kind is TxnKind.REVERSAL
    # a request without a PAN (none on the card read) is recordable
    assert request(pan_masked="", pan_fingerprint="").pan_masked == ""


def test_transition_rules() -> None:
    assert set(outcome_sources(TxnState.COMPLETED)) == {TxnState.PENDING, TxnState.COMPLETED}
    assert set(outcome_sources(TxnState.UNDELIVERABLE)) == {
        TxnState.PENDING,
        TxnState.COMPLETED,
        TxnState.UNDELIVERABLE,
    }
    for state in OUTCOME_STATES:
        assert outcome_allowed(TxnState.PENDING, state)
        assert not outcome_allowed(TxnState.REVERSAL_QUEUED, state)
        assert not outcome_allowed(TxnState.REVERSED, state)
    assert not outcome_allowed(TxnState.DECLINED, TxnState.COMPLETED)
    assert TxnState.DECLINED not in REVERSIBLE_STATES
    assert reversal_from(TxnState.COMPLETED, None) == TxnState.COMPLETED
    assert reversal_from(TxnState.PENDING, TxnState.TIMED_OUT) == TxnState.TIMED_OUT
    with pytest.raises(InvalidRecord):
        reversal_from(TxnState.PENDING, TxnState.DECLINED)


def test_totals_from_groups_splits_debit_credit_and_card_groups() -> None:
    totals = totals_from_groups(
        [
            ("purchase", "CUP", 3, 300),
            ("completion", "CUP", 1, 50),
            ("offline_sale", "000", 1, 7),
            ("void", "CUP", 1, 100),
            ("refund", "VIS", 2, 40),
            ("purchase", "JCB", 1, 900),
            ("balance_inquiry", "CUP", 4, 0),
            ("reversal", "CUP", 1, 300),
        ]
    )
    d, f = totals.domestic, totals.foreign
    assert (d.debit_count, d.debit_amount, d.credit_count, d.credit_amount) == (5, 357, 1, 100)
    assert (f.debit_count, f.debit_amount, f.credit_count, f.credit_amount) == (1, 900, 2, 40)
