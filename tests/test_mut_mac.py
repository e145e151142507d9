"""Promises of gateway/security/mac.py that mutation testing (issue 16) found unasserted: an operator
told a key is wrong is told *which* key; an empty MAB and a key X9.19 cannot use are refused with a
reason that says so; a terminal configured without a MAC algorithm gets the CUP ECB MAC."""

from __future__ import annotations

import re

import pytest

from gateway.security import mac
from gateway.security.errors import KeyFormatError, MacError

MAK = bytes.fromhex("0123456789ABCDEF")
MAB = b"0200 a message authentication block"
SHORT_KEY = bytes(7)  # no DES key is 7 bytes long


@pytest.mark.parametrize(("compute", "name"), [
    (mac.cbc_mac, "MAC key"), (mac.retail_mac, "MAC key"), (mac.cup_mac, "MAK"), (mac.cup_mac_steps, "MAK"),
])
def test_a_malformed_key_is_named_in_the_refusal(compute, name):
    with pytest.raises(KeyFormatError, match=rf"^{re.escape(name)} must be 8, 16 or 24 bytes, got 7$"):
        compute(SHORT_KEY, MAB)


@pytest.mark.parametrize("compute", [mac.pad_method1, mac.xor_blocks])
def test_an_empty_mab_is_refused_as_empty(compute):
    with pytest.raises(MacError, match=r"^MAC input is empty$"):
        compute(b"")


def test_x919_refuses_a_triple_length_key_saying_why():
    with pytest.raises(KeyFormatError, match=r"^X9\.19 MAC needs an 8- or 16-byte key, got 24$"):
        mac.retail_mac(bytes.fromhex("0123456789ABCDEF" "FEDCBA9876543210" "89ABCDEF01234567"), MAB)


def test_the_default_terminal_mac_is_the_cup_ecb_mac():
    assert mac.terminal_mac(MAK, MAB) == mac.cup_mac(MAK, MAB)
    assert mac.terminal_mac(MAK, MAB) != mac.terminal_mac(MAK, MAB, "x919")
