"""The terminal-facing server on its own: connection limit, idle timeout, frame size, back-pressure,
undeliverable answers. A stand-in handler replaces the gateway service."""

from __future__ import annotations

import struct

import anyio
import anyio.abc
import pytest

from gateway.config import Endpoint, TerminalSideConfig
from gateway.iso.framing import Frame
from gateway.metrics import Metrics
from gateway.net.terminal_server import TerminalConnection, TerminalServer, Undeliverable

pytestmark = pytest.mark.anyio


def frame(body: bytes) -> bytes:
    return struct.pack(">H", len(body)) + body


def config(**overrides: object) -> TerminalSideConfig:
    base = {"listen": Endpoint("127.0.0.1", 0), "framing": "len2", "max_frame": 4096, "idle_timeout": 5.0,
            "write_timeout": 0.5, "max_in_flight_per_connection": 4, "max_connections": 10}
    base.update(overrides)
    return TerminalSideConfig(**base)  # type: ignore[arg-type]


async def closed_by_peer(stream: anyio.abc.ByteStream, timeout: float = 3.0) -> bool:
    with anyio.fail_after(timeout):
        try:
            while await stream.receive():
                pass
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return True
    return False


async def echo_handler(f: Frame, conn: TerminalConnection) -> None:
    await conn.send(f.body)


async def test_answers_frames_split_and_batched() -> None:
    metrics = Metrics(process_metrics=False)
    server = TerminalServer(config(), echo_handler, metrics)
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve)
        async with await anyio.connect_tcp("127.0.0.1", port) as s:
            data = frame(b"one") + frame(b"two") + frame(b"three")
            await s.send(data[:4])
            await s.send(data[4:])
            got = b""
            with anyio.fail_after(3):
                while len(got) < len(data):
                    got += await s.receive()
            assert got.count(b"one") == got.count(b"two") == got.count(b"three") == 1
        tg.cancel_scope.cancel()


async def test_connection_limit_refuses_the_extra_connection() -> None:
    metrics = Metrics(process_metrics=False)
    server = TerminalServer(config(max_connections=2), echo_handler, metrics)
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve)
        a = await anyio.connect_tcp("127.0.0.1", port)
        b = await anyio.connect_tcp("127.0.0.1", port)
        with anyio.fail_after(3):
            while server.active < 2:
                await anyio.sleep(0.01)
        c = await anyio.connect_tcp("127.0.0.1", port)
        assert await closed_by_peer(c)
        assert metrics.registry.get_sample_value("gateway_terminal_connections_refused_total") == 1
        for s in (a, b, c):
            await s.aclose()
        tg.cancel_scope.cancel()


async def test_idle_connection_is_closed() -> None:
    server = TerminalServer(config(idle_timeout=0.3), echo_handler, Metrics(process_metrics=False))
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve)
        async with await anyio.connect_tcp("127.0.0.1", port) as s:
            started = anyio.current_time()
            assert await closed_by_peer(s)
            assert 0.2 < anyio.current_time() - started < 2.5
        tg.cancel_scope.cancel()


async def test_oversized_length_closes_the_connection_after_answering_earlier_frames() -> None:
    metrics = Metrics(process_metrics=False)
    server = TerminalServer(config(max_frame=64), echo_handler, metrics)
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve)
        async with await anyio.connect_tcp("127.0.0.1", port) as s:
            await s.send(frame(b"fine") + struct.pack(">H", 1000) + b"x" * 10)
            got = b""
            with anyio.fail_after(3):
                try:
                    while True:
                        got += await s.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    pass
            assert got == frame(b"fine")  # the good frame before the bad prefix was still answered
        assert metrics.registry.get_sample_value("gateway_decode_errors_total", {"kind": "framing"}) == 1
        tg.cancel_scope.cancel()


async def test_back_pressure_limits_frames_in_flight() -> None:
    release = anyio.Event()
    started: list[bytes] = []

    async def slow_handler(f: Frame, conn: TerminalConnection) -> None:
        started.append(f.body)
        await release.wait()
        await conn.send(f.body)

    server = TerminalServer(config(max_in_flight_per_connection=3), slow_handler, Metrics(process_metrics=False))
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve)
        async with await anyio.connect_tcp("127.0.0.1", port) as s:
            await s.send(b"".join(frame(b"%02d" % i) for i in range(10)))
            await anyio.sleep(0.3)
            assert len(started) == 3  # the reader stopped taking frames
            release.set()
            got = b""
            with anyio.fail_after(3):
                while got.count(b"\x00\x02") < 10:
                    got += await s.receive()
            assert len(started) == 10
        tg.cancel_scope.cancel()


async def test_answer_to_a_terminal_that_hung_up_is_undeliverable() -> None:
    outcome: list[str] = []
    answered = anyio.Event()

    async def late_handler(f: Frame, conn: TerminalConnection) -> None:
        await anyio.sleep(0.3)
        try:
            await conn.send(f.body)
            outcome.append("delivered")
        except Undeliverable:
            outcome.append("undeliverable")
        answered.set()

    server = TerminalServer(config(), late_handler, Metrics(process_metrics=False))
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve)
        s = await anyio.connect_tcp("127.0.0.1", port)
        await s.send(frame(b"purchase"))
        await s.aclose()
        with anyio.fail_after(3):
            await answered.wait()
        assert outcome == ["undeliverable"]
        tg.cancel_scope.cancel()


async def test_terminal_that_stops_reading_makes_writes_time_out() -> None:
    outcome: list[str] = []
    done = anyio.Event()

    async def flood_handler(f: Frame, conn: TerminalConnection) -> None:
        try:
            for _ in range(2000):  # bounded: far more than loopback socket buffers hold
                await conn.send(b"x" * 4000)
            outcome.append("all written")
        except Undeliverable:
            outcome.append("undeliverable")
        done.set()

    server = TerminalServer(config(write_timeout=0.3), flood_handler, Metrics(process_metrics=False))
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve)
        async with await anyio.connect_tcp("127.0.0.1", port) as s:
            await s.send(frame(b"go"))  # and never read anything back
            with anyio.fail_after(10):
                await done.wait()
        assert outcome == ["undeliverable"]
        tg.cancel_scope.cancel()
