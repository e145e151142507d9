"""From a streamed trace to cases, sans-I/O: `CaseAssembler.feed(record)` returns the cases (and
connection ends) that are complete, in the order they started.

A case is one terminal request and everything it caused: its answer, the SUT's upstream request and
the host's answer, the reversal the SUT sent by itself (and its repeats). A host-initiated request
(an 0800 from the host) is a case of its own, as is an upstream request no terminal request explains.

Pairing on each leg is by connection, MTI class and STAN (and terminal, on the terminal leg). The host
leg is linked to the terminal leg the way the SUT itself links them, since the SUT allocates its own
host STANs: an upstream financial request belongs to the open terminal request of the same terminal
(same amount and card where both say); a reversal belongs to the case whose upstream request its field
90 names (original STAN), or to the terminal reversal of that case when there is one. Where the
trace gives a frame's `cause` (the seq of the frame that made the SUT send it), that decides instead:
the upstream request belongs to the case of the frame it names, exactly.

Memory stays bounded on any length of trace: a case is held only until it is complete (its answer
came, its upstream exchanges are settled, an expected reversal was answered) or until `horizon`
seconds of trace time have passed since it started; the lookup tables forget cases older than twice
the horizon, and keep at most `lookup_limit` of them (a reversal names a recent original).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from gateway.iso.errors import IsoError
from gateway.iso.message import Message
from gateway.iso.mti import is_request, match_class
from gateway.iso.validate import FlowSpec, identify
from gateway.trace.format import (
    Direction,
    EventKind,
    EventRecord,
    FrameRecord,
    Leg,
    Record,
    TraceHeader,
    parse_match_key,
)

#: host answers that end a reversal (the SAF stops repeating)
FINAL_REVERSAL_RCS: Final = frozenset({"00", "25", "12"})
DEFAULT_DIALECTS: Final = {"terminal": "cup-pos", "host": "iso87-ascii"}
#: recent cases kept for linking later frames to them (reversals by field 90, terminal reversals)
LOOKUP_LIMIT: Final = 2_000


class CaseKind(StrEnum):
    TERMINAL = "terminal"  #: a terminal request and what it caused
    HOST = "host"  #: a request the host sent to the SUT, and the SUT's answer
    UPSTREAM = "upstream"  #: an upstream request of the SUT no terminal request explains


@dataclass(slots=True)
class Exchange:
    """A request and its answer on one leg."""

    leg: Leg
    conn: str
    request: FrameRecord
    answer: FrameRecord | None = None
    #: the SUT had given up on this request when (or before) its answer came: a recorded timeout
    late: bool = False

    @property
    def delay(self) -> float | None:
        return None if self.answer is None else max(0.0, self.answer.t - self.request.t)

    @property
    def rc(self) -> str | None:
        return None if self.answer is None else self.answer.fields.get("39")


@dataclass(slots=True)
class Case:
    id: int
    kind: CaseKind
    start: float
    conn: str
    terminal: str
    stan: str
    mti: str
    flow: str
    exchange: Exchange  #: the terminal exchange, the host-initiated one, or the lone upstream one
    upstream: list[Exchange] = field(default_factory=list)  #: SUT → host requests it caused, in order
    #: cases on the same connection whose answers came before this request was sent (replay waits too)
    after: tuple[int, ...] = ()
    original: Case | None = field(default=None, repr=False)  #: a terminal reversal: its original
    reversal_case: Case | None = field(default=None, repr=False)  #: the terminal reversal of this case
    conn_closed: bool = False  #: the connection closed before an answer came

    @property
    def name(self) -> str:
        who = {CaseKind.TERMINAL: self.terminal or "?", CaseKind.HOST: "host", CaseKind.UPSTREAM: "upstream"}
        flow = f" {self.flow}" if self.flow else ""
        return f"{self.conn} {who[self.kind]} stan {self.stan or '-'} {self.mti}{flow}"

    @property
    def primary(self) -> Exchange | None:
        """The upstream request the terminal request was translated into."""
        return next((x for x in self.upstream if x.request.mti[1] != "4"), None)

    def reversals(self) -> list[Exchange]:
        return [x for x in self.upstream if x.request.mti[1] == "4"]

    def expects_reversal(self) -> bool:
        """Whether the SUT should have reversed what it sent upstream (its own SAF, or a terminal
        reversal it forwards): a timeout, an undelivered approval, or an approval the terminal did
        not get as an approval."""
        if self.kind is CaseKind.TERMINAL and self.original is not None:
            p = self.original.primary
            return p is not None and p.rc == "00" and not self.original.expects_reversal()
        p = self.primary
        if p is None:
            return False
        if p.late:
            return True
        answer = self.exchange.answer
        return p.rc == "00" and self.kind is CaseKind.TERMINAL and (
            answer is None or answer.fields.get("39") != "00")

    def reversed_upstream(self) -> bool:
        return any(x.rc in FINAL_REVERSAL_RCS for x in self.reversals())


@dataclass(frozen=True, slots=True)
class ConnEnd:
    """The recorded terminal connection closed here (after the answers of `after`)."""

    conn: str
    t: float
    after: tuple[int, ...]
    detail: str = ""


Item = Case | ConnEnd


def _pan(fields: dict[str, str]) -> str | None:
    if "2" in fields:
        return fields["2"]
    track = fields.get("35")
    if track:
        for sep in ("D", "="):
            head, found, _ = track.partition(sep)
            if found and head.isdigit():
                return head
    return None


def _reference(fields: dict[str, str]) -> tuple[str, str] | None:
    """What a host answer and the SUT's answer to the terminal share: the RRN and the auth code."""
    rrn, auth = fields.get("37", "").strip(), fields.get("38", "").strip()
    return (rrn, auth) if rrn or auth else None


