"""Promises of `gateway.service` that the flow tests did not pin down (issue 16, mutation testing): what
an operator reads (the refusal reasons on record, the metrics by kind and code, the log line that names
the transaction), what a terminal gets for a frame that is not a request, an inquiry whose answer cannot
be delivered, and a security-module failure during the MAC check; then a failure mid-exchange, a terminal
reversal that must not overtake its original at the host, a refusal the journal rejects, the pending
requests of a stopped instance, a late approval that reopens a reversal, and the trace of the terminal
leg. Real loopback sockets, real SQLite.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from test_e2e_reversal import (
    FAST_SAF,
    HOST_TIMEOUT,
    RawTerminal,
    assert_no_charge_without_receipt,
    assert_reversed,
    eventually,
    host_entry,
    late_answers_of,
    only_txn,
    settled,
)
from test_journal_fault_steps import limit_used

from gateway.config import LimitsConfig, ReversalConfig
from gateway.iso.build import cup
from gateway.iso.codec import Codec
from gateway.iso.message import Message, mask_pan
from gateway.iso.spec import load_dialect
from gateway.lab import CARD_CUP, CARD_CUP_2, MERCHANT_ID, Lab, open_lab
from gateway.security.errors import KeyNotFoundError
from gateway.sim.host_rules import Fault
from gateway.store import sqlite as sqlite_backend
from gateway.store.errors import StoreIOError
from gateway.store.records import ReversalInitiator, TxnKind, TxnRecord, TxnRequest, TxnState
from gateway.trace.format import Direction, EventKind, Leg

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


# --- issue 16, second pass --------------------------------------------------------------------------


def flow_lines(caplog: pytest.LogCaptureFixture, level: int = logging.DEBUG) -> list[str]:
    """The service's log lines as an operator reads them (a line whose arguments do not fit its
    format raises here: the operator would get a logging traceback instead of the line)."""
    return [r.getMessage() for r in caplog.records if r.name == "gateway.flow" and r.levelno >= level]


def metric(lab: Lab, name: str) -> float:
    return lab.gateway.metrics.registry.get_sample_value(f"gateway_{name}_total") or 0.0


async def signed_in(lab: Lab) -> Any:
    t = lab.terminal(auto_reverse=False)
    await t.connect()
    await t.sign_in()
    return t


# --- a bug in the middle of an exchange --------------------------------------------------------------


async def test_a_failure_after_the_request_left_reverses_what_the_host_booked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Anything unexpected once the request may have reached the host (here: after the host booked it)
    is settled as an unknown outcome: the terminal gets 96, the charge is reversed (reason 06, from
    timed_out), the risk-limit reservation is given back, and the log names the transaction."""
    caplog.set_level(logging.INFO, logger="gateway.flow")
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        t = await signed_in(lab)
        link = lab.gateway.service.link
        real_request = link.request

        async def breaks_after_the_send(request: Any) -> Any:
            await real_request(request)
            raise RuntimeError("a bug after the host answered")

        monkeypatch.setattr(link, "request", breaks_after_the_send)
        result = await t.purchase(2_300, CARD_CUP)
        assert result.rc == "96" and not result.approved
        monkeypatch.setattr(link, "request", real_request)
        rec = await settled(lab, (await only_txn(lab)).txn_id)
        assert_reversed(rec, reason="06", was=TxnState.TIMED_OUT)
        assert host_entry(lab, rec).reversed
        assert limit_used(lab) == 0
        await assert_no_charge_without_receipt(lab)
        [refusal] = await eventually(lambda: lab.gateway.store.refusals(), "the 96 on record")
        # the whole record an operator looks the refusal up by: terminal, merchant, batch, STAN, card
        assert (refusal.rc, refusal.terminal_id, refusal.batch, refusal.stan) == (
            "96", rec.terminal_id, rec.batch, rec.terminal_stan)
        # the merchant too (its 15 digits are shown as the record shows any PAN-like run of digits)
        assert refusal.merchant_id == mask_pan(rec.merchant_id)
        assert (refusal.mti, refusal.kind, refusal.amount) == ("0200", "purchase", 2_300)
        assert refusal.pan_masked == mask_pan(CARD_CUP.pan) and refusal.pan_fingerprint == rec.pan_fingerprint
        assert refusal.reason == f"internal error mid-exchange (txn {rec.txn_id}): settled as unknown"
        assert (f"txn {rec.txn_id} (terminal {rec.terminal_id} stan {rec.terminal_stan}) failed mid-exchange"
                in flow_lines(caplog, logging.ERROR))


