"""The promises of `gateway trace check` that mutation testing found unchecked (issue 16), and the
defects found with them: a partial approval (39 = 10) charges the customer like an 00 and must be
delivered or reversed; a trace of nothing but undecodable frames checked nothing and must not pass;
a trace cut off mid-line by a crash is read up to the cut; `| head` ends the command quietly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.iso.build import cup, iso87
from gateway.iso.build.response import response
from gateway.iso.codec import Codec
from gateway.iso.message import Message
from gateway.trace.check import Checker, CheckOptions, check_records
from gateway.trace.encoder import TraceEncoder
from gateway.trace.format import (
    Direction,
    EventKind,
    FrameRecord,
    Leg,
    Record,
    TraceFormatError,
    format_match_key,
    read_trace,
    write_records,
)
from gateway.trace.report import FindingKind
from tests.test_trace_offline import CARD_CUP, CUP, ENV, FRAMINGS, IDENT, ISO, LEGS

ROOT = Path(__file__).resolve().parents[1]


def check(records: list[Record], **options: object) -> dict[str, list]:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    checker = Checker(enc.header("test", ""), CheckOptions(**options))  # type: ignore[arg-type]
    for rec in records:
        checker.feed(rec)
    return {c.name.split(":")[0]: c.findings for c in checker.results()}


def purchase(enc: TraceEncoder, host_rc: str, terminal_rc: str | None, *, t0: float = 1.0, stan: str = "000001",
             host_stan: str = "000900", amount: int = 1_000, processing: str = "000000") -> list[Record]:
    """A terminal purchase, its upstream request, the host's answer, and (unless None) the terminal's."""
    t_req = cup.purchase(IDENT, "000123", stan, amount, track2=CARD_CUP.track2)
    h_req = iso87.purchase(IDENT, host_stan, "1202060657", "1234", amount, track2=CARD_CUP.track2)
    h_req.fields["3"] = processing
    out: list[Record] = [
        enc.frame(t0, Leg.TERMINAL, Direction.IN, "T1", Codec(CUP).encode(t_req), ENV),
        enc.frame(t0 + 0.1, Leg.HOST, Direction.OUT, "H1", Codec(ISO).encode(h_req)),
        enc.frame(t0 + 0.2, Leg.HOST, Direction.IN, "H1",
                  Codec(ISO).encode(response(h_req, host_rc, "iso87-ascii", field_37="123456789012"))),
    ]
    if terminal_rc is not None:
        t_ans = response(t_req, terminal_rc, "cup-pos", field_37="123456789012")
        out.append(enc.frame(t0 + 0.3, Leg.TERMINAL, Direction.OUT, "T1", Codec(CUP).encode(t_ans), ENV.reply()))
    return out


def timeout(enc: TraceEncoder, t: float, stan: str = "000900") -> Record:
    return enc.event(t, Leg.HOST, "H1", EventKind.TIMEOUT, format_match_key({"class": "020", "11": stan,
                                                                              "41": IDENT.terminal_id}))


def reversal_of(enc: TraceEncoder, t: float, host_stan: str = "000900", amount: int = 1_000) -> list[Record]:
    h_req = iso87.purchase(IDENT, host_stan, "1202060657", "1234", amount, track2=CARD_CUP.track2)
    rev = iso87.reversal(h_req, "98")
    rev.fields.update({"11": "000950", "7": "1202060700"})
    return [enc.frame(t, Leg.HOST, Direction.OUT, "H1", Codec(ISO).encode(rev)),
            enc.frame(t + 0.1, Leg.HOST, Direction.IN, "H1", Codec(ISO).encode(response(rev, "00", "iso87-ascii")))]


# --- (a) a charged answer is an approval, whatever its code ------------------------------------------


@pytest.mark.parametrize("rc", ["00", "10", "11"])
def test_a_charged_host_answer_the_terminal_never_got_as_an_approval_is_an_approval_left_standing(rc: str) -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    found = check(purchase(enc, rc, "96"))  # the gateway declined what the host charged, and did not reverse
    assert len(found["approvals"]) == 1, found["approvals"]
    assert found["approvals"][0].seq == 3  # the host's answer is named
    # delivered as a charge: resolved
    assert check(purchase(enc, rc, rc))["approvals"] == []
    # reversed upstream: resolved
    assert check(purchase(enc, rc, "96") + reversal_of(enc, 2.0))["approvals"] == []


def test_a_declined_or_non_reversible_host_answer_needs_no_reversal() -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    assert check(purchase(enc, "05", "05"))["approvals"] == []
    assert check(purchase(enc, "51", "96"))["approvals"] == []
    # a balance enquiry (31) moves no money: an approval not forwarded is not a charge left standing
    assert check(purchase(enc, "00", "96", processing="310000"))["approvals"] == []
    # a void (02) is reversible like a purchase
    assert len(check(purchase(enc, "00", "96", processing="020000"))["approvals"]) == 1


@pytest.mark.parametrize("rc", ["00", "10"])
def test_a_charge_forwarded_after_the_upstream_timeout_is_a_late_answer(rc: str) -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    req, up, host_answer, _ = purchase(enc, rc, rc)
    t_req = cup.purchase(IDENT, "000123", "000001", 1_000, track2=CARD_CUP.track2)
    charged = enc.frame(1.3, Leg.TERMINAL, Direction.OUT, "T1",
                        Codec(CUP).encode(response(t_req, rc, "cup-pos", field_37="123456789012")), ENV.reply())
    declined = enc.frame(1.3, Leg.TERMINAL, Direction.OUT, "T1",
                         Codec(CUP).encode(response(t_req, "98", "cup-pos")), ENV.reply())
    found = check([req, up, timeout(enc, 1.15), host_answer, charged])
    assert len(found["late"]) == 1 and found["pairing"] == []
    assert (found["late"][0].seq, found["late"][0].leg, found["late"][0].mti) == (charged.seq, "terminal", "0210")
    # told the terminal 98: not late, but the late charge is left standing until reversed
    found = check([req, up, timeout(enc, 1.15), host_answer, declined])
    assert found["late"] == [] and len(found["approvals"]) == 1
    found = check([req, up, timeout(enc, 1.15), host_answer, declined, *reversal_of(enc, 2.0)])
    assert found["approvals"] == [] and found["originals"] == []


# --- (b) a trace that decodes nothing checks nothing -------------------------------------------------


def test_a_trace_of_only_undecodable_frames_fails_the_decode_case(tmp_path: Path) -> None:
    dump = tmp_path / "frames.txt"
    dump.write_text("zz not hex\n0011223344\n")  # the wrong dialect or framing: nothing decodes
    out = tmp_path / "t.jsonl"
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "trace", "import", "--format", "hex", "--dialect",
                           "cup-pos", "--framing", "cup", str(dump), "-o", str(out)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    header, records = read_trace(out)
    checker = Checker(header)
    for rec in records:
        checker.feed(rec)
    results = {c.name.split(":")[0]: c.findings for c in checker.results()}
    assert checker.frames == 0 and checker.undecodable == 2
    assert len(results["decode"]) == 1 and "no frame of the trace decodes" in results["decode"][0].message
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "trace", "check", str(out)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 1 and "FAIL" in done.stdout, done.stdout + done.stderr


def test_one_undecodable_line_among_good_frames_is_tolerated() -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    stray = enc.event(0.5, Leg.TERMINAL, "T1", EventKind.UNDECODABLE, "line 1: not hex")
    assert check([stray, *purchase(enc, "00", "00")])["decode"] == []


# --- (d) a crash mid-write loses one line, not the trace ---------------------------------------------


def write_trace(path: Path, records: list[Record], tail: str = "") -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    with path.open("w") as f:
        write_records(f, enc.header("test", ""), records)
        f.write(tail)


def test_a_cut_off_last_line_is_read_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    records = purchase(enc, "00", "00")
    whole = json.dumps(records[-1].to_json(), separators=(",", ":"))
    path = tmp_path / "t.jsonl"
    write_trace(path, records[:-1], tail=whole[: len(whole) // 2])  # the writer died inside the last record
    with caplog.at_level("WARNING", logger="gateway.trace.format"):
        _, it = read_trace(path)
        got = list(it)
    assert [r.seq for r in got] == [r.seq for r in records[:-1]]
    assert any("cut off" in r.getMessage() and "line 5" in r.getMessage() for r in caplog.records), caplog.text
    # the check then names the request the cut took the answer of, rather than refusing the file
    found = check(got)
    assert [f.seq for f in found["pairing"]] == [1]


def test_a_bad_line_that_is_not_the_last_is_still_an_error(tmp_path: Path) -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    records = purchase(enc, "00", "00")
    path = tmp_path / "t.jsonl"
    write_trace(path, records[:1], tail='{"kind":"frame","seq":2,"t"\n')
    with path.open("a") as f:
        f.write(json.dumps(records[1].to_json()) + "\n")
    _, it = read_trace(path)
    with pytest.raises(TraceFormatError, match="line 3"):
        list(it)
    # a whole last line (newline written) that is no record is corruption, not a crash mid-write
    write_trace(path, records[:1], tail='{"kind":"frame","seq":2}\n')
    _, it = read_trace(path)
    with pytest.raises(TraceFormatError, match="line 3"):
        list(it)


def test_a_complete_last_line_without_newline_is_read(tmp_path: Path) -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    records = purchase(enc, "00", "00")
    path = tmp_path / "t.jsonl"
    write_trace(path, records[:-1], tail=json.dumps(records[-1].to_json()))
    _, it = read_trace(path)
    assert [r.seq for r in it] == [1, 2, 3, 4]


# --- (e) `gateway trace check ... | head` -------------------------------------------------------------


def test_a_closed_stdout_ends_the_check_quietly(tmp_path: Path) -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    path = tmp_path / "t.jsonl"
    write_trace(path, purchase(enc, "00", "96"))
    r, w = os.pipe()
    os.close(r)  # the reader (`head`) has gone before the first line is printed
    try:
        done = subprocess.run([sys.executable, "-m", "gateway.cli", "trace", "check", str(path)], stdout=w,
                              stderr=subprocess.PIPE, text=True, timeout=60, cwd=ROOT)
    finally:
        os.close(w)
    assert done.returncode == 141, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr



# --- (f) what a finding names, and which open request an event names ---------------------------------


def host_request(enc: TraceEncoder, t: float, stan: str, *, terminal: str | None = "10000001",
                 mti: str = "0200", amount: int = 1_000, conn: str = "H1", dt: str = "1202060657") -> Record:
    if mti == "0800":
        msg = iso87.echo(stan, dt, "1234")
        if terminal is not None:
            msg.fields["41"] = terminal
    else:
        msg = iso87.purchase(IDENT, stan, dt, "1234", amount, track2=CARD_CUP.track2)
        if terminal is None:
            del msg.fields["41"]
        else:
            msg.fields["41"] = terminal
    return enc.message(t, Leg.HOST, Direction.OUT, conn, msg)


def test_a_timeout_closes_the_request_it_names_by_class_stan_and_terminal() -> None:
    """Four requests wait on one connection; the timeout names one of them exactly. The other three are
    still unanswered at the end of the trace, each reported by its own seq."""
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    other_stan = host_request(enc, 1.0, "000901")
    other_class = host_request(enc, 1.1, "000900", mti="0800")
    other_terminal = host_request(enc, 1.2, "000900", terminal="10000002")
    named = host_request(enc, 1.3, "000900")
    ev = enc.event(1.5, Leg.HOST, "H1", EventKind.TIMEOUT,
                   format_match_key({"class": "020", "11": "000900", "41": "10000001"}))
    found = check([other_stan, other_class, other_terminal, named, ev])
    assert sorted(f.seq for f in found["pairing"]) == [other_stan.seq, other_class.seq, other_terminal.seq]
    assert all(f.message == f"#{f.seq} no answer and no timeout recorded (end of trace)" for f in found["pairing"])


def test_a_finding_names_the_messages_leg_terminal_and_stan() -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    req = host_request(enc, 1.0, "000900")
    [f] = check([req])["pairing"]
    assert (f.leg, f.mti, f.terminal, f.stan, f.seq) == ("host", "0200", "10000001", "000900", req.seq)
    assert f.message.startswith(f"#{req.seq} ")
    # an event's finding names its leg too
    ev = enc.event(2.0, Leg.HOST, "H9", EventKind.TIMEOUT, format_match_key({"class": "020", "11": "000901"}))
    [g] = check([ev])["pairing"]
    assert (g.leg, g.seq, g.rule) == ("host", ev.seq, "pairing")
    assert "timeout of a request not in the trace" in g.message


# --- (g) host reversals and their repeats ------------------------------------------------------------


def host_reversal(enc: TraceEncoder, t: float, *, repeat: bool = False, dt: str = "1202060657",
                  **fields: str) -> Record:
    h_req = iso87.purchase(IDENT, "000900", dt, "1234", 1_000, track2=CARD_CUP.track2)
    rev = iso87.reversal(h_req, "98", repeat=repeat)
    rev.fields.update({"11": "000950", "7": "1202060700", **fields})
    return enc.message(t, Leg.HOST, Direction.OUT, "H1", rev)


def test_a_reversal_with_an_unreadable_field_90_is_named() -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    h_req = iso87.purchase(IDENT, "000900", "1202060657", "1234", 1_000, track2=CARD_CUP.track2)
    rev = iso87.reversal(h_req, "98")
    del rev.fields["90"]  # a reversal that names no original at all (n42 fixed: only absence gets past the codec)
    bad = enc.message(1.0, Leg.HOST, Direction.OUT, "H1", rev)
    [f] = check([bad])["originals"]
    assert (f.kind, f.field, f.got, f.seq) == (FindingKind.INVARIANT, "90", "", bad.seq)
    assert "without a readable field 90" in f.message


def test_a_repeat_that_differs_from_its_first_attempt_names_each_field_in_order() -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    up = host_request(enc, 1.0, "000900")
    first = host_reversal(enc, 2.0)
    repeat = host_reversal(enc, 3.0, repeat=True, **{"4": "000000002000", "11": "000951"})
    found = check([up, first, repeat])["repeats"]
    assert [(f.kind, f.field, f.rule, f.seq) for f in found] == [
        (FindingKind.FIELD, "4", "repeats", repeat.seq), (FindingKind.FIELD, "11", "repeats", repeat.seq)]
    assert (found[0].expected, found[0].got) == ("000000001000", "000000002000")
    assert found[0].leg == "host" and found[0].message.startswith(f"#{repeat.seq} 0401 differs from its 0400")
    # a field only the repeat has: the first attempt's side is named absent
    extra = host_reversal(enc, 3.0, repeat=True, **{"48": "EXTRA"})
    [g] = check([up, first, extra])["repeats"]
    assert (g.field, g.expected, g.got) == ("48", "<absent>", "EXTRA")
    assert check([up, first, host_reversal(enc, 3.0, repeat=True)])["repeats"] == []


def test_a_reversal_naming_a_request_before_the_trace_is_exempt_one_at_its_start_is_not() -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    start = 1_796_193_600.0  # 2026-12-02 06:40:00 UTC: the trace's first record
    opening = host_request(enc, start, "000100", dt="1202064000")
    answer = enc.message(start + 0.1, Leg.HOST, Direction.IN, "H1",
                         response(iso87.purchase(IDENT, "000100", "1202064000", "1234", 1_000,
                                                 track2=CARD_CUP.track2), "05", "iso87-ascii"))
    before = host_reversal(enc, start + 1, dt="1202063959")  # its original was sent a second before
    found = check([opening, answer, before])
    assert found["originals"] == [] and found["repeats"] == []
    assert check([opening, answer, host_reversal(enc, start + 1, repeat=True, dt="1202063959")])["repeats"] == []
    at_start = host_reversal(enc, start + 1, dt="1202064000")  # that second is in the trace: it must be there
    [f] = check([opening, answer, at_start])["originals"]
    assert f.seq == at_start.seq and "names no request in the trace" in f.message


# --- (h) approvals: late ones, undelivered ones, and linking an upstream request to its terminal ----


def test_a_late_decline_leaves_nothing_to_reverse_a_late_approval_is_named() -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    req, up, _, _ = purchase(enc, "05", "98")
    t_req = cup.purchase(IDENT, "000123", "000001", 1_000, track2=CARD_CUP.track2)
    told_98 = enc.frame(1.3, Leg.TERMINAL, Direction.OUT, "T1",
                        Codec(CUP).encode(response(t_req, "98", "cup-pos")), ENV.reply())
    h_req = iso87.purchase(IDENT, "000900", "1202060657", "1234", 1_000, track2=CARD_CUP.track2)
    late_05 = enc.message(1.4, Leg.HOST, Direction.IN, "H1", response(h_req, "05", "iso87-ascii"))
    found = check([req, up, timeout(enc, 1.15), told_98, late_05])
    assert found["approvals"] == [] and found["pairing"] == []
    late_00 = enc.message(1.4, Leg.HOST, Direction.IN, "H1",
                          response(h_req, "00", "iso87-ascii", field_37="123456789012"))
    [f] = check([req, up, timeout(enc, 1.15), told_98, late_00])["approvals"]
    assert (f.seq, f.leg, f.mti, f.stan) == (late_00.seq, "host", "0210", "000900")


def test_an_approval_the_sut_could_not_deliver_is_left_standing() -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    req, up, approved = purchase(enc, "00", None)
    undelivered = enc.event(1.3, Leg.TERMINAL, "T1", EventKind.UNDELIVERED,
                            format_match_key({"class": "020", "11": "000123", "41": IDENT.terminal_id, "39": "00"}))
    found = check([req, up, approved, undelivered])
    assert [f.seq for f in found["approvals"]] == [approved.seq] and found["pairing"] == []
    assert check([req, up, approved, undelivered, *reversal_of(enc, 2.0)])["approvals"] == []


def test_an_upstream_request_linked_by_cause_needs_no_matching_terminal_id() -> None:
    """The SUT names the terminal request it acted on (`cause`); the upstream request's own field 41
    (the acquirer's terminal id for the host) need not be the terminal's."""
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    t_req = cup.purchase(IDENT, "000123", "000001", 1_000, track2=CARD_CUP.track2)
    req = enc.frame(1.0, Leg.TERMINAL, Direction.IN, "T1", Codec(CUP).encode(t_req), ENV)
    h_req = iso87.purchase(IDENT, "000900", "1202060657", "1234", 1_000, track2=CARD_CUP.track2)
    h_req.fields["41"] = "ACQ00001"
    up = enc.frame(1.1, Leg.HOST, Direction.OUT, "H1", Codec(ISO).encode(h_req), cause=req.seq)
    approved = enc.frame(1.2, Leg.HOST, Direction.IN, "H1",
                         Codec(ISO).encode(response(h_req, "00", "iso87-ascii", field_37="123456789012")))
    delivered = enc.frame(1.3, Leg.TERMINAL, Direction.OUT, "T1",
                          Codec(CUP).encode(response(t_req, "00", "cup-pos", field_37="123456789012")), ENV.reply())
    found = check([req, up, approved, delivered])
    assert all(v == [] for v in found.values()), found
    declined = enc.frame(1.3, Leg.TERMINAL, Direction.OUT, "T1",
                         Codec(CUP).encode(response(t_req, "96", "cup-pos")), ENV.reply())
    assert [f.seq for f in check([req, up, approved, declined])["approvals"]] == [approved.seq]


def test_a_request_refused_locally_is_not_taken_for_the_next_one_of_the_same_amount() -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    first = cup.purchase(IDENT, "000122", "000001", 1_000, track2=CARD_CUP.track2)
    req1 = enc.frame(0.5, Leg.TERMINAL, Direction.IN, "T1", Codec(CUP).encode(first), ENV)
    refused = enc.frame(0.6, Leg.TERMINAL, Direction.OUT, "T1",
                        Codec(CUP).encode(response(first, "61", "cup-pos")), ENV.reply())
    rest = purchase(enc, "00", "00", stan="000002")  # the same amount, sent upstream and delivered
    found = check([req1, refused, *rest])
    assert all(v == [] for v in found.values()), found


def test_the_results_of_check_records_are_the_checkers() -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    results, checker = check_records(enc.header("test", ""), purchase(enc, "00", "96"))
    by_case = {c.name.split(":")[0]: c.findings for c in results}
    assert [f.seq for f in by_case["approvals"]] == [3] and checker.frames == 4
    assert sum(1 for c in results if c.findings) == 1


def test_requests_without_a_terminal_id_are_linked_and_unawaited_alike() -> None:
    """A terminal that leaves field 41 out (and a SUT that passes that on): the checker still links the
    upstream request to the request that was sent upstream, not to the one refused locally."""
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)

    def terminal(t: float, msg: Message, direction: Direction) -> Record:
        return enc.message(t, Leg.TERMINAL, direction, "T1", msg, ENV if direction is Direction.IN else ENV.reply())

    first = cup.purchase(IDENT, "000122", "000001", 1_000, track2=CARD_CUP.track2)
    second = cup.purchase(IDENT, "000123", "000001", 1_000, track2=CARD_CUP.track2)
    h_req = iso87.purchase(IDENT, "000900", "1202060657", "1234", 1_000, track2=CARD_CUP.track2)
    for m in (first, second, h_req):
        del m.fields["41"]
    records = [
        terminal(0.5, first, Direction.IN), terminal(0.6, response(first, "61", "cup-pos"), Direction.OUT),
        terminal(1.0, second, Direction.IN), enc.message(1.1, Leg.HOST, Direction.OUT, "H1", h_req),
        enc.message(1.2, Leg.HOST, Direction.IN, "H1", response(h_req, "00", "iso87-ascii", field_37="123456789012")),
    ]
    delivered = terminal(1.3, response(second, "00", "cup-pos", field_37="123456789012"), Direction.OUT)
    found = check([*records, delivered])
    assert all(v == [] for v in found.values()), found
    declined = terminal(1.3, response(second, "96", "cup-pos"), Direction.OUT)
    assert [f.seq for f in check([*records, declined])["approvals"]] == [records[4].seq]


def test_a_late_answer_exactly_a_window_after_its_request_is_still_late_not_an_orphan() -> None:
    """Timed-out requests are kept `window` seconds of trace time: the 256th frame (when the checker
    lets go of old entries) comes exactly a window after the request, and its late answer follows."""
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    h_req = iso87.purchase(IDENT, "000900", "1202060657", "1234", 1_000, track2=CARD_CUP.track2)
    records: list[Record] = [enc.message(1.0, Leg.HOST, Direction.OUT, "H1", h_req), timeout(enc, 1.5)]
    for i in range(128):  # frames 2..257: echo tests on another connection, all answered
        t = 11.0 if i == 127 else 2.0 + i * 0.05
        echo = iso87.echo(f"{i + 1:06d}", "1202060657", "1234")
        records += [enc.message(t, Leg.HOST, Direction.OUT, "H2", echo),
                    enc.message(t, Leg.HOST, Direction.IN, "H2", response(echo, "00", "iso87-ascii"))]
    late = enc.message(11.05, Leg.HOST, Direction.IN, "H1", response(h_req, "05", "iso87-ascii"))
    found = check([*records, late], window=10.0)
    assert all(v == [] for v in found.values()), found
    # a hair shorter window: the timed-out request was let go of, and its answer is an orphan
    [f] = check([*records, late], window=9.99)["pairing"]
    assert f.seq == late.seq and "answer without a request" in f.message


# --- (i) decode: a record whose values are not its wire's is named, field by field -------------------


def host_purchase_record(enc: TraceEncoder) -> FrameRecord:
    rec = host_request(enc, 1.0, "000900")
    assert isinstance(rec, FrameRecord)
    return rec


def test_a_record_whose_fields_are_not_its_wires_names_the_lowest_field_that_differs() -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    rec = host_purchase_record(enc)
    edited = replace(rec, fields=dict(rec.fields, **{"4": "000000009999", "11": "000999"}))
    [f] = check([edited])["decode"]
    assert (f.kind, f.field, f.expected, f.got, f.seq) == (FindingKind.DECODE, "4", "000000009999",
                                                           "000000001000", rec.seq)
    assert f.leg == "host" and "wire decodes to other values than the record (field 4)" in f.message
    # a field the record has and the wire does not
    more = replace(rec, fields=dict(rec.fields, **{"48": "NOTONWIRE"}))
    [g] = check([more])["decode"]
    assert (g.field, g.expected, g.got) == ("48", "NOTONWIRE", "<absent>")
    # another MTI than the wire's
    [h] = check([replace(rec, mti="0100")])["decode"]
    assert (h.field, h.expected, h.got) == ("t", "0100", "0200")


def test_a_wire_of_two_frames_or_a_bad_field_is_named() -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    rec = host_purchase_record(enc)
    [f] = check([replace(rec, wire=rec.wire * 2)])["decode"]
    assert "wire does not decode: wire holds 2 whole frames, not 1" in f.message and f.seq == rec.seq
    body = bytes.fromhex(rec.wire)
    at = body.index(b"000000001000")  # field 4, n12: a letter in it
    bad = body[:at] + b"00000000X000" + body[at + 12 :]
    [g] = check([replace(rec, wire=bad.hex().upper())])["decode"]
    assert "wire does not decode" in g.message and g.field == "4"


def test_a_leg_the_header_gives_a_dialect_but_no_framing_is_named_not_a_crash() -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    rec = host_purchase_record(enc)
    header = replace(enc.header("test", ""), framings={"terminal": "cup"})
    results = {c.name.split(":")[0]: c.findings for c in check_records(header, [rec])[0]}
    [f] = results["decode"]
    assert "no dialect for leg host in the header" in f.message and f.seq == rec.seq


# --- (j) echo: what the answer should have echoed, and a dialect the flows do not know ---------------


def test_an_answer_that_does_not_echo_names_the_requests_value_and_its_own() -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    h_req = iso87.purchase(IDENT, "000900", "1202060657", "1234", 1_000, track2=CARD_CUP.track2)
    req = enc.message(1.0, Leg.HOST, Direction.OUT, "H1", h_req)
    answer = response(h_req, "05", "iso87-ascii")
    answer.fields["3"] = "200000"
    [f] = check([req, enc.message(1.1, Leg.HOST, Direction.IN, "H1", answer)])["echo"]
    assert (f.field, f.expected, f.got, f.rule) == ("3", "000000", "200000", "echo")
    assert "0210 does not echo field 3 of its 0200" in f.message


def test_a_host_dialect_given_as_a_spec_file_is_checked_without_its_echo_rules(tmp_path: Path) -> None:
    spec = tmp_path / "acme-host.toml"
    spec.write_text((ROOT / "specs" / "iso87-ascii.toml").read_text())
    enc = TraceEncoder({"terminal": "cup-pos", "host": str(spec)}, FRAMINGS, lenient=True)
    checker = Checker(enc.header("test", ""))
    for rec in purchase(enc, "00", "96"):
        checker.feed(rec)
    found = {c.name.split(":")[0]: c.findings for c in checker.results()}
    assert [f.seq for f in found["approvals"]] == [3] and found["echo"] == [] and found["decode"] == []


def test_an_answer_whose_mti_does_not_answer_its_request_names_both_mtis() -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    h_req = iso87.purchase(IDENT, "000900", "1202060657", "1234", 1_000, track2=CARD_CUP.track2)
    odd = Message("0202", dict(h_req.fields))  # same class as 0200, but a 0210 answers a 0200
    req = enc.message(1.0, Leg.HOST, Direction.OUT, "H1", odd)
    answer = enc.message(1.1, Leg.HOST, Direction.IN, "H1", response(h_req, "05", "iso87-ascii"))
    [f] = check([req, answer])["echo"]
    assert (f.field, f.expected, f.got, f.seq) == ("t", "0202", "0210", answer.seq)


def test_a_record_whose_envelope_is_not_its_wires_is_named() -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    t_req = cup.purchase(IDENT, "000123", "000001", 1_000, track2=CARD_CUP.track2)
    rec = enc.frame(1.0, Leg.TERMINAL, Direction.IN, "T1", Codec(CUP).encode(t_req), ENV)
    assert isinstance(rec, FrameRecord) and rec.envelope is not None
    assert check([rec])["decode"] == []
    other = replace(rec, envelope=dict(rec.envelope, tpdu="6000020000"))
    messages = [f.message for f in check([other])["decode"]]
    assert f"#{rec.seq} envelope (TPDU / header) differs from the wire's" in messages
    assert f"#{rec.seq} fields re-encode to other bytes than the wire" in messages  # with the record's envelope


def test_fields_that_do_not_encode_are_named() -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    rec = host_purchase_record(enc)
    bad = replace(rec, wire="", fields=dict(rec.fields, **{"4": "00000000X000"}))  # no wire: only the fields
    [f] = check([bad])["decode"]
    assert f.message.startswith(f"#{rec.seq} fields do not encode: ") and f.field == "4"
    assert check([bad])["pairing"] == []  # not taken for a request either


def test_an_undelivered_answer_to_a_request_without_terminal_id_closes_it() -> None:
    """The gateway writes `41=` for a message without field 41: that names the request without one."""
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    t_req = cup.purchase(IDENT, "000123", "000001", 1_000, track2=CARD_CUP.track2)
    del t_req.fields["41"]
    req = enc.message(1.0, Leg.TERMINAL, Direction.IN, "T1", t_req, ENV)
    undelivered = enc.event(1.3, Leg.TERMINAL, "T1", EventKind.UNDELIVERED,
                            format_match_key({"class": "020", "11": "000123", "41": "", "39": "61"}))
    assert check([req])["pairing"] != []
    found = check([req, undelivered])
    assert all(v == [] for v in found.values()), found


def test_a_continued_part_forgives_orphan_answers_only_within_a_window_of_its_start() -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    h_req = iso87.purchase(IDENT, "000900", "1202060657", "1234", 1_000, track2=CARD_CUP.track2)
    opening = enc.event(1.0, Leg.HOST, "H1", EventKind.CONNECT, "127.0.0.1:1")

    def orphan(t: float) -> Record:
        return enc.message(t, Leg.HOST, Direction.IN, "H1", response(h_req, "05", "iso87-ascii"))

    assert check([opening, orphan(5.0)], continued=True, window=10.0)["pairing"] == []
    [f] = check([opening, orphan(11.0)], continued=True, window=10.0)["pairing"]
    assert "answer without a request" in f.message
    assert len(check([opening, orphan(5.0)], window=10.0)["pairing"]) == 1  # not continued: an orphan


# --- (k) terminal reversals name their original by terminal, batch and STAN --------------------------


def terminal_reversal_case(enc: TraceEncoder, *, drop: tuple[str, ...] = (), rev_stan: str = "000123") -> list[Record]:
    t_req = cup.purchase(IDENT, "000123", "000001", 1_000, track2=CARD_CUP.track2)
    rev = cup.reversal(t_req, "98")
    rev.fields["11"] = rev_stan
    for k in drop:
        t_req.fields.pop(k, None)
        rev.fields.pop(k, None)
    return [enc.message(1.0, Leg.TERMINAL, Direction.IN, "T1", t_req, ENV),
            enc.message(1.1, Leg.TERMINAL, Direction.OUT, "T1", response(t_req, "98", "cup-pos"), ENV.reply()),
            enc.message(1.2, Leg.TERMINAL, Direction.IN, "T1", rev, ENV),
            enc.message(1.3, Leg.TERMINAL, Direction.OUT, "T1", response(rev, "00", "cup-pos"), ENV.reply())]


def test_a_terminal_reversal_of_no_request_in_the_trace_is_named() -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    found = check(terminal_reversal_case(enc))
    assert all(v == [] for v in found.values()), found
    records = terminal_reversal_case(enc, rev_stan="000124")  # names another STAN
    [f] = check(records)["originals"]
    assert (f.kind, f.seq, f.leg, f.mti) == (FindingKind.INVARIANT, records[2].seq, "terminal", "0400")
    assert f.message == f"#{records[2].seq} terminal reversal names no original in the trace (batch 000001)"
    assert check(records[2:], continued=True)["originals"] == []  # a rotated part: its original came before


def test_a_terminal_reversal_matches_its_original_when_both_leave_out_stan_and_batch() -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    for drop in (("60",), ("11",)):
        records = terminal_reversal_case(enc, drop=drop)
        assert all(isinstance(r, FrameRecord) for r in records)
        assert check(records)["originals"] == [], drop


def test_a_trace_that_decodes_nothing_names_its_last_undecodable_line() -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    first = enc.event(0.5, Leg.TERMINAL, "T1", EventKind.UNDECODABLE, "line 1: not hex")
    last = enc.event(0.6, Leg.TERMINAL, "T1", EventKind.UNDECODABLE, "line 2: wrong framing")
    [f] = check([first, last])["decode"]
    assert f.seq == last.seq and f.leg == "terminal"
    assert f.message.endswith("(2 undecodable, the last: line 2: wrong framing)")


def test_an_approval_decided_after_the_upstream_timeout_is_late_even_when_it_could_not_be_delivered() -> None:
    """The undelivered event records what the SUT decided (its 39): approving a request it had given up
    on upstream is the SUT's defect, whether or not the write to the terminal then failed."""
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    req, up, host_answer, _ = purchase(enc, "00", "00")

    def undelivered(rc: str) -> Record:
        return enc.event(1.3, Leg.TERMINAL, "T1", EventKind.UNDELIVERED,
                         format_match_key({"class": "020", "11": "000123", "41": IDENT.terminal_id, "39": rc}))

    event = undelivered("00")
    found = check([req, up, timeout(enc, 1.15), host_answer, event])
    assert [f.seq for f in found["late"]] == [event.seq] and found["pairing"] == []
    assert check([req, up, timeout(enc, 1.15), host_answer, undelivered("98")])["late"] == []


# --- (l) a closed connection, and findings beyond max_findings ---------------------------------------


def test_a_close_ends_the_requests_of_that_connection_only() -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    on_h1 = host_request(enc, 1.0, "000900", conn="H1")
    on_h2 = host_request(enc, 1.1, "000901", conn="H2")
    close = enc.event(1.5, Leg.HOST, "H1", EventKind.CLOSE, "peer")
    assert sorted(f.seq for f in check([on_h1, on_h2])["pairing"]) == [on_h1.seq, on_h2.seq]
    assert [f.seq for f in check([on_h1, on_h2, close])["pairing"]] == [on_h2.seq]
    # a connect is not a close
    connect = enc.event(1.5, Leg.HOST, "H1", EventKind.CONNECT, "127.0.0.1:1")
    assert len(check([on_h1, on_h2, connect])["pairing"]) == 2


def test_an_approval_forwarded_after_the_upstream_connection_closed_is_late() -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    req, up, _, answer = purchase(enc, "00", "00")
    close = enc.event(0.15 + 1.0, Leg.HOST, "H1", EventKind.CLOSE, "peer")
    found = check([req, up, close, answer])
    assert [f.seq for f in found["late"]] == [answer.seq] and found["pairing"] == []


def test_findings_beyond_max_findings_are_counted_in_one_more() -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    records = [host_request(enc, 1.0 + i, f"{900 + i:06d}") for i in range(5)]
    found = check(records, max_findings=2)["pairing"]
    assert [f.seq for f in found[:2]] == [records[0].seq, records[1].seq]
    last = found[2]
    assert len(found) == 3 and last.message == "... and 3 more like these"
    assert (last.kind, last.rule) == (FindingKind.MISSING_FRAME, "pairing")


def test_a_trace_is_decoded_leniently_unless_its_header_says_strict() -> None:
    """Imports keep what other systems produced (jPOS's ISO87 image has '0' in DE 28's sign): the check
    decodes leniently by default, strictly where the header says `lenient: false` (a recording)."""
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    h_req = iso87.purchase(IDENT, "000900", "1202060657", "1234", 1_000, track2=CARD_CUP.track2)
    h_req.fields["28"] = "000000000"  # no C/D sign
    rec = enc.message(1.0, Leg.HOST, Direction.OUT, "H1", h_req)
    assert isinstance(rec, FrameRecord)

    def decode_findings(**notes: object) -> list:
        checker = Checker(enc.header("test", "", **notes))
        checker.feed(rec)
        return {c.name.split(":")[0]: c.findings for c in checker.results()}["decode"]

    assert decode_findings() == [] and decode_findings(lenient=True) == []
    [f] = decode_findings(lenient=False)
    assert f.seq == rec.seq and f.field == "28"



def test_the_more_line_has_the_kind_of_the_last_finding_kept() -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    h_req = iso87.purchase(IDENT, "000900", "1202060657", "1234", 1_000, track2=CARD_CUP.track2)
    orphan = enc.message(1.0, Leg.HOST, Direction.IN, "H1", response(h_req, "05", "iso87-ascii"))
    stray_timeout = enc.event(2.0, Leg.HOST, "H1", EventKind.TIMEOUT, format_match_key({"class": "020", "11": "1"}))
    another = enc.message(3.0, Leg.HOST, Direction.IN, "H1", response(h_req, "05", "iso87-ascii"))
    found = check([orphan, stray_timeout, another], max_findings=2)["pairing"]
    assert [f.kind for f in found] == [FindingKind.UNEXPECTED_FRAME, FindingKind.INVARIANT, FindingKind.INVARIANT]
    assert found[2].message == "... and 1 more like these"


def test_each_case_of_the_check_is_named_with_what_it_checks() -> None:
    enc = TraceEncoder(LEGS, FRAMINGS, lenient=True)
    results, _ = check_records(enc.header("test", ""), purchase(enc, "00", "00"))
    assert [c.name for c in results] == [
        "decode: every frame decodes and re-encodes to its wire bytes",
        "pairing: every request has its answer or a recorded timeout",
        "echo: answers echo their request's fields",
        "originals: reversals name a real original",
        "repeats: a repeat (0401) repeats its first attempt",
        "approvals: every approval was delivered or reversed",
        "late: no late answer was forwarded",
    ]
    assert all(c.findings == [] for c in results)
