"""Shared pieces of the end-to-end benchmarks (`bench/gateway.py`):

- `CupFrameDriver`: the load driver every system is driven with. One session is one CUP terminal on its
  own connection; every request is a fresh CUP POS 0200 purchase built the way a terminal builds it
  (new STAN, TDK-encrypted track 2, ISO 9564 PIN block under the PIK, CUP MAC under the MAK, TPDU +
  header framing), so the load generator does the same work per request whatever it drives. Against
  the gateway a session signs in first (0800, working keys from field 62 checked with its TMK); against
  the echo server and the relay, which check nothing, it uses working keys of its own.
- `Services`: the processes a benchmark starts (by Popen handle, stopped in `finally`), their CPU
  time and memory from /proc, and readiness waits.
- configuration files for `gateway serve` and `gateway sim-host`.
- a launcher for the gateway where `gateway serve` has no switch: an in-memory journal and cProfile.

    python bench/common.py gateway --config gateway.toml [--memory] [--profile out.prof]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import functools
import itertools
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import anyio
import anyio.abc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.iso.build import TerminalIdent, cup, security_control
from gateway.iso.codec import Codec
from gateway.iso.framing import CupEnvelope, Frame, make_framer
from gateway.iso.spec import load_dialect
from gateway.load.driver import LoadError
from gateway.security.algorithms import (
    DesKey,
    KeyLike,
    encrypt_pin_block,
    encrypt_track,
    generate_key,
    macs_equal,
    parse_key_block,
    terminal_mac,
)
from gateway.security.keys import KeyUsage
from gateway.sim.terminal import Card

REPO: Final = Path(__file__).resolve().parents[1]
LOOPBACK: Final = "127.0.0.1"
#: the terminals' master key (the demo key); the gateway config registers every bench terminal with it
BENCH_TMK: Final = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
MERCHANT_ID: Final = "898100012340001"
#: a CUP debit card with a PIN: every purchase carries a PIN block the gateway translates to the ZPK
BENCH_CARD: Final = Card("6222021234567890123", pin="123456")
#: the card's issuer account on the host simulator: large enough for any run
HOST_BALANCE: Final = 10**15
AMOUNT: Final = 100
KEY_MODE: Final = "004"
RECEIVE_SIZE: Final = 65536

Mode = Literal["echo", "codec_echo", "relay", "gateway"]


def terminal_id(n: int) -> str:
    """Bench terminal n (1-based): BT000001, BT000002, ..."""
    return f"BT{n:06d}"


# --- the load driver -----------------------------------------------------------------------------------


def purchase_body(codec: Codec, keys: Mapping[KeyUsage, KeyLike], ident: TerminalIdent, stan: str,
                  batch: str) -> bytes:
    """The encoded 0200 purchase of the bench card, as a terminal builds it: track 2 encrypted under the
    TDK, the PIN block (ISO 9564 format 0) under the PIK, the CUP MAC under the MAK spliced into the end."""
    card = BENCH_CARD
    assert card.pin is not None
    request = cup.purchase(
        ident, stan, batch, AMOUNT,
        track2=encrypt_track(keys[KeyUsage.TDK], card.track2),
        entry_mode="021",
        pin_block=encrypt_pin_block(keys[KeyUsage.PIK], card.pin, card.pan).hex().upper(),
        security_control=security_control(track_encrypted=True),
    )
    body = codec.encode(request)
    mab = body[:-8]
    return mab + terminal_mac(keys[KeyUsage.MAK], mab)


def own_working_keys() -> dict[KeyUsage, DesKey]:
    return {usage: DesKey(generate_key(16)) for usage in (KeyUsage.PIK, KeyUsage.MAK, KeyUsage.TDK)}


@dataclass(frozen=True, slots=True)
class Prepared:
    """One request ready to go: its STAN, its body and the framed bytes."""

    stan: str
    body: bytes
    wire: bytes


@functools.cache
def codec_echo_frames() -> tuple[bytes, bytes]:
    """bench/codec_echo.py's 0200 request frame (encoded by bare pyiso8583) and the body of its 0210."""
    from codec_echo import frames  # bench/ is the script directory of every bench that drives it

    request, answer = frames()
    return request, answer[2:]


