"""The case assembler on hand-built traces: pairing on both legs, linking upstream requests to the
terminal request that caused them (the SUT's own STANs), reversals by field 90, recorded timeouts,
host-initiated requests, and constant memory over a long trace."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from gateway.trace.cases import Case, CaseAssembler, CaseKind, ConnEnd
from gateway.trace.format import Direction, EventKind, EventRecord, FrameRecord, Leg, Record, TraceHeader

HEADER = TraceHeader(source="test", dialects={"terminal": "cup-pos", "host": "iso87-ascii"},
                     framings={"terminal": "cup", "host": "len2"})


class Builder:
    def __init__(self) -> None:
        self.seq = itertools.count(1)

    def term(self, t: float, direction: Direction, conn: str, mti: str, tid: str, stan: str, amount: str = "",
             rc: str = "", txn: str = "22") -> FrameRecord:
        fields = {"11": stan, "41": tid, "42": "898100012340001", "60": f"{txn}000001000500"}
        if amount:
            fields["4"] = amount
        if mti[1] == "2" or mti[1] == "4":
            fields["3"] = "000000"
        if mti == "0800":
            fields["60"] = "00000001004"
        if rc:
            fields["39"] = rc
        return FrameRecord(next(self.seq), t, Leg.TERMINAL, direction, conn, mti, fields)

    def host(self, t: float, direction: Direction, mti: str, tid: str, stan: str, amount: str = "", rc: str = "",
             f90: str = "", conn: str = "H1") -> FrameRecord:
        fields = {"3": "000000", "7": "1124101010", "11": stan, "41": tid}
        if amount:
            fields["4"] = amount
        if rc:
            fields["39"] = rc
        if f90:
            fields["90"] = f90
        return FrameRecord(next(self.seq), t, Leg.HOST, direction, conn, mti, fields)


IN, OUT = Direction.IN, Direction.OUT


def cases(records: list[Record], horizon: float = 30.0) -> list[Case]:
    return [i for i in CaseAssembler(HEADER, horizon).stream(records) if isinstance(i, Case)]


def test_interleaved_terminals_pair_with_their_own_upstream_requests() -> None:
    b = Builder()
    records: list[Record] = [
        b.term(1.00, IN, "T1", "0200", "10000001", "000001", "000000001000"),
        b.term(1.01, IN, "T2", "0200", "10000002", "000001", "000000002000"),
        # the SUT allocates its own STANs upstream; the answers come back in the other order
        b.host(1.02, OUT, "0200", "10000002", "000051", "000000002000"),
        b.host(1.03, OUT, "0200", "10000001", "000052", "000000001000"),
        b.host(1.04, IN, "0210", "10000001", "000052", "000000001000", "00"),
        b.host(1.05, IN, "0210", "10000002", "000051", "000000002000", "51"),
        b.term(1.06, OUT, "T2", "0210", "10000002", "000001", "000000002000", "51"),
        b.term(1.07, OUT, "T1", "0210", "10000001", "000001", "000000001000", "00"),
    ]
    c1, c2 = cases(records)
    assert (c1.name, c2.name) == ("T1 10000001 stan 000001 0200 purchase", "T2 10000002 stan 000001 0200 purchase")
    assert c1.primary is not None and c1.primary.request.fields["11"] == "000052" and c1.primary.rc == "00"
    assert c2.primary is not None and c2.primary.request.fields["11"] == "000051" and c2.primary.rc == "51"
    assert not c1.primary.late and c1.exchange.answer is not None


def test_a_recorded_timeout_and_the_suts_own_reversal_belong_to_the_case() -> None:
    b = Builder()
    f90 = "0200" + "000061" + "1124101010" + "00000001234" + "00000000000"
    records: list[Record] = [
        b.term(1.0, IN, "T1", "0200", "10000001", "000007", "000000004200"),
        b.host(1.1, OUT, "0200", "10000001", "000061", "000000004200"),
        b.term(3.1, OUT, "T1", "0210", "10000001", "000007", "000000004200", "98"),  # the SUT gave up
        b.host(3.2, OUT, "0400", "10000001", "000062", "000000004200", f90=f90),
        b.host(3.3, IN, "0410", "10000001", "000062", "000000004200", "00", f90=f90),
        b.host(4.5, IN, "0210", "10000001", "000061", "000000004200", "00"),  # the late approval
        b.term(9.0, IN, "T1", "0200", "10000001", "000008", "000000000100"),
    ]
    [timed_out, nxt] = cases(records)
    assert nxt.stan == "000008" and nxt.after == (timed_out.id,)  # sent after the 98 came
    primary = timed_out.primary
    assert primary is not None and primary.late and primary.rc == "00" and primary.delay == pytest.approx(3.4)
    assert [x.request.mti for x in timed_out.reversals()] == ["0400"]
    assert timed_out.reversed_upstream()


def test_a_case_waits_for_its_expected_reversal_then_the_horizon() -> None:
    b = Builder()
    records: list[Record] = [
        b.term(1.0, IN, "T1", "0200", "10000001", "000007", "000000004200"),
        b.host(1.1, OUT, "0200", "10000001", "000061", "000000004200"),
        b.term(3.1, OUT, "T1", "0210", "10000001", "000007", "000000004200", "98"),
    ]
    assembler = CaseAssembler(HEADER, horizon=10.0)
    out = [i for r in records for i in assembler.feed(r)]
    assert out == [] and assembler.held == 1  # no reversal yet, nor the late answer: not complete
    out = assembler.feed(EventRecord(99, 11.5, Leg.HOST, "H1", EventKind.CONNECT))
    assert [i.name for i in out if isinstance(i, Case)] == ["T1 10000001 stan 000007 0200 purchase"]


def test_a_terminal_reversal_takes_the_upstream_reversal_of_its_original() -> None:
    b = Builder()
    f90 = "0200" + "000070" + "1124101010" + "00000001234" + "00000000000"
    records: list[Record] = [
        b.term(1.0, IN, "T1", "0200", "10000001", "000009", "000000000700"),
        b.host(1.1, OUT, "0200", "10000001", "000070", "000000000700"),
        b.host(1.2, IN, "0210", "10000001", "000070", "000000000700", "00"),
        b.term(1.3, OUT, "T1", "0210", "10000001", "000009", "000000000700", "00"),
        b.term(2.0, IN, "T1", "0400", "10000001", "000009", "000000000700", rc="96"),
        b.term(2.1, OUT, "T1", "0410", "10000001", "000009", "000000000700", "00"),
        b.host(2.2, OUT, "0400", "10000001", "000071", "000000000700", f90=f90),
        b.host(2.3, IN, "0410", "10000001", "000071", "000000000700", "00", f90=f90),
        EventRecord(next(b.seq), 2.5, Leg.TERMINAL, "T1", EventKind.CLOSE),
    ]
    items = list(CaseAssembler(HEADER).stream(records))
    sale, reversal = (i for i in items if isinstance(i, Case))
    assert sale.reversals() == [] and reversal.original is sale
    assert [x.request.fields["11"] for x in reversal.upstream] == ["000071"]
    assert isinstance(items[-1], ConnEnd) and items[-1].after == (reversal.id,)


def test_host_initiated_request_and_lone_upstream_request_are_cases_of_their_own() -> None:
    b = Builder()
    echo = FrameRecord(next(b.seq), 1.0, Leg.HOST, IN, "H1", "0800", {"7": "1124101010", "11": "900001",
                                                                        "70": "301"})
    answer = FrameRecord(next(b.seq), 1.01, Leg.HOST, OUT, "H1", "0810", {"7": "1124101010", "11": "900001",
                                                                          "39": "00", "70": "301"})
    stray = b.host(2.0, OUT, "0400", "10000003", "000090", "000000000100", f90="0200" + "0" * 38)
    stray_answer = b.host(2.1, IN, "0410", "10000003", "000090", "000000000100", "25")
    host_case, upstream = cases([echo, answer, stray, stray_answer])
    assert host_case.kind is CaseKind.HOST and host_case.exchange.answer is answer
    assert host_case.name == "H1 host stan 900001 0800 echo"
    assert upstream.kind is CaseKind.UPSTREAM and upstream.exchange.rc == "25"


def _long_trace(n: int) -> Iterator[Record]:
    """n purchases on 50 terminals, 5 ms apart, each with its upstream exchange."""
    b = Builder()
    for i in range(n):
        t = i * 0.005
        tid = f"{10000001 + i % 50:08d}"
        stan = f"{i // 50 % 999999 + 1:06d}"
        host_stan = f"{i % 999999 + 1:06d}"
        yield b.term(t, IN, f"T{i % 50}", "0200", tid, stan, "000000001000")
        yield b.host(t + 0.001, OUT, "0200", tid, host_stan, "000000001000")
        yield b.host(t + 0.002, IN, "0210", tid, host_stan, "000000001000", "00")
        yield b.term(t + 0.003, OUT, f"T{i % 50}", "0210", tid, stan, "000000001000", "00")


def test_memory_stays_bounded_on_a_long_trace() -> None:
    """20,000 cases (80,000 frames) stream through with a handful held at any time, and the lookup
    tables stay within the horizon's worth of cases (400 of them: the trace is 50 times longer)."""
    assembler = CaseAssembler(HEADER, horizon=2.0)
    held = tables = done = 0
    for rec in _long_trace(20_000):
        done += sum(isinstance(i, Case) for i in assembler.feed(rec))
        held = max(held, assembler.held)
        tables = max(tables, len(assembler._by_host_stan), len(assembler._host_pending),
                     sum(len(v) for v in assembler._open_by_terminal.values()))
    done += sum(isinstance(i, Case) for i in assembler.finish())
    assert done == 20_000
    assert held <= 2
    assert tables <= 2 * 2.0 / 0.005 + 64 * 4  # two horizons of cases (+ one sweep interval)


def test_the_suts_timeout_and_undelivered_events_mark_the_exchanges() -> None:
    """The recorder says when the SUT gave up on an upstream request (TIMEOUT) and when it could not
    write an answer (UNDELIVERED): the first makes the host's later answer late, the second means the
    terminal never got its answer."""
    b = Builder()
    records: list[Record] = [
        b.term(1.0, IN, "T1", "0200", "10000001", "000007", "000000004200"),
        b.host(1.1, OUT, "0200", "10000001", "000061", "000000004200"),
        EventRecord(next(b.seq), 3.1, Leg.HOST, "H1", EventKind.TIMEOUT, "class=020 11=000061 41=10000001"),
        b.host(3.2, IN, "0210", "10000001", "000061", "000000004200", "00"),
        EventRecord(next(b.seq), 3.3, Leg.TERMINAL, "T1", EventKind.UNDELIVERED,
                    "class=020 11=000007 41=10000001 39=98"),
    ]
    [case] = cases(records)
    assert case.primary is not None and case.primary.late
    assert case.conn_closed and case.exchange.answer is None
