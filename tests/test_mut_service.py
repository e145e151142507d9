"""Promises of `gateway.service` that the flow tests did not pin down (issue 16, mutation testing): what
an operator reads (the refusal reasons on record, the metrics by kind and code, the log line that names
the transaction), what a terminal gets for a frame that is not a request, an inquiry whose answer cannot
be delivered, and a security-module failure during the MAC check. Real loopback sockets, real SQLite.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from test_e2e_reversal import FAST_SAF, HOST_TIMEOUT, RawTerminal, eventually

from gateway.config import LimitsConfig
from gateway.iso.build import cup
from gateway.iso.message import Message
from gateway.lab import CARD_CUP, Lab, open_lab
from gateway.security.errors import KeyNotFoundError
from gateway.sim.host_rules import Fault
from gateway.store.records import TxnKind, TxnRecord, TxnState

pytestmark = pytest.mark.anyio


def sample(lab: Lab, name: str, **labels: str) -> float:
    return lab.gateway.metrics.registry.get_sample_value(f"gateway_{name}", labels) or 0.0


def decode_errors(lab: Lab, kind: str) -> float:
    return sample(lab, "decode_errors_total", kind=kind)


def messages(lab: Lab, direction: str, mti: str, rc: str) -> float:
    return sample(lab, "messages_total", direction=direction, mti=mti, rc=rc)


async def counted(value: Callable[[], float], expected: float) -> None:
    """Until the metric reaches `expected` (bounded); then it must not be more."""

    async def reached() -> bool:
        return value() >= expected

    await eventually(reached, f"metric at {expected}")
    assert value() == expected


async def refusal_reasons(lab: Lab) -> dict[str, str]:
    """rc -> reason of the refusals on record, oldest first (one per rc in these tests)."""
    return {r.rc: r.reason for r in reversed(await lab.gateway.store.refusals())}


async def test_a_frame_that_is_not_a_request_is_counted_and_ignored_and_garbage_closes_the_connection(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.flow")
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        async with RawTerminal(lab) as raw:
            await raw.sign_in()
            assert messages(lab, "terminal_in", "0800", "none") == 1
            # an answer MTI from a terminal: ignored (no answer), counted, the connection goes on
            stray = cup.echo(raw.ident, raw.batch)
            await raw.send(Message("0830", dict(stray.fields)))
            echo = await raw.exchange(cup.echo(raw.ident, raw.batch))
            assert echo.mti == "0830" and echo.fields["39"] == "00"
            # frames of one connection are processed concurrently, and a counter moves after the write
            await counted(lambda: decode_errors(lab, "unknown_mti"), 1)
            await counted(lambda: messages(lab, "terminal_in", "0830", "none"), 1)
            await counted(lambda: messages(lab, "terminal_out", "0830", "00"), 1)
            # a body that does not decode: no answer can be matched, the connection is closed
            assert raw.stream is not None
            await raw.stream.send(raw.framer.encode(b"\x02\x00garbage"))
            with anyio.fail_after(5), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await raw.stream.receive()
        errors = {s.labels["kind"]: s.value for m in lab.gateway.metrics.registry.collect() for s in m.samples
                  if s.name == "gateway_decode_errors_total" and s.value}
        assert errors.pop("unknown_mti") == 1 and list(errors.values()) == [1], errors
        undecodable = [r for r in caplog.records if "undecodable message from" in r.getMessage()]
        assert len(undecodable) == 1 and "127.0.0.1" in undecodable[0].getMessage()


async def test_the_refusals_on_record_say_why(tmp_path: Path) -> None:
    limits = LimitsConfig(per_transaction=5_000, per_day=8_000)
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF, limits=limits) as lab:
        async with RawTerminal(lab) as raw:  # not signed in: no keys, so the MAC is zeros
            body = raw.codec.encode(raw.purchase(1_000, CARD_CUP))
            assert raw.stream is not None
            await raw.stream.send(raw.framer.encode(body))
            assert (await raw.receive()).fields["39"] == "77"
        t = lab.terminal(auto_reverse=False)
        await t.connect()
        await t.sign_in()
        assert (await t.purchase(6_000, CARD_CUP)).rc == "61"
        reasons = await eventually(lambda: refusal_reasons(lab), "refusals on record")
        assert reasons["77"] == "not signed in"
        assert reasons["61"] == "over the per-transaction risk limit"
        assert (await t.purchase(5_000, CARD_CUP)).approved  # exactly the per-transaction limit: allowed
        # the same amount again passes the per-transaction limit but not the day's
        assert (await t.purchase(5_000, CARD_CUP)).rc == "61"

        async def daily() -> list[str]:
            return [r.reason for r in await lab.gateway.store.refusals(rc="61") if "daily" in r.reason]

        assert await eventually(daily, "the daily refusal on record") == ["over the daily risk limit"]
        await counted(lambda: messages(lab, "terminal_out", "0210", "61"), 2)
        lab.gateway.service.draining = True
        assert (await t.purchase(100, CARD_CUP)).rc == "91"
        lab.gateway.service.draining = False
        reasons = await eventually(lambda: refusal_reasons(lab), "refusals on record")
        assert reasons["91"] == "the gateway is shutting down"
        assert lab.host.stats.messages["0200"] == 1


async def test_a_security_module_failure_in_the_mac_check_refuses_with_its_own_code(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        t = lab.terminal(auto_reverse=False)
        await t.connect()
        await t.sign_in()

        def keys_gone(terminal_id: str, mab: bytes, mac: bytes) -> None:
            raise KeyNotFoundError(f"no MAK for terminal {terminal_id}")

        monkeypatch.setattr(lab.gateway.service.security, "verify_terminal_mac", keys_gone)
        result = await t.purchase(1_000, CARD_CUP)
        assert result.rc == KeyNotFoundError.response_code  # A7, not a bad-MAC A0
        reasons = await eventually(lambda: refusal_reasons(lab), "refusal on record")
        assert reasons["A7"] == "MAC check failed: key_not_found"
        assert lab.host.stats.messages["0200"] == 0


async def test_an_inquiry_whose_answer_cannot_be_delivered_keeps_the_host_references(tmp_path: Path) -> None:
    """Not reversible: the row says undeliverable, with the host's RRN and authorisation code, which is
    what an operator needs to find it at the host."""
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        lab.host.add_fault(Fault("delay", seconds=0.25, pan=CARD_CUP.pan, mti=("0200",), limit=1))
        async with RawTerminal(lab) as raw:
            await raw.sign_in()
            await raw.send(cup.balance_inquiry(raw.ident, raw.next_stan(), raw.batch, pan=CARD_CUP.pan,
                                               expiry=CARD_CUP.expiry, entry_mode="012"))
            await raw.hang_up()

        async def undeliverable() -> TxnRecord | None:
            rows = await lab.gateway.store.list_transactions()
            return rows[0] if rows and rows[0].state is TxnState.UNDELIVERABLE else None

        rec = await eventually(undeliverable, "the inquiry journalled undeliverable")
        assert rec.kind is TxnKind.BALANCE_INQUIRY and rec.rc == "00"
        assert rec.rrn and rec.auth_code
        assert await lab.gateway.store.saf_for_txn(rec.txn_id) is None
