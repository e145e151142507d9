"""`gateway demo`: the gateway, a simulated host and three simulated terminals in one process, with
embedded defaults (fresh demo keys, a journal in a temporary directory), showing real traffic:
sign-ins, approvals, a decline, a refund, a void, a risk-limit refusal, a terminal that is not signed
in, a host timeout that ends in an automatic reversal, a settlement, and a summary from the journal.
The gateway records both legs as it goes; at the end the recording is replayed against a fresh
gateway (`gateway trace replay` in-process) and must pass. It stops by itself and exits 0 when every
step came out as expected (1 otherwise).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import anyio

from gateway.config import TraceConfig
from gateway.iso.message import mask_pan
from gateway.lab import CARD_CUP, CARD_CUP_2, CARD_LOW, CARD_VISA, Lab, open_lab
from gateway.sim.host_rules import Fault
from gateway.sim.terminal import TerminalSimulator, TxnResult
from gateway.store.records import TxnState
from gateway.trace.lab_replay import replay_in_lab
from gateway.trace.report import CaseSink

HOST_TIMEOUT = 1.5  #: seconds the gateway waits for the host in the demo
LATE_BY = 3.0  #: the host's scripted delay for the timeout scene

MEANING = {
    "00": "approved", "51": "insufficient funds", "61": "over the limit", "77": "sign in first",
    "98": "host timeout", "25": "original not found", "12": "invalid original", "55": "wrong PIN",
    "91": "host unavailable", "96": "system error", "A0": "bad MAC", "97": "unknown terminal",
}


@dataclass(slots=True)
class Scene:
    title: str
    ok: bool


class Screen:
    """Writes the demo's lines; `plain` drops colour for logs and CI."""

    def __init__(self, plain: bool) -> None:
        self.plain = plain
        self.t0 = time.monotonic()

    def _c(self, code: str, text: str) -> str:
        return text if self.plain else f"\033[{code}m{text}\033[0m"

    def stamp(self) -> str:
        return f"{time.monotonic() - self.t0:6.2f}s"

    def title(self, text: str) -> None:
        print(f"\n{self._c('1', '── ' + text + ' ')}{'─' * max(0, 70 - len(text))}", flush=True)

    def txn(self, terminal: str, what: str, result: TxnResult, elapsed: float) -> None:
        rc = result.rc or "--"
        ok = rc == "00"
        verdict = self._c("32" if ok else "33", f"{rc} {MEANING.get(rc, '')}".strip())
        pan = mask_pan(result.card.pan) if result.card is not None else ""
        amount = f"¥{result.amount / 100:,.2f}" if result.amount is not None else ""
        extra = f" rrn={result.rrn}" if result.rrn and ok else ""
        if result.needs_sign_in:
            extra += " [header: re-sign-in]"
        print(f"{self.stamp()}  {terminal} → {what:<16} {amount:>11} {pan:<20} ← {verdict}{extra}"
              f"  ({elapsed * 1000:.1f} ms)", flush=True)

    def note(self, text: str) -> None:
        print(f"{self.stamp()}  {self._c('36', 'gateway')} {text}", flush=True)

    def check(self, ok: bool, text: str) -> None:
        mark = self._c("32", "✔") if ok else self._c("31", "✘")
        print(f"{' ' * 9}{mark} {text}", flush=True)


class _GatewayLogLines(logging.Handler):
    """The gateway's own story (reversal queued / sent / acknowledged) on the demo screen."""

    def __init__(self, screen: Screen) -> None:
        super().__init__(logging.INFO)
        self.screen = screen

    def emit(self, record: logging.LogRecord) -> None:
        self.screen.note(record.getMessage())


R = TypeVar("R")


async def _timed(call: Callable[[], Awaitable[R]]) -> tuple[R, float]:
    t = time.monotonic()
    result = await call()
    return result, time.monotonic() - t


