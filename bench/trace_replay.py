"""`trace replay` on a long trace: throughput and whether memory stays flat.

The trace is made from examples/replay/session.jsonl: its sign-ins, then its approved purchases
repeated until there are --cases of them, each copy with its own terminal STAN, host STAN and RRN (so
the gateway takes each for a new sale), 2 ms apart in trace time. It is replayed `--pace asap` against
a fresh `gateway serve` process (examples/replay/gateway.toml: SQLite journal, the example's keys)
and the trace host; the replaying process's RSS is sampled every second. Prints cases/s and RSS at
10, 25, 50, 75 and 100 % of the run: flat once the assembler's lookup window (2,000 recent cases, for
linking reversals to their originals) is full.

    .venv/bin/python bench/trace_replay.py --cases 20000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.config import Endpoint
from gateway.lab import LOOPBACK
from gateway.sim.keyfile import read_test_keys
from gateway.trace.cases import Case, CaseAssembler
from gateway.trace.format import FrameRecord, TraceHeader, read_trace, write_records
from gateway.trace.pace import Pace
from gateway.trace.replay import ReplayOptions, replay
from gateway.trace.report import CaseSink
from gateway.trace.rulesfile import load_rules

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "replay"


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def long_trace(path: Path, cases: int) -> None:
    header, records = read_trace(EXAMPLE / "session.jsonl")
    items = [c for c in CaseAssembler(header).stream(records) if isinstance(c, Case)]
    sign_ins = [c for c in items if c.flow == "sign_in"]
    sales = [c for c in items if c.flow == "purchase" and c.exchange.rc == "00" and c.primary is not None
             and not c.primary.late and not c.reversals() and c.reversal_case is None]
    with path.open("w", encoding="utf-8") as out:
        write_records(out, TraceHeader("bench", header.dialects, header.framings), _frames(sign_ins, sales, cases))


def _frames(sign_ins: list[Case], sales: list[Case], cases: int) -> Iterator[FrameRecord]:
    seq = 0
    t0 = min(c.start for c in sign_ins)

    def frame(rec: FrameRecord, t: float, **fields: str) -> FrameRecord:
        nonlocal seq
        seq += 1
        return dataclasses.replace(rec, seq=seq, t=t, fields={**rec.fields, **fields})

    for c in sign_ins:
        assert c.exchange.answer is not None
        yield frame(c.exchange.request, c.exchange.request.t - t0)
        yield frame(c.exchange.answer, c.exchange.answer.t - t0)
    stans: dict[str, int] = {}
    for n in range(cases):
        c = sales[n % len(sales)]
        base = 1.0 + n * 0.002 - c.start
        tid = c.terminal
        stans[tid] = stans.get(tid, 100) + 1
        stan, host_stan, rrn = f"{stans[tid]:06d}", f"{n % 999_000 + 1000:06d}", f"B{n:011d}"
        x, p = c.exchange, c.primary
        assert x.answer is not None and p is not None and p.answer is not None
        yield frame(x.request, x.request.t + base, **{"11": stan})
        yield frame(p.request, p.request.t + base, **{"11": host_stan})
        yield frame(p.answer, p.answer.t + base, **{"11": host_stan, "37": rrn})
        yield frame(x.answer, x.answer.t + base, **{"11": stan, "37": rrn})


def sut_config(tmp: Path, terminal_port: int, host_port: int) -> Path:
    """examples/replay/gateway.toml with this run's ports, journal and no daily limit."""
    text = (EXAMPLE / "gateway.toml").read_text()
    text = text.replace('listen = "127.0.0.1:5001"', f'listen = "127.0.0.1:{terminal_port}"')
    text = text.replace('address = "127.0.0.1:7001"', f'address = "127.0.0.1:{host_port}"')
    text = text.replace('path = "var/replay-example/journal.db"', f'path = "{tmp / "journal.db"}"')
    text = text.replace("per_day = 50000000", "per_day = 1000000000000000")
    path = tmp / "gateway.toml"
    path.write_text(text)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


async def run(cases: int, concurrency: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        trace = tmp / "long.jsonl"
        long_trace(trace, cases)
        terminal_port, host_port = free_port(), free_port()
        config = sut_config(tmp, terminal_port, host_port)
        # the gateway under test in a process of its own: the RSS measured is the replay's alone
        sut = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            samples: list[tuple[int, float]] = []
            sink = CaseSink("bench")

            def say(line: str) -> None:
                samples.append((sink.total, rss_mib()))

            options = ReplayOptions(target=Endpoint(LOOPBACK, terminal_port), host_listen=Endpoint(LOOPBACK, host_port),
                                    keys=read_test_keys(EXAMPLE / "lab-keys.toml"), rules=load_rules(None),
                                    pace=Pace.parse("asap"), concurrency=concurrency, progress=1.0)
            started = time.monotonic()
            stats = await replay(trace, options, sink, say)
            seconds = time.monotonic() - started
        finally:
            sut.terminate()
            try:
                sut.wait(timeout=15)
            except subprocess.TimeoutExpired:
                sut.kill()
                sut.wait()
        rss = {f"{q}%": next((round(mib, 1) for done, mib in samples if done >= cases * q // 100), None)
               for q in (10, 25, 50, 75)}
        return {"cases": sink.total, "failed": sink.failed, "seconds": round(seconds, 1),
                "cases_per_s": round(sink.total / seconds, 1), "rss_mib": {**rss, "end": round(rss_mib(), 1)},
                "assembler_held_max": stats.held_max,
                "first_failures": [f.message for c in sink.failures[:3] for f in c.findings[:2]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args()
    result = anyio.run(run, args.cases, args.concurrency, backend="asyncio", backend_options={"use_uvloop": True})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
