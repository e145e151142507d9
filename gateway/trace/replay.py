"""`trace replay`: the recorded terminal leg played against a SUT, the recorded host leg answered by
the trace host, and every answer and upstream request compared with the recording.

The trace is streamed through `CaseAssembler`; each case is dispatched when it is complete in the
recording (or its horizon passed), at its recorded time (``--pace recorded``, or scaled ``xN``) or as
soon as causality allows (``asap``): a request waits for the requests sent before it on its
connection, and for the answers the recording shows it waited for. At most ``concurrency`` cases are
in flight; the run's memory is what those cases, the assembler's window and the bounded capture and
pairing tables hold, whatever the trace's length.

A case passes when its answer came and every field of it and of the upstream requests it caused
obeys its rule, every upstream request of the recording came (a recorded reversal too), and nothing
came that the recording does not have.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import anyio
import anyio.abc
import anyio.lowlevel

from gateway.config import Endpoint
from gateway.iso.build import TerminalIdent, cup
from gateway.iso.errors import IsoError
from gateway.iso.message import Message
from gateway.iso.mti import response_mti
from gateway.sim.keyfile import LabKeys
from gateway.trace.cases import DEFAULT_DIALECTS, Case, CaseAssembler, CaseKind, ConnEnd, Exchange, Item
from gateway.trace.compare import Comparison, Seen, Where, compare, flow_of, message_key, substitute_refs
from gateway.trace.format import FrameRecord, Leg, TraceFormatError, TraceHeader, read_trace, validate_trace
from gateway.trace.pace import Pace
from gateway.trace.player import Answer, PlayerError, TerminalPlayer, WorkingKeys, lab_terminal
from gateway.trace.report import CaseResult, CaseSink, Finding, FindingKind, finding_order
from gateway.trace.rules import Captures, Check, Mode, Rule, RulesError
from gateway.trace.rulesfile import RulesFile
from gateway.trace.templates import Template, build_request
from gateway.trace.trace_host import Expectation, HostAnswer, TraceHost

log = logging.getLogger("gateway.trace.replay")

DEFAULT_PIN: Final = "123456"
VERIFY_MAC: Final = Rule(Check.VERIFY, text="verify", origin="template")
#: after a late host answer went out, how long a case waits for the SUT to (wrongly) forward it
SETTLE: Final = 0.2


class ReplayError(Exception):
    """The run cannot start (the SUT never signed on, a port is taken, a file is unusable)."""


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    target: Endpoint
    host_listen: Endpoint
    keys: LabKeys
    rules: RulesFile
    pace: Pace = field(default_factory=Pace)
    concurrency: int = 100
    pin: str = DEFAULT_PIN
    answer_timeout: float = 10.0  #: beyond the recorded answer time
    grace: float = 5.0  #: beyond the recorded time of an upstream request, before it counts as missing
    horizon: float = 30.0  #: trace seconds a case may stay incomplete in the recording
    ready_timeout: float = 30.0  #: for the SUT to connect to the trace host and sign on
    progress: float = 10.0  #: seconds between progress lines (0: none)
    terminal_mac: str = "cup-ecb"


@dataclass(slots=True)
class ReplayStats:
    seconds: float = 0.0
    cases: int = 0
    upstream_requests: int = 0
    unexpected_upstream: int = 0
    held_max: int = 0  #: the most items the assembler held at once (what bounds memory)


def template_header() -> TraceHeader:
    """What a replay without a trace assumes: our two dialects and framings."""
    return TraceHeader(source="templates", dialects=dict(DEFAULT_DIALECTS),
                       framings={"terminal": "cup", "host": "len2"})


class _Live:
    """A case in flight."""

    def __init__(self, run: _Run, name: str, terminal: str, stan: str, case: Case | None = None,
                 template: Template | None = None) -> None:
        self.run = run
        self.name = name
        self.terminal = terminal
        self.stan = stan
        self.case = case
        self.template = template
        self.findings: list[Finding] = []
        self.expectations: list[Expectation] = []
        self.sent = anyio.Event()
        self.answered = anyio.Event()
        self.done = anyio.Event()
        self.started = anyio.current_time()

    def add(self, kind: FindingKind, text: str, *, leg: str = "", mti: str = "", stan: str = "",
            seq: int | None = None, expected: str = "", got: str = "") -> None:
        self.findings.append(Finding(kind, f"{self.name}: {text}", leg=leg, mti=mti, terminal=self.terminal,
                                     stan=stan, expected=expected, got=got, seq=seq))

    def on_upstream(self, exp: Expectation, msg: Message, verified: dict[str, str]) -> None:
        """An upstream request of the SUT paired with one of this case's expectations: compare it now
        (captures must be recorded in the order things happen)."""
        self.run.stats.upstream_requests += 1
        dialect = self.run.dialects["host"]
        flow = flow_of(dialect, msg.mti, msg.fields)
        cmp = Comparison(self.run.rules.rules, message_key(dialect, "host", "out", msg.mti, flow, Mode.REPLAY),
                         Where(self.name, "host", self.terminal, msg.fields.get("11", "")), self.run.captures,
                         flow, verified=verified)
        if exp.exchange is not None:
            self.findings += compare(cmp, Seen.of(exp.exchange.request), Seen(msg.mti, msg.fields))
        elif self.template is not None:
            cmp.overrides = dict(self.template.expect_upstream)
            self.findings += compare(cmp, None, Seen(msg.mti, msg.fields))

    def exchange_answered_in_recording_before(self, t: float) -> bool:
        """Whether the recording shows this case's answer before `t` (then a close at `t` waits for it)."""
        answer = self.case.exchange.answer if self.case is not None else None
        return answer is not None and answer.t <= t

    def result(self) -> CaseResult:
        return CaseResult(self.name, sorted(self.findings, key=finding_order),
                          seconds=anyio.current_time() - self.started)


