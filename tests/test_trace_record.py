"""Recording real traffic: a real gateway and the simulators on loopback, recorded by the gateway
itself ([trace] path) and by `gateway trace proxy`; the traces must pass `trace check` and hold no
secret in clear (scanned for the lab PANs, tracks, PIN blocks and keys)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from gateway.config import Endpoint, ReversalConfig, TraceConfig, load_config
from gateway.iso.build import TerminalIdent, cup
from gateway.iso.totals import CARD_ORG_DOMESTIC, BatchItem
from gateway.lab import CARD_CUP, CARD_CUP_2, CARD_LOW, CARD_VISA, LAB_CARDS, LOOPBACK, MERCHANT_ID, open_lab
from gateway.sim.host_rules import Fault
from gateway.sim.terminal import TxnResult
from gateway.trace.check import Checker
from gateway.trace.format import EventKind, EventRecord, FrameRecord, Leg, SecretKind, read_trace
from gateway.trace.proxy import TraceProxy, proxy_recorder

pytestmark = pytest.mark.anyio

HOST_TIMEOUT = 1.0


def check(*paths: Path) -> dict[str, list[str]]:
    """`trace check` over the files as one stream: case name → finding messages."""
    checker: Checker | None = None
    for path in paths:
        header, records = read_trace(path)
        checker = checker or Checker(header)
        for rec in records:
            checker.feed(rec)
    assert checker is not None
    return {c.name.split(":")[0]: [f.message for f in c.findings] for c in checker.results()}


def secrets_of(results: list[TxnResult], lab: object) -> set[str]:
    """Every clear secret the run handled, as text and as the hex of its ASCII form."""
    clear: set[str] = set()
    for card in LAB_CARDS:
        clear |= {card.pan, card.pan[6:-4], card.track2, card.track2.replace("D", "=")}
    for r in results:
        for k in ("35", "52", "62", "48"):
            for msg in (r.request, r.response):
                if msg is not None and k in msg.fields and len(msg.fields[k]) >= 8:
                    clear.add(msg.fields[k])
    for key in (*lab.tmks.values(), lab.zmk):  # type: ignore[attr-defined]
        clear.add(key.hex().upper())
    for term in lab.terminals:  # type: ignore[attr-defined]
        clear |= {k.hex().upper() for k in term._keys.values()}
    # shorter strings (a 16-digit PAN's 6-digit middle) would turn up in any few kilobytes of digits
    clear = {s for s in clear if len(s) >= 9}
    return clear | {s.encode().hex().upper() for s in clear}


def assert_no_secret(path: Path, clear: set[str]) -> None:
    text = path.read_text(encoding="utf-8").upper()
    leaked = sorted(s for s in clear if s.upper() in text)
    assert not leaked, f"clear secrets in {path.name}: {[s[:6] + '…' for s in leaked]}"


async def run_traffic(lab: object) -> list[TxnResult]:
    t = lab.terminal()  # type: ignore[attr-defined]
    await t.connect()
    results = [await t.sign_in(), await t.echo()]
    p = await t.purchase(10_000, CARD_CUP)
    manual = await t.purchase(2_000, CARD_VISA, entry="manual")
    results += [p, manual, await t.balance(CARD_CUP), await t.void(manual),
                await t.refund(3_000, CARD_CUP, original=p)]
    results.append(await t.purchase(9_999_999, CARD_LOW))  # declined by the host (51)
    p2 = await t.purchase(4_000, CARD_CUP_2)
    results += [p2, await t.reversal(p2)]
    items = [BatchItem(CARD_ORG_DOMESTIC, p.stan, CARD_CUP.pan, 10_000)]
    results.append(await t._run("batch_upload", cup.batch_upload(TerminalIdent(t.ident.terminal_id, MERCHANT_ID),
                                                               t._stan(), t.batch, items)))
    results.append(await t.settle())  # type: ignore[arg-type]
    await t.aclose()
    return [r for r in results if isinstance(r, TxnResult)]


async def test_gateway_records_both_legs_passing_check_with_no_secret(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    async with open_lab(tmp_path, terminals=1, trace=TraceConfig(path=path)) as lab:
        results = await run_traffic(lab)
        with anyio.fail_after(10):  # the terminal's reversal goes upstream from the SAF queue, in its own time
            while not all(e.state == "done" for e in await lab.gateway.store.list_saf()):
                await anyio.sleep(0.02)
        clear = secrets_of(results, lab)
        # the money path did not wait for the trace, and nothing was dropped
        assert lab.gateway.metrics.registry.get_sample_value("gateway_trace_records_dropped_total") == 0.0
    header, records = read_trace(path)
    assert header.source == "gateway serve" and header.dialects == {"terminal": "cup-pos", "host": "iso87-ascii"}
    recs = list(records)
    frames = [r for r in recs if isinstance(r, FrameRecord)]
    by = {(r.leg, r.dir.value, r.mti) for r in frames}
    for want in [(Leg.TERMINAL, "in", "0200"), (Leg.TERMINAL, "out", "0210"), (Leg.HOST, "out", "0200"),
                 (Leg.HOST, "in", "0210"), (Leg.TERMINAL, "in", "0400"), (Leg.HOST, "out", "0400"),
                 (Leg.TERMINAL, "in", "0320"), (Leg.TERMINAL, "in", "0500"), (Leg.HOST, "in", "0810")]:
        assert want in by, want
    assert {e.event for e in recs if isinstance(e, EventRecord)} >= {EventKind.CONNECT, EventKind.CLOSE}
    # secrets are marked, and the same card is the same surrogate on both legs
    purchase_in = next(r for r in frames if r.leg is Leg.TERMINAL and r.mti == "0200" and "35" in r.fields)
    assert purchase_in.secrets["35"] is SecretKind.TRACK and purchase_in.secrets["52"] is SecretKind.PIN
    assert purchase_in.secrets["64"] is SecretKind.MAC and purchase_in.fields["64"] == "0" * 16
    upstream = next(r for r in frames if r.leg is Leg.HOST and r.dir.value == "out" and r.mti == "0200")
    assert upstream.fields["35"].replace("=", "D") == purchase_in.fields["35"]
    assert upstream.fields["35"][:6] == CARD_CUP.pan[:6] and upstream.fields["35"][15:19] == CARD_CUP.pan[-4:]
    sign_in_answer = next(r for r in frames if r.leg is Leg.TERMINAL and r.mti == "0810")
    assert sign_in_answer.secrets == {"62": SecretKind.KEY}
    upload = next(r for r in frames if r.mti == "0320" and r.secrets.get("48") is SecretKind.PAN)
    assert upload.fields["48"][8:28].lstrip("0") != CARD_CUP.pan
    # every frame re-encodes to its wire; flows pair; invariants hold
    assert check(path) == {name: [] for name in check(path)}, check(path)
    assert_no_secret(path, clear)


async def test_recorded_timeout_and_late_answer_pass_the_invariants(tmp_path: Path) -> None:
    """A host that answers too late: the trace shows the timeout, the 98, the automatic reversal (its
    first attempt refused, then repeated as a 0401) and the late approval, never forwarded."""
    path = tmp_path / "trace.jsonl"
    saf = ReversalConfig(max_attempts=5, backoff=(0.3,), poll_interval=0.05, original_wait=HOST_TIMEOUT + 2.0)
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=saf,
                        trace=TraceConfig(path=path)) as lab:
        lab.host.add_fault(Fault("late", seconds=HOST_TIMEOUT + 0.25, pan=CARD_CUP.pan, mti=("0200",), limit=1))
        lab.host.add_fault(Fault("reject_reversal", count=1))
        t = lab.terminal(timeout=5.0, auto_reverse=False)
        await t.connect()
        await t.sign_in()
        assert (await t.purchase(4_000, CARD_CUP)).rc == "98"
        with anyio.fail_after(10):
            while lab.host.stats.messages["0401"] < 1:
                await anyio.sleep(0.05)
        await anyio.sleep(0.3)
    recs = list(read_trace(path)[1])
    assert any(isinstance(r, EventRecord) and r.event is EventKind.TIMEOUT for r in recs)
    mtis = [(r.leg, r.mti) for r in recs if isinstance(r, FrameRecord)]
    assert (Leg.HOST, "0401") in mtis and (Leg.HOST, "0400") in mtis
    found = check(path)
    # the 0401 is the 0400 again but for the MTI and MAC (issue 14: it used to get a new STAN and field 7)
    for case in ("decode", "pairing", "echo", "originals", "repeats", "approvals", "late"):
        assert found[case] == [], (case, found[case])


async def test_rotation_keeps_disk_bounded_and_every_part_a_trace(tmp_path: Path) -> None:
    path = tmp_path / "rot.jsonl"
    async with open_lab(tmp_path, terminals=1, trace=TraceConfig(path=path, max_bytes=6_000, max_files=3)) as lab:
        t = lab.terminal()
        await t.connect()
        await t.sign_in()
        for _ in range(12):
            assert (await t.purchase(1_000, CARD_CUP)).approved
    parts = sorted(tmp_path.glob("rot.jsonl*"))
    assert [p.name for p in parts] == ["rot.jsonl", "rot.jsonl.1", "rot.jsonl.2"]
    numbers = []
    for p in parts:
        assert p.stat().st_size <= 6_000 + 1_500  # one record may pass the limit before it rotates
        header = json.loads(p.read_text().splitlines()[0])
        assert header["kind"] == "trace"
        numbers.append(header["notes"]["part"])
    assert numbers[0] > numbers[1] > numbers[2] > 1  # the oldest parts were deleted: bounded disk
    # the parts left, oldest first, check as one stream (what came before them is not held against them)
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "trace", "check", *(str(p) for p in parts[::-1])],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


async def test_trace_path_from_the_environment(tmp_path: Path) -> None:
    config = load_config(None, {"GATEWAY_TRACE__PATH": str(tmp_path / "env.jsonl"), "GATEWAY_TRACE__MAX_FILES": "2"})
    assert config.trace == TraceConfig(path=tmp_path / "env.jsonl", max_files=2)
    assert load_config(None, {}).trace.path is None


async def test_proxy_records_any_terminal_and_host_transparently(tmp_path: Path) -> None:
    """The proxy between the terminal simulator and a gateway: traffic passes unchanged (the terminal
    verifies MACs and check values end to end), and the recording passes check with no secret."""
    out = tmp_path / "proxy.jsonl"
    recorder = proxy_recorder(out, Leg.TERMINAL, "cup-pos", "cup", max_bytes=1 << 20, max_files=2)
    recorder.start()
    try:
        async with open_lab(tmp_path, terminals=1) as lab, anyio.create_task_group() as tg:
            proxy = TraceProxy(Endpoint(LOOPBACK, lab.gateway.terminal_port), recorder, leg=Leg.TERMINAL,
                               framing="cup")
            port = await tg.start(proxy.serve, Endpoint(LOOPBACK, 0))
            lab.gateway = type(lab.gateway)(**{**{f: getattr(lab.gateway, f) for f in lab.gateway.__slots__},  # type: ignore[attr-defined]
                                               "terminal_port": port})
            t = lab.terminal()
            await t.connect()
            results = [await t.sign_in(), await t.purchase(5_000, CARD_CUP), await t.balance(CARD_CUP)]
            assert results[0].rc == "00" and results[1].approved and results[1].mac_ok
            clear = secrets_of(results, lab)
            await t.aclose()
            await anyio.sleep(0.1)
            tg.cancel_scope.cancel()
    finally:
        await anyio.to_thread.run_sync(recorder.close)
    header, records = read_trace(out)
    assert header.source == "trace proxy" and header.dialects == {"terminal": "cup-pos"}
    frames = [r for r in records if isinstance(r, FrameRecord)]
    assert [f.mti for f in frames] == ["0800", "0810", "0200", "0210", "0200", "0210"]
    assert check(out) == {name: [] for name in check(out)}
    assert_no_secret(out, clear)
