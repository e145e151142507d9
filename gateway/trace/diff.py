"""`trace diff A B`: two traces compared case by case under the same rules as a replay (in ``diff``
mode: values the host chooses, such as RRNs, are volatile there). A is what is expected (last month's
recording), B what came (a re-run; another gateway on the same input).

Both traces are streamed through `CaseAssembler`; cases pair by terminal, STAN, MTI and flow (and
their order among equal keys), and the two streams are read in step by trace-relative time. A case
of one trace without a partner within `horizon` seconds of the other's is reported as missing
(only in A) or unexpected (only in B); memory holds only the cases within that window.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gateway.trace.cases import DEFAULT_DIALECTS, Case, CaseAssembler, CaseKind, Exchange
from gateway.trace.compare import Comparison, Seen, Where, compare, flow_of, message_key
from gateway.trace.format import FrameRecord, FrameTally, read_trace
from gateway.trace.report import CaseResult, CaseSink, Finding, FindingKind, finding_order
from gateway.trace.rules import Captures, Mode
from gateway.trace.rulesfile import RulesFile


@dataclass(slots=True)
class DiffStats:
    cases_a: int = 0
    cases_b: int = 0
    paired: int = 0
    held_max: int = 0


def _key(case: Case) -> tuple[str, ...]:
    if case.kind is CaseKind.TERMINAL:
        return ("terminal", case.terminal, case.stan, case.mti, case.flow)
    f = case.exchange.request.fields
    if case.kind is CaseKind.HOST:
        return ("host", case.mti, case.stan, f.get("70", ""))
    return ("upstream", case.terminal, case.mti, f.get("4", ""))


class _Side:
    def __init__(self, path: Path, horizon: float) -> None:
        header, records = read_trace(path)
        self.dialects = {**DEFAULT_DIALECTS, **header.dialects}
        self.tally = FrameTally()
        self.cases: Iterator[Case] = (i for i in CaseAssembler(header, horizon).stream(self.tally.count(records))
                                      if isinstance(i, Case))
        self.t0: float | None = None
        self.now = 0.0  #: trace-relative start of the last case read
        self.done = False
        self.count = 0

    def next(self) -> Case | None:
        case = next(self.cases, None)
        if case is None:
            self.done = True
            return None
        if self.t0 is None:
            self.t0 = case.start
        self.now = case.start - self.t0
        self.count += 1
        return case

    def rel(self, case: Case) -> float:
        return case.start - (self.t0 if self.t0 is not None else case.start)


class _Differ:
    def __init__(self, rules: RulesFile, a: _Side, b: _Side) -> None:
        self.rules = rules.rules
        self.a, self.b = a, b
        self.captures = Captures()

    def compare_case(self, ca: Case, cb: Case) -> CaseResult:
        findings: list[Finding] = []
        name = ca.name
        if ca.kind is CaseKind.HOST:
            self._exchange(findings, name, ca, "host", ("in", "out"), ca.exchange, cb.exchange)
        else:
            leg = "terminal" if ca.kind is CaseKind.TERMINAL else "host"
            dirs = ("in", "out") if leg == "terminal" else ("out", "in")
            self._exchange(findings, name, ca, leg, dirs, ca.exchange, cb.exchange)
            if ca.kind is CaseKind.TERMINAL:
                ups_a, ups_b = ca.upstream, cb.upstream
                for xa, xb in zip(ups_a, ups_b, strict=False):
                    self._exchange(findings, name, ca, "host", ("out", "in"), xa, xb)
                for xa in ups_a[len(ups_b):]:
                    r = xa.request
                    findings.append(Finding(FindingKind.MISSING_FRAME, f"{name}: B has no upstream {r.mti} "
                                            f"where A has one (A's host stan {r.fields.get('11', '-')})",
                                            leg="host", mti=r.mti, terminal=ca.terminal, seq=r.seq))
                for xb in ups_b[len(ups_a):]:
                    r = xb.request
                    findings.append(Finding(FindingKind.UNEXPECTED_FRAME, f"{name}: B has an upstream {r.mti} "
                                            f"A does not have (B's host stan {r.fields.get('11', '-')})",
                                            leg="host", mti=r.mti, terminal=ca.terminal, seq=r.seq))
        return CaseResult(name, sorted(findings, key=finding_order))

    def _exchange(self, out: list[Finding], name: str, case: Case, leg: str, dirs: tuple[str, str],
                  xa: Exchange, xb: Exchange) -> None:
        self._message(out, name, case, leg, dirs[0], xa.request, xb.request, None)
        if xa.answer is None and xb.answer is None:
            return
        if xa.answer is None or xb.answer is None:
            present = xb.answer if xb.answer is not None else xa.answer
            assert present is not None
            kind = FindingKind.UNEXPECTED_FRAME if xa.answer is None else FindingKind.MISSING_FRAME
            where = "only B" if xa.answer is None else "only A"
            out.append(Finding(kind, f"{name}: {leg} {present.mti} answer to {xa.request.mti} in {where}",
                               leg=leg, mti=present.mti, terminal=case.terminal, stan=case.stan, seq=present.seq))
            return
        self._message(out, name, case, leg, dirs[1], xa.answer, xb.answer, xb.request.fields, xa.request.fields)

    def _message(self, out: list[Finding], name: str, case: Case, leg: str, direction: str, ra: FrameRecord,
                 rb: FrameRecord, request: dict[str, str] | None,
                 recorded_request: dict[str, str] | None = None) -> None:
        dialect = self.b.dialects[leg]
        flow = flow_of(dialect, rb.mti, rb.fields)
        cmp = Comparison(self.rules, message_key(dialect, leg, direction, rb.mti, flow, Mode.DIFF),
                         Where(name, leg, case.terminal, rb.fields.get("11", "")), self.captures, flow,
                         request=request, recorded_request=recorded_request,
                         recorded_answer=ra.fields if recorded_request is not None else None)
        out += compare(cmp, Seen.of(ra), Seen.of(rb))


def diff(a: Path, b: Path, rules: RulesFile, sink: CaseSink, *, horizon: float = 30.0) -> DiffStats:
    """Compare B against A; every pair of cases and every unpaired case goes to `sink`."""
    side_a, side_b = _Side(a, horizon), _Side(b, horizon)
    differ = _Differ(rules, side_a, side_b)
    stats = DiffStats()
    waiting: dict[str, OrderedDict[tuple[str, ...], list[Case]]] = {"a": OrderedDict(), "b": OrderedDict()}

    def take(side: str, case: Case) -> None:
        other = "b" if side == "a" else "a"
        key = _key(case)
        partners = waiting[other].get(key)
        if partners:
            partner = partners.pop(0)
            if not partners:
                del waiting[other][key]
            ca, cb = (case, partner) if side == "a" else (partner, case)
            sink.add(differ.compare_case(ca, cb))
            stats.paired += 1
        else:
            waiting[side].setdefault(key, []).append(case)
        stats.held_max = max(stats.held_max, sum(len(v) for w in waiting.values() for v in w.values()))

    def expire(final: bool) -> None:
        for side, this, other in (("a", side_a, side_b), ("b", side_b, side_a)):
            table = waiting[side]
            for key in list(table):
                kept = []
                for case in table[key]:
                    if final or other.done or other.now - this.rel(case) > horizon:
                        if side == "a":
                            sink.add(CaseResult(case.name, [Finding(FindingKind.MISSING_FRAME,
                                     f"{case.name}: only in A ({a.name}); B has no such case", terminal=case.terminal,
                                     stan=case.stan, mti=case.mti, seq=case.exchange.request.seq)]))
                        else:
                            sink.add(CaseResult(case.name, [Finding(FindingKind.UNEXPECTED_FRAME,
                                     f"{case.name}: only in B ({b.name}); A has no such case", terminal=case.terminal,
                                     stan=case.stan, mti=case.mti, seq=case.exchange.request.seq)]))
                    else:
                        kept.append(case)
                if kept:
                    table[key] = kept
                else:
                    del table[key]

    steps = 0
    while not (side_a.done and side_b.done):
        # read the side that is behind in trace-relative time, so the two stay in step
        side, which = ((side_a, "a") if not side_a.done and (side_b.done or side_a.now <= side_b.now)
                       else (side_b, "b"))
        case = side.next()
        if case is not None:
            take(which, case)
        steps += 1
        if steps % 64 == 0 or side.done:
            expire(final=False)
    expire(final=True)
    for name, path, side in (("A", a, side_a), ("B", b, side_b)):
        # two traces that decode nothing "agree" case for case: that must not pass as a diff
        if (reason := side.tally.nothing_to_compare()) is not None:
            sink.add(CaseResult(f"decode: {name} ({path.name})",
                                [Finding(FindingKind.DECODE, f"{name} ({path.name}): {reason}")]))
    stats.cases_a, stats.cases_b = side_a.count, side_b.count
    return stats