class CupFrameSession:
    """One terminal: used by one request at a time (the load tool's contract).

    Requests are built in `prepare` (before the clock starts), so the load generator's per-request work
    is send, receive and check, the same for every system. Against the gateway every request is unique
    (`frames` of them; more are built on the fly should a session take more than that, counted in
    `CupFrameDriver.built_late`); against the echo and the relay, which keep no state, a ring of
    `RING` requests is reused."""

    RING: Final = 16

    def __init__(self, stream: anyio.abc.ByteStream, driver: CupFrameDriver, ident: TerminalIdent) -> None:
        self._stream = stream
        self._driver = driver
        self._mode = driver.mode
        self._ident = ident
        self._batch = driver.batch
        self._codec = driver.codec
        self._framer = make_framer("cup", envelope=CupEnvelope.from_hex("6000010000", "603100310000"))
        if self._mode == "codec_echo":  # bench/codec_echo.py's server: ISO 8583:1987 ASCII, 2-byte length
            self._framer = make_framer("len2")
            self._codec_echo = codec_echo_frames()
        self._decoder = self._framer.decoder()
        self._frames: collections.deque[Frame] = collections.deque()
        self._stans = itertools.count(1)
        # working keys as `DesKey`s: their cipher contexts are built once, not for every MAC
        self._keys: dict[KeyUsage, DesKey] = {}
        self._ready: collections.deque[Prepared] = collections.deque()

    async def prepare(self) -> None:
        if self._mode == "gateway":
            await self._sign_in()
            count = self._driver.frames
        elif self._mode == "codec_echo":
            return  # one request and its expected answer (`codec_echo_frames`), sent again and again
        else:
            # the echo server and the relay check no MAC or PIN: keys of our own make the same bytes
            self._keys = own_working_keys()
            count = self.RING
        self._ready.extend(self._build() for _ in range(count))

    async def _sign_in(self) -> None:
        await self._stream.send(self._framer.encode(
            self._codec.encode(cup.sign_in(self._ident, self._stan(), self._batch, KEY_MODE))))
        answer = self._codec.decode((await self._receive()).body)
        block = answer.fields.get("62")
        if answer.fields.get("39") != "00" or not block:
            raise LoadError(f"terminal {self._ident.terminal_id}: sign-in answered {answer.fields.get('39')}")
        keys = parse_key_block(BENCH_TMK, bytes.fromhex(block), KEY_MODE)
        self._keys = {usage: DesKey(key, what=str(usage)) for usage, key in keys.items()}

    def _build(self) -> Prepared:
        stan = self._stan()
        body = purchase_body(self._codec, self._keys, self._ident, stan, self._batch)
        return Prepared(stan, body, self._framer.encode(body))

    def _next(self) -> Prepared:
        if self._mode != "gateway":
            item = self._ready.popleft()
            self._ready.append(item)
            return item
        if self._ready:
            return self._ready.popleft()
        self._driver.built_late += 1
        return self._build()

    async def request(self, kind: str) -> str:
        if kind != "purchase":
            raise LoadError(f"the bench driver only sends purchases, not {kind!r}")
        if self._mode == "codec_echo":
            request, expected = self._codec_echo
            await self._stream.send(request)
            return "00" if (await self._receive()).body == expected else "echo_mismatch"
        item = self._next()
        await self._stream.send(item.wire)
        frame = await self._receive()
        if self._mode == "echo":
            return "00" if frame.body == item.body else "echo_mismatch"
        answer = self._codec.decode(frame.body)
        if answer.mti != "0210" or answer.fields.get("11") != item.stan:
            return "bad_answer"
        rc = answer.fields.get("39", "none")
        if self._mode == "gateway" and rc == "00":
            expected = terminal_mac(self._keys[KeyUsage.MAK], frame.body[:-8])
            if not macs_equal(expected, frame.body[-8:]):
                return "bad_mac"
        return rc

    async def aclose(self) -> None:
        await self._stream.aclose()

    def _stan(self) -> str:
        return f"{next(self._stans) % 1_000_000 or 1:06d}"

    async def _receive(self) -> Frame:
        while not self._frames:
            self._frames.extend(self._decoder.feed(await self._stream.receive(RECEIVE_SIZE)))
        return self._frames.popleft()


