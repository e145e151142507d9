"""Recording real lab traffic into a v1 trace for the replay and diff tests.

Until `gateway serve`'s recorder is on main, this test-only tap stands in for it, the simplest honest
way: two loopback proxies (terminals ⇄ tap ⇄ gateway, gateway ⇄ tap ⇄ host simulator) decode every
frame with our framers and codecs and write it as a `FrameRecord`, secrets replaced the way the trace
format prescribes: PANs by consistent Luhn-valid surrogates (same BIN), tracks in clear form on the
surrogate PAN (the tap knows the lab's TMKs, so it unwraps each 0810's TDK as the terminal does),
PIN blocks, MACs and keys by marked placeholders.
"""

from __future__ import annotations

import json
import random
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.abc

from gateway.config import Endpoint, LimitsConfig, ReversalConfig
from gateway.iso.codec import Codec
from gateway.iso.errors import IsoError
from gateway.iso.framing import CupEnvelope, make_framer
from gateway.iso.spec import load_dialect
from gateway.lab import (
    CARD_CUP,
    CARD_CUP_2,
    CARD_LOW,
    CARD_VISA,
    LAB_ACCOUNTS,
    LAB_CARDS,
    LOOPBACK,
    MERCHANT_ID,
    lab_config,
    terminal_ids,
)
from gateway.security.algorithms import decrypt_track, generate_key, parse_key_block
from gateway.security.keys import KeyUsage
from gateway.serve import RunningGateway, run_gateway
from gateway.sim.host import HostSimConfig, HostSimulator
from gateway.sim.host_rules import Fault, HostRulesConfig
from gateway.sim.keyfile import LabKeys, LabTerminal, read_test_keys, render_test_keys
from gateway.sim.terminal import TerminalSimulator
from gateway.trace.format import (
    Direction,
    EventKind,
    EventRecord,
    FrameRecord,
    Leg,
    SecretKind,
    TraceHeader,
)