def _flow(dialect: str, rec: FrameRecord) -> FlowSpec | None:
    try:
        return identify(dialect, Message(rec.mti, dict(rec.fields)))
    except IsoError:
        return None


def _valid_mti(mti: str) -> bool:
    return len(mti) == 4 and mti.isdigit()


class CaseAssembler:
    def __init__(self, header: TraceHeader, horizon: float = 30.0, lookup_limit: int = LOOKUP_LIMIT) -> None:
        self.dialects = {**DEFAULT_DIALECTS, **header.dialects}
        self.horizon = horizon
        self.lookup_limit = lookup_limit
        self._ids = itertools.count(1)
        self._queue: deque[Item] = deque()
        self._now = 0.0
        #: terminal requests waiting for their answer: (conn, class, stan, terminal) → cases, oldest first
        self._term_pending: dict[tuple[str, str, str, str], deque[Case]] = {}
        #: answers seen on a terminal connection since its last request (what the next one waits for)
        self._answered_since: dict[str, list[int]] = {}
        #: open terminal cases per terminal, for linking upstream requests
        self._open_by_terminal: dict[str, list[Case]] = {}
        #: SUT → host requests waiting for the host's answer: (conn, class, stan) → (exchange, case)
        self._host_pending: dict[tuple[str, str, str], tuple[Exchange, Case | None]] = {}
        #: host → SUT requests waiting for the SUT's answer
        self._host_initiated: dict[tuple[str, str, str], Case] = {}
        #: recent cases by the host STAN of their upstream request (field 90 of a reversal names it)
        self._by_host_stan: OrderedDict[str, Case] = OrderedDict()
        #: recent financial cases by (terminal, batch, STAN): a CUP reversal repeats its original's
        self._by_txn: OrderedDict[tuple[str, str, str], Case] = OrderedDict()
        #: recent cases by the RRN and auth code of their upstream answer (their terminal answer has them)
        self._by_reference: OrderedDict[tuple[str, str], Case] = OrderedDict()
        #: recent cases by the seq of their terminal request and of their upstream requests (`cause`)
        self._by_seq: OrderedDict[int, Case] = OrderedDict()
        self._sweeps = 0
        self.unpaired_answers = 0  #: answers no request of the trace explains (trace check reports them)

    # --- feeding -----------------------------------------------------------------------------------

    def feed(self, rec: Record) -> list[Item]:
        self._now = max(self._now, rec.t)
        if isinstance(rec, EventRecord):
            self._event(rec)
        elif _valid_mti(rec.mti):
            if rec.leg is Leg.TERMINAL:
                self._terminal_frame(rec)
            else:
                self._host_frame(rec)
        return self._drain(final=False)

    def finish(self) -> list[Item]:
        return self._drain(final=True)

    def stream(self, records: Iterable[Record]) -> Iterator[Item]:
        for rec in records:
            yield from self.feed(rec)
        yield from self.finish()

    @property
    def held(self) -> int:
        """Items held back (not complete yet): what bounds memory."""
        return len(self._queue)

    # --- terminal leg ------------------------------------------------------------------------------

    def _terminal_frame(self, rec: FrameRecord) -> None:
        tid, stan = rec.fields.get("41", ""), rec.fields.get("11", "")
        key = (rec.conn, match_class(rec.mti), stan, tid)
        if is_request(rec.mti) and rec.dir is Direction.IN:
            flow = _flow(self.dialects["terminal"], rec)
            case = Case(next(self._ids), CaseKind.TERMINAL, rec.t, rec.conn, tid, stan, rec.mti,
                        flow.name if flow is not None else "", Exchange(Leg.TERMINAL, rec.conn, rec))
            case.after = tuple(self._answered_since.pop(rec.conn, ()))
            self._term_pending.setdefault(key, deque()).append(case)
            self._open_by_terminal.setdefault(tid, []).append(case)
            self._remember(self._by_seq, rec.seq, case)
            txn = (tid, rec.fields.get("60", "")[2:8], stan)
            if rec.mti[1] == "4":
                original = self._by_txn.get(txn)
                if original is not None:
                    case.original = original
                    original.reversal_case = case
            elif rec.mti[1] == "2":
                self._remember(self._by_txn, txn, case)
            self._queue.append(case)
            return
        waiting = self._term_pending.get(key)
        if not waiting or rec.dir is not Direction.OUT:
            self.unpaired_answers += 1
            return
        case = waiting.popleft()
        if not waiting:
            del self._term_pending[key]
        case.exchange.answer = rec
        self._relink_by_reference(case, rec)
        self._answered_since.setdefault(rec.conn, []).append(case.id)
        for x in case.upstream:
            if x.answer is None or x.answer.t > rec.t:
                x.late = True  # the SUT answered the terminal without (or before) the host's answer

    def _event(self, rec: EventRecord) -> None:
        if rec.event is EventKind.TIMEOUT and rec.leg is Leg.HOST:
            # the SUT says it gave up on this request: its answer, if one comes, is late
            named = parse_match_key(rec.detail)
            pending = self._host_pending.get((rec.conn, named.get("class", ""), named.get("11", "")))
            if pending is not None:
                pending[0].late = True
            return
        if rec.event is EventKind.UNDELIVERED and rec.leg is Leg.TERMINAL:
            # the SUT decided an answer but could not write it: the terminal never got one
            named = parse_match_key(rec.detail)
            waiting = self._term_pending.get((rec.conn, named.get("class", ""), named.get("11", ""),
                                              named.get("41", "")))
            for case in waiting or ():
                case.conn_closed = True
            return
        if rec.leg is not Leg.TERMINAL or rec.event is not EventKind.CLOSE:
            return
        for key in [k for k in self._term_pending if k[0] == rec.conn]:
            for case in self._term_pending.pop(key):
                case.conn_closed = True
        self._queue.append(ConnEnd(rec.conn, rec.t, tuple(self._answered_since.pop(rec.conn, ())), rec.detail))

    # --- host leg ----------------------------------------------------------------------------------

    def _host_frame(self, rec: FrameRecord) -> None:
        key = (rec.conn, match_class(rec.mti), rec.fields.get("11", ""))
        if is_request(rec.mti):
            if rec.dir is Direction.OUT:
                self._upstream_request(rec, key)
            else:
                flow = _flow(self.dialects["host"], rec)
                case = Case(next(self._ids), CaseKind.HOST, rec.t, rec.conn, rec.fields.get("41", ""),
                            rec.fields.get("11", ""), rec.mti, flow.name if flow is not None else "",
                            Exchange(Leg.HOST, rec.conn, rec))
                self._host_initiated[key] = case
                self._queue.append(case)
            return
        if rec.dir is Direction.OUT:  # the SUT answers a host-initiated request
            initiated = self._host_initiated.pop(key, None)
            if initiated is None:
                self.unpaired_answers += 1
            else:
                initiated.exchange.answer = rec
            return
        pending = self._host_pending.pop(key, None)
        if pending is None:
            self.unpaired_answers += 1
            return
        exchange, owner = pending
        exchange.answer = rec
        if owner is not None and owner.kind is CaseKind.TERMINAL and owner.exchange.answer is not None:
            exchange.late = True
        if owner is not None and rec.mti[1] != "4":
            ref = _reference(rec.fields)
            if ref is not None:
                self._remember(self._by_reference, ref, owner)

    def _relink_by_reference(self, case: Case, answer: FrameRecord) -> None:
        """Alike requests (same terminal, card and amount, in flight together) are linked upstream in
        arrival order, which the SUT need not keep; the answer tells: it carries the RRN and auth code
        of the host answer the SUT got. Swap the upstream exchanges when they name another case's."""
        ref = _reference(answer.fields)
        mine = case.primary
        if ref is None or mine is None or mine.request.cause is not None or (
                mine.answer is not None and _reference(mine.answer.fields) == ref):
            return  # no reference to go by, linked by the SUT's own word (cause), or linked right
        other = self._by_reference.get(ref)
        theirs = other.primary if other is not None else None
        if other is None or other is case or theirs is None or other.terminal != case.terminal \
                or theirs.request.cause is not None or theirs.request.fields.get("4") != mine.request.fields.get("4"):
            return
        case.upstream[case.upstream.index(mine)] = theirs
        other.upstream[other.upstream.index(theirs)] = mine
        self._remember(self._by_reference, ref, case)
        for x, owner in ((theirs, case), (mine, other)):
            if "11" in x.request.fields:
                self._remember(self._by_host_stan, x.request.fields["11"], owner)
            if x.answer is not None and (r := _reference(x.answer.fields)) is not None:
                self._remember(self._by_reference, r, owner)

    def _upstream_request(self, rec: FrameRecord, key: tuple[str, str, str]) -> None:
        if rec.mti[1] == "8":  # the SUT's own sign-on, key exchange, echo test: session, not a case
            self._host_pending[key] = (Exchange(Leg.HOST, rec.conn, rec), None)
            return
        exchange = Exchange(Leg.HOST, rec.conn, rec)
        owner = self._by_seq.get(rec.cause) if rec.cause is not None else None
        if owner is None:
            owner = self._reversal_owner(rec) if rec.mti[1] == "4" else self._financial_owner(rec)
        if owner is None:
            flow = _flow(self.dialects["host"], rec)
            owner = Case(next(self._ids), CaseKind.UPSTREAM, rec.t, rec.conn, rec.fields.get("41", ""),
                         rec.fields.get("11", ""), rec.mti, flow.name if flow is not None else "", exchange)
            self._queue.append(owner)
        else:
            if rec.mti[1] == "4":
                for earlier in owner.upstream:
                    if earlier.answer is None:
                        earlier.late = True  # a reversal, or a repeat, went out while it waited
            owner.upstream.append(exchange)
        if rec.mti[1] != "4" and "11" in rec.fields:
            self._remember(self._by_host_stan, rec.fields["11"], owner)
        self._remember(self._by_seq, rec.seq, owner)  # a reversal or repeat it causes names it
        self._host_pending[key] = (exchange, owner)

    def _financial_owner(self, rec: FrameRecord) -> Case | None:
        tid = rec.fields.get("41", "")
        candidates = [c for c in self._open_by_terminal.get(tid, ())
                      if c.exchange.answer is None and not c.conn_closed and c.primary is None
                      and c.mti[1] != "4" and c.exchange.request.t <= rec.t]
        if not candidates:
            return None
        amount, pan = rec.fields.get("4"), _pan(rec.fields)

        def fits(c: Case) -> bool:
            f = c.exchange.request.fields
            other_pan = _pan(f)
            return ((amount is None or f.get("4") in (None, amount))
                    and (pan is None or other_pan is None or other_pan == pan))

        return next((c for c in candidates if fits(c)), candidates[0])

    def _reversal_owner(self, rec: FrameRecord) -> Case | None:
        f90 = rec.fields.get("90", "")
        original = self._by_host_stan.get(f90[4:10]) if len(f90) >= 10 else None
        if original is None:
            return None
        reversal = original.reversal_case
        return reversal if reversal is not None and reversal.exchange.request.t <= rec.t else original

    # --- readiness ---------------------------------------------------------------------------------

    def _complete(self, case: Case) -> bool:
        if self._now - case.start >= self.horizon:
            return True
        if case.exchange.answer is None and not case.conn_closed:
            if case.kind is CaseKind.TERMINAL or case.kind is CaseKind.HOST:
                return False
            if not case.exchange.late:
                return False
        if any(x.answer is None for x in case.upstream):
            return False  # a late answer too: the trace host must know it to send it late
        return not case.expects_reversal() or case.reversed_upstream()

    def _drain(self, *, final: bool) -> list[Item]:
        out: list[Item] = []
        queue = self._queue
        while queue:
            head = queue[0]
            if isinstance(head, Case) and not final and not self._complete(head):
                break
            out.append(queue.popleft())
            if isinstance(head, Case):
                self._forget_open(head)
        self._sweeps += 1
        if final or self._sweeps % 64 == 0:
            self._expire()
        return out

    def _forget_open(self, case: Case) -> None:
        """A dispatched case takes no further upstream requests through the terminal table, nor (past
        the horizon) its answer."""
        if case.kind is not CaseKind.TERMINAL:
            return
        if case.exchange.answer is None:
            key = (case.conn, match_class(case.mti), case.stan, case.terminal)
            waiting = self._term_pending.get(key)
            if waiting is not None and case in waiting:
                waiting.remove(case)
                if not waiting:
                    del self._term_pending[key]
        still = [c for c in self._open_by_terminal.get(case.terminal, ()) if c is not case]
        if still:
            self._open_by_terminal[case.terminal] = still
        else:
            self._open_by_terminal.pop(case.terminal, None)

    def _remember(self, table: OrderedDict, key: object, case: Case) -> None:  # type: ignore[type-arg]
        table.pop(key, None)
        table[key] = case
        if len(table) > self.lookup_limit:  # a dense trace: the window is this many cases, not 2 horizons
            table.popitem(last=False)

    def _expire(self) -> None:
        cutoff = self._now - 2 * self.horizon
        for table in (self._by_host_stan, self._by_txn, self._by_reference, self._by_seq):
            while table:
                oldest = next(iter(table.values()))
                if oldest.start >= cutoff:
                    break
                table.popitem(last=False)
        if self._sweeps % 1024 == 0:  # a full pass now and then: requests the host never answered
            for key in [k for k, (x, _) in self._host_pending.items() if x.request.t < cutoff]:
                del self._host_pending[key]
            for key in [k for k, c in self._host_initiated.items() if c.start < cutoff]:
                del self._host_initiated[key]
