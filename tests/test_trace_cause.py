"""The trace's causal link (`cause: <seq>` on a frame the SUT sent because of another): written by the
recorder when the gateway says so, read tolerantly (traces without it still pair by the heuristics), and
used by the case assembler to link legs exactly where the heuristics cannot tell alike requests apart."""

from __future__ import annotations

import dataclasses
import io
import json
import time
from pathlib import Path

import pytest

from gateway.iso.codec import Codec
from gateway.iso.message import Message
from gateway.iso.spec import load_dialect
from gateway.trace.cases import Case, CaseAssembler
from gateway.trace.format import Direction, FrameRecord, Leg, Record, TraceFormatError, parse_line, read_trace
from gateway.trace.pipe import pack_frame
from gateway.trace.recorder import Recorder, RecorderSettings
from gateway.trace.writer_process import run as run_writer
from tests.test_trace_cases import HEADER, IN, OUT, Builder

ISO = load_dialect("iso87-ascii")


def host_0200(stan: str) -> bytes:
    return Codec(ISO).encode(Message("0200", {"3": "000000", "4": "000000001000", "7": "1202101010", "11": stan,
                                              "41": "10000001"}))


# --- the format --------------------------------------------------------------------------------------


def test_cause_is_written_only_when_given_and_read_back() -> None:
    b = Builder()
    rec = b.host(1.0, OUT, "0200", "10000001", "000051", "000000001000")
    assert "cause" not in rec.to_json()  # traces without it are unchanged
    caused = dataclasses.replace(rec, cause=1)
    line = json.dumps(caused.to_json())
    assert json.loads(line)["cause"] == 1
    back = parse_line(line, 2)
    assert isinstance(back, FrameRecord) and back.cause == 1
    plain = parse_line(json.dumps(rec.to_json()), 2)
    assert isinstance(plain, FrameRecord) and plain.cause is None


@pytest.mark.parametrize("bad", ["1", 0, -3, 1.5, True, [1]])
def test_a_cause_that_is_not_a_seq_is_a_format_error(bad: object) -> None:
    b = Builder()
    obj = b.host(1.0, OUT, "0200", "10000001", "000051").to_json()
    obj["cause"] = bad
    with pytest.raises(TraceFormatError, match="cause"):
        parse_line(json.dumps(obj), 7)


# --- the case assembler ------------------------------------------------------------------------------


def alike_declines(with_cause: bool) -> list[Record]:
    """Two alike requests of one terminal in flight together (same amount, no card the trace can read),
    sent upstream in the other order and declined differently: no RRN nor auth code to tell them by."""
    b = Builder()
    first = b.term(1.00, IN, "T1", "0200", "10000001", "000001", "000000001000")
    second = b.term(1.01, IN, "T2", "0200", "10000001", "000002", "000000001000")
    up_second = b.host(1.02, OUT, "0200", "10000001", "000051", "000000001000")
    up_first = b.host(1.03, OUT, "0200", "10000001", "000052", "000000001000")
    if with_cause:
        up_second = dataclasses.replace(up_second, cause=second.seq)
        up_first = dataclasses.replace(up_first, cause=first.seq)
    return [first, second, up_second, up_first,
            b.host(1.04, IN, "0210", "10000001", "000051", "000000001000", "05"),
            b.host(1.05, IN, "0210", "10000001", "000052", "000000001000", "51"),
            b.term(1.06, OUT, "T1", "0210", "10000001", "000001", "000000001000", "51"),
            b.term(1.07, OUT, "T2", "0210", "10000001", "000002", "000000001000", "05")]


def test_cause_links_alike_requests_to_their_own_upstream_requests() -> None:
    first, second = [i for i in CaseAssembler(HEADER).stream(alike_declines(True)) if isinstance(i, Case)]
    assert first.primary is not None and first.primary.request.fields["11"] == "000052"
    assert first.primary.rc == first.exchange.answer.fields["39"] == "51"  # type: ignore[union-attr]
    assert second.primary is not None and second.primary.request.fields["11"] == "000051"
    assert second.primary.rc == "05"


def test_without_cause_the_same_trace_still_assembles() -> None:
    # the heuristics link by arrival order here (they cannot know better): both cases, one primary each
    items = [i for i in CaseAssembler(HEADER).stream(alike_declines(False)) if isinstance(i, Case)]
    assert len(items) == 2 and all(c.primary is not None for c in items)


def test_a_reversal_caused_by_the_request_that_timed_out_belongs_to_its_case() -> None:
    b = Builder()
    purchase = b.term(1.0, IN, "T1", "0200", "10000001", "000007", "000000004200")
    up = dataclasses.replace(b.host(1.1, OUT, "0200", "10000001", "000061", "000000004200"), cause=purchase.seq)
    # no field 90 at all: only the cause says which request it reverses
    rev = dataclasses.replace(b.host(2.2, OUT, "0400", "10000001", "000062", "000000004200"), cause=up.seq)
    records: list[Record] = [purchase, up, b.term(2.1, OUT, "T1", "0210", "10000001", "000007", "000000004200", "98"),
                             rev, b.host(2.3, IN, "0410", "10000001", "000062", "000000004200", "00")]
    [case] = [i for i in CaseAssembler(HEADER).stream(records) if isinstance(i, Case)]
    assert [x.request.mti for x in case.upstream] == ["0200", "0400"]


# --- the recorder and its writer process -------------------------------------------------------------


def test_the_writer_turns_frame_numbers_into_seqs(tmp_path: Path) -> None:
    out = tmp_path / "t.jsonl"
    stream = io.BytesIO(pack_frame(1.0, 1, 1, 1, host_0200("000001"), None)
                        + pack_frame(1.1, 1, 1, 1, host_0200("000002"), None)
                        + pack_frame(1.2, 1, 1, 1, host_0200("000003"), None, cause=1))
    settings = {"path": str(out), "dialects": {"host": "iso87-ascii"}, "framings": {"host": "len2"},
                "max_bytes": 1 << 20, "max_files": 2}
    stream.read1 = stream.read  # type: ignore[method-assign]
    run_writer(settings, stream)
    _, records = read_trace(out)
    frames = [r for r in records if isinstance(r, FrameRecord)]
    assert [(f.fields["11"], f.cause) for f in frames] == [("000001", None), ("000002", None),
                                                           ("000003", frames[0].seq)]


def test_the_recorder_writes_the_cause_the_gateway_gives(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl"
    recorder = Recorder(RecorderSettings(path=path, dialects={"host": "iso87-ascii"}, framings={"host": "len2"}))
    recorder.start()
    conn = object()
    try:
        first = recorder.frame(Leg.HOST, Direction.OUT, conn, host_0200("000001"))
        recorder.frame(Leg.HOST, Direction.OUT, conn, host_0200("000002"))
        assert first is not None
        recorder.frame(Leg.HOST, Direction.OUT, conn, host_0200("000003"), cause=first)
        time.sleep(0.1)
    finally:
        recorder.close()
    _, records = read_trace(path)
    frames = {r.fields["11"]: r for r in records if isinstance(r, FrameRecord)}
    assert frames["000003"].cause == frames["000001"].seq and frames["000002"].cause is None
