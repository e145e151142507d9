"""Promises of `gateway trace replay` that mutation testing found unchecked (issue 16). A malformed
trace is refused before anything listens or waits for the SUT: the run used to sit out the whole
--ready-timeout (30 s) before it read the bad line, then end in an exception group."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import anyio
import pytest

from gateway.iso.message import Message
from gateway.sim.keyfile import read_test_keys
from gateway.trace.cases import Case, CaseAssembler, CaseKind, ConnEnd, Exchange
from gateway.trace.format import Direction, EventKind, EventRecord, FrameRecord, Leg, Record
from gateway.trace.pace import Pace
from gateway.trace.player import Answer, PlayerError, Prepared
from gateway.trace.replay import ReplayError, ReplayOptions, _Live, _Run, replay, template_header
from gateway.trace.report import CaseSink, FindingKind
from gateway.trace.rules import Check, Rule
from gateway.trace.rulesfile import load_rules
from gateway.trace.trace_host import Expectation
from tests.test_trace_cases import HEADER, IN, OUT, Builder, cases
from tests.trace_support import endpoint, free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "replay"


def malformed(tmp: Path, bad_line: str = '{"kind":"frame", broken\n') -> Path:
    lines = (EXAMPLE / "session.jsonl").read_text().splitlines(keepends=True)
    path = tmp / "bad.jsonl"
    path.write_text("".join(lines[:-3]) + bad_line + "".join(lines[-3:]))  # near the end, after many good lines
    return path


@pytest.mark.anyio
async def test_a_malformed_trace_is_refused_before_the_trace_host_listens(tmp_path: Path) -> None:
    trace = malformed(tmp_path)
    port = free_port()
    options = ReplayOptions(target=endpoint(free_port()), host_listen=endpoint(port),
                            keys=read_test_keys(EXAMPLE / "lab-keys.toml"), rules=load_rules(None, trace=trace),
                            pace=Pace.parse("asap"), ready_timeout=30.0, progress=0)
    sink = CaseSink("replay")
    started = anyio.current_time()
    with anyio.fail_after(10), pytest.raises(ReplayError, match=r"bad\.jsonl: not a valid trace: line \d+"):
        await replay(trace, options, sink)
    assert anyio.current_time() - started < 5  # not the ready timeout
    with socket.socket() as s:  # nothing was left listening on the trace host's port
        s.bind(("127.0.0.1", port))
    assert sink.failed == 0 and sink.passed == 0


def test_the_command_says_which_line_and_exits_2(tmp_path: Path) -> None:
    trace = malformed(tmp_path, '{"kind":"frame","seq":3,"t":"soon"}\n')
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "trace", "replay", str(trace), "--target",
                           f"127.0.0.1:{free_port()}", "--host-listen", f"127.0.0.1:{free_port()}", "--keys",
                           str(EXAMPLE / "lab-keys.toml")], capture_output=True, text=True, timeout=25, cwd=ROOT)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "not a valid trace: line" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert "waiting for the SUT" not in done.stderr


@pytest.mark.anyio
async def test_a_trace_of_another_terminal_dialect_is_refused_before_anything_listens(tmp_path: Path) -> None:
    lines = (EXAMPLE / "session.jsonl").read_text().splitlines(keepends=True)
    header = json.loads(lines[0])
    header["dialects"]["terminal"] = "iso87-ascii"
    trace = tmp_path / "other.jsonl"
    trace.write_text(json.dumps(header) + "\n" + "".join(lines[1:]))
    port = free_port()
    options = ReplayOptions(target=endpoint(free_port()), host_listen=endpoint(port),
                            keys=read_test_keys(EXAMPLE / "lab-keys.toml"), rules=load_rules(None),
                            pace=Pace.parse("asap"), ready_timeout=30.0, progress=0)
    sink = CaseSink("replay")
    with anyio.fail_after(10), pytest.raises(ReplayError, match=r"CUP POS terminal dialect only .*iso87-ascii"):
        await replay(trace, options, sink)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    assert sink.total == 0


def test_a_replay_without_a_trace_assumes_the_gateways_two_dialects() -> None:
    header = template_header()
    assert header.dialects == {"terminal": "cup-pos", "host": "iso87-ascii"}
    assert header.framings == {"terminal": "cup", "host": "len2"}


# --- what a finding names: the unexpected upstream request, a second answer, the automatic sign-in -------
# (the cases' bookkeeping is driven directly: a SUT that misbehaves on purpose is what these stand in for)


def a_run() -> _Run:
    options = ReplayOptions(target=endpoint(free_port()), host_listen=endpoint(free_port()),
                            keys=read_test_keys(EXAMPLE / "lab-keys.toml"), rules=load_rules(None),
                            pace=Pace.parse("asap"), progress=0)
    return _Run(options, template_header(), CaseSink("replay"), lambda line: None)


@pytest.mark.anyio
async def test_an_unexpected_upstream_request_is_counted_and_named_in_its_terminals_latest_case() -> None:
    run = a_run()
    older = _Live(run, "T1 10000001 stan 000001 0200 purchase", "10000001", "000001")
    latest = _Live(run, "T1 10000001 stan 000002 0200 purchase", "10000001", "000002")
    other = _Live(run, "T2 10000002 stan 000003 0200 purchase", "10000002", "000003")
    run.by_terminal = {"10000001": [older, latest], "10000002": [other]}
    run._unexpected(Message("0200", {"41": "10000001", "11": "000123", "4": "000000001234"}), {})
    assert run.stats.unexpected_upstream == 1
    assert older.findings == [] and other.findings == [] and run.orphans == []
    [f] = latest.findings
    assert (f.kind, f.leg, f.mti, f.terminal, f.stan) == (FindingKind.UNEXPECTED_FRAME, "host", "0200", "10000001",
                                                          "000123")
    assert f.message == ("T1 10000001 stan 000002 0200 purchase: an upstream 0200 (host stan 000123, amount "
                         "000000001234) the recording does not have")
    sink = CaseSink("replay")  # a finding fails the case
    sink.add(latest.result())
    assert sink.failed == 1


@pytest.mark.anyio
async def test_an_unexpected_upstream_request_of_no_case_in_flight_is_an_orphan_named_by_its_terminal() -> None:
    run = a_run()
    run._unexpected(Message("0400", {"41": "10000009", "11": "000777", "4": "000000000500"}), {})
    run._unexpected(Message("0800", {}), {})  # nothing to name it by: still counted, still said
    assert run.stats.unexpected_upstream == 2
    first, second = run.orphans
    assert (first.kind, first.leg, first.mti, first.terminal, first.stan) == (
        FindingKind.UNEXPECTED_FRAME, "host", "0400", "10000009", "000777")
    assert first.message == ("terminal 10000009: an upstream 0400 (host stan 000777, amount 000000000500) the "
                             "recording does not have")
    assert (second.mti, second.terminal, second.stan) == ("0800", "", "")
    assert second.message == "terminal ?: an upstream 0800 (host stan -, amount -) the recording does not have"
    for n in range(1200):  # a SUT that floods the host: every one counted, the report stays bounded
        run._unexpected(Message("0200", {"41": "10000009", "11": f"{n:06d}"}), {})
    assert run.stats.unexpected_upstream == 1202
    assert len(run.orphans) == 1000


def terminal_case(tid: str = "10000001", stan: str = "000002") -> Case:
    request = FrameRecord(seq=7, t=1.0, leg=Leg.TERMINAL, dir=Direction.IN, conn="T1", mti="0200",
                          fields={"11": stan, "41": tid, "4": "000000012345"})
    answer = FrameRecord(seq=8, t=1.1, leg=Leg.TERMINAL, dir=Direction.OUT, conn="T1", mti="0210",
                         fields={"11": stan, "41": tid, "39": "00"})
    return Case(1, CaseKind.TERMINAL, 1.0, "T1", tid, stan, "0200", "purchase",
                Exchange(Leg.TERMINAL, "T1", request, answer))


def answer(mti: str, fields: dict[str, str]) -> Answer:
    return Answer(Message(mti, fields), b"", None, 0.0)


@pytest.mark.anyio
async def test_a_second_answer_to_one_request_is_reported_and_only_that_one() -> None:
    run = a_run()
    case = terminal_case()
    live = _Live(run, case.name, case.terminal, case.stan, case)
    second = answer("0210", {"11": "000002", "41": "10000001", "39": "00"})
    other_stan = answer("0210", {"11": "000003", "41": "10000001", "39": "00"})
    other_terminal = answer("0210", {"11": "000002", "41": "10000002", "39": "00"})
    other_class = answer("0410", {"11": "000002", "41": "10000001", "39": "00"})
    player = SimpleNamespace(unpaired=deque([other_stan, second, other_terminal, other_class]))
    run._second_answers(live, player, case)  # type: ignore[arg-type]
    [f] = live.findings
    assert (f.kind, f.leg, f.mti, f.terminal, f.stan) == (FindingKind.UNEXPECTED_FRAME, "terminal", "0210",
                                                          "10000001", "000002")
    assert f.message == f"{case.name}: a second answer 0210 rc 00 to 0200 stan 000002 (the recording has one)"
    # taken: it is reported once, and the answers of other requests stay for their own cases
    assert list(player.unpaired) == [other_stan, other_terminal, other_class]
    run._second_answers(live, player, case)  # type: ignore[arg-type]
    assert len(live.findings) == 1


@pytest.mark.anyio
async def test_every_second_answer_is_reported_a_repeat_too_and_without_rc() -> None:
    run = a_run()
    case = terminal_case()
    live = _Live(run, case.name, case.terminal, case.stan, case)
    player = SimpleNamespace(unpaired=deque([answer("0210", {"11": "000002", "41": "10000001"}),
                                             answer("0211", {"11": "000002", "41": "10000001", "39": "05"})]))
    run._second_answers(live, player, case)  # type: ignore[arg-type]
    assert [(f.mti, f.stan, f.message.split(": ", 1)[1]) for f in live.findings] == [
        ("0210", "000002", "a second answer 0210 rc - to 0200 stan 000002 (the recording has one)"),
        ("0211", "000002", "a second answer 0211 rc 05 to 0200 stan 000002 (the recording has one)")]
    assert not player.unpaired


class SignInPlayer:
    """Answers the automatic sign-in as told; keeps what it was asked to send."""

    def __init__(self, reply: Answer | None, verified: dict[str, str]) -> None:
        self.reply, self.verified = reply, verified
        self.sent: list[Message] = []

    def prepare(self, mti: str, fields: dict[str, str], secrets: object, envelope: object, pin: str = "") -> Prepared:
        self.sent.append(Message(mti, dict(fields)))
        return Prepared(self.sent[-1], b"")

    async def exchange(self, prepared: Prepared, timeout: float) -> Answer | None:
        return self.reply

    def verify(self, request: Message, got: Answer) -> dict[str, str]:
        return self.verified


async def sign_in(rc: str | None, verified: dict[str, str], fields: dict[str, str] | None = None
                  ) -> tuple[_Run, _Live, SignInPlayer]:
    run = a_run()
    live = _Live(run, "T1 10000001 stan 000005 0200 purchase", "10000001", "000005")
    reply = None if rc is None else answer("0810", {"39": rc, "41": "10000001"})
    player = SignInPlayer(reply, verified)
    with anyio.fail_after(5):
        await run._sign_in(live, player, fields or {"41": "10000001", "42": "999999999999999",  # type: ignore[arg-type]
                                                    "60": "22000042000"})
    return run, live, player


@pytest.mark.anyio
async def test_an_accepted_automatic_sign_in_is_no_finding_and_keeps_the_batch() -> None:
    run, live, player = await sign_in("00", {"62": ""})
    assert live.findings == []
    assert run.batches == {"10000001": "000042"}
    [sent] = player.sent
    # the sign-in as the terminal would send it: its lab merchant, the request's batch, a STAN of its own
    assert sent.mti == "0800"
    assert (sent.fields["41"], sent.fields["42"], sent.fields["60"][2:8]) == ("10000001", "898100012340001", "000042")
    assert sent.fields["11"] == "000001"


@pytest.mark.anyio
@pytest.mark.parametrize(("rc", "verified", "said"), [
    ("05", {"62": ""}, "automatic sign-in refused (05)"),
    ("00", {"62": "the check value does not match"}, "automatic sign-in refused (00: the check value does not match)"),
    ("00", {}, "automatic sign-in refused (00: no key block in the answer)"),
])
async def test_a_refused_automatic_sign_in_fails_the_case(rc: str, verified: dict[str, str], said: str) -> None:
    run, live, _ = await sign_in(rc, verified)
    [f] = live.findings
    assert (f.kind, f.leg, f.mti, f.terminal) == (FindingKind.FIELD, "terminal", "0810", "10000001")
    assert f.message == f"{live.name}: {said}"
    assert run.batches == {}  # a refused sign-in's batch is not the terminal's
    sink = CaseSink("replay")
    sink.add(live.result())
    assert sink.failed == 1


@pytest.mark.anyio
async def test_an_unanswered_automatic_sign_in_fails_the_case() -> None:
    run, live, _ = await sign_in(None, {})
    [f] = live.findings
    assert (f.kind, f.leg, f.mti, f.message) == (FindingKind.MISSING_FRAME, "terminal", "0800",
                                                 f"{live.name}: automatic sign-in: no answer")
    assert run.batches == {}


@pytest.mark.anyio
async def test_an_automatic_sign_in_of_a_terminal_not_in_the_keys_uses_the_requests_merchant_and_batch_1() -> None:
    run, live, player = await sign_in("00", {"62": ""}, {"41": "10000009", "42": "123456789012345"})
    assert live.findings == [] and run.batches == {"10000009": "000001"}
    [sent] = player.sent
    assert (sent.fields["41"], sent.fields["42"], sent.fields["60"][2:8]) == ("10000009", "123456789012345", "000001")


class UnpairedPlayer:
    """A player whose connection holds `mismatch` (an answer that paired with no request), if any."""

    def __init__(self, mismatch: Answer | None = None) -> None:
        self.mismatch = mismatch

    def take_unpaired(self, request: Message) -> Answer | None:
        found, self.mismatch = self.mismatch, None
        return found

    def verify(self, request: Message, got: Answer) -> dict[str, str]:
        return {}


SENT = Message("0200", {"11": "000002", "41": "10000001", "4": "000000012345"})


@pytest.mark.anyio
async def test_an_answer_with_the_wrong_match_key_names_what_came_and_what_was_due() -> None:
    run = a_run()
    case = terminal_case()
    live = _Live(run, case.name, case.terminal, case.stan, case)
    player = UnpairedPlayer(answer("0210", {"11": "000009", "41": "10000001", "39": "00"}))
    run._judge_answer(live, case.exchange.request, SENT, case.exchange.answer, None, player, 3.0)  # type: ignore[arg-type]
    [f] = live.findings
    assert (f.kind, f.leg, f.mti, f.stan, f.seq, f.expected, f.got) == (
        FindingKind.MATCH_KEY, "terminal", "0210", "000009", 7, "0210 stan 000002", "0210 stan 000009")
    assert f.message == (f"{case.name}: an answer 0210 came for terminal 10000001 stan 000009, which does not pair "
                         "with the request 0200 stan 000002 (expected 0210, stan 000002, terminal 10000001)")


@pytest.mark.anyio
async def test_no_answer_names_the_recorded_answer_it_missed() -> None:
    run = a_run()
    case = terminal_case()
    live = _Live(run, case.name, case.terminal, case.stan, case)
    run._judge_answer(live, case.exchange.request, SENT, case.exchange.answer, None, UnpairedPlayer(), 3.0)  # type: ignore[arg-type]
    [f] = live.findings
    assert (f.kind, f.leg, f.mti, f.stan, f.seq) == (FindingKind.MISSING_FRAME, "terminal", "0210", "000002", 8)
    assert f.message == f"{case.name}: no answer to 0200 stan 000002 within 3.0s (the recording has 0210 rc 00)"


@pytest.mark.anyio
async def test_no_answer_to_a_template_case_is_missing_and_none_where_the_recording_has_none_is_fine() -> None:
    run = a_run()
    case = terminal_case()
    silent = _Live(run, case.name, case.terminal, case.stan, case)
    run._no_answer(silent, SENT, None, UnpairedPlayer(), 3.0, 7)  # type: ignore[arg-type]
    assert silent.findings == []
    # a template case (its rules file's own request): any template will do, only its being one counts
    live = _Live(run, "purchase template", "10000001", "000002", template=SimpleNamespace())  # type: ignore[arg-type]
    run._no_answer(live, SENT, None, UnpairedPlayer(), 2.5, None)  # type: ignore[arg-type]
    [f] = live.findings
    assert (f.kind, f.leg, f.mti, f.stan) == (FindingKind.MISSING_FRAME, "terminal", "0200", "000002")
    assert f.message == "purchase template: no answer to 0200 stan 000002 within 2.5s"


@pytest.mark.anyio
async def test_an_answer_the_recording_does_not_have_is_unexpected_and_named() -> None:
    run = a_run()
    case = terminal_case()
    live = _Live(run, case.name, case.terminal, case.stan, case)
    got = answer("0210", {"11": "000002", "41": "10000001", "39": "05"})
    run._judge_answer(live, case.exchange.request, SENT, None, got, UnpairedPlayer(), 3.0)  # type: ignore[arg-type]
    [f] = live.findings
    assert (f.kind, f.leg, f.mti, f.stan) == (FindingKind.UNEXPECTED_FRAME, "terminal", "0210", "000002")
    assert f.message == f"{case.name}: an answer 0210 rc 05 the recording does not have (it shows none)"


@pytest.mark.anyio
async def test_a_recorded_upstream_request_the_sut_never_sent_is_missing_and_named_as_recorded() -> None:
    run = a_run()
    run.options = replace(run.options, grace=0.1)
    case = terminal_case()
    upstream = FrameRecord(seq=9, t=1.0, leg=Leg.HOST, dir=Direction.OUT, conn="H1", mti="0200",
                           fields={"11": "000321", "41": "10000001", "4": "000000012345"})
    case.upstream.append(Exchange(Leg.HOST, "H1", upstream))
    live = _Live(run, case.name, case.terminal, case.stan, case)
    with anyio.fail_after(5):
        await run._await_upstream(live, case, anyio.current_time())
    [f] = live.findings
    assert (f.kind, f.leg, f.mti, f.stan, f.seq) == (FindingKind.MISSING_FRAME, "host", "0200", "000321", 9)
    assert f.message == (f"{case.name}: the SUT never sent the upstream 0200 the recording has (recorded host stan "
                         "000321, amount 000000012345)")


def host_case(answered: bool) -> Case:
    request = FrameRecord(seq=3, t=1.0, leg=Leg.HOST, dir=Direction.IN, conn="H1", mti="0800",
                          fields={"11": "000044", "70": "301"})
    reply = FrameRecord(seq=4, t=1.1, leg=Leg.HOST, dir=Direction.OUT, conn="H1", mti="0810",
                        fields={"11": "000044", "70": "301", "39": "00"}) if answered else None
    return Case(2, CaseKind.HOST, 1.0, "H1", "", "000044", "0800", "", Exchange(Leg.HOST, "H1", request, reply))


@pytest.mark.anyio
async def test_a_host_request_the_sut_leaves_unanswered_is_missing() -> None:
    run = a_run()
    case = host_case(answered=True)
    live = _Live(run, case.name, case.terminal, case.stan, case)
    with anyio.fail_after(5):
        await run._host_case(live, case)  # no SUT connected: no answer comes
    [f] = live.findings
    assert (f.kind, f.leg, f.mti, f.seq) == (FindingKind.MISSING_FRAME, "host", "0810", 4)
    assert f.message == f"{case.name}: the SUT did not answer the host's 0800 stan 000044"


@pytest.mark.anyio
async def test_an_answer_to_a_host_request_the_recording_left_unanswered_is_unexpected(
        monkeypatch: pytest.MonkeyPatch) -> None:
    run = a_run()
    case = host_case(answered=False)
    live = _Live(run, case.name, case.terminal, case.stan, case)

    async def answers(msg: Message, timeout: float) -> Message:
        return Message("0810", {"11": msg.fields["11"], "39": "00"})

    monkeypatch.setattr(run.host, "send_request", answers)
    with anyio.fail_after(5):
        await run._host_case(live, case)
    [f] = live.findings
    assert (f.kind, f.leg, f.mti) == (FindingKind.UNEXPECTED_FRAME, "host", "0810")
    assert f.message == f"{case.name}: the SUT answered the host's 0800 (0810); the recording has no answer"


# --- the assembler: what the replay's cases are made of ---------------------------------------------------


def approved_purchase(b: Builder, terminal_rc: str = "00") -> list[Record]:
    return [b.term(1.0, IN, "T1", "0200", "10000001", "000007", "000000004200"),
            b.host(1.1, OUT, "0200", "10000001", "000061", "000000004200"),
            b.host(1.2, IN, "0210", "10000001", "000061", "000000004200", "00"),
            b.term(1.3, OUT, "T1", "0210", "10000001", "000007", "000000004200", terminal_rc)]


def test_an_approval_the_terminal_got_is_dispatched_at_once_and_expects_no_reversal() -> None:
    assembler = CaseAssembler(HEADER, horizon=10.0)
    *head, last = approved_purchase(Builder())
    assert [i for r in head for i in assembler.feed(r)] == []
    [case] = assembler.feed(last)
    assert isinstance(case, Case) and not case.expects_reversal() and assembler.held == 0


def test_an_approval_the_terminal_did_not_get_as_one_waits_for_its_reversal() -> None:
    assembler = CaseAssembler(HEADER, horizon=10.0)
    assert [i for r in approved_purchase(Builder(), terminal_rc="98") for i in assembler.feed(r)] == []
    assert assembler.held == 1
    [case] = assembler.finish()
    assert isinstance(case, Case) and case.expects_reversal() and not case.reversed_upstream()


def test_an_incomplete_case_is_dispatched_when_exactly_the_horizon_has_passed() -> None:
    b = Builder()
    assembler = CaseAssembler(HEADER, horizon=10.0)
    assert assembler.feed(b.term(1.0, IN, "T1", "0200", "10000001", "000007", "000000004200")) == []
    assert assembler.feed(EventRecord(99, 10.9, Leg.HOST, "H1", EventKind.CONNECT)) == []
    out = assembler.feed(EventRecord(100, 11.0, Leg.HOST, "H1", EventKind.CONNECT))
    assert [i.name for i in out if isinstance(i, Case)] == ["T1 10000001 stan 000007 0200 purchase"]


def test_answers_on_the_host_leg_no_request_explains_are_counted() -> None:
    b = Builder()
    assembler = CaseAssembler(HEADER)
    # the SUT answers a host request the trace does not have; the host answers a request never sent
    assembler.feed(FrameRecord(next(b.seq), 1.0, Leg.HOST, OUT, "H1", "0810", {"11": "900001", "39": "00",
                                                                             "70": "301"}))
    assembler.feed(b.host(1.1, IN, "0210", "10000001", "000061", "000000004200", "00"))
    assembler.finish()
    assert assembler.unpaired_answers == 2


def test_a_lone_upstream_request_of_no_known_flow_is_named_by_its_mti_alone() -> None:
    b = Builder()
    [case] = cases([FrameRecord(next(b.seq), 1.0, Leg.HOST, OUT, "H1", "0600", {"11": "000099", "41": "10000001"})])
    assert (case.kind, case.flow, case.name) == (CaseKind.UPSTREAM, "", "H1 upstream stan 000099 0600")
    assert case.exchange.leg is Leg.HOST and case.exchange.request.fields["11"] == "000099"


def test_alike_concurrent_purchases_swap_upstream_by_the_reference_and_a_later_reversal_follows() -> None:
    b = Builder()
    refs = {"000051": ("510000000051", "AUTH51"), "000052": ("520000000052", "AUTH52")}

    def with_ref(rec: FrameRecord, stan: str) -> FrameRecord:
        rec.fields["37"], rec.fields["38"] = refs[stan]
        return rec

    f90 = "0200" + "000052" + "1124101010" + "00000001234" + "00000000000"
    records: list[Record] = [
        b.term(1.00, IN, "T1", "0200", "10000001", "000001", "000000001000"),
        b.term(1.01, IN, "T2", "0200", "10000001", "000002", "000000001000"),
        b.host(1.02, OUT, "0200", "10000001", "000051", "000000001000"),  # linked in arrival order: to T1
        b.host(1.03, OUT, "0200", "10000001", "000052", "000000001000"),
        with_ref(b.host(1.04, IN, "0210", "10000001", "000051", "000000001000", "00"), "000051"),
        with_ref(b.host(1.05, IN, "0210", "10000001", "000052", "000000001000", "00"), "000052"),
        # but the SUT gave T1 the answer of 000052, and T2 that of 000051
        with_ref(b.term(1.06, OUT, "T1", "0210", "10000001", "000001", "000000001000", "00"), "000052"),
        with_ref(b.term(1.07, OUT, "T2", "0210", "10000001", "000002", "000000001000", "00"), "000051"),
        b.host(2.00, OUT, "0400", "10000001", "000053", "000000001000", f90=f90),
        b.host(2.10, IN, "0410", "10000001", "000053", "000000001000", "00"),
    ]
    c1, c2 = cases(records)
    assert c1.primary is not None and c1.primary.request.fields["11"] == "000052"
    assert c2.primary is not None and c2.primary.request.fields["11"] == "000051"
    # the reversal names host STAN 000052: it is T1's now
    assert [x.request.fields["11"] for x in c1.reversals()] == ["000053"] and c2.reversals() == []


@pytest.mark.anyio
async def test_a_host_requests_answer_that_differs_names_the_host_leg_and_the_field(
        monkeypatch: pytest.MonkeyPatch) -> None:
    run = a_run()
    case = host_case(answered=True)
    live = _Live(run, case.name, case.terminal, case.stan, case)

    async def answers(msg: Message, timeout: float) -> Message:
        assert (msg.mti, msg.fields) == (case.exchange.request.mti, case.exchange.request.fields)  # as recorded
        return Message("0810", {"11": msg.fields["11"], "70": "301", "39": "96"})

    monkeypatch.setattr(run.host, "send_request", answers)
    with anyio.fail_after(5):
        await run._host_case(live, case)
    rc = next(f for f in live.findings if f.field == "39")
    assert (rc.kind, rc.leg, rc.mti, rc.stan, rc.expected, rc.got) == (FindingKind.FIELD, "host", "0810", "000044",
                                                                     "'00'", "'96'")


@pytest.mark.anyio
async def test_a_mismatched_answer_without_a_stan_says_so() -> None:
    run = a_run()
    case = terminal_case()
    live = _Live(run, case.name, case.terminal, case.stan, case)
    run._no_answer(live, SENT, case.exchange.answer, UnpairedPlayer(answer("0210", {"41": "10000001"})),  # type: ignore[arg-type]
                   3.0, 7)
    [f] = live.findings
    assert (f.kind, f.stan, f.got) == (FindingKind.MATCH_KEY, "", "0210 stan ")
    assert "came for terminal 10000001 stan ?, which does not pair" in f.message


async def broken_player() -> None:
    raise PlayerError("connection refused by 127.0.0.1")


async def broken_tool() -> None:
    raise KeyError("62")


@pytest.mark.anyio
@pytest.mark.parametrize(("work", "kind", "said"), [
    (broken_player, FindingKind.MISSING_FRAME, "the player could not talk to the SUT: connection refused by 127.0.0.1"),
    (broken_tool, FindingKind.INVARIANT, "internal error of the replay: KeyError: '62'"),
])
async def test_a_case_the_replay_cannot_play_fails_on_its_own_and_leaves_nothing_in_flight(
        work: Callable[[], Awaitable[None]], kind: FindingKind, said: str) -> None:
    run = a_run()
    case = terminal_case()
    live = _Live(run, case.name, case.terminal, case.stan, case)
    await run.limiter.acquire()
    run.live[case.id] = live
    run.by_terminal[case.terminal] = [live]
    run._conn(case.conn).open_cases.append(live)
    with anyio.fail_after(5):
        await run._finish(live, work())
    [f] = live.findings
    assert (f.kind, f.message, f.leg, f.mti, f.stan) == (kind, f"{case.name}: {said}", "", "", "")  # no frame to name
    assert live.sent.is_set() and live.answered.is_set() and live.done.is_set()  # nothing waits for it
    assert run.live == {} and run.by_terminal == {} and run.conns[case.conn].open_cases == []
    assert (run.sink.total, run.sink.failed, run.stats.cases) == (1, 1, 1)
    assert 0 <= run.sink.failures[0].seconds < 5
    assert run.limiter.value == 100


@pytest.mark.anyio
async def test_an_automatic_sign_in_that_cannot_be_built_fails_the_case_and_sends_nothing() -> None:
    _, live, player = await sign_in("00", {"62": ""}, {"41": "1000001", "42": "898100012340001"})  # 7 characters
    [f] = live.findings
    assert (f.kind, f.leg, f.mti) == (FindingKind.FIELD, "terminal", "0800")
    assert f.message.startswith(f"{live.name}: automatic sign-in impossible: ") and "field 41" in f.message
    assert player.sent == []


@pytest.mark.anyio
async def test_a_second_answer_to_a_request_without_a_stan_names_no_stan() -> None:
    run = a_run()
    case = terminal_case()
    del case.exchange.request.fields["11"]
    live = _Live(run, case.name, case.terminal, "", case)
    player = SimpleNamespace(unpaired=deque([answer("0210", {"41": "10000001", "39": "00"})]))
    run._second_answers(live, player, case)  # type: ignore[arg-type]
    [f] = live.findings
    assert (f.kind, f.mti, f.stan) == (FindingKind.UNEXPECTED_FRAME, "0210", "")


@pytest.mark.anyio
async def test_the_run_says_where_the_trace_host_listens_and_fails_when_no_sut_connects() -> None:
    port = free_port()
    options = ReplayOptions(target=endpoint(free_port()), host_listen=endpoint(port),
                            keys=read_test_keys(EXAMPLE / "lab-keys.toml"), rules=load_rules(None),
                            pace=Pace.parse("asap"), ready_timeout=0.3, progress=0)
    said: list[str] = []
    with anyio.fail_after(10), pytest.raises(ReplayError, match=rf"did not connect to the trace host at "
                                                                 rf"127\.0\.0\.1:{port} and sign on within 0\.3s"):
        await replay(None, options, CaseSink("replay"), said.append)
    assert said == [f"trace host listening on 127.0.0.1:{port}; waiting for the SUT to sign on (up to 0.3s)"]


@pytest.mark.anyio
async def test_a_sut_that_refuses_the_terminal_connection_fails_the_case_and_the_run_forgets_it() -> None:
    run = a_run()  # its target is a free port: nothing listens there
    case = terminal_case()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            run.player_tg = tg
            await run._dispatch(tg, case)
            await run._dispatch(tg, ConnEnd(case.conn, 2.0, (case.id,)))
    [failed] = run.sink.failures
    assert failed.name == case.name
    assert [(f.kind, f.message.startswith(f"{case.name}: the player could not talk to the SUT: "))
            for f in failed.findings] == [(FindingKind.MISSING_FRAME, True)]
    # nothing of it stays in flight: not the case, not its terminal, not its closed connection
    assert run.live == {} and run.by_terminal == {} and run.conns == {}
    assert run.stats.cases == 1 and run.stans == {"10000001": 2}


@pytest.mark.anyio
async def test_a_template_cases_upstream_request_that_breaks_its_rule_is_named_by_mti_and_stan() -> None:
    run = a_run()
    template = SimpleNamespace(expect_upstream={"4": Rule(Check.ONE_OF, frozenset({"000002000000"}),
                                                          text="one-of 000002000000", origin="rules.toml")})
    live = _Live(run, "big purchase", "10000001", "000010", template=template)  # type: ignore[arg-type]
    exp = Expectation(live, None)
    live.on_upstream(exp, Message("0200", {"3": "000000", "4": "000000000100", "11": "000321", "41": "10000001"}),
                     {})
    assert run.stats.upstream_requests == 1
    amount = next(f for f in live.findings if f.field == "4")
    assert (amount.kind, amount.leg, amount.mti, amount.stan, amount.terminal) == (
        FindingKind.FIELD, "host", "0200", "000321", "10000001")
    assert amount.message.startswith("big purchase: host 0200 field 4: expected ")


@pytest.mark.anyio
async def test_an_upstream_request_without_a_terminal_id_belongs_to_the_open_request_without_one() -> None:
    b = Builder()
    request = b.term(1.0, IN, "T1", "0200", "", "000007", "000000004200")
    del request.fields["41"]
    upstream = b.host(1.1, OUT, "0200", "", "000061", "000000004200")
    del upstream.fields["41"]
    [case] = cases([request, upstream])
    assert case.kind is CaseKind.TERMINAL and case.primary is not None and case.primary.request is upstream
