"""Hand-written cases (jPOS-EE style) run by `trace replay` against a real gateway, a host-initiated
0800 replayed to the gateway, and an answer with a wrong match key told apart from a timeout."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest

from gateway.iso.codec import Codec
from gateway.iso.framing import make_framer
from gateway.iso.spec import load_dialect
from gateway.lab import CARD_CUP, LOOPBACK, MERCHANT_ID, terminal_ids
from gateway.security.algorithms import generate_key
from gateway.sim.keyfile import LabKeys, LabTerminal, read_test_keys, render_test_keys
from gateway.trace.format import Direction, FrameRecord, Leg, TraceHeader, write_records
from gateway.trace.replay import ReplayOptions, replay
from gateway.trace.report import CaseSink, FindingKind
from gateway.trace.rulesfile import load_rules
from tests.trace_support import endpoint, free_port, fresh_gateway

pytestmark = pytest.mark.anyio

TEMPLATES = f"""
[[case]]
name = "sign-in"
flow = "sign_in"
expect = {{ "39" = "one-of 00", "62" = "verify", "11" = "echo" }}

[[case]]
name = "approved purchase"
flow = "purchase"
amount = 12345
card = "{CARD_CUP.pan}"
host = {{ "39" = "00", "37" = "RRN000000001", "38" = "A1B2C3" }}
expect.39 = "one-of 00"
expect.37 = "one-of RRN000000001 capture rrn"
expect.11 = "echo capture sale_stan"
expect.4 = "echo"
expect.13 = "format capture sale_date"
expect_upstream = {{ "4" = "one-of 000000012345", "52" = "verify", "35" = "present" }}
upstream = true

[[case]]
name = "over the per-transaction limit is refused here"
flow = "purchase"
amount = 1500000
card = "{CARD_CUP.pan}"
upstream = false
expect = {{ "39" = "one-of 61", "64" = "absent" }}

[[case]]
name = "refund of the approved purchase, by its RRN"
flow = "refund"
amount = 2000
card = "{CARD_CUP.pan}"
request = {{ "37" = "${{rrn}}", "61" = "000001${{sale_stan}}${{sale_date}}" }}
host = {{ "39" = "00", "37" = "RRN000000002" }}
expect = {{ "39" = "one-of 00" }}
expect_upstream = {{ "37" = "ref rrn", "90" = "present" }}

[[case]]
name = "a wrong expectation fails"
flow = "balance_inquiry"
card = "{CARD_CUP.pan}"
host = {{ "39" = "00" }}
expect = {{ "39" = "one-of 05" }}
"""


def lab_keys(tmp: Path) -> Path:
    path = tmp / "lab-keys.toml"
    terminals = tuple(LabTerminal(tid, MERCHANT_ID, generate_key(16)) for tid in terminal_ids(2))
    path.write_text(render_test_keys(LabKeys(generate_key(16), terminals)))
    return path


async def replay_against(tmp: Path, keys: Path, trace: Path | None, rules: Path | None, *,
                         target_port: int | None = None, sut_host_port: int | None = None) -> CaseSink:
    sink = CaseSink("replay", json_path=tmp / "report.json")
    port = sut_host_port or free_port()
    async with fresh_gateway(tmp, keys, port) as gw:
        options = ReplayOptions(target=endpoint(target_port or gw.terminal_port), host_listen=endpoint(port),
                                keys=read_test_keys(keys), rules=load_rules(rules, trace=trace), answer_timeout=3.0,
                                grace=1.0, progress=0)
        with anyio.fail_after(60):
            await replay(trace, options, sink)
    sink.close(0.0)
    return sink


async def test_template_cases_run_alone_against_a_real_gateway(tmp_path: Path) -> None:
    keys = lab_keys(tmp_path)
    rules = tmp_path / "cert.rules.toml"
    rules.write_text(TEMPLATES)
    sink = await replay_against(tmp_path, keys, None, rules)
    report = {c["name"]: c for c in json.loads((tmp_path / "report.json").read_text())["cases"]}
    assert sink.total == 5
    assert [c.name for c in sink.failures] == ["a wrong expectation fails"], [
        f.message for c in sink.failures for f in c.findings]
    [wrong] = report["a wrong expectation fails"]["findings"]
    assert (wrong["field"], wrong["rule"], wrong["got"]) == ("39", "one-of 05", "'00'")


async def test_a_template_that_must_not_go_upstream_fails_when_it_does(tmp_path: Path) -> None:
    keys = lab_keys(tmp_path)
    rules = tmp_path / "cert.rules.toml"
    rules.write_text(f"""
