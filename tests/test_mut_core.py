"""Promises of gateway/core that mutation testing (issue 16) found unasserted: the amount checks of
voids and terminal reversals treat a missing field 4 as zero (refused for the amount, never a crash);
a terminal that never used its limit has used 0; batch numbers run 000001..999999 and wrap to 000001;
signing off a terminal that is not signed in is harmless; field 90 is well formed even for an
original journalled without its host leg's references."""

from __future__ import annotations

import dataclasses

from gateway.config import LimitsConfig
from gateway.core import decisions, translate
from gateway.core.limits import RiskLimits
from gateway.core.sessions import SessionTable, next_batch
from gateway.iso.message import Message
from gateway.store.records import TxnKind, TxnRecord, TxnState


def record(amount: int = 1_000, **changes: object) -> TxnRecord:
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
