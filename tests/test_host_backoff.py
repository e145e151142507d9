"""The host link's reconnect back-off against hosts that misbehave at the TCP level: a host that
accepts and closes at once must not be hammered (the back-off grows until a sign-on succeeds), each
connection's end is logged with why, and the "retry in" a log line names is the delay really waited."""

from __future__ import annotations

import logging
import re

import anyio
import anyio.abc
import pytest

from gateway.config import Endpoint, HostConfig
from gateway.iso.codec import Codec
from gateway.iso.framing import make_framer
from gateway.iso.message import Message
from gateway.iso.mti import response_mti
from gateway.iso.spec import load_dialect
from gateway.metrics import Metrics
from gateway.net.host_link import HostLink
from gateway.security.module import SoftwareSecurityModule

pytestmark = pytest.mark.anyio

WINDOW = 3.0
RETRY = re.compile(r"retry in (\d+\.\d+)s")


class SlammingHost:
    """Accepts every connection and closes it at once, noting when; with `sign_on`, it first answers
    the sign-on, then closes."""

    def __init__(self, *, sign_on: bool = False) -> None:
        self.sign_on = sign_on
        self.connects: list[float] = []
        self.codec = Codec(load_dialect("iso87-ascii"))
        self.framer = make_framer("len2", 8192)

    async def serve(self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        async with listener:
            task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
            await listener.serve(self._connection)

    async def _connection(self, stream: anyio.abc.ByteStream) -> None:
        self.connects.append(anyio.current_time())
        async with stream:
            if not self.sign_on:
                return
            decoder = self.framer.decoder()
            with anyio.move_on_after(2):
                async for chunk in stream:
                    for frame in decoder.feed(chunk):
                        msg = self.codec.decode(frame.body)
                        fields = {k: v for k, v in msg.fields.items() if k in ("7", "11", "32", "70")}
                        answer = Message(response_mti(msg.mti), {**fields, "39": "00"})
                        await stream.send(self.framer.encode(self.codec.encode(answer)))
                        await anyio.sleep(0.05)
                        return


async def run_link_against(host: SlammingHost, seconds: float) -> HostLink:
    async with anyio.create_task_group() as tg:
        port = await tg.start(host.serve)
        config = HostConfig(address=Endpoint("127.0.0.1", port), key_exchange=False, timeout=1.0,
                            reconnect_min=0.2, reconnect_max=30.0, echo_interval=60.0)
        link = HostLink(config, SoftwareSecurityModule(), Metrics(process_metrics=False))
        await tg.start(link.run)
        await anyio.sleep(seconds)
        tg.cancel_scope.cancel()
    return link


async def test_a_host_that_closes_at_once_is_not_hammered(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.host")
    host = SlammingHost()
    await run_link_against(host, WINDOW)
    # back-off 0.2 s doubling, full jitter (0.5..1 of it): connects at 0, ≤0.2, ≤0.6, ≤1.4, ≤3.0 s
    assert 3 <= len(host.connects) <= 6, f"{len(host.connects)} connects in {WINDOW}s"
    lines = [r.getMessage() for r in caplog.records if "retry in" in r.getMessage()]
    assert lines and all("before sign-on" in line and "closed" in line for line in lines), lines
    # each logged delay is the one waited: the gap to the next connect is that delay (plus latency)
    delays = [float(RETRY.search(line).group(1)) for line in lines]  # type: ignore[union-attr]
    gaps = [b - a for a, b in zip(host.connects, host.connects[1:], strict=False)]
    for delay, gap in zip(delays, gaps, strict=False):
        assert delay - 0.02 <= gap <= delay + 0.5, (delays, gaps)
    assert delays == sorted(delays) or all(d < 0.4 for d in delays)  # growing (jitter may reorder one step)


async def test_the_back_off_starts_afresh_after_a_successful_sign_on(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.host")
    host = SlammingHost(sign_on=True)
    link = await run_link_against(host, WINDOW)
    # every connection signed on, so every retry waits about reconnect_min (0.1..0.2 s), not doubling
    gaps = [b - a for a, b in zip(host.connects, host.connects[1:], strict=False)]
    assert len(host.connects) >= 6 and max(gaps) < 0.2 + 0.05 + 0.5, gaps
    assert link.reconnects >= 5
    lines = [r.getMessage() for r in caplog.records if "retry in" in r.getMessage()]
    assert lines and all("after sign-on" in line for line in lines), lines
