"""The terminal player: one connection to the SUT standing for one recorded terminal connection.

It sends recorded requests as a certified terminal would send them with this run's keys: the working
keys come from the SUT's own 0810 (unwrapped and checked under the terminal's TMK from the lab keys
file), the PIN block is computed for the surrogate PAN with the lab PIN, surrogate tracks are
TDK-encrypted where 53.3 says so, and the MAC is computed last. Answers are paired by MTI class,
STAN and terminal; one that pairs with nothing is kept, so a request that never gets its own answer
is told apart from a timeout (a match-key mismatch).

Several requests may be in flight on one connection (pipelined, as recorded); one reader task per
connection hands each answer to its waiter.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

import anyio
import anyio.abc

from gateway.config import Endpoint
from gateway.iso.codec import Codec
from gateway.iso.errors import IsoError
from gateway.iso.framing import CupEnvelope, make_framer
from gateway.iso.message import Message
from gateway.iso.mti import match_class
from gateway.iso.spec import load_dialect
from gateway.security.algorithms import encrypt_pin_block, encrypt_track, macs_equal, parse_key_block, terminal_mac
from gateway.security.errors import SecurityError
from gateway.security.keys import KeyUsage
from gateway.sim.keyfile import LabKeys, LabTerminal
from gateway.trace.format import SecretKind

log = logging.getLogger("gateway.trace.player")

#: TPDU 60 + NII 0001 + source 0000, header 603100310000: what the terminal simulator sends
DEFAULT_ENVELOPE: Final = CupEnvelope.from_hex("6000010000", "603100310000")
#: unpaired answers kept per connection (for match-key findings)
UNPAIRED_LIMIT: Final = 64
#: match keys of the requests sent on a connection, remembered (newest) to tell a second or late
#: answer to one of them from another request's answer with a wrong match key
ASKED_LIMIT: Final = 4096

MatchKey = tuple[str, str, str]


def match_key(msg: Message) -> MatchKey:
    """What pairs an answer with its request on the terminal leg: MTI class, STAN, terminal."""
    return match_class(msg.mti), msg.fields.get("11", ""), msg.fields.get("41", "")


class PlayerError(Exception):
    """The SUT cannot be reached, or the connection broke."""


class WorkingKeys:
    """Per terminal, the working keys the SUT issued at its last approved sign-in (shared by every
    player connection of the run: the SUT keeps sessions per terminal, not per connection)."""

    def __init__(self) -> None:
        self._keys: dict[str, dict[KeyUsage, bytes]] = {}

    def install(self, terminal_id: str, keys: Mapping[KeyUsage, bytes]) -> None:
        self._keys[terminal_id] = dict(keys)

    def get(self, terminal_id: str, usage: KeyUsage) -> bytes | None:
        return self._keys.get(terminal_id, {}).get(usage)

    def signed_in(self, terminal_id: str) -> bool:
        return KeyUsage.MAK in self._keys.get(terminal_id, {})

    def __repr__(self) -> str:
        return f"WorkingKeys(terminals={sorted(self._keys)})"


@dataclass(slots=True)
class Prepared:
    message: Message  #: as sent (PIN block, encrypted track and MAC of this run)
    frame: bytes = field(repr=False)
    notes: list[str] = field(default_factory=list)  #: why a secret could not be made (no keys, ...)


@dataclass(slots=True)
class Answer:
    message: Message
    body: bytes = field(repr=False)
    envelope: CupEnvelope | None
    at: float


@dataclass(slots=True, eq=False)
class _Slot:
    key: MatchKey
    event: anyio.Event = field(default_factory=anyio.Event)
    answer: Answer | None = None


def lab_terminal(keys: LabKeys, terminal_id: str) -> LabTerminal | None:
    """The keys file's entry for a terminal (None: it has none)."""
    return next((t for t in keys.terminals if t.terminal_id == terminal_id), None)


def track_pan(track: str | None) -> str | None:
    if not track:
        return None
    head = track.replace("=", "D").partition("D")[0]
    return head if head.isdigit() else None


