"""Codec echo benchmark: server CPU per message of an ISO 8583:1987 ASCII 0200 → 0210 echo (decode,
set the response MTI and field 39 = "00", encode: what jPOS's ISOServer + ISO87APackager echo does,
reference limits.md) next to the raw framed echo floor, measured in the same run.

    python bench/codec_echo.py [--rounds 5] [--seconds 3] [--connections 16] [--depth 4] [--no-pin]
    python bench/codec_echo.py serve --codec compiled|pure|none [--port 0]      # one server alone

Servers (each its own process, pinned to the last CPU; the load generator in this process on the
others), all driven by the same client with the same 0200 frame (len2 framing, 2-byte length):

* `raw echo (anyio)`: `python -m gateway.load.echo`, the project's I/O floor (bench/echo_floor.py);
* `lean echo`: the codec echo's own shell with the codec left out (asyncio Protocol on uvloop, the
  project's len2 framer, frames echoed): the floor of this server design;
* `codec echo compiled` and `codec echo pure`: the same shell decoding and encoding with
  `gateway.iso.codec.Codec` (compiled, then the pure-Python codec for comparison).

The load: closed loop, `--connections` connections with `--depth` requests in flight on each. The
client checks every answer byte for byte against the expected 0210 (made by the pure codec) or, for
the echoes, the request. The systems take turns, round after round (this machine's speed drifts);
figures are medians over the rounds. Server CPU comes from /proc/PID/schedstat (ns), so it counts
what the server process ran, whatever the load generator could or could not offer.

What the codec echo server keeps: a bad frame (FramingError) or a message that does not decode
(CodecError) closes that connection with a log line; a peer that does not read pauses reading from it
(transport write-buffer limits), so memory stays bounded; answers go out in one write per read.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # bench/codec.py's messages (after the repo: bench/gateway.py)

import uvloop

from gateway.iso.codec import Codec
from gateway.iso.errors import CodecError, FramingError
from gateway.iso.framing import make_framer
from gateway.iso.message import Message
from gateway.iso.spec import load_dialect

LOOPBACK = "127.0.0.1"
DIALECT = "iso87-ascii"
FRAMING = "len2"
log = logging.getLogger("codec_echo")


# --- the server ------------------------------------------------------------------------------------


def response_mti(mti: str) -> str:
    """0200 → 0210, 0800 → 0810 (the function digit + 1), as jPOS's ISOMsg.setResponseMTI()."""
    return f"{mti[:2]}{int(mti[2]) + 1}{mti[3:]}"


class EchoProtocol(asyncio.Protocol):
    """One connection. `codec` None: echo the frames' bodies (the lean floor)."""

    def __init__(self, codec: Codec | None) -> None:
        self.codec = codec
        self.decoder = make_framer(FRAMING).decoder()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's TCPTransport
        self.transport.set_write_buffer_limits(high=1 << 20)

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        try:
            frames = self.decoder.feed(data)
        except FramingError as exc:
            log.warning("closing: %s", exc)
            transport.close()
            return
        out: list[bytes] = []
        codec = self.codec
        try:
            for frame in frames:
                body = frame.body
                if codec is not None:
                    msg = codec.decode(body)
                    msg.mti = response_mti(msg.mti)
                    msg.fields["39"] = "00"
                    body = codec.encode(msg)
                out.append(len(body).to_bytes(2, "big"))
                out.append(body)
        except CodecError as exc:  # answered what came before it, then close: the peer is broken
            log.warning("closing: %s", exc)
            if out:
                transport.writelines(out)
            transport.close()
            return
        if out:
            transport.writelines(out)
        if self.decoder.failed:
            transport.close()

    def pause_writing(self) -> None:  # the peer does not read: stop reading its requests
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()


def serve(codec_name: str, port: int) -> int:
    codec = None if codec_name == "none" else Codec(load_dialect(DIALECT), implementation=codec_name)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: EchoProtocol(codec), LOOPBACK, port)
        print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
        await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(run())
    return 0


# --- the load generator -----------------------------------------------------------------------------