async def _run(lab: Lab, screen: Screen) -> list[Scene]:
    scenes: list[Scene] = []
    t1, t2, t3 = (lab.terminal(entry.terminal_id, timeout=10.0) for entry in lab.config.terminals[:3])
    names = {t1: "T1", t2: "T2", t3: "T3"}

    async def show(term: TerminalSimulator, what: str, call: Callable[[], Awaitable[TxnResult]]) -> TxnResult:
        result, elapsed = await _timed(call)
        screen.txn(names.get(term, "T?"), what, result, elapsed)
        return result

    screen.title("sign-in: fresh PIK/MAK/TDK per terminal, check values verified by the terminal")
    for term in (t1, t2, t3):
        await term.connect()
        r = await show(term, "sign-in 0800", term.sign_in)
        scenes.append(Scene(f"{names[term]} signs in", r.rc == "00"))

    screen.title("purchases (MAC verified, PIN translated PIK→ZPK, track decrypted, MAC'd answers)")
    p1 = await show(t1, "purchase 0200", lambda: t1.purchase(12_345, CARD_CUP))
    p2 = await show(t2, "purchase 0200", lambda: t2.purchase(8_800, CARD_VISA))
    p3 = await show(t3, "purchase 0200", lambda: t3.purchase(4_200, CARD_CUP_2))
    scenes.append(Scene("three purchases approved", all(p.approved for p in (p1, p2, p3))))
    b = await show(t3, "balance 0200", lambda: t3.balance(CARD_CUP_2))
    scenes.append(Scene("balance inquiry answered", b.rc == "00"))

    screen.title("declines and refusals")
    d = await show(t2, "purchase 0200", lambda: t2.purchase(50_000, CARD_LOW))
    scenes.append(Scene("a poor card is declined (51)", d.rc == "51"))
    w = await show(t1, "purchase 0200", lambda: t1.purchase(9_900, CARD_CUP, pin="000000"))
    scenes.append(Scene("a wrong PIN is declined (55)", w.rc == "55"))
    limit = lab.config.limits.per_transaction
    big = await show(t1, "purchase 0200", lambda: t1.purchase(limit + 100, CARD_CUP))
    scenes.append(Scene("the per-transaction limit refuses (61), nothing goes upstream", big.rc == "61"))
    t4 = lab.terminal(lab.config.terminals[3].terminal_id)
    names[t4] = "T4"
    await t4.connect()
    await show(t4, "sign-in 0800", t4.sign_in)
    t4.batch = "000777"  # the terminal's batch no longer matches the one it signed in with
    ns = await show(t4, "purchase 0200", lambda: t4.purchase(1_000, CARD_CUP))
    scenes.append(Scene("a terminal out of step gets 77 + the re-sign-in flag, nothing goes upstream",
                        ns.rc == "77" and ns.needs_sign_in))
    await show(t4, "sign-in 0800", t4.sign_in)
    again = await show(t4, "purchase 0200", lambda: t4.purchase(1_000, CARD_CUP))
    scenes.append(Scene("after signing in again it is approved", again.rc == "00"))

    screen.title("refund and void")
    rf = await show(t1, "refund 0220", lambda: t1.refund(2_345, CARD_CUP, original=p1))
    scenes.append(Scene("refund of part of T1's purchase approved", rf.rc == "00"))
    vd = await show(t3, "void 0200", lambda: t3.void(p3))
    scenes.append(Scene("void of T3's purchase approved", vd.rc == "00"))

    screen.title(f"host timeout: the host answers {LATE_BY:.0f}s late, the gateway waits {HOST_TIMEOUT}s")
    balance_before = lab.host.balance(CARD_CUP.pan)
    lab.host.add_fault(Fault("late", seconds=LATE_BY, pan=CARD_CUP.pan, mti=("0200",), limit=1))
    late = await show(t2, "purchase 0200", lambda: t2.purchase(7_700, CARD_CUP))
    scenes.append(Scene("the terminal gets 98 (no receipt printed)", late.rc == "98"))
    txn = None
    with anyio.move_on_after(HOST_TIMEOUT + LATE_BY + 10):
        while True:
            txns = await lab.gateway.store.list_transactions(terminal_id=t2.ident.terminal_id, limit=1)
            txn = txns[0] if txns else None
            late_seen = bool(await lab.gateway.store.late_answers(txn_id=txn.txn_id)) if txn else False
            if txn is not None and txn.state is TxnState.REVERSED and late_seen:
                break
            await anyio.sleep(0.1)
    reversed_ok = txn is not None and txn.state is TxnState.REVERSED
    restored = lab.host.balance(CARD_CUP.pan) == balance_before
    screen.check(reversed_ok, f"journal: txn {txn.txn_id if txn else '?'} is {txn.state if txn else '?'}")
    screen.check(restored, "host: the card's balance is back where it was (the charge was reversed)")
    scenes.append(Scene("timeout → automatic reversal acknowledged, customer not charged", reversed_ok and restored))

    screen.title("settlement: terminal totals reconciled against the gateway's journal")
    for term in (t1, t2, t3):
        s, elapsed = await _timed(term.settle)
        ok = s.rc == "00" and s.balanced
        screen.note(f"{names[term]} batch {s.closed_batch} settlement rc={s.rc} "
                    f"{'balanced' if s.balanced else 'NOT balanced'} ({elapsed * 1000:.1f} ms)")
        scenes.append(Scene(f"{names[term]} batch balances", ok))
    return scenes