class TerminalPlayer:
    def __init__(self, name: str, target: Endpoint, *, keys: WorkingKeys, lab: LabKeys, pin: str,
                 mac_algorithm: str = "cup-ecb", dialect: str = "cup-pos", framing: str = "cup",
                 max_frame: int = 8192, connect_timeout: float = 5.0) -> None:
        self.name = name
        self.target = target
        self.keys = keys
        self.lab = lab
        self.pin = pin
        self.mac_algorithm = mac_algorithm
        self.codec = Codec(load_dialect(dialect))
        self.framer = make_framer(framing, max_frame, envelope=DEFAULT_ENVELOPE if framing == "cup" else None)
        self.connect_timeout = connect_timeout
        self._stream: anyio.abc.SocketStream | None = None
        self._scope: anyio.CancelScope | None = None
        self._slots: dict[MatchKey, deque[_Slot]] = {}
        self.unpaired: deque[Answer] = deque(maxlen=UNPAIRED_LIMIT)
        self._asked: OrderedDict[MatchKey, float] = OrderedDict()  #: match key -> when last sent
        self._send_lock = anyio.Lock()
        self.closed = False

    def __repr__(self) -> str:
        return f"TerminalPlayer({self.name} -> {self.target})"

    # --- connection --------------------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connect, then read answers until closed (a task of the replay's task group)."""
        try:
            with anyio.fail_after(self.connect_timeout):
                self._stream = await anyio.connect_tcp(self.target.host, self.target.port)
        except (OSError, TimeoutError) as exc:
            raise PlayerError(f"cannot connect to the SUT at {self.target}: {exc}") from None
        with anyio.CancelScope() as self._scope:
            task_status.started()
            await self._read(self._stream)
        self._lost()

    async def close(self) -> None:
        self.closed = True
        stream, self._stream = self._stream, None
        if stream is not None:
            await anyio.aclose_forcefully(stream)
        if self._scope is not None:
            self._scope.cancel()
        self._lost()

    def _lost(self) -> None:
        for waiting in self._slots.values():
            for slot in waiting:
                slot.event.set()
        self._slots.clear()

    async def _read(self, stream: anyio.abc.SocketStream) -> None:
        decoder = self.framer.decoder()
        while True:
            try:
                chunk = await stream.receive()
                frames = decoder.feed(chunk)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                return
            except IsoError as exc:
                log.warning("player %s: bad framing from the SUT (%s)", self.name, exc)
                return
            now = anyio.current_time()
            for frame in frames:
                try:
                    msg = self.codec.decode(frame.body)
                except IsoError as exc:
                    log.warning("player %s: undecodable answer (%s)", self.name, exc)
                    continue
                self._dispatch(Answer(msg, frame.body, frame.envelope, now))

    def _dispatch(self, answer: Answer) -> None:
        key = match_key(answer.message)
        waiting = self._slots.get(key)
        while waiting and waiting[0].answer is not None:
            waiting.popleft()
        if not waiting:
            self.unpaired.append(answer)
            return
        slot = waiting.popleft()
        if not waiting:
            del self._slots[key]
        slot.answer = answer
        slot.event.set()

    # --- requests ----------------------------------------------------------------------------------

    def prepare(self, mti: str, fields: Mapping[str, str], secrets: Mapping[str, SecretKind],
                envelope: Mapping[str, str] | None, pin: str | None = None) -> Prepared:
        """The frame to send for a recorded (or template) request, with this run's secrets."""
        out = dict(fields)
        notes: list[str] = []
        tid = out.get("41", "")
        pan = out.get("2")
        for k in ("35", "36"):
            if secrets.get(k) is SecretKind.TRACK:
                pan = pan or track_pan(out[k])
                if out.get("53", "")[2:3] == "1":
                    tdk = self.keys.get(tid, KeyUsage.TDK)
                    if tdk is None:
                        notes.append(f"no TDK for terminal {tid}: track {k} sent in clear")
                    else:
                        try:
                            out[k] = encrypt_track(tdk, out[k])
                        except SecurityError as exc:
                            notes.append(f"track {k} cannot be encrypted: {exc}")
        if "52" in out:
            the_pin = self.pin if pin is None else pin
            pik = self.keys.get(tid, KeyUsage.PIK)
            if pik is None:
                notes.append(f"no PIK for terminal {tid}: PIN block sent as recorded")
            elif not the_pin:
                notes.append("no lab PIN: PIN block sent as recorded")
            else:
                try:
                    out["52"] = encrypt_pin_block(pik, the_pin, pan).hex().upper()
                except (SecurityError, ValueError) as exc:
                    notes.append(f"PIN block cannot be made: {exc}")
        if "64" in out:
            out["64"] = "0" * 16  # 8 bytes on the wire: spliced below, once the MAB is known
        msg = Message(mti, out)
        try:
            body = self.codec.encode(msg)
        except IsoError as exc:
            raise PlayerError(f"the request cannot be encoded: {exc}") from None
        if "64" in out:
            mak = self.keys.get(tid, KeyUsage.MAK)
            if mak is None:
                notes.append(f"no MAK for terminal {tid}: MAC left as zeros")
            else:
                mac = terminal_mac(mak, body[:-8], self.mac_algorithm)
                body = body[:-8] + mac
                msg.fields["64"] = mac.hex().upper()  # the codec's form of the 8 wire bytes
        env = DEFAULT_ENVELOPE
        if envelope is not None and "tpdu" in envelope and "header" in envelope:
            try:
                env = CupEnvelope.from_hex(envelope["tpdu"], envelope["header"])
            except IsoError:
                notes.append("recorded envelope unusable: the default TPDU/header was sent")
        try:
            frame = self.framer.encode(body, env if self.framer.kind == "cup" else None)
        except IsoError as exc:
            raise PlayerError(f"the request cannot be framed: {exc}") from None
        return Prepared(msg, frame, notes)

    async def send(self, prepared: Prepared, *, expect_answer: bool = True) -> _Slot | None:
        """Write the request (its answer's slot is registered first, so no answer can slip past)."""
        stream = self._stream
        if stream is None:
            raise PlayerError("the connection to the SUT is closed")
        msg = prepared.message
        slot: _Slot | None = None
        if expect_answer:
            slot = _Slot(key=match_key(msg))
            self._slots.setdefault(slot.key, deque()).append(slot)
            self._asked[slot.key] = anyio.current_time()
            self._asked.move_to_end(slot.key)
            if len(self._asked) > ASKED_LIMIT:
                self._asked.popitem(last=False)
        try:
            async with self._send_lock:
                await stream.send(prepared.frame)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise PlayerError(f"send failed: {type(exc).__name__}") from None
        return slot

    async def wait(self, slot: _Slot, timeout: float) -> Answer | None:
        """The answer that pairs with the sent request (None: none within `timeout`)."""
        with anyio.move_on_after(timeout):
            await slot.event.wait()
        if slot.answer is None:
            waiting = self._slots.get(slot.key)
            if waiting is not None and slot in waiting:
                waiting.remove(slot)
                if not waiting:
                    del self._slots[slot.key]
        return slot.answer

    async def exchange(self, prepared: Prepared, timeout: float) -> Answer | None:
        slot = await self.send(prepared)
        assert slot is not None
        return await self.wait(slot, timeout)

    def take_unpaired(self, request: Message) -> Answer | None:
        """The unpaired answer that most resembles the answer `request` should have had (same STAN,
        or same terminal and MTI class): it came, but with a wrong match key. Only answers that came
        after `request` was sent count, and never one whose match key is that of a request this
        connection sent: that is a second or late answer to it (left for its own case to report), not
        this request's answer under a wrong key."""
        key = match_key(request)
        stan, tid, cls = key[1], key[2], key[0]
        sent_at = self._asked.get(key, float("-inf"))
        best: Answer | None = None
        best_score = 0
        for a in self.unpaired:
            if a.at < sent_at or match_key(a.message) in self._asked:
                continue
            f = a.message.fields
            score = (f.get("11") == stan) * 2 + (f.get("41") == tid) + (match_class(a.message.mti) == cls)
            if score > best_score:
                best, best_score = a, score
        if best is not None and best_score >= 2:
            self.unpaired.remove(best)
            return best
        return None

    def verify(self, request: Message, answer: Answer) -> dict[str, str]:
        """The answer's MAC under the MAK, and on an approved sign-in its key block under the TMK (the
        working keys are installed when it verifies): "" verified, else why not."""
        msg = answer.message
        tid = request.fields.get("41", "")
        verified: dict[str, str] = {}
        if request.mti == "0800" and msg.fields.get("39") == "00" and "62" in msg.fields:
            verified["62"] = self._install(tid, request, msg.fields["62"])
        if "64" in msg.fields:
            mak = self.keys.get(tid, KeyUsage.MAK)
            if mak is None:
                verified["64"] = "no MAK: the terminal has not signed in"
            else:
                try:
                    expected = terminal_mac(mak, answer.body[:-8], self.mac_algorithm)
                    ok = macs_equal(expected, answer.body[-8:].upper())  # 8 ASCII hex bytes on the wire
                except SecurityError:
                    ok = False
                verified["64"] = "" if ok else "the MAC does not verify under the MAK of the sign-in"
        return verified

    def _install(self, tid: str, request: Message, block: str) -> str:
        entry = lab_terminal(self.lab, tid)
        if entry is None:
            return f"no TMK for terminal {tid} in the keys file"
        tmk = entry.tmk
        mode = request.fields.get("60", "")[8:11] or "004"
        try:
            keys = parse_key_block(tmk, bytes.fromhex(block), mode)
        except (SecurityError, ValueError) as exc:
            return f"the key block does not verify under the terminal's TMK: {exc}"
        self.keys.install(tid, keys)
        return ""