class LoadProtocol(asyncio.Protocol):
    """Keeps `depth` requests in flight; every answer must be exactly `expected`."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self.buf = bytearray()
        self.in_flight = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def send(self, n: int) -> None:
        assert self.transport is not None
        self.in_flight += n
        self.transport.write(self.group.request * n)

    def data_received(self, data: bytes) -> None:
        group = self.group
        self.buf += data
        size = len(group.expected)
        n = len(self.buf) // size
        if not n:
            return
        if self.buf[: n * size] != group.expected * n:
            group.errors += 1
        del self.buf[: n * size]
        self.in_flight -= n
        group.answered += n
        if group.running:
            self.send(n)
        elif self.in_flight == 0:
            group.drained.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.group.running:
            self.group.errors += 1


class Group:
    """The client connections to one server."""

    def __init__(self, name: str, port: int, request: bytes, expected: bytes) -> None:
        self.name = name
        self.port = port
        self.request = request
        self.expected = expected
        self.conns: list[LoadProtocol] = []
        self.running = False
        self.answered = 0
        self.errors = 0
        self.drained = asyncio.Event()

    async def connect(self, count: int) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(count):
            _transport, proto = await loop.create_connection(lambda: LoadProtocol(self), LOOPBACK, self.port)
            self.conns.append(proto)

    def start(self, depth: int) -> None:
        self.running = True
        self.drained.clear()
        for conn in self.conns:
            conn.send(depth)

    async def stop(self) -> None:
        self.running = False
        if any(c.in_flight for c in self.conns):
            await asyncio.wait_for(self.drained.wait(), 30)


def cpu_ns(pid: int) -> int:
    with open(f"/proc/{pid}/schedstat") as fh:
        return int(fh.read().split()[0])


def own_cpu_ns() -> int:
    return cpu_ns(os.getpid())


def start_server(args: list[str], cpu: int | None) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("port "):
        proc.kill()
        raise SystemExit(f"server {args} did not start: {line!r}")
    if cpu is not None:
        os.sched_setaffinity(proc.pid, {cpu})
    return proc, int(line.split()[1])


def frames() -> tuple[bytes, bytes]:
    """The 0200 request frame (encoded by bare pyiso8583, not by our codec) and the expected 0210."""
    import iso8583
    from codec import ISO87_DOCS

    dialect = load_dialect(DIALECT)
    body = bytes(iso8583.encode(dict(ISO87_DOCS[0]), dialect.spec)[0])
    pure = Codec(dialect, implementation="pure")
    msg = pure.decode(body)
    answer = pure.encode(Message(response_mti(msg.mti), {**msg.fields, "39": "00"}))
    return len(body).to_bytes(2, "big") + body, len(answer).to_bytes(2, "big") + answer


async def measure(systems: list[tuple[str, int, bool]], args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    request, answer = frames()
    groups = []
    for name, port, _codec in systems:
        group = Group(name, port, request, answer if _codec else request)
        await group.connect(args.connections)
        groups.append(group)
    pids = {name: pid for name, pid in args.pids.items()}
    results: dict[str, list[dict[str, float]]] = {g.name: [] for g in groups}
    for group in groups:  # warm-up
        group.start(args.depth)
        await asyncio.sleep(0.5)
        await group.stop()
    for r in range(args.rounds):
        order = groups[r % len(groups) :] + groups[: r % len(groups)]
        for group in order:
            group.start(args.depth)
            await asyncio.sleep(0.3)  # reach steady state
            n0, s0, c0, t0 = group.answered, cpu_ns(pids[group.name]), own_cpu_ns(), time.monotonic()
            await asyncio.sleep(args.seconds)
            n1, s1, c1, t1 = group.answered, cpu_ns(pids[group.name]), own_cpu_ns(), time.monotonic()
            await group.stop()
            n = n1 - n0
            results[group.name].append(
                {
                    "rate": n / (t1 - t0),
                    "server_us": (s1 - s0) / 1000 / n,
                    "server_busy": (s1 - s0) / 1e9 / (t1 - t0),
                    "client_busy": (c1 - c0) / 1e9 / (t1 - t0),
                }
            )
        print(f"  round {r + 1}/{args.rounds}: "
              + ", ".join(f"{g.name} {results[g.name][-1]['server_us']:.1f} µs" for g in groups), flush=True)
    for group in groups:
        if group.errors:
            raise SystemExit(f"{group.name}: {group.errors} wrong answers or lost connections")
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        parser = argparse.ArgumentParser(prog="codec_echo.py serve")
        parser.add_argument("--codec", choices=("compiled", "pure", "none"), required=True)
        parser.add_argument("--port", type=int, default=0)
        args = parser.parse_args(argv[1:])
        logging.basicConfig(level=logging.WARNING)
        return serve(args.codec, args.port)

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4, help="requests in flight per connection")
    parser.add_argument("--no-pure", action="store_true", help="leave out the pure-codec echo (slow)")
    parser.add_argument("--no-pin", action="store_true")
    args = parser.parse_args(argv)

    cpus = sorted(os.sched_getaffinity(0))
    pin = len(cpus) >= 2 and not args.no_pin
    server_cpu = cpus[-1] if pin else None
    me = Path(__file__).resolve()
    specs: list[tuple[str, list[str], bool]] = [
        ("raw echo (anyio)", ["-m", "gateway.load.echo", "--port", "0"], False),
        ("lean echo", [str(me), "serve", "--codec", "none"], False),
        ("codec echo compiled", [str(me), "serve", "--codec", "compiled"], True),
    ]
    if not args.no_pure:
        specs.append(("codec echo pure", [str(me), "serve", "--codec", "pure"], True))
    procs: list[subprocess.Popen[str]] = []
    try:
        systems = []
        args.pids = {}
        for name, command, codec in specs:
            proc, port = start_server(command, server_cpu)
            procs.append(proc)
            systems.append((name, port, codec))
            args.pids[name] = proc.pid
        if pin:
            os.sched_setaffinity(0, set(cpus[:-1]))
        request, _ = frames()
        print(f"servers pinned to CPU {server_cpu}, load generator on {cpus[:-1]}" if pin else "not pinned")
        print(f"{args.connections} connections x {args.depth} in flight, {len(request)}-byte 0200 frames, "
              f"{args.rounds} rounds of {args.seconds:g} s per system")
        results = uvloop.run(measure(systems, args))
    finally:
        for proc in procs:  # the servers we started, by their own handles
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    print(f"\n{'system':<22} {'msg/s':>9} {'server CPU µs/msg':>18} {'server busy':>12} {'client busy':>12}")
    summary: dict[str, dict[str, Any]] = {}
    for name, rows in results.items():
        summary[name] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        s = summary[name]
        print(f"{name:<22} {s['rate']:>9.0f} {s['server_us']:>18.1f} {s['server_busy']:>11.0%} "
              f"{s['client_busy']:>11.0%}")
    floor = summary["raw echo (anyio)"]["server_us"]
    lean = summary["lean echo"]["server_us"]
    codec = summary["codec echo compiled"]["server_us"]
    print(f"\ncodec echo (compiled) {codec:.1f} µs/msg: {codec - lean:.1f} µs over the lean echo, "
          f"{codec / floor:.2f}x the raw echo floor ({floor:.1f} µs); target <= 22 µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
