"""Admin HTTP endpoint over real loopback sockets, on both anyio backends."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Metrics, NullMetrics
from gateway.net.admin import serve_admin

pytestmark = pytest.mark.anyio

HOST = "127.0.0.1"


def http_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    """A blocking GET with urllib (run it in a worker thread); HTTP errors are returned, not raised."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read()


def raw_exchange(port: int, request: bytes, *, pause_after_send: float = 0.0) -> bytes:
    """Send raw bytes, read until the server closes."""
    with socket.create_connection((HOST, port), timeout=5) as sock:
        if request:
            sock.sendall(request)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


async def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    return await anyio.to_thread.run_sync(http_get, port, path)


@asynccontextmanager
async def admin(metrics: Metrics, readiness: dict, **kwargs: object) -> AsyncIterator[int]:
    async with anyio.create_task_group() as tg:
        port = await tg.start(lambda task_status: serve_admin(HOST, 0, metrics, readiness,
                                                              task_status=task_status, **kwargs))
        try:
            yield port
        finally:
            tg.cancel_scope.cancel()


def counter_value(body: bytes, name: str) -> float | None:
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == name and not s.labels:
                return s.value
    return None


async def test_metrics_endpoint_serves_the_registry_and_counters_move():
    metrics = Metrics()
    with anyio.fail_after(10):
        async with admin(metrics, {}) as port:
            assert port > 0
            status, headers, body = await get(port, "/metrics")
            assert status == 200
            assert headers["Content-Type"] == CONTENT_TYPE_LATEST
            assert headers["Connection"] == "close"
            assert counter_value(body, "gateway_reversals_sent_total") == 0
            assert b"process_cpu_seconds_total" in body
            metrics.reversals_sent.inc()
            metrics.reversals_sent.inc()
            metrics.message("terminal_in", "0200", "").inc()
            _, _, body = await get(port, "/metrics?x=1")
            assert counter_value(body, "gateway_reversals_sent_total") == 2
            assert b'gateway_messages_total{direction="terminal_in",mti="0200",rc="none"} 1.0' in body


def raw_get(port: int, path: str, headers: str = "") -> tuple[str, dict[str, str], bytes]:
    response = raw_exchange(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:])
    return lines[0], fields, body


PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
                     "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


async def test_metrics_are_served_as_openmetrics_when_the_scraper_asks():
    metrics = Metrics()
    metrics.message("terminal_in", "0200", "").inc()
    metrics.end_to_end("purchase", "00").observe(0.0021)
    with anyio.fail_after(10):
        async with admin(metrics, {}) as port:
            # the Accept header Prometheus 2.x sends, split over two header lines as a proxy may do
            status, headers, body = await anyio.to_thread.run_sync(
                raw_get, port, "/metrics", "Accept: application/openmetrics-text;version=1.0.0\r\n"
                                           f"ACCEPT: {PROMETHEUS_ACCEPT.split(',', 1)[1]}\r\n")
            assert status == "HTTP/1.1 200 OK"
            assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
            assert body.endswith(b"# EOF\n")
            parsed = {f.name: f for f in parse_openmetrics(body.decode())}
            assert [s.value for s in parsed["gateway_messages"].samples if s.name == "gateway_messages_total"] == [1]
            assert parsed["gateway_end_to_end_latency_seconds"].type == "histogram"
            # no Accept, or a plain-text one: the text format as before
            for accept in ("", "Accept: text/plain;version=0.0.4\r\n"):
                _, headers, body = await anyio.to_thread.run_sync(raw_get, port, "/metrics", accept)
                assert headers["Content-Type"] == CONTENT_TYPE_LATEST
                assert b"# EOF" not in body and counter_value(body, "gateway_reversals_sent_total") == 0


async def test_healthz_and_readiness_flips():
    state = {"host_link": False, "journal": True}
    readiness = {"host_link": lambda: state["host_link"], "journal": lambda: state["journal"]}
    with anyio.fail_after(10):
        async with admin(NullMetrics(), readiness) as port:
            status, _, body = await get(port, "/healthz")
            assert (status, body) == (200, b"ok\n")

            status, headers, body = await get(port, "/readyz")
            assert status == 503
            assert headers["Content-Type"] == "application/json"
            assert json.loads(body) == {"ready": False, "not_ready": ["host_link"],
                                        "checks": {"host_link": False, "journal": True}}

            state["host_link"] = True
            status, _, body = await get(port, "/readyz")
            assert status == 200
            assert json.loads(body)["ready"] is True

            state["journal"] = False
            status, _, body = await get(port, "/readyz")
            assert status == 503
            assert json.loads(body)["not_ready"] == ["journal"]


async def test_a_readiness_check_that_raises_counts_as_not_ready():
    def broken() -> bool:
        raise RuntimeError("database gone")

    with anyio.fail_after(10):
        async with admin(NullMetrics(), {"journal": broken, "host_link": lambda: True}) as port:
            status, _, body = await get(port, "/readyz")
            assert status == 503
            assert json.loads(body)["not_ready"] == ["journal"]
            # and the server still answers afterwards
            assert (await get(port, "/healthz"))[0] == 200


async def test_unknown_path_and_wrong_method():
    with anyio.fail_after(10):
        async with admin(NullMetrics(), {}) as port:
            assert (await get(port, "/nope"))[0] == 404
            reply = await anyio.to_thread.run_sync(
                raw_exchange, port, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 405 ")
            assert b"\r\nAllow: GET, HEAD\r\n" in reply
            reply = await anyio.to_thread.run_sync(raw_exchange, port, b"HEAD /healthz HTTP/1.1\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 200 ")
            assert reply.endswith(b"\r\n\r\n")  # headers only


async def test_garbled_and_oversized_requests_are_refused():
    with anyio.fail_after(10):
        async with admin(NullMetrics(), {}, max_request_bytes=1024) as port:
            reply = await anyio.to_thread.run_sync(raw_exchange, port, b"\x16\x03\x01 hello\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 400 ")
            huge = b"GET /metrics HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 4000 + b"\r\n\r\n"
            reply = await anyio.to_thread.run_sync(raw_exchange, port, huge)
            assert reply.startswith(b"HTTP/1.1 431 ")
            # a head split over many small writes is still read whole
            assert (await get(port, "/healthz"))[0] == 200


async def test_a_silent_client_is_timed_out_and_closed():
    with anyio.fail_after(10):
        async with admin(NullMetrics(), {}, read_timeout=0.2) as port:
            started = anyio.current_time()
            reply = await anyio.to_thread.run_sync(raw_exchange, port, b"GET /metr")
            assert reply.startswith(b"HTTP/1.1 408 ")
            assert anyio.current_time() - started < 3
            assert (await get(port, "/healthz"))[0] == 200


async def test_at_the_cap_a_silent_connection_makes_room_for_a_new_request():
    # (a new connection is refused with 503 only when every connection is being answered:
    # tests/test_admin_slow_clients.py)
    with anyio.fail_after(10):
        async with admin(NullMetrics(), {}, max_connections=1, read_timeout=2) as port:
            holder = await anyio.connect_tcp(HOST, port)  # occupies the only slot without sending
            async with holder:
                await anyio.sleep(0.05)
                reply = await anyio.to_thread.run_sync(raw_exchange, port, b"GET /healthz HTTP/1.1\r\n\r\n")
                assert reply.startswith(b"HTTP/1.1 200 ")
                with anyio.fail_after(3), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await holder.receive()  # the holder was closed, without an answer
