"""Issue 11 items 3, 10 and 13: answers the gateway decides itself.

- An approval the terminal dialect cannot carry (field 54 of 100 characters; CUP allows 40) is reversed,
  and the terminal gets a defined non-approval (96) at once instead of waiting out its timeout.
- Every refusal the gateway decides itself is on record in the journal with its reason (seed problem
  004: a merchant's refund "shows system error" and nobody can say why), and `gateway journal refusals`
  lists it.
- Repeated warnings are rate-limited (94), an unregistered terminal (97) is logged.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from gateway.cli import build_parser
from gateway.iso.build import TerminalIdent, cup
from gateway.iso.codec import Codec
from gateway.iso.framing import CupEnvelope, make_framer
from gateway.iso.message import Message
from gateway.iso.spec import load_dialect
from gateway.lab import CARD_CUP, LOOPBACK, MERCHANT_ID, Lab, open_lab
from gateway.store.records import TxnState

pytestmark = pytest.mark.anyio

CODEC = Codec(load_dialect("cup-pos"))
ENVELOPE = CupEnvelope.from_hex("6000010000", "603100310000")
#: ISO 8583:1987 allows 120 characters of additional amounts (54); the CUP dialect 40
LONG_54 = "1001156C000000010000" * 5


def host_adds_long_54(lab: Lab) -> Callable[[], None]:
    """Make the host's approvals carry a field 54 of 100 characters; returns the undo."""
    original_answer = lab.host._answer

    def long_54(request: object, rc: str, **kwargs: object) -> Message:
        answer = original_answer(request, rc, **kwargs)  # type: ignore[arg-type]
        if rc == "00" and answer.mti in ("0210", "0230"):
            answer.fields["54"] = LONG_54
        return answer

    lab.host._answer = long_54  # type: ignore[method-assign]

    def undo() -> None:
        lab.host._answer = original_answer  # type: ignore[method-assign]

    return undo


async def final(lab: Lab, terminal_id: str, stan: str) -> object:
    with anyio.fail_after(10):
        while True:
            rows = [r for r in await lab.gateway.store.list_transactions(terminal_id=terminal_id)
                    if r.terminal_stan == stan]
            if rows and rows[0].state not in (TxnState.PENDING, TxnState.REVERSAL_QUEUED):
                return rows[0]
            await anyio.sleep(0.05)


async def test_an_approval_the_terminal_cannot_carry_gets_96_at_once_and_is_reversed(tmp_path: Path) -> None:
    async with open_lab(tmp_path, terminals=1) as lab:
        t = lab.terminal(auto_reverse=False, timeout=4.0)
        await t.connect()
        await t.sign_in()
        before = lab.host.balance(CARD_CUP.pan)
        undo = host_adds_long_54(lab)
        started = time.monotonic()
        result = await t.purchase(1_000, CARD_CUP)
        waited = time.monotonic() - started
        undo()
        assert result.rc == "96" and not result.timed_out, result
        assert waited < t.timeout / 2, f"the terminal waited {waited:.1f}s for its answer"
        print(f"\nanswer the terminal cannot carry: 96 after {waited * 1000:.0f} ms (terminal timeout {t.timeout}s)")
        row = await final(lab, t.ident.terminal_id, result.stan)
        assert row.state is TxnState.REVERSED and row.reversed_from is TxnState.UNDELIVERABLE  # type: ignore[attr-defined]
        assert lab.host.balance(CARD_CUP.pan) == before
        refusals = await lab.gateway.store.refusals(terminal_id=t.ident.terminal_id)
        assert refusals and refusals[0].rc == "96" and "cannot be encoded" in refusals[0].reason
        assert (await t.purchase(1_100, CARD_CUP)).approved  # the connection is still in step