[[case]]
name = "a small purchase wrongly expected to stay local"
flow = "purchase"
amount = 100
card = "{CARD_CUP.pan}"
upstream = false
expect = {{ "39" = "one-of 00 96" }}
""")
    sink = await replay_against(tmp_path, keys, None, rules)
    [case] = sink.failures
    assert [f.kind for f in case.findings] == [FindingKind.UNEXPECTED_FRAME]
    assert "an upstream 0200" in case.findings[0].message


def host_echo_trace(path: Path, answer_rc: str) -> None:
    """A recording of a host that echo-tests the SUT (0800 70=301) and the SUT's answer."""
    header = TraceHeader(source="hand-built", dialects={"terminal": "cup-pos", "host": "iso87-ascii"},
                         framings={"terminal": "cup", "host": "len2"})
    request = {"7": "1124101010", "11": "900001", "70": "301"}
    records = [FrameRecord(1, 100.0, Leg.HOST, Direction.IN, "H1", "0800", request),
               FrameRecord(2, 100.01, Leg.HOST, Direction.OUT, "H1", "0810", {**request, "39": answer_rc})]
    with path.open("w") as f:
        write_records(f, header, records)


async def test_a_host_initiated_echo_is_replayed_to_the_gateway(tmp_path: Path) -> None:
    keys = lab_keys(tmp_path)
    trace = tmp_path / "echo.jsonl"
    host_echo_trace(trace, "00")
    sink = await replay_against(tmp_path, keys, trace, None)
    assert (sink.total, sink.failed) == (1, 0)
    host_echo_trace(trace, "12")  # a recording whose SUT refused the echo: ours answers it
    sink = await replay_against(tmp_path, keys, trace, None)
    [case] = sink.failures
    assert case.name == "H1 host stan 900001 0800 echo"
    assert [(f.leg, f.mti, f.field, f.expected, f.got) for f in case.findings] == [
        ("host", "0810", "39", "'12'", "'00'")]


@asynccontextmanager
async def stan_bending_proxy(target: int, bent_mti: str) -> AsyncIterator[int]:
    """Between the player and the gateway: the gateway's `bent_mti` answers come back with STAN+1
    (a SUT whose answers do not pair with their requests)."""
    codec = Codec(load_dialect("cup-pos"))
    framer = make_framer("cup")

    async def pump(src: anyio.abc.ByteStream, dst: anyio.abc.ByteStream, bend: bool) -> None:
        decoder = framer.decoder()
        try:
            async for chunk in src:
                if not bend:
                    await dst.send(chunk)
                    continue
                for frame in decoder.feed(chunk):
                    body = frame.body
                    msg = codec.decode(body)
                    if msg.mti == bent_mti:
                        msg.fields["11"] = f"{int(msg.fields['11']) + 1:06d}"
                        body = codec.encode(msg)
                    await dst.send(framer.encode(body, frame.envelope))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError):
            pass

    async def handle(client: anyio.abc.SocketStream) -> None:
        async with client, await anyio.connect_tcp(LOOPBACK, target) as server, anyio.create_task_group() as tg:
            tg.start_soon(pump, client, server, False)
            await pump(server, client, True)
            tg.cancel_scope.cancel()

    listener = await anyio.create_tcp_listener(local_host=LOOPBACK, local_port=0)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield listener.extra(anyio.abc.SocketAttribute.local_port)
        tg.cancel_scope.cancel()


async def test_an_answer_with_a_wrong_stan_is_a_match_key_finding_not_a_timeout(tmp_path: Path) -> None:
    keys = lab_keys(tmp_path)
    rules = tmp_path / "one.rules.toml"
    rules.write_text(f"""
[[case]]
name = "purchase"
flow = "purchase"
amount = 500
card = "{CARD_CUP.pan}"
host = {{ "39" = "00" }}
expect = {{ "39" = "one-of 00" }}
""")
    port = free_port()
    sink = CaseSink("replay")
    async with fresh_gateway(tmp_path, keys, port) as gw, stan_bending_proxy(gw.terminal_port, "0210") as bent:
        options = ReplayOptions(target=endpoint(bent), host_listen=endpoint(port), keys=read_test_keys(keys),
                                rules=load_rules(rules), answer_timeout=1.0, grace=0.5, progress=0)
        with anyio.fail_after(30):
            await replay(None, options, sink)
    [case] = sink.failures
    [finding] = case.findings
    assert finding.kind is FindingKind.MATCH_KEY
    assert "does not pair with the request 0200" in finding.message
    assert (finding.expected.split()[0], finding.got.split()[0]) == ("0210", "0210")


def test_the_demo_records_its_traffic_and_replays_it(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from gateway.demo import run_demo

    assert anyio.run(run_demo, True, tmp_path) is True
    out = capsys.readouterr().out
    assert "both legs recorded to demo.trace.jsonl" in out
    assert "replay: the recorded traffic against a fresh gateway" in out
    line = next(x for x in out.splitlines() if "trace replay: " in x)
    assert "PASS" in line and " 0 failed" in line
    assert (tmp_path / "demo.trace.jsonl").stat().st_size > 0
