"""Issue 16, named escape 3: a MAC is compared on all its bytes. The bad-MAC tests elsewhere use random
MACs or zeros, which a comparison of the first byte only refuses 15 times in 16; here each MAC is the
right one with exactly one byte changed, for every byte position: at the comparison itself, at the
security module (terminal MAC and host MAC), and end to end (a terminal's purchase over a real socket).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_e2e_reversal import RawTerminal
from test_security_module import TID, Host, Terminal

from gateway.iso.message import Message
from gateway.lab import CARD_CUP, open_lab
from gateway.security import algorithms as alg
from gateway.security.errors import MacError
from gateway.security.mac import CUP_MAC_LENGTH, macs_equal
from gateway.security.module import SoftwareSecurityModule


def one_byte_off(mac: bytes, position: int) -> bytes:
    """`mac` with the byte at `position` changed; an ASCII hex character stays one (still well formed:
    the change must be caught by the comparison, not by a format check)."""
    old = mac[position]
    hex_digit = chr(old) in "0123456789ABCDEFabcdef"
    new = (ord("1") if old == ord("0") else ord("0")) if hex_digit else old ^ 0x01
    return mac[:position] + bytes([new]) + mac[position + 1:]


def test_macs_equal_compares_every_byte() -> None:
    mac = os.urandom(8)
    assert macs_equal(mac, bytes(mac))
    for position in range(len(mac)):
        assert not macs_equal(mac, one_byte_off(mac, position)), position
    assert not macs_equal(mac, mac[:-1]) and not macs_equal(mac, mac + b"\0")


@pytest.fixture
def hsm_and_peers() -> tuple[SoftwareSecurityModule, Terminal, Host]:
    tmk, host = alg.generate_key(16), Host(alg.generate_key(16))
    module = SoftwareSecurityModule()
    module.import_clear_key("TMK", tmk, TID)
    module.import_clear_key("ZMK", host.zmk)
    module.install_host_key("ZAK", host.zak_under, host.zak_kcv)
    terminal = Terminal(tmk)
    terminal.sign_in(module.issue_working_keys(TID, "004"), "004")
    return module, terminal, host


def test_a_terminal_mac_wrong_in_any_one_byte_is_refused(hsm_and_peers: tuple[SoftwareSecurityModule, Terminal, Host]
                                                         ) -> None:
    hsm, terminal, _ = hsm_and_peers
    mab = os.urandom(200)
    mac = terminal.mac(mab)
    assert len(mac) == CUP_MAC_LENGTH
    hsm.verify_terminal_mac(TID, mab, mac)
    for position in range(CUP_MAC_LENGTH):
        with pytest.raises(MacError, match="does not verify"):
            hsm.verify_terminal_mac(TID, mab, one_byte_off(mac, position))
        # field 64 as the decoded message carries it (hex text of the 8 wire bytes)
        with pytest.raises(MacError, match="does not verify"):
            hsm.verify_terminal_mac(TID, mab, one_byte_off(mac, position).hex().upper())


def test_a_host_mac_wrong_in_any_one_byte_is_refused(hsm_and_peers: tuple[SoftwareSecurityModule, Terminal, Host]
                                                     ) -> None:
    hsm, _, host = hsm_and_peers
    mab = os.urandom(300)
    mac = alg.retail_mac(host.zak, mab)
    hsm.verify_host_mac(mab, mac)
    for position in range(len(mac)):
        with pytest.raises(MacError, match="does not verify"):
            hsm.verify_host_mac(mab, one_byte_off(mac, position))


class TamperingTerminal(RawTerminal):
    """Sends a request whose MAC is right but for the byte at `position` (None: the right MAC)."""

    position: int | None = None

    async def send(self, msg: Message) -> None:
        if "64" not in msg.fields or self.position is None:
            await super().send(msg)
            return
        assert self.stream is not None and self.mak is not None
        body = self.codec.encode(msg)
        mac = one_byte_off(alg.cup_mac(self.mak, body[:-8]), self.position)
        await self.stream.send(self.framer.encode(body[:-8] + mac))


@pytest.mark.anyio
async def test_a_purchase_whose_mac_is_wrong_in_any_one_byte_gets_a0_and_goes_nowhere(tmp_path: Path) -> None:
    async with open_lab(tmp_path, terminals=1) as lab, TamperingTerminal(lab) as t:
        await t.sign_in()
        for position in range(CUP_MAC_LENGTH):
            t.position = position
            answer = await t.exchange(t.purchase(1_000 + position, CARD_CUP))
            assert answer.fields.get("39") == "A0", (position, answer.fields.get("39"))
        assert lab.host.stats.messages["0200"] == 0, "a purchase with a bad MAC went to the host"
        assert await lab.gateway.store.list_transactions() == []
        refusals = await lab.gateway.store.refusals()
        assert sorted(r.rc for r in refusals) == ["A0"] * CUP_MAC_LENGTH
        t.position = None  # the control: the same terminal, the right MAC, is approved
        answer = await t.exchange(t.purchase(2_000, CARD_CUP))
        assert answer.fields.get("39") == "00" and lab.host.stats.messages["0200"] == 1
