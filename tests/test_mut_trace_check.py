"""The promises of `gateway trace check` that mutation testing found unchecked (issue 16), and the
defects found with them: a partial approval (39 = 10) charges the customer like an 00 and must be
delivered or reversed; a trace of nothing but undecodable frames checked nothing and must not pass;
a trace cut off mid-line by a crash is read up to the cut; `| head` ends the command quietly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.iso.build import cup, iso87
from gateway.iso.build.response import response
from gateway.iso.codec import Codec
from gateway.trace.check import Checker, CheckOptions
from gateway.trace.encoder import TraceEncoder
from gateway.trace.format import (
    Direction,
    EventKind,
    Leg,
    Record,
    TraceFormatError,
    format_match_key,
    read_trace,
    write_records,
)
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

