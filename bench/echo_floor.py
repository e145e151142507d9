"""The I/O floor: the highest open-loop rate the raw framed echo server sustains with p99 < 50 ms.

Starts `python -m gateway.load.echo` in a subprocess (pinned to one CPU when there are two or more),
drives it with the load tool's echo driver (350-byte frames) from this process (pinned to another CPU),
stepping the rate up ×1.5 until a step fails (p99 ≥ 50 ms, errors, or under 95 % of the target
achieved), then bisecting between the last pass and the first failure. Bounded: at most
`--max-steps` steps of `--warmup + --duration` seconds each.

    python bench/echo_floor.py [--server-backend trio] [--client-processes 2] [--start 4000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.load.config import LoadConfig
from gateway.load.processes import run_load_processes

P99_LIMIT_MS = 50.0
MIN_ACHIEVED = 0.95


def start_server(backend: str, cpu: int | None) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, "-m", "gateway.load.echo", "--port", "0", "--backend", backend],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("port "):
        proc.kill()
        raise SystemExit(f"echo server did not start: {line!r}")
    if cpu is not None:
        os.sched_setaffinity(proc.pid, {cpu})
    return proc, int(line.split()[1])


def step(port: int, rate: float, args) -> tuple[bool, dict]:
    config = LoadConfig(rate=rate, duration=args.duration, warmup=args.warmup, sessions=args.sessions,
                        request_timeout=5.0)
    report = run_load_processes("echo", {"target": f"127.0.0.1:{port}"}, config, args.client_processes,
                                backend=args.client_backend)
    p99 = report.latency_ms["p99"] or float("inf")
    passed = p99 < P99_LIMIT_MS and not report.errors and report.achieved_rate >= MIN_ACHIEVED * rate
    row = {"rate": rate, "achieved": report.achieved_rate, "p50": report.latency_ms["p50"], "p99": p99,
           "max": report.latency_ms["max"], "lag": report.send_lag_ms["mean"], "errors": report.error_count}
    print(f"  target {rate:8.0f}/s  achieved {row['achieved']:8.0f}/s  p50 {row['p50']:8.3f} ms  "
          f"p99 {p99:9.3f} ms  max {row['max']:9.3f} ms  send lag {row['lag']} ms  errors {row['errors']}  "
          f"{'pass' if passed else 'FAIL'}", flush=True)
    return passed, row


def closed_loop_peak(port: int, args) -> float:
    config = LoadConfig(concurrency=args.sessions, duration=args.duration, warmup=args.warmup)
    report = run_load_processes("echo", {"target": f"127.0.0.1:{port}"}, config, args.client_processes,
                                backend=args.client_backend)
    print(f"  closed loop, {args.sessions} in flight: {report.achieved_rate:.0f}/s, "
          f"p50 {report.latency_ms['p50']} ms, p99 {report.latency_ms['p99']} ms", flush=True)
    return report.achieved_rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server-backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--client-backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--client-processes", type=int, default=1)
    parser.add_argument("--start", type=float, default=4000)
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=12)
    args = parser.parse_args()

    cpus = sorted(os.sched_getaffinity(0))
    pin = len(cpus) >= 2
    server, port = start_server(args.server_backend, cpus[-1] if pin else None)
    if pin:
        os.sched_setaffinity(0, set(cpus[:-1]))  # workers spawned from here inherit it
    print(f"echo server ({args.server_backend}) pid {server.pid} on port {port}"
          f"{f', pinned to CPU {cpus[-1]}, client on {cpus[:-1]}' if pin else ' (not pinned: one CPU)'}; "
          f"client {args.client_backend} x{args.client_processes}, {args.sessions} sessions, 350-byte frames")
    started = time.monotonic()
    try:
        peak = closed_loop_peak(port, args)
        good, bad = 0.0, None
        rate = args.start
        steps = 0
        while steps < args.max_steps:
            steps += 1
            passed, _ = step(port, rate, args)
            if passed:
                good = rate
                if bad is None:
                    rate *= 1.5
                    continue
            else:
                bad = rate
            if bad is not None and (bad - good) / bad < 0.08:
                break
            rate = (good + bad) / 2 if good else bad / 2
        print(f"max sustainable open-loop rate with p99 < {P99_LIMIT_MS:g} ms: {good:.0f}/s "
              f"(first failing step {bad if bad is None else f'{bad:.0f}'}/s; closed-loop peak {peak:.0f}/s; "
              f"{steps} steps, {time.monotonic() - started:.0f} s)")
    finally:
        server.terminate()  # the server we started, by its own handle
        server.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
