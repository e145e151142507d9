"""The host simulator: an acquirer/issuer host on TCP that the gateway's host link talks to.

It speaks the host dialect (ISO 8583:1987 ASCII with a 2-byte length prefix by default; dialect and
framing are configurable), answers network management (sign-on 70=001, sign-off 002, echo 301, key
request 101 with a fresh ZPK/ZAK under the shared ZMK) and financial traffic through `HostRules`
(balances, PIN checks, limits, idempotent reversals), and misbehaves on purpose through the scripted
`FaultPlan` (delay, drop, disconnect, garbage, wrong MAC, late answers, rejected reversals, closing
after N messages).

Shape: `handle(body)` is the sans-I/O step (decode → decide → encode, with the fault decision
attached); `serve()` is the thin anyio shell around it. Every request is decided in arrival order by
the reader. Answers due at once go out from the reader, all answers to one read in one write; an
answer with a delay (or a disconnect) is carried out by a task of its own, so answers with different
delays go out of order, as a real host's would. The simulator is the far end of every end-to-end
benchmark, so its per-message cost is kept low: no task, lock hand-over or extra write per ordinary
answer, and the zone keys are kept with their cipher contexts.

Zone keys are per link, as a real host keeps them: a connection that exchanged keys uses its own, so
several gateway processes on one simulator (`serve --workers N`) do not replace each other's keys; a
connection that exchanged none uses the ones issued last (as before, for a single link).
"""

from __future__ import annotations

import logging
import random
import ssl
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Literal

import anyio
import anyio.abc

from gateway.iso.build import iso87, response
from gateway.iso.codec import Codec
from gateway.iso.errors import IsoError
from gateway.iso.framing import CupEnvelope, make_framer
from gateway.iso.message import Message, mask_pan
from gateway.iso.mti import is_request, is_reversal
from gateway.iso.spec import load_dialect
from gateway.iso.validate import identify
from gateway.net.tls import TlsHandshakeError, handshake
from gateway.security.algorithms import (
    DesKey,
    decrypt_pin_block,
    macs_equal,
    make_zone_key_under_zmk,
    parse_hex_key,
    retail_mac,
)
from gateway.security.errors import SecurityError
from gateway.sim.host_rules import (
    NO_PIN,
    Decision,
    Fault,
    FaultPlan,
    HostRules,
    HostRulesConfig,
    LedgerEntry,
    PinInput,
    SimConfigError,
    TxnKey,
    TxnKind,
    fault_from_dict,
    pan_of,
    read_toml,
)

#: the zone keys of the connection being served (None outside one: `handle` called directly)
_LINK_KEYS: ContextVar[dict[str, DesKey] | None] = ContextVar("host_sim_link_keys", default=None)

log = logging.getLogger("gateway.sim.host")

#: the well-known test key (0123456789ABCDEF FEDCBA9876543210); demos and tests only
DEFAULT_ZMK: Final = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
#: seconds a client has to complete its TLS handshake
TLS_HANDSHAKE_TIMEOUT: Final = 10.0
#: check value length the key-exchange answer carries (layout iso87.48.key: 8 hex characters)
KCV_LENGTH: Final = 4

NMIC_SIGN_ON: Final = "001"
NMIC_SIGN_OFF: Final = "002"
NMIC_KEY_REQUEST: Final = "101"
NMIC_ECHO: Final = "301"

#: flow names (specs/flows.toml) → what the rules do with them
FLOW_KINDS: Final[Mapping[str, TxnKind]] = {
    "purchase": "purchase",
    "refund": "refund",
    "void": "void",
    "balance_inquiry": "balance",
}


