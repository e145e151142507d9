"""The terminal-facing server on its own: connection limit, idle timeout, frame size, back-pressure,
undeliverable answers; and the machinery that makes it cheap per frame without weakening any of that:
answers joined into few writes yet each reported delivered only once written, write timeouts enforced
by the server's sweeper (also during a shutdown), reused workers that keep admission in wire order.
A stand-in handler replaces the gateway service."""

from __future__ import annotations

import logging
import socket
import struct

import anyio
import anyio.abc
import pytest
from stream_support import ForwardingStream

from gateway.config import Endpoint, TerminalSideConfig
from gateway.iso.framing import Frame
from gateway.metrics import Metrics
from gateway.net import terminal_server
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


async def test_connection_limit_refuses_the_extra_connection_when_all_have_work_in_flight() -> None:
    release = anyio.Event()

    async def slow_handler(f: Frame, conn: TerminalConnection) -> None:
        await release.wait()
        await conn.send(f.body)

    metrics = Metrics(process_metrics=False)
    server = TerminalServer(config(max_connections=2), slow_handler, metrics)
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve)
        a = await anyio.connect_tcp("127.0.0.1", port)
        b = await anyio.connect_tcp("127.0.0.1", port)
        for s in (a, b):
            await s.send(frame(b"busy"))  # a request in flight on each: neither may be shed
        with anyio.fail_after(3):
            while server.active < 2:
                await anyio.sleep(0.01)
        await anyio.sleep(0.1)
        c = await anyio.connect_tcp("127.0.0.1", port)
        assert await closed_by_peer(c)
        assert metrics.registry.get_sample_value("gateway_terminal_connections_refused_total") == 1
        release.set()
        for s in (a, b):
            assert await read_frames(s, 1) == [b"busy"]  # their answers were still delivered
        for s in (a, b, c):
            await s.aclose()
        tg.cancel_scope.cancel()


async def test_connection_limit_sheds_the_longest_idle_connection_for_a_new_one() -> None:
    metrics = Metrics(process_metrics=False)
    server = TerminalServer(config(max_connections=2), echo_handler, metrics)
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve)
        a = await anyio.connect_tcp("127.0.0.1", port)
        await anyio.sleep(0.05)
        b = await anyio.connect_tcp("127.0.0.1", port)
        with anyio.fail_after(3):
            while server.active < 2:
                await anyio.sleep(0.01)
        c = await anyio.connect_tcp("127.0.0.1", port)
        await c.send(frame(b"new"))
        assert await read_frames(c, 1) == [b"new"]  # the newcomer is served...
        assert await closed_by_peer(a)  # ...in place of the connection idle longest
        await b.send(frame(b"still here"))
        assert await read_frames(b, 1) == [b"still here"]
        assert metrics.registry.get_sample_value("gateway_terminal_connections_shed_total") == 1
        assert metrics.registry.get_sample_value("gateway_terminal_connections_refused_total") == 0
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


# --- the writer task, the idle watchdog and the reused workers -------------------------------------------


class CountingStream(ForwardingStream):
    """The server side of a connection with its `send` calls counted (how many writes reached the socket)."""

    def __init__(self, inner: anyio.abc.SocketStream) -> None:
        super().__init__(inner)
        self.sends = 0

    async def send(self, item: bytes) -> None:
        self.sends += 1
        await self.inner.send(item)


