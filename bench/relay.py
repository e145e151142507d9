"""The codec floor: a bare relay and a trivial "codec host", each a process of its own.

    python bench/relay.py codec-host [--port 0]
    python bench/relay.py relay --upstream 127.0.0.1:PORT [--port 0]

Both print "port N" once they listen (127.0.0.1 only) and serve until terminated.

- `codec-host` reads CUP-framed CUP POS requests, decodes each with `gateway.iso.codec.Codec`, builds
  the answer with `gateway.iso.build.response(request, "00", "cup-pos")` (the flow's echoed fields,
  39 = 00 and a MAC placeholder), encodes it and frames it with the request's TPDU/header turned round.
  Every answer of one read goes out in one write.
- `relay` accepts terminals' CUP frames, decodes and re-encodes each request, forwards it on one
  shared upstream connection to the codec host, and decodes and re-encodes the answer before writing it
  back to the terminal. That is the codec work of a switched transaction (two decodes, two encodes) and
  its four socket operations, and nothing else: no MAC, no PIN, no journal, no metrics, no matching
  beyond a FIFO (the codec host answers in order on its one connection).

Same shell as the gateway (anyio streams on uvloop, the gateway's own framer and codec), so the
gateway's figures can be read against it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import anyio
import anyio.abc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.iso.build import response
from gateway.iso.codec import Codec
from gateway.iso.errors import IsoError
from gateway.iso.framing import CupEnvelope, Frame, make_framer
from gateway.iso.spec import load_dialect

DIALECT = "cup-pos"
LOOPBACK = "127.0.0.1"
RECEIVE_SIZE = 65536
_CLOSED = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


def _codec() -> Codec:
    return Codec(load_dialect(DIALECT))


# --- the codec host ------------------------------------------------------------------------------------


_FRAMER = make_framer("cup")


def answer_frame(codec: Codec, frame: Frame) -> bytes:
    """The framed 0210 (or whatever answer the flow has) to one framed request."""
    request = codec.decode(frame.body)
    envelope = frame.envelope.reply() if frame.envelope is not None else None
    return _FRAMER.encode(codec.encode(response(request, "00", DIALECT)), envelope)


async def codec_host_connection(stream: anyio.abc.ByteStream) -> None:
    codec = _codec()
    decoder = _FRAMER.decoder()
    async with stream:
        with contextlib.suppress(*_CLOSED):
            while True:
                frames = decoder.feed(await stream.receive(RECEIVE_SIZE))
                if frames:
                    await stream.send(b"".join(answer_frame(codec, f) for f in frames))


# --- the relay -----------------------------------------------------------------------------------------


class _Waiter:
    __slots__ = ("event", "frame")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.frame: Frame | None = None


class Upstream:
    """One connection to the codec host, shared by every terminal; answers come back in send order.

    Requests are queued and written by one writer task, everything queued since its last write in one
    `send`: a lock around `send` would hand the connection from task to task once per event-loop
    iteration (anyio's `send` yields), which caps a shared connection far below what the codec allows."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.waiting: collections.deque[_Waiter] = collections.deque()
        self._outgoing: list[bytes] = []
        self._wake = anyio.Event()
        self.lost = False

    async def exchange(self, data: bytes) -> Frame:
        if self.lost:
            raise ConnectionError("upstream connection lost")
        waiter = _Waiter()
        self.waiting.append(waiter)  # queued together with its bytes: the FIFO is the wire order
        self._outgoing.append(data)
        self._wake.set()
        await waiter.event.wait()
        if waiter.frame is None:
            raise ConnectionError("upstream connection lost")
        return waiter.frame

    async def write_requests(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            data, self._outgoing = b"".join(self._outgoing), []
            await self.stream.send(data)

    async def read_answers(self) -> None:
        decoder = _FRAMER.decoder()
        try:
            while True:
                for frame in decoder.feed(await self.stream.receive(RECEIVE_SIZE)):
                    waiter = self.waiting.popleft()
                    waiter.frame = frame
                    waiter.event.set()
        finally:
            self.lost = True
            for waiter in self.waiting:
                waiter.event.set()  # frame stays None: the waiting terminals see the failure


async def relay_connection(stream: anyio.abc.ByteStream, upstream: Upstream, codec: Codec) -> None:
    decoder = _FRAMER.decoder()
    async with stream:
        with contextlib.suppress(*_CLOSED, ConnectionError, IsoError):
            while True:
                for frame in decoder.feed(await stream.receive(RECEIVE_SIZE)):
                    request = codec.decode(frame.body)
                    answer = await upstream.exchange(_FRAMER.encode(codec.encode(request), frame.envelope))
                    reply = codec.decode(answer.body)
                    envelope: CupEnvelope | None = frame.envelope.reply() if frame.envelope is not None else None
                    await stream.send(_FRAMER.encode(codec.encode(reply), envelope))


async def serve_relay(port: int, upstream_host: str, upstream_port: int) -> None:
    codec = _codec()
    upstream = Upstream(await anyio.connect_tcp(upstream_host, upstream_port))
    listener = await anyio.create_tcp_listener(local_host=LOOPBACK, local_port=port)
    print(f"port {listener.extra(anyio.abc.SocketAttribute.local_port)}", flush=True)
    async with anyio.create_task_group() as tg, listener:

        async def upstream_side(run: Callable[[], Awaitable[None]]) -> None:
            with contextlib.suppress(*_CLOSED):
                await run()
            print("relay: upstream connection lost", file=sys.stderr, flush=True)
            tg.cancel_scope.cancel()

        tg.start_soon(upstream_side, upstream.read_answers)
        tg.start_soon(upstream_side, upstream.write_requests)
        await listener.serve(lambda s: relay_connection(s, upstream, codec))


async def serve_codec_host(port: int) -> None:
    listener = await anyio.create_tcp_listener(local_host=LOOPBACK, local_port=port)
    print(f"port {listener.extra(anyio.abc.SocketAttribute.local_port)}", flush=True)
    async with listener:
        await listener.serve(codec_host_connection)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="role", required=True)
    host = sub.add_parser("codec-host", help="decode, answer 00 with the response builder, encode")
    host.add_argument("--port", type=int, default=0)
    relay = sub.add_parser("relay", help="decode + re-encode both ways, forward to the codec host")
    relay.add_argument("--port", type=int, default=0)
    relay.add_argument("--upstream", required=True, metavar="HOST:PORT")
    args = parser.parse_args(argv)
    uvloop = {"use_uvloop": True}
    with contextlib.suppress(KeyboardInterrupt):
        if args.role == "codec-host":
            anyio.run(serve_codec_host, args.port, backend="asyncio", backend_options=uvloop)
        else:
            up_host, _, up_port = args.upstream.rpartition(":")
            if not up_host or not up_port.isdigit():
                parser.error("--upstream must be HOST:PORT")
            anyio.run(serve_relay, args.port, up_host, int(up_port), backend="asyncio", backend_options=uvloop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