class CupFrameDriver:
    """Sessions numbered from terminal 1 on, all with `batch` (a new batch per run keeps the gateway's
    (terminal, batch, STAN) duplicate check quiet although STANs start at 1 in every run). `frames`:
    requests each gateway session builds ahead."""

    def __init__(self, port: int, mode: Mode, batch: int, frames: int = 0) -> None:
        self.port = port
        self.mode = mode
        self.batch = f"{batch % 1_000_000:06d}"
        self.frames = frames
        self.built_late = 0
        self.codec = Codec(load_dialect("cup-pos"))
        self._numbers = itertools.count(1)

    async def connect(self) -> CupFrameSession:
        stream = await anyio.connect_tcp(LOOPBACK, self.port)
        return CupFrameSession(stream, self, TerminalIdent(terminal_id(next(self._numbers)), MERCHANT_ID))


# --- processes -----------------------------------------------------------------------------------------

_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The child processes of `pid` (a recording gateway's trace writer), from /proc."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as f:
                out += [int(c) for c in f.read().split()]
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads, ended ones included) from /proc/PID/stat."""
    return cpu_seconds_of(f"/proc/{pid}/stat")


def machine_busy_seconds() -> float:
    """CPU time all CPUs have spent busy (everything but idle and iowait), from /proc/stat: with our
    processes' own time subtracted, what other work on the machine took during a run."""
    with open("/proc/stat", encoding="ascii") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / _CLOCK_TICKS  # user..steal; guest time is already in user


def main_thread_cpu_seconds(pid: int) -> float:
    """CPU time of the process's main thread (the event loop); the rest of `cpu_seconds` is its worker
    threads (the journal's SQLite commits run in anyio worker threads) and threads that have ended."""
    return cpu_seconds_of(f"/proc/{pid}/task/{pid}/stat")


