"""What recording a trace costs the gateway: CPU per transaction with and without `[trace] path`,
side by side in one run.

    python bench/trace_cost.py [--rate 500] [--count 4000] [--rounds 4]

Two full gateways (`gateway serve`, SQLite journal synchronous=FULL, metrics on), each in front of its
own `gateway sim-host`, are driven in interleaved rounds (off, on, on, off, ...) by the same open-loop
load (`gateway.load.run_load`, CUP 0200 purchases with PIN block, encrypted track and MAC). Gateways
are pinned to CPU 0; hosts, the load generator and the trace writer process to CPU 1. Reported per
variant: the median over the rounds of the gateway process's CPU time per transaction (/proc/PID/stat,
all threads), and, for the recording gateway, of its trace writer process (a child: decoding,
surrogates, JSON and disk are there), plus p50/p99 latency. The money path's figure is the gateway
process's: that is where the event loop runs. Nothing leaves loopback; every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (
    CupFrameDriver,
    Services,
    cpu_seconds,
    free_port,
    wait_ready,
    write_gateway_config,
    write_host_config,
)

from gateway.load import LoadConfig, run_load
from gateway.security.algorithms import generate_key

PY = sys.executable
SESSIONS = 32


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--count", type=int, default=4000, help="transactions per round")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    cpus = os.sched_getaffinity(0)
    sut, other = ({0}, {1}) if {0, 1} <= cpus else (None, None)
    workdir = Path(tempfile.mkdtemp(prefix="trace-cost-"))
    zmk = generate_key(16)
    host_config = workdir / "host.toml"
    write_host_config(host_config)
    results: dict[str, dict[str, list[float]]] = {"off": {}, "on": {}}
    with Services(workdir) as services:
        targets = {}
        for key in ("off", "on"):
            _host, m = services.start(f"sim-host {key}", [PY, "-m", "gateway.cli", "sim-host", "--listen",
                                                         "127.0.0.1:0", "--config", str(host_config), "--zmk",
                                                         zmk.hex().upper()], cpus=other,
                                     ready=r"listening on 127\.0\.0\.1:(\d+)")
            assert m is not None
            port, admin = free_port(), free_port()
            config = workdir / f"{key}.toml"
            write_gateway_config(config, terminal_port=port, admin_port=admin, host_port=int(m.group(1)), zmk=zmk,
                                 journal=workdir / f"{key}.db", metrics=True, terminals=SESSIONS)
            if key == "on":
                with config.open("a") as f:
                    f.write(f'[trace]\npath = "{workdir / "trace.jsonl"}"\nmax_bytes = 268435456\nmax_files = 2\n')
            gw, _ = services.start(f"gateway {key}", [PY, "-m", "gateway.cli", "serve", "--config", str(config)],
                                   cpus=sut)
            wait_ready(gw, admin)
            if other is not None:
                for child in children(gw.pid):  # the trace writer: a separate process, on the other core
                    os.sched_setaffinity(child, other)
            targets[key] = (gw, port)
        if other is not None:
            os.sched_setaffinity(0, other)
        batch = 0
        order = [k for r in range(args.rounds) for k in (("off", "on") if r % 2 == 0 else ("on", "off"))]
        for key in ["off", "on", *order]:  # the first two rounds warm up, unmeasured
            gw, port = targets[key]
            batch += 1
            frames = args.count // SESSIONS + 16
            driver = CupFrameDriver(port, "gateway", batch, frames)
            writers = children(gw.pid)
            c0 = cpu_seconds(gw.pid)
            w0 = sum(cpu_seconds(p) for p in writers)
            config = LoadConfig(rate=args.rate, count=args.count, sessions=SESSIONS, request_timeout=10.0)
            report = anyio.run(lambda d=driver, c=config: run_load(d, c), backend="asyncio",
                               backend_options={"use_uvloop": True})
            time.sleep(0.3)  # the writer drains its last batch
            c1 = cpu_seconds(gw.pid)
            w1 = sum(cpu_seconds(p) for p in writers)
            if batch <= 2:
                continue
            n = max(report.ok, 1)
            r = results[key]
            r.setdefault("gateway_us", []).append((c1 - c0) / n * 1e6)
            r.setdefault("writer_us", []).append((w1 - w0) / n * 1e6)
            r.setdefault("p50", []).append(report.latency_ms["p50"] or 0.0)
            r.setdefault("p99", []).append(report.latency_ms["p99"] or 0.0)
            errors = sum(report.errors.values())
            print(f"  {key:>3}: gateway {r['gateway_us'][-1]:6.0f} µs/txn, writer {r['writer_us'][-1]:5.0f} µs/txn, "
                  f"p50 {r['p50'][-1]:.1f} ms, p99 {r['p99'][-1]:.1f} ms, {report.ok} ok, {errors} errors",
                  flush=True)
    med = {k: {m: statistics.median(v) for m, v in r.items()} for k, r in results.items()}
    off, on = med["off"], med["on"]
    print(f"\nat {args.rate:.0f}/s, median of {args.rounds} rounds each:")
    print(f"  gateway CPU per transaction: off {off['gateway_us']:.0f} µs, on {on['gateway_us']:.0f} µs "
          f"({(on['gateway_us'] / off['gateway_us'] - 1) * 100:+.1f} %)")
    print(f"  trace writer process: {on['writer_us']:.0f} µs per transaction (outside the gateway process)")
    print(f"  latency p50 {off['p50']:.1f} → {on['p50']:.1f} ms, p99 {off['p99']:.1f} → {on['p99']:.1f} ms")
    trace = workdir / "trace.jsonl"
    if trace.exists():
        print(f"  trace: {trace.stat().st_size / 1e6:.1f} MB in {trace}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
