"""The upstream host link: one persistent connection, multiplexed.

- Requests and responses are paired by a configurable match key (default: MTI class + STAN + terminal,
  like jPOS's QMUX), so many requests are in flight at once and answers may come in any order.
- The link has its own STAN space and stamps field 7 (transmission date-time) and 11 on every request
  *before* the caller journals it: field 90 of a later reversal needs both.
- Every (re)connect signs on (0800/001) and, when configured, exchanges zone keys (0800/101) before any
  financial traffic; reconnects back off exponentially with jitter.
- Echo tests (0800/301) are sent on idle, from this side only; a host that does not answer one is
  treated as dead and the connection is recycled.
- A request times out through a cancel scope; the pending slot is removed at that moment, so an answer
  that arrives later is "unmatched" and handed to `on_unmatched` (journalled, never forwarded).
- While the link is not signed on, `request` fails at once with `HostUnavailable` (nothing was sent),
  so terminals get 91 instead of hanging.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum

import anyio
import anyio.abc

from gateway.config import HostConfig
from gateway.iso.build import iso87
from gateway.iso.codec import Codec
from gateway.iso.errors import IsoError
from gateway.iso.framing import make_framer
from gateway.iso.message import Message
from gateway.iso.mti import is_request, match_class, response_mti
from gateway.iso.spec import load_dialect
from gateway.iso.stan import StanAllocator
from gateway.metrics import Metrics
from gateway.security.errors import SecurityError
from gateway.security.module import SecurityModule

log = logging.getLogger("gateway.host")


#: answers that move or settle money and so must carry a valid MAC once zone keys are in use:
#: an approval, and a reversal's "original not found" (the SAF takes it as final)
MAC_REQUIRED_RCS = frozenset({"00", "25"})


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


class _Pending:
    __slots__ = ("error", "event", "reply")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.reply: HostReply | None = None
        self.error: HostError | None = None


UnmatchedHandler = Callable[[Message], Awaitable[None]]


def transmission_datetime(now: datetime | None = None) -> str:
    """Field 7, MMDDhhmmss in UTC (ISO 8583:1987 says GMT)."""
    return (now or datetime.now(UTC)).strftime("%m%d%H%M%S")


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
        self.dialect = load_dialect(config.dialect)
        self.codec = Codec(self.dialect)
        self.framer = make_framer(config.framing, config.max_frame)
        self.mac_len = self.dialect.mac_wire_len
        self.stans = StanAllocator()
        self.state = LinkState.DOWN
        self._stream: anyio.abc.ByteStream | None = None
        self._send_lock = anyio.Lock()
        self._pending: dict[tuple[str, ...], _Pending] = {}
        self._last_rx = 0.0
        self._signed_on = anyio.Event()
        self.reconnects = 0

    # --- public API --------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.state is LinkState.SIGNED_ON

    def allocate(self) -> tuple[str, str]:
        """A fresh host STAN (11) and transmission date-time (7): given to a request before it is
        journalled, since a later reversal's field 90 needs both."""
        return self.stans.format(self.stans.next()), transmission_datetime()

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
        """Keep the link up forever: connect, sign on, serve, and reconnect with backoff on failure."""
        task_status.started()
        backoff = self.config.reconnect_min
        while True:
            self._set_state(LinkState.CONNECTING)
            try:
                with anyio.fail_after(self.config.connect_timeout):
                    stream = await anyio.connect_tcp(self.config.address.host, self.config.address.port)
            except (OSError, TimeoutError) as exc:
                self._set_state(LinkState.DOWN)
                log.warning("host %s unreachable: %s; retry in %.1fs", self.config.address, exc, backoff)
            else:
                try:
                    await self._serve_connection(stream)
                    backoff = self.config.reconnect_min  # it was up: start the backoff afresh
                except Exception as exc:  # any failure of one connection: log, recycle, reconnect
                    log.warning("host link lost: %s", _describe(exc))
                finally:
                    self._drop_connection()
            self.reconnects += 1
            self.metrics.host_reconnects.inc()
            # full jitter: spread reconnect storms of many gateways over the whole interval
            await anyio.sleep(backoff * (0.5 + random.random() / 2))
            backoff = min(backoff * 2, self.config.reconnect_max)

    async def _serve_connection(self, stream: anyio.abc.ByteStream) -> None:
        async with stream, anyio.create_task_group() as tg:
            self._stream = stream
            self._last_rx = anyio.current_time()
            self._set_state(LinkState.UP)
            tg.start_soon(self._read_loop, stream, tg.cancel_scope)
            await self._sign_on()
            self._set_state(LinkState.SIGNED_ON)
            self._signed_on.set()
            log.info("host link signed on to %s", self.config.address)
            tg.start_soon(self._echo_loop, tg.cancel_scope)

    def _drop_connection(self) -> None:
        self._stream = None
        self._set_state(LinkState.DOWN)
        self._signed_on = anyio.Event()
        # every request still waiting was (maybe) sent: its outcome is unknown
        pending, self._pending = self._pending, {}
        for slot in pending.values():
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
                log.warning("host did not answer an echo test: recycling the connection")
                scope.cancel()
                return

    # --- wire --------------------------------------------------------------------------------------

    def _key(self, msg: Message, mti: str) -> tuple[str, ...]:
        parts = []
        for name in self.config.match_key:
            if name == "mti_class":
                parts.append(match_class(mti))
            elif name == "stan":
                parts.append(msg.fields.get("11", ""))
            elif name == "terminal":
                parts.append(msg.fields.get("41", ""))
            elif name == "rrn":
                parts.append(msg.fields.get("37", ""))
        return tuple(parts)

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
        stream = self._stream
        if stream is None:
            raise HostUnavailable("host link is down")
        key = self._key(msg, msg.mti)
        if key in self._pending:
            raise HostNotSent("duplicate match key in flight")  # STAN space exhausted within one timeout
        try:
            frame = self.framer.encode(self._encode(msg))
        except (IsoError, SecurityError) as exc:
            raise HostNotSent(f"request cannot be encoded: {exc}") from None
        slot = _Pending()
        self._pending[key] = slot
        sending = written = False
        try:
            with anyio.move_on_after(timeout):
                async with self._send_lock:
                    sending = True
                    await stream.send(frame)
                    written = True
                self.metrics.message("host_out", msg.mti, msg.fields.get("39", "")).inc()
                await slot.event.wait()
            if not sending:
                raise HostNotSent("timed out waiting to write to the host")
            if not written:
                # cancelled inside send: part of the frame may be on the wire, so every later frame
                # would be read out of step. Recycle the connection.
                await anyio.aclose_forcefully(stream)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise HostTimeout(f"send failed: {exc!r}") from None
        finally:
            self._pending.pop(key, None)
        if slot.error is not None:
            raise slot.error
        if slot.reply is None:
            self.metrics.host_timeouts.inc()
            raise HostTimeout(f"no answer within {timeout:.1f}s")
        return slot.reply

    async def _read_loop(self, stream: anyio.abc.ByteStream, scope: anyio.CancelScope) -> None:
        decoder = self.framer.decoder()
        try:
            async for chunk in stream:
                self._last_rx = anyio.current_time()
                for frame in decoder.feed(chunk):
                    await self._on_frame(frame.body)
        except IsoError as exc:
            self.metrics.decode_error(exc.kind).inc()
            log.warning("host sent an undecodable stream (%s): closing the link", exc)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        log.info("host connection closed")
        scope.cancel()

    async def _on_frame(self, body: bytes) -> None:
        try:
            msg = self.codec.decode(body)
        except IsoError as exc:
            # one bad message does not desynchronise a length-framed stream: count it, keep the link
            self.metrics.decode_error(exc.kind).inc()
            log.warning("undecodable message from host: %s", exc)
            return
        self.metrics.message("host_in", msg.mti, msg.fields.get("39", "")).inc()
        if is_request(msg.mti):
            await self._answer_host_request(msg)
            return
        mac_ok = True
        if msg.fields.get("39") in MAC_REQUIRED_RCS and msg.mti[1] in "24":
            mac_ok = self._approval_mac_ok(msg, body)
        slot = self._pending.pop(self._key(msg, msg.mti), None)
        if slot is None:
            self.metrics.late_answers.inc()
            log.info("unmatched/late host answer %s stan=%s rc=%s", msg.mti, msg.get("11"), msg.get("39"))
            if self.on_unmatched is not None:
                try:
                    await self.on_unmatched(msg)
                except Exception:  # journalling a late answer must never take the link down
                    log.exception("could not journal a late host answer")
            return
        slot.reply = HostReply(msg, mac_ok)
        slot.event.set()

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
            log.warning("host approval %s stan %s has a missing or bad MAC", msg.mti, msg.get("11"))
        return ok

    async def _answer_host_request(self, msg: Message) -> None:
        """The host may echo-test us too; answer network management, refuse anything else."""
        rc = "00" if msg.mti == "0800" else "12"
        answer = Message(response_mti(msg.mti), {k: v for k, v in msg.fields.items() if k in ("7", "11", "70")})
        answer.fields["39"] = rc
        stream = self._stream
        if stream is None:
            return
        try:
            async with self._send_lock:
                await stream.send(self.framer.encode(self.codec.encode(answer)))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, IsoError):
            pass


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"
