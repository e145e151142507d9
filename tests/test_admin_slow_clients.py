"""Slow clients on the admin port must not make the liveness probe fail: 40 clients that connect and
send their request a byte at a time (or not at all) against the 32-connection cap. The connection
that has been reading its request longest makes room for a new one; only when every connection is
being answered is a new one refused with 503."""

from __future__ import annotations

import anyio
import anyio.abc
import pytest
from stream_support import ForwardingStream
from test_admin import HOST, admin, get

from gateway.metrics import Metrics
from gateway.net.admin import DEFAULT_MAX_CONNECTIONS, AdminHandler

pytestmark = pytest.mark.anyio

SLOW_CLIENTS = 40
PROBE_SECONDS = 3.0


def shed(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("gateway_admin_connections_shed_total") or 0.0


async def test_forty_slow_clients_never_fail_the_liveness_probe() -> None:
    metrics = Metrics(process_metrics=False)
    statuses: list[int] = []
    closed_early = 0
    with anyio.fail_after(30):
        async with admin(metrics, {}) as port, anyio.create_task_group() as tg:  # default cap and 5 s timeout
            assert DEFAULT_MAX_CONNECTIONS < SLOW_CLIENTS

            async def slow_client() -> None:
                nonlocal closed_early
                async with await anyio.connect_tcp(HOST, port) as s:
                    try:
                        for byte in b"GET /healthz HTTP/1.1\r\n":  # never the blank line that ends the head
                            await s.send(bytes([byte]))
                            await anyio.sleep(0.2)
                        await anyio.sleep_forever()
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                        closed_early += 1

            for _ in range(SLOW_CLIENTS):
                tg.start_soon(slow_client)
                await anyio.sleep(0.01)
            await anyio.sleep(0.5)  # every slow client is connected and trickling
            deadline = anyio.current_time() + PROBE_SECONDS
            while anyio.current_time() < deadline:
                statuses.append((await get(port, "/healthz"))[0])
                await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    assert statuses and set(statuses) == {200}, f"{statuses.count(503)} of {len(statuses)} probes got 503"
    # the slow clients beyond the cap, and one for the first probe, were shed (oldest first), each counted;
    # later probes find a free slot unless the one before is still lingering (then they shed another)
    assert shed(metrics) >= SLOW_CLIENTS - DEFAULT_MAX_CONNECTIONS + 1
    assert closed_early >= SLOW_CLIENTS - DEFAULT_MAX_CONNECTIONS + 1  # and those were really closed


class StuckWriter(ForwardingStream):
    """A client that sent its request but never reads: the response write never completes."""

    async def send(self, item: bytes) -> None:
        await anyio.sleep_forever()


async def test_when_every_connection_is_being_answered_a_new_one_gets_503() -> None:
    metrics = Metrics(process_metrics=False)
    handler = AdminHandler(metrics, {}, max_connections=2, read_timeout=3.0)
    listener = await anyio.create_tcp_listener(local_host=HOST, local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:

        async def serve(stream: anyio.abc.SocketStream) -> None:
            # the first two connections are clients whose responses can never be written
            await handler.handle(StuckWriter(stream) if handler.active < 2 else stream)

        tg.start_soon(listener.serve, serve)
        stuck = [await anyio.connect_tcp(HOST, port) for _ in range(2)]
        for s in stuck:
            await s.send(b"GET /healthz HTTP/1.1\r\n\r\n")
        with anyio.fail_after(5):
            while handler.active < 2:
                await anyio.sleep(0.01)
        await anyio.sleep(0.1)  # both are past reading: answering
        status, _, body = await get(port, "/healthz")
        assert (status, body) == (503, b"too many admin connections\n")
        assert shed(metrics) == 0  # nobody to shed: both were being answered
        for s in stuck:
            await s.aclose()
        tg.cancel_scope.cancel()