# --- a terminal reversal of an original still at the host ---------------------------------------------


async def test_a_terminal_reversal_of_an_original_still_at_the_host_goes_after_it_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The terminal's 0400 arrives while its 0200 is still at the host, and the gateway stops waiting
    for the original (`original_wait`) before the host books it. The reversal is held back until the
    original's exchange is over: it reaches the host once, after the booking (never a 25 that leaves
    the charge standing). The approval that comes meanwhile is delivered, but the row is already the
    reversal's: the approval is journalled as a late answer of that transaction."""
    caplog.set_level(logging.INFO, logger="gateway.flow")
    impatient = ReversalConfig(max_attempts=5, backoff=(0.2, 0.5, 1.0), poll_interval=0.05, original_wait=0.1)
    async with open_lab(tmp_path, terminals=1, host_timeout=1.0, reversal=impatient) as lab, RawTerminal(lab) as raw:
        lab.host.add_fault(Fault("booked_late", seconds=0.5, pan=CARD_CUP.pan, mti=("0200",), limit=1))
        await raw.sign_in()
        purchase = raw.purchase(7_100, CARD_CUP)
        await raw.send(purchase)
        await raw.send(raw.reversal(purchase, "98"))
        answers = {m.mti: m.fields["39"] for m in (await raw.receive(), await raw.receive())}
        assert answers == {"0410": "00", "0210": "00"}
        rec = await settled(lab, (await only_txn(lab)).txn_id)
        assert rec.state is TxnState.REVERSED and rec.reversal_initiator is ReversalInitiator.TERMINAL
        assert rec.reversal_reason == "98" and rec.reversal_rc == "00"
        assert host_entry(lab, rec).reversed
        assert lab.host.stats.messages["0400"] == 1 and lab.host.stats.responses["25"] == 0
        [late] = await late_answers_of(lab, rec.txn_id)
        assert late.rc == "00" and late.host_stan == rec.host_stan
        await assert_no_charge_without_receipt(lab)
        assert any(line.startswith(f"txn {rec.txn_id} was settled while its host answer (rc 00) was on the way (")
                   and line.endswith("): journalled as a late answer") for line in flow_lines(caplog))


# --- a refusal the journal refuses -----------------------------------------------------------------------


