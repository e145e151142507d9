"""`gateway trace proxy`: a transparent recording tap between any terminal and any host.

    gateway trace proxy --listen 127.0.0.1:5100 --target 127.0.0.1:5000 --dialect cup-pos --framing cup \
        --out trace.jsonl

Every byte is forwarded unchanged and at once, in both directions (half-closes too); a copy of each
direction is cut into frames by our framer and handed to the same `Recorder` `gateway serve` uses
(masked in its writer process, rotated, bounded). Recording can never hold the traffic back: a
framing error only stops decoding that direction (an `undecodable` event), forwarding goes on.

`--leg terminal` (default): the target is the system under test (terminals → proxy → your gateway),
so client → target is `in`. `--leg host`: the client is the SUT (your gateway → proxy → its host),
so client → target is `out`.
"""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path

import anyio
import anyio.abc

from gateway.config import ConfigError, Endpoint
from gateway.iso.errors import FramingError
from gateway.trace.codecs import make_trace_framer
from gateway.trace.format import Direction, EventKind, Leg
from gateway.trace.recorder import Recorder, RecorderSettings
from gateway.trace.tap import Tap

log = logging.getLogger("gateway.trace.proxy")

_STREAM_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError)


class _Connection:
    """The tap's handle for one proxied connection."""

    __slots__ = ("peer",)

    def __init__(self, peer: str) -> None:
        self.peer = peer


class TraceProxy:
    def __init__(self, target: Endpoint, tap: Tap, *, leg: Leg, framing: str) -> None:
        self.target = target
        self.tap = tap
        self.leg = leg
        self.framing = framing
        self.port: int | None = None
        # directions relative to the SUT (see the module docstring)
        self._to_target = Direction.IN if leg is Leg.TERMINAL else Direction.OUT
        self._from_target = Direction.OUT if leg is Leg.TERMINAL else Direction.IN

    async def serve(self, listen: Endpoint, *,
                    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host=listen.host, local_port=listen.port)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        log.info("recording proxy on %s:%s → %s", listen.host, self.port, self.target)
        task_status.started(self.port)
        async with listener:
            await listener.serve(self._handle)

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        try:
            peer = "{}:{}".format(*client.extra(anyio.abc.SocketAttribute.remote_address)[:2])
        except (OSError, TypeError, ValueError):
            peer = "?"
        try:
            upstream = await anyio.connect_tcp(self.target.host, self.target.port)
        except OSError as exc:
            log.warning("proxy: cannot reach %s for %s: %s", self.target, peer, exc)
            await anyio.aclose_forcefully(client)
            return
        conn = _Connection(peer)
        self.tap.opened(self.leg, conn, peer)
        try:
            async with client, upstream, anyio.create_task_group() as tg:
                tg.start_soon(self._pump, client, upstream, self._to_target, conn, tg.cancel_scope)
                tg.start_soon(self._pump, upstream, client, self._from_target, conn, tg.cancel_scope)
        finally:
            self.tap.closed(self.leg, conn)

    async def _pump(self, src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream, direction: Direction,
                    conn: _Connection, scope: anyio.CancelScope) -> None:
        decoder = make_trace_framer(self.framing).decoder()
        decoding = True
        try:
            while True:
                try:
                    chunk = await src.receive()
                except anyio.EndOfStream:
                    try:
                        await dst.send_eof()  # pass the half-close on; the other direction goes on
                    except _STREAM_ERRORS:
                        scope.cancel()
                    return
                await dst.send(chunk)  # forward first: recording never delays the traffic
                if decoding:
                    try:
                        frames = decoder.feed(chunk)
                    except FramingError as exc:
                        frames = []
                        decoding = False
                        self.tap.event(self.leg, conn, EventKind.UNDECODABLE, f"{direction.value}: {exc}")
                    for frame in frames:
                        self.tap.frame(self.leg, direction, conn, frame.body, frame.envelope)
                    if decoding and decoder.failed:
                        decoding = False
                        self.tap.event(self.leg, conn, EventKind.UNDECODABLE, f"{direction.value}: framing error")
        except _STREAM_ERRORS:
            scope.cancel()  # a reset on either side ends the connection on both


def proxy_recorder(out: Path, leg: Leg, dialect: str, framing: str, *, max_bytes: int, max_files: int) -> Recorder:
    return Recorder(RecorderSettings(path=out, dialects={leg.value: dialect}, framings={leg.value: framing},
                                     source="trace proxy", max_bytes=max_bytes, max_files=max_files, lenient=True))


async def _run(args: argparse.Namespace, listen: Endpoint, target: Endpoint) -> None:
    leg = Leg(args.leg)
    recorder = proxy_recorder(Path(args.out), leg, args.dialect, args.framing, max_bytes=args.max_bytes,
                              max_files=args.max_files)
    recorder.start()
    try:
        proxy = TraceProxy(target, recorder, leg=leg, framing=args.framing)
        async with anyio.create_task_group() as tg:
            port = await tg.start(proxy.serve, listen)
            print(f"recording {listen.host}:{port} → {target} into {args.out} (Ctrl-C stops)", flush=True)
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    break
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(recorder.close)


def _proxy_command(args: argparse.Namespace) -> int:
    try:
        listen = Endpoint.parse(args.listen, "--listen")
        target = Endpoint.parse(args.target, "--target")
    except ConfigError as exc:
        print(f"gateway trace proxy: {exc}")
        return 2
    logging.getLogger("gateway").setLevel(logging.INFO)
    anyio.run(_run, args, listen, target)
    return 0


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("proxy", help="a transparent recording tap between any terminal and any host")
    p.add_argument("--listen", required=True, metavar="HOST:PORT")
    p.add_argument("--target", required=True, metavar="HOST:PORT")
    p.add_argument("--dialect", default="cup-pos")
    p.add_argument("--framing", default="cup", choices=("cup", "len2", "ascii4"))
    p.add_argument("--leg", default="terminal", choices=("terminal", "host"),
                   help="terminal: the target is the system under test; host: the client is (default %(default)s)")
    p.add_argument("--out", default="trace.jsonl", metavar="FILE")
    p.add_argument("--max-bytes", type=int, default=64 * 1024 * 1024, help="rotate after this many bytes")
    p.add_argument("--max-files", type=int, default=8, help="files kept in all")
    p.set_defaults(func=_proxy_command)
