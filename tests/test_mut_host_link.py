"""Promises of `gateway.net.host_link` the link tests did not pin down (issue 16, mutation testing): what
the trace records of the host leg (connections, frames both ways, timeouts with whether the request was
ever written), what an operator and the service read (the reasons a request failed, the log line that
ends a connection, the back-off's jitter bounds, a bad host MAC, a late answer), TLS on the host link
(every refusal counted by kind, a link that keeps retrying), and an answer of another message class
never taken for a request's answer. Real loopback sockets; the host is the bare `FakeHost` of
tests/test_host_link.py, a TLS listener the test runs, or the host simulator.
"""

from __future__ import annotations

import functools
import logging
import re
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from anyio.streams.tls import TLSStream
from stream_support import ForwardingStream
from test_host_backoff import RETRY, SlammingHost, run_link_against
from test_host_link import FakeHost, GatedLink, counted, eventually, open_link, outcome, purchase
from tls_support import Authority

from gateway.config import Endpoint, HostConfig, TlsClientConfig, TlsServerConfig
from gateway.iso.build import iso87
from gateway.iso.codec import Codec
from gateway.iso.message import Message
from gateway.iso.spec import load_dialect
from gateway.lab import CARD_CUP, LOOPBACK, open_lab
from gateway.metrics import Metrics
from gateway.net.host_link import HostLink, HostNotSent, HostReply, HostTimeout, HostUnavailable
from gateway.net.tls import server_context
from gateway.security.module import SoftwareSecurityModule
from gateway.sim.host import HostSimulator
from gateway.sim.host_rules import Fault
from gateway.trace.format import Direction, EventKind, Leg

pytestmark = pytest.mark.anyio

CODEC = Codec(load_dialect("iso87-ascii"))


def host_lines(caplog: pytest.LogCaptureFixture, needle: str = "") -> list[str]:
    """The link's log lines as an operator reads them (a line whose arguments do not fit its format
    raises here)."""
    return [r.getMessage() for r in caplog.records if r.name == "gateway.host" and needle in r.getMessage()]