def count_server_sends(monkeypatch: pytest.MonkeyPatch, sndbuf: int | None = None) -> list[CountingStream]:
    """Every server-side connection from now on writes through a CountingStream (listed in the result);
    `sndbuf` shrinks the server socket's send buffer, so a terminal that stops reading blocks us soon."""
    streams: list[CountingStream] = []

    class CountedConnection(TerminalConnection):
        def __init__(self, stream, encode, write_timeout, peer) -> None:
            if sndbuf is not None:
                stream.extra(anyio.abc.SocketAttribute.raw_socket).setsockopt(
                    socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            counting = CountingStream(stream)
            streams.append(counting)
            super().__init__(counting, encode, write_timeout, peer)

    monkeypatch.setattr(terminal_server, "TerminalConnection", CountedConnection)
    return streams


async def connect_small_window(port: int) -> socket.socket:
    """A terminal that never reads, with a tiny receive buffer (set before connecting, so the advertised
    window is small). A plain socket: anyio's asyncio `SocketStream.from_socket` would read eagerly."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await anyio.to_thread.run_sync(sock.connect, ("127.0.0.1", port))
    return sock


async def read_frames(stream: anyio.abc.ByteStream, count: int) -> list[bytes]:
    buf = b""
    bodies: list[bytes] = []
    with anyio.fail_after(3):
        while len(bodies) < count:
            buf += await stream.receive()
            while len(buf) >= 2 and len(buf) >= 2 + struct.unpack(">H", buf[:2])[0]:
                end = 2 + struct.unpack(">H", buf[:2])[0]
                bodies.append(buf[2:end])
                buf = buf[end:]
    return bodies


async def read_to_eof(stream: anyio.abc.ByteStream) -> bytes:
    got = b""
    with anyio.fail_after(3):
        try:
            while True:
                got += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return got


async def test_concurrent_answers_go_out_in_few_sends_and_each_counts_as_delivered(
        monkeypatch: pytest.MonkeyPatch) -> None:
    streams = count_server_sends(monkeypatch)
    n = 16
    arrived: list[bytes] = []
    all_arrived = anyio.Event()
    delivered: list[bytes] = []

    async def gathering_handler(f: Frame, conn: TerminalConnection) -> None:
        arrived.append(f.body)
        if len(arrived) == n:
            all_arrived.set()
        await all_arrived.wait()  # then all n answers are sent in the same instant
        await conn.send(f.body)
        delivered.append(f.body)

    server = TerminalServer(config(max_in_flight_per_connection=n), gathering_handler,
                            Metrics(process_metrics=False))
    bodies = [b"txn-%02d" % i for i in range(n)]
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve)
        async with await anyio.connect_tcp("127.0.0.1", port) as s:
            await s.send(b"".join(frame(b) for b in bodies))
            received = await read_frames(s, n)
        tg.cancel_scope.cancel()
    assert sorted(received) == bodies  # every answer arrived whole
    assert sorted(delivered) == bodies  # and each sender was told it was delivered
    assert len(streams) == 1
    assert 1 <= streams[0].sends <= 2  # the writer joined them: one send, or two if it woke mid-way


async def test_write_timeout_fails_that_answer_and_every_later_one(monkeypatch: pytest.MonkeyPatch) -> None:
    count_server_sends(monkeypatch, sndbuf=4096)
    outcomes: dict[bytes, tuple[str, float]] = {}
    first_done = anyio.Event()
    big = b"x" * 60_000  # far more than a 4 KiB send buffer plus a 4 KiB receive window

    async def handler(f: Frame, conn: TerminalConnection) -> None:
        if f.body == b"queued":
            await anyio.sleep(0.1)  # joins the writer's queue while the first write is stuck
        elif f.body == b"later":
            await first_done.wait()
        started = anyio.current_time()
        try:
            await conn.send(b"small" if f.body == b"later" else big)
            result = "delivered"
        except Undeliverable as exc:
            result = str(exc)
        outcomes[f.body] = (result, anyio.current_time() - started)
        if f.body == b"first":
            first_done.set()

    server = TerminalServer(config(write_timeout=0.3, max_frame=65_535), handler, Metrics(process_metrics=False))
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve)
        with await connect_small_window(port) as terminal:
            await anyio.to_thread.run_sync(terminal.sendall, frame(b"first") + frame(b"queued") + frame(b"later"))
            with anyio.fail_after(5):
                while len(outcomes) < 3:
                    await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    result, elapsed = outcomes[b"first"]
    assert result == "write timed out"
    assert 0.25 < elapsed < 2.0
    assert outcomes[b"queued"][0] != "delivered"  # queued behind the stuck write: never written
    result, elapsed = outcomes[b"later"]
    assert result == "terminal connection already closed"
    assert elapsed < 0.2  # refused at once, without waiting for another timeout


async def test_shutdown_still_writes_an_answer_already_decided() -> None:
    handling = anyio.Event()
    outcome: list[str] = []

    async def shielded_handler(f: Frame, conn: TerminalConnection) -> None:
        handling.set()
        with anyio.CancelScope(shield=True):  # as the service does once an answer is decided
            await anyio.sleep(0.2)
            try:
                await conn.send(f.body)
                outcome.append("delivered")
            except Undeliverable:
                outcome.append("undeliverable")

    server = TerminalServer(config(), shielded_handler, Metrics(process_metrics=False))
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve)
        s = await anyio.connect_tcp("127.0.0.1", port)
        await s.send(frame(b"approved"))
        with anyio.fail_after(3):
            await handling.wait()
        tg.cancel_scope.cancel()  # the server stops while the answer is still being decided
    async with s:
        assert outcome == ["delivered"]
        assert await read_to_eof(s) == frame(b"approved")


async def test_shutdown_does_not_lift_the_write_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    count_server_sends(monkeypatch, sndbuf=4096)
    writing = anyio.Event()
    outcome: list[str] = []

    async def shielded_handler(f: Frame, conn: TerminalConnection) -> None:
        with anyio.CancelScope(shield=True):
            writing.set()
            try:
                await conn.send(b"x" * 60_000)
                outcome.append("delivered")
            except Undeliverable as exc:
                outcome.append(str(exc))

    server = TerminalServer(config(write_timeout=0.3, max_frame=65_535), shielded_handler,
                            Metrics(process_metrics=False))
    terminal = None
    try:
        with anyio.fail_after(3):  # the shutdown ends: the stuck write is still bounded by write_timeout
            async with anyio.create_task_group() as tg:
                port = await tg.start(server.serve)
                terminal = await connect_small_window(port)
                await anyio.to_thread.run_sync(terminal.sendall, frame(b"go"))
                await writing.wait()
                tg.cancel_scope.cancel()
    finally:
        if terminal is not None:
            terminal.close()
    assert outcome == ["write timed out"]


async def test_answers_to_a_terminal_that_hung_up_are_refused_at_once() -> None:
    outcomes: list[tuple[str, float]] = []

    async def late_handler(f: Frame, conn: TerminalConnection) -> None:
        await anyio.sleep(0.3)
        started = anyio.current_time()
        try:
            await conn.send(f.body)
            outcomes.append(("delivered", 0.0))
        except Undeliverable as exc:
            outcomes.append((str(exc), anyio.current_time() - started))

    server = TerminalServer(config(max_in_flight_per_connection=4), late_handler, Metrics(process_metrics=False))
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve)
        s = await anyio.connect_tcp("127.0.0.1", port)
        await s.send(b"".join(frame(b"purchase-%d" % i) for i in range(4)))
        await s.aclose()
        with anyio.fail_after(3):
            while len(outcomes) < 4:
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    assert [result for result, _ in outcomes] == ["terminal connection already closed"] * 4
    assert all(elapsed < 0.1 for _, elapsed in outcomes)


async def test_idle_close_still_writes_the_answers_owed(caplog: pytest.LogCaptureFixture) -> None:
    outcome: list[str] = []

    async def slow_handler(f: Frame, conn: TerminalConnection) -> None:
        await anyio.sleep(0.6)  # longer than the idle timeout: we stop reading meanwhile
        try:
            await conn.send(f.body)
            outcome.append("delivered")
        except Undeliverable:
            outcome.append("undeliverable")

    server = TerminalServer(config(idle_timeout=0.3), slow_handler, Metrics(process_metrics=False))
    with caplog.at_level(logging.INFO, logger="gateway.terminal"):
        async with anyio.create_task_group() as tg:
            port = await tg.start(server.serve)
            async with await anyio.connect_tcp("127.0.0.1", port) as s:
                started = anyio.current_time()
                await s.send(frame(b"slow"))
                assert await read_to_eof(s) == frame(b"slow")  # answered, then closed
                assert anyio.current_time() - started > 0.5
            tg.cancel_scope.cancel()
    assert outcome == ["delivered"]
    assert any("closing idle terminal connection" in r.getMessage() for r in caplog.records)


async def test_a_terminal_that_keeps_sending_is_not_idle() -> None:
    server = TerminalServer(config(idle_timeout=0.5), echo_handler, Metrics(process_metrics=False))
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve)
        async with await anyio.connect_tcp("127.0.0.1", port) as s:
            for i in range(8):  # 0.8 s in all, well past the idle timeout, never 0.5 s quiet
                await s.send(frame(b"echo-%d" % i))
                assert await read_frames(s, 1) == [b"echo-%d" % i]
                await anyio.sleep(0.1)
        tg.cancel_scope.cancel()


async def test_admit_runs_in_wire_order_and_concurrency_stays_bounded() -> None:
    admitted: list[bytes] = []
    busy = peak = 0

    def admit(f: Frame) -> tuple[int, Frame]:
        admitted.append(f.body)
        return len(admitted), f

    async def handler(item: tuple[int, Frame], conn: TerminalConnection) -> None:
        nonlocal busy, peak
        number, f = item
        assert admitted[number - 1] == f.body  # admitted before its processing started
        busy += 1
        peak = max(peak, busy)
        await anyio.sleep(0.01 * (number % 3))  # finish out of order
        busy -= 1
        await conn.send(f.body)

    server = TerminalServer(config(max_in_flight_per_connection=4), handler, Metrics(process_metrics=False),
                            admit=admit)
    bodies = [b"m%03d" % i for i in range(60)]
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve)
        async with await anyio.connect_tcp("127.0.0.1", port) as s:
            for start in range(0, 60, 20):
                await s.send(b"".join(frame(b) for b in bodies[start:start + 20]))
            received = await read_frames(s, 60)
        tg.cancel_scope.cancel()
    assert admitted == bodies
    assert sorted(received) == bodies
    assert 1 < peak <= 4


async def test_timeouts_of_one_connection_leave_the_others_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    count_server_sends(monkeypatch, sndbuf=4096)
    stuck_outcome: list[str] = []

    async def handler(f: Frame, conn: TerminalConnection) -> None:
        try:
            await conn.send(b"x" * 60_000 if f.body == b"stuck" else f.body)
            if f.body == b"stuck":
                stuck_outcome.append("delivered")
        except Undeliverable as exc:
            stuck_outcome.append(str(exc))

    server = TerminalServer(config(idle_timeout=0.5, write_timeout=0.3, max_frame=65_535), handler,
                            Metrics(process_metrics=False))
    async with anyio.create_task_group() as tg:
        port = await tg.start(server.serve)
        with await connect_small_window(port) as stuck:  # its write times out, then it is closed
            idle = await anyio.connect_tcp("127.0.0.1", port)  # says nothing: closed after 0.5 s
            async with idle, await anyio.connect_tcp("127.0.0.1", port) as busy:
                await anyio.to_thread.run_sync(stuck.sendall, frame(b"stuck"))
                for i in range(8):  # 0.8 s of traffic across both timeouts
                    await busy.send(frame(b"busy-%d" % i))
                    assert await read_frames(busy, 1) == [b"busy-%d" % i]
                    await anyio.sleep(0.1)
                assert stuck_outcome == ["write timed out"]
                assert await closed_by_peer(idle, timeout=1.0)
                await busy.send(frame(b"still here"))
                assert await read_frames(busy, 1) == [b"still here"]
        tg.cancel_scope.cancel()
