"""Message masking and MTI arithmetic."""

from __future__ import annotations

import pytest

from gateway.iso.message import Message, mask_pan
from gateway.iso.mti import (
    is_request,
    is_response,
    is_reversal,
    match_class,
    mti_class,
    original_mti,
    repeat_mti,
    response_mti,
)

PAN = "6222021234567890123"


def test_mask_pan_first_six_last_four() -> None:
    assert mask_pan(PAN) == "622202*********0123"
    assert mask_pan("4111111111111111") == "411111******1111"
    assert mask_pan("123456") == "******"  # too short to show anything


def test_repr_and_masked_never_show_secrets() -> None:
    msg = Message("0200", {"2": PAN, "4": "000000001000", "35": PAN + "D30121010000", "52": "24B5254F5321BBC2",
                           "55": "9F2608AABBCCDD", "62": "0011223344556677", "48": PAN})
    for text in (repr(msg), str(msg), str(msg.masked())):
        assert PAN not in text
        assert "24B5254F5321BBC2" not in text
        assert "0011223344556677" not in text
        assert "622202*********0123" in text
        assert "000000001000" in text  # the amount is not a secret
    assert msg.masked()["35"] == f"<redacted {len(msg.fields['35'])}>"


def test_field_48_is_shown_only_for_settlement_totals() -> None:
    totals = "0" * 62
    assert Message("0500", {"48": totals}).masked()["48"] == totals
    assert Message("0320", {"48": "01" + "00" + "000001" + PAN.rjust(20, "0") + "0" * 12}).masked()["48"].startswith(
        "<redacted")


@pytest.mark.parametrize(
    ("request_mti", "answer"),
    [("0200", "0210"), ("0220", "0230"), ("0400", "0410"), ("0401", "0410"), ("0800", "0810"), ("0500", "0510")],
)
def test_response_mti(request_mti: str, answer: str) -> None:
    assert response_mti(request_mti) == answer
    assert is_request(request_mti) and is_response(answer)
    assert match_class(request_mti) == match_class(answer)


def test_response_mti_refuses_responses_and_garbage() -> None:
    with pytest.raises(ValueError):
        response_mti("0210")
    with pytest.raises(ValueError):
        response_mti("02x0")


def test_repeat_and_reversal_helpers() -> None:
    assert repeat_mti("0400") == "0401"
    assert repeat_mti("0220") == "0221"
    assert original_mti("0401") == "0400"
    assert original_mti("0400") == "0400"
    assert is_reversal("0400") and is_reversal("0410") and not is_reversal("0200")
    assert mti_class("0800") == "8"