class RecordingTap:
    """A `gateway.trace.tap.Tap` that keeps every call: what the trace of a run would hold."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def opened(self, leg: Leg, conn: object, peer: str) -> None:
        self.calls.append(("opened", leg, conn, peer))

    def closed(self, leg: Leg, conn: object, detail: str = "") -> None:
        self.calls.append(("closed", leg, conn))

    def frame(self, leg: Leg, direction: Direction, conn: object, body: bytes, envelope: Any = None,
              cause: int | None = None) -> int | None:
        self.calls.append(("frame", leg, direction, conn, CODEC.decode(body)))
        return len(self.calls)

    def event(self, leg: Leg, conn: object, kind: EventKind, detail: str = "") -> None:
        self.calls.append(("event", leg, conn, kind, detail))

    def of(self, what: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == what]


class EndingHost(FakeHost):
    """A FakeHost that ends the connection when it receives a 0200 of amount `CLOSE` (a clean close) or
    `RESET` (a close with a TCP reset), instead of answering it."""

    CLOSE, RESET = 999, 998

    async def _connection(self, stream: anyio.abc.ByteStream) -> None:
        self.connections += 1
        self._stream = stream
        decoder = self.framer.decoder()
        async with stream:
            async for chunk in stream:
                for frame in decoder.feed(chunk):
                    msg = self.codec.decode(frame.body)
                    if msg.mti == "0200" and int(msg.fields["4"]) in (self.CLOSE, self.RESET):
                        if int(msg.fields["4"]) == self.RESET:
                            raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
                            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        return
                    if msg.mti.endswith("10"):
                        self.answers_to_us.append(msg)
                        continue
                    self.received.append(msg)
                    if self.hold and msg.mti == "0200":
                        self.held.append(self.answer(msg))
                    else:
                        await self.send(self.answer(msg))


# --- the trace of the host leg ---------------------------------------------------------------------------


async def test_the_trace_of_the_host_leg_holds_connections_frames_and_timeouts() -> None:
    metrics = Metrics(process_metrics=False)
    host = EndingHost()
    tap = RecordingTap()
    async with anyio.create_task_group() as tg:
        port = await tg.start(host.serve)
        config = HostConfig(address=Endpoint("127.0.0.1", port), key_exchange=False, timeout=2.0, echo_interval=60.0,
                            reconnect_min=0.05, reconnect_max=0.2)
        link = GatedLink(config, SoftwareSecurityModule(), metrics)
        link.tap = tap
        await tg.start(link.run)
        with anyio.fail_after(5):
            await link.wait_signed_on()
        [(_, leg, conn, peer)] = tap.of("opened")
        assert (leg, peer) == (Leg.HOST, f"127.0.0.1:{port}")

        answered = purchase(link)
        reply = await link.request(answered, 2.0)
        assert reply.message.fields["39"] == "00"
        frames = [(c[1], c[2], c[3], c[4].mti, c[4].fields.get("11")) for c in tap.of("frame")]
        stan = answered.fields["11"]
        sign_on_stan = host.received[0].fields["11"]
        assert frames == [(Leg.HOST, Direction.OUT, conn, "0800", sign_on_stan),
                          (Leg.HOST, Direction.IN, conn, "0810", sign_on_stan),
                          (Leg.HOST, Direction.OUT, conn, "0200", stan),
                          (Leg.HOST, Direction.IN, conn, "0210", stan)]
        assert counted(metrics, "messages", direction="host_in", mti="0210", rc="00") == 1

        # the host's own echo test: our answer is in the trace too
        await host.send(iso87.echo("777777", "0101120000", "00000001234"))
        await eventually(lambda: len(host.answers_to_us) == 1)
        assert [(c[2], c[3], c[4].mti, c[4].fields["11"]) for c in tap.of("frame")][-2:] == [
            (Direction.IN, conn, "0800", "777777"), (Direction.OUT, conn, "0810", "777777")]

        # a request the host holds: a timeout event naming it; one never written: the same, "sent=no"
        host.hold = True
        held = purchase(link)
        assert isinstance(await outcome(link, held, 0.2), HostTimeout)
        host.hold = False
        link.wire.stall()
        taken, queued = purchase(link), purchase(link)
        async with anyio.create_task_group() as inner:
            inner.start_soon(outcome, link, taken, 5.0)
            with anyio.fail_after(2):
                await link.wire.stuck.wait()
            assert isinstance(await outcome(link, queued, 0.2), HostNotSent)
            link.wire.release()
        events = [(c[1], c[2], c[3], c[4]) for c in tap.of("event")]
        assert events == [(Leg.HOST, conn, EventKind.TIMEOUT, f"class=020 11={held.fields['11']} 41=10000001"),
                          (Leg.HOST, conn, EventKind.TIMEOUT,
                           f"class=020 11={queued.fields['11']} 41=10000001 sent=no")]

        # the host ends the connection: closed in the trace, then a new one opened
        assert isinstance(await outcome(link, purchase(link, EndingHost.CLOSE), 2.0), HostTimeout)
        await eventually(lambda: len(tap.of("opened")) == 2)
        assert tap.of("closed")[0] == ("closed", Leg.HOST, conn)
        assert tap.of("opened")[1][2] is not conn
        tg.cancel_scope.cancel()


# --- why a request failed, as the service puts it on record --------------------------------------------


async def test_each_failure_says_why() -> None:
    """The service writes these texts into the refusal on record and its log line ("not sent to the
    host: ...", "no host answer in time: ..."): each must say what happened."""
    config = HostConfig(address=Endpoint("127.0.0.1", 1), key_exchange=False, timeout=0.5)
    idle = HostLink(config, SoftwareSecurityModule(), Metrics(process_metrics=False))
    with pytest.raises(HostUnavailable) as down:
        await idle.request(purchase(idle))
    assert str(down.value) == "host link is not signed on"

    async with open_link() as (host, link):
        host.hold = True
        with pytest.raises(HostTimeout) as late:
            await link.request(purchase(link), 0.3)
        assert str(late.value) == "no answer within 0.3s"  # the deadline, as the service logs it
        unencodable = purchase(link)
        unencodable.fields["4"] = "1" * 40  # longer than the dialect's 12 digits
        with pytest.raises(HostNotSent) as refused:
            await link.request(unencodable, 1.0)
        assert str(refused.value).startswith("request cannot be encoded: ")
        assert "4" in str(refused.value)

        # the connection breaks: what the writer had taken is of unknown outcome, what was queued not sent
        wire = link.wire
        wire.stall()
        taken, queued = purchase(link), purchase(link)
        results: dict[str, Any] = {}

        async def ask(name: str, msg: Message) -> None:
            results[name] = await outcome(link, msg, 5.0)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, "taken", taken)
            with anyio.fail_after(2):
                await wire.stuck.wait()
            tg.start_soon(ask, "queued", queued)
            await eventually(lambda: len(link._pending) == 2)
            wire.fail_next = True
            wire.release()
        assert isinstance(results["taken"], HostTimeout) and str(results["taken"]) == "host connection lost"
        assert isinstance(results["queued"], HostNotSent)
        assert str(results["queued"]) == "host connection lost before the request was written"


