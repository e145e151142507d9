"""The core's response-code decisions and translation, without sockets."""

from __future__ import annotations

import dataclasses

import pytest

from gateway.core import decisions, translate
from gateway.core.sessions import TerminalSession
from gateway.core.settlement import reconcile
from gateway.iso.build import TerminalIdent, cup
from gateway.iso.message import Message
from gateway.iso.totals import CardTotals, SettlementTotals
from gateway.store.records import TxnKind, TxnRecord, TxnState

IDENT = TerminalIdent("10000001", "898100012340001")
TRACK = "6222021234567890123D30121010000000000"


def purchase(amount: int = 1_000, stan: str = "000010", batch: str = "000001") -> Message:
    return cup.purchase(IDENT, stan, batch, amount, track2=TRACK)


def record(kind: TxnKind = TxnKind.PURCHASE, state: TxnState = TxnState.COMPLETED, amount: int = 1_000,
           txn_id: int = 1) -> TxnRecord:
    return TxnRecord(
        txn_id=txn_id, state=state, terminal_id=IDENT.terminal_id, merchant_id=IDENT.merchant_id, batch="000001",
        terminal_stan="000010", terminal_mti="0200", processing_code="000000", kind=kind, amount=amount,
        currency="156", pan_masked="622202*********0123", pan_fingerprint="", created_at=0.0, updated_at=0.0,
    )


def test_session_screening_needs_a_sign_in_with_the_same_batch() -> None:
    assert decisions.screen_session(purchase(), None) == "77"
    session = TerminalSession(IDENT.terminal_id, IDENT.merchant_id, "000001", "004")
    assert decisions.screen_session(purchase(), session) is None
    assert decisions.screen_session(purchase(batch="000002"), session) == "77"


def test_unsupported_versus_malformed() -> None:
    assert decisions.unsupported_rc(Message("0200", {})) == "40"
    assert decisions.unsupported_rc(Message("0900", {})) == "30"


def test_sign_in_request_reads_batch_and_key_mode() -> None:
    msg = cup.sign_in(IDENT, "000001", "000042", "003")
    assert decisions.sign_in_request(msg, "004") == ("000042", "003")
    odd = Message("0800", {"60": "00"})
    assert decisions.sign_in_request(odd, "004") == ("000001", "004")


def test_host_answer_checks() -> None:
    request = Message("0200", {"3": "000000", "4": "000000001000", "41": "10000001"})
    assert decisions.check_host_answer(request, Message("0210", dict(request.fields)), mac_ok=True) is None
    assert decisions.check_host_answer(request, Message("0210", dict(request.fields)), mac_ok=False)
    changed = dict(request.fields, **{"4": "000000009999"})
    assert "field 4" in decisions.check_host_answer(request, Message("0210", changed), mac_ok=True)


@pytest.mark.parametrize(
    ("flow", "amount", "original", "earlier", "expected"),
    [
        ("void", 1_000, None, [], "25"),
        ("void", 1_000, record(state=TxnState.DECLINED), [], "12"),
        ("void", 1_000, record(kind=TxnKind.REFUND), [], "12"),
        ("void", 999, record(), [], "64"),
        ("void", 1_000, record(), [], None),
        ("void", 1_000, record(), [record(kind=TxnKind.VOID, txn_id=2)], "12"),
        ("refund", 600, record(), [record(kind=TxnKind.REFUND, amount=400, txn_id=2)], None),
        ("refund", 601, record(), [record(kind=TxnKind.REFUND, amount=400, txn_id=2)], "64"),
        # a refund still at the host counts; one that failed does not use up the original's amount
        ("refund", 601, record(), [record(kind=TxnKind.REFUND, amount=400, state=TxnState.PENDING, txn_id=2)],
         "64"),
        ("refund", 1_000, record(), [record(kind=TxnKind.REFUND, amount=400, state=TxnState.DECLINED, txn_id=2)],
         None),
    ],
)
def test_original_problem(flow: str, amount: int, original: TxnRecord | None, earlier: list[TxnRecord],
                          expected: str | None) -> None:
    assert decisions.original_problem(purchase(amount), original, earlier, flow_name=flow) == expected


def test_terminal_reversal_codes() -> None:
    msg = purchase(1_000)
    assert decisions.terminal_reversal_rc(msg, None, "25") == "25"
    assert decisions.terminal_reversal_rc(msg, None, "00") == "00"
    assert decisions.terminal_reversal_rc(msg, record(amount=2_000), "25") == "64"
    assert decisions.terminal_reversal_rc(msg, record(kind=TxnKind.REFUND), "25", ("purchase",)) == "12"
    assert decisions.terminal_reversal_rc(msg, record(), "25", ("purchase",)) == "00"
    assert decisions.needs_host_reversal(record())
    assert not decisions.needs_host_reversal(record(state=TxnState.DECLINED))
    assert not decisions.needs_host_reversal(record(state=TxnState.REVERSED))


def test_refusals_carry_no_mac_and_approvals_a_placeholder() -> None:
    refused = decisions.refuse(purchase(), "A0")
    assert refused.mti == "0210" and refused.fields["39"] == "A0" and "64" not in refused.fields
    assert refused.fields["11"] == "000010" and refused.fields["41"] == IDENT.terminal_id


def test_card_org_decides_domestic_or_foreign() -> None:
    assert translate.card_org("6222021234567890123") == "CUP"
    assert translate.card_org("4111111111111111") == "VIS"
    assert translate.card_org("5500000000000004") == "MCC"
    assert translate.card_org(None) == "000"


def test_original_refs_from_field_61() -> None:
    void = Message("0200", {"61": "000001000123"})
    assert translate.original_refs(void) == ("000001", "000123", None)
    refund = Message("0220", {"61": "0000010001231123"})
    assert translate.original_refs(refund) == ("000001", "000123", "1123")


def test_reconcile_sets_the_result_codes() -> None:
    ours = SettlementTotals(CardTotals(1_000, 1, 0, 0), CardTotals())
    balanced_48, balanced = reconcile(ours.to_field48(), ours)
    assert balanced and balanced_48[30] == "1" and balanced_48[61] == "1"
    theirs = dataclasses.replace(ours, domestic=CardTotals(2_000, 2, 0, 0))
    off_48, ok = reconcile(theirs.to_field48(), ours)
    assert not ok and off_48[30] == "2" and off_48[61] == "1"
