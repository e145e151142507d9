"""What the per-transaction metric calls cost: `Metrics` (prometheus-client, pre-bound children) against
`NullMetrics` (no-ops), side by side in one run.

The calls are those one switched transaction makes in `gateway.service`: two message counters
(terminal in, terminal out), the in-flight gauge up and down, and two latency histograms (upstream and
end to end). Each variant is timed as the best of several rounds, minus the cost of the bare loop.

    python bench/metrics_cost.py [--transactions 200000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.metrics import Metrics, NullMetrics


def transactions(metrics: Metrics, n: int) -> float:
    """Seconds for `n` transactions' worth of metric calls."""
    message = metrics.message
    in_flight = metrics.in_flight
    upstream = metrics.upstream
    end_to_end = metrics.end_to_end
    started = time.perf_counter()
    for _ in range(n):
        message("terminal_in", "0200", "").inc()
        in_flight.inc()
        upstream.observe(0.0021)
        message("terminal_out", "0210", "00").inc()
        in_flight.dec()
        end_to_end.observe(0.0034)
    return time.perf_counter() - started


def bare_loop(n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        pass
    return time.perf_counter() - started


def best(fn, *args, rounds: int) -> float:
    return min(fn(*args) for _ in range(rounds))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    n, rounds = args.transactions, args.rounds
    real, null = Metrics(), NullMetrics()
    transactions(real, 1000)  # bind the children before timing, as a running gateway has
    transactions(null, 1000)
    gc.disable()  # a collection landing in one variant's round would skew the ratio
    try:
        loop = best(bare_loop, n, rounds=rounds)
        # interleave the variants so drift on a shared machine hits both alike
        real_times, null_times = [], []
        for _ in range(rounds):
            real_times.append(transactions(real, n))
            null_times.append(transactions(null, n))
    finally:
        gc.enable()
    real_ns = (min(real_times) - loop) / n * 1e9
    null_ns = (min(null_times) - loop) / n * 1e9
    print(f"{n} transactions x {rounds} rounds (best), 6 metric calls per transaction")
    print(f"  Metrics (prometheus-client): {real_ns:8.0f} ns per transaction")
    print(f"  NullMetrics (no-ops):        {null_ns:8.0f} ns per transaction")
    print(f"  ratio {real_ns / null_ns:.1f}x; metrics add {(real_ns - null_ns) / 1000:.2f} µs per transaction")
    return 0


if __name__ == "__main__":
    sys.exit(main())
