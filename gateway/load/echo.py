"""The I/O floor: a raw echo server for 2-byte-length-framed messages, and the `echo` load driver.

No codec, no logic: what the framed request/response path costs on anyio streams alone, so the
gateway's figures can be read against it. The server runs one task per connection and echoes every
complete frame of a read in one write (a pipelining client gets its frames back batched).

Run it standalone: `python -m gateway.load.echo --port 0` prints "port N" and serves until killed.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
import anyio.abc

from gateway.load.driver import LoadError, parse_target

LENGTH_BYTES = 2
MAX_BODY = 0xFFFF
#: like the 348-byte CUP 0200 the codec benchmarks use: 2 + 348 = 350 bytes on the wire
DEFAULT_BODY_SIZE = 348
RECEIVE_SIZE = 65536


def frame(body: bytes) -> bytes:
    if len(body) > MAX_BODY:
        raise ValueError(f"frame body of {len(body)} bytes does not fit a 2-byte length")
    return len(body).to_bytes(LENGTH_BYTES, "big") + body


def complete_frames_length(buf: bytes | bytearray) -> int:
    """Length of the longest prefix of `buf` made of whole frames (0 when not even one is complete)."""
    pos = 0
    size = len(buf)
    while pos + LENGTH_BYTES <= size:
        end = pos + LENGTH_BYTES + int.from_bytes(buf[pos : pos + LENGTH_BYTES], "big")
        if end > size:
            break
        pos = end
    return pos


async def echo_connection(stream: anyio.abc.ByteStream) -> None:
    """Echo whole frames until the peer goes away. The buffer never holds more than one partial frame
    plus one read, so it stays under ~128 KiB whatever the peer sends."""
    buf = bytearray()
    async with stream:
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            while True:
                try:
                    chunk = await stream.receive(RECEIVE_SIZE)
                except anyio.EndOfStream:
                    return
                if buf:
                    buf += chunk
                    data: bytes | bytearray = buf
                else:
                    data = chunk  # the common case: no leftover, no copy
                whole = complete_frames_length(data)
                if whole == len(data):
                    await stream.send(bytes(data))
                    buf = bytearray()
                    continue
                if whole:
                    await stream.send(bytes(data[:whole]))
                buf = bytearray(data[whole:])


async def serve_echo(host: str = "127.0.0.1", port: int = 0, *,
                     task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled; `await tg.start(serve_echo, host, 0)` returns the bound port."""
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    bound: int = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener:
        task_status.started(bound)
        await listener.serve(echo_connection)


class EchoSession:
    """One connection: send a frame, wait for the same bytes back."""

    def __init__(self, stream: anyio.abc.ByteStream, payload: bytes) -> None:
        self._stream = stream
        self._payload = payload
        self._buf = bytearray()

    async def request(self, kind: str) -> str:
        payload = self._payload
        need = len(payload)
        await self._stream.send(payload)
        buf = self._buf
        while len(buf) < need:
            buf += await self._stream.receive(RECEIVE_SIZE)
        reply = bytes(buf[:need])
        del buf[:need]
        return "00" if reply == payload else "echo_mismatch"

    async def aclose(self) -> None:
        await self._stream.aclose()


class EchoDriver:
    def __init__(self, host: str, port: int, body_size: int = DEFAULT_BODY_SIZE) -> None:
        if not 0 <= body_size <= MAX_BODY:
            raise LoadError(f"echo body size must be 0..{MAX_BODY}, not {body_size}")
        self.host = host
        self.port = port
        # recognisable, not all zeros (so a server that answers garbage is caught)
        body = (b"0200" + bytes(range(48, 123)) * (body_size // 75 + 1))[:body_size]
        self.payload = frame(body)

    async def connect(self) -> EchoSession:
        stream = await anyio.connect_tcp(self.host, self.port)
        return EchoSession(stream, self.payload)


def echo_driver_factory(options: Mapping[str, Any]) -> EchoDriver:
    """`--driver echo`: options["target"] is HOST:PORT; `-o size=N` sets the frame body size."""
    target = options.get("target")
    if not target:
        raise LoadError("the echo driver needs --target HOST:PORT")
    host, port = parse_target(str(target))
    extra = options.get("options") or {}
    size_text = str(extra.get("size", DEFAULT_BODY_SIZE))
    if not size_text.isdigit():
        raise LoadError(f"echo option size must be a whole number of bytes, not {size_text!r}")
    return EchoDriver(host, port, int(size_text))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.load.echo", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    args = parser.parse_args(argv)

    async def serve() -> None:
        async with anyio.create_task_group() as tg:
            port = await tg.start(serve_echo, args.host, args.port)
            print(f"port {port}", flush=True)

    options = {"use_uvloop": True} if args.backend == "asyncio" else {}
    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(serve, backend=args.backend, backend_options=options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
