"""`gateway trace check`: a trace checked offline, streamed, in bounded memory (sans-I/O `Checker`).

What is checked, each reported as one case of the run:

* decode — every frame decodes in its leg's dialect, its fields are what the record says, and the
  fields re-encode (with the envelope and framing) to exactly its `wire` bytes;
* pairing — every request has its answer on the same leg and connection (MTI class + STAN +
  terminal), or a recorded timeout, undelivered answer or connection close; every answer has its
  request (an answer after its request's timeout is a late answer, not an orphan); an upstream
  request is linked to the terminal request its `cause` names, else to the first waiting one of the
  same terminal and amount;
* echo — answers echo their request's fields as the dialect says (3, 11, 41; 4 unless partially
  approved; 42 when approved: a 0210 echoes its 0200's 3/4/11/41/42);
* originals — a host reversal's field 90 names a request recorded earlier on the host leg (one whose
  date-time precedes the recording is exempt); a CUP 0400 names an earlier terminal request (41 +
  batch 60.2 + STAN) — unless the stream starts in the middle of a recording (a rotated part);
* repeats — a 0401/0421 repeats its 0400/0420: every field equal but the MAC (ISO 8583:1987 practice;
  the MTI's last digit says it is a repeat);
* approvals — every host approval of a purchase or void was delivered to its terminal as an approval,
  or reversed upstream (a 0400/0420 naming it);
* late answers — no terminal got an approval for a request whose upstream request had timed out.

Memory is bounded: requests waiting for answers, originals, approvals and repeats are kept for
`window` seconds of trace time (and at most `max_entries` each); findings are kept up to
`max_findings` per case, the rest counted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

from gateway.iso.build.iso87 import OriginalData
from gateway.iso.errors import IsoError
from gateway.iso.framing import CupEnvelope
from gateway.iso.message import Message
from gateway.iso.mti import is_request, match_class, original_mti
from gateway.iso.validate import echo_mismatches
from gateway.store.records import CHARGED_RCS
from gateway.trace.codecs import make_codec, make_trace_framer
from gateway.trace.format import (
    Direction,
    EventKind,
    EventRecord,
    FrameRecord,
    FrameTally,
    Leg,
    Record,
    TraceHeader,
    parse_match_key,
)
from gateway.trace.report import CaseResult, Finding, FindingKind

CASES: Final = (
    ("decode", "every frame decodes and re-encodes to its wire bytes"),
    ("pairing", "every request has its answer or a recorded timeout"),
    ("echo", "answers echo their request's fields"),
    ("originals", "reversals name a real original"),
    ("repeats", "a repeat (0401) repeats its first attempt"),
    ("approvals", "every approval was delivered or reversed"),
    ("late", "no late answer was forwarded"),
)
DEFAULT_WINDOW: Final = 600.0
_MAC_FIELDS: Final = frozenset({"64", "128"})
#: host processing codes (first two digits) of reversible flows: purchase, void (reference §3.1)
_REVERSIBLE_HOST: Final = frozenset({"00", "02"})


@dataclass(slots=True)
class _Open:
    rec: FrameRecord
    link: _Link | None = None  #: terminal request ↔ its upstream request


@dataclass(slots=True)
class _Link:
    terminal: FrameRecord
    host_key: tuple[str, ...] | None = None  #: the upstream request's field-90 identity
    timed_out: bool = False
    link_key: tuple[str, ...] | None = None  #: its key in `Checker._links`, dropped once the terminal is answered


@dataclass(slots=True)
class _Approval:
    rec: FrameRecord  #: the host's approval
    terminal: str


class _Bounded(OrderedDict[object, object]):
    """Insertion-ordered, at most `limit` entries (the oldest go first); `expire` lets go of those
    older than a horizon of trace time."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def put(self, key: object, value: object) -> object | None:
        self[key] = value
        self.move_to_end(key)
        if len(self) > self.limit:
            return self.popitem(last=False)[1]
        return None

    def expire(self, horizon: float) -> None:
        while self:
            key, value = next(iter(self.items()))
            if _time_of(value) >= horizon:
                return
            del self[key]


