"""The terminal-facing TCP server: framing, connection limits, idle timeout, back-pressure.

It knows nothing about ISO 8583 flows: each whole frame goes to a `FrameHandler` together with the
`TerminalConnection` it came from, and the handler writes its answer back through that connection.
That split keeps the money logic (which must know whether an answer was *delivered*) in one place.

Back-pressure: at most `max_in_flight_per_connection` frames of one connection are processed at once;
past that the reader stops reading, TCP's window fills and the terminal slows down. Writes are bounded
by `write_timeout`: a terminal that stops reading cannot make the gateway buffer without bound, and an
answer that cannot be written in time counts as undelivered (and is reversed by the handler).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc

from gateway.config import TerminalSideConfig
from gateway.iso.errors import FramingError
from gateway.iso.framing import CupEnvelope, Frame, make_framer
from gateway.metrics import Metrics

log = logging.getLogger("gateway.terminal")


class Undeliverable(Exception):
    """An answer could not be written to the terminal: connection gone, write error or write timeout."""


class TerminalConnection:
    """One terminal TCP connection as the flow handler sees it: a peer name and a safe `send`."""

    def __init__(self, stream: anyio.abc.ByteStream, encode: Callable[[bytes, CupEnvelope | None], bytes],
                 write_timeout: float, peer: str) -> None:
        self._stream = stream
        self._encode = encode
        self._write_timeout = write_timeout
        self._lock = anyio.Lock()
        self.peer = peer
        #: set once the terminal has closed its side: an answer written after that may sit in a kernel
        #: buffer and "succeed" although nobody will ever read it, so we refuse to count it as delivered
        self.closed = False

    async def close(self) -> None:
        """Close the connection (e.g. after an undecodable message): the reader loop ends, in-flight
        requests finish, and their answers count as undelivered."""
        self.closed = True
        await anyio.aclose_forcefully(self._stream)

    async def send(self, body: bytes, envelope: CupEnvelope | None = None) -> None:
        if self.closed:
            raise Undeliverable("terminal connection already closed")
        data = self._encode(body, envelope)
        try:
            with anyio.fail_after(self._write_timeout):
                async with self._lock:
                    await self._stream.send(data)
        except TimeoutError:
            self.closed = True
            await anyio.aclose_forcefully(self._stream)
            raise Undeliverable("write timed out") from None
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self.closed = True
            raise Undeliverable(f"write failed: {type(exc).__name__}") from None


#: turns a frame into the work item for the handler; runs synchronously in wire order (see __init__)
FrameAdmitter = Callable[[Frame], Any]
FrameHandler = Callable[[Any, TerminalConnection], Awaitable[None]]


class TerminalServer:
    def __init__(self, config: TerminalSideConfig, handler: FrameHandler, metrics: Metrics,
                 admit: FrameAdmitter | None = None) -> None:
        """`admit(frame)` runs in the reader, in wire order, before the frame's task starts: frames of
        one connection are processed concurrently and a task scheduler may start them in any order,
        so whatever must happen in arrival order (registering an in-flight request) happens there."""
        self.config = config
        self.handler = handler
        self.admit = admit
        self.metrics = metrics
        self.framer = make_framer(config.framing, config.max_frame)
        self.active = 0
        self.port: int | None = None

    async def serve(self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        listen = self.config.listen
        listener = await anyio.create_tcp_listener(local_host=listen.host, local_port=listen.port, reuse_port=False)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        log.info("accepting terminals on %s:%s", listen.host, self.port)
        task_status.started(self.port)
        async with listener:
            await listener.serve(self._handle_connection)

    async def _handle_connection(self, stream: anyio.abc.SocketStream) -> None:
        try:
            peer = "{}:{}".format(*stream.extra(anyio.abc.SocketAttribute.remote_address)[:2])
        except (OSError, TypeError, ValueError):
            peer = "?"
        if self.active >= self.config.max_connections:
            self.metrics.connections_refused.inc()
            log.warning("refusing terminal %s: %d connections already", peer, self.active)
            await anyio.aclose_forcefully(stream)
            return
        self.active += 1
        self.metrics.connections_accepted.inc()
        self.metrics.terminal_connections.inc()
        conn = TerminalConnection(stream, self.framer.encode, self.config.write_timeout, peer)
        try:
            async with stream:
                await self._read_frames(stream, conn)
        finally:
            self.active -= 1
            self.metrics.terminal_connections.dec()

    async def _read_frames(self, stream: anyio.abc.SocketStream, conn: TerminalConnection) -> None:
        decoder = self.framer.decoder()
        in_flight = anyio.Semaphore(self.config.max_in_flight_per_connection)

        async def process(item: Any) -> None:
            try:
                await self.handler(item, conn)
            except Exception:  # the handler answers every defined error itself; this is a bug guard
                log.exception("unhandled error while processing a frame from %s", conn.peer)
            finally:
                in_flight.release()

        # In-flight frames finish even after reading stops: their host exchange is under way, and an
        # answer that cannot be delivered must still be reversed by the handler. When the terminal hung
        # up, answers are refused at once (`closed`); when *we* stop reading (idle, bad framing), the
        # answers already owed are still written, then the connection closes.
        async with anyio.create_task_group() as tg:
            while True:
                with anyio.move_on_after(self.config.idle_timeout) as idle:
                    try:
                        chunk = await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                        conn.closed = True
                        break
                if idle.cancelled_caught:
                    log.info("closing idle terminal connection %s", conn.peer)
                    break
                try:
                    frames = decoder.feed(chunk)
                except FramingError as exc:
                    self.metrics.decode_error(exc.kind).inc()
                    log.warning("bad frame from %s (%s): closing the connection", conn.peer, exc)
                    break
                for frame in frames:
                    await in_flight.acquire()
                    tg.start_soon(process, frame if self.admit is None else self.admit(frame))
                if decoder.failed:
                    self.metrics.decode_error("framing").inc()
                    log.warning("bad frame from %s after %d good ones: closing the connection", conn.peer,
                                len(frames))
                    break
        conn.closed = True
