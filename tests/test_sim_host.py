"""The host simulator end to end over loopback TCP, driven by a minimal ISO 8583:1987 client written
here (its own 2-byte length framing, its own MAC splicing), on both anyio backends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest

from gateway.iso.build import TerminalIdent, iso87
from gateway.iso.build.iso87 import OriginalData
from gateway.iso.codec import Codec
from gateway.iso.message import Message
from gateway.iso.spec import load_dialect
from gateway.security.algorithms import encrypt_pin_block, macs_equal, retail_mac, unwrap_zone_key
from gateway.sim.host import DEFAULT_ZMK, HostSimConfig, HostSimulator
from gateway.sim.host_rules import Account, Fault, HostRulesConfig, SimConfigError, TxnKey

pytestmark = pytest.mark.anyio

CODEC = Codec(load_dialect("iso87-ascii"))
IDENT = TerminalIdent("TERM0001", "123456789012345")
ACQ = "1234"
PAN = "6222020000000015"
PIN = "123456"
POOR_PAN = "6222030000000014"
UNKNOWN_PAN = "9999990000000014"
DT = "0102030405"

RULES = HostRulesConfig(
    accounts=(
        Account("rich", 100_000, ("622202",), pin=PIN, limit=50_000),
        Account("poor", 500, ("622203",)),
    ),
    seed=5,
)


class IsoClient:
    """Just enough of a host link for tests: framing, MAC splicing, key exchange."""

    def __init__(self, stream: anyio.abc.SocketStream, first_stan: int = 1) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.zak: bytes | None = None
        self.zpk: bytes | None = None
        self._stan = first_stan - 1

    def stan(self) -> str:
        self._stan += 1
        return f"{self._stan:06d}"

    def encode(self, msg: Message, *, corrupt_mac: bool = False) -> bytes:
        body = CODEC.encode(msg)
        if ("64" in msg.fields or "128" in msg.fields) and self.zak is not None:
            mac = retail_mac(self.zak, body[:-16]).hex().upper().encode()
            if corrupt_mac:
                mac = b"0" * 16 if mac != b"0" * 16 else b"1" * 16
            body = body[:-16] + mac
        return body

    async def send(self, msg: Message, **kw: bool) -> bytes:
        body = self.encode(msg, **kw)
        await self.stream.send(len(body).to_bytes(2, "big") + body)
        return body

    async def recv_raw(self, timeout: float = 3.0) -> bytes:
        with anyio.fail_after(timeout):
            while len(self.buf) < 2 or len(self.buf) < 2 + int.from_bytes(self.buf[:2], "big"):
                self.buf += await self.stream.receive()
        n = int.from_bytes(self.buf[:2], "big")
        body = bytes(self.buf[2 : 2 + n])
        del self.buf[: 2 + n]
        return body

    async def recv(self, timeout: float = 3.0) -> tuple[Message, bytes]:
        body = await self.recv_raw(timeout)
        return CODEC.decode(body), body

    async def call(self, msg: Message, **kw: bool) -> Message:
        await self.send(msg, **kw)
        answer, _ = await self.recv()
        return answer

    def response_mac_ok(self, body: bytes) -> bool:
        assert self.zak is not None
        return macs_equal(retail_mac(self.zak, body[:-16]).hex().upper().encode(), body[-16:])

    async def key_exchange(self) -> None:
        for usage in ("ZPK", "ZAK"):
            answer = await self.call(iso87.key_request(self.stan(), DT, usage, ACQ))
            assert answer.mti == "0810" and answer["39"] == "00"
            under_zmk, kcv = iso87.parse_key_response(answer)
            key = unwrap_zone_key(DEFAULT_ZMK, under_zmk, kcv, what=usage).material  # verifies the KCV
            if usage == "ZAK":
                self.zak = key
            else:
                self.zpk = key

    def purchase(self, amount: int, pan: str = PAN, pin: str | None = None, **card: str) -> Message:
        extra: dict[str, str] = dict(card)
        if pin is not None:
            assert self.zpk is not None
            extra["pin_block"] = encrypt_pin_block(self.zpk, pin, pan).hex().upper()
        if "track2" not in extra:
            extra["pan"] = pan
        return iso87.purchase(IDENT, self.stan(), DT, ACQ, amount, **extra)  # type: ignore[arg-type]


@asynccontextmanager
async def host(config: HostSimConfig | None = None) -> AsyncIterator[tuple[HostSimulator, int]]:
    sim = HostSimulator(config or HostSimConfig(rules=RULES))
    async with anyio.create_task_group() as tg:
        port = await tg.start(sim.serve)
        try:
            yield sim, port
        finally:
            tg.cancel_scope.cancel()


@asynccontextmanager
async def client(port: int, *, keys: bool = True, first_stan: int = 1) -> AsyncIterator[IsoClient]:
    stream = await anyio.connect_tcp("127.0.0.1", port)
    async with stream:
        c = IsoClient(stream, first_stan)
        if keys:
            await c.key_exchange()
        yield c


# --- network management ----------------------------------------------------------------------------


async def test_sign_on_echo_sign_off():
    with anyio.fail_after(10):
        async with host() as (sim, port), client(port, keys=False) as c:
            for builder in (iso87.sign_on, iso87.echo, iso87.sign_off):
                request = builder(c.stan(), DT, ACQ)
                answer = await c.call(request)
                assert answer.mti == "0810"
                assert answer["39"] == "00"
                assert (answer["11"], answer["7"]) == (request["11"], DT)
                assert answer["70"] == request["70"]
            assert sim.stats.sign_ons == 1


async def test_key_exchange_issues_fresh_keys_under_the_zmk():
    with anyio.fail_after(10):
        async with host() as (sim, port), client(port) as c:
            assert sim.has_zone_key("ZPK") and sim.has_zone_key("ZAK")
            first = c.zak
            await c.key_exchange()
            assert c.zak != first  # a new key each time
            assert sim.stats.key_exchanges == 4


# --- financial decisions on the wire ---------------------------------------------------------------


async def test_purchase_approved_with_pin_and_mac():
    with anyio.fail_after(10):
        async with host() as (sim, port), client(port) as c:
            request = c.purchase(1_000, pin=PIN)
            await c.send(request)
            answer, body = await c.recv()
            assert answer.mti == "0210" and answer["39"] == "00"
            assert len(answer["37"]) == 12 and answer["37"].isdigit()
            assert len(answer["38"]) == 6
            assert answer["12"] and answer["13"]
            for key in ("3", "4", "7", "11", "41", "42", "49"):
                assert answer[key] == request[key]
            assert "64" in answer.fields and c.response_mac_ok(body)
            assert sim.balance("rich") == 99_000
            assert sim.ledger[TxnKey.of_request(request)].approved


@pytest.mark.parametrize(
    ("pan", "amount", "pin", "rc"),
    [
        (POOR_PAN, 501, None, "51"),
        (PAN, 50_001, None, "61"),
        (PAN, 100, "999999", "55"),
        (UNKNOWN_PAN, 100, None, "14"),
    ],
)
async def test_declines(pan, amount, pin, rc):
    with anyio.fail_after(10):
        async with host() as (sim, port), client(port) as c:
            answer = await c.call(c.purchase(amount, pan, pin=pin))
            assert answer["39"] == rc
            assert "38" not in answer.fields
            assert sim.balance("rich") == 100_000 and sim.balance("poor") == 500


async def test_pan_from_track_2():
    with anyio.fail_after(10):
        async with host() as (sim, port), client(port) as c:
            answer = await c.call(c.purchase(300, track2=f"{PAN}=30121010000000000"))
            assert answer["39"] == "00"
            assert sim.balance("rich") == 99_700


async def test_bad_request_mac_is_refused_with_a0():
    with anyio.fail_after(10):
        async with host() as (sim, port), client(port) as c:
            answer = await c.call(c.purchase(100), corrupt_mac=True)
            assert answer["39"] == "A0"
            assert "64" not in answer.fields
            assert sim.stats.mac_failures == 1 and sim.balance("rich") == 100_000


async def test_mac_before_key_exchange_is_refused():
    with anyio.fail_after(10):
        async with host() as (_, port), client(port, keys=False) as c:
            answer = await c.call(c.purchase(100))  # placeholder MAC, no ZAK anywhere
            assert answer["39"] == "A0"


async def test_refund_and_balance_inquiry():
    with anyio.fail_after(10):
        async with host() as (_, port), client(port) as c:
            refund = iso87.refund(IDENT, c.stan(), DT, ACQ, 2_000, orig_rrn="000000000001", pan=PAN)
            assert (await c.call(refund))["39"] == "00"
            inquiry = iso87.balance_inquiry(IDENT, c.stan(), DT, ACQ, pan=PAN)
            answer = await c.call(inquiry)
            assert answer["39"] == "00"
            assert answer["54"][:20] == "0001156C000000102000"  # ledger amount, then available
            assert answer["54"][20:24] == "0002" and answer["54"][-12:] == "000000102000"


async def test_void_by_field_90_restores_the_balance():
    with anyio.fail_after(10):
        async with host() as (sim, port), client(port) as c:
            purchase = c.purchase(700)
            first = await c.call(purchase)
            original = OriginalData.from_request(purchase)
            void = iso87.void(IDENT, c.stan(), DT, ACQ, 700, original, orig_rrn=first["37"], pan=PAN)
            assert (await c.call(void))["39"] == "00"
            assert sim.balance("rich") == 100_000


async def test_reversal_is_idempotent_and_counted():
    with anyio.fail_after(10):
        async with host() as (sim, port), client(port) as c:
            purchase = c.purchase(4_000)
            assert (await c.call(purchase))["39"] == "00"
            assert sim.balance("rich") == 96_000
            await c.send(iso87.reversal(purchase, "98"))
            answer, body = await c.recv()
            assert answer.mti == "0410" and answer["39"] == "00" and answer["90"][:4] == "0200"
            assert c.response_mac_ok(body)
            assert sim.balance("rich") == 100_000
            repeat = await c.call(iso87.reversal(purchase, "98", repeat=True))
            assert repeat.mti == "0410" and repeat["39"] == "00"
            assert sim.balance("rich") == 100_000
            assert sim.reversal_count(purchase) == 2
            ghost = c.purchase(1)  # never sent
            assert (await c.call(iso87.reversal(ghost, "98")))["39"] == "25"
            assert sim.reversal_count(TxnKey.of_request(ghost)) == 1


# --- faults ----------------------------------------------------------------------------------------


async def test_delay_fault_answers_out_of_order():
    with anyio.fail_after(10):
        async with host() as (sim, port), client(port) as c:
            sim.add_fault(Fault("delay", seconds=0.4, pan=POOR_PAN))
            slow = c.purchase(10, POOR_PAN)
            fast = c.purchase(10)
            t0 = anyio.current_time()
            await c.send(slow)
            await c.send(fast)
            first, _ = await c.recv()
            second, _ = await c.recv()
            assert (first["11"], second["11"]) == (fast["11"], slow["11"])
            assert anyio.current_time() - t0 >= 0.35
            assert sim.faults.fired("delay") == 1


async def test_drop_fault_processes_but_never_answers():
    with anyio.fail_after(10):
        async with host() as (sim, port), client(port) as c:
            sim.set_faults([Fault("drop", mti=("0200",), nth=1)])
            lost = c.purchase(250)
            await c.send(lost)
            with pytest.raises(TimeoutError):
                await c.recv(timeout=0.3)
            assert sim.ledger[TxnKey.of_request(lost)].approved  # charged but no answer
            assert sim.balance("rich") == 99_750
            assert (await c.call(c.purchase(1)))["39"] == "00"  # only the first one was dropped
            assert sim.stats.drops == 1


async def test_lost_request_is_not_processed():
    with anyio.fail_after(10):
        async with host() as (sim, port), client(port) as c:
            sim.set_faults([Fault("drop", process=False)])
            lost = c.purchase(250)
            await c.send(lost)
            with pytest.raises(TimeoutError):
                await c.recv(timeout=0.3)
            assert TxnKey.of_request(lost) not in sim.ledger
            assert sim.balance("rich") == 100_000


async def test_disconnect_fault_closes_instead_of_answering():
    with anyio.fail_after(10):
        async with host() as (sim, port), client(port) as c:
            sim.set_faults([Fault("disconnect", pan=PAN)])
            await c.send(c.purchase(100))
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await c.recv()
            assert sim.stats.disconnects == 1
            with anyio.fail_after(2):
                while sim.stats.connections_open:
                    await anyio.sleep(0.01)


async def test_a_disconnect_in_the_middle_of_one_read():
    """Three requests in one write: the one before the disconnecting request is answered, the one
    after it is decided (the host read it) but never answered, and the connection closes."""
    with anyio.fail_after(10):
        async with host() as (sim, port), client(port) as c:
            sim.set_faults([Fault("disconnect", pan=POOR_PAN)])
            before, doomed, after = c.purchase(10), c.purchase(10, POOR_PAN), c.purchase(20)
            await c.stream.send(b"".join(_framed(c.encode(m)) for m in (before, doomed, after)))
            answer, _ = await c.recv()
            assert answer["11"] == before["11"] and answer["39"] == "00"
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await c.recv()
            assert sim.stats.disconnects == 1
            assert sim.ledger[TxnKey.of_request(after)].approved
            assert sim.balance("rich") == 100_000 - 30


async def test_requests_of_one_read_are_all_answered_in_order():
    with anyio.fail_after(10):
        async with host() as (sim, port), client(port) as c:
            requests = [c.purchase(1) for _ in range(6)]
            await c.stream.send(b"".join(_framed(c.encode(m)) for m in requests))
            answers = [(await c.recv())[0] for _ in requests]
            assert [a["11"] for a in answers] == [r["11"] for r in requests]
            assert {a["39"] for a in answers} == {"00"}
            assert sim.balance("rich") == 100_000 - 6


def _framed(body: bytes) -> bytes:
    return len(body).to_bytes(2, "big") + body


async def test_garbage_body_fault():
    with anyio.fail_after(10):
        async with host() as (sim, port), client(port) as c:
            sim.set_faults([Fault("garbage", garbage="body")])
            request = c.purchase(100)
            await c.send(request)
            body = await c.recv_raw()
            with pytest.raises(Exception) as info:
                message = CODEC.decode(body)
                assert message["11"] != request["11"]
            assert info.type.__name__ in ("CodecError", "AssertionError")
            assert sim.stats.garbage_sent == 1


async def test_garbage_length_fault_sends_an_impossible_length():
    with anyio.fail_after(10):
        async with host() as (sim, port), client(port) as c:
            sim.set_faults([Fault("garbage", garbage="length")])
            await c.send(c.purchase(100))
            with anyio.fail_after(3):
                data = await c.stream.receive()
            assert data[:2] == b"\xff\xff"


async def test_wrong_mac_fault():
    with anyio.fail_after(10):
        async with host() as (sim, port), client(port) as c:
            sim.set_faults([Fault("wrong_mac")])
            await c.send(c.purchase(100))
            answer, body = await c.recv()
            assert answer["39"] == "00"
            assert not c.response_mac_ok(body)
            sim.clear_faults()
            await c.send(c.purchase(100))
            _, body = await c.recv()
            assert c.response_mac_ok(body)


async def test_late_answer_arrives_after_the_callers_timeout():
    with anyio.fail_after(10):
        async with host() as (sim, port), client(port) as c:
            sim.set_faults([Fault("late", seconds=0.5)])
            request = c.purchase(100)
            await c.send(request)
            with pytest.raises(TimeoutError):
                await c.recv(timeout=0.2)
            late, _ = await c.recv(timeout=2)
            assert late["11"] == request["11"] and late["39"] == "00"


async def test_booked_late_lets_a_reversal_overtake_its_original():
    """`booked_late`: the host decides the purchase only when its delay is over, so a reversal sent
    meanwhile finds nothing (25) and the purchase is approved afterwards."""
    with anyio.fail_after(10):
        async with host() as (sim, port), client(port) as c:
            sim.set_faults([Fault("booked_late", seconds=0.4, mti=("0200",), limit=1)])
            purchase = c.purchase(700)
            await c.send(purchase)
            reversal = await c.call(iso87.reversal(purchase, "98"))
            assert reversal["39"] == "25" and sim.balance("rich") == 100_000  # not booked yet
            late, _ = await c.recv(timeout=2)
            assert late["11"] == purchase["11"] and late["39"] == "00"
            assert sim.balance("rich") == 100_000 - 700  # booked now
            again = await c.call(iso87.reversal(purchase, "98", repeat=True))
            assert again["39"] == "00" and sim.balance("rich") == 100_000


async def test_reject_first_k_reversals():
    with anyio.fail_after(10):
        async with host() as (sim, port), client(port) as c:
            purchase = c.purchase(900)
            await c.call(purchase)
            sim.set_faults([Fault("reject_reversal", count=2)])
            codes = [(await c.call(iso87.reversal(purchase, "98", repeat=i > 0)))["39"] for i in range(3)]
            assert codes == ["96", "96", "00"]
            assert sim.reversal_count(purchase) == 3
            assert sim.balance("rich") == 100_000


async def test_close_after_n_messages():
    with anyio.fail_after(10):
        async with host() as (sim, port):
            sim.set_faults([Fault("close_after", count=3)])
            async with client(port, keys=False) as c:
                for _ in range(3):
                    assert (await c.call(iso87.echo(c.stan(), DT, ACQ)))["39"] == "00"
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await c.recv(timeout=2)
            assert sim.stats.closes_after_n == 1


async def test_rate_fault_from_config_is_seeded():
    config = HostSimConfig.from_dict(
        {"seed": 3, "faults": [{"kind": "drop", "rate": 0.5, "mti": "0800"}]}
    )
    with anyio.fail_after(10):
        async with host(config) as (sim, port), client(port, keys=False) as c:
            for _ in range(20):
                await c.send(iso87.echo(c.stan(), DT, ACQ))
            answered = 0
            while True:  # read until the answers stop coming
                try:
                    await c.recv(timeout=0.3)
                except TimeoutError:
                    break
                answered += 1
            assert answered + sim.faults.fired("drop") == 20
            assert 3 <= sim.faults.fired("drop") <= 17


async def test_many_connections_and_concurrent_requests():
    with anyio.fail_after(15):
        async with host() as (sim, port), client(port) as keys:

            async def one_client(n: int) -> None:
                # one acquirer, so the STANs of different connections must differ (else: 94 duplicate);
                # zone keys belong to the zone, not to a connection: exchanged once, used by all
                async with client(port, keys=False, first_stan=100 * n + 1) as c:
                    c.zak, c.zpk = keys.zak, keys.zpk
                    requests = [c.purchase(1) for _ in range(5)]
                    for r in requests:
                        await c.send(r)
                    answers = [(await c.recv())[0] for _ in requests]
                    assert {a["11"] for a in answers} == {r["11"] for r in requests}
                    assert {a["39"] for a in answers} == {"00"}

            async with anyio.create_task_group() as tg:
                for n in range(8):
                    tg.start_soon(one_client, n)
            assert sim.balance("rich") == 100_000 - 40
            assert sim.stats.connections_opened == 9


# --- configuration and the sans-I/O step -----------------------------------------------------------


def test_config_from_toml_with_wire_keys(tmp_path):
    path = tmp_path / "host.toml"
    path.write_text(
        'dialect = "iso87-ascii"\nframing = "ascii4"\nzmk = "0123456789ABCDEFFEDCBA9876543210"\n'
        "limit = 77\n[[accounts]]\nid = \"x\"\nbalance = 5\nprefixes = [\"4\"]\n"
    )
    config = HostSimConfig.from_toml(path)
    assert config.framing == "ascii4" and config.rules.limit == 77
    assert "0123456789ABCDEF" not in repr(config)


@pytest.mark.parametrize(
    ("data", "needle"),
    [({"zmk": "1234"}, "zmk"), ({"max_frame": 1}, "max_frame"), ({"framing": 3}, "framing"), ({"x": 1}, "x")],
)
def test_config_errors(data, needle):
    with pytest.raises(SimConfigError, match=needle):
        HostSimConfig.from_dict(data)


def test_undecodable_request_is_counted_and_not_answered():
    sim = HostSimulator()
    reply = sim.handle(b"\x00\x01garbage")
    assert reply.action == "drop" and reply.body is None
    assert sim.stats.decode_errors == 1


# --- the command line ------------------------------------------------------------------------------

CLI = (
    "import argparse, sys\n"
    "from gateway.sim import cli\n"
    "parser = argparse.ArgumentParser()\n"
    "cli.register(parser.add_subparsers())\n"
    "args = parser.parse_args(sys.argv[1:])\n"
    "sys.exit(args.func(args))\n"
)


def test_sim_host_command_serves_until_stopped(tmp_path):
    import select
    import socket
    import subprocess
    import sys

    rules = tmp_path / "rules.toml"
    rules.write_text('limit = 10\n[[accounts]]\nid = "a"\nbalance = 100\nprefixes = ["622202"]\n')
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, "sim-host", "--listen", "127.0.0.1:0", "--config", str(rules),
         "--zmk", DEFAULT_ZMK.hex()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready, "sim-host printed nothing"
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("host simulator listening on 127.0.0.1:")
        port = int(line.split(":")[1].split()[0])
        body = CODEC.encode(iso87.sign_on("000001", DT, ACQ))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(len(body).to_bytes(2, "big") + body)
            data = b""
            while len(data) < 2 or len(data) < 2 + int.from_bytes(data[:2], "big"):
                chunk = sock.recv(4096)
                assert chunk
                data += chunk
        answer = CODEC.decode(data[2:])
        assert answer.mti == "0810" and answer["39"] == "00"
    finally:
        proc.terminate()  # the process this test started, by its own handle
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()


def test_sim_host_command_rejects_a_bad_config(tmp_path, capsys):
    import argparse

    from gateway.sim import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    bad = tmp_path / "bad.toml"
    bad.write_text("limit = -5\n")
    for argv in (["--config", str(bad)], ["--zmk", "00"], ["--listen", "nowhere"]):
        args = parser.parse_args(["sim-host", *argv])
        assert args.func(args) == 2
    assert "limit" in capsys.readouterr().err


@pytest.mark.parametrize("framing", ["ascii4", "cup"])
async def test_other_framings(framing):
    tpdu, header = bytes.fromhex("6000030000"), bytes.fromhex("603100310000")

    def frame(body: bytes) -> bytes:
        if framing == "ascii4":
            return b"%04d" % len(body) + body
        return (len(body) + 11).to_bytes(2, "big") + tpdu + header + body

    config = HostSimConfig(framing=framing, rules=RULES)
    with anyio.fail_after(10):
        async with host(config) as (_, port), await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(frame(CODEC.encode(iso87.echo("000001", DT, ACQ))))
            data = b""
            with anyio.fail_after(3):
                while len(data) < 4 or len(data) < len(frame(b"")) + int(
                    data[:4] if framing == "ascii4" else int.from_bytes(data[:2], "big") - 11
                ):
                    data += await stream.receive()
            if framing == "ascii4":
                body = data[4:]
            else:
                assert data[2:7] == bytes.fromhex("6000000003")  # TPDU addresses swapped
                assert data[7:13] == header
                body = data[13:]
            assert CODEC.decode(body)["39"] == "00"


async def test_interoperates_with_the_gateway_security_module():
    """The gateway's own SoftwareSecurityModule installs the simulator's zone keys (KCV checked), MACs
    for it and translates a terminal PIN block to its ZPK: the simulator accepts all of it."""
    from gateway.security import SoftwareSecurityModule
    from gateway.security.algorithms import generate_key

    module = SoftwareSecurityModule()
    module.import_clear_key("ZMK", DEFAULT_ZMK, save=False)
    pik = generate_key(16)
    module.import_clear_key("PIK", pik, "TERM0001", save=False)
    module.import_clear_key("MAK", generate_key(8), "TERM0001", save=False)
    with anyio.fail_after(10):
        async with host() as (sim, port), client(port, keys=False) as c:
            for usage in ("ZPK", "ZAK"):
                answer = await c.call(iso87.key_request(c.stan(), DT, usage, ACQ))
                module.install_host_key(usage, *iso87.parse_key_response(answer))
            terminal_block = encrypt_pin_block(pik, PIN, PAN)
            host_block = module.translate_pin_to_host("TERM0001", terminal_block, PAN)
            pin_block = host_block.hex().upper()
            request = iso87.purchase(IDENT, c.stan(), DT, ACQ, 600, pan=PAN, pin_block=pin_block)
            body = CODEC.encode(request)
            body = body[:-16] + module.generate_host_mac(body[:-16]).hex().upper().encode()
            await c.stream.send(len(body).to_bytes(2, "big") + body)
            answer, reply = await c.recv()
            assert answer["39"] == "00"
            module.verify_host_mac(reply[:-16], bytes.fromhex(answer["64"]))  # raises MacError if wrong
            assert sim.balance("rich") == 99_400
