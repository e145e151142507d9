"""The trace host: the far end of the SUT's host link during `trace replay`.

It answers every upstream request of the SUT from the recorded host leg: the recorded answer (with the
fields the recorded host echoed taken from this run's request, since the SUT allocates its own STANs
and times), after the recorded delay, or never when the recording has none (so a recorded timeout is
a replayed timeout and the SUT's own reversal follows). Sign-on, key exchange (ZPK/ZAK under the ZMK)
and echo tests it answers itself, with the host simulator's pieces; it can also send the SUT a
request the recorded host sent (a host-initiated 0800).

Pairing (`ExpectationBook`, sans-I/O): a financial request pairs with the registered expectation of
the same terminal, MTI class, processing code, amount and card, else with the oldest one of the same
terminal and MTI class (then the field comparison names what differs); a reversal pairs through its
field 90, whose original STAN is mapped from this run's STAN to the recorded one. What pairs with
nothing is reported as unexpected and answered 96 (a reversal: 25, so the SUT stops repeating it).
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import anyio
import anyio.abc

from gateway.iso.build import response
from gateway.iso.codec import Codec
from gateway.iso.errors import IsoError
from gateway.iso.framing import make_framer
from gateway.iso.message import Message
from gateway.iso.mti import is_request, match_class
from gateway.iso.spec import load_dialect
from gateway.security.algorithms import decrypt_pin_block
from gateway.security.errors import SecurityError
from gateway.sim.host import HostSimConfig, HostSimulator
from gateway.sim.host_rules import pan_of
from gateway.trace.cases import Exchange
from gateway.trace.pace import Pace

log = logging.getLogger("gateway.trace.host")

#: answers to requests the recording does not explain
UNEXPECTED_RC: Final = "96"
UNEXPECTED_REVERSAL_RC: Final = "25"
#: how long requests that pair alike wait for each other before they are decided in STAN order
ALIKE_WAIT: Final = 0.2
#: how long after the sign-on the trace host waits for a key exchange before it calls the SUT ready
KEY_EXCHANGE_WAIT: Final = 1.0
_STAN_MAP_LIMIT: Final = 20_000


class Owner(Protocol):
    """The live case an expectation belongs to."""

    terminal: str

    def on_upstream(self, expectation: Expectation, msg: Message, verified: dict[str, str]) -> None: ...


#: a pairing index: key → expectations, oldest first
_Index = dict[Any, "deque[Expectation]"]


@dataclass(slots=True)
class HostAnswer:
    """A template's host answer: fields on top of the response builder's echo (None: silent)."""

    fields: Mapping[str, str] | None
    delay: float = 0.0


@dataclass(slots=True, eq=False)
class Expectation:
    owner: Owner
    exchange: Exchange | None  #: recorded (None: a template case's upstream request)
    template_answer: HostAnswer | None = None
    pin: str | None = None  #: the PIN its PIN block must hold
    observed: Message | None = None
    open: bool = True
    #: where the book indexes it (so a closed expectation leaves the book at once)
    indexed: list[tuple[_Index, Hashable]] = field(default_factory=list, repr=False)
    seen: anyio.Event = field(default_factory=anyio.Event)  #: the SUT sent the request
    answered: anyio.Event = field(default_factory=anyio.Event)  #: the answer went out (or never will)

    @property
    def silent(self) -> bool:
        if self.exchange is not None:
            return self.exchange.answer is None
        return self.template_answer is None or self.template_answer.fields is None


def _exact_key(fields: Mapping[str, str], mti: str) -> tuple[str, ...]:
    return (fields.get("41", ""), match_class(mti), fields.get("3", "")[:2], fields.get("4", ""),
            pan_of(Message(mti, dict(fields))) or "")


class ExpectationBook:
    """The expectations of the cases in flight, and how the SUT's requests pair with them."""

    def __init__(self) -> None:
        self._exact: _Index = {}
        self._loose: _Index = {}
        self._by_original: _Index = {}
        self._templates: _Index = {}
        #: this run's host STAN → the recorded one, learnt as financial requests pair
        self._stans: OrderedDict[str, str] = OrderedDict()

    def add(self, exp: Expectation) -> None:
        if exp.exchange is None:
            self._put(self._templates, exp.owner.terminal, exp)
            return
        rec = exp.exchange.request
        if rec.mti[1] == "4":
            f90 = rec.fields.get("90", "")
            if len(f90) >= 10:
                self._put(self._by_original, f90[4:10], exp)
        self._put(self._exact, _exact_key(rec.fields, rec.mti), exp)
        self._put(self._loose, (rec.fields.get("41", ""), match_class(rec.mti)), exp)

    @staticmethod
    def _put(table: _Index, key: Hashable, exp: Expectation) -> None:
        table.setdefault(key, deque()).append(exp)
        exp.indexed.append((table, key))

    def discard(self, exp: Expectation) -> None:
        """Close an expectation (its case is over) and take it out of the book: the book holds what is
        in flight, however long the run."""
        exp.open = False
        for table, key in exp.indexed:
            queue = table.get(key)
            if queue is not None:
                with contextlib.suppress(ValueError):  # matched and popped already
                    queue.remove(exp)
                if not queue:
                    del table[key]
        exp.indexed.clear()

    def alike(self, msg: Message) -> int:
        """How many open expectations a financial request pairs with equally well (same terminal, MTI
        class, processing code, amount and card): more than one, and the order decides."""
        if msg.mti[1] == "4":
            return 0
        queue = self._exact.get(_exact_key(msg.fields, msg.mti))
        return sum(1 for e in queue if e.open) if queue else 0

    @staticmethod
    def _first(table: _Index, key: Hashable) -> Expectation | None:
        queue = table.get(key)
        while queue:
            if queue[0].open:
                return queue[0]
            queue.popleft()
        return None

    def match(self, msg: Message) -> Expectation | None:
        fields = msg.fields
        tid = fields.get("41", "")
        found: Expectation | None = None
        if msg.mti[1] == "4":
            f90 = fields.get("90", "")
            recorded = self._stans.get(f90[4:10]) if len(f90) >= 10 else None
            if recorded is not None:
                found = self._first(self._by_original, recorded)
        if found is None:
            found = self._first(self._exact, _exact_key(fields, msg.mti))
        if found is None:
            found = self._first(self._loose, (tid, match_class(msg.mti)))
        if found is None:
            found = self._first(self._templates, tid)
        if found is None:
            return None
        found.open = False
        found.observed = msg
        if found.exchange is not None and msg.mti[1] != "4":
            rec_stan, obs_stan = found.exchange.request.fields.get("11"), fields.get("11")
            if rec_stan and obs_stan:
                self._stans[obs_stan] = rec_stan
                if len(self._stans) > _STAN_MAP_LIMIT:
                    self._stans.popitem(last=False)
        return found


