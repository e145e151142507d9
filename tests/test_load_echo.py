"""The raw framed echo server and the echo driver, over real loopback sockets on both backends."""

from __future__ import annotations

import anyio
import pytest

from gateway.load.config import LoadConfig
from gateway.load.driver import LoadError
from gateway.load.echo import (
    DEFAULT_BODY_SIZE,
    EchoDriver,
    complete_frames_length,
    echo_driver_factory,
    frame,
    serve_echo,
)
from gateway.load.runner import run_load

pytestmark = pytest.mark.anyio


async def receive_exactly(stream: anyio.abc.ByteStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        buf += await stream.receive()
    return bytes(buf)


def test_complete_frames_length():
    one = frame(b"abc")
    two = frame(b"") + frame(b"xy")
    assert complete_frames_length(b"") == 0
    assert complete_frames_length(b"\x00") == 0
    assert complete_frames_length(one[:-1]) == 0
    assert complete_frames_length(one) == len(one)
    assert complete_frames_length(one + two) == len(one) + len(two)
    assert complete_frames_length(one + two + one[:4]) == len(one) + len(two)


def test_frame_refuses_what_a_two_byte_length_cannot_carry():
    assert len(frame(b"x" * 0xFFFF)) == 0x10001
    with pytest.raises(ValueError, match="2-byte length"):
        frame(b"x" * 0x10000)


async def test_echo_round_trips_split_and_coalesced_frames():
    first, second, third = frame(b"hello"), frame(b""), frame(bytes(range(256)) * 4)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            port = await tg.start(serve_echo, "127.0.0.1", 0)
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                # one frame dribbled a byte at a time comes back whole
                for i in range(len(first)):
                    await stream.send(first[i : i + 1])
                    await anyio.sleep(0)
                assert await receive_exactly(stream, len(first)) == first
                # three frames in one write, the last split across two writes
                await stream.send(first + second + third[:10])
                await anyio.sleep(0.01)
                await stream.send(third[10:])
                expected = first + second + third
                assert await receive_exactly(stream, len(expected)) == expected
                # the largest frame a 2-byte length allows
                big = frame(b"\xab" * 0xFFFF)
                await stream.send(big)
                assert await receive_exactly(stream, len(big)) == big
            tg.cancel_scope.cancel()


async def test_echo_serves_many_connections_at_once():
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            port = await tg.start(serve_echo, "127.0.0.1", 0)
            driver = EchoDriver("127.0.0.1", port)
            sessions = [await driver.connect() for _ in range(20)]
            results: list[str] = []

            async def use(session) -> None:
                for _ in range(10):
                    results.append(await session.request("x"))

            async with anyio.create_task_group() as clients:
                for s in sessions:
                    clients.start_soon(use, s)
            for s in sessions:
                await s.aclose()
            assert results == ["00"] * 200
            tg.cancel_scope.cancel()


async def test_echo_driver_payload_size_and_load_run():
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            port = await tg.start(serve_echo, "127.0.0.1", 0)
            driver = echo_driver_factory({"target": f"127.0.0.1:{port}", "options": {}})
            assert len(driver.payload) == 2 + DEFAULT_BODY_SIZE == 350
            report = await run_load(driver, LoadConfig(concurrency=4, count=400))
            assert report.requests == report.ok == 400
            assert report.latency_ms["p50"] is not None and report.latency_ms["p50"] < 50
            tg.cancel_scope.cancel()


async def test_echo_driver_notices_a_server_that_answers_something_else():
    async def wrong(stream: anyio.abc.ByteStream) -> None:
        async with stream:
            data = await receive_exactly(stream, 2 + 16)
            await stream.send(data[:-1] + b"!")

    with anyio.fail_after(10):
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, wrong)
            session = await EchoDriver("127.0.0.1", port, body_size=16).connect()
            assert await session.request("x") == "echo_mismatch"
            await session.aclose()
            tg.cancel_scope.cancel()


def test_echo_factory_validates_its_options():
    with pytest.raises(LoadError, match="HOST:PORT"):
        echo_driver_factory({"target": "nowhere"})
    with pytest.raises(LoadError, match="--target"):
        echo_driver_factory({})
    with pytest.raises(LoadError, match="size"):
        echo_driver_factory({"target": "127.0.0.1:9", "options": {"size": "big"}})
    assert len(echo_driver_factory({"target": "[::1]:9", "options": {"size": "10"}}).payload) == 12
