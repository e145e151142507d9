"""The terminal simulator against a tiny fake CUP "gateway" written here: its own CUP framing (length,
TPDU, header), a real field-62 key block, and independent checks of the simulator's MAC, PIN block
and encrypted track 2. Proves the simulator's cryptography, its answer checks, automatic reversals,
STAN matching with several requests in flight, settlement, and the load driver built on it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime

import anyio
import anyio.abc
import pytest

from gateway.iso.build import response
from gateway.iso.codec import Codec
from gateway.iso.message import Message
from gateway.iso.spec import load_dialect
from gateway.iso.totals import CardTotals, SettlementTotals, unpack_batch_end, unpack_batch_items
from gateway.security import KeyUsage, SoftwareSecurityModule
from gateway.security.algorithms import (
    build_key_block,
    cup_mac,
    decrypt_pin_block,
    decrypt_track,
    generate_key,
    macs_equal,
)
from gateway.security.errors import SecurityError
from gateway.sim.terminal import (
    NO_PIN,
    Card,
    NotSignedIn,
    SignInError,
    TerminalSimulator,
)

pytestmark = pytest.mark.anyio

CODEC = Codec(load_dialect("cup-pos"))
TMK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
TID, MID = "POS00001", "898440353110001"
CARD = Card("6222020000000015", pin="123456")
FOREIGN = Card("4111111111111111", pin="1234")
HOST_BATCH = "000777"


@dataclass
class Seen:
    message: Message
    mac_ok: bool | None = None
    pin: str | None = None
    track: str | None = None
    header: bytes = b""


@dataclass
class FakeCupGateway:
    """Answers CUP terminal requests. `crypto="clear"` holds its own clear working keys and checks
    with the pure functions; `crypto="module"` goes through the gateway's SoftwareSecurityModule."""

    crypto: str = "clear"
    delays: dict[int, float] = field(default_factory=dict)  #: amount → answer delay
    silent: set[int] = field(default_factory=set)  #: amounts never answered
    rc_by_amount: dict[int, str] = field(default_factory=dict)
    wrong_mac: set[int] = field(default_factory=set)
    wrong_echo: set[int] = field(default_factory=set)  #: answer with another amount in 4
    resign: set[int] = field(default_factory=set)  #: header processing requirement 3
    close_on: set[int] = field(default_factory=set)  #: amounts that make it hang up instead
    silent_reversals: int = 0  #: drop this many 0400s first
    bad_kcv: bool = False
    forget: set[int] = field(default_factory=set)  #: approve but leave out of the host's totals
    seen: list[Seen] = field(default_factory=list)
    answer_order: list[str] = field(default_factory=list)
    #: terminal id → its clear working keys
    terminal_keys: dict[str, dict[KeyUsage, bytes]] = field(default_factory=dict)
    #: stan → (kind, amount, domestic)
    approved: dict[str, tuple[str, int, bool]] = field(default_factory=dict)
    module: SoftwareSecurityModule | None = None
    zpk: bytes = field(default_factory=lambda: generate_key(16))
    rrn: int = 0

    async def serve(self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        if self.crypto == "module":
            self.module = SoftwareSecurityModule()
            self.module.import_clear_key("ZPK", self.zpk, save=False)
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
        async with listener:
            await listener.serve(self._connection)

    async def _connection(self, stream: anyio.abc.SocketStream) -> None:
        buf = bytearray()
        lock = anyio.Lock()
        async with stream, anyio.create_task_group() as tg:
            while True:
                try:
                    buf += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    return
                while len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
                    n = int.from_bytes(buf[:2], "big")
                    frame = bytes(buf[2 : 2 + n])
                    del buf[: 2 + n]
                    tpdu, header, body = frame[:5], frame[5:11], frame[11:]
                    assert tpdu[0] == 0x60
                    tg.start_soon(self._answer, stream, lock, tpdu, header, body)

    def _verify(self, seen: Seen, body: bytes) -> None:
        msg = seen.message
        tid = msg.fields["41"]
        keys = self.terminal_keys.get(tid, {})
        if "64" in msg.fields:
            mab, mac = body[:-8], body[-8:]
            if self.module is not None:
                try:
                    self.module.verify_terminal_mac(tid, mab, mac)
                    seen.mac_ok = True
                except SecurityError:
                    seen.mac_ok = False
            else:
                seen.mac_ok = macs_equal(cup_mac(keys[KeyUsage.MAK], mab), mac)
        if "35" in msg.fields:
            track = msg.fields["35"]
            if msg.fields.get("53", "000")[2] == "1":
                if self.module is not None:
                    track = self.module.decrypt_track2(tid, track)
                else:
                    track = decrypt_track(keys[KeyUsage.TDK], track)
            seen.track = track
        if "52" in msg.fields:
            pan = msg.fields.get("2") or (seen.track or "").split("D")[0]
            block = bytes.fromhex(msg.fields["52"])
            if self.module is not None:
                block = self.module.translate_pin_to_host(tid, block, pan)
                seen.pin = decrypt_pin_block(self.zpk, block, pan)
            else:
                seen.pin = decrypt_pin_block(keys[KeyUsage.PIK], block, pan)

    def _sign_in(self, msg: Message) -> Message:
        mode = msg.fields["60"][8:11]
        tid = msg.fields["41"]
        if self.module is not None:
            if not self.module.has_terminal_master_key(tid):
                self.module.import_clear_key("TMK", TMK, tid, save=False)
            block = self.module.issue_working_keys(tid, mode)
        else:
            length = 8 if mode == "001" else 16
            keys = {KeyUsage.PIK: generate_key(length), KeyUsage.MAK: generate_key(8)}
            if mode == "004":
                keys[KeyUsage.TDK] = generate_key(16)
            self.terminal_keys[tid] = keys
            block = build_key_block(TMK, keys, mode)
        if self.bad_kcv:
            block = block[:-1] + bytes([block[-1] ^ 0xFF])
        return response(msg, "00", "cup-pos", **self._approval(), field_62=block.hex().upper(),
                        field_60=f"00{HOST_BATCH}{mode}")

    def _approval(self) -> dict[str, str]:
        self.rrn += 1
        now = datetime.now()
        return {"field_12": now.strftime("%H%M%S"), "field_13": now.strftime("%m%d"), "field_32": "12345678",
                "field_37": f"{self.rrn:012d}"}

    def _settle(self, msg: Message) -> Message:
        domestic, foreign = CardTotals(), CardTotals()
        for kind, amount, is_domestic in self.approved.values():
            group = domestic if is_domestic else foreign
            group = group.add_debit(amount) if kind == "purchase" else group.add_credit(amount)
            if is_domestic:
                domestic = group
            else:
                foreign = group
        claimed = SettlementTotals.from_field48(msg.fields["48"])
        verdict = claimed.reconciled(SettlementTotals(domestic, foreign))
        return response(msg, "00", "cup-pos", field_48=verdict.to_field48(), field_12="120000",
                        field_13="0101")

    def _decide(self, msg: Message, seen: Seen) -> tuple[Message | None, int]:
        """The answer (None: stay silent) and the header processing requirement."""
        amount = int(msg.fields.get("4", "0"))
        net = msg.fields.get("60", "")[8:11]
        if msg.mti == "0800":
            return self._sign_in(msg), 0
        if msg.mti in ("0820", "0320"):
            return response(msg, "00", "cup-pos"), 0
        if msg.mti == "0500":
            return self._settle(msg), 0
        if msg.mti == "0400":
            if self.silent_reversals:
                self.silent_reversals -= 1
                return None, 0
            self.approved.pop(msg.fields["11"], None)
            return response(msg, "00", "cup-pos", field_12="120000", field_13="0101"), 0
        if amount in self.silent:
            return None, 0
        rc = self.rc_by_amount.get(amount, "00")
        extra = self._approval() if rc == "00" else {}
        if rc == "00" and msg.fields["3"] == "310000":
            extra["field_54"] = "1001156C000000004321"
        if rc == "00" and amount not in self.forget and msg.fields["3"] != "310000":
            kind = {"22": "purchase", "23": "void", "25": "refund"}[msg.fields["60"][:2]]
            pan = msg.fields.get("2") or (seen.track or "").split("D")[0]
            self.approved[msg.fields["11"]] = (kind, amount, pan.startswith("62"))
        answer = response(msg, rc, "cup-pos", **extra)
        if amount in self.wrong_echo:
            answer.fields["4"] = f"{amount + 1:012d}"
        assert net == "000"
        return answer, 3 if amount in self.resign else 0

    async def _answer(self, stream: anyio.abc.SocketStream, lock: anyio.Lock, tpdu: bytes, header: bytes,
                      body: bytes) -> None:
        msg = CODEC.decode(body)
        seen = Seen(msg, header=header)
        self._verify(seen, body)
        self.seen.append(seen)
        if int(msg.fields.get("4", "0")) in self.close_on:
            await stream.aclose()
            return
        answer, requirement = self._decide(msg, seen)
        if answer is None:
            return
        delay = self.delays.get(int(msg.fields.get("4", "0")), 0.0)
        if delay:
            await anyio.sleep(delay)
        out = CODEC.encode(answer)
        if "64" in answer.fields:
            mac = (
                self.module.generate_terminal_mac(msg.fields["41"], out[:-8])
                if self.module is not None
                else cup_mac(self.terminal_keys[msg.fields["41"]][KeyUsage.MAK], out[:-8])
            )
            if int(msg.fields.get("4", "0")) in self.wrong_mac:
                mac = b"00000000" if mac != b"00000000" else b"11111111"
            out = out[:-8] + mac
        reply_tpdu = tpdu[:1] + tpdu[3:5] + tpdu[1:3]  # source and destination swapped
        reply_header = header[:2] + bytes([(header[2] & 0xF0) | requirement]) + header[3:]
        frame = reply_tpdu + reply_header + out
        async with lock:
            self.answer_order.append(msg.fields.get("11", ""))
            await stream.send(len(frame).to_bytes(2, "big") + frame)

    def requests(self, mti: str) -> list[Seen]:
        return [s for s in self.seen if s.message.mti == mti]


@asynccontextmanager
async def fake_gateway(fake: FakeCupGateway | None = None) -> AsyncIterator[tuple[FakeCupGateway, int]]:
    fake = fake or FakeCupGateway()
    async with anyio.create_task_group() as tg:
        port = await tg.start(fake.serve)
        try:
            yield fake, port
        finally:
            tg.cancel_scope.cancel()


def terminal(port: int, **kw: object) -> TerminalSimulator:
    kw.setdefault("timeout", 3.0)
    return TerminalSimulator("127.0.0.1", port, TID, MID, TMK, cards=[CARD, FOREIGN], **kw)  # type: ignore[arg-type]


# --- sign-in ---------------------------------------------------------------------------------------


async def test_sign_in_installs_keys_and_adopts_the_host_batch():
    with anyio.fail_after(10):
        async with fake_gateway() as (fake, port), terminal(port) as term:
            assert not term.signed_in
            result = await term.sign_in()
            assert result.rc == "00" and term.signed_in
            assert term.batch == HOST_BATCH
            (sign_in,) = fake.requests("0800")
            assert sign_in.message["60"] == "00000001004"
            assert sign_in.header[:2] == b"\x60\x31"
            assert (await term.echo()).rc == "00"


async def test_sign_in_rejects_a_key_block_whose_check_value_fails():
    with anyio.fail_after(10):
        async with fake_gateway(FakeCupGateway(bad_kcv=True)) as (_, port), terminal(port) as term:
            with pytest.raises(SignInError, match="check value"):
                await term.sign_in()
            assert not term.signed_in
            with pytest.raises(NotSignedIn):
                await term.purchase(100, CARD)


# --- cryptography, checked by the fake gateway -----------------------------------------------------


@pytest.mark.parametrize("crypto", ["clear", "module"])
async def test_purchase_swipe_with_pin_and_encrypted_track(crypto):
    with anyio.fail_after(10):
        async with fake_gateway(FakeCupGateway(crypto=crypto)) as (fake, port), terminal(port) as term:
            await term.sign_in("004")
            result = await term.purchase(1_234, CARD)
            assert result.approved and result.mac_ok is True
            assert result.rrn is not None and len(result.rrn) == 12
            (seen,) = fake.requests("0200")
            assert seen.mac_ok is True
            assert seen.pin == "123456"
            assert seen.track == CARD.track2
            assert seen.message["35"] != CARD.track2  # it travelled encrypted
            assert seen.message["53"][:3] == "261"
            assert seen.message["22"] == "021"


async def test_purchase_manual_entry_in_single_des_mode():
    with anyio.fail_after(10):
        async with fake_gateway() as (fake, port), terminal(port, key_mode="001") as term:
            await term.sign_in()
            assert (await term.purchase(50, FOREIGN, entry="manual")).approved
            assert (await term.purchase(60, CARD.pan, pin=NO_PIN, entry="manual")).approved
            first, second = fake.requests("0200")
            assert first.mac_ok and second.mac_ok
            assert first.pin == "1234" and first.message["2"] == FOREIGN.pan and first.message["22"] == "011"
            assert "52" not in second.message.fields and second.message["22"] == "012"


# --- answer checks and automatic reversals ---------------------------------------------------------


async def test_bad_response_mac_makes_the_terminal_reverse_with_a0():
    fake = FakeCupGateway(wrong_mac={777})
    with anyio.fail_after(10):
        async with fake_gateway(fake) as (fake, port), terminal(port) as term:
            await term.sign_in()
            result = await term.purchase(777, CARD)
            assert result.rc == "00" and result.mac_ok is False and not result.approved
            assert result.reversal is not None and result.reversal.rc == "00"
            (reversal,) = fake.requests("0400")
            assert reversal.message["39"] == "A0"
            assert reversal.message["11"] == result.stan
            assert reversal.mac_ok is True
            assert "35" not in reversal.message.fields and "52" not in reversal.message.fields


async def test_timeout_makes_the_terminal_reverse_with_98():
    fake = FakeCupGateway(silent={404})
    with anyio.fail_after(10):
        async with fake_gateway(fake) as (fake, port), terminal(port, timeout=0.5) as term:
            await term.sign_in()
            result = await term.purchase(404, CARD)
            assert result.timed_out and result.rc is None
            assert result.reversal is not None and result.reversal.rc == "00"
            assert fake.requests("0400")[0].message["39"] == "98"
            assert term.totals().domestic.debit_count == 0


async def test_unanswered_reversal_is_sent_again_before_the_next_purchase():
    fake = FakeCupGateway(silent={404}, silent_reversals=1)
    with anyio.fail_after(10):
        async with fake_gateway(fake) as (fake, port), terminal(port, timeout=0.5) as term:
            await term.sign_in()
            result = await term.purchase(404, CARD)
            assert result.reversal is not None and result.reversal.timed_out
            assert len(term.pending_reversals) == 1
            assert (await term.purchase(5, CARD)).approved
            assert term.pending_reversals == []
            first, second = fake.requests("0400")
            assert first.message.fields == second.message.fields  # the same 0400, MAC and all


async def test_echo_mismatch_is_not_an_approval_and_is_reversed():
    fake = FakeCupGateway(wrong_echo={321})
    with anyio.fail_after(10):
        async with fake_gateway(fake) as (fake, port), terminal(port) as term:
            await term.sign_in()
            result = await term.purchase(321, CARD)
            assert result.problems and not result.approved
            assert fake.requests("0400")[0].message["39"] == "06"


async def test_decline_is_not_reversed_and_processing_requirement_is_exposed():
    fake = FakeCupGateway(rc_by_amount={51: "51"}, resign={52})
    with anyio.fail_after(10):
        async with fake_gateway(fake) as (fake, port), terminal(port) as term:
            await term.sign_in()
            declined = await term.purchase(51, CARD)
            assert declined.rc == "51" and declined.mac_ok is None and declined.reversal is None
            flagged = await term.purchase(52, CARD)
            assert flagged.approved and flagged.processing_requirement == 3 and flagged.needs_sign_in
            assert fake.requests("0400") == []


async def test_several_requests_in_flight_are_matched_by_stan():
    fake = FakeCupGateway(delays={301: 0.4, 302: 0.2})
    with anyio.fail_after(10):
        async with fake_gateway(fake) as (fake, port), terminal(port) as term:
            await term.sign_in()
            results = {}

            async def buy(amount: int) -> None:
                results[amount] = await term.purchase(amount, CARD)

            async with anyio.create_task_group() as tg:
                for amount in (301, 302, 303):
                    tg.start_soon(buy, amount)
            for amount, result in results.items():
                assert result.approved and result.amount == amount
                assert result.response is not None and result.response["4"] == f"{amount:012d}"
            stans = {a: r.stan for a, r in results.items()}
            assert fake.answer_order[-3:] == [stans[303], stans[302], stans[301]]


async def test_reading_is_handed_over_when_the_reader_is_done_or_times_out():
    # the first caller reads for everyone; when its own answer (or its timeout) comes first, a waiting
    # caller must take over the socket, or its answer would never be read
    fake = FakeCupGateway(delays={402: 0.3, 403: 0.5}, silent={401})
    with anyio.fail_after(10):
        async with fake_gateway(fake) as (fake, port), terminal(port, timeout=1, auto_reverse=False) as term:
            await term.sign_in()
            results = {}

            async def buy(amount: int) -> None:
                results[amount] = await term.purchase(amount, CARD)

            async with anyio.create_task_group() as tg:
                tg.start_soon(buy, 404)  # answered at once: its reader steps down first
                await anyio.sleep(0.05)
                tg.start_soon(buy, 401)  # never answered: its reader times out while 403 still waits
                await anyio.sleep(0.05)
                tg.start_soon(buy, 402)
                tg.start_soon(buy, 403)
            assert results[404].approved and results[402].approved and results[403].approved
            assert results[401].timed_out


async def test_host_hanging_up_is_a_typed_error():
    from gateway.sim.terminal import TerminalConnectionError

    fake = FakeCupGateway(close_on={666})
    with anyio.fail_after(10):
        async with fake_gateway(fake) as (fake, port), terminal(port) as term:
            await term.sign_in()
            with pytest.raises(TerminalConnectionError):
                await term.purchase(666, CARD)
            assert not term.connected
            await term.connect()  # keys survive a reconnect
            assert (await term.purchase(5, CARD)).approved


# --- other transactions and settlement -------------------------------------------------------------


async def test_void_refund_and_balance_carry_the_original_data():
    with anyio.fail_after(10):
        async with fake_gateway() as (fake, port), terminal(port) as term:
            await term.sign_in()
            purchase = await term.purchase(900, CARD)
            void = await term.void(purchase)
            assert void.approved
            refund = await term.refund(100, CARD, original=purchase)
            assert refund.approved
            balance = await term.balance(CARD)
            assert balance.approved and balance.balance == 4321
            void_seen, balance_seen = fake.requests("0200")[1:]
            assert void_seen.message["37"] == purchase.rrn
            assert void_seen.message["61"] == purchase.batch + purchase.stan
            assert void_seen.message["3"] == "200000" and void_seen.message["60"][:2] == "23"
            (refund_seen,) = fake.requests("0220")
            assert refund_seen.mac_ok and refund_seen.pin == "123456"
            assert refund_seen.message["61"] == purchase.batch + purchase.stan + purchase.date
            assert refund_seen.message["63"] == "CUP"
            assert balance_seen.message["3"] == "310000" and "4" not in balance_seen.message.fields


async def test_settlement_balanced():
    with anyio.fail_after(10):
        async with fake_gateway() as (fake, port), terminal(port) as term:
            await term.sign_in()
            purchase = await term.purchase(1_000, CARD)
            await term.purchase(2_000, CARD)
            await term.void(purchase)
            await term.purchase(300, FOREIGN)
            expected = term.totals()
            assert expected.domestic == CardTotals(3_000, 2, 1_000, 1)
            assert expected.foreign == CardTotals(300, 1, 0, 0)
            settled = await term.settle()
            assert settled.rc == "00" and settled.balanced and settled.uploaded == 0
            assert settled.closed_batch == HOST_BATCH and term.batch == "000778"
            (end,) = fake.requests("0320")
            assert end.message["60"][8:11] == "207" and unpack_batch_end(end.message["48"]) == 0
            assert term.totals() == SettlementTotals()


async def test_settlement_not_balanced_uploads_every_detail():
    fake = FakeCupGateway(forget={55})
    with anyio.fail_after(10):
        async with fake_gateway(fake) as (fake, port), terminal(port) as term:
            await term.sign_in()
            for amount in (10, 55, *range(100, 109)):
                await term.purchase(amount, CARD)
            settled = await term.settle()
            assert settled.rc == "00" and not settled.balanced
            assert settled.host is not None and settled.host.domestic.result == "2"
            assert settled.uploaded == 11
            *uploads, end = fake.requests("0320")
            assert [u.message["60"][8:11] for u in uploads] == ["201", "201"]
            items = [i for u in uploads for i in unpack_batch_items(u.message["48"])]
            assert sorted(i.amount for i in items) == sorted((10, 55, *range(100, 109)))
            assert end.message["60"][8:11] == "202" and unpack_batch_end(end.message["48"]) == 11


async def test_sign_off_drops_the_keys():
    with anyio.fail_after(10):
        async with fake_gateway() as (_, port), terminal(port) as term:
            await term.sign_in()
            assert (await term.sign_off()).rc == "00"
            assert not term.signed_in


async def test_connection_loss_is_a_typed_error():
    from gateway.sim.terminal import TerminalConnectionError

    with anyio.fail_after(10):
        async with fake_gateway() as (_, port):
            pass  # the listener is gone now
        term = terminal(port, timeout=1.0)
        with pytest.raises(TerminalConnectionError):
            await term.connect()


async def test_reprs_and_logs_keep_secrets(caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    with anyio.fail_after(10):
        async with fake_gateway(FakeCupGateway(wrong_mac={9})) as (fake, port), terminal(port) as term:
            await term.sign_in()
            result = await term.purchase(9, CARD)  # bad MAC: logs and an automatic reversal
            settled = await term.settle()
    secrets = [CARD.pan, CARD.track2, TMK.hex(), TMK.hex().upper(), result.request["52"]]
    secrets += [k.hex().upper() for keys in fake.terminal_keys.values() for k in keys.values()]
    texts = [repr(CARD), repr(result), str(result.request), repr(term), repr(settled), caplog.text]
    for text in texts:
        for secret in secrets:
            assert secret not in text


# --- the load driver and the command line ----------------------------------------------------------


async def test_cup_driver_runs_every_kind():
    from gateway.load.driver import lookup_factory
    from gateway.sim import cup_driver

    factory, ref = lookup_factory("cup")
    assert ref == "gateway.sim.cup_driver:cup_driver_factory"
    with anyio.fail_after(15):
        async with fake_gateway(FakeCupGateway(rc_by_amount={51: "51"})) as (fake, port):
            driver = factory({"target": f"127.0.0.1:{port}",
                              "options": {"tmk": TMK.hex(), "terminal_id": "LT000009", "pin": "123456"}})
            sessions = [await driver.connect() for _ in range(2)]
            try:
                for session in sessions:
                    await session.prepare()  # type: ignore[attr-defined]
                kinds = ("purchase", "void", "refund", "balance", "echo")
                codes = [await sessions[0].request(k) for k in kinds]
                assert codes == ["00"] * 5
                assert await sessions[1].request("settle") == "00"
                with pytest.raises(cup_driver.LoadError):
                    await sessions[0].request("teleport")
            finally:
                for session in sessions:
                    await session.aclose()
            assert {s.message["41"] for s in fake.requests("0800")} == {"LT000009", "LT000010"}
            assert all(s.pin == "123456" for s in fake.requests("0200") if "52" in s.message.fields)

    declining = cup_driver.cup_driver_factory(
        {"target": f"127.0.0.1:{port}", "options": {"amount": "51"}, "worker_index": 1}
    )
    assert next(declining._ids) == "LT010001"


def test_cup_driver_option_errors():
    from gateway.load.driver import LoadError
    from gateway.sim.cup_driver import cup_driver_factory, terminal_ids

    for options in ({"tmk": "12"}, {"amount": "x"}, {"entry": "tap"}, {"key_mode": "002"}, {"pan": "12"}):
        with pytest.raises(LoadError):
            cup_driver_factory({"target": "127.0.0.1:1", "options": options})
    with pytest.raises(LoadError):
        cup_driver_factory({"options": {}})
    with pytest.raises(LoadError):
        next(terminal_ids("TERMINAL"))
    assert list(zip(range(3), terminal_ids("T0000098"), strict=False)) == [
        (0, "T0000098"), (1, "T0000099"), (2, "T0000100")
    ]


def test_sim_terminal_command(capsys):
    import argparse

    from anyio.from_thread import start_blocking_portal

    from gateway.sim import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    fake = FakeCupGateway()
    with start_blocking_portal(backend="asyncio") as portal:
        future, port = portal.start_task(fake.serve)
        try:
            args = parser.parse_args(["sim-terminal", "--target", f"127.0.0.1:{port}", "--terminal-id", TID,
                                      "--tmk", TMK.hex(), "--count", "2", "--pin", "123456"])
            assert args.func(args) == 0
        finally:
            future.cancel()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"signed in {TID} batch {HOST_BATCH}")
    assert len(lines) == 3
    for line in lines[1:]:
        assert "622202******0015" in line and " rc 00 " in line
        assert CARD.pan not in line
    bad = parser.parse_args(["sim-terminal", "--target", "nowhere", "--terminal-id", TID])
    assert bad.func(bad) == 2
