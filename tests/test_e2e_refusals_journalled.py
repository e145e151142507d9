"""The gateway journals the requests it refuses itself (issue 12 item 6: "the refusal reason";
README: `journal find --card/--terminal` and `journal refusals` show them), over real loopback sockets
with a real SQLite journal: unknown terminal (97), not signed in (77), risk limit (61), bad MAC (A0).
Each refusal keeps the code, a reason, the masked PAN and the card's fingerprint, never the PAN."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio
import pytest

from gateway.config import LimitsConfig
from gateway.iso.build import TerminalIdent, cup
from gateway.iso.codec import Codec
from gateway.iso.framing import CupEnvelope, make_framer
from gateway.iso.spec import load_dialect
from gateway.lab import CARD_CUP, LOOPBACK, MERCHANT_ID, open_lab
from gateway.security.algorithms import generate_key
from gateway.security.keys import KeyUsage

pytestmark = pytest.mark.anyio

CODEC = Codec(load_dialect("cup-pos"))
ENVELOPE = CupEnvelope.from_hex("6000010000", "603100310000")


async def exchange(port: int, body: bytes) -> str:
    framer = make_framer("cup", envelope=ENVELOPE)
    async with await anyio.connect_tcp(LOOPBACK, port) as stream:
        await stream.send(framer.encode(body, ENVELOPE))
        decoder = framer.decoder()
        with anyio.fail_after(10):
            while True:
                frames = decoder.feed(await stream.receive())
                if frames:
                    return CODEC.decode(frames[0].body).fields["39"]


async def test_refusals_are_journalled_with_reason_and_card(tmp_path: Path) -> None:
    async with open_lab(tmp_path, terminals=2, limits=LimitsConfig(per_transaction=50_000, per_day=60_000)) as lab:
        port = lab.gateway.terminal_port
        tid = lab.config.terminals[0].terminal_id
        unknown = cup.purchase(TerminalIdent("99999999", MERCHANT_ID), "000123", "000001", 1_000,
                               track2=CARD_CUP.track2)
        assert await exchange(port, CODEC.encode(unknown)) == "97"
        not_signed_in = cup.purchase(TerminalIdent(tid, MERCHANT_ID), "000124", "000001", 1_000,
                                     track2=CARD_CUP.track2)
        assert await exchange(port, CODEC.encode(not_signed_in)) == "77"
        t = lab.terminal(tid)
        await t.connect()
        await t.sign_in()
        assert (await t.purchase(50_001, CARD_CUP)).rc == "61"
        good_mak = t._keys[KeyUsage.MAK]
        t._keys[KeyUsage.MAK] = generate_key(8)
        assert (await t.purchase(1_000, CARD_CUP)).rc == "A0"
        t._keys[KeyUsage.MAK] = good_mak
        assert (await t.purchase(1_000, CARD_CUP)).approved  # an approval is a transaction, not a refusal

        store = lab.gateway.store
        refusals = await store.refusals()
        assert [(r.rc, r.terminal_id) for r in reversed(refusals)] == [
            ("97", "99999999"), ("77", tid), ("61", tid), ("A0", tid)]
        fingerprint = store.fingerprint(CARD_CUP.pan)
        for r in refusals:
            assert r.reason and r.mti == "0200"
            assert r.pan_masked == CARD_CUP.pan[:6] + "*" * (len(CARD_CUP.pan) - 10) + CARD_CUP.pan[-4:]
            assert r.pan_fingerprint == fingerprint
        assert [r.amount for r in await store.refusals(rc="61")] == [50_001]
        assert len(await store.refusals(pan_fingerprint=fingerprint, terminal_id=tid)) == 3
    with sqlite3.connect(tmp_path / "journal.db") as db:
        dump = "\n".join(db.iterdump())
    assert CARD_CUP.pan not in dump and CARD_CUP.track2 not in dump
