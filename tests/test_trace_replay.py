"""`trace replay` end to end: real traffic through a real gateway and the simulators is recorded on
loopback (tests/trace_support.py), then replayed against a fresh gateway and the trace host.

- the same gateway passes;
- a changed gateway (a lower risk limit; another answer to an unknown reversal) fails, naming the
  field, the message and the rule;
- a recorded host timeout replays as a timeout, and the gateway's own reversal is checked too.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from gateway.config import LimitsConfig, ReversalConfig
from gateway.lab import CARD_CUP, CARD_CUP_2, CARD_LOW, CARD_VISA
from gateway.sim.host_rules import Fault
from gateway.trace.cases import Case, CaseAssembler, CaseKind, ConnEnd
from gateway.trace.format import read_trace
from gateway.trace.keys import load_keys
from gateway.trace.report import CaseSink, FindingKind
from gateway.trace.pace import Pace
from gateway.trace.replay import ReplayOptions, replay
from gateway.trace.rulesfile import load_rules
from tests.trace_support import FAST_SAF, endpoint, free_port, fresh_gateway, recorded_lab

pytestmark = pytest.mark.anyio

HOST_TIMEOUT = 0.6
LATE = 1.5  #: the recorded host's answer to the slow card comes this late: a timeout


async def record_session(tmp: Path) -> tuple[Path, Path]:
    """Sign-ins, approvals, declines, a refund of a purchase by its RRN, a void, a balance inquiry,
    a terminal reversal, and a host timeout that the gateway reverses by itself."""
    trace = tmp / "session.jsonl"
    slow = Fault("late", seconds=LATE, pan=CARD_CUP_2.pan, mti=("0200",), limit=1)
    async with recorded_lab(tmp, trace, host_timeout=HOST_TIMEOUT, faults=[slow]) as lab:
        t1, t2 = lab.terminal(0), lab.terminal(1)
        await t1.connect()
        await t2.connect()
        assert (await t1.sign_in()).rc == "00"
        assert (await t2.sign_in()).rc == "00"
        sale = await t1.purchase(12_345, CARD_CUP)
        assert sale.approved
        assert (await t2.purchase(8_800, CARD_VISA)).approved
        assert (await t1.purchase(9_000, CARD_LOW)).rc == "51"
        assert (await t2.purchase(1_000, CARD_CUP, pin="999999")).rc == "55"
        refund = await t1.refund(2_000, CARD_CUP, original=sale)
        assert refund.rc == "00"
        sale2 = await t2.purchase(3_300, CARD_VISA)
        assert (await t2.void(sale2)).rc == "00"
        assert (await t1.balance(CARD_CUP)).rc == "00"
        sale3 = await t1.purchase(700, CARD_VISA)
        assert (await t1.reversal(sale3, "96")).rc == "00"
        timed_out = await t1.purchase(4_200, CARD_CUP_2)
        assert timed_out.rc == "98"
        # wait (bounded) until the gateway's own reversal of it is acknowledged by the host
        with anyio.fail_after(10):
            while len(lab.host.rules.reversed()) < 2:  # the terminal's reversal and the gateway's
                await anyio.sleep(0.05)
        await anyio.sleep(LATE)  # the late approval arrives too, and is journalled, never forwarded
    return trace, lab.keys_file


async def run_replay(tmp: Path, trace: Path, keys_file: Path, *, limits: LimitsConfig | None = None,
                     reversal: ReversalConfig | None = None, pace: str = "asap",
                     name: str = "sut") -> CaseSink:
    port = free_port()
    sink = CaseSink("replay", json_path=tmp / f"{name}.json", junit_path=tmp / f"{name}.xml")
    async with fresh_gateway(tmp, keys_file, port, host_timeout=HOST_TIMEOUT, limits=limits, reversal=reversal,
                             name=name) as gw:
        options = ReplayOptions(target=endpoint(gw.terminal_port), host_listen=endpoint(port),
                                keys=load_keys(keys_file), rules=load_rules(None, trace=trace),
                                pace=Pace.parse(pace), answer_timeout=5.0, grace=3.0, progress=0)
        with anyio.fail_after(60):
            await replay(trace, options, sink)
    sink.close(1.0)
    return sink


def findings(sink: CaseSink) -> list[str]:
    return [f.message for c in sink.failures for f in c.findings]


async def test_recorded_session_replays_clean_against_a_fresh_gateway(tmp_path: Path) -> None:
    trace, keys = await record_session(tmp_path)
    header, records = read_trace(trace)
    items = list(CaseAssembler(header).stream(records))
    terminal_cases = [c for c in items if isinstance(c, Case) and c.kind is CaseKind.TERMINAL]
    # 2 sign-ins, 7 purchases, a refund, a void, a balance inquiry, a terminal reversal; nothing else
    assert len(terminal_cases) == 13
    assert all(isinstance(i, ConnEnd) or i.kind is CaseKind.TERMINAL for i in items)
    timeout_case = next(c for c in terminal_cases if c.exchange.answer and c.exchange.answer.fields.get("39") == "98")
    assert timeout_case.primary is not None and timeout_case.primary.late
    assert [x.request.mti for x in timeout_case.reversals()] == ["0400"]

    sink = await run_replay(tmp_path, trace, keys)
    assert sink.failed == 0, findings(sink)
    assert sink.total == 13
