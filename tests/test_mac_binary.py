"""CUP field 64 is 8 bytes of binary on the wire (reference §2, §4.1): a MAC with a byte that is not
a hex character is a MAC that does not verify (A0, connection kept), never an undecodable message
(connection closed, which the terminal takes for a comms failure and reverses a sale that never left)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.iso.build import cup
from gateway.iso.codec import Codec
from gateway.iso.message import Message
from gateway.iso.spec import load_dialect
from gateway.lab import CARD_CUP, open_lab

pytestmark = pytest.mark.anyio

CUP = Codec(load_dialect("cup-pos"))


def test_field_64_decodes_as_bytes_whatever_they_are() -> None:
    body = CUP.encode(Message("0820", {"41": "10000001", "64": "0" * 16}))
    for mac in (b"8456B1CD", b"\xff\x00ZZ\x80abc", b"8456b1cd"):
        msg = CUP.decode(body[:-8] + mac)
        assert msg.fields["64"] == mac.hex().upper()
        assert CUP.encode(msg) == body[:-8] + mac  # and encodes back to the same bytes


async def test_a_mac_with_a_non_hex_byte_gets_a0_and_the_connection_stays(tmp_path: Path) -> None:
    async with open_lab(tmp_path) as lab:
        t = lab.terminal()
        await t.connect()
        await t.sign_in()
        host_before = sum(lab.host.stats.messages.values())
        request = cup.purchase(t.ident, t._stan(), t.batch, 1_000, **t._card_input(CARD_CUP, None, "swipe"))
        body = CUP.encode(request)
        garbled = body[:-8] + b"\xff" + body[-7:]  # one MAC byte that no hex MAC can have
        answer = await t._exchange(request, garbled)
        assert answer is not None, "no answer: the gateway closed the connection"
        assert answer.message.fields["39"] == "A0" and "64" not in answer.message.fields
        assert sum(lab.host.stats.messages.values()) == host_before  # nothing went upstream
        # the same connection carries the next, honest purchase
        assert t.connected
        assert (await t.purchase(1_000, CARD_CUP)).approved
        assert lab.gateway.metrics.registry.get_sample_value("gateway_mac_failures_total") == 1