def _stan_order(stan: str) -> int:
    return int(stan) if stan.isdigit() else 1_000_000


def answer_from_recording(exchange: Exchange, observed: Message, mac_fields: tuple[str, ...],
                          mac_len: int) -> Message | None:
    """The recorded answer for this run's request: where the recorded host echoed a field of its
    request, this run's value of that field; everything else as recorded; MAC fields as placeholders
    (the encoder computes them under the ZAK)."""
    if exchange.answer is None:
        return None
    recorded_request, recorded = exchange.request.fields, exchange.answer.fields
    fields: dict[str, str] = {}
    for k, v in recorded.items():
        if k in mac_fields:
            fields[k] = "0" * mac_len
        elif recorded_request.get(k) == v and k in observed.fields:
            fields[k] = observed.fields[k]
        else:
            fields[k] = v
    return Message(exchange.answer.mti, fields)


@dataclass(slots=True)
class Reply:
    data: bytes | None  #: the framed answer (None: nothing to send)
    delay: float = 0.0
    expectation: Expectation | None = None  #: told when its answer is out
    #: held with requests alike (`TraceHost.release(held)` decides them), and whether all have come
    held: tuple[str, ...] | None = None
    complete: bool = False

    def sent(self) -> None:
        if self.expectation is not None:
            self.expectation.answered.set()