async def test_seed_problem_004_a_refund_showing_system_error_has_its_reason_on_record(tmp_path: Path) -> None:
    """A merchant's refund "shows system error" (96). The operator finds why in the journal, by
    terminal and card, with the masked PAN only."""
    async with open_lab(tmp_path, terminals=1) as lab:
        t = lab.terminal(auto_reverse=False, timeout=4.0)
        await t.connect()
        await t.sign_in()
        sale = await t.purchase(5_000, CARD_CUP)
        assert sale.approved
        undo = host_adds_long_54(lab)
        refund = await t.refund(2_000, CARD_CUP, original=sale)
        undo()
        assert refund.rc == "96"
        store = lab.gateway.store
        found = await store.refusals(terminal_id=t.ident.terminal_id, pan_fingerprint=store.fingerprint(CARD_CUP.pan))
        assert len(found) == 1, found
        why = found[0]
        assert (why.rc, why.kind, why.amount, why.stan, why.mti) == ("96", "refund", 2_000, refund.stan, "0220")
        assert "field 54" in why.reason or "54" in why.reason, why.reason
        assert why.pan_masked == "622202*********0123" and CARD_CUP.pan not in repr(why)

        from gateway.store.cli import cmd_journal_refusals

        out = io.StringIO()
        args = build_parser().parse_args(["journal", "refusals", "--db", str(lab.config.store.path),
                                          "--terminal", t.ident.terminal_id])
        assert await anyio.to_thread.run_sync(cmd_journal_refusals, args, out) == 0  # its own event loop
        listing = out.getvalue()
        assert "refund" in listing and "96" in listing and "cannot be encoded" in listing
        assert CARD_CUP.pan not in listing


async def test_repeated_duplicates_are_rate_limited_and_an_unregistered_terminal_is_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with open_lab(tmp_path, terminals=1) as lab:
        t = lab.terminal(auto_reverse=False)
        await t.connect()
        await t.sign_in()
        first = await t.purchase(1_000, CARD_CUP)
        assert first.approved
        caplog.set_level(logging.WARNING, logger="gateway.flow")
        caplog.clear()
        repeats = 20
        for _ in range(repeats):
            t.stans = type(t.stans)(start=int(first.stan))  # the same STAN again: a duplicate
            assert (await t.purchase(1_000, CARD_CUP)).rc == "94"
        duplicates = [r for r in caplog.records if "repeated batch/stan" in r.getMessage()]
        assert 1 <= len(duplicates) <= 2, f"{len(duplicates)} warnings for {repeats} duplicates"

        caplog.clear()
        async with await anyio.connect_tcp(LOOPBACK, lab.gateway.terminal_port) as stream:
            framer = make_framer("cup", envelope=ENVELOPE)
            request = cup.purchase(TerminalIdent("99999999", MERCHANT_ID), "000123", "000001", 1_000,
                                   track2=CARD_CUP.track2)
            await stream.send(framer.encode(CODEC.encode(request), ENVELOPE))
            decoder = framer.decoder()
            with anyio.fail_after(5):
                frames = []
                while not frames:
                    frames = decoder.feed(await stream.receive())
        assert CODEC.decode(frames[0].body).fields["39"] == "97"
        assert any("not registered" in r.getMessage() and "99999999" in r.getMessage() for r in caplog.records)
        refusals = await lab.gateway.store.refusals(rc="94")
        assert len(refusals) == repeats  # every one on record, even when not logged one by one


async def test_store_max_refusals_bounds_what_the_journal_keeps(tmp_path: Path) -> None:
    from gateway.config import load_config
    from gateway.metrics import NullMetrics
    from gateway.serve import open_store
    from gateway.store.records import RefusalRecord

    config_file = tmp_path / "gateway.toml"
    config_file.write_text(f'[store]\npath = "{tmp_path / "journal.db"}"\npan_hash_key_hex = "{"11" * 32}"\n'
                           "max_refusals = 3\n", encoding="utf-8")
    config = load_config(config_file, environ={})
    async with open_store(config, NullMetrics()) as store:
        for n in range(5):
            store.record_refusal_soon(RefusalRecord(terminal_id="10000001", mti="0200", rc="97",
                                                    reason=f"flood {n}"), on_error=pytest.fail)
        kept = await store.refusals()
    assert [r.reason for r in kept] == ["flood 4", "flood 3", "flood 2"]
