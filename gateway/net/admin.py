"""The admin HTTP endpoint: /metrics (Prometheus text exposition), /healthz and /readyz.

A deliberately tiny HTTP/1.1 server on anyio streams: one request per connection, GET (and HEAD) only,
request head bounded in size and time, `Connection: close` after every response. It serves operators
and a Prometheus scraper on a private port, not the public: no keep-alive, no bodies, no chunking, so
there is nothing for a slow or malicious client to hold open beyond the read timeout.

The connection cap must not make the liveness probe failable by slow clients (40 of them, each
trickling its request, used to hold all 32 slots for the whole read timeout: /healthz answered 503).
At the cap a new connection takes the place of the one that has been reading its request longest (a
probe or a scraper sends its request at once), or else of one lingering after its response; only when
every connection is being answered is the new one refused with 503. Each shed connection is counted
(`gateway_admin_connections_shed_total`) and logged (one line per second at most).

- `GET /metrics`  → 200, `prometheus_client.generate_latest(registry)` as `CONTENT_TYPE_LATEST`
- `GET /metrics`  → 200, the registry in the Prometheus text format, or in OpenMetrics when the
                    scraper's `Accept` header asks for `application/openmetrics-text` (Prometheus does;
                    prometheus-client's `choose_encoder` reads the header, as its own servers do)
- `GET /healthz`  → 200 while the process runs (liveness)
- `GET /readyz`   → 200 when every readiness callback returns True, else 503; JSON body either way,
                    naming the checks that are not ready (a callback that raises counts as not ready)
- unknown path → 404; other methods → 405 (with `Allow`); oversized head → 431; garbled → 400
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from typing import Final

import anyio
import anyio.abc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.exposition import choose_encoder

from gateway.metrics import Metrics
from gateway.ratelog import RateLimitedLog

log = logging.getLogger("gateway.admin")

Readiness = Mapping[str, Callable[[], bool]]

DEFAULT_READ_TIMEOUT: Final = 5.0
DEFAULT_MAX_REQUEST_BYTES: Final = 8192
DEFAULT_MAX_CONNECTIONS: Final = 32

_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
#: how long a closing connection waits for the client to finish sending (lingering close)
_LINGER_SECONDS: Final = 1.0
_TEXT: Final = "text/plain; charset=utf-8"
_JSON: Final = "application/json"


class _BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def render_response(status: int, content_type: str, body: bytes, *, head_only: bool = False,
                    extra_headers: Mapping[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    for name, value in (extra_headers or {}).items():
        lines.append(f"{name}: {value}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


def header_value(head: bytes, name: str) -> str:
    """The value of header `name` (case-insensitive) in a request head, "" when absent. Repeated
    headers are joined with commas, as RFC 9110 allows for list-valued ones such as Accept."""
    wanted = name.lower().encode("ascii")
    values = []
    for line in head.split(b"\r\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == wanted:
            values.append(value.strip().decode("latin-1"))
    return ",".join(values)


def parse_request_line(head: bytes) -> tuple[str, str]:
    """Method and path (query string dropped) of a request head; `_BadRequest` when it is not HTTP/1.x."""
    line, _, _ = head.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise _BadRequest(400, "malformed request line")
    try:
        method = parts[0].decode("ascii")
        target = parts[1].decode("ascii")
    except UnicodeDecodeError:
        raise _BadRequest(400, "request line is not ASCII") from None
    if not method.isalpha() or not target.startswith("/"):
        raise _BadRequest(400, "malformed request line")
    return method, target.split("?", 1)[0]


#: what a connection is doing, for choosing which one makes room at the cap
_READING, _ANSWERING, _LINGERING = range(3)


class _Slot:
    """One connection holding a place under the cap."""

    __slots__ = ("phase", "scope")

    def __init__(self) -> None:
        self.phase = _READING
        #: cancelled when the connection is shed
        self.scope = anyio.CancelScope()


class AdminHandler:
    """Answers one request per connection. Separate from the listener so tests can drive it directly."""

    def __init__(self, metrics: Metrics, readiness: Readiness, *, read_timeout: float = DEFAULT_READ_TIMEOUT,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        self.metrics = metrics
        self.readiness = dict(readiness)
        self.read_timeout = read_timeout
        self.max_request_bytes = max_request_bytes
        self.max_connections = max_connections
        #: the connections under the cap, oldest first (a dict is an ordered set)
        self._slots: dict[_Slot, None] = {}
        self._shed_log = RateLimitedLog(log, interval=1.0)  #: a flood of sheds is a line a second

    @property
    def active(self) -> int:
        return len(self._slots)

    async def handle(self, stream: anyio.abc.ByteStream) -> None:
        async with stream:
            if len(self._slots) >= self.max_connections and not self._make_room():
                await self._send(stream, render_response(503, _TEXT, b"too many admin connections\n"))
                return
            slot = _Slot()
            self._slots[slot] = None
            try:
                with slot.scope:
                    await self._serve_one(stream, slot)
            finally:
                self._slots.pop(slot, None)

    def _make_room(self) -> bool:
        """Shed the connection that has been reading its request longest, else the oldest lingering
        one; False when every connection is being answered."""
        for phase in (_READING, _LINGERING):
            victim = next((slot for slot in self._slots if slot.phase == phase), None)
            if victim is not None:
                del self._slots[victim]
                victim.scope.cancel()  # its task closes the connection without answering
                self.metrics.admin_connections_shed.inc()
                self._shed_log.warning("shed", "admin connection limit (%d) reached: closed the oldest connection "
                                       "%s to make room", self.max_connections,
                                       "still reading its request" if phase == _READING else "lingering")
                return True
        return False

    async def _serve_one(self, stream: anyio.abc.ByteStream, slot: _Slot) -> None:
        head: bytes | None = None
        with anyio.move_on_after(self.read_timeout):
            try:
                head = await self._read_head(stream)
            except _BadRequest as exc:
                slot.phase = _ANSWERING
                await self._send(stream, render_response(exc.status, _TEXT, f"{exc}\n".encode()), slot)
                return
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                return  # client went away before finishing its request
        slot.phase = _ANSWERING
        if head is None:
            await self._send(stream, render_response(408, _TEXT, b"request not received in time\n"), slot)
            return
        try:
            response = await self.respond_async(head)
        except Exception:  # a bug (or a failing collector) must not take the admin listener down
            log.exception("admin request failed")
            response = render_response(500, _TEXT, b"internal error\n")
        await self._send(stream, response, slot)

    async def _read_head(self, stream: anyio.abc.ByteStream) -> bytes:
        buf = bytearray()
        while True:
            chunk = await stream.receive()
            scan_from = max(0, len(buf) - 3)  # the terminator may straddle two reads
            buf += chunk
            end = buf.find(b"\r\n\r\n", scan_from)
            if end >= 0:
                if end + 4 > self.max_request_bytes:
                    raise _BadRequest(431, "request head too large")
                return bytes(buf[: end + 4])  # a GET has no body; anything after the head is ignored
            if len(buf) > self.max_request_bytes:
                raise _BadRequest(431, "request head too large")

    async def respond_async(self, head: bytes) -> bytes:
        """`respond`, for a handler that must fetch something first (the worker group's, gateway.workers)."""
        return self.respond(head)

    def respond(self, head: bytes) -> bytes:
        """The full response to one request head (sans-I/O, so it is testable without a socket)."""
        try:
            method, path = parse_request_line(head)
        except _BadRequest as exc:
            return render_response(exc.status, _TEXT, f"{exc}\n".encode())
        if method not in ("GET", "HEAD"):
            return render_response(405, _TEXT, b"only GET is supported\n",
                                   extra_headers={"Allow": "GET, HEAD"})
        head_only = method == "HEAD"
        if path == "/metrics":
            accept = header_value(head, "Accept")
            if "application/openmetrics-text" in accept:
                encoder, content_type = choose_encoder(accept)
                body = encoder(self.metrics.registry)
            else:  # the text format, as before (choose_encoder would fall back to its older 0.0.4)
                body, content_type = generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST
            return render_response(200, content_type, body, head_only=head_only)
        if path == "/healthz":
            return render_response(200, _TEXT, b"ok\n", head_only=head_only)
        if path == "/readyz":
            status, payload = self.readiness_report()
            return render_response(status, _JSON, payload, head_only=head_only)
        return render_response(404, _TEXT, b"not found\n", head_only=head_only)

    def readiness_report(self) -> tuple[int, bytes]:
        checks: dict[str, bool] = {}
        for name, check in self.readiness.items():
            try:
                checks[name] = bool(check())
            except Exception as exc:  # a broken check means "not ready", never a crash
                log.warning("readiness check %s failed: %s", name, type(exc).__name__)
                checks[name] = False
        not_ready = [name for name, ok in checks.items() if not ok]
        body = {"ready": not not_ready, "not_ready": not_ready, "checks": checks}
        return (503 if not_ready else 200), (json.dumps(body, sort_keys=True) + "\n").encode()

    async def _send(self, stream: anyio.abc.ByteStream, data: bytes, slot: _Slot | None = None) -> None:
        """Write the response, then close gently: half-close and discard what the client still sends
        (bounded), so unread request bytes do not turn our close into a reset that eats the response."""
        with anyio.move_on_after(self.read_timeout), contextlib.suppress(
            anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError
        ):
            await stream.send(data)
            await stream.send_eof()
            if slot is not None:
                slot.phase = _LINGERING  # answered: this connection may now make room for another
            with anyio.move_on_after(_LINGER_SECONDS):
                drained = 0
                while drained < self.max_request_bytes:
                    drained += len(await stream.receive())


async def serve_admin(
    host: str,
    port: int,
    metrics: Metrics,
    readiness: Readiness,
    *,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin endpoint until cancelled. With `await tg.start(serve_admin, ...)` the bound port
    is returned (pass port 0 for an ephemeral one)."""
    handler = AdminHandler(metrics, readiness, read_timeout=read_timeout, max_request_bytes=max_request_bytes,
                           max_connections=max_connections)
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    bound: int = listener.extra(anyio.abc.SocketAttribute.local_port)
    log.info("admin endpoint on http://%s:%d/metrics", host, bound)
    async with listener:
        task_status.started(bound)
        await listener.serve(handler.handle)