class TraceHost:
    def __init__(self, *, zmk: bytes, lab_pin: str, pace: Pace | None = None, dialect: str = "iso87-ascii",
                 framing: str = "len2", max_frame: int = 8192) -> None:
        self.pace = pace or Pace()
        # the host simulator's pieces: sign-on, key exchange under the ZMK, MACs under the ZAK
        self.sim = HostSimulator(HostSimConfig(dialect=dialect, framing=framing, max_frame=max_frame, zmk=zmk))
        self.dialect = load_dialect(dialect)
        self.codec = Codec(self.dialect)
        self.framer = make_framer(framing, max_frame)
        self.lab_pin = lab_pin
        self.book = ExpectationBook()
        #: a request no expectation explains: (request, verification results)
        self.on_unexpected: Callable[[Message, dict[str, str]], None] = lambda msg, verified: None
        self.port: int | None = None
        self.ready = anyio.Event()
        self._signed_on = anyio.Event()
        self._key_issued = anyio.Event()
        self._conns: list[_SutConnection] = []
        self._initiated: dict[tuple[str, str], tuple[anyio.Event, list[Message]]] = {}
        self.unexpected = 0
        self.requests = 0
        self.pending = 0  #: answers waiting for their delay
        #: financial requests held because several expectations fit them alike, by their pairing key
        self._alike: dict[tuple[str, ...], list[tuple[bytes, Message]]] = {}

    # --- the listener ------------------------------------------------------------------------------

    async def serve(self, host: str, port: int, *,
                    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        log.info("trace host listening on %s:%s", host, self.port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_ready)
            task_status.started(self.port)
            async with listener:
                await listener.serve(self._connection)

    async def _watch_ready(self) -> None:
        await self._signed_on.wait()
        with anyio.move_on_after(KEY_EXCHANGE_WAIT):
            while not (self.sim.has_zone_key("ZPK") and self.sim.has_zone_key("ZAK")):
                await self._key_issued.wait()
                self._key_issued = anyio.Event()
        self.ready.set()

    async def _connection(self, stream: anyio.abc.SocketStream) -> None:
        conn = _SutConnection(self, stream)
        self._conns.append(conn)
        try:
            await conn.run()
        except Exception:  # one broken connection must never stop the listener
            log.exception("trace host: connection failed")
        finally:
            self._conns.remove(conn)
            await anyio.aclose_forcefully(stream)

    @property
    def connected(self) -> bool:
        return bool(self._conns)

    # --- host-initiated requests -------------------------------------------------------------------

    async def send_request(self, msg: Message, timeout: float) -> Message | None:
        """Send a request of the recorded host to the SUT and wait for its answer (None: none came,
        or no SUT is connected)."""
        if not self._conns:
            return None
        key = (match_class(msg.mti), msg.fields.get("11", ""))
        done = anyio.Event()
        got: list[Message] = []
        self._initiated[key] = (done, got)
        try:
            body = self.codec.encode(msg)
            await self._conns[-1].send(self.framer.encode(body))
            with anyio.move_on_after(timeout):
                await done.wait()
        except (IsoError, OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            log.warning("trace host: could not send %s to the SUT: %s", msg.mti, exc)
        finally:
            self._initiated.pop(key, None)
        return got[0] if got else None

    # --- the sans-I/O step of one request ----------------------------------------------------------

    def handle(self, body: bytes) -> Reply:
        """What to send back for one frame from the SUT, and when. A financial request that could pair
        with several expectations alike (the same card and amount twice) is held: `Reply.held`."""
        try:
            msg = self.codec.decode(body)
        except IsoError as exc:
            log.warning("trace host: undecodable frame from the SUT (%s)", exc)
            return Reply(None)
        if not is_request(msg.mti):
            slot = self._initiated.get((match_class(msg.mti), msg.fields.get("11", "")))
            if slot is not None:
                slot[1].append(msg)
                slot[0].set()
            return Reply(None)
        if msg.mti[1] == "8":
            return Reply(self._network(body, msg))
        self.requests += 1
        alike = self.book.alike(msg)
        key = _exact_key(msg.fields, msg.mti)
        if alike > 1 or key in self._alike:
            bucket = self._alike.setdefault(key, [])
            bucket.append((body, msg))
            return Reply(None, held=key, complete=len(bucket) >= alike)
        return self.decide(body, msg)

    def release(self, key: tuple[str, ...]) -> list[Reply]:
        """Requests held as alike, paired in the order the SUT allocated their STANs: the order it took
        the terminal requests in, whatever order its upstream writes went out in."""
        bucket = self._alike.pop(key, [])
        bucket.sort(key=lambda item: _stan_order(item[1].fields.get("11", "")))
        return [self.decide(body, msg) for body, msg in bucket]

    def decide(self, body: bytes, msg: Message) -> Reply:
        exp = self.book.match(msg)
        verified = self._verify(body, msg, exp)
        if exp is None:
            self.unexpected += 1
            self.on_unexpected(msg, verified)
            rc = UNEXPECTED_REVERSAL_RC if msg.mti[1] == "4" else UNEXPECTED_RC
            return Reply(self._frame(self._builder_answer(msg, {"39": rc})))
        exp.owner.on_upstream(exp, msg, verified)
        exp.seen.set()
        if exp.silent:
            exp.answered.set()
            return Reply(None)
        if exp.exchange is not None:
            answer = answer_from_recording(exp.exchange, msg, self.dialect.mac_fields, self.dialect.mac_wire_len)
            delay = self.pace.host_delay(exp.exchange.delay, exp.exchange.late)
        else:
            assert exp.template_answer is not None and exp.template_answer.fields is not None
            answer = self._builder_answer(msg, exp.template_answer.fields)
            delay = exp.template_answer.delay
        return Reply(self._frame(answer) if answer is not None else None, delay, exp)

    def _network(self, body: bytes, msg: Message) -> bytes | None:
        reply = self.sim.handle(body)
        if reply.body is None:
            return None
        if msg.fields.get("70") == "001":
            self._signed_on.set()
        elif msg.fields.get("70") == "101":
            self._key_issued.set()
        return self.framer.encode(reply.body)

    def _builder_answer(self, msg: Message, fields: Mapping[str, str]) -> Message:
        rc = fields.get("39", "00")
        try:
            answer = response(msg, rc, self.dialect.name, **{f"field_{k}": v for k, v in fields.items() if k != "39"})
        except IsoError:
            answer = Message(f"{msg.mti[:2]}{int(msg.mti[2]) + 1}0", {"11": msg.fields.get("11", ""), "39": rc})
        if rc in ("00", "25") and not any(k in answer.fields for k in self.dialect.mac_fields) \
                and any(k in msg.fields for k in self.dialect.mac_fields):
            answer.fields[self.dialect.mac_field_for(answer.fields)] = "0" * self.dialect.mac_wire_len
        return answer

    def _frame(self, answer: Message) -> bytes | None:
        body = self.sim.encode_answer(answer)
        return None if body is None else self.framer.encode(body)

    def _verify(self, body: bytes, msg: Message, exp: Expectation | None) -> dict[str, str]:
        """The SUT's MAC under the ZAK and its PIN block under the ZPK: "" verified, else why not."""
        verified: dict[str, str] = {}
        for k in self.dialect.mac_fields:
            if k in msg.fields:
                verified[k] = "" if self.sim.verify_mac(body) else "the MAC does not verify under the ZAK"
        block = msg.fields.get("52")
        if block is not None:
            verified["52"] = self._pin_problem(block, msg, exp.pin if exp is not None and exp.pin else self.lab_pin)
        return verified

    def _pin_problem(self, block: str, msg: Message, pin: str) -> str:
        zpk = self.sim.zone_key("ZPK")
        if zpk is None:
            return "no ZPK was exchanged"
        try:
            clear = decrypt_pin_block(zpk, bytes.fromhex(block), pan_of(msg), accept=(0,))
        except (SecurityError, ValueError):
            return "the PIN block does not decrypt to an ISO 9564 format 0 block for the card under the ZPK"
        return "" if clear == pin else "the PIN block does not hold the lab PIN"


class _SutConnection:
    def __init__(self, host: TraceHost, stream: anyio.abc.SocketStream) -> None:
        self.host = host
        self.stream = stream
        self.lock = anyio.Lock()
        self.timers: set[tuple[str, ...]] = set()

    async def run(self) -> None:
        decoder = self.host.framer.decoder()
        async with anyio.create_task_group() as tg:
            while True:
                try:
                    chunk = await self.stream.receive()
                    frames = decoder.feed(chunk)
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    break
                except IsoError as exc:
                    log.warning("trace host: bad framing from the SUT (%s): closing", exc)
                    break
                for frame in frames:
                    reply = self.host.handle(frame.body)
                    if reply.held is not None:
                        if reply.complete:
                            for each in self.host.release(reply.held):
                                await self.deliver(tg, each)
                        elif reply.held not in self.timers:
                            self.timers.add(reply.held)
                            tg.start_soon(self._release_later, tg, reply.held)
                        continue
                    await self.deliver(tg, reply)
            tg.cancel_scope.cancel()  # answers still waiting for their delay die with the connection

    async def deliver(self, tg: anyio.abc.TaskGroup, reply: Reply) -> None:
        if reply.data is None:
            reply.sent()
        elif reply.delay > 0:
            tg.start_soon(self._send_later, reply)
        else:
            await self.send(reply.data)
            reply.sent()

    async def _release_later(self, tg: anyio.abc.TaskGroup, key: tuple[str, ...]) -> None:
        """Requests alike that did not all come: decide the ones that did after a short wait."""
        await anyio.sleep(ALIKE_WAIT)
        self.timers.discard(key)
        for each in self.host.release(key):
            await self.deliver(tg, each)

    async def _send_later(self, reply: Reply) -> None:
        self.host.pending += 1
        try:
            await anyio.sleep(reply.delay)
            assert reply.data is not None
            await self.send(reply.data)
        finally:
            self.host.pending -= 1
            reply.sent()  # sent, or never will be (the connection went down)

    async def send(self, data: bytes) -> None:
        try:
            async with self.lock:
                await self.stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass  # the SUT went away; its reader sees the end of the stream