def _time_of(value: object) -> float:
    if isinstance(value, _Open):
        return value.rec.t
    if isinstance(value, _Link):
        return value.terminal.t
    return value if isinstance(value, float) else float("inf")


def _seen(identity: tuple[str, ...]) -> int:
    """What the long-kept sets (originals, reversals) store of a key: its hash, a small int, so the
    count bound (`max_entries`) is a few MiB rather than tuples of strings."""
    return hash(identity)


@dataclass(slots=True)
class CheckOptions:
    window: float = DEFAULT_WINDOW  #: seconds of trace time a request may wait for its answer (and originals kept)
    max_entries: int = 200_000
    max_findings: int = 200  #: kept per case; the rest are counted
    #: the stream starts mid-recording (a rotated part): references to earlier frames are not findings
    continued: bool = False


@dataclass(slots=True)
class _Case:
    name: str
    title: str
    findings: list[Finding] = field(default_factory=list)
    more: int = 0


class Checker:
    """Feed records in trace order; `results()` gives one `CaseResult` per check."""

    def __init__(self, header: TraceHeader, options: CheckOptions | None = None) -> None:
        self.options = o = options or CheckOptions()
        self.header = header
        lenient = bool(header.notes.get("lenient", True))
        self._codec = {leg: make_codec(name, lenient=lenient) for leg, name in header.dialects.items()}
        self._dialect_name = dict(header.dialects)
        self._framer = {leg: make_trace_framer(kind) for leg, kind in header.framings.items()}
        self._cases = {name: _Case(name, title) for name, title in CASES}
        self._open: dict[tuple[str, ...], list[_Open]] = {}
        self._open_order: OrderedDict[int, tuple[tuple[str, ...], _Open]] = OrderedDict()
        self._timed_out = _Bounded(o.max_entries)  #: request key → _Open whose answer may still come late
        self._host_originals = _Bounded(o.max_entries)  #: field-90 identity of host requests
        self._terminal_originals = _Bounded(o.max_entries)  #: (41, batch, stan) of terminal requests
        self._first_attempts = _Bounded(o.max_entries)  #: field 90 → first 0400/0420 fields
        self._reversed = _Bounded(o.max_entries)  #: field-90 identities reversed upstream
        self._approvals = _Bounded(o.max_entries)  #: host request identity → _Approval, until resolved
        self._awaiting_upstream: dict[str, list[_Link]] = {}  #: 41 → terminal requests not yet sent upstream
        self._links = _Bounded(o.max_entries)  #: host request key → _Link
        self._link_by_seq = _Bounded(o.max_entries)  #: terminal request seq → _Link (a frame's `cause`)
        self.frames = 0
        self.events = 0
        self.undecodable = 0  #: frames the recorder or importer could not decode (`undecodable` events)
        self._first_t: float | None = None
        self._now = 0.0
        self._last_undecodable: EventRecord | None = None

    # --- findings ----------------------------------------------------------------------------------

    def _find(self, case: str, kind: FindingKind, message: str, rec: FrameRecord | EventRecord | None = None,
              **extra: str) -> None:
        c = self._cases[case]
        if len(c.findings) >= self.options.max_findings:
            c.more += 1
            return
        if isinstance(rec, FrameRecord):
            extra.setdefault("leg", rec.leg.value)
            extra.setdefault("mti", rec.mti)
            extra.setdefault("terminal", rec.fields.get("41", ""))
            extra.setdefault("stan", rec.fields.get("11", ""))
        elif isinstance(rec, EventRecord):
            extra.setdefault("leg", rec.leg.value)
        where = f"#{rec.seq} " if rec is not None else ""
        extra.setdefault("rule", case)
        c.findings.append(Finding(kind, where + message, seq=rec.seq if rec is not None else None, **extra))

    # --- the stream --------------------------------------------------------------------------------

    def feed(self, rec: Record) -> None:
        self._now = rec.t
        if self._first_t is None:
            self._first_t = rec.t
        if isinstance(rec, FrameRecord):
            self.frames += 1
            msg = self._decode(rec)
            if msg is not None:
                self._flow(rec)
        else:
            self.events += 1
            self._event(rec)
        if self.frames % 256 == 0:
            self._expire(rec.t - self.options.window)

    def _decode(self, rec: FrameRecord) -> Message | None:
        leg = rec.leg.value
        codec, framer = self._codec.get(leg), self._framer.get(leg)
        if codec is None or framer is None:
            self._find("decode", FindingKind.DECODE, f"no dialect for leg {leg} in the header", rec)
            return None
        msg = Message(rec.mti, rec.fields)
        if rec.wire:
            try:
                frames = framer.decoder().feed(bytes.fromhex(rec.wire))
                if len(frames) != 1:
                    raise IsoError(f"wire holds {len(frames)} whole frames, not 1")
                decoded = codec.decode(frames[0].body)
            except (IsoError, ValueError) as exc:
                self._find("decode", FindingKind.DECODE, f"wire does not decode: {exc}", rec,
                           field=getattr(exc, "field", None) or "")
                return None
            if decoded.mti != rec.mti or decoded.fields != rec.fields:
                k = "t" if decoded.mti != rec.mti else min(
                    (k for k in set(decoded.fields) | set(rec.fields) if decoded.fields.get(k) != rec.fields.get(k)),
                    key=_field_order)
                got = decoded.mti if k == "t" else decoded.fields.get(k, "<absent>")
                self._find("decode", FindingKind.DECODE, f"wire decodes to other values than the record (field {k})",
                           rec, field=k, expected=rec.mti if k == "t" else _show(rec, k),
                           got=got if k not in rec.secrets else "<differs>")
                return None
            env = frames[0].envelope
            recorded = rec.envelope or {}
            if env is not None and (env.tpdu.hex().upper(), env.header.hex().upper()) != (
                    recorded.get("tpdu", "").upper(), recorded.get("header", "").upper()):
                self._find("decode", FindingKind.DECODE, "envelope (TPDU / header) differs from the wire's", rec)
        try:
            body = codec.encode(Message(rec.mti, dict(rec.fields)))
            env = CupEnvelope.from_hex(rec.envelope["tpdu"], rec.envelope["header"]) if rec.envelope else None
            wire = framer.encode(body, env).hex().upper()
        except (IsoError, KeyError) as exc:
            self._find("decode", FindingKind.DECODE, f"fields do not encode: {exc}", rec,
                       field=getattr(exc, "field", None) or "")
            return None
        if rec.wire and wire != rec.wire.upper():
            self._find("decode", FindingKind.DECODE, "fields re-encode to other bytes than the wire", rec,
                       expected=rec.wire[:80], got=wire[:80])
        return msg

    # --- pairing and flows -------------------------------------------------------------------------

    def _key(self, rec: FrameRecord) -> tuple[str, ...]:
        return (rec.leg.value, rec.conn, match_class(rec.mti), rec.fields.get("11", ""), rec.fields.get("41", ""))

    def _flow(self, rec: FrameRecord) -> None:
        key = self._key(rec)
        if is_request(rec.mti):
            entry = _Open(rec)
            self._open.setdefault(key, []).append(entry)
            self._open_order[id(entry)] = (key, entry)
            if len(self._open_order) > self.options.max_entries:
                self._expire_open(float("inf"), limit=1,  # the oldest goes, reported as unanswered
                                  why=f"no answer among the next {self.options.max_entries:,} requests")
            self._request(rec, entry)
            return
        waiting = [e for e in self._open.get(key, ()) if e.rec.dir is not rec.dir]
        if not waiting:
            late = self._timed_out.pop(key, None)
            if isinstance(late, _Open):
                self._late_answer(late, rec)
                return
            if self.options.continued and self._first_t is not None and rec.t < self._first_t + self.options.window:
                return  # a rotated part: its request is in the part before
            self._find("pairing", FindingKind.UNEXPECTED_FRAME, "answer without a request", rec)
            return
        entry = waiting[0]
        self._close_open(key, entry)
        self._answer(entry, rec)

    def _close_open(self, key: tuple[str, ...], entry: _Open) -> None:
        entries = self._open.get(key)
        if entries is not None:
            entries.remove(entry)
            if not entries:
                del self._open[key]
        self._open_order.pop(id(entry), None)

    def _request(self, rec: FrameRecord, entry: _Open) -> None:
        f = rec.fields
        mclass = rec.mti[1]
        if rec.leg is Leg.TERMINAL:
            if mclass in "12":
                batch = f.get("60", "")[2:8]
                self._terminal_originals.put(_seen((f.get("41", ""), batch, f.get("11", ""))), rec.t)
                link = entry.link = _Link(rec)
                self._awaiting_upstream.setdefault(f.get("41", ""), []).append(link)
                self._link_by_seq.put(rec.seq, link)
            elif mclass == "4" and not self.options.continued:
                batch = f.get("60", "")[2:8]
                if _seen((f.get("41", ""), batch, f.get("11", ""))) not in self._terminal_originals:
                    self._find("originals", FindingKind.INVARIANT,
                               f"terminal reversal names no original in the trace (batch {batch})", rec)
            return
        if rec.dir is not Direction.OUT:
            return  # the host's own requests (echo tests) name nothing
        identity = _identity(rec)
        if mclass in "12":
            self._host_originals.put(_seen(identity), rec.t)
            self._link_upstream(rec, identity)
        elif mclass == "4":
            self._host_reversal(rec)

    def _link_upstream(self, rec: FrameRecord, identity: tuple[str, ...]) -> None:
        """The terminal request this upstream request was made from: the one its `cause` names, else
        the first waiting one of the same terminal and amount."""
        waiting = self._awaiting_upstream.get(rec.fields.get("41", ""))
        caused = self._link_by_seq.get(rec.cause) if rec.cause is not None else None
        if isinstance(caused, _Link) and caused.host_key is None:
            link = caused
            if waiting and link in waiting:
                waiting.remove(link)
        else:
            if not waiting:
                return
            amount = rec.fields.get("4")
            found = next((i for i, c in enumerate(waiting) if c.terminal.fields.get("4") == amount), None)
            if found is None:
                return
            link = waiting.pop(found)
        self._link_by_seq.pop(link.terminal.seq, None)  # linked: no later cause names it
        link.host_key = identity
        link.link_key = self._key(rec)
        self._links.put(link.link_key, link)

    def _host_reversal(self, rec: FrameRecord) -> None:
        f90 = rec.fields.get("90", "")
        try:
            orig = OriginalData.parse(f90)
        except IsoError:
            self._find("originals", FindingKind.INVARIANT, "reversal without a readable field 90", rec, field="90",
                       got=f90)
            return
        identity = (orig.mti, orig.stan, orig.transmission_dt, orig.acquirer_id.rjust(11, "0"))
        if _seen(identity) not in self._host_originals and not self._before_trace(orig.transmission_dt):
            self._find("originals", FindingKind.INVARIANT,
                       f"field 90 names no request in the trace ({orig.mti} stan {orig.stan} "
                       f"at {orig.transmission_dt})",
                       rec, field="90", got=f90)
        self._reversed.put(_seen(identity), rec.t)
        self._approvals.pop(identity, None)
        if rec.mti[3] == "0":
            self._first_attempts.put((f90,), rec)
            return
        first = self._first_attempts.get((f90,))
        if not isinstance(first, FrameRecord):
            if not self._before_trace(orig.transmission_dt) and not self.options.continued:
                self._find("repeats", FindingKind.INVARIANT, f"{rec.mti} repeats no {original_mti(rec.mti)} "
                           "in the trace", rec, field="90", got=f90)
            return
        keys = sorted(set(first.fields) | set(rec.fields), key=_field_order)
        for k in keys:
            if k in _MAC_FIELDS:
                continue
            if first.fields.get(k) != rec.fields.get(k):
                self._find("repeats", FindingKind.FIELD,
                           f"{rec.mti} differs from its {first.mti} (#{first.seq}) in field {k}", rec, field=k,
                           expected=_show(first, k), got=_show(rec, k), rule="repeats")

    def _answer(self, entry: _Open, rec: FrameRecord) -> None:
        req = entry.rec
        dialect = self._dialect_name.get(rec.leg.value, "")
        try:
            problems = echo_mismatches(dialect, Message(req.mti, req.fields), Message(rec.mti, rec.fields))
        except IsoError:
            problems = []
        for p in problems:
            k = p.field or "t"
            self._find("echo", FindingKind.FIELD, f"{rec.mti} does not echo field {k} of its {req.mti} (#{req.seq})",
                       rec, field=k, expected=req.mti if k == "t" else _show(req, k),
                       got=rec.mti if k == "t" else _show(rec, k), rule="echo")
        rc = rec.fields.get("39", "")
        if rec.leg is Leg.HOST and req.dir is Direction.OUT and req.mti[1] in "12":
            if rc in CHARGED_RCS and req.fields.get("3", "")[:2] in _REVERSIBLE_HOST:
                identity = _identity(req)
                if _seen(identity) not in self._reversed:
                    self._approvals.put(identity, _Approval(rec, req.fields.get("41", "")))
        elif rec.leg is Leg.TERMINAL and entry.link is not None:
            self._unawait(entry.link)
            self._terminal_answered(entry.link, rec, delivered=True)

    def _unawait(self, link: _Link) -> None:
        """A terminal request that was answered no longer waits for its upstream request (one refused
        locally must not be taken for the next request with the same amount)."""
        waiting = self._awaiting_upstream.get(link.terminal.fields.get("41", ""))
        if waiting and link in waiting:
            waiting.remove(link)
        self._link_by_seq.pop(link.terminal.seq, None)

    def _terminal_answered(self, link: _Link, rec: FrameRecord | EventRecord, *, delivered: bool,
                           rc: str | None = None) -> None:
        if rc is None and isinstance(rec, FrameRecord):
            rc = rec.fields.get("39", "")
        if rc in CHARGED_RCS and link.timed_out:
            self._find("late", FindingKind.INVARIANT, "the terminal got an approval although its upstream request "
                       f"had timed out (request #{link.terminal.seq})", rec, rule="late")
        if delivered and rc in CHARGED_RCS and link.host_key is not None:
            self._approvals.pop(link.host_key, None)  # delivered
        if link.link_key is not None:
            self._links.pop(link.link_key, None)  # the terminal has its answer: nothing more to link

    def _late_answer(self, entry: _Open, rec: FrameRecord) -> None:
        """An answer after its request's timeout: recorded, and its approval must be reversed."""
        req = entry.rec
        if (rec.leg is Leg.HOST and rec.fields.get("39") in CHARGED_RCS and req.mti[1] in "12"
                and req.fields.get("3", "")[:2] in _REVERSIBLE_HOST):
            identity = _identity(req)
            if _seen(identity) not in self._reversed:
                self._approvals.put(identity, _Approval(rec, req.fields.get("41", "")))

    # --- events ------------------------------------------------------------------------------------

    def _event(self, rec: EventRecord) -> None:
        kind = rec.event
        if kind is EventKind.UNDECODABLE:
            self.undecodable += 1
            self._last_undecodable = rec
        elif kind is EventKind.TIMEOUT:
            parts = parse_match_key(rec.detail)
            entry = self._find_open(rec, parts)
            if entry is None:
                if not self.options.continued:
                    self._find("pairing", FindingKind.INVARIANT,
                               f"timeout of a request not in the trace ({rec.detail})", rec)
                return
            key = self._key(entry.rec)
            self._close_open(key, entry)
            self._timed_out.put(key, entry)
            link = self._links.get(key)
            if isinstance(link, _Link):
                link.timed_out = True
        elif kind is EventKind.UNDELIVERED:
            parts = parse_match_key(rec.detail)
            entry = self._find_open(rec, parts)
            if entry is not None:
                self._close_open(self._key(entry.rec), entry)
                if entry.link is not None:
                    self._unawait(entry.link)
                    self._terminal_answered(entry.link, rec, delivered=False, rc=parts.get("39", ""))
        elif kind is EventKind.CLOSE:
            for key in [k for k in self._open if k[0] == rec.leg.value and k[1] == rec.conn]:
                for entry in list(self._open.get(key, ())):
                    self._close_open(key, entry)
                    self._timed_out.put(key, entry)  # an answer can no longer come on this connection
                    link = self._links.get(key)
                    if isinstance(link, _Link):
                        link.timed_out = True

    def _find_open(self, rec: EventRecord, parts: dict[str, str]) -> _Open | None:
        mclass, stan, terminal = parts.get("class"), parts.get("11"), parts.get("41")
        for key, entries in self._open.items():
            if key[0] != rec.leg.value or key[1] != rec.conn:
                continue
            if (mclass is None or key[2] == mclass) and (stan is None or key[3] == stan) and (
                    terminal is None or key[4] == terminal):
                return entries[0]
        return None

    # --- time --------------------------------------------------------------------------------------

    def _before_trace(self, mmddhhmmss: str) -> bool:
        """Whether a field-7 date-time (UTC, no year) lies before the first record of the stream."""
        if self._first_t is None or len(mmddhhmmss) != 10:
            return False
        start = datetime.fromtimestamp(self._first_t, UTC).strftime("%m%d%H%M%S")
        return mmddhhmmss < start

    def _expire_open(self, horizon: float, limit: int | None = None, why: str | None = None) -> None:
        while self._open_order and (limit is None or limit > 0):
            _, (key, entry) = next(iter(self._open_order.items()))
            if entry.rec.t >= horizon:
                break
            self._close_open(key, entry)
            self._find("pairing", FindingKind.MISSING_FRAME,
                       (why or f"no answer within {self.options.window:.0f}s") + " and no timeout recorded", entry.rec)
            if limit is not None:
                limit -= 1

    def _expire(self, horizon: float) -> None:
        self._expire_open(horizon)
        self._timed_out.expire(horizon)  # an answer later than a window after its request is not waited for
        self._links.expire(horizon)
        self._link_by_seq.expire(horizon)
        while self._approvals:
            identity, approval = next(iter(self._approvals.items()))
            assert isinstance(approval, _Approval)
            if approval.rec.t >= horizon:
                break
            del self._approvals[identity]
            self._unresolved(approval)
        for terminal, links in list(self._awaiting_upstream.items()):
            links[:] = [link for link in links if link.terminal.t >= horizon]
            if not links:
                del self._awaiting_upstream[terminal]

    def _unresolved(self, approval: _Approval) -> None:
        self._find("approvals", FindingKind.INVARIANT,
                   "host approval neither delivered to the terminal as an approval nor reversed", approval.rec)

    def results(self) -> list[CaseResult]:
        """Finish the stream (what is still open is reported) and give the cases."""
        # a stray undecodable line in a dump is tolerated, but a trace of nothing else (or of nothing)
        # checked nothing, and must not pass
        last = self._last_undecodable
        tally = FrameTally(self.frames, self.undecodable, last.detail if last is not None else "")
        if (reason := tally.nothing_to_compare()) is not None:
            self._find("decode", FindingKind.DECODE, reason, last)
        for _, (_key, entry) in list(self._open_order.items()):
            self._find("pairing", FindingKind.MISSING_FRAME, "no answer and no timeout recorded (end of trace)",
                       entry.rec)
        self._open.clear()
        self._open_order.clear()
        for approval in list(self._approvals.values()):
            assert isinstance(approval, _Approval)
            self._unresolved(approval)
        self._approvals.clear()
        out = []
        for c in self._cases.values():
            findings = list(c.findings)
            if c.more:
                findings.append(Finding(findings[-1].kind, f"... and {c.more} more like these", rule=c.name))
            out.append(CaseResult(f"{c.name}: {c.title}", findings))
        return out


def _identity(rec: FrameRecord) -> tuple[str, ...]:
    """A host request as field 90 names it: MTI, STAN, transmission date-time, acquirer (11 digits)."""
    f = rec.fields
    return (rec.mti, f.get("11", ""), f.get("7", ""), f.get("32", "").rjust(11, "0"))


def _field_order(k: str) -> int:
    return int(k) if k.isdigit() else -1


def _show(rec: FrameRecord, k: str) -> str:
    value = rec.fields.get(k, "<absent>")
    return f"<{rec.secrets[k].value} surrogate>" if k in rec.secrets and k in rec.fields else value


def check_records(header: TraceHeader, records: Iterable[Record],
                  options: CheckOptions | None = None) -> tuple[list[CaseResult], Checker]:
    checker = Checker(header, options)
    for rec in records:
        checker.feed(rec)
    return checker.results(), checker


def chained(parts: Iterable[tuple[TraceHeader, Iterator[Record]]]) -> Iterator[Record]:
    for _, records in parts:
        yield from records