@dataclass(slots=True)
class _ConnState:
    last_sent: anyio.Event
    player: TerminalPlayer | None = None
    failed: str = ""
    #: cases on this connection not finished yet (its recorded close waits for them)
    open_cases: list[_Live] = field(default_factory=list)


class _Run:
    def __init__(self, options: ReplayOptions, header: TraceHeader, sink: CaseSink,
                 say: Callable[[str], None]) -> None:
        self.options = options
        self.rules = options.rules
        self.sink = sink
        self.say = say
        self.dialects = {**DEFAULT_DIALECTS, **header.dialects}
        self.framings = {"terminal": "cup", "host": "len2", **header.framings}
        self.captures = Captures()
        self.keys = WorkingKeys()
        self.stats = ReplayStats()
        self.host = TraceHost(zmk=options.keys.zmk, lab_pin=options.pin, pace=options.pace,
                              dialect=self.dialects["host"], framing=self.framings["host"])
        self.host.on_unexpected = self._unexpected
        self.conns: dict[str, _ConnState] = {}
        self.live: dict[int, _Live] = {}
        self.by_terminal: dict[str, list[_Live]] = {}
        self.orphans: list[Finding] = []
        self.limiter = anyio.Semaphore(max(1, options.concurrency))
        self.t0_replay = 0.0
        self.t0_trace: float | None = None
        self.trace_now = 0.0
        self.stans: dict[str, int] = {}  #: per terminal, the highest STAN seen (templates go on from it)
        self.batches: dict[str, str] = {}  #: per terminal, the batch of its last sign-in
        self.player_tg: anyio.abc.TaskGroup | None = None

    # --- the whole run -----------------------------------------------------------------------------

    async def run(self, items: Iterator[Item], assembler: CaseAssembler | None) -> None:
        opts = self.options
        async with anyio.create_task_group() as outer:
            try:
                await outer.start(self.host.serve, opts.host_listen.host, opts.host_listen.port)
            except OSError as exc:
                raise ReplayError(f"the trace host cannot listen on {opts.host_listen}: {exc}") from None
            self.say(f"trace host listening on {opts.host_listen.host}:{self.host.port}; waiting for the SUT "
                     f"to sign on (up to {opts.ready_timeout:g}s)")
            with anyio.move_on_after(opts.ready_timeout):
                await self.host.ready.wait()
            if not self.host.ready.is_set():
                if not self.host.connected:
                    raise ReplayError(f"the SUT did not connect to the trace host at {opts.host_listen.host}:"
                                      f"{self.host.port} and sign on within {opts.ready_timeout:g}s")
                self.say("the SUT connected to the trace host but did not sign on: going on without")
            self.player_tg = outer
            if opts.progress > 0:
                outer.start_soon(self._progress)
            self.t0_replay = anyio.current_time()
            async with anyio.create_task_group() as cases:
                for n, item in enumerate(items):
                    if assembler is not None:
                        self.stats.held_max = max(self.stats.held_max, assembler.held)
                    if n % 64 == 0:
                        await anyio.lowlevel.checkpoint()
                    await self._dispatch(cases, item)
            await self._run_templates()
            if self.orphans:
                self.sink.add(CaseResult("upstream requests no case explains", self.orphans[:1000]))
                self.stats.cases += 1
            for state in self.conns.values():
                if state.player is not None:
                    await state.player.close()
            outer.cancel_scope.cancel()

    async def _progress(self) -> None:
        while True:
            await anyio.sleep(self.options.progress)
            position = self.trace_now - (self.t0_trace or self.trace_now)
            self.say(f"replay: {self.sink.total} cases done ({self.sink.failed} failed), {len(self.live)} in "
                     f"flight, trace +{position:.1f}s, {anyio.current_time() - self.t0_replay:.0f}s")

    async def _until(self, trace_t: float) -> None:
        if self.t0_trace is None:
            self.t0_trace = trace_t
        offset = self.options.pace.offset(trace_t - self.t0_trace)
        if offset is not None:
            delay = self.t0_replay + offset - anyio.current_time()
            if delay > 0:
                await anyio.sleep(delay)

    # --- dispatch ----------------------------------------------------------------------------------

    async def _dispatch(self, tg: anyio.abc.TaskGroup, item: Item) -> None:
        if self.t0_trace is None:
            self.t0_trace = item.t if isinstance(item, ConnEnd) else item.start
        if isinstance(item, ConnEnd):
            state = self._conn(item.conn)
            prev, state.last_sent = state.last_sent, anyio.Event()
            tg.start_soon(self._close_conn, item, state, prev)
            return
        self.trace_now = max(self.trace_now, item.start)
        await self.limiter.acquire()
        live = _Live(self, item.name, item.terminal, item.stan, item)
        self.live[item.id] = live
        self.by_terminal.setdefault(item.terminal, []).append(live)
        if item.kind is CaseKind.TERMINAL:
            if item.stan.isdigit():
                self.stans[item.terminal] = max(self.stans.get(item.terminal, 0), int(item.stan))
            self._expect(live, item.upstream)
            state = self._conn(item.conn)
            prev, state.last_sent = state.last_sent, live.sent
            state.open_cases.append(live)
            tg.start_soon(self._finish, live, self._terminal_case(live, item, state, prev))
        elif item.kind is CaseKind.HOST:
            tg.start_soon(self._finish, live, self._host_case(live, item))
        else:
            self._expect(live, [item.exchange, *item.upstream])
            tg.start_soon(self._finish, live, self._upstream_case(live, item))

    def _conn(self, name: str) -> _ConnState:
        state = self.conns.get(name)
        if state is None:
            done = anyio.Event()
            done.set()
            state = self.conns[name] = _ConnState(done)
        return state

    def _expect(self, live: _Live, exchanges: list[Exchange]) -> None:
        known = {id(e.exchange) for e in live.expectations}
        for x in exchanges:
            if id(x) in known:
                continue
            exp = Expectation(live, x)
            live.expectations.append(exp)
            self.host.book.add(exp)

    async def _finish(self, live: _Live, work: Awaitable[None]) -> None:
        try:
            await work
        except PlayerError as exc:
            live.add(FindingKind.MISSING_FRAME, f"the player could not talk to the SUT: {exc}")
        except Exception as exc:  # a defect of the tool must fail the case loudly, not stop the run
            log.exception("%s: the replay failed internally", live.name)
            live.add(FindingKind.INVARIANT, f"internal error of the replay: {type(exc).__name__}: {exc}")
        finally:
            live.sent.set()
            live.answered.set()
            live.done.set()
            if live.case is not None and live.case.kind is CaseKind.TERMINAL:
                cases = self._conn(live.case.conn).open_cases
                if live in cases:
                    cases.remove(live)
            for exp in live.expectations:
                self.host.book.discard(exp)
            if live.case is not None:
                self.live.pop(live.case.id, None)
            same = self.by_terminal.get(live.terminal)
            if same is not None:
                if live in same:
                    same.remove(live)
                if not same:
                    del self.by_terminal[live.terminal]
            self.sink.add(live.result())
            self.stats.cases += 1
            self.limiter.release()

    async def _after(self, ids: tuple[int, ...]) -> None:
        for dep in ids:
            other = self.live.get(dep)
            if other is not None:
                await other.answered.wait()

    async def _player(self, conn: str, state: _ConnState) -> TerminalPlayer:
        if state.failed:
            raise PlayerError(state.failed)
        if state.player is None or state.player.closed:
            player = TerminalPlayer(conn, self.options.target, keys=self.keys, lab=self.options.keys,
                                    pin=self.options.pin, mac_algorithm=self.options.terminal_mac,
                                    dialect=self.dialects["terminal"], framing=self.framings["terminal"])
            assert self.player_tg is not None
            try:
                await self.player_tg.start(player.run)
            except PlayerError as exc:
                state.failed = str(exc)
                raise
            state.player = player
        return state.player

    # --- terminal cases ----------------------------------------------------------------------------

    async def _terminal_case(self, live: _Live, case: Case, state: _ConnState, prev: anyio.Event) -> None:
        rec = case.exchange.request
        try:
            await prev.wait()
            await self._after(case.after)
            await self._until(case.start)
            player = await self._player(case.conn, state)
            if self._needs_keys(rec.fields) and not self.keys.signed_in(case.terminal):
                await self._sign_in(live, player, rec.fields)
            dialect = self.dialects["terminal"]
            flow = flow_of(dialect, rec.mti, rec.fields)
            fields = substitute_refs(self.rules.rules, message_key(dialect, "terminal", "in", rec.mti, flow,
                                                                   Mode.REPLAY), dict(rec.fields), self.captures, flow)
            if rec.mti == "0800" and fields.get("60", "")[2:8].isdigit():
                self.batches[case.terminal] = fields["60"][2:8]
            prepared = player.prepare(rec.mti, fields, rec.secrets, rec.envelope)
            for note in prepared.notes:
                log.warning("%s: %s", live.name, note)
            recorded = case.exchange.answer
            timeout = (case.exchange.delay or 0.0) + self.options.answer_timeout
            if recorded is None and case.conn_closed:
                timeout = self.options.answer_timeout / 4  # the recording closed the connection instead
            sent_at = anyio.current_time()
            slot = await player.send(prepared)
        finally:
            live.sent.set()  # the connection's next request may go (also when this one could not)
        assert slot is not None
        answer = await player.wait(slot, timeout)
        self._judge_answer(live, rec, prepared.message, recorded, answer, player, timeout)
        live.answered.set()
        await self._await_upstream(live, case, sent_at, player)

    def _needs_keys(self, fields: dict[str, str]) -> bool:
        return "64" in fields or "52" in fields or fields.get("53", "")[2:3] == "1"

    async def _sign_in(self, live: _Live, player: TerminalPlayer, fields: dict[str, str]) -> None:
        """The trace has no sign-in for this terminal before a MAC'd request: sign in as it would."""
        tid = fields.get("41", "")
        entry = lab_terminal(self.options.keys, tid)
        merchant = entry.merchant_id if entry is not None else fields.get("42", "")
        batch = fields.get("60", "")[2:8] or "000001"
        try:
            request = cup.sign_in(TerminalIdent(tid, merchant), self._next_stan(tid), batch)
        except IsoError as exc:
            live.add(FindingKind.FIELD, f"automatic sign-in impossible: {exc}", leg="terminal", mti="0800")
            return
        prepared = player.prepare(request.mti, request.fields, {}, None)
        answer = await player.exchange(prepared, self.options.answer_timeout)
        if answer is None:
            live.add(FindingKind.MISSING_FRAME, "automatic sign-in: no answer", leg="terminal", mti="0800")
            return
        problem = player.verify(prepared.message, answer).get("62", "no key block in the answer")
        if answer.message.fields.get("39") != "00" or problem:
            live.add(FindingKind.FIELD, f"automatic sign-in refused ({answer.message.fields.get('39')}"
                     f"{': ' + problem if problem else ''})", leg="terminal", mti="0810")
        else:
            self.batches[tid] = batch

    def _next_stan(self, tid: str) -> str:
        n = self.stans.get(tid, 0) % 999_999 + 1
        self.stans[tid] = n
        return f"{n:06d}"

    def _judge_answer(self, live: _Live, rec_request: FrameRecord, sent: Message, recorded: FrameRecord | None,
                      answer: Answer | None, player: TerminalPlayer, timeout: float) -> None:
        stan = sent.fields.get("11", "")
        if answer is None:
            self._no_answer(live, sent, recorded, player, timeout, rec_request.seq)
            return
        verified = player.verify(sent, answer)
        msg = answer.message
        if recorded is None:
            live.add(FindingKind.UNEXPECTED_FRAME, f"an answer {msg.mti} rc {msg.fields.get('39', '-')} the "
                     "recording does not have (it shows none)", leg="terminal", mti=msg.mti, stan=stan)
            return
        dialect = self.dialects["terminal"]
        flow = flow_of(dialect, msg.mti, msg.fields) or flow_of(dialect, sent.mti, sent.fields)
        cmp = Comparison(self.rules.rules, message_key(dialect, "terminal", "out", msg.mti, flow, Mode.REPLAY),
                         Where(live.name, "terminal", live.terminal, stan), self.captures, flow,
                         request=sent.fields, verified=verified, recorded_request=rec_request.fields,
                         recorded_answer=recorded.fields)
        live.findings += compare(cmp, Seen.of(recorded), Seen(msg.mti, msg.fields))

    def _no_answer(self, live: _Live, sent: Message, recorded: FrameRecord | None, player: TerminalPlayer,
                   timeout: float, seq: int | None) -> None:
        """No answer paired with `sent`: an answer that came with a wrong match key, or a timeout."""
        stan = sent.fields.get("11", "")
        mismatch = player.take_unpaired(sent)
        if mismatch is not None:
            got = mismatch.message
            live.add(FindingKind.MATCH_KEY,
                     f"an answer {got.mti} came for terminal {got.fields.get('41', '?')} stan "
                     f"{got.fields.get('11', '?')}, which does not pair with the request {sent.mti} stan {stan} "
                     f"(expected {response_mti(sent.mti)}, stan {stan}, terminal {sent.fields.get('41', '')})",
                     leg="terminal", mti=got.mti, stan=got.fields.get("11", ""), seq=seq,
                     expected=f"{response_mti(sent.mti)} stan {stan}", got=f"{got.mti} stan {got.fields.get('11', '')}")
        elif recorded is not None:
            live.add(FindingKind.MISSING_FRAME, f"no answer to {sent.mti} stan {stan} within {timeout:.1f}s "
                     f"(the recording has {recorded.mti} rc {recorded.fields.get('39', '-')})",
                     leg="terminal", mti=recorded.mti, stan=stan, seq=recorded.seq)
        elif live.template is not None:
            live.add(FindingKind.MISSING_FRAME, f"no answer to {sent.mti} stan {stan} within {timeout:.1f}s",
                     leg="terminal", mti=sent.mti, stan=stan)

    async def _await_upstream(self, live: _Live, case: Case, sent_at: float,
                              player: TerminalPlayer | None = None) -> None:
        """Until every upstream request the recording has for this case came and was answered (late
        answers too: the SUT must not forward them), or its time is up."""
        self._expect(live, case.upstream)  # the recording may have attached more since dispatch
        last = max((x.request.t for x in case.upstream), default=case.start)
        deadline = sent_at + (last - case.start) + self.options.grace
        for exp in live.expectations:
            with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
                await exp.seen.wait()
        for exp in live.expectations:
            if not exp.seen.is_set() and exp.exchange is not None:
                r = exp.exchange.request
                live.add(FindingKind.MISSING_FRAME,
                         f"the SUT never sent the upstream {r.mti} the recording has (recorded host stan "
                         f"{r.fields.get('11', '-')}, amount {r.fields.get('4', '-')})",
                         leg="host", mti=r.mti, stan=r.fields.get("11", ""), seq=r.seq)
        late = [e for e in live.expectations if e.seen.is_set() and not e.answered.is_set()]
        if late:
            bound = max((e.exchange.delay or 0.0) for e in late if e.exchange is not None) if any(
                e.exchange is not None for e in late) else 0.0
            with anyio.move_on_after(bound + self.options.grace):
                for e in late:
                    await e.answered.wait()
            if player is not None:
                await anyio.sleep(SETTLE)  # what the SUT does with a late answer, it does now
        if player is not None and case.exchange.answer is not None:
            self._second_answers(live, player, case)

    def _second_answers(self, live: _Live, player: TerminalPlayer, case: Case) -> None:
        """An answer that pairs with this case's request after its own answer came: the SUT answered
        twice (e.g. forwarded a late host answer)."""
        rec = case.exchange.request
        for a in list(player.unpaired):
            f = a.message.fields
            if f.get("11") == rec.fields.get("11") and f.get("41") == rec.fields.get("41") \
                    and a.message.mti[:3] == response_mti(rec.mti)[:3]:
                player.unpaired.remove(a)
                live.add(FindingKind.UNEXPECTED_FRAME, f"a second answer {a.message.mti} rc "
                         f"{f.get('39', '-')} to {rec.mti} stan {f.get('11')} (the recording has one)",
                         leg="terminal", mti=a.message.mti, stan=f.get("11", ""))

    async def _close_conn(self, end: ConnEnd, state: _ConnState, prev: anyio.Event) -> None:
        await prev.wait()
        await self._after(end.after)
        await self._until(end.t)
        for live in list(state.open_cases):  # a late answer the SUT might forward must find the player there
            if live.exchange_answered_in_recording_before(end.t):
                await live.done.wait()
        state.last_sent.set()
        if state.player is not None:
            await state.player.close()
        if self.conns.get(end.conn) is state and not state.open_cases:
            del self.conns[end.conn]  # connection names do not come back: keep memory flat

    # --- host-initiated and lone upstream cases ----------------------------------------------------

    async def _host_case(self, live: _Live, case: Case) -> None:
        rec = case.exchange.request
        await self._until(case.start)
        sent = Message(rec.mti, dict(rec.fields))
        answer = await self.host.send_request(sent, (case.exchange.delay or 0.0) + self.options.answer_timeout)
        recorded = case.exchange.answer
        if answer is None:
            if recorded is not None:
                live.add(FindingKind.MISSING_FRAME, f"the SUT did not answer the host's {rec.mti} stan "
                         f"{rec.fields.get('11', '-')}", leg="host", mti=recorded.mti, seq=recorded.seq)
            return
        if recorded is None:
            live.add(FindingKind.UNEXPECTED_FRAME, f"the SUT answered the host's {rec.mti} ({answer.mti}); the "
                     "recording has no answer", leg="host", mti=answer.mti)
            return
        dialect = self.dialects["host"]
        flow = flow_of(dialect, answer.mti, answer.fields)
        cmp = Comparison(self.rules.rules, message_key(dialect, "host", "out", answer.mti, flow, Mode.REPLAY),
                         Where(live.name, "host", live.terminal, answer.fields.get("11", "")), self.captures, flow,
                         request=sent.fields, recorded_request=rec.fields, recorded_answer=recorded.fields)
        live.findings += compare(cmp, Seen.of(recorded), Seen(answer.mti, answer.fields))

    async def _upstream_case(self, live: _Live, case: Case) -> None:
        await self._until(case.start)
        await self._await_upstream(live, case, anyio.current_time())

    def _unexpected(self, msg: Message, verified: dict[str, str]) -> None:
        del verified
        self.stats.unexpected_upstream += 1
        tid = msg.fields.get("41", "")
        text = (f"an upstream {msg.mti} (host stan {msg.fields.get('11', '-')}, amount {msg.fields.get('4', '-')}) "
                "the recording does not have")
        candidates = self.by_terminal.get(tid)
        if candidates:
            candidates[-1].add(FindingKind.UNEXPECTED_FRAME, text, leg="host", mti=msg.mti,
                               stan=msg.fields.get("11", ""))
        elif len(self.orphans) < 1000:
            self.orphans.append(Finding(FindingKind.UNEXPECTED_FRAME, f"terminal {tid or '?'}: {text}", leg="host",
                                        mti=msg.mti, terminal=tid, stan=msg.fields.get("11", "")))

    # --- template cases ----------------------------------------------------------------------------

    async def _run_templates(self) -> None:
        originals: dict[str, Message] = {}
        for t in self.rules.templates:
            await self.limiter.acquire()
            tid = t.terminal or (self.options.keys.terminals[0].terminal_id if self.options.keys.terminals else "")
            live = _Live(self, t.name, tid, t.stan or "", template=t)
            self.by_terminal.setdefault(tid, []).append(live)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._finish, live, self._template_case(live, t, tid, originals))

    async def _template_case(self, live: _Live, t: Template, tid: str, originals: dict[str, Message]) -> None:
        entry = lab_terminal(self.options.keys, tid)
        merchant = t.merchant or (entry.merchant_id if entry is not None else "")
        state = self._conn(f"template:{tid}")
        player = await self._player(f"template:{tid}", state)
        if t.flow != "sign_in" and not self.keys.signed_in(tid):
            await self._sign_in(live, player, {"41": tid, "42": merchant, "60": "00" + self.batches.get(tid, "000001")})
        stan = t.stan or self._next_stan(tid)
        live.stan = stan
        try:
            built = build_request(t, terminal=tid, merchant=merchant, stan=stan,
                                  batch=t.batch or self.batches.get(tid, "000001"), lab_pin=self.options.pin,
                                  captures=self.captures, originals=originals)
        except RulesError as exc:
            live.add(FindingKind.FIELD, str(exc))
            return
        if t.upstream is not False:
            answer_spec = HostAnswer(t.host, t.host_delay)
            exp = Expectation(live, None, template_answer=answer_spec, pin=built.pin)
            live.expectations.append(exp)
            self.host.book.add(exp)
        prepared = player.prepare(built.message.mti, built.message.fields, built.secrets, None, pin=built.pin or "")
        originals[t.name] = prepared.message
        answer = await player.exchange(prepared, self.options.answer_timeout + t.host_delay)
        live.answered.set()
        if answer is None:
            self._no_answer(live, prepared.message, None, player, self.options.answer_timeout + t.host_delay, None)
        else:
            verified = player.verify(prepared.message, answer)
            msg = answer.message
            dialect = self.dialects["terminal"]
            flow = flow_of(dialect, msg.mti, msg.fields)
            cmp = Comparison(self.rules.rules, message_key(dialect, "terminal", "out", msg.mti, flow, Mode.REPLAY),
                             Where(live.name, "terminal", tid, stan), self.captures, flow,
                             request=prepared.message.fields, verified=verified,
                             overrides={"64": VERIFY_MAC, **t.expect})
            live.findings += compare(cmp, None, Seen(msg.mti, msg.fields))
        if t.upstream:
            for exp in live.expectations:
                with anyio.move_on_after(self.options.grace):
                    await exp.seen.wait()
                if not exp.seen.is_set():
                    live.add(FindingKind.MISSING_FRAME, "the SUT never asked the host (upstream = true)", leg="host")