def cpu_seconds_of(stat_path: str) -> float:
    with open(stat_path, encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime (fields 14, 15)


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in kB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def free_port() -> int:
    """A port that is free right now on loopback (the service binds it a moment later)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    cpus: set[int] | None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def check(self) -> None:
        if not self.alive():
            raise RuntimeError(f"{self.name} (pid {self.pid}) exited with {self.proc.returncode}:\n"
                               f"{self.log_tail()}")


class Services:
    """The processes a benchmark started. Each is stopped through its own Popen handle: SIGTERM, then
    SIGKILL if it has not gone within `grace` seconds. Used as a context manager, so they always stop."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: list[Service] = []
        self._seq = itertools.count(1)

    def start(self, name: str, argv: Sequence[str], *, cpus: set[int] | None, ready: str | None = None,
              timeout: float = 20.0) -> tuple[Service, re.Match[str] | None]:
        """Start `argv` (cwd = the repository, output to a log file), pin it to `cpus` and, when `ready` is
        given, wait for a log line matching that regex."""
        log = self.workdir / f"{next(self._seq):02d}-{re.sub(r'[^a-z0-9]+', '-', name.lower())}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(list(argv), cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        service = Service(name, proc, log, cpus)
        self.running.append(service)
        if cpus is not None:
            os.sched_setaffinity(proc.pid, cpus)
        match = None
        if ready is not None:
            pattern = re.compile(ready, re.MULTILINE)
            deadline = time.monotonic() + timeout
            while match is None:
                service.check()
                match = pattern.search(log.read_text(errors="replace"))
                if match is None:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{name} not ready after {timeout:g} s:\n{service.log_tail()}")
                    time.sleep(0.05)
        return service, match

    def stop(self, service: Service, grace: float = 10.0) -> None:
        if service.alive():
            service.proc.terminate()
            try:
                service.proc.wait(grace)
            except subprocess.TimeoutExpired:
                service.proc.kill()
                service.proc.wait(grace)
        with contextlib.suppress(ValueError):
            self.running.remove(service)

    def stop_all(self) -> None:
        for service in reversed(list(self.running)):
            with contextlib.suppress(Exception):
                self.stop(service)

    def __enter__(self) -> Services:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()


def wait_ready(service: Service, admin_port: int, timeout: float = 20.0) -> None:
    """Until the gateway's /readyz says 200 (terminal port up, host link signed on)."""
    deadline = time.monotonic() + timeout
    url = f"http://{LOOPBACK}:{admin_port}/readyz"
    while True:
        service.check()
        with contextlib.suppress(OSError, urllib.error.URLError), urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{service.name} not ready after {timeout:g} s:\n{service.log_tail()}")
        time.sleep(0.1)


# --- configuration files -------------------------------------------------------------------------------


def write_gateway_config(path: Path, *, terminal_port: int, admin_port: int, host_port: int, zmk: bytes,
                         journal: Path, metrics: bool, terminals: int, trace: Path | None = None) -> None:
    """A `gateway serve` TOML: loopback ports, the host simulator, a durable journal with
    synchronous=FULL, limits that never refuse a bench purchase, and terminals BT000001.. with the
    bench TMK; with `trace`, both legs recorded there ([trace] path: the recorder's writer process)."""
    lines = [
        "[terminal_side]",
        f'listen = "{LOOPBACK}:{terminal_port}"',
        "[host]",
        f'address = "{LOOPBACK}:{host_port}"',
        "timeout = 5",
        "[security]",
        f'zmk = "{zmk.hex().upper()}"',
        f'key_mode = "{KEY_MODE}"',
        "[store]",
        f'path = "{journal}"',
        'synchronous = "FULL"',
        f'pan_hash_key_hex = "{"11" * 32}"',
        "[limits]",
        "per_transaction = 1000000000",
        f"per_day = {HOST_BALANCE}",
        "[admin]",
        f'listen = "{LOOPBACK}:{admin_port}"',
        f"metrics = {'true' if metrics else 'false'}",
    ]
    if trace is not None:
        lines += ["[trace]", f'path = "{trace}"']
    for n in range(1, terminals + 1):
        lines += ["[[terminals]]", f'terminal_id = "{terminal_id(n)}"', f'merchant_id = "{MERCHANT_ID}"',
                  f'tmk = "{BENCH_TMK.hex().upper()}"']
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_host_config(path: Path) -> None:
    """`gateway sim-host` rules: the bench card's range with its PIN and a balance no run exhausts."""
    pan = BENCH_CARD.pan
    path.write_text(
        f"limit = 1000000000\n[[accounts]]\nid = \"bench\"\nbalance = {HOST_BALANCE}\n"
        f"prefixes = [\"{pan[:6]}\"]\npin = \"{BENCH_CARD.pin}\"\n",
        encoding="utf-8",
    )


# --- launcher: the gateway with an in-memory journal and/or under cProfile --------------------------


def _launch(argv: Sequence[str] | None = None) -> int:
    from gateway import gcpolicy
    from gateway.config import load_config
    from gateway.serve import run_gateway

    parser = argparse.ArgumentParser(prog="python bench/common.py gateway",
                                     description="run_gateway() as `gateway serve` does, with bench switches")
    parser.add_argument("--config", required=True)
    parser.add_argument("--memory", action="store_true", help="in-memory journal: run_gateway(durable=False)")
    parser.add_argument("--profile", metavar="PATH", help="run under cProfile, write the stats here on exit")
    args = parser.parse_args(argv)
    config = load_config(Path(args.config))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("gateway").setLevel(logging.INFO)  # as `gateway serve`

    async def serve() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(lambda task_status: run_gateway(config, durable=not args.memory,
                                                           task_status=task_status))
            gcpolicy.settle_after_startup()  # as `gateway serve`
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    return

    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        profiler.enable()
    try:
        anyio.run(serve, backend="asyncio", backend_options={"use_uvloop": True})
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
    return 0


@contextlib.contextmanager
def pinned(cpus: set[int] | None) -> Iterator[None]:
    """This process on `cpus` for the block (None: leave it alone)."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "gateway":
        print(__doc__)
        sys.exit(2)
    sys.exit(_launch(sys.argv[2:]))