async def test_a_refusal_the_journal_rejects_is_counted_and_logged_not_retried(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A refusal whose write fails for a reason of its own (not the disk): the terminal has its answer,
    the journal stays healthy (nothing to retry), the loss is counted and logged with its cause."""
    caplog.set_level(logging.INFO, logger="gateway.flow")

    def rejected(conn: sqlite3.Connection, *args: Any) -> Any:
        raise sqlite3.IntegrityError("CHECK constraint failed: refusal")

    monkeypatch.setattr(sqlite_backend, "_op_record_refusal", rejected)
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        async with RawTerminal(lab) as raw:  # not signed in: refused 77 by the gateway itself
            body = raw.codec.encode(raw.purchase(1_000, CARD_CUP))
            assert raw.stream is not None
            await raw.stream.send(raw.framer.encode(body))
            assert (await raw.receive()).fields["39"] == "77"

        async def counted() -> bool:
            return metric(lab, "refusals_unrecorded") >= 1

        await eventually(counted, "the lost refusal counted")
        assert metric(lab, "refusals_unrecorded") == 1
        assert lab.gateway.service.journal_healthy and lab.gateway.service.journal_retry.backlog == 0
        assert await lab.gateway.store.refusals() == []
        lines = [line for line in flow_lines(caplog, logging.WARNING) if "refusal could not be journalled" in line]
        assert lines == ["a refusal could not be journalled: journal write failed: IntegrityError"]


# --- the pending requests of a stopped instance --------------------------------------------------------


def _pending_request(lab: Lab, stan: str) -> TxnRequest:
    """A purchase journalled `pending` by an instance that stopped before it was sent (the host never saw it)."""
    store = lab.gateway.store
    return TxnRequest(
        terminal_id=lab.config.terminals[0].terminal_id, merchant_id=MERCHANT_ID, batch="000001",
        terminal_stan=stan, terminal_mti="0200", processing_code="000000", kind=TxnKind.PURCHASE, amount=12_000,
        currency="156", pan_masked=mask_pan(CARD_CUP_2.pan), pan_fingerprint=store.fingerprint(CARD_CUP_2.pan),
        host_mti="0200", host_stan=stan, transmission_datetime=datetime.now(UTC).strftime("%m%d%H%M%S"),
        pos_entry_mode="012", pos_condition_code="00",
    )


async def test_orphans_of_a_stopped_instance_are_reversed_and_one_that_moved_on_is_left(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.flow")
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        store, service = lab.gateway.store, lab.gateway.service
        t = await signed_in(lab)
        sale = await t.purchase(3_300, CARD_CUP)
        assert sale.approved
        completed = await eventually(lambda: _row_in(lab, TxnState.COMPLETED), "the sale completed")
        orphan_id = await store.record_request(_pending_request(lab, "900001"))
        orphan = await store.get(orphan_id)
        assert orphan is not None and orphan.state is TxnState.PENDING
        # the completed sale as it was when the other instance took it: pending, since moved on
        queued = await service.settle_orphans([orphan, completed])
        assert queued == 1
        rec = await settled(lab, orphan_id)
        assert rec.state is TxnState.REVERSED and rec.reversed_from is TxnState.TIMED_OUT
        assert rec.reversal_reason == "06"
        again = await store.get(completed.txn_id)
        assert again is not None and again.state is TxnState.COMPLETED
        assert not host_entry(lab, again).reversed
        lines = flow_lines(caplog)
        assert (f"txn {orphan_id} (terminal {orphan.terminal_id} stan 900001) was left pending by an instance "
                "that stopped: reversal queued") in lines
        assert any(line.startswith(f"txn {completed.txn_id} of a stopped instance has moved on since (")
                   and line.endswith("): left as it is") for line in lines)


async def _row_in(lab: Lab, state: TxnState) -> TxnRecord | None:
    rows = [r for r in await lab.gateway.store.list_transactions() if r.state is state]
    return rows[0] if rows else None


async def test_the_orphan_sweep_survives_a_journal_failure_and_settles_on_the_next_round(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A shared journal hands this instance the pending requests of a stopped one (SQLite has none:
    its claim is replaced here by what PostgreSQL would hand over). A failing claim is logged with its
    traceback and the sweep goes on; the next round settles the orphan."""
    caplog.set_level(logging.INFO, logger="gateway.flow")
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        store, service = lab.gateway.store, lab.gateway.service
        orphan_id = await store.record_request(_pending_request(lab, "900002"))
        asked: list[float] = []

        async def claim(stale_after: float) -> list[TxnRecord]:
            asked.append(stale_after)
            if len(asked) == 1:
                raise StoreIOError("journal read failed: disk I/O error")
            rec = await store.get(orphan_id)
            return [rec] if rec is not None and rec.state is TxnState.PENDING else []

        monkeypatch.setattr(store, "claim_orphaned_pending", claim)
        async with anyio.create_task_group() as tg:
            await tg.start(lambda *, task_status: service.sweep_orphans(
                interval=0.05, stale_after=7.5, task_status=task_status))
            rec = await settled(lab, orphan_id)
            tg.cancel_scope.cancel()
        assert rec.state is TxnState.REVERSED and rec.reversed_from is TxnState.TIMED_OUT
        assert asked[:2] == [7.5, 7.5]  # the staleness it was given, each round
        errors = [r for r in caplog.records if r.name == "gateway.flow" and r.levelno == logging.ERROR]
        assert [r.getMessage() for r in errors] == ["could not settle the pending requests of stopped instances"]
        assert errors[0].exc_info is not None and isinstance(errors[0].exc_info[1], StoreIOError)


async def test_a_late_approval_that_reopens_a_reversal_is_logged_with_its_transaction(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The reversal of a timed-out purchase overtook it at the host (25); the host then approves the
    purchase after all: the reversal goes again, and the operator's line names the transaction."""
    caplog.set_level(logging.INFO, logger="gateway.flow")
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        lab.host.add_fault(Fault("booked_late", seconds=HOST_TIMEOUT + 1.0, pan=CARD_CUP.pan, mti=("0200",),
                                 limit=1))
        t = await signed_in(lab)
        assert (await t.purchase(4_100, CARD_CUP)).rc == "98"
        txn_id = (await only_txn(lab)).txn_id

        async def reversed_again() -> TxnRecord | None:
            rec = await lab.gateway.store.get(txn_id)
            return rec if rec is not None and rec.state is TxnState.REVERSED and rec.reversal_rc == "00" else None

        rec = await eventually(reversed_again, "the reopened reversal acknowledged")
        assert host_entry(lab, rec).reversed
        assert metric(lab, "reversals_queued") == 2
        assert f"txn {txn_id}: the host approved it after answering its reversal 25: reversal reopened" in \
            flow_lines(caplog, logging.WARNING)


# --- the trace of the terminal leg -------------------------------------------------------------------


class RecordingTap:
    """A `gateway.trace.tap.Tap` that keeps every call, for what the trace of a run would hold."""

    def __init__(self) -> None:
        self.frames: list[tuple[Any, ...]] = []
        self.events: list[tuple[Any, ...]] = []
        self.connections: list[tuple[Any, ...]] = []

    def opened(self, leg: Any, conn: object, peer: str) -> None:
        self.connections.append(("opened", leg, conn, peer))

    def closed(self, leg: Any, conn: object, detail: str = "") -> None:
        self.connections.append(("closed", leg, conn, detail))

    def frame(self, leg: Any, direction: Any, conn: object, body: bytes, envelope: Any = None,
              cause: int | None = None) -> int | None:
        self.frames.append((leg, direction, conn, body, envelope))
        return len(self.frames)

    def event(self, leg: Any, conn: object, kind: Any, detail: str = "") -> None:
        self.events.append((leg, conn, kind, detail))


async def test_the_trace_holds_each_answer_written_and_each_one_that_could_not_be(tmp_path: Path) -> None:
    """With recording on, every answer the service writes to a terminal is in the trace as the bytes
    and envelope that went out, and an approval that could not be written is an `undelivered` event
    naming it (class, STAN, terminal, response code): what a replay of the trace is checked against."""
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        tap = RecordingTap()
        lab.gateway.service.tap = tap
        lab.host.add_fault(Fault("delay", seconds=0.25, pan=CARD_CUP.pan, mti=("0200",), limit=1))
        async with RawTerminal(lab) as raw:
            await raw.sign_in()

            async def written() -> list[tuple[Any, ...]]:
                return tap.frames  # recorded once the write returned: maybe just after the terminal read it

            [(leg, direction, conn, body, envelope)] = await eventually(written, "the 0810 in the trace")
            assert (leg, direction) == (Leg.TERMINAL, Direction.OUT)
            signed = Codec(load_dialect("cup-pos")).decode(body)
            assert (signed.mti, signed.fields["39"], signed.fields["41"]) == ("0810", "00", raw.terminal_id)
            # the envelope of the answer: the request's TPDU with destination and source swapped
            assert envelope is not None and envelope.tpdu == bytes.fromhex("6000000001")
            purchase = raw.purchase(1_900, CARD_CUP)
            await raw.send(purchase)
            await raw.hang_up()

        async def undelivered() -> list[tuple[Any, ...]]:
            return tap.events

        [(leg, gone, kind, detail)] = await eventually(undelivered, "the undelivered approval in the trace")
        assert (leg, kind) == (Leg.TERMINAL, EventKind.UNDELIVERED) and gone is conn
        assert detail == f"class=020 11={purchase.fields['11']} 41={raw.terminal_id} 39=00"
        assert len(tap.frames) == 1  # nothing more went out
        rec = await settled(lab, (await only_txn(lab)).txn_id)
        assert rec.state is TxnState.REVERSED and rec.reversed_from is TxnState.UNDELIVERABLE


async def test_a_request_without_a_terminal_id_is_refused_97_and_on_record_without_one(tmp_path: Path) -> None:
    """The refusal's record names the terminal as sent: none here, never a made-up id."""
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        async with RawTerminal(lab) as raw:
            sign_in = cup.sign_in(raw.ident, raw.next_stan(), raw.batch, "004")
            anonymous = Message(sign_in.mti, {k: v for k, v in sign_in.fields.items() if k != "41"})
            answer = await raw.exchange(anonymous)
            assert answer.fields["39"] == "97" and "41" not in answer.fields
        [refusal] = await eventually(lambda: lab.gateway.store.refusals(), "the 97 on record")
        assert (refusal.rc, refusal.terminal_id, refusal.reason) == ("97", "", "terminal not registered")
        assert refusal.stan == sign_in.fields["11"] and refusal.kind == "sign_in"


async def test_an_untrusted_host_approval_is_logged_with_its_transaction_and_why(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.flow")
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        lab.host.add_fault(Fault("wrong_mac", pan=CARD_CUP.pan, mti=("0200",), limit=1))
        t = await signed_in(lab)
        assert (await t.purchase(2_400, CARD_CUP)).rc == "96"
        rec = await settled(lab, (await only_txn(lab)).txn_id)
        assert_reversed(rec, reason="A0", was=TxnState.HOST_REJECTED)
        assert (f"host answer for txn {rec.txn_id} not trusted (the host's MAC does not verify): terminal gets 96"
                in flow_lines(caplog, logging.ERROR))


async def test_a_bug_before_anything_was_journalled_gets_a_defined_96_on_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The bug guard: the terminal gets 96 at once (not silence), the refusal on record names the error,
    the log line names the request with its traceback, and nothing was journalled or sent."""
    from gateway.core import translate

    caplog.set_level(logging.DEBUG)
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        t = await signed_in(lab)

        def broken(request: Message, security: Any) -> Any:
            raise RuntimeError("a bug in the card data")

        monkeypatch.setattr(translate, "card_data", broken)
        result = await t.purchase(1_200, CARD_CUP)
        assert result.rc == "96"
        [refusal] = await eventually(lambda: lab.gateway.store.refusals(), "the 96 on record")
        assert (refusal.rc, refusal.reason, refusal.kind) == ("96", "internal error: RuntimeError", "purchase")
        assert await lab.gateway.store.list_transactions() == []
        assert lab.host.stats.messages["0200"] == 0
        [line] = [r for r in caplog.records if r.name == "gateway.flow" and r.levelno == logging.ERROR]
        assert line.getMessage() == f"error while processing 0200 from terminal {lab.config.terminals[0].terminal_id}"
        assert line.exc_info is not None and isinstance(line.exc_info[1], RuntimeError)
        # the wire line of each request says where it came in (what a log search by direction finds)
        wire = [r for r in caplog.records if r.name == "gateway.wire" and r.args and r.args[1] == "0200"]  # type: ignore[index]
        assert wire and all(r.args[0] == "terminal_in" for r in wire)  # type: ignore[index]


async def test_a_repeated_stan_is_refused_94_and_on_record_with_its_batch_and_stan(tmp_path: Path) -> None:
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        async with RawTerminal(lab) as raw:
            await raw.sign_in()
            purchase = raw.purchase(1_300, CARD_CUP)
            assert (await raw.exchange(purchase)).fields["39"] == "00"
            assert (await raw.exchange(purchase)).fields["39"] == "94"  # the same batch and STAN again
        [refusal] = await eventually(lambda: lab.gateway.store.refusals(), "the 94 on record")
        stan = purchase.fields["11"]
        assert refusal.rc == "94" and refusal.stan == stan
        assert refusal.reason == f"duplicate: batch {raw.batch} stan {stan} is already journalled"
        assert refusal.pan_masked == mask_pan(CARD_CUP.pan)
        assert lab.host.stats.messages["0200"] == 1


async def test_a_host_answer_without_a_response_code_is_reversed_not_taken_for_a_decline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by the mutation pass (issue 16; fixed on main by the money review as well): an answer that
    carries no field 39 was journalled declined (rc 96) and never reversed, while the host may have
    charged the customer (here it did). The terminal gets 96 and the charge is reversed."""
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        t = await signed_in(lab)
        link = lab.gateway.service.link
        real_request = link.request

        async def without_response_code(request: Any) -> Any:
            reply = await real_request(request)
            del reply.message.fields["39"]  # a host bug: the approval's code lost on the way
            return reply

        monkeypatch.setattr(link, "request", without_response_code)
        result = await t.purchase(2_700, CARD_CUP)
        assert result.rc == "96" and not result.approved
        monkeypatch.setattr(link, "request", real_request)
        rec = await settled(lab, (await only_txn(lab)).txn_id)
        assert rec.state is TxnState.REVERSED and rec.reversed_from is TxnState.HOST_REJECTED
        assert rec.reversal_reason == "06" and host_entry(lab, rec).reversed
        assert limit_used(lab) == 0
        await assert_no_charge_without_receipt(lab)


async def test_the_settlement_line_says_whether_the_batch_balanced(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.flow")
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        t = await signed_in(lab)
        assert (await t.purchase(1_400, CARD_CUP)).approved
        batch = t.batch  # the batch moves on once settled
        result = await t.settle()
        terminal_id = lab.config.terminals[0].terminal_id
        lines = [line for line in flow_lines(caplog) if "settlement:" in line]
        assert lines == [f"terminal {terminal_id} batch {batch} settlement: balanced"], (result, lines)
