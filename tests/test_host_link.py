"""The host link against the host simulator: idle echo tests, a dead host recycled, answers out of
order matched by the configured key, sign-on and key exchange on every connect. Then the link alone
against a bare loopback host: one writer per connection (queued frames share a write), deadlines
("not sent" while still queued, "outcome unknown" once taken), stalled and failed writes, late answers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from stream_support import ForwardingStream

from gateway.config import Endpoint, HostConfig
from gateway.iso.build import iso87
from gateway.iso.build.common import TerminalIdent
from gateway.iso.codec import Codec
from gateway.iso.framing import make_framer
from gateway.iso.message import Message
from gateway.iso.mti import is_request, response_mti
from gateway.iso.spec import load_dialect
from gateway.lab import CARD_CUP, CARD_VISA, open_lab
from gateway.metrics import NO_RESPONSE_CODE, Metrics
from gateway.net.host_link import (
    HostError,
    HostLink,
    HostNotSent,
    HostReply,
    HostTimeout,
    UnmatchedHandler,
)
from gateway.security.module import SoftwareSecurityModule
from gateway.sim.host_rules import Fault

pytestmark = pytest.mark.anyio


async def test_echo_tests_on_idle_from_the_gateway_side(tmp_path: Path) -> None:
    async with open_lab(tmp_path, host_options={"echo_interval": 0.2}) as lab:
        await anyio.sleep(1.0)
        stats = lab.host.stats
        echoes = stats.messages["0800"] - stats.sign_ons - stats.key_exchanges
        assert echoes >= 2
        assert lab.gateway.link.ready


async def test_unanswered_echo_recycles_the_connection(tmp_path: Path) -> None:
    # 0800 number 4 on the first connection is the first echo (sign-on, ZPK, ZAK come first)
    async with open_lab(tmp_path, host_timeout=0.3, host_options={"echo_interval": 0.2},
                        faults=[Fault("drop", mti=("0800",), nth=4)]) as lab:
        with anyio.fail_after(5):
            while lab.host.stats.sign_ons < 2:
                await anyio.sleep(0.05)
            await lab.gateway.link.wait_signed_on()
        assert lab.host.stats.key_exchanges >= 4  # fresh zone keys on the new connection too
        t = lab.terminal()
        await t.connect()
        await t.sign_in()
        assert (await t.purchase(1_000, CARD_CUP)).approved


@pytest.mark.parametrize("match_key", [("mti_class", "stan", "terminal"), ("mti_class", "stan")])
async def test_answers_out_of_order_reach_their_requests(tmp_path: Path, match_key: tuple[str, ...]) -> None:
    async with open_lab(tmp_path, host_options={"match_key": match_key},
                        faults=[Fault("delay", seconds=0.5, pan=CARD_CUP.pan, mti=("0200",))]) as lab:
        t = lab.terminal()
        await t.connect()
        await t.sign_in()
        finished: list[str] = []

        async def buy(card: object, amount: int) -> None:
            result = await t.purchase(amount, card)  # type: ignore[arg-type]
            assert result.approved and result.amount == amount
            finished.append(card.pan)  # type: ignore[attr-defined]

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(buy, CARD_CUP, 1_111)
                await anyio.sleep(0.05)
                tg.start_soon(buy, CARD_VISA, 2_222)
        assert finished == [CARD_VISA.pan, CARD_CUP.pan]  # the slow one was answered last


# --- the link's own guarantees, against a bare loopback host -------------------------------------------
#
# These drive a HostLink directly. `GatedLink` wraps each connection's stream so a test can hold the
# writer inside `send` (what a host that stops reading does once the kernel buffers are full), make a
# write fail, and count the writes.

PAN = "6222021234567890123"


class FakeHost:
    """A loopback host that signs on anyone and answers 0200s at once, or holds the answers until
    `release`; it records every message it received, in order."""

    def __init__(self) -> None:
        self.codec = Codec(load_dialect("iso87-ascii"))
        self.framer = make_framer("len2", 8192)
        self.received: list[Message] = []
        self.answers_to_us: list[Message] = []  # answers to requests the host sent (its echo tests)
        self.connections = 0
        self.hold = False
        self.held: list[Message] = []
        self.refuse_sign_ons = 0
        self._stream: anyio.abc.ByteStream | None = None

    async def serve(self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        async with listener:
            task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
            await listener.serve(self._connection)

    async def _connection(self, stream: anyio.abc.ByteStream) -> None:
        self.connections += 1
        self._stream = stream
        decoder = self.framer.decoder()
        async with stream:
            async for chunk in stream:
                for frame in decoder.feed(chunk):
                    msg = self.codec.decode(frame.body)
                    if not is_request(msg.mti):
                        self.answers_to_us.append(msg)
                        continue
                    self.received.append(msg)
                    rc = "00"
                    if msg.fields.get("70") == "001" and self.refuse_sign_ons > 0:
                        self.refuse_sign_ons -= 1
                        rc = "91"
                    answer = self.answer(msg, rc)
                    if self.hold and msg.mti == "0200":
                        self.held.append(answer)
                    else:
                        await self.send(answer)

    def answer(self, request: Message, rc: str = "00") -> Message:
        keep = ("3", "4", "7", "11", "32", "41", "42", "70")
        fields = {k: v for k, v in request.fields.items() if k in keep}
        fields["39"] = rc
        return Message(response_mti(request.mti), fields)

    async def send(self, msg: Message) -> None:
        assert self._stream is not None
        await self._stream.send(self.framer.encode(self.codec.encode(msg)))

    async def release(self) -> None:
        held, self.held = self.held, []
        for answer in held:
            await self.send(answer)

    def stans(self, mti: str = "0200") -> list[str]:
        return [m.fields["11"] for m in self.received if m.mti == mti]


class GatedStream(ForwardingStream):
    """A real loopback stream whose writes a test can hold at a gate, fail, and count."""

    def __init__(self, inner: anyio.abc.ByteStream) -> None:
        super().__init__(inner)
        self.writes: list[bytes] = []
        self.gate: anyio.Event | None = None
        self.stuck = anyio.Event()
        self.fail_next = False

    def stall(self) -> None:
        self.gate, self.stuck = anyio.Event(), anyio.Event()

    def release(self) -> None:
        assert self.gate is not None
        self.gate.set()
        self.gate = None

    async def send(self, item: bytes) -> None:
        self.writes.append(item)
        gate = self.gate
        if gate is not None:
            self.stuck.set()
            await gate.wait()
        if self.fail_next:
            raise anyio.BrokenResourceError
        await self.inner.send(item)


class GatedLink(HostLink):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.streams: list[GatedStream] = []

    async def _connect(self) -> anyio.abc.ByteStream:
        stream = GatedStream(await super()._connect())
        self.streams.append(stream)
        return stream

    @property
    def wire(self) -> GatedStream:
        return self.streams[-1]


@asynccontextmanager
async def open_link(metrics: Metrics | None = None, on_unmatched: UnmatchedHandler | None = None,
                    host: FakeHost | None = None, **options: Any) -> AsyncIterator[tuple[FakeHost, GatedLink]]:
    host = host or FakeHost()
    async with anyio.create_task_group() as tg:
        port = await tg.start(host.serve)
        settings: dict[str, Any] = {"key_exchange": False, "timeout": 2.0, "echo_interval": 60.0,
                                    "reconnect_min": 0.05, "reconnect_max": 0.2, **options}
        config = HostConfig(address=Endpoint("127.0.0.1", port), **settings)
        link = GatedLink(config, SoftwareSecurityModule(), metrics or Metrics(process_metrics=False), on_unmatched)
        await tg.start(link.run)
        with anyio.fail_after(5):
            await link.wait_signed_on()
        yield host, link
        tg.cancel_scope.cancel()


def purchase(link: HostLink, amount: int = 1_000) -> Message:
    msg = iso87.purchase(TerminalIdent("10000001", "898100012340001"), "000001", "0101120000",
                         "00000001234", amount, pan=PAN)
    del msg.fields["64"]  # no zone keys in these tests: nothing to MAC
    return link.stamp(msg)


async def eventually(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    with anyio.fail_after(seconds):
        while not predicate():
            await anyio.sleep(0.01)


def counted(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(f"gateway_{name}_total", labels) or 0.0


async def outcome(link: HostLink, msg: Message, timeout: float) -> HostReply | HostError:
    try:
        return await link.request(msg, timeout)
    except HostError as exc:
        return exc


@pytest.mark.parametrize("how", ["expires", "is_cancelled"])
async def test_a_request_still_queued_behind_a_stalled_write_is_withdrawn(how: str) -> None:
    async with open_link() as (host, link):
        link.wire.stall()
        first, second = purchase(link), purchase(link)
        results: dict[str, HostReply | HostError] = {}

        async def ask(name: str, msg: Message, timeout: float) -> None:
            results[name] = await outcome(link, msg, timeout)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, "first", first, 5.0)
            with anyio.fail_after(2):
                await link.wire.stuck.wait()  # the writer took `first` and is stuck writing it
            if how == "expires":
                with anyio.fail_after(2):
                    results["second"] = await outcome(link, second, 0.2)
                assert isinstance(results["second"], HostNotSent)
            else:
                with anyio.move_on_after(0.2):
                    await link.request(second, 5.0)  # cancelled from outside while its frame is queued
            link.wire.release()
        reply = results["first"]
        assert isinstance(reply, HostReply) and reply.message.fields["39"] == "00"
        # everything queued before a later request is written before it, so once its answer is back a
        # withdrawn frame would have reached the host, had it been written
        third = purchase(link)
        assert (await link.request(third, 2.0)).message.fields["11"] == third.fields["11"]
        assert host.stans() == [first.fields["11"], third.fields["11"]]
        assert link.ready and link.reconnects == 0


async def test_a_request_taken_by_a_stalled_writer_times_out_and_the_connection_is_recycled() -> None:
    metrics = Metrics(process_metrics=False)
    async with open_link(metrics) as (host, link):
        link.wire.stall()
        taken, queued = purchase(link), purchase(link)
        results: dict[str, HostReply | HostError] = {}

        async def ask(name: str, msg: Message, timeout: float) -> None:
            results[name] = await outcome(link, msg, timeout)

        with anyio.fail_after(2):  # well before the queued request's own 5 s
            async with anyio.create_task_group() as tg:
                tg.start_soon(ask, "taken", taken, 0.3)
                await link.wire.stuck.wait()
                tg.start_soon(ask, "queued", queued, 5.0)
        # the taken frame may be partly on the wire: outcome unknown, and the stream cannot be trusted
        assert isinstance(results["taken"], HostTimeout)
        # the queued frame never reached a write: certainly not sent
        assert isinstance(results["queued"], HostNotSent)
        assert counted(metrics, "host_timeouts") == 1
        await eventually(lambda: link.reconnects >= 1)
        with anyio.fail_after(5):
            await link.wait_signed_on()
        assert host.connections == 2
        again = purchase(link)
        assert (await link.request(again, 2.0)).message.fields["39"] == "00"
        assert host.stans() == [again.fields["11"]]


async def test_a_failed_write_recycles_the_connection() -> None:
    async with open_link() as (host, link):
        wire = link.wire
        wire.stall()
        sent, queued = purchase(link), purchase(link)
        results: dict[str, HostReply | HostError] = {}

        async def ask(name: str, msg: Message) -> None:
            results[name] = await outcome(link, msg, 5.0)

        with anyio.fail_after(2):
            async with anyio.create_task_group() as tg:
                tg.start_soon(ask, "sent", sent)
                await wire.stuck.wait()
                tg.start_soon(ask, "queued", queued)
                await eventually(lambda: len(link._pending) == 2)
                wire.fail_next = True
                wire.release()
        assert isinstance(results["sent"], HostTimeout)
        assert isinstance(results["queued"], HostNotSent)
        await eventually(lambda: link.reconnects >= 1 and link.ready)
        assert host.connections == 2 and host.stans() == []


async def test_everything_queued_goes_out_in_one_write() -> None:
    metrics = Metrics(process_metrics=False)
    async with open_link(metrics) as (host, link):
        wire = link.wire
        wire.stall()
        writes_before = len(wire.writes)
        msgs = [purchase(link, 1_000 + i) for i in range(64)]
        replies: list[HostReply] = []

        async def ask(msg: Message) -> None:
            replies.append(await link.request(msg, 5.0))

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(ask, msgs[0])
                await wire.stuck.wait()
                for msg in msgs[1:]:
                    tg.start_soon(ask, msg)
                await eventually(lambda: len(link._pending) == 64)
                wire.release()
        assert len(wire.writes) - writes_before == 2  # the stuck one, then the other 63 together
        stans = host.stans()
        assert stans[0] == msgs[0].fields["11"] and sorted(stans) == sorted(m.fields["11"] for m in msgs)
        assert sorted(r.message.fields["11"] for r in replies) == sorted(m.fields["11"] for m in msgs)
        assert counted(metrics, "messages", direction="host_out", mti="0200", rc=NO_RESPONSE_CODE) == 64


async def test_many_concurrent_requests_share_few_writes() -> None:
    async with open_link() as (_, link):
        writes_before = len(link.wire.writes)
        msgs = [purchase(link, 1_000 + i) for i in range(64)]
        replies: dict[str, str] = {}

        async def ask(msg: Message) -> None:
            reply = await link.request(msg, 5.0)
            replies[msg.fields["11"]] = reply.message.fields["4"]

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for msg in msgs:
                    tg.start_soon(ask, msg)
        assert replies == {m.fields["11"]: m.fields["4"] for m in msgs}  # each answer reached its request
        assert len(link.wire.writes) - writes_before <= 8


async def test_a_late_answer_is_unmatched_and_journalled() -> None:
    metrics = Metrics(process_metrics=False)
    late: list[Message] = []

    async def on_unmatched(reply: HostReply) -> None:
        assert reply.mac_ok  # no MAC on this link: nothing to fail
        late.append(reply.message)

    async with open_link(metrics, on_unmatched) as (host, link):
        host.hold = True
        msg = purchase(link)
        with anyio.fail_after(2), pytest.raises(HostTimeout):
            await link.request(msg, 0.2)
        assert counted(metrics, "host_timeouts") == 1
        await host.release()
        await eventually(lambda: len(late) == 1)
        assert late[0].fields["11"] == msg.fields["11"]
        assert counted(metrics, "late_host_answers") == 1
        assert link.ready  # a late answer does not disturb the link


async def test_a_shorter_deadline_than_any_pending_one_still_expires_on_time() -> None:
    async with open_link(timeout=0.3) as (host, link):
        await anyio.sleep(0.4)  # the sign-on's deadline has passed: the expiry task sleeps with none left
        host.hold = True
        async with anyio.create_task_group() as tg:
            tg.start_soon(outcome, link, purchase(link), 10.0)  # the expiry task now sleeps for 10 s
            await eventually(lambda: len(host.held) == 1)
            started = anyio.current_time()
            with anyio.fail_after(2), pytest.raises(HostTimeout):
                await link.request(purchase(link), 0.2)
            assert anyio.current_time() - started < 1.0
            tg.cancel_scope.cancel()


async def test_the_hosts_own_echo_test_is_answered() -> None:
    async with open_link() as (host, link):
        await host.send(iso87.echo("777777", "0101120000", "00000001234"))
        await eventually(lambda: len(host.answers_to_us) == 1)
        answer = host.answers_to_us[0]
        assert (answer.mti, answer.fields["11"], answer.fields["39"]) == ("0810", "777777", "00")
        assert link.ready


async def test_a_waiter_for_sign_on_survives_a_refused_first_sign_on() -> None:
    host = FakeHost()
    host.refuse_sign_ons = 1
    async with open_link(host=host) as (_, link):  # open_link itself waits for the sign-on
        assert link.reconnects >= 1 and host.connections == 2