async def _summary(lab: Lab, screen: Screen, scenes: list[Scene]) -> bool:
    screen.title("journal")
    rows = await lab.gateway.store.list_transactions(limit=100)
    print(f"{'txn':>4}  {'terminal':<8}  {'kind':<16} {'amount':>11}  {'card':<20} {'rc':<3} state")
    for rec in sorted(rows, key=lambda r: r.txn_id):
        note = ""
        if rec.reversal_reason:
            note = f" (reason {rec.reversal_reason}, host answered the reversal {rec.reversal_rc or '--'}"
            note += f"; late host answer {rec.late_rc} journalled, not forwarded)" if rec.late_rc else ")"
        print(f"{rec.txn_id:>4}  {rec.terminal_id:<8}  {rec.kind:<16} {rec.amount / 100:>11,.2f}  "
              f"{rec.pan_masked:<20} {rec.rc or '--':<3} {rec.state}{note}")
    metrics = lab.gateway.metrics
    screen.title("summary")
    for scene in scenes:
        screen.check(scene.ok, scene.title)
    print(f"\nmetrics on http://127.0.0.1:{lab.gateway.admin_port}/metrics while it ran; "
          f"reversals queued {int(_value(metrics.reversals_queued))}, "
          f"acknowledged {int(_value(metrics.reversals_acknowledged))}, "
          f"late host answers {int(_value(metrics.late_answers))}")
    return all(scene.ok for scene in scenes)


def _value(metric: object) -> float:
    get = getattr(metric, "_value", None)
    return float(get.get()) if get is not None else 0.0


async def run_demo(plain: bool = False, data_dir: Path | None = None) -> bool:
    screen = Screen(plain)
    handler = _GatewayLogLines(screen)
    for name in ("gateway.saf", "gateway.flow"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    with tempfile.TemporaryDirectory(prefix="gateway-demo-") as tmp:
        where = data_dir or Path(tmp)
        print(f"gateway demo: journal {where / 'journal.db'}, demo keys generated for this run")
        trace = where / "demo.trace.jsonl"
        async with open_lab(where, terminals=4, host_timeout=HOST_TIMEOUT, trace=TraceConfig(path=trace)) as lab:
            print(f"host simulator on 127.0.0.1:{lab.host_port} (ISO 8583:1987 ASCII), gateway on "
                  f"127.0.0.1:{lab.gateway.terminal_port} (CUP POS), signed on to the host with fresh zone keys; "
                  f"both legs recorded to {trace.name}")
            scenes = await _run(lab, screen)
            ok = await _summary(lab, screen, scenes)
        return await _replay_recording(trace, where, lab, screen) and ok


async def _replay_recording(trace: Path, where: Path, lab: Lab, screen: Screen) -> bool:
    """The demo's own traffic, as the gateway recorded it, replayed against a fresh gateway."""
    screen.title("replay: the recorded traffic against a fresh gateway, its host answered from the trace")
    sink = CaseSink("trace replay")
    started = time.monotonic()
    await replay_in_lab(trace, where / "replay", lab.zmk, lab.tmks, sink, host_timeout=HOST_TIMEOUT)
    for case in sink.failures[:10]:
        for finding in case.findings[:3]:
            print(f"         {finding.message}")
    screen.check(sink.ok and sink.total > 0, sink.summary(time.monotonic() - started))
    print(f"         (gateway trace replay {trace.name} does the same against any gateway: see the README)")
    return sink.ok and sink.total > 0


def _demo_command(args: argparse.Namespace) -> int:
    plain = args.plain or not sys.stdout.isatty()
    ok = anyio.run(run_demo, plain, Path(args.data_dir) if args.data_dir else None,
                   backend=args.backend, backend_options={"use_uvloop": True} if args.backend == "asyncio" else {})
    print("\ndemo finished:", "every step came out as expected" if ok else "SOME STEPS FAILED")
    return 0 if ok else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="gateway + simulated host + simulated terminals, real traffic")
    p.add_argument("--plain", action="store_true", help="no colours")
    p.add_argument("--data-dir", help="keep the journal here instead of a temporary directory")
    p.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    p.set_defaults(func=_demo_command)
