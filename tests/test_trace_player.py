"""The terminal player against a scripted SUT on loopback: which answers count as a match-key mismatch.

An answer that pairs with no waiting request is kept; when a later request gets no answer, the kept
answer that resembles it is reported as its answer with a wrong match key. A second (or late) answer
to another request the player sent is not that: blaming it on the request that timed out hides the
duplicate and turns a timeout into a match-key finding that names the wrong message."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest

from gateway.iso.codec import Codec
from gateway.iso.framing import make_framer
from gateway.iso.message import Message
from gateway.iso.spec import load_dialect
from gateway.lab import LOOPBACK, MERCHANT_ID
from gateway.security.algorithms import generate_key
from gateway.sim.keyfile import LabKeys, LabTerminal
from gateway.trace.player import TerminalPlayer, WorkingKeys
from tests.trace_support import endpoint

pytestmark = pytest.mark.anyio

TID = "10000001"

#: the SUT's answers to one request, sent at once in order (none: it stays silent)
Script = Callable[[Message], list[Message]]


@asynccontextmanager
async def scripted_sut(script: Script) -> AsyncIterator[int]:
    """A terminal-side SUT that answers each request with what `script` says (in order, at once)."""
    codec = Codec(load_dialect("cup-pos"))
    framer = make_framer("cup")

    async def handle(stream: anyio.abc.SocketStream) -> None:
        decoder = framer.decoder()
        async with stream:
            try:
                async for chunk in stream:
                    for frame in decoder.feed(chunk):
                        for answer in script(codec.decode(frame.body)):
                            await stream.send(framer.encode(codec.encode(answer), frame.envelope))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass

    listener = await anyio.create_tcp_listener(local_host=LOOPBACK, local_port=0)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield listener.extra(anyio.abc.SocketAttribute.local_port)
        tg.cancel_scope.cancel()


def answer_to(request: Message, **changes: str) -> Message:
    fields = {k: request.fields[k] for k in ("3", "4", "11", "25", "41", "42") if k in request.fields}
    fields["39"] = "00"
    fields.update(changes)
    return Message(request.mti[:2] + "10", fields)


def request(stan: str) -> dict[str, str]:
    return {"3": "000000", "4": "000000001000", "11": stan, "22": "022", "25": "00", "41": TID,
            "42": MERCHANT_ID, "49": "156"}


@asynccontextmanager
async def player_for(port: int) -> AsyncIterator[TerminalPlayer]:
    lab = LabKeys(generate_key(16), (LabTerminal(TID, MERCHANT_ID, generate_key(16)),))
    player = TerminalPlayer("T1", endpoint(port), keys=WorkingKeys(), lab=lab, pin="")
    async with anyio.create_task_group() as tg:
        await tg.start(player.run)
        try:
            yield player
        finally:
            await player.close()
            tg.cancel_scope.cancel()


async def test_a_second_answer_to_an_earlier_request_is_not_a_later_requests_wrong_match_key() -> None:
    def script(req: Message) -> list[Message]:
        if req.fields["11"] == "000001":
            return [answer_to(req), answer_to(req, **{"39": "05"})]  # answered twice
        return []  # the second request is never answered: a timeout

    async with scripted_sut(script) as port, player_for(port) as player:
        first = player.prepare("0200", request("000001"), {}, None)
        assert await player.exchange(first, 2.0) is not None
        with anyio.fail_after(5):
            while not player.unpaired:  # the duplicate came and paired with nothing
                await anyio.sleep(0.01)
        second = player.prepare("0200", request("000002"), {}, None)
        assert await player.exchange(second, 0.3) is None
        assert player.take_unpaired(second.message) is None  # a timeout, not stan 000001's duplicate
        [kept] = player.unpaired  # left for the first request's second-answer check
        assert (kept.message.fields["11"], kept.message.fields["39"]) == ("000001", "05")


async def test_an_answer_with_a_wrong_stan_is_still_taken_as_the_requests_mismatch() -> None:
    def script(req: Message) -> list[Message]:
        return [answer_to(req, **{"11": f"{int(req.fields['11']) + 1:06d}"})]

    async with scripted_sut(script) as port, player_for(port) as player:
        sent = player.prepare("0200", request("000007"), {}, None)
        assert await player.exchange(sent, 0.5) is None
        got = player.take_unpaired(sent.message)
        assert got is not None and got.message.fields["11"] == "000008"
        assert not player.unpaired


async def test_an_answer_that_came_before_the_request_was_sent_is_not_its_answer() -> None:
    def script(req: Message) -> list[Message]:
        if req.fields["11"] == "000001":
            return [answer_to(req), answer_to(req, **{"11": "000099"})]  # its answer, then a stray one
        return []

    async with scripted_sut(script) as port, player_for(port) as player:
        first = player.prepare("0200", request("000001"), {}, None)
        assert await player.exchange(first, 2.0) is not None
        with anyio.fail_after(5):
            while not player.unpaired:
                await anyio.sleep(0.01)
        second = player.prepare("0200", request("000002"), {}, None)
        assert await player.exchange(second, 0.3) is None
        assert player.take_unpaired(second.message) is None  # the stray came before 000002 was sent