@dataclass(frozen=True, slots=True)
class HostSimConfig:
    dialect: str = "iso87-ascii"
    framing: str = "len2"
    max_frame: int = 8192
    zmk: bytes = DEFAULT_ZMK
    #: answer to a MAC'd request whose MAC does not verify (or when no ZAK was exchanged yet)
    mac_error_rc: str = "A0"
    rules: HostRulesConfig = field(default_factory=HostRulesConfig)

    def __repr__(self) -> str:  # never show the ZMK
        return f"HostSimConfig(dialect={self.dialect!r}, framing={self.framing!r}, rules={self.rules!r})"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HostSimConfig:
        """Wire keys (dialect, framing, max_frame, zmk as hex, mac_error_rc) at the top level, next to
        the rule keys of `HostRulesConfig.from_dict` (accounts, pins, limit, faults, seed, ...)."""
        rest = dict(data)
        wire: dict[str, Any] = {}
        for key in ("dialect", "framing", "mac_error_rc"):
            if key in rest:
                value = rest.pop(key)
                if not isinstance(value, str) or not value:
                    raise SimConfigError(f"{key}: expected a non-empty string")
                wire[key] = value
        if "max_frame" in rest:
            value = rest.pop("max_frame")
            if isinstance(value, bool) or not isinstance(value, int) or not 64 <= value <= 65535:
                raise SimConfigError("max_frame: expected an integer 64..65535")
            wire["max_frame"] = value
        if "zmk" in rest:
            value = rest.pop("zmk")
            if not isinstance(value, str):
                raise SimConfigError("zmk: expected hex text")
            wire["zmk"] = parse_zmk(value)
        return cls(**wire, rules=HostRulesConfig.from_dict(rest))

    @classmethod
    def from_toml(cls, path: str | Path) -> HostSimConfig:
        return cls.from_dict(read_toml(path))


def parse_zmk(text: str) -> bytes:
    try:
        key = parse_hex_key(text, "ZMK")
    except SecurityError as exc:
        raise SimConfigError(f"zmk: {exc}") from None
    if len(key) != 16:
        raise SimConfigError("zmk: expected a double-length key (32 hex characters)")
    return key


Action = Literal["answer", "drop", "disconnect", "garbage"]


@dataclass(slots=True)
class HostReply:
    """What to do with one request: the sans-I/O result of `HostSimulator.handle`."""

    request: Message | None
    #: the encoded response (no framing), None when there is nothing to send; card data: not in repr
    body: bytes | None = field(repr=False)
    action: Action = "answer"
    delay: float = 0.0
    garbage: Literal["body", "length"] = "body"
    decision: Decision | None = None
    #: a `booked_late` request, decided only when its delay is over: (body, reject_first, wrong_mac)
    deferred: tuple[bytes, int, bool] | None = field(default=None, repr=False)
    #: an `approve_as` fault: the code an approval goes out with instead of 00
    approve_as: str | None = None


@dataclass(slots=True)
class HostStats:
    connections_opened: int = 0
    connections_closed: int = 0
    messages: Counter[str] = field(default_factory=Counter)  #: by request MTI
    responses: Counter[str] = field(default_factory=Counter)  #: by response code
    decode_errors: int = 0
    mac_failures: int = 0
    pin_failures: int = 0
    sign_ons: int = 0
    key_exchanges: int = 0
    drops: int = 0
    disconnects: int = 0
    garbage_sent: int = 0
    closes_after_n: int = 0
    tls_failures: int = 0  #: connections refused because their TLS handshake failed

    @property
    def connections_open(self) -> int:
        return self.connections_opened - self.connections_closed


