"""The terminal-facing TCP server: framing, connection limits, idle timeout, back-pressure.

It knows nothing about ISO 8583 flows: each whole frame goes to a `FrameHandler` together with the
`TerminalConnection` it came from, and the handler writes its answer back through that connection.
That split keeps the money logic (which must know whether an answer was *delivered*) in one place.

Back-pressure: at most `max_in_flight_per_connection` frames of one connection are processed at once;
past that the reader stops reading, TCP's window fills and the terminal slows down. Writes are bounded
by `write_timeout`: a terminal that stops reading cannot make the gateway buffer without bound, and an
answer that cannot be written in time counts as undelivered (and is reversed by the handler).

Cost per frame is kept low because the event loop, not our code, dominated it (one cancel scope per
read, a semaphore checkpoint and a new task per frame, a timeout scope + lock + send per answer):

* each connection has one writer task; answers that arrive while it is writing are queued and written
  together in one `send` (a group commit), and each sender waits for its batch;
* timeouts are enforced by one sweeper task for the whole server instead of a timer per read or write:
  the reader notes when it started waiting for bytes, the writer which batch it is writing, and the
  sweeper wakes when the earliest of those can expire and cancels the one scope per connection that
  stops reading (idle) or writing (write timeout);
* frames are processed by worker tasks that are reused: an idle worker takes the next frame, and a new
  worker is spawned only when all are busy, up to `max_in_flight_per_connection`.

Slow clients (slowloris): the idle timeout restarts on every byte, so on its own it never ends a
connection that trickles a byte a second into a declared 8,000-byte frame. Two more rules:

* a frame must arrive whole within `frame_timeout` of its first byte (the sweeper enforces it with
  the idle timeout; time spent held back by our own back-pressure does not count);
* at `max_connections` a new terminal is not refused while some connection is merely holding a slot:
  the one that has been idle, or trickling its frame, longest is closed to make room. A connection
  with requests in flight is never chosen (its answers would become undeliverable, into reversals);
  only when every connection has work in flight is the new one refused.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio
import anyio.abc
from anyio.streams.tls import TLSStream

from gateway.config import TerminalSideConfig
from gateway.iso.errors import FramingError
from gateway.iso.framing import CupEnvelope, Frame, make_framer
from gateway.metrics import NOOP, HistogramLike, Metrics, clock
from gateway.net.loopclock import loop_clock
from gateway.net.tls import TlsHandshakeError, handshake, peer_summary, server_context
from gateway.ratelog import RateLimitedLog
from gateway.trace.format import Direction, EventKind, Leg
from gateway.trace.tap import Tap

log = logging.getLogger("gateway.terminal")

_ALREADY_CLOSED: Final = "terminal connection already closed"
#: what a write to a connection the terminal dropped raises (no log line: that is the terminal's doing)
_WRITE_ERRORS: Final = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


class Undeliverable(Exception):
    """An answer could not be written to the terminal: connection gone, write error or write timeout."""


class _Batch:
    """Answers queued while the writer was busy: written in one `send`, delivered (or not) together."""

    __slots__ = ("deadline", "done", "failure", "parts")

    def __init__(self, deadline: float) -> None:
        self.parts: list[bytes] = []
        #: the first answer's send() deadline: no answer waits longer than write_timeout, as before batching
        self.deadline = deadline
        self.done = anyio.Event()
        #: why the batch was not delivered; None once its bytes were handed to the kernel
        self.failure: str | None = None


def _resolve(batch: _Batch | None, failure: str) -> None:
    """Fail a batch that is still unresolved: its senders must neither wait forever nor count it as sent."""
    if batch is not None and not batch.done.is_set():
        batch.failure = failure
        batch.done.set()


class TerminalConnection:
    """One terminal TCP connection as the flow handler sees it: a peer name and a safe `send`.

    The server runs `_write_batches`, the connection's only writer, for as long as the connection lives,
    and its sweeper enforces the write deadline (`_check_write`). `send` queues the encoded answer for
    the writer and returns only once the answer's bytes were handed to the kernel, or raises
    `Undeliverable`."""

    def __init__(self, stream: anyio.abc.ByteStream, encode: Callable[[bytes, CupEnvelope | None], bytes],
                 write_timeout: float, peer: str) -> None:
        self._stream = stream
        #: times each write (`metrics.stages.terminal_write`); the server sets it, NOOP by default
        self.write_stage: HistogramLike = NOOP
        self._encode = encode
        self._write_timeout = write_timeout
        self._now = loop_clock()  # the sweeper's clock (anyio.current_time), minus its per-call cost
        self.peer = peer
        #: set once the terminal has closed its side: an answer written after that may sit in a kernel
        #: buffer and "succeed" although nobody will ever read it, so we refuse to count it as delivered
        self.closed = False
        #: the batch the next answer joins; None when nothing waits to be written
        self._queued: _Batch | None = None
        #: the batch inside `stream.send` right now
        self._writing: _Batch | None = None
        #: the event the idle writer sleeps on; None while it is writing
        self._writer_wakeup: anyio.Event | None = None
        self._finishing = False
        #: around the writer's whole life: shielded, so an answer decided before a shutdown is still
        #: written (its handler shields its send too); cancelled by the sweeper when a write outlives its
        #: deadline. One scope per connection instead of one `fail_after` per write.
        self._write_scope = anyio.CancelScope(shield=True)

    async def close(self) -> None:
        """Close the connection (e.g. after an undecodable message): the reader loop ends, in-flight
        requests finish, and their answers count as undelivered."""
        self.closed = True
        await anyio.aclose_forcefully(self._stream)

    async def send(self, body: bytes, envelope: CupEnvelope | None = None) -> None:
        if self.closed:
            raise Undeliverable(_ALREADY_CLOSED)
        data = self._encode(body, envelope)
        batch = self._queued
        if batch is None:
            batch = self._queued = _Batch(self._now() + self._write_timeout)
            self._wake_writer()
        batch.parts.append(data)
        await batch.done.wait()
        if batch.failure is not None:
            raise Undeliverable(batch.failure)

    @property
    def writing(self) -> bool:
        """Answers are waiting to be written or being written."""
        return self._queued is not None or self._writing is not None

    def _wake_writer(self) -> None:
        wakeup = self._writer_wakeup
        if wakeup is not None:
            self._writer_wakeup = None
            wakeup.set()

    def _finish(self) -> None:
        """No more answers will come (every frame's processing has ended): the writer stops."""
        self.closed = True
        self._finishing = True
        self._wake_writer()

    def _check_write(self, now: float) -> float | None:
        """For the sweeper: time the writer out if the oldest unwritten answer is past its deadline;
        else when to look again (None: nothing to write). If that write completed in this very instant,
        the writer meets the cancellation at its next checkpoint, before writing anything else, so no
        answer is misreported either way."""
        oldest = self._writing or self._queued
        if oldest is None or self._write_scope.cancel_called:
            return None
        if now >= oldest.deadline:
            self._write_scope.cancel()
            return None
        return oldest.deadline

    async def _write_batches(self) -> None:
        """The connection's writer; `_finish` ends it."""
        try:
            with self._write_scope:
                await self._write_until_finished()
            if self._write_scope.cancelled_caught:
                # Part of the batch may have been written: the stream is desynchronised, and the terminal
                # is not reading anyway. Every later send is refused at once (`closed`).
                self.closed = True
                _resolve(self._writing, "write timed out")
                await anyio.aclose_forcefully(self._stream)
        finally:
            # normally nothing is left here; after a timeout, the answers queued behind it (and after a
            # bug in here, any answer) must neither wait forever nor count as delivered
            self.closed = True
            _resolve(self._writing, "terminal connection writer stopped")
            _resolve(self._queued, _ALREADY_CLOSED)
            self._writing = self._queued = None

    async def _write_until_finished(self) -> None:
        stream = self._stream
        while True:
            batch = self._queued
            if batch is None:
                if self._finishing:
                    return
                wakeup = self._writer_wakeup = anyio.Event()
                await wakeup.wait()
                continue
            self._queued = None
            if self.closed:  # the terminal hung up (or we closed) while these answers waited for the writer
                batch.failure = _ALREADY_CLOSED
            else:
                parts = batch.parts
                self._writing = batch
                try:
                    started = clock()
                    await stream.send(parts[0] if len(parts) == 1 else b"".join(parts))
                    self.write_stage.observe(clock() - started)
                except Exception as exc:
                    if not isinstance(exc, _WRITE_ERRORS):  # a bug guard: contained to this connection
                        log.exception("unexpected error writing to terminal %s", self.peer)
                    self.closed = True
                    batch.failure = f"write failed: {type(exc).__name__}"
                self._writing = None
            batch.done.set()


#: turns a frame into the work item for the handler; runs synchronously in wire order (see __init__)
FrameAdmitter = Callable[[Frame], Any]
FrameHandler = Callable[[Any, TerminalConnection], Awaitable[None]]

#: what an idle worker holds until the reader hands it a work item
_NOTHING: Final = object()
#: idle workers a connection keeps for its next frames; beyond that a worker ends when its frame is done,
#: so a burst up to max_in_flight_per_connection does not leave that many idle tasks (~5 KB each) behind
KEEP_IDLE_WORKERS: Final = 8


class _IdleWorker:
    __slots__ = ("item", "wakeup")

    def __init__(self) -> None:
        self.item: Any = _NOTHING
        self.wakeup = anyio.Event()


class _Workers:
    """The frame-processing tasks of one connection, reused from frame to frame: handing a frame to an
    idle worker costs an event instead of a task spawn. At most `limit` exist, so `full` (every worker
    busy) is the back-pressure signal: the reader stops reading until a worker is free. Once reading has
    ended (`close`) and the last worker is done, the connection's writer is told no answer will follow."""

    __slots__ = ("_closing", "_conn", "_count", "_handler", "_idle", "_limit", "_slot_freed", "_tg")

    def __init__(self, tg: anyio.abc.TaskGroup, handler: FrameHandler, conn: TerminalConnection,
                 limit: int) -> None:
        self._tg = tg
        self._handler = handler
        self._conn = conn
        self._limit = limit
        self._idle: list[_IdleWorker] = []  # a stack: the most recently busy worker is reused first
        self._count = 0
        self._slot_freed: anyio.Event | None = None
        self._closing = False

    @property
    def full(self) -> bool:
        return not self._idle and self._count >= self._limit

    @property
    def busy(self) -> bool:
        """Some frame of this connection is being processed."""
        return self._count > len(self._idle)

    def dispatch(self, item: Any) -> None:
        """Start processing `item` now (the caller checked `full`)."""
        if self._idle:
            worker = self._idle.pop()
            worker.item = item
            worker.wakeup.set()
        else:
            self._count += 1
            self._tg.start_soon(self._work, item)

    async def wait_for_a_free_worker(self) -> None:
        while self.full:
            event = self._slot_freed = anyio.Event()
            await event.wait()

    def close(self) -> None:
        """No more frames: idle workers end now, busy ones after their frame."""
        self._closing = True
        for worker in self._idle:
            worker.wakeup.set()
        self._idle.clear()
        if self._count == 0:
            self._conn._finish()

    def _free_slot(self) -> None:
        event = self._slot_freed
        if event is not None:
            self._slot_freed = None
            event.set()

    async def _work(self, item: Any) -> None:
        try:
            while True:
                await self._process(item)
                if self._closing or len(self._idle) >= KEEP_IDLE_WORKERS:
                    return
                worker = _IdleWorker()
                self._idle.append(worker)
                self._free_slot()
                try:
                    await worker.wakeup.wait()
                except BaseException:
                    # cancelled (shutdown) while idle. A frame handed over in that instant was already
                    # admitted, so it still reaches the handler, which meets the cancellation at its
                    # first checkpoint and cleans up as it would have had it started a moment earlier.
                    if worker.item is _NOTHING:
                        if worker in self._idle:
                            self._idle.remove(worker)
                    else:
                        await self._process(worker.item)
                    raise
                item = worker.item
                if item is _NOTHING:  # close()
                    return
        finally:
            self._count -= 1
            self._free_slot()
            if self._closing and self._count == 0:
                self._conn._finish()

    async def _process(self, item: Any) -> None:
        try:
            await self._handler(item, self._conn)
        except Exception:  # the handler answers every defined error itself; this is a bug guard
            log.exception("unhandled error while processing a frame from %s", self._conn.peer)


#: why the server stopped reading a connection (`_Watched.stopped`)
_IDLE, _FRAME_TIMEOUT, _SHED = "idle", "frame timeout", "shed"


class _Watched:
    """A connection as the server's sweeper sees it: its reader's idleness, the deadline of the frame it
    is receiving, and its writer's deadline."""

    __slots__ = ("conn", "frame_started", "peer", "reading", "stopped", "waiting_since", "workers")

    def __init__(self, peer: str) -> None:
        self.peer = peer
        #: None until the connection is ready for frames (during a TLS handshake)
        self.conn: TerminalConnection | None = None
        #: cancelled by the sweeper to stop reading; None once the reader has stopped
        self.reading: anyio.CancelScope | None = None
        #: when the reader's current `receive` began; None while it is not waiting for bytes (it is
        #: processing a chunk or held back by back-pressure, neither of which is the terminal's idleness)
        self.waiting_since: float | None = None
        #: when the first byte of the frame still incomplete arrived; None between frames
        self.frame_started: float | None = None
        self.workers: _Workers | None = None
        #: why the server stopped reading (_IDLE, _FRAME_TIMEOUT, _SHED); None: it has not
        self.stopped: str | None = None

    def stop_reading(self, why: str) -> None:
        reading, self.reading = self.reading, None
        if reading is not None:
            self.stopped = why
            reading.cancel()

    def stalled_since(self) -> float | None:
        """Since when this connection has only held its slot (idle, or trickling a frame); None when it
        may not be shed: it has requests in flight or answers to write, or is not reading."""
        if self.reading is None or self.waiting_since is None:
            return None
        if (self.workers is not None and self.workers.busy) or (self.conn is not None and self.conn.writing):
            return None
        return self.frame_started if self.frame_started is not None else self.waiting_since


class TerminalServer:
    def __init__(self, config: TerminalSideConfig, handler: FrameHandler, metrics: Metrics,
                 admit: FrameAdmitter | None = None) -> None:
        """`admit(frame)` runs in the reader, in wire order, before the frame's processing starts:
        frames of one connection are processed concurrently and a task scheduler may start them in any
        order, so whatever must happen in arrival order (registering an in-flight request) happens there."""
        self.config = config
        self.handler = handler
        self.admit = admit
        self.metrics = metrics
        self.framer = make_framer(config.framing, config.max_frame)
        self.active = 0
        self.port: int | None = None
        self._watched: set[_Watched] = set()
        self.tap: Tap | None = None  #: records the traffic when set (gateway.trace)
        #: connections shed to make room that have not finished closing yet (they still count in `active`)
        self._shedding = 0
        self._shed_log = RateLimitedLog(log, interval=1.0)  #: a flood of sheds is a line a second
        #: TLS on the terminal port ([terminal_side.tls]); None: plain TCP
        self.ssl_context = server_context(config.tls) if config.tls is not None else None
        #: around the accept loop only: `stop_accepting` ends it, the open connections go on
        self._accepting = anyio.CancelScope()
        #: SO_REUSEPORT: the workers of `gateway serve --workers N` each bind the port (gateway.workers)
        self.reuse_port = False

    def stop_accepting(self) -> None:
        """Graceful shutdown: close the listening socket (new terminals are refused) and keep serving
        the connections already open, so the answers in flight are still delivered."""
        self._accepting.cancel()

    async def serve(self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        listen = self.config.listen
        listener = await anyio.create_tcp_listener(local_host=listen.host, local_port=listen.port,
                                                 reuse_port=self.reuse_port)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        log.info("accepting terminals on %s:%s (%s)", listen.host, self.port,
                 "plain TCP" if self.config.tls is None else f"TLS, client certificates {self.config.tls.client_certs}")
        task_status.started(self.port)
        # shielded: during a shutdown the answers still being written stay bounded by write_timeout; it
        # ends once every connection has (listener.serve returns only after all its handlers)
        sweeping = anyio.CancelScope(shield=True)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(self._sweep, sweeping)
            try:
                async with anyio.create_task_group() as connections:
                    with self._accepting:
                        await listener.serve(self._handle_connection, task_group=connections)
                    await listener.aclose()  # stopped accepting: refuse new connections from now on
                    log.info("no longer accepting terminals; %d connections stay open", self.active)
            finally:
                sweeping.cancel()

    async def _sweep(self, scope: anyio.CancelScope) -> None:
        """Enforce every connection's idle timeout and write deadline from one task. It sleeps until the
        earliest moment any of them can expire, so a busy server wakes it about once per timeout rather
        than arming and disarming a timer per read and per write. Nothing registered later can be due
        sooner than that: a reader starting to wait now is due at now + idle_timeout, a batch queued now
        at now + write_timeout, and the sleep never reaches past either."""
        idle_timeout, write_timeout = self.config.idle_timeout, self.config.write_timeout
        frame_timeout = self.config.frame_timeout
        horizon = min(idle_timeout, write_timeout, frame_timeout)
        # bounds the wake-ups (each looks at every connection) when many are due one after the other;
        # a timeout may fire up to this late
        min_gap = max(horizon / 64, 0.001)
        with scope:
            while True:
                now = anyio.current_time()
                wake = now + horizon
                for watched in self._watched:
                    since = watched.waiting_since
                    if since is not None and watched.reading is not None:
                        due = since + idle_timeout
                        started = watched.frame_started
                        frame_due = started + frame_timeout if started is not None else due
                        if now >= due:
                            watched.stop_reading(_IDLE)
                        elif now >= frame_due:
                            watched.stop_reading(_FRAME_TIMEOUT)
                        elif min(due, frame_due) < wake:
                            wake = min(due, frame_due)
                    write_due = watched.conn._check_write(now) if watched.conn is not None else None
                    if write_due is not None and write_due < wake:
                        wake = write_due
                await anyio.sleep_until(max(wake, now + min_gap))

    async def _handle_connection(self, stream: anyio.abc.SocketStream) -> None:
        try:
            peer = "{}:{}".format(*stream.extra(anyio.abc.SocketAttribute.remote_address)[:2])
        except (OSError, TypeError, ValueError):
            peer = "?"
        if self.active - self._shedding >= self.config.max_connections and not self._make_room(peer):
            self.metrics.connections_refused.inc()
            log.warning("refusing terminal %s: %d connections already, each with work in flight", peer, self.active)
            await anyio.aclose_forcefully(stream)
            return
        self.active += 1
        self.metrics.connections_accepted.inc()
        self.metrics.terminal_connections.inc()
        watched = _Watched(peer)
        self._watched.add(watched)
        try:
            async with stream:
                framed: anyio.abc.ByteStream | None = stream
                if self.ssl_context is not None:
                    framed = await self._tls_handshake(stream, watched)
                if framed is not None:
                    watched.conn = TerminalConnection(framed, self.framer.encode, self.config.write_timeout, peer)
                    watched.conn.write_stage = self.metrics.stages.terminal_write
                    if self.tap is not None:  # the connection the tap names is the one frames flow on
                        self.tap.opened(Leg.TERMINAL, watched.conn, peer)
                    await self._serve_connection(framed, watched)
        finally:
            if self.tap is not None and watched.conn is not None:
                self.tap.closed(Leg.TERMINAL, watched.conn)
            self._watched.discard(watched)
            if watched.stopped == _SHED:
                self._shedding -= 1
            self.active -= 1
            self.metrics.terminal_connections.dec()

    def _make_room(self, newcomer: str) -> bool:
        """At max_connections: close the connection that has been idle or trickling longest, so that a
        slot held by a slow or silent client never keeps a terminal out. False when none qualifies."""
        victim, since = None, math.inf
        for watched in self._watched:
            stalled = watched.stalled_since()
            if stalled is not None and stalled < since:
                victim, since = watched, stalled
        if victim is None:
            return False
        how = "trickling a frame" if victim.frame_started is not None else "idle"
        victim.stop_reading(_SHED)
        self._shedding += 1
        self.metrics.connections_shed.inc()
        self._shed_log.warning("shed", "max_connections (%d) reached: closed terminal connection %s (%s for %.1fs) "
                               "to make room for %s", self.config.max_connections, victim.peer, how,
                               anyio.current_time() - since, newcomer)
        return True

    async def _tls_handshake(self, stream: anyio.abc.SocketStream, watched: _Watched) -> TLSStream | None:
        """The TLS handshake, bounded like a frame (frame_timeout from the connect) and sheddable like
        one; None when it failed (logged, counted) or was cut short."""
        with anyio.CancelScope() as handshaking:
            watched.reading = handshaking
            watched.waiting_since = watched.frame_started = anyio.current_time()
            try:
                tls = await handshake(stream, self.ssl_context, server_side=True)  # type: ignore[arg-type]
            except TlsHandshakeError as exc:
                self.metrics.tls_failure("terminal", exc.kind).inc()
                log.warning("refusing terminal %s: %s", watched.peer, exc)
                return None
            finally:
                watched.reading = watched.waiting_since = watched.frame_started = None
        # `stopped` too: a shed or timeout in the very instant the handshake completed leaves its cancellation
        # undelivered (no checkpoint followed), yet the connection was stopped and must close
        if handshaking.cancelled_caught or watched.stopped is not None:
            if watched.stopped == _FRAME_TIMEOUT:
                self.metrics.tls_failure("terminal", "timeout").inc()
                log.warning("refusing terminal %s: TLS handshake not complete %.1fs after the connect",
                            watched.peer, self.config.frame_timeout)
            return None
        log.info("terminal %s: TLS established (%s)", watched.peer, peer_summary(tls))
        return tls

    async def _serve_connection(self, stream: anyio.abc.ByteStream, watched: _Watched) -> None:
        # In-flight frames finish even after reading stops: their host exchange is under way, and an
        # answer that cannot be delivered must still be reversed by the handler. When the terminal hung
        # up, answers are refused at once (`closed`); when *we* stop reading (idle, bad framing), the
        # answers already owed are still written, then the connection closes.
        conn = watched.conn
        assert conn is not None
        async with anyio.create_task_group() as tg:
            tg.start_soon(conn._write_batches)  # ends when the last worker is done after reading stopped
            workers = watched.workers = _Workers(tg, self.handler, conn, self.config.max_in_flight_per_connection)
            with anyio.CancelScope() as reading:
                watched.reading = reading
                try:
                    await self._read_frames(stream, conn, workers, watched)
                finally:
                    watched.reading = watched.waiting_since = None
                    workers.close()
            if reading.cancelled_caught:
                if watched.stopped == _FRAME_TIMEOUT:
                    self.metrics.frame_timeouts.inc()
                    log.warning("closing terminal connection %s: a frame was not complete %.1fs after its first "
                                "byte", conn.peer, self.config.frame_timeout)
                elif watched.stopped == _IDLE:
                    log.info("closing idle terminal connection %s", conn.peer)

    async def _read_frames(self, stream: anyio.abc.ByteStream, conn: TerminalConnection, workers: _Workers,
                           watched: _Watched) -> None:
        decoder = self.framer.decoder()
        admit = self.admit
        receive = stream.receive
        clock = loop_clock()  # anyio.current_time, read twice per chunk: see gateway/net/loopclock.py
        while True:
            watched.waiting_since = clock()
            try:
                chunk = await receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                conn.closed = True
                return
            watched.waiting_since = None
            try:
                frames = decoder.feed(chunk)
            except FramingError as exc:
                if self.tap is not None:
                    self.tap.event(Leg.TERMINAL, conn, EventKind.UNDECODABLE, str(exc))
                self.metrics.decode_error(exc.kind).inc()
                log.warning("bad frame from %s (%s): closing the connection", conn.peer, exc)
                return
            if not decoder.buffered:
                watched.frame_started = None
            elif frames or watched.frame_started is None:
                watched.frame_started = clock()  # the first byte of the frame now incomplete came in this chunk
            for frame in frames:
                if self.tap is not None:
                    self.tap.frame(Leg.TERMINAL, Direction.IN, conn, frame.body, frame.envelope)
                if workers.full:
                    await workers.wait_for_a_free_worker()
                    if watched.frame_started is not None:
                        watched.frame_started = clock()  # our back-pressure held its bytes back, not the terminal
                workers.dispatch(frame if admit is None else admit(frame))
            if decoder.failed:
                self.metrics.decode_error("framing").inc()
                log.warning("bad frame from %s after %d good ones: closing the connection", conn.peer,
                            len(frames))
                return