async def test_a_late_answer_is_logged_with_its_stan_and_code_and_leaves_the_link_alone(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.host")
    late: list[HostReply] = []

    async def on_unmatched(reply: HostReply) -> None:
        late.append(reply)

    async with open_link(on_unmatched=on_unmatched) as (host, link):
        host.hold = True
        msg = purchase(link)
        assert isinstance(await outcome(link, msg, 0.2), HostTimeout)
        await host.release()
        await eventually(lambda: len(late) == 1)
        assert f"unmatched/late host answer 0210 stan={msg.fields['11']} rc=00" in host_lines(caplog)
        # an expiry recycles nothing: only a write stuck past a deadline does
        again = purchase(link)
        host.hold = False
        assert (await link.request(again, 2.0)).message.fields["11"] == again.fields["11"]
        assert link.reconnects == 0 and host.connections == 1


class OtherClassHost(FakeHost):
    """Answers a 0200 with a 0410 carrying the request's STAN and terminal (a host bug, or a reversal
    answer of another exchange that reuses the number)."""

    def answer(self, request: Message, rc: str = "00") -> Message:
        answer = super().answer(request, rc)
        return Message("0410", answer.fields) if request.mti == "0200" else answer


async def test_an_answer_of_another_class_is_never_taken_for_the_requests_answer() -> None:
    metrics = Metrics(process_metrics=False)
    late: list[HostReply] = []

    async def on_unmatched(reply: HostReply) -> None:
        late.append(reply)

    async with open_link(metrics, on_unmatched, host=OtherClassHost()) as (_, link):
        msg = purchase(link)
        assert isinstance(await outcome(link, msg, 0.3), HostTimeout)  # outcome unknown: it gets reversed
        await eventually(lambda: len(late) == 1)
        assert late[0].message.mti == "0410" and counted(metrics, "late_host_answers") == 1


# --- connections that end ----------------------------------------------------------------------------------


async def test_a_connection_reset_by_the_host_is_logged_as_broken_and_the_link_comes_back(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.host")
    async with open_link(host=EndingHost()) as (_, link):
        assert isinstance(await outcome(link, purchase(link, EndingHost.RESET), 2.0), HostTimeout)
        await eventually(lambda: link.reconnects >= 1 and link.ready)
        [line] = host_lines(caplog, "retry in")
        assert re.match(r"host link to 127\.0\.0\.1:\d+ ended after sign-on: the connection broke \(\w+", line), line


class RefusingKeysHost(FakeHost):
    """Signs on anyone, refuses every zone-key request with 91."""

    def answer(self, request: Message, rc: str = "00") -> Message:
        return super().answer(request, "91" if request.fields.get("70") == "101" else rc)


async def test_a_refused_key_exchange_keeps_the_link_down_and_says_which_key(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.host")
    host = RefusingKeysHost()
    async with anyio.create_task_group() as tg:
        port = await tg.start(host.serve)
        config = HostConfig(address=Endpoint("127.0.0.1", port), key_exchange=True, timeout=1.0, echo_interval=60.0,
                            reconnect_min=0.05, reconnect_max=0.1)
        link = HostLink(config, SoftwareSecurityModule(), Metrics(process_metrics=False))
        await tg.start(link.run)
        await eventually(lambda: link.reconnects >= 2)
        assert not link.ready
        tg.cancel_scope.cancel()
    lines = host_lines(caplog, "retry in")
    assert lines and all("ended before sign-on: HostError: ZPK exchange refused with 91; retry in" in line
                         for line in lines), lines


async def test_the_reconnect_delay_is_jittered_within_half_to_all_of_the_back_off(
        caplog: pytest.LogCaptureFixture) -> None:
    """Full jitter over [1/2, 1] of the back-off step (0.2 s doubling, at most 30 s)."""
    caplog.set_level(logging.INFO, logger="gateway.host")
    await run_link_against(SlammingHost(), 3.0)
    delays = [float(RETRY.search(line).group(1)) for line in host_lines(caplog, "retry in")]  # type: ignore[union-attr]
    assert len(delays) >= 3
    for step, delay in enumerate(delays):
        backoff = min(0.2 * 2 ** step, 30.0)
        assert backoff / 2 - 0.005 <= delay <= backoff + 0.005, (step, delays)


# --- a bad MAC on a host approval -----------------------------------------------------------------------


async def test_a_host_approval_with_a_wrong_mac_is_counted_and_logged_with_its_stan(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.host")
    async with open_lab(tmp_path, terminals=1, host_timeout=1.0,
                        faults=[Fault("wrong_mac", pan=CARD_CUP.pan, mti=("0200",), limit=1)]) as lab:
        t = lab.terminal(auto_reverse=False)
        await t.connect()
        await t.sign_in()
        failures = lab.gateway.metrics.registry.get_sample_value
        assert (await t.purchase(1_000, CARD_CUP)).rc == "96"
        assert failures("gateway_mac_failures_total") == 1
        assert (await t.purchase(1_000, CARD_CUP)).approved  # a good MAC is not counted
        assert failures("gateway_mac_failures_total") == 1
        untrusted = min(await lab.gateway.store.list_transactions(), key=lambda r: r.txn_id)
        assert host_lines(caplog, "missing or bad MAC") == [
            f"host approval 0210 stan {untrusted.host_stan} has a missing or bad MAC"]


# --- TLS on the host link ---------------------------------------------------------------------------------


def tls_failures(metrics: Metrics, kind: str) -> float:
    return metrics.registry.get_sample_value("gateway_tls_failures_total", {"side": "host", "kind": kind}) or 0.0


@asynccontextmanager
async def tls_link(listen: Any, ca: Path, *, connect_timeout: float = 2.0, cert: Any = None,
                   server_name: str | None = None) -> AsyncIterator[HostLink]:
    """A link with TLS to a listener the test serves (`listen(task_status)` starts it, giving its port)."""
    async with anyio.create_task_group() as tg:
        port = await tg.start(listen)
        tls = TlsClientConfig(ca=ca, cert=cert.cert if cert else None, key=cert.key if cert else None,
                              server_name=server_name)
        config = HostConfig(address=Endpoint(LOOPBACK, port), key_exchange=False, timeout=1.0, echo_interval=60.0,
                            connect_timeout=connect_timeout, reconnect_min=0.05, reconnect_max=0.1, tls=tls)
        link = HostLink(config, SoftwareSecurityModule(), Metrics(process_metrics=False))
        await tg.start(link.run)
        yield link
        tg.cancel_scope.cancel()


def simulator(ctx: ssl.SSLContext) -> Any:
    host = HostSimulator()
    return functools.partial(host.serve, LOOPBACK, 0, ssl_context=ctx)


def tls_listener(serve: Any) -> Any:
    async def listen(*, task_status: anyio.abc.TaskStatus[int]) -> None:
        listener = await anyio.create_tcp_listener(local_host=LOOPBACK, local_port=0)
        async with listener:
            task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
            await listener.serve(serve)

    return listen


async def test_the_link_signs_on_over_mtls_with_the_configured_server_name(tmp_path: Path) -> None:
    ca = Authority(tmp_path, "acquirer")
    host, client = ca.issue("host", server=True), ca.issue("gateway-client", server=False)
    ctx = server_context(TlsServerConfig(cert=host.cert, key=host.key, ca=ca.ca, client_certs="required"), "t")
    async with tls_link(simulator(ctx), ca.ca, cert=client, server_name="localhost") as link:
        await eventually(lambda: link.ready)
        answer = await link.request(iso87.echo(*link.allocate(), "00000001234"), 1.0)
        assert answer.message.fields["39"] == "00"
        assert link.reconnects == 0
        assert link.metrics.registry.get_sample_value("gateway_tls_failures_total") is None


async def test_a_host_certificate_of_another_ca_is_counted_each_time_and_the_link_keeps_trying(
        tmp_path: Path) -> None:
    ca, rogue = Authority(tmp_path, "acquirer"), Authority(tmp_path, "rogue")
    host = rogue.issue("host", server=True)
    ctx = server_context(TlsServerConfig(cert=host.cert, key=host.key, ca=None, client_certs="none"), "t")
    async with tls_link(simulator(ctx), ca.ca) as link:
        await eventually(lambda: link.reconnects >= 3)
        assert not link.ready
        assert tls_failures(link.metrics, "bad_certificate") >= 3
        assert tls_failures(link.metrics, "bad_certificate") >= link.reconnects


async def test_a_tls_handshake_that_never_completes_is_counted_as_a_host_timeout(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.host")
    ca = Authority(tmp_path, "acquirer")

    async def silent(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await anyio.sleep_forever()

    async with tls_link(tls_listener(silent), ca.ca, connect_timeout=0.2) as link:
        await eventually(lambda: link.reconnects >= 2)
        assert tls_failures(link.metrics, "timeout") >= 2
    lines = host_lines(caplog, "retry in")
    assert lines and all(re.search(r"TLS handshake with host 127\.0\.0\.1:\d+ not complete within 0\.2s", line)
                         for line in lines), lines


class NeverConnects(HostLink):
    """A plain TCP link whose connect never completes (a host behind a firewall that drops SYNs)."""

    async def _connect(self) -> anyio.abc.ByteStream:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


async def test_a_plain_connect_that_never_completes_is_unreachable_not_a_tls_failure(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.host")
    config = HostConfig(address=Endpoint(LOOPBACK, 9), key_exchange=False, connect_timeout=0.1,
                        reconnect_min=0.05, reconnect_max=0.1)
    link = NeverConnects(config, SoftwareSecurityModule(), Metrics(process_metrics=False))
    async with anyio.create_task_group() as tg:
        await tg.start(link.run)
        await eventually(lambda: link.reconnects >= 2)
        tg.cancel_scope.cancel()
    assert link.metrics.registry.get_sample_value("gateway_tls_failures_total") is None
    lines = host_lines(caplog, "retry in")
    assert lines and all("host 127.0.0.1:9 unreachable: TimeoutError" in line for line in lines), lines


async def test_a_host_that_closes_the_tls_session_before_anything_is_counted_and_said(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """What a TLS 1.3 host that refuses our (missing) client certificate does: the handshake completes on
    our side, then the host just closes."""
    caplog.set_level(logging.INFO, logger="gateway.host")
    ca = Authority(tmp_path, "acquirer")
    host = ca.issue("host", server=True)
    ctx = server_context(TlsServerConfig(cert=host.cert, key=host.key, ca=ca.ca, client_certs="required"), "t")
    async with tls_link(simulator(ctx), ca.ca) as link:
        await eventually(lambda: link.reconnects >= 2)
        assert not link.ready
        assert tls_failures(link.metrics, "closed") >= 2
    lines = host_lines(caplog, "retry in")
    assert lines and all("the host closed the TLS session before sending anything" in line for line in lines)


async def test_a_tls_record_the_link_cannot_read_is_counted_by_kind(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.host")
    ca = Authority(tmp_path, "acquirer")
    pem = ca.issue("host", server=True)
    ctx = server_context(TlsServerConfig(cert=pem.cert, key=pem.key, ca=None, client_certs="none"), "t")

    async def junk_after_handshake(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await TLSStream.wrap(stream, server_side=True, ssl_context=ctx, standard_compatible=False)
            await stream.send(b"\x17\x05\x05\x00\x10" + b"x" * 16)  # a record of no TLS version
            await anyio.sleep(1.0)

    async with tls_link(tls_listener(junk_after_handshake), ca.ca) as link:
        await eventually(lambda: link.reconnects >= 1)
        assert tls_failures(link.metrics, "protocol") >= 1
    [line, *_] = host_lines(caplog, "retry in")
    assert "ended before sign-on: TLS failure (SSLError: [SSL: WRONG_VERSION_NUMBER]" in line, line


class TlsBreaksStream(ForwardingStream):
    """A read failing as anyio's TLS stream fails one when the TLS layer breaks under it (a syscall
    error inside OpenSSL): BrokenResourceError caused by the SSLError. The first read (the sign-on's
    answer) goes through."""

    reads = 0

    async def receive(self, max_bytes: int = 65536) -> bytes:
        data = await self.inner.receive(max_bytes)
        self.reads += 1
        if self.reads > 1:
            failure = ssl.SSLError(1, "[SSL: SSLV3_ALERT_BAD_CERTIFICATE] sslv3 alert bad certificate")
            failure.reason = "SSLV3_ALERT_BAD_CERTIFICATE"
            raise anyio.BrokenResourceError from failure
        return data


class TlsBreaksLink(HostLink):
    async def _connect(self) -> anyio.abc.ByteStream:
        return TlsBreaksStream(await super()._connect())


async def test_a_broken_read_caused_by_tls_is_a_tls_failure(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.host")
    host = FakeHost()
    async with anyio.create_task_group() as tg:
        port = await tg.start(host.serve)
        config = HostConfig(address=Endpoint("127.0.0.1", port), key_exchange=False, timeout=1.0, echo_interval=60.0,
                            reconnect_min=0.05, reconnect_max=0.1)
        link = TlsBreaksLink(config, SoftwareSecurityModule(), Metrics(process_metrics=False))
        await tg.start(link.run)
        await eventually(lambda: link.ready)
        await host.send(iso87.echo("777777", "0101120000", "00000001234"))  # the second read breaks
        await eventually(lambda: link.reconnects >= 1)
        tg.cancel_scope.cancel()
    assert tls_failures(link.metrics, "bad_certificate") == 1
    [line, *_] = host_lines(caplog, "retry in")
    assert "ended after sign-on: TLS failure (SSLError: " in line and "bad certificate" in line, line


# --- late answers in a storm ----------------------------------------------------------------------------


async def test_late_answers_a_second_apart_each_get_their_line(caplog: pytest.LogCaptureFixture) -> None:
    """A storm of late answers is one line a second with a count; answers a second apart are each in
    full (the operator sees them as they come, not every two seconds)."""
    caplog.set_level(logging.INFO, logger="gateway.host")

    async def on_unmatched(reply: HostReply) -> None:
        return None

    async with open_link(on_unmatched=on_unmatched) as (host, _):
        for stan in ("700001", "700002"):
            stray = Message("0210", {"3": "000000", "4": "000000001000", "7": "0101120000", "11": stan,
                                     "32": "00000001234", "39": "05", "41": "10000001"})
            await host.send(stray)

            def logged(stan: str = stan) -> bool:
                return any(f"stan={stan}" in line for line in host_lines(caplog))

            await eventually(logged, 3.0)
            await anyio.sleep(1.1)  # longer than the storm log's one second


async def test_a_late_answer_dropped_from_a_full_backlog_is_counted_and_logged() -> None:
    from gateway.net.host_link import _LateAnswers

    metrics = Metrics(process_metrics=False)
    link = HostLink(HostConfig(key_exchange=False), SoftwareSecurityModule(), metrics)
    link._late_answers = _LateAnswers(1)  # a full backlog, without a storm of a thousand answers
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logging.getLogger("gateway.host").addHandler(handler)
    try:
        link._queue_late_answer(HostReply(Message("0210", {"11": "000001", "39": "05"}), True))
        link._queue_late_answer(HostReply(Message("0210", {"11": "000002", "39": "05"}), True))
    finally:
        logging.getLogger("gateway.host").removeHandler(handler)
    assert counted(metrics, "late_host_answers_dropped") == 1
    assert [r.getMessage() for r in records] == [
        "late-answer backlog full (1 waiting for the journal): dropped host answer 0210 stan 000002 rc 05 unjournalled"]


# --- a request in the moment a connection is being closed -------------------------------------------------


class SlowCloseStream(ForwardingStream):
    """Its close waits at a gate: the moment between the end of a connection and the link's state
    saying so, held open for the test."""

    def __init__(self, inner: anyio.abc.ByteStream) -> None:
        super().__init__(inner)
        self.closing = anyio.Event()
        self.gate = anyio.Event()

    async def aclose(self) -> None:
        self.closing.set()
        with anyio.CancelScope(shield=True):
            await self.gate.wait()
        await self.inner.aclose()


class SlowCloseLink(HostLink):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.streams: list[SlowCloseStream] = []

    async def _connect(self) -> anyio.abc.ByteStream:
        stream = SlowCloseStream(await super()._connect())
        if self.streams:
            stream.gate.set()  # only the first connection's close is held
        self.streams.append(stream)
        return stream


async def test_a_request_while_the_connection_is_being_closed_is_not_sent_and_says_the_link_is_down() -> None:
    host = EndingHost()
    async with anyio.create_task_group() as tg:
        port = await tg.start(host.serve)
        config = HostConfig(address=Endpoint("127.0.0.1", port), key_exchange=False, timeout=2.0, echo_interval=60.0,
                            reconnect_min=0.05, reconnect_max=0.1)
        link = SlowCloseLink(config, SoftwareSecurityModule(), Metrics(process_metrics=False))
        await tg.start(link.run)
        with anyio.fail_after(5):
            await link.wait_signed_on()
        wire = link.streams[0]
        tg.start_soon(outcome, link, purchase(link, EndingHost.CLOSE), 2.0)  # the host hangs up on it
        try:
            with anyio.fail_after(5):
                await wire.closing.wait()
            assert link.ready  # the state does not say so yet...
            with pytest.raises(HostUnavailable) as down:  # ...but nothing is queued on a connection that is gone
                await link.request(purchase(link), 1.0)
            assert str(down.value) == "host link is down"
        finally:
            wire.gate.set()  # a failing check must fail the test, not leave the close hanging
        await eventually(lambda: link.reconnects >= 1 and link.ready)
        assert [m.fields["4"] for m in host.received if m.mti == "0200"] == []
        tg.cancel_scope.cancel()


async def test_a_request_abandoned_by_its_caller_is_no_host_timeout_when_its_deadline_passes() -> None:
    """A caller cancelled from outside (its terminal went away, a shutdown) settles its request at once:
    when the request's deadline comes later, nothing counts it as a host timeout or traces one."""
    metrics = Metrics(process_metrics=False)
    tap = RecordingTap()
    async with open_link(metrics) as (host, link):
        link.tap = tap
        host.hold = True
        with anyio.move_on_after(0.1):
            await link.request(purchase(link), 0.4)  # written, then abandoned before its answer
        await anyio.sleep(0.6)  # past its deadline
        assert counted(metrics, "host_timeouts") == 0
        assert tap.of("event") == []
        assert link.ready and link._pending == {}