FAST_SAF = ReversalConfig(max_attempts=5, backoff=(0.2, 0.5, 1.0), poll_interval=0.05, original_wait=3.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def luhn_digit(body: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            d -= 9 if d > 9 else 0
        total += d
    return str((10 - total % 10) % 10)


class Recorder:
    """Writes records as they come; secrets surrogated (consistent within the trace)."""

    def __init__(self, path: Path, tmks: dict[str, bytes]) -> None:
        self.out: IO[str] = path.open("w", encoding="utf-8")
        header = TraceHeader(source="test tap", dialects={"terminal": "cup-pos", "host": "iso87-ascii"},
                             framings={"terminal": "cup", "host": "len2"},
                             created=time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.out.write(json.dumps(header.to_json()) + "\n")
        self.seq = 0
        self.tmks = tmks
        self._pans: dict[str, str] = {}
        self._rng = random.Random(7)
        self._mode: dict[str, str] = {}
        self._tdk: dict[str, bytes] = {}
        self.codecs = {Leg.TERMINAL: Codec(load_dialect("cup-pos")), Leg.HOST: Codec(load_dialect("iso87-ascii"))}

    def _write(self, obj: dict[str, Any]) -> None:
        self.out.write(json.dumps(obj, separators=(",", ":")) + "\n")
        self.out.flush()

    def event(self, leg: Leg, conn: str, kind: EventKind, detail: str = "") -> None:
        self.seq += 1
        self._write(EventRecord(self.seq, time.time(), leg, conn, kind, detail).to_json())

    def surrogate_pan(self, pan: str) -> str:
        found = self._pans.get(pan)
        if found is None:
            body = pan[:6] + "".join(self._rng.choice("0123456789") for _ in range(len(pan) - 7))
            found = self._pans[pan] = body + luhn_digit(body)
        return found

    def _track(self, track: str, sep: str) -> str:
        pan, found, rest = track.partition(sep)
        return self.surrogate_pan(pan) + found + rest if found else track

    def frame(self, leg: Leg, direction: Direction, conn: str, body: bytes, envelope: CupEnvelope | None) -> None:
        try:
            msg = self.codecs[leg].decode(body)
        except IsoError as exc:
            self.event(leg, conn, EventKind.UNDECODABLE, str(exc))
            return
        fields = dict(msg.fields)
        secrets: dict[str, SecretKind] = {}
        tid = fields.get("41", "")
        if leg is Leg.TERMINAL and msg.mti == "0800":
            self._mode[tid] = fields.get("60", "")[8:11] or "004"
        if leg is Leg.TERMINAL and msg.mti == "0810" and fields.get("39") == "00" and "62" in fields:
            keys = parse_key_block(self.tmks[tid], bytes.fromhex(fields["62"]), self._mode.get(tid, "004"))
            if KeyUsage.TDK in keys:
                self._tdk[tid] = keys[KeyUsage.TDK]
        if "2" in fields:
            fields["2"] = self.surrogate_pan(fields["2"])
            secrets["2"] = SecretKind.PAN
        if "35" in fields:
            track = fields["35"]
            if leg is Leg.TERMINAL and fields.get("53", "")[2:3] == "1":
                track = decrypt_track(self._tdk[tid], track)
            fields["35"] = self._track(track, "D" if leg is Leg.TERMINAL else "=")
            secrets["35"] = SecretKind.TRACK
        for k, kind in (("52", SecretKind.PIN), ("64", SecretKind.MAC), ("128", SecretKind.MAC)):
            if k in fields:
                fields[k] = "0" * len(fields[k])
                secrets[k] = kind
        if "62" in fields and msg.mti[1] == "8":
            fields["62"] = "0" * len(fields["62"])
            secrets["62"] = SecretKind.KEY
        if leg is Leg.HOST and "48" in fields and fields.get("70") == "101":
            fields["48"] = "0" * len(fields["48"])
            secrets["48"] = SecretKind.KEY
        env = {"tpdu": envelope.tpdu.hex().upper(), "header": envelope.header.hex().upper()} if envelope else None
        self.seq += 1
        self._write(FrameRecord(self.seq, time.time(), leg, direction, conn, msg.mti, fields, envelope=env,
                                secrets=secrets).to_json())

    def close(self) -> None:
        self.out.close()


async def tap(recorder: Recorder, leg: Leg, framing: str, prefix: str, target: int, *,
              task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
    """A recording proxy: listen on a loopback port, forward each connection to `target`."""
    listener = await anyio.create_tcp_listener(local_host=LOOPBACK, local_port=0)
    counter = iter(range(1, 1_000_000))

    async def pump(src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream, direction: Direction, conn: str,
                   scope: anyio.CancelScope) -> None:
        decoder = make_framer(framing, 8192).decoder()
        try:
            async for chunk in src:
                for frame in decoder.feed(chunk):
                    recorder.frame(leg, direction, conn, frame.body, frame.envelope)
                await dst.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, IsoError):
            pass
        scope.cancel()

    async def handle(client: anyio.abc.SocketStream) -> None:
        conn = f"{prefix}{next(counter)}"
        # the client is a terminal (towards the SUT: in) on the terminal leg, the SUT (out) on the host leg
        towards_target = Direction.IN if leg is Leg.TERMINAL else Direction.OUT
        back = Direction.OUT if leg is Leg.TERMINAL else Direction.IN
        try:
            server = await anyio.connect_tcp(LOOPBACK, target)
        except OSError:
            await client.aclose()
            return
        recorder.event(leg, conn, EventKind.CONNECT)
        async with client, server, anyio.create_task_group() as tg:
            tg.start_soon(pump, client, server, towards_target, conn, tg.cancel_scope)
            tg.start_soon(pump, server, client, back, conn, tg.cancel_scope)
        recorder.event(leg, conn, EventKind.CLOSE)

    task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
    async with listener:
        await listener.serve(handle)


@dataclass(slots=True)
class RecordedLab:
    host: HostSimulator
    gateway: RunningGateway
    terminal_port: int
    tmks: dict[str, bytes]
    zmk: bytes
    keys_file: Path
    sims: list[TerminalSimulator] = field(default_factory=list)

    def terminal(self, index: int = 0, **options: Any) -> TerminalSimulator:
        tid = sorted(self.tmks)[index]
        sim = TerminalSimulator(LOOPBACK, self.terminal_port, tid, MERCHANT_ID, self.tmks[tid], cards=LAB_CARDS,
                                **options)
        self.sims.append(sim)
        return sim


@asynccontextmanager
async def recorded_lab(tmp: Path, trace: Path, *, terminals: int = 3, host_timeout: float = 0.6,
                       faults: Iterable[Fault] = (), zmk: bytes | None = None,
                       tmks: dict[str, bytes] | None = None) -> AsyncIterator[RecordedLab]:
    """Host simulator, gateway and tap on loopback; terminal simulators record through the tap.
    Fresh keys unless given."""
    zmk = zmk or generate_key(16)
    tmks = tmks or {tid: generate_key(16) for tid in terminal_ids(terminals)}
    keys_file = tmp / "lab-keys.toml"
    lab_keys = LabKeys(zmk, tuple(LabTerminal(tid, MERCHANT_ID, k) for tid, k in tmks.items()))
    keys_file.write_text(render_test_keys(lab_keys), encoding="utf-8")
    recorder = Recorder(trace, tmks)
    host = HostSimulator(HostSimConfig(zmk=zmk, rules=HostRulesConfig(accounts=LAB_ACCOUNTS, limit=2_000_000,
                                                                      faults=tuple(faults))))
    try:
        async with anyio.create_task_group() as tg:
            host_port = await tg.start(host.serve, LOOPBACK, 0)
            host_tap = await tg.start(tap, recorder, Leg.HOST, "len2", "H", host_port)
            config = lab_config(tmp / "rec", host_tap, tmks, zmk, host_timeout=host_timeout, admin=False,
                                reversal=FAST_SAF)
            gw: RunningGateway = await tg.start(_gateway, config)
            with anyio.fail_after(10):
                await gw.link.wait_signed_on()
            term_tap = await tg.start(tap, recorder, Leg.TERMINAL, "cup", "T", gw.terminal_port)
            lab = RecordedLab(host, gw, term_tap, tmks, zmk, keys_file)
            try:
                yield lab
            finally:
                for sim in lab.sims:
                    await sim.aclose()
                await anyio.sleep(0.2)  # the tap writes the closes
                tg.cancel_scope.cancel()
    finally:
        recorder.close()


async def _gateway(config: Any, *, task_status: anyio.abc.TaskStatus[RunningGateway] = anyio.TASK_STATUS_IGNORED
                   ) -> None:
    await run_gateway(config, durable=True, task_status=task_status)


@asynccontextmanager
async def fresh_gateway(tmp: Path, keys_file: Path, host_port: int, *, host_timeout: float = 0.6,
                        limits: LimitsConfig | None = None, reversal: ReversalConfig | None = None,
                        name: str = "sut") -> AsyncIterator[RunningGateway]:
    """A new gateway (empty journal) with the lab keys, its host link pointed at `host_port`."""
    keys = read_test_keys(keys_file)
    config = lab_config(tmp / name, host_port, {t.terminal_id: t.tmk for t in keys.terminals}, keys.zmk,
                        host_timeout=host_timeout, admin=False, limits=limits, reversal=reversal or FAST_SAF)
    async with anyio.create_task_group() as tg:
        gw: RunningGateway = await tg.start(_gateway, config)
        try:
            yield gw
        finally:
            tg.cancel_scope.cancel()


def endpoint(port: int) -> Endpoint:
    return Endpoint(LOOPBACK, port)


async def record_session(tmp: Path, trace: Path, *, host_timeout: float, late: float,
                         zmk: bytes | None = None, tmks: dict[str, bytes] | None = None) -> Path:
    """A representative session: sign-ins, approvals, declines (51, 55), a refund of a purchase by its
    RRN, a void, a balance inquiry, a terminal reversal, a purchase over the limit and its reversal,
    and a host timeout that the gateway reverses by itself (the host's approval arrives `late`).
    Returns the lab keys file."""
    slow = Fault("late", seconds=late, pan=CARD_CUP_2.pan, mti=("0200",), limit=1)
    async with recorded_lab(tmp, trace, host_timeout=host_timeout, faults=[slow], zmk=zmk, tmks=tmks) as lab:
        t1, t2 = lab.terminal(0), lab.terminal(1)
        await t1.connect()
        await t2.connect()
        assert (await t1.sign_in()).rc == "00"
        assert (await t2.sign_in()).rc == "00"
        sale = await t1.purchase(12_345, CARD_CUP)
        assert sale.approved
        assert (await t2.purchase(8_800, CARD_VISA)).approved
        assert (await t1.purchase(9_000, CARD_LOW)).rc == "51"
        assert (await t2.purchase(1_000, CARD_CUP, pin="999999")).rc == "55"
        assert (await t1.refund(2_000, CARD_CUP, original=sale)).rc == "00"
        sale2 = await t2.purchase(3_300, CARD_VISA)
        assert (await t2.void(sale2)).rc == "00"
        assert (await t1.balance(CARD_CUP)).rc == "00"
        sale3 = await t1.purchase(700, CARD_VISA)
        assert (await t1.reversal(sale3, "96")).rc == "00"
        over = await t2.purchase(1_500_000, CARD_CUP)  # above the per-transaction limit: refused here
        assert over.rc == "61"
        assert (await t2.reversal(over, "06")).rc == "25"  # the gateway never saw an original for it
        timed_out = await t1.purchase(4_200, CARD_CUP_2)
        assert timed_out.rc == "98"
        with anyio.fail_after(10):  # until the gateway's own reversal of it is acknowledged
            while len(lab.host.rules.reversed()) < 2:  # the terminal's reversal and the gateway's
                await anyio.sleep(0.05)
        await anyio.sleep(late)  # the late approval arrives too, and is journalled, never forwarded
    return lab.keys_file


#: the keys of examples/replay (also in its gateway.toml and lab-keys.toml): lab keys, never production
EXAMPLE_ZMK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
EXAMPLE_TMKS = {"10000001": bytes.fromhex("FDE67607DFC81C9EF2497931AE8097A2"),
                "10000002": bytes.fromhex("83AB7C026129CD9D6ED3CDE386027AC2")}
EXAMPLE_HOST_TIMEOUT, EXAMPLE_LATE = 1.0, 2.0


async def record_example(directory: Path) -> None:
    """Regenerate examples/replay/session.jsonl and session-rerun.jsonl (two recordings of one session)."""
    for name in ("session.jsonl", "session-rerun.jsonl"):
        with tempfile.TemporaryDirectory() as tmp:
            await record_session(Path(tmp), directory / name, host_timeout=EXAMPLE_HOST_TIMEOUT,
                                 late=EXAMPLE_LATE, zmk=EXAMPLE_ZMK, tmks=dict(EXAMPLE_TMKS))


if __name__ == "__main__":  # python -m tests.trace_support examples/replay
    import sys

    anyio.run(record_example, Path(sys.argv[1]))