class HostSimulator:
    def __init__(self, config: HostSimConfig | Mapping[str, Any] | None = None) -> None:
        if config is None:
            config = HostSimConfig()
        elif not isinstance(config, HostSimConfig):
            config = HostSimConfig.from_dict(config)
        self.config = config
        self.dialect = load_dialect(config.dialect)
        self.codec = Codec(self.dialect)
        self.framer = make_framer(config.framing, config.max_frame)
        self.rules = HostRules(config.rules)
        self.faults = FaultPlan(config.rules.faults, config.rules.seed)
        self.stats = HostStats()
        #: the last requests seen (bounded: a load run must not grow it without end); reprs mask PANs
        self.seen: deque[Message] = deque(maxlen=10_000)
        self.port: int | None = None
        self._rng = random.Random(config.rules.seed + 1)
        # "ZPK"/"ZAK" → the key with its cipher contexts (built once, not per MAC or PIN block),
        # shared by all connections
        self._zone_keys: dict[str, DesKey] = {}
        self._open: set[_Connection] = set()
        self._ssl_context: ssl.SSLContext | None = None

    def __repr__(self) -> str:
        return f"HostSimulator({self.config!r}, port={self.port})"

    # --- run-time control and state for tests ------------------------------------------------------

    def set_faults(self, faults: Iterable[Fault | Mapping[str, Any]]) -> None:
        self.faults.set(_as_fault(f) for f in faults)

    def add_fault(self, fault: Fault | Mapping[str, Any]) -> None:
        self.faults.add(_as_fault(fault))

    def clear_faults(self) -> None:
        self.faults.clear()

    @property
    def ledger(self) -> dict[TxnKey, LedgerEntry]:
        return self.rules.ledger

    def balance(self, account_or_pan: str) -> int:
        return self.rules.balance(account_or_pan)

    def reversal_count(self, key: TxnKey | str | Message) -> int:
        return self.rules.reversal_count(key)

    def has_zone_key(self, usage: str) -> bool:
        return usage in self._zone_keys

    # --- pieces other hosts reuse (the trace host of `trace replay` answers from a recording) -------

    def zone_key(self, usage: str) -> DesKey | None:
        """The ZPK or ZAK this host issued last (None before the key exchange)."""
        return self._zone_keys.get(usage)

    def _key(self, usage: str) -> DesKey | None:
        """The zone key of the current link: its own if it exchanged one, else the last issued."""
        own = _LINK_KEYS.get()
        if own is not None and usage in own:
            return own[usage]
        return self._zone_keys.get(usage)

    def verify_mac(self, body: bytes) -> bool:
        """Whether the MAC at the end of a request body verifies under the ZAK this host issued."""
        return self._mac_ok(body)

    def encode_answer(self, answer: Message) -> bytes | None:
        """An answer encoded, its MAC field (when it has one) computed under the ZAK."""
        return self._encode(answer, wrong_mac=False)

    async def send_unsolicited(self, messages: Iterable[Message]) -> int:
        """Write messages nobody asked for (stray, replayed or very late answers: an answer storm) to
        every open connection, all in one write per connection. Returns how many connections got them."""
        data = b"".join(self.framer.encode(self.codec.encode(m)) for m in messages)
        connections = list(self._open)
        for conn in connections:
            await conn._send(data)
        return len(connections)

    # --- the sans-I/O step -------------------------------------------------------------------------

    def handle(self, body: bytes) -> HostReply:
        """Decode one request body, decide it (unless a fault loses it first) and encode the answer."""
        try:
            request = self.codec.decode(body)
        except IsoError as exc:
            self.stats.decode_errors += 1
            log.warning("host simulator: undecodable request (%s)", exc)
            return HostReply(None, None, "drop")
        if not is_request(request.mti):
            log.info("host simulator: ignoring a %s (not a request)", request.mti)
            return HostReply(request, None, "drop")
        self.seen.append(request)
        self.stats.messages[request.mti] += 1
        pan = pan_of(request)
        faults = self.faults.select(request.mti, pan)
        reply = HostReply(request, None)
        reject_first = 0
        wrong_mac = False
        if faults:  # the usual case has none: skip the fault bookkeeping altogether
            for fault in faults:
                if fault.kind in ("delay", "late"):
                    reply.delay += fault.seconds
                elif fault.kind in ("drop", "disconnect", "garbage") and reply.action == "answer":
                    reply.action = fault.kind
                    reply.garbage = fault.garbage
            if any(not f.process for f in faults if f.kind in ("drop", "disconnect", "garbage")):
                return reply  # lost on the way in: the host never saw it
            reject_first = max((f.count for f in faults if f.kind == "reject_reversal"), default=0)
            wrong_mac = any(f.kind == "wrong_mac" for f in faults)
            reply.approve_as = next((f.code for f in faults if f.kind == "approve_as"), None)
            booked_late = [f.seconds for f in faults if f.kind == "booked_late" and f.seconds > 0]
            if booked_late:
                reply.delay += max(booked_late)
                reply.deferred = (body, reject_first, wrong_mac)
                return reply  # decided by `book` when the delay is over
        return self._decide_into(reply, body, request, reject_first, wrong_mac)

    def book(self, reply: HostReply) -> HostReply:
        """Decide a `booked_late` request now that its delay is over."""
        if reply.deferred is None or reply.request is None:
            return reply
        body, reject_first, wrong_mac = reply.deferred
        reply.deferred = None
        return self._decide_into(reply, body, reply.request, reject_first, wrong_mac)

    def _decide_into(self, reply: HostReply, body: bytes, request: Message, reject_first: int,
                     wrong_mac: bool) -> HostReply:
        answer, decision = self._decide(body, request, reject_first)
        if reply.approve_as is not None and answer.fields.get("39") == "00" and request.mti[1] == "2":
            answer.fields["39"] = reply.approve_as  # booked as approved all the same
        reply.decision = decision
        self.stats.responses[answer.fields.get("39", "")] += 1
        reply.body = self._encode(answer, wrong_mac=wrong_mac)
        return reply

    def _decide(self, body: bytes, request: Message, reject_first: int) -> tuple[Message, Decision | None]:
        if request.mti[1] == "8":
            return self._network(request), None
        mac_fields = set(self.dialect.mac_fields) & request.fields.keys()
        if mac_fields and not self._mac_ok(body):
            self.stats.mac_failures += 1
            return self._answer(request, self.config.mac_error_rc, mac=False), None
        mac = bool(mac_fields) and self._key("ZAK") is not None
        if is_reversal(request.mti):
            decision = self.rules.reversal(request, reject_first=reject_first)
            return self._answer(request, decision.rc, mac=mac, decision=decision), decision
        flow = identify(self.dialect.name, request)
        kind = FLOW_KINDS.get(flow.name) if flow is not None else None
        if kind is None:
            return self._answer(request, "40", mac=mac), None
        decision = self.rules.financial(request, self._pin(request), kind=kind)
        return self._answer(request, decision.rc, mac=mac, decision=decision), decision

    def _mac_ok(self, body: bytes) -> bool:
        zak = self._key("ZAK")
        n = self.dialect.mac_wire_len
        if zak is None or len(body) <= n:
            return False
        try:
            expected = retail_mac(zak, body[:-n]).hex().upper().encode("ascii")[:n]
        except SecurityError:
            return False
        return macs_equal(expected, body[-n:].upper())

    def _pin(self, request: Message) -> PinInput:
        block = request.fields.get("52")
        if block is None:
            return NO_PIN
        zpk = self._key("ZPK")
        if zpk is None:
            self.stats.pin_failures += 1
            return PinInput(True, None)
        try:
            return PinInput(True, decrypt_pin_block(zpk, bytes.fromhex(block), pan_of(request), accept=(0,)))
        except (SecurityError, ValueError):
            self.stats.pin_failures += 1
            return PinInput(True, None)

    def _network(self, request: Message) -> Message:
        nmic = request.fields.get("70")
        if nmic == NMIC_SIGN_ON:
            self.stats.sign_ons += 1
            return self._answer(request, "00", mac=False)
        if nmic in (NMIC_SIGN_OFF, NMIC_ECHO) or nmic is None:
            return self._answer(request, "00", mac=False)
        if nmic == NMIC_KEY_REQUEST:
            try:
                usage = iso87.requested_key_type(request)
            except IsoError:
                return self._answer(request, "30", mac=False)
            clear, under_zmk, kcv = make_zone_key_under_zmk(self.config.zmk, 16, KCV_LENGTH)
            key = self._zone_keys[usage] = DesKey(clear, what=usage)
            own = _LINK_KEYS.get()
            if own is not None:
                own[usage] = key
            self.stats.key_exchanges += 1
            log.info("host simulator: issued a new %s (kcv %s)", usage, kcv.hex().upper())
            return iso87.key_response(request, under_zmk, kcv)
        return self._answer(request, "12", mac=False)

    def _answer(self, request: Message, rc: str, *, mac: bool, decision: Decision | None = None) -> Message:
        now = datetime.now()
        extra: dict[str, str] = {}
        if decision is not None:
            extra["field_37"] = decision.rrn
            if decision.auth_code:
                extra["field_38"] = decision.auth_code
            if decision.balance is not None:
                # 54: account type 00 · amount type 01 ledger / 02 available · currency · C/D · n12
                sign = "C" if decision.balance >= 0 else "D"
                amount = f"{abs(decision.balance):012d}"
                currency = request.fields.get("49", "156")
                extra["field_54"] = f"0001{currency}{sign}{amount}0002{currency}{sign}{amount}"
        if request.mti[1] != "8":
            extra.setdefault("field_12", request.fields.get("12") or now.strftime("%H%M%S"))
            extra.setdefault("field_13", request.fields.get("13") or now.strftime("%m%d"))
        try:
            answer = response(request, rc, self.dialect.name, **extra)
        except IsoError:
            # a request the response builder cannot answer (e.g. a malformed 39): a bare echo
            answer = Message(f"{request.mti[:2]}{int(request.mti[2]) + 1}0", {"39": rc})
        for key in self.dialect.mac_fields:
            answer.fields.pop(key, None)
        if mac:
            answer.fields[self.dialect.mac_field_for(answer.fields)] = "0" * self.dialect.mac_wire_len
        return answer

    def _encode(self, answer: Message, *, wrong_mac: bool) -> bytes | None:
        mac_keys = [k for k in self.dialect.mac_fields if k in answer.fields]
        if wrong_mac and not mac_keys and answer.mti[1] != "8":
            # the fault asks for a wrong MAC even where the answer would carry none
            mac_keys = [self.dialect.mac_field_for(answer.fields)]
            answer.fields[mac_keys[0]] = "0" * self.dialect.mac_wire_len
        try:
            body = self.codec.encode(answer)
        except IsoError as exc:
            log.error("host simulator: cannot encode its answer (%s)", exc)
            return None
        if not mac_keys:
            return body
        n = self.dialect.mac_wire_len
        zak = self._key("ZAK")
        mac = retail_mac(zak, body[:-n]).hex().upper().encode("ascii")[:n] if zak else b"0" * n
        if wrong_mac:
            mac = bytes(b"0123456789ABCDEF"[(b"0123456789ABCDEF".index(c) + 1) % 16] for c in mac)
        return body[:-n] + mac

    # --- the TCP shell -----------------------------------------------------------------------------

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ssl_context: ssl.SSLContext | None = None,
        task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen and serve until cancelled. `port = await tg.start(sim.serve)` gives the bound port.
        With `ssl_context` (e.g. `gateway.net.tls.server_context(...)`) every connection speaks TLS;
        a failed handshake is logged and counted in `stats.tls_failures`."""
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        self._ssl_context = ssl_context
        log.info("host simulator listening on %s:%s (%s, %s%s)", host, self.port, self.dialect.name,
                 self.config.framing, ", TLS" if ssl_context is not None else "")
        task_status.started(self.port)
        async with listener:
            await listener.serve(self._connection)

    async def _connection(self, raw: anyio.abc.SocketStream) -> None:
        stream: anyio.abc.ByteStream = raw
        if self._ssl_context is not None:
            try:
                with anyio.fail_after(TLS_HANDSHAKE_TIMEOUT):
                    stream = await handshake(raw, self._ssl_context, server_side=True)
            except (TlsHandshakeError, TimeoutError) as exc:
                self.stats.tls_failures += 1
                log.warning("host simulator: refusing a connection: %s", exc or "TLS handshake timed out")
                await anyio.aclose_forcefully(raw)
                return
            except BaseException:  # cancelled mid-handshake (shutdown): the socket is still ours to close
                await anyio.aclose_forcefully(raw)
                raise
        self.stats.connections_opened += 1
        _LINK_KEYS.set({})  # this connection's task (and the answer tasks it starts) see its own keys
        conn = _Connection(self, stream)
        self._open.add(conn)
        try:
            await conn.run()
        except Exception:  # one broken connection must never stop the listener
            log.exception("host simulator: connection failed")
        finally:
            self._open.discard(conn)
            self.stats.connections_closed += 1
            await anyio.aclose_forcefully(stream)

    def garbage(self, mode: Literal["body", "length"], envelope: CupEnvelope | None = None) -> bytes:
        """Bytes that are not a valid answer: a well-framed random body, or an impossible length."""
        noise = self._rng.randbytes(self._rng.randint(8, 48))
        if mode == "body":
            return self.framer.encode(noise, envelope)
        if self.config.framing == "ascii4":
            return b"X9Z!" + noise
        return b"\xff\xff" + noise  # 65535 is above any sane max_frame


def _as_fault(fault: Fault | Mapping[str, Any]) -> Fault:
    return fault if isinstance(fault, Fault) else fault_from_dict(fault)


class _Connection:
    """One client connection: read frames in order; answer at once from the reader, or from a task of
    its own when the answer is delayed or the fault is a disconnect."""

    def __init__(self, sim: HostSimulator, stream: anyio.abc.ByteStream) -> None:
        self.sim = sim
        self.stream = stream
        # the reader and delayed-answer tasks write to one stream, which refuses concurrent sends;
        # fast_acquire: taking a free lock costs no extra checkpoint (the reader's usual case)
        self.lock = anyio.Lock(fast_acquire=True)

    async def run(self) -> None:
        sim = self.sim
        decoder = sim.framer.decoder()
        handled = 0
        async with anyio.create_task_group() as tg:
            self.scope = tg.cancel_scope
            while not self._budget_spent(handled):
                try:
                    chunk = await self.stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    return
                try:
                    frames = decoder.feed(chunk)
                except IsoError as exc:
                    sim.stats.decode_errors += 1
                    log.warning("host simulator: bad frame (%s), closing the connection", exc)
                    tg.cancel_scope.cancel()
                    return
                # the answers due now to this read's requests, written together in one send
                due: list[bytes] = []
                disconnect: HostReply | None = None
                for frame in frames:
                    handled += 1
                    reply = sim.handle(frame.body)
                    if disconnect is not None:
                        pass  # the connection is going down: later requests are decided, never answered
                    elif reply.delay:
                        envelope = frame.envelope.reply() if frame.envelope is not None else None
                        tg.start_soon(self._carry_out, reply, envelope)
                    elif reply.action == "disconnect":
                        disconnect = reply
                    else:
                        envelope = frame.envelope.reply() if frame.envelope is not None else None
                        data = self._outgoing(reply, envelope)
                        if data is not None:
                            due.append(data)
                    if self._budget_spent(handled):
                        break  # frames after the budget in the same read are never answered
                if due:
                    await self._send(b"".join(due))
                if disconnect is not None:
                    await self._disconnect(disconnect)
                    return
            # a close_after fault's message budget is spent: answer what is in flight, then close
            sim.stats.closes_after_n += 1
            sim.faults.note_close()
        await self.stream.aclose()

    def _budget_spent(self, handled: int) -> bool:
        """Read at every message, so a close_after fault added at run time applies to open connections."""
        budget = self.sim.faults.close_after()
        return budget is not None and handled >= budget

    def _outgoing(self, reply: HostReply, envelope: CupEnvelope | None) -> bytes | None:
        """The framed bytes to write for a reply that is due now (None: nothing to write)."""
        sim = self.sim
        if reply.action == "answer":
            return None if reply.body is None else sim.framer.encode(reply.body, envelope)
        if reply.action == "garbage":
            sim.stats.garbage_sent += 1
            return sim.garbage(reply.garbage, envelope)
        if reply.action == "drop":
            sim.stats.drops += 1
        return None

    async def _carry_out(self, reply: HostReply, envelope: CupEnvelope | None) -> None:
        """A delayed reply: wait, then answer (or drop, send garbage, disconnect) as decided."""
        if reply.delay:
            await anyio.sleep(reply.delay)
        reply = self.sim.book(reply)
        if reply.action == "disconnect":
            await self._disconnect(reply)
            return
        data = self._outgoing(reply, envelope)
        if data is not None:
            await self._send(data)

    async def _disconnect(self, reply: HostReply) -> None:
        """Close instead of answering; answers still pending on this connection are never sent."""
        self.sim.stats.disconnects += 1
        log.info("host simulator: disconnecting instead of answering %s", _describe(reply.request))
        await anyio.aclose_forcefully(self.stream)
        self.scope.cancel()

    async def _send(self, data: bytes) -> None:
        try:
            async with self.lock:
                await self.stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass  # the client went away: the reader sees the end of the stream


def _describe(msg: Message | None) -> str:
    if msg is None:
        return "?"
    pan = pan_of(msg)
    return f"{msg.mti} stan={msg.fields.get('11')} pan={mask_pan(pan) if pan else '-'}"
