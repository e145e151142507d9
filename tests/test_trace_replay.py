"""`trace replay` end to end: real traffic through a real gateway and the simulators is recorded on
loopback (tests/trace_support.py), then replayed against a fresh gateway and the trace host.

- the same gateway passes;
- a changed gateway (a lower risk limit; another answer to an unknown reversal) fails, naming the
  field, the message and the rule;
- a recorded host timeout replays as a timeout, and the gateway's own reversal is checked too.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from xml.etree import ElementTree as ET

import anyio
import pytest

from gateway.config import LimitsConfig, ReversalConfig
from gateway.lab import CARD_CUP
from gateway.sim.host_rules import Fault
from gateway.sim.keyfile import read_test_keys
from gateway.trace.cases import Case, CaseAssembler, CaseKind, ConnEnd
from gateway.trace.diff import diff
from gateway.trace.format import FrameRecord, Leg, read_trace
from gateway.trace.pace import Pace
from gateway.trace.replay import ReplayOptions, ReplayStats, replay
from gateway.trace.report import CaseSink, Finding, FindingKind
from gateway.trace.rulesfile import load_rules
from tests.trace_support import FAST_SAF, endpoint, free_port, fresh_gateway, record_session, recorded_lab

HOST_TIMEOUT = 0.6
LATE = 1.5  #: the recorded host's answer to the slow card comes this late: a timeout


async def recorded(tmp: Path) -> tuple[Path, Path]:
    trace = tmp / "session.jsonl"
    return trace, await record_session(tmp, trace, host_timeout=HOST_TIMEOUT, late=LATE)


async def run_replay(tmp: Path, trace: Path, keys_file: Path, *, limits: LimitsConfig | None = None,
                     reversal: ReversalConfig | None = None, pace: str = "asap", name: str = "sut",
                     host_timeout: float = HOST_TIMEOUT) -> ReplaySink:
    port = free_port()
    sink = ReplaySink("replay", json_path=tmp / f"{name}.json", junit_path=tmp / f"{name}.xml")
    async with fresh_gateway(tmp, keys_file, port, host_timeout=host_timeout, limits=limits, reversal=reversal,
                             name=name) as gw:
        options = ReplayOptions(target=endpoint(gw.terminal_port), host_listen=endpoint(port),
                                keys=read_test_keys(keys_file), rules=load_rules(None, trace=trace),
                                pace=Pace.parse(pace), answer_timeout=5.0, grace=1.0, progress=0)
        with anyio.fail_after(60):
            sink.stats = await replay(trace, options, sink)
    sink.close(1.0)
    return sink


class ReplaySink(CaseSink):
    """The run's cases, and the counts `replay` returns beside them."""

    stats: ReplayStats | None = None


