"""The upstream host link: one persistent connection, multiplexed.

- Requests and responses are paired by a configurable match key (default: MTI class + STAN + terminal,
  like jPOS's QMUX), so many requests are in flight at once and answers may come in any order.
- The link has its own STAN space and stamps field 7 (transmission date-time) and 11 on every request
  *before* the caller journals it: field 90 of a later reversal needs both.
- Every (re)connect signs on (0800/001) and, when configured, exchanges zone keys (0800/101) before any
  financial traffic; reconnects back off exponentially with jitter, and the back-off starts afresh
  only after a connection that signed on (a host that accepts and closes at once is not hammered).
  Each connection's end is one log line: why it ended, and the delay really waited before the next.
- Echo tests (0800/301) are sent on idle, from this side only; a host that does not answer one is
  treated as dead and the connection is recycled.
- One writer task per connection does every write: a request appends its frame to the connection's
  outgoing queue and the writer hands everything queued to ONE `send`. Concurrent requests share a
  write instead of passing a send lock (and a yield) from task to task.
- Every pending request carries a deadline; one expiry task per connection sleeps until the earliest
  (no cancel scope or timer per request). A request that expires while its frame is still queued is
  withdrawn (never written later) and fails with `HostNotSent`; once the writer has taken it, it fails
  with `HostTimeout` (outcome unknown). Its pending slot is removed at that moment, so an answer that
  arrives later is "unmatched" and handed to `on_unmatched` (journalled, never forwarded).
- A write that fails, or stays stuck past the deadline of a request it carries, recycles the connection.
- While the link is not signed on, `request` fails at once with `HostUnavailable` (nothing was sent),
  so terminals get 91 instead of hanging.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import random
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import IntEnum

import anyio
import anyio.abc

from gateway import logs
from gateway.config import HostConfig
from gateway.core.clock import utc_mmddhhmmss
from gateway.iso.build import iso87
from gateway.iso.codec import Codec
from gateway.iso.errors import IsoError
from gateway.iso.framing import make_framer
from gateway.iso.message import Message
from gateway.iso.mti import is_request, match_class, response_mti
from gateway.iso.spec import load_dialect
from gateway.iso.stan import StanAllocator
from gateway.metrics import CounterLike, Metrics, clock
from gateway.net.loopclock import loop_clock
from gateway.net.tls import TlsHandshakeError, client_context, failure_kind, handshake
from gateway.ratelog import RateLimitedLog
from gateway.security.errors import SecurityError
from gateway.security.module import SecurityModule
from gateway.store.records import CHARGED_RCS
from gateway.trace.format import Direction, EventKind, Leg, format_match_key
from gateway.trace.tap import Tap

log = logging.getLogger("gateway.host")


#: answers that move or settle money and so must carry a valid MAC once zone keys are in use:
#: an approval (whole or partial), and a reversal's "original not found" (the SAF takes it as final)
MAC_REQUIRED_RCS = CHARGED_RCS | {"25"}

#: match key parts (config `match_key`) that are a request field; "mti_class" is derived from the MTI
_KEY_FIELDS = {"stan": "11", "terminal": "41", "rrn": "37"}


class LinkState(IntEnum):
    DOWN = 0
    CONNECTING = 1
    UP = 2
    SIGNED_ON = 3


class HostError(Exception):
    """Base of host-link failures."""


class HostNotSent(HostError):
    """The request was NOT sent (nothing reached the host): no reversal is needed."""


class HostUnavailable(HostNotSent):
    """The link is down: the request was NOT sent."""


class HostTimeout(HostError):
    """The request was sent (or may have been) and no answer came in time: outcome unknown."""


@dataclass(slots=True)
class HostReply:
    message: Message
    #: False when the reply carried a MAC that did not verify (never trust its approval)
    mac_ok: bool


#: where a request's frame is: in the connection's outgoing queue, inside the writer's current `send`,
#: written, or withdrawn from the queue before the writer took it (so it is never written)
_QUEUED, _SENDING, _SENT, _WITHDRAWN = range(4)


class _Pending:
    """One request waiting for its answer."""

    __slots__ = ("counter", "done", "error", "event", "frame", "key", "reply", "sent_at", "state", "timeout")

    def __init__(self, key: tuple[str, ...], frame: bytes, counter: CounterLike, timeout: float) -> None:
        self.key = key
        self.frame = frame
        #: the host_out counter of this message, counted once the writer's `send` carrying it has returned
        self.counter = counter
        self.timeout = timeout
        self.state = _QUEUED
        #: settled: answered, failed, or abandoned by its requester (its heap entry is then stale)
        self.done = False
        self.event = anyio.Event()
        self.reply: HostReply | None = None
        self.error: HostError | None = None
        #: `metrics.clock()` when the writer took the frame (the host stage runs from here to the answer)
        self.sent_at = 0.0


class _Connection:
    """The write side and the deadlines of one connection to the host."""

    __slots__ = ("deadlines", "expiry", "idle", "outgoing", "scope", "stream", "wake")

    def __init__(self, stream: anyio.abc.ByteStream, scope: anyio.CancelScope) -> None:
        self.stream = stream
        #: cancelling it recycles the connection
        self.scope = scope
        #: frames for the writer, in order; plain bytes are answers to the host's own requests
        self.outgoing: list[_Pending | bytes] = []
        self.wake = anyio.Event()
        #: the writer waits on `wake` (only then does a new frame need to set it)
        self.idle = False
        #: heap of (deadline, sequence, slot); settled slots stay until they reach the top or a compaction
        self.deadlines: list[tuple[float, int, _Pending]] = []
        #: the expiry task's sleep: its deadline is the earliest deadline it knows of
        self.expiry: anyio.CancelScope | None = None

    def submit(self, item: _Pending | bytes) -> None:
        self.outgoing.append(item)
        if self.idle:
            self.idle = False
            self.wake.set()


#: receives each answer nobody waits for, with whether its MAC verified
UnmatchedHandler = Callable[[HostReply], Awaitable[None]]

#: late answers waiting for the journal; past that they are dropped (counted, logged), never waited for
LATE_ANSWER_BACKLOG = 1000
#: late answers journalled at once: their writes share group commits instead of one commit each
LATE_ANSWER_BATCH = 64


class _LateAnswers:
    """The bounded backlog between the host reader and the task that journals late answers.

    `put` never waits: an answer storm must not stall the answers behind it in the stream (they would
    time out into 98s and reversals). When the backlog is full one answer is dropped: an approval whose
    MAC verified is kept over anything else (it may reopen a reversal the host answered 25 too early:
    money), so the oldest other answer makes way for it; otherwise the new answer is dropped."""

    __slots__ = ("_items", "_limit", "_wakeup")

    def __init__(self, limit: int) -> None:
        self._items: deque[HostReply] = deque()
        self._limit = limit
        self._wakeup: anyio.Event | None = None

    def __len__(self) -> int:
        return len(self._items)

    def put(self, answer: HostReply) -> HostReply | None:
        """Queue `answer`; returns the answer dropped to keep the bound (None when nothing was)."""
        items = self._items
        dropped: HostReply | None = None
        if len(items) >= self._limit:
            if not _precious(answer):
                return answer
            dropped = next((a for a in items if not _precious(a)), None)
            if dropped is None:
                return answer
            items.remove(dropped)
        items.append(answer)
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None:
            wakeup.set()
        return dropped

    async def take(self, most: int) -> list[HostReply]:
        """Wait for at least one answer; then take up to `most`, oldest first."""
        while not self._items:
            self._wakeup = wakeup = anyio.Event()
            await wakeup.wait()
        items = self._items
        return [items.popleft() for _ in range(min(most, len(items)))]


def _precious(answer: HostReply) -> bool:
    return answer.mac_ok and answer.message.fields.get("39") in CHARGED_RCS


class HostLink:
    def __init__(
        self,
        config: HostConfig,
        security: SecurityModule,
        metrics: Metrics,
        on_unmatched: UnmatchedHandler | None = None,
    ) -> None:
        self.config = config
        self.security = security
        self.metrics = metrics
        self.on_unmatched = on_unmatched
        #: late answers waiting for `_journal_late_answers`
        self._late_answers = _LateAnswers(LATE_ANSWER_BACKLOG)
        #: lines that a storm of host answers would repeat once per answer (late, dropped, bad MAC): the
        #: first in full, then one line a second with a count
        self._storm_log = RateLimitedLog(log, interval=1.0)
        #: TLS on the host link ([host.tls]); None: plain TCP
        self._ssl_context = client_context(config.tls) if config.tls is not None else None
        self.dialect = load_dialect(config.dialect)
        self.codec = Codec(self.dialect)
        self.framer = make_framer(config.framing, config.max_frame)
        self.mac_len = self.dialect.mac_wire_len
        self.stans = StanAllocator()
        self.state = LinkState.DOWN
        self._conn: _Connection | None = None
        self._pending: dict[tuple[str, ...], _Pending] = {}
        #: tie-breaker of deadline heap entries (slots themselves do not compare)
        self._sequence = itertools.count()
        #: the match key recipe: a field number, or None for the MTI class (unknown names are ignored)
        self._key_parts = tuple(None if name == "mti_class" else _KEY_FIELDS[name]
                                for name in config.match_key if name == "mti_class" or name in _KEY_FIELDS)
        self._last_rx = 0.0
        self._signed_on = anyio.Event()
        self.reconnects = 0
        self.tap: Tap | None = None  #: records the traffic when set (gateway.trace)
        #: why the current connection ended, for the one log line about it (None: it has not)
        self._ended_because: str | None = None
        #: the current connect attempt got as far as the TLS handshake and it has not ended (yet)
        self._handshaking = False
        #: the event loop's clock (set per connection, in the loop: gateway/net/loopclock.py)
        self._now: Callable[[], float] = anyio.current_time

    # --- public API --------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.state is LinkState.SIGNED_ON

    def allocate(self) -> tuple[str, str]:
        """A fresh host STAN (11) and transmission date-time (7): given to a request before it is
        journalled, since a later reversal's field 90 needs both."""
        return self.stans.format(self.stans.next()), utc_mmddhhmmss()

    def stamp(self, msg: Message) -> Message:
        """Give a request a fresh STAN and transmission date-time (reversal repeats get new ones)."""
        msg.fields["11"], msg.fields["7"] = self.allocate()
        return msg

    async def wait_signed_on(self) -> None:
        await self._signed_on.wait()

    async def request(self, msg: Message, timeout: float | None = None) -> HostReply:
        """Send a stamped request and wait for its answer. Raises HostUnavailable (not sent) or
        HostTimeout (sent, outcome unknown)."""
        if self.state is not LinkState.SIGNED_ON:
            raise HostUnavailable("host link is not signed on")
        return await self._exchange(msg, timeout if timeout is not None else self.config.timeout)

    # --- the connection manager --------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep the link up forever: connect, sign on, serve, and reconnect with backoff on failure.
        Late answers are journalled by a task of their own, so the reader never waits for the journal
        (a burst of late answers would otherwise stall every answer behind it, into more timeouts)."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._journal_late_answers)
            await self._keep_connected(task_status)

    async def _journal_late_answers(self) -> None:
        """Journal late answers a batch at a time, the batch's answers concurrently: their journal writes
        join the same group commits, so a storm of thousands costs tens of commits, not thousands."""
        while True:
            batch = await self._late_answers.take(LATE_ANSWER_BATCH)
            if self.on_unmatched is None:
                continue
            async with anyio.create_task_group() as tg:
                for answer in batch:
                    tg.start_soon(self._journal_late_answer, self.on_unmatched, answer)

    @staticmethod
    async def _journal_late_answer(handler: UnmatchedHandler, answer: HostReply) -> None:
        try:
            await handler(answer)
        except Exception:  # journalling a late answer must never take the link down
            log.exception("could not journal a late host answer")

    def _queue_late_answer(self, answer: HostReply) -> None:
        dropped = self._late_answers.put(answer)
        if dropped is None:
            return
        self.metrics.late_answers_dropped.inc()
        msg = dropped.message
        self._storm_log.warning("dropped", "late-answer backlog full (%d waiting for the journal): dropped host "
                                "answer %s stan %s rc %s unjournalled", len(self._late_answers), msg.mti,
                                msg.get("11"), msg.get("39"))

    async def _keep_connected(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()
        backoff = self.config.reconnect_min
        while True:
            self._set_state(LinkState.CONNECTING)
            self._ended_because = None
            self._handshaking = False
            signed_on = False
            try:
                with anyio.fail_after(self.config.connect_timeout):
                    stream = await self._connect()
            except (OSError, TimeoutError) as exc:
                self._set_state(LinkState.DOWN)
                if isinstance(exc, TimeoutError) and self._handshaking:
                    # connected, but the host never finished the TLS handshake: a TLS refusal like the others
                    self.metrics.tls_failure("host", "timeout").inc()
                    why = (f"TLS handshake with host {self.config.address} not complete within "
                           f"{self.config.connect_timeout:g}s")
                else:
                    why = f"host {self.config.address} unreachable: {_describe(exc)}"
            else:
                try:
                    await self._serve_connection(stream)
                    why = self._ended_because or "connection ended"
                except Exception as exc:  # any failure of one connection: log, recycle, reconnect
                    why = self._ended_because or _describe(exc)
                finally:
                    signed_on = self.state is LinkState.SIGNED_ON
                    self._drop_connection()
                why = f"host link to {self.config.address} ended {'after' if signed_on else 'before'} sign-on: {why}"
            if signed_on:
                # only a connection that signed on proves the host healthy: one that ends before (a host
                # that accepts and closes at once, refuses the sign-on, ...) keeps the back-off growing
                backoff = self.config.reconnect_min
            # full jitter: spread reconnect storms of many gateways over the whole interval
            delay = backoff * (0.5 + random.random() / 2)
            log.warning("%s; retry in %.2fs", why, delay)
            self.reconnects += 1
            self.metrics.host_reconnects.inc()
            await anyio.sleep(delay)
            backoff = min(backoff * 2, self.config.reconnect_max)

    def _end_connection(self, scope: anyio.CancelScope, why: str) -> None:
        """Recycle the connection, noting why (the first reason wins: later ones are its echoes)."""
        if self._ended_because is None:
            self._ended_because = why
        scope.cancel()

    async def _connect(self) -> anyio.abc.ByteStream:
        """Open a connection to the host, with TLS when configured (a seam: tests wrap the stream to
        stall or count writes). A failed TLS handshake raises TlsHandshakeError (an OSError), counted."""
        address = self.config.address
        stream = await anyio.connect_tcp(address.host, address.port)
        if self._ssl_context is None:
            return stream
        tls = self.config.tls
        assert tls is not None
        self._handshaking = True  # stays set when connect_timeout cuts the handshake short
        try:
            tls_stream = await handshake(stream, self._ssl_context, server_side=False,
                                         hostname=tls.server_name or address.host)
            self._handshaking = False
            return tls_stream
        except TlsHandshakeError as exc:
            self._handshaking = False
            self.metrics.tls_failure("host", exc.kind).inc()
            await anyio.aclose_forcefully(stream)
            raise
        except BaseException:  # cancelled (connect_timeout): do not leak the socket
            await anyio.aclose_forcefully(stream)
            raise

    async def _serve_connection(self, stream: anyio.abc.ByteStream) -> None:
        async with stream:
            try:
                async with anyio.create_task_group() as tg:
                    conn = self._conn = _Connection(stream, tg.cancel_scope)
                    if self.tap is not None:
                        self.tap.opened(Leg.HOST, conn, str(self.config.address))
                    self._now = loop_clock()  # anyio.current_time without its cost: gateway/net/loopclock.py
                    self._last_rx = self._now()
                    self._set_state(LinkState.UP)
                    tg.start_soon(self._read_loop, stream, tg.cancel_scope)
                    tg.start_soon(self._write_loop, conn)
                    tg.start_soon(self._expiry_loop, conn)
                    await self._sign_on()
                    self._set_state(LinkState.SIGNED_ON)
                    self._signed_on.set()
                    log.info("host link signed on to %s", self.config.address)
                    tg.start_soon(self._echo_loop, tg.cancel_scope)
            finally:
                if self.tap is not None and self._conn is not None:
                    self.tap.closed(Leg.HOST, self._conn)
                # its writer is gone: nothing more may be queued on it (run() settles what is pending)
                self._conn = None

    def _drop_connection(self) -> None:
        self._conn = None
        self._set_state(LinkState.DOWN)
        if self._signed_on.is_set():
            # only a set event is replaced: whoever waits on an unset one is still waiting for a sign-on
            self._signed_on = anyio.Event()
        pending, self._pending = self._pending, {}
        for slot in pending.values():
            slot.done = True
            if slot.state == _QUEUED:
                # the writer never took it: certainly not sent
                slot.state = _WITHDRAWN
                slot.error = HostNotSent("host connection lost before the request was written")
            else:
                # handed to a write, so (maybe) sent: its outcome is unknown
                slot.error = HostTimeout("host connection lost")
            slot.event.set()

    def _set_state(self, state: LinkState) -> None:
        self.state = state
        self.metrics.host_link_state.set(int(state))

    async def _sign_on(self) -> None:
        cfg = self.config
        reply = await self._exchange(iso87.sign_on(*self.allocate(), cfg.acquirer_id), cfg.timeout)
        if reply.message.get("39") != "00":
            raise HostError(f"sign-on refused with {reply.message.get('39')}")
        if not cfg.key_exchange:
            return
        for usage in ("ZPK", "ZAK"):
            request = iso87.key_request(*self.allocate(), usage, cfg.acquirer_id)
            reply = await self._exchange(request, cfg.timeout)
            if reply.message.get("39") != "00":
                raise HostError(f"{usage} exchange refused with {reply.message.get('39')}")
            key_under_zmk, kcv = iso87.parse_key_response(reply.message)
            self.security.install_host_key(usage, key_under_zmk, kcv)  # verifies the KCV first

    async def _echo_loop(self, scope: anyio.CancelScope) -> None:
        interval = self.config.echo_interval
        while True:
            idle = anyio.current_time() - self._last_rx
            if idle < interval:
                await anyio.sleep(interval - idle)
                continue
            try:
                echo = iso87.echo(*self.allocate(), self.config.acquirer_id)
                await self._exchange(echo, self.config.timeout)
            except HostError:
                self._end_connection(scope, "the host did not answer an echo test")
                return

    # --- wire --------------------------------------------------------------------------------------

    def _key(self, msg: Message, mti: str) -> tuple[str, ...]:
        fields = msg.fields
        return tuple([match_class(mti) if part is None else fields.get(part, "") for part in self._key_parts])

    def _encode(self, msg: Message) -> bytes:
        body = self.codec.encode(msg)
        mac_field = self.dialect.mac_field_for(msg.fields)
        if mac_field in msg.fields:
            # the MAC field is the last field: MAC the bytes before it, then splice it in (one encode)
            mab = body[: -self.mac_len]
            mac = self.security.generate_host_mac(mab)
            body = mab + mac.hex().upper().encode("ascii")
            msg.fields[mac_field] = mac.hex().upper()
        return body

    async def _exchange(self, msg: Message, timeout: float) -> HostReply:
        conn = self._conn
        if conn is None:
            raise HostUnavailable("host link is down")
        key = self._key(msg, msg.mti)
        pending = self._pending
        if key in pending:
            raise HostNotSent("duplicate match key in flight")  # STAN space exhausted within one timeout
        try:
            body = self._encode(msg)
            frame = self.framer.encode(body)
        except (IsoError, SecurityError) as exc:
            raise HostNotSent(f"request cannot be encoded: {exc}") from None
        logs.trace("host_out", msg)
        slot = _Pending(key, frame, self.metrics.message("host_out", msg.mti, msg.fields.get("39", "")), timeout)
        pending[key] = slot
        self._add_deadline(conn, slot, self._now() + timeout)
        conn.submit(slot)
        if self.tap is not None:
            self.tap.frame(Leg.HOST, Direction.OUT, conn, body)
        try:
            await slot.event.wait()
        finally:
            if not slot.done:
                # abandoned (cancelled from outside): a frame the writer has not taken is never written
                slot.done = True
                if slot.state == _QUEUED:
                    slot.state = _WITHDRAWN
                if self._pending.get(key) is slot:
                    del self._pending[key]
        reply = slot.reply
        if reply is None:
            raise slot.error or HostTimeout(f"no answer within {timeout:.1f}s")
        return reply

    def _add_deadline(self, conn: _Connection, slot: _Pending, deadline: float) -> None:
        heap = conn.deadlines
        heapq.heappush(heap, (deadline, next(self._sequence), slot))
        expiry = conn.expiry
        if expiry is not None and deadline < expiry.deadline:
            expiry.deadline = deadline  # e.g. a sign-on or reversal with a shorter timeout: wake earlier
        if len(heap) > 2 * len(self._pending) + 64:
            # settled slots leave the heap only when they reach its top: sweep them out now and then, so
            # the heap (and the replies its slots hold) stays about as large as what is in flight
            heap[:] = [entry for entry in heap if not entry[2].done]
            heapq.heapify(heap)

    async def _expiry_loop(self, conn: _Connection) -> None:
        """Fail every pending request of this connection whose deadline has passed."""
        heap = conn.deadlines
        while True:
            now = anyio.current_time()
            stalled = False
            while heap:
                deadline, _, slot = heap[0]
                if slot.done:
                    heapq.heappop(heap)
                elif deadline <= now:
                    heapq.heappop(heap)
                    stalled = self._expire(slot) or stalled
                else:
                    break
            if stalled:
                # cancelling the write is the only way out, and it may leave part of a frame on the wire
                # (every later frame would be read out of step): recycle the connection
                self._end_connection(conn.scope, "a write to the host stayed stuck past a request's deadline")
                return
            with anyio.CancelScope(deadline=heap[0][0] if heap else math.inf) as conn.expiry:
                await anyio.sleep_forever()

    def _expire(self, slot: _Pending) -> bool:
        """Fail a request whose deadline has passed; True when its frame is still inside a `send`."""
        slot.done = True
        if self._pending.get(slot.key) is slot:
            del self._pending[slot.key]  # from now on its answer is unmatched
        if self.tap is not None:
            parts = {"class" if p is None else p: v for p, v in zip(self._key_parts, slot.key, strict=False)}
            sent = "" if slot.state != _QUEUED else " sent=no"
            self.tap.event(Leg.HOST, self._conn, EventKind.TIMEOUT, format_match_key(parts) + sent)
        stalled = False
        if slot.state == _QUEUED:
            slot.state = _WITHDRAWN  # the writer skips it: never written
            slot.error = HostNotSent("timed out waiting to write to the host")
        else:
            stalled = slot.state == _SENDING
            self.metrics.host_timeouts.inc()
            slot.error = HostTimeout(f"no answer within {slot.timeout:.1f}s")
        slot.event.set()
        return stalled

    async def _write_loop(self, conn: _Connection) -> None:
        """Write everything queued in one `send`; a failed write recycles the connection."""
        stream = conn.stream
        while True:
            if not conn.outgoing:
                conn.wake = anyio.Event()
                conn.idle = True
                await conn.wake.wait()
                continue
            batch, conn.outgoing = conn.outgoing, []
            chunks: list[bytes] = []
            taken: list[_Pending] = []
            writing_at = clock()  # before the send: an answer can be read before `send` returns here
            for item in batch:
                if isinstance(item, bytes):
                    chunks.append(item)
                elif item.state == _QUEUED:  # not withdrawn meanwhile
                    item.state = _SENDING
                    item.sent_at = writing_at
                    chunks.append(item.frame)
                    taken.append(item)
            if not chunks:
                continue
            try:
                await stream.send(b"".join(chunks))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                raise HostError(f"write to the host failed: {exc!r}") from None
            for slot in taken:
                slot.state = _SENT
                slot.counter.inc()

    async def _read_loop(self, stream: anyio.abc.ByteStream, scope: anyio.CancelScope) -> None:
        decoder = self.framer.decoder()
        conn = self._conn
        now = self._now
        received = False
        try:
            async for chunk in stream:
                received = True
                self._last_rx = now()
                for frame in decoder.feed(chunk):
                    if self.tap is not None:
                        self.tap.frame(Leg.HOST, Direction.IN, conn, frame.body, frame.envelope)
                    unmatched = self._on_frame(frame.body)
                    if unmatched is not None:
                        self._queue_late_answer(unmatched)  # never waits: see _LateAnswers
        except IsoError as exc:
            self.metrics.decode_error(exc.kind).inc()
            self._end_connection(scope, f"the host sent an undecodable stream ({exc})")
        except ssl.SSLError as exc:  # e.g. TLS 1.3: the host refuses our certificate after the handshake
            self.metrics.tls_failure("host", failure_kind(exc)).inc()
            self._end_connection(scope, f"TLS failure ({_describe(exc)})")
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            cause = exc.__cause__
            if isinstance(cause, ssl.SSLError):
                self.metrics.tls_failure("host", failure_kind(cause)).inc()
                self._end_connection(scope, f"TLS failure ({_describe(cause)})")
            self._refused_tls_session(scope, received)
            self._end_connection(scope, f"the connection broke ({_describe(exc)})")
        self._refused_tls_session(scope, received)
        self._end_connection(scope, "the host closed the connection")

    def _refused_tls_session(self, scope: anyio.CancelScope, received: bool) -> None:
        """Under TLS 1.3 the client's handshake is over before the host has checked our certificate: a
        host that refuses it just closes the session, before sending anything. Say so, and count it."""
        if self._ssl_context is not None and not received and self._ended_because is None:
            self.metrics.tls_failure("host", "closed").inc()
            self._end_connection(scope, "the host closed the TLS session before sending anything (a host that "
                                        "refuses our client certificate does that under TLS 1.3)")

    def _on_frame(self, body: bytes) -> HostReply | None:
        """Hand an answer to its request; returns an answer no request waits for (late or unmatched)."""
        try:
            msg = self.codec.decode(body)
        except IsoError as exc:
            # one bad message does not desynchronise a length-framed stream: count it, keep the link
            self.metrics.decode_error(exc.kind).inc()
            log.warning("undecodable message from host: %s", exc)
            return None
        self.metrics.message("host_in", msg.mti, msg.fields.get("39", "")).inc()
        logs.trace("host_in", msg)
        if is_request(msg.mti):
            self._answer_host_request(msg)
            return None
        mac_ok = True
        if msg.mti[1] in "24" and (msg.fields.get("39") in MAC_REQUIRED_RCS
                                   or self.dialect.mac_field_for(msg.fields) in msg.fields):
            # an approval must carry a valid MAC; any other answer that carries one must verify too (it
            # covers field 39: a decline under a MAC that fails may be an approval that was corrupted)
            mac_ok = self._approval_mac_ok(msg, body)
        key = self._key(msg, msg.mti)
        slot = self._pending.get(key)
        if slot is None or slot.state == _QUEUED:
            # nobody waits for it, or its request was never written (so it cannot be the answer to it)
            self.metrics.late_answers.inc()
            self._storm_log.log(logging.INFO, "late", "unmatched/late host answer %s stan=%s rc=%s", msg.mti,
                                msg.get("11"), msg.get("39"))
            return HostReply(msg, mac_ok)
        del self._pending[key]
        self.metrics.stages.host.observe(clock() - slot.sent_at)
        slot.done = True
        slot.reply = HostReply(msg, mac_ok)
        slot.event.set()
        return None

    def _approval_mac_ok(self, msg: Message, body: bytes) -> bool:
        """An approval of money must carry a valid MAC once zone keys are in use: without one, nobody
        can tell it from a forged or corrupted answer."""
        mac_field = self.dialect.mac_field_for(msg.fields)
        if mac_field not in msg.fields:
            ok = not self.config.key_exchange
        else:
            try:
                self.security.verify_host_mac(body[: -self.mac_len], bytes.fromhex(msg.fields[mac_field]))
                ok = True
            except (SecurityError, ValueError):
                ok = False
        if not ok:
            self.metrics.mac_failures.inc()
            self._storm_log.warning("bad MAC", "host approval %s stan %s has a missing or bad MAC", msg.mti,
                                    msg.get("11"))
        return ok

    def _answer_host_request(self, msg: Message) -> None:
        """The host may echo-test us too; answer network management, refuse anything else."""
        rc = "00" if msg.mti == "0800" else "12"
        answer = Message(response_mti(msg.mti), {k: v for k, v in msg.fields.items() if k in ("7", "11", "70")})
        answer.fields["39"] = rc
        conn = self._conn
        if conn is None:
            return
        try:
            body = self.codec.encode(answer)
            frame = self.framer.encode(body)
        except IsoError as exc:
            log.warning("cannot answer host request %s: %s", msg.mti, exc)
            return
        if self.tap is not None:
            self.tap.frame(Leg.HOST, Direction.OUT, conn, body)
        conn.submit(frame)  # through the writer like every other write, so frames never interleave


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"