async def replay(trace: Path | None, options: ReplayOptions, sink: CaseSink,
                 say: Callable[[str], None] = lambda line: None) -> ReplayStats:
    """Run a replay (a trace, its rules file's template cases, or both) and feed `sink` the results."""
    if trace is not None:
        try:
            header, tally = validate_trace(trace)  # a bad line refuses the run now, before a trace host listens
        except TraceFormatError as exc:
            raise ReplayError(f"{trace}: not a valid trace: {exc}") from None
        if (reason := tally.nothing_to_compare()) is not None:
            raise ReplayError(f"{trace}: {reason}: nothing to replay")
        # refused on the header, before the records are opened (a refused run must not leave the file open)
        if header.dialects.get(Leg.TERMINAL.value, "cup-pos") != "cup-pos":
            raise ReplayError(f"{trace}: the player speaks the CUP POS terminal dialect only "
                              f"(the trace's terminal leg is {header.dialects.get('terminal')})")
        header, records = read_trace(trace)
        assembler: CaseAssembler | None = CaseAssembler(header, options.horizon)
        assert assembler is not None
        items: Iterator[Item] = assembler.stream(records)
    else:
        header, assembler, items = template_header(), None, iter(())
    run = _Run(options, header, sink, say)
    started = anyio.current_time()
    try:
        await run.run(items, assembler)
    except BaseExceptionGroup as group:
        cause = _single(group)
        if isinstance(cause, ReplayError | OSError):
            raise cause from None  # a run that could not start: one line for the command, no trace back
        raise
    run.stats.seconds = anyio.current_time() - started
    return run.stats


def _single(exc: BaseException) -> BaseException:
    """The one exception inside (nested) task-group exception groups, or the group itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


__all__ = ["Pace", "ReplayError", "ReplayOptions", "ReplayStats", "replay"]