def findings(sink: CaseSink) -> list[str]:
    return [f.message for c in sink.failures for f in c.findings]


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One recording for the whole module (each test replays it against its own fresh gateway)."""
    tmp = tmp_path_factory.mktemp("recording")
    return anyio.run(recorded, tmp)


@pytest.mark.anyio
async def test_recorded_session_replays_clean_against_a_fresh_gateway(tmp_path: Path,
                                                                      session: tuple[Path, Path]) -> None:
    trace, keys = session
    header, records = read_trace(trace)
    items = list(CaseAssembler(header).stream(records))
    terminal_cases = [c for c in items if isinstance(c, Case) and c.kind is CaseKind.TERMINAL]
    # 2 sign-ins, 8 purchases, a refund, a void, a balance inquiry, 2 terminal reversals; nothing else
    assert len(terminal_cases) == 15
    assert all(isinstance(i, ConnEnd) or i.kind is CaseKind.TERMINAL for i in items)
    timeout_case = next(c for c in terminal_cases if c.exchange.answer and c.exchange.answer.fields.get("39") == "98")
    assert timeout_case.primary is not None and timeout_case.primary.late
    assert [x.request.mti for x in timeout_case.reversals()] == ["0400"]

    sink = await run_replay(tmp_path, trace, keys)
    assert sink.failed == 0, findings(sink)
    assert sink.total == 15
    assert sink.stats is not None and (sink.stats.cases, sink.stats.unexpected_upstream) == (15, 0)
    assert sink.stats.upstream_requests > 0


def failed_case(sink: CaseSink, name: str) -> list[Finding]:
    found = [c for c in sink.failures if c.name == name]
    assert found, f"{name} did not fail; failures: {[c.name for c in sink.failures]}"
    return found[0].findings


@pytest.mark.anyio
async def test_a_lower_risk_limit_fails_naming_the_field(tmp_path: Path, session: tuple[Path, Path]) -> None:
    trace, keys = session
    sink = await run_replay(tmp_path, trace, keys, limits=LimitsConfig(per_transaction=10_000, per_day=50_000_000))
    sale = failed_case(sink, "T1 10000001 stan 000002 0200 purchase")
    rc = next(f for f in sale if f.field == "39")
    assert (rc.kind, rc.expected, rc.got, rc.rule, rc.mti, rc.terminal, rc.stan) == (
        FindingKind.FIELD, "'00'", "'61'", "same", "0210", "10000001", "000002")
    assert "T1 10000001 stan 000002 0200 purchase: terminal 0210 field 39: expected '00', got '61'" in rc.message
    missing = [f for f in sale if f.kind is FindingKind.MISSING_FRAME]
    assert [(f.leg, f.mti) for f in missing] == [("host", "0200")]  # refused here: never sent upstream
    # the missing upstream request is named as recorded: its host STAN and its place in the trace
    _, records = read_trace(trace)
    recorded = next(r for r in records if isinstance(r, FrameRecord) and r.leg is Leg.HOST and r.mti == "0200"
                    and r.seq == missing[0].seq)
    assert missing[0].stan == recorded.fields["11"] and missing[0].terminal == "10000001"
    # the smaller purchases still pass, and the reports say the same as the sink
    assert sink.passed >= 10
    report = json.loads((tmp_path / "sut.json").read_text())
    assert report["passed"] is False
    assert any(f["field"] == "39" and f["got"] == "'61'" for c in report["cases"] for f in c["findings"])
    junit = ET.parse(tmp_path / "sut.xml").getroot().find("testsuite")
    assert junit is not None and junit.get("failures") == str(sink.failed)


@pytest.mark.anyio
async def test_a_different_response_code_rule_fails(tmp_path: Path, session: tuple[Path, Path]) -> None:
    """The changed gateway answers a reversal of an unknown original 00 where the recorded one said 25."""
    trace, keys = session
    sink = await run_replay(tmp_path, trace, keys, reversal=replace(FAST_SAF, unknown_original_rc="00"))
    assert sink.failed == 1, findings(sink)
    rev = failed_case(sink, "T2 10000002 stan 000006 0400 reversal")
    # 00 is an approval, which carries a MAC where the recorded 25 carried none
    assert [(f.field, f.expected, f.got, f.mti) for f in rev] == [
        ("39", "'25'", "'00'", "0410"), ("64", "(absent)", "<16 characters>", "0410")]


@pytest.mark.anyio
async def test_a_recorded_timeout_replays_as_a_timeout_with_its_reversal(tmp_path: Path,
                                                                         session: tuple[Path, Path]) -> None:
    """Against a gateway that waits longer than the recorded host was late, the late answer is an answer:
    the terminal gets 00 where the recording has 98, and the gateway's own reversal never comes."""
    trace, keys = session
    header, records = read_trace(trace)
    timed_out = next(c for c in CaseAssembler(header).stream(records)
                     if isinstance(c, Case) and c.exchange.answer is not None
                     and c.exchange.answer.fields.get("39") == "98")
    sink = await run_replay(tmp_path, trace, keys, host_timeout=LATE + 1.5)
    found = failed_case(sink, timed_out.name)
    assert ("39", "'98'", "'00'") in [(f.field, f.expected, f.got) for f in found]
    assert [(f.kind, f.leg, f.mti) for f in found if f.kind is not FindingKind.FIELD] == [
        (FindingKind.MISSING_FRAME, "host", "0400")]


# --- trace diff on the same recordings ---------------------------------------------------------------


def test_diff_of_a_rerun_of_the_same_input_passes(tmp_path: Path, session: tuple[Path, Path]) -> None:
    """A second recording of the same session through a new gateway and host: same cases, same fields,
    except what the rules call volatile (times, STANs the gateway allocates, host RRNs and keys)."""
    trace_a, _ = session
    trace_b, _ = anyio.run(recorded, tmp_path)
    sink = CaseSink("diff", json_path=tmp_path / "diff.json")
    stats = diff(trace_a, trace_b, load_rules(None), sink)
    sink.close(0.0)
    assert sink.failed == 0, findings(sink)
    assert stats.paired == sink.total == 15


def test_diff_names_the_message_and_field_that_changed(tmp_path: Path, session: tuple[Path, Path]) -> None:
    """B: one purchase refused 61 without going upstream, as a lower limit would do."""
    trace_a, _ = session
    trace_b = tmp_path / "changed.jsonl"
    lines = trace_a.read_text().splitlines()
    sale = next(json.loads(line) for line in lines if '"mti":"0200"' in line and '"leg":"terminal"' in line)
    key = (sale["fields"]["41"], sale["fields"]["11"])
    out = []
    dropped_host = False
    for line in lines:
        rec = json.loads(line)
        if rec.get("kind") == "frame" and rec["leg"] == "terminal" and rec["mti"] == "0210" \
                and (rec["fields"].get("41"), rec["fields"].get("11")) == key:
            rec["fields"]["39"] = "61"
        if rec.get("kind") == "frame" and rec["leg"] == "host" and rec["mti"] in ("0200", "0210") \
                and rec["fields"].get("4") == sale["fields"]["4"] and not dropped_host:
            dropped_host = rec["mti"] == "0210"
            continue
        out.append(json.dumps(rec))
    trace_b.write_text("\n".join(out) + "\n")
    sink = CaseSink("diff")
    diff(trace_a, trace_b, load_rules(None), sink)
    assert sink.failed == 1, findings(sink)
    found = sink.failures[0].findings
    assert sink.failures[0].name.endswith(f"{key[0]} stan {key[1]} 0200 purchase")
    assert (found[0].field, found[0].expected, found[0].got, found[0].mti) == ("39", "'00'", "'61'", "0210")
    assert [f.kind for f in found if f.kind is not FindingKind.FIELD] == [FindingKind.MISSING_FRAME]


@pytest.mark.anyio
async def test_scaled_pace_keeps_the_recorded_rhythm(tmp_path: Path, session: tuple[Path, Path]) -> None:
    trace, keys = session
    header, records = read_trace(trace)
    starts = [c.start for c in CaseAssembler(header).stream(records) if isinstance(c, Case)]
    span = max(starts) - min(starts)
    started = anyio.current_time()
    sink = await run_replay(tmp_path, trace, keys, pace="x2")
    assert sink.failed == 0, findings(sink)
    assert anyio.current_time() - started >= span / 2  # never earlier than the recording, halved


@pytest.mark.anyio
async def test_identical_concurrent_purchases_pair_with_their_own_answers(tmp_path: Path) -> None:
    """Eight purchases alike (same terminal, card and amount) in flight at once: nothing upstream says
    which is which, and the gateway may write them upstream in any order. The trace host pairs them in
    the order the gateway allocated their STANs, so each terminal gets the RRN its own sale was given."""
    trace = tmp_path / "alike.jsonl"
    async with recorded_lab(tmp_path, trace) as (lab, keys):
        t = lab.terminal(lab.config.terminals[0].terminal_id)
        await t.connect()
        await t.sign_in()
        results = []

        async def buy() -> None:
            results.append(await t.purchase(100, CARD_CUP))

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(buy)
        assert len({r.rrn for r in results}) == 8 and all(r.approved for r in results)
    for round_ in range(2):
        sink = await run_replay(tmp_path, trace, keys, name=f"alike{round_}")
        assert sink.failed == 0, findings(sink)
        assert sink.total == 9


@pytest.mark.anyio
async def test_a_refused_reversal_and_its_0401_repeat_replay_under_iso_practice(tmp_path: Path) -> None:
    """The host refuses the gateway's first reversal attempt; the gateway repeats it as a 0401, which
    (ISO 8583:1987 practice, the default rules) must carry the 0400's STAN and field 7 again."""
    trace = tmp_path / "repeat.jsonl"
    slow = Fault("late", seconds=HOST_TIMEOUT + 0.4, pan=CARD_CUP.pan, mti=("0200",), limit=1)
    async with recorded_lab(tmp_path, trace, faults=[slow]) as (lab, keys):
        lab.host.add_fault(Fault("reject_reversal", count=1))
        t = lab.terminal(lab.config.terminals[0].terminal_id, auto_reverse=False)
        await t.connect()
        await t.sign_in()
        assert (await t.purchase(4_000, CARD_CUP)).rc == "98"
        with anyio.fail_after(10):
            while len(lab.host.rules.reversed()) < 1:
                await anyio.sleep(0.05)
        await anyio.sleep(0.3)
    header, records = read_trace(trace)
    [case] = [c for c in CaseAssembler(header).stream(records) if isinstance(c, Case) and c.flow == "purchase"]
    first, repeat = case.reversals()
    assert (first.request.mti, first.rc, repeat.request.mti, repeat.rc) == ("0400", "96", "0401", "00")
    assert repeat.request.fields["11"] == first.request.fields["11"]  # what the default rules expect
    sink = await run_replay(tmp_path, trace, keys, name="repeat")
    assert sink.failed == 0, findings(sink)
