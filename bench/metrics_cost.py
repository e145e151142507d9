"""What the per-transaction metric calls cost, side by side in one run.

The calls are those one approved purchase makes (gateway.service, net/host_link, net/terminal_server):
four message counters (terminal in/out, host out/in), the in-flight gauge up and down, the stage
histograms (decode, three security calls, journal, host, terminal write), the upstream histogram and
the end-to-end histogram by flow and outcome, and the clock reads around them. Variants:

- `Metrics`: the gateway's (lock-free children from gateway.fastmetrics for the hot calls);
- the same calls through prometheus-client's own pre-bound children (what they would cost without
  gateway.fastmetrics);
- the call set before the stages existed (6 calls, prometheus-client children), for the before/after;
- `NullMetrics`: no-ops (the floor: the loop, the calls, the clock reads).

Each variant is timed as the best of several interleaved rounds, minus the cost of the bare loop.

    python bench/metrics_cost.py [--transactions 200000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.metrics import LATENCY_BUCKETS, STAGE_BUCKETS, STAGES, Metrics, NullMetrics, Stages, clock


class LibraryMetrics:
    """The gateway's hot-path metric API built from prometheus-client's own children only."""

    def __init__(self) -> None:
        r = CollectorRegistry()
        messages = Counter("m", "m", ["direction", "mti", "rc"], registry=r)
        self._messages = {}
        for key in (("terminal_in", "0200", ""), ("host_out", "0200", ""), ("host_in", "0210", "00"),
                    ("terminal_out", "0210", "00")):
            self._messages[key] = messages.labels(*key)
        self.in_flight = Gauge("g", "g", registry=r)
        stages = Histogram("s", "s", ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.stages = Stages(stages.labels)
        self.upstream = Histogram("u", "u", buckets=LATENCY_BUCKETS, registry=r)
        e2e = Histogram("e", "e", ["flow", "outcome"], buckets=LATENCY_BUCKETS, registry=r)
        self._e2e = {("purchase", "00"): e2e.labels("purchase", "approved")}
        self.end_to_end_plain = Histogram("e0", "e0", buckets=LATENCY_BUCKETS, registry=r)

    def message(self, direction: str, mti: str, rc: str) -> Counter:
        return self._messages[(direction, mti, rc)]

    def end_to_end(self, flow: str, rc: str) -> Histogram:
        return self._e2e[(flow, rc)]


def purchase_calls(metrics: Metrics | LibraryMetrics, n: int) -> float:
    """Seconds for `n` approved purchases' worth of metric calls and clock reads, in gateway order."""
    message = metrics.message
    in_flight = metrics.in_flight
    stages = metrics.stages
    upstream = metrics.upstream
    end_to_end = metrics.end_to_end
    now = clock
    started = time.perf_counter()
    for _ in range(n):
        t = now()
        stages.decode.observe(now() - t)  # admit: decode
        begun = now()  # handle_frame
        message("terminal_in", "0200", "").inc()
        in_flight.inc()
        t = now()
        stages.security.observe(now() - t)  # terminal MAC verify
        t = now()
        stages.security.observe(now() - t)  # PIN block and track translation
        t = now()
        stages.journal.observe(now() - t)  # journal write before the host
        sent = now()
        message("host_out", "0200", "").inc()  # host link writer
        wrote = now()
        message("host_in", "0210", "00").inc()  # host link reader
        stages.host.observe(now() - wrote)
        upstream.observe(now() - sent)
        t = now()
        stages.security.observe(now() - t)  # answer MAC
        t = now()
        stages.terminal_write.observe(now() - t)  # terminal writer
        message("terminal_out", "0210", "00").inc()
        in_flight.dec()
        end_to_end("purchase", "00").observe(now() - begun)
    return time.perf_counter() - started


def old_calls(metrics: LibraryMetrics, n: int) -> float:
    """The six calls a transaction made before the stages (prometheus-client children, loop clock reads
    stood in for by time.monotonic: the event loop's clock needs a running loop)."""
    message = metrics.message
    in_flight = metrics.in_flight
    upstream = metrics.upstream
    end_to_end = metrics.end_to_end_plain
    now = time.monotonic
    started = time.perf_counter()
    for _ in range(n):
        begun = now()
        message("terminal_in", "0200", "").inc()
        in_flight.inc()
        sent = now()
        upstream.observe(now() - sent)
        message("terminal_out", "0210", "00").inc()
        in_flight.dec()
        end_to_end.observe(now() - begun)
    return time.perf_counter() - started


def bare_loop(n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        pass
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    n, rounds = args.transactions, args.rounds
    ours, null, library = Metrics(), NullMetrics(), LibraryMetrics()
    variants: dict[str, Callable[[int], float]] = {
        "Metrics (gateway.fastmetrics for the hot calls)": lambda k: purchase_calls(ours, k),
        "same calls, prometheus-client children only": lambda k: purchase_calls(library, k),
        "before: 6 calls, prometheus-client children": lambda k: old_calls(library, k),
        "NullMetrics (no-ops, clock reads kept)": lambda k: purchase_calls(null, k),
    }
    for fn in variants.values():
        fn(1000)  # bind the children before timing, as a running gateway has
    gc.disable()  # a collection landing in one variant's round would skew the ratio
    try:
        loop = min(bare_loop(n) for _ in range(rounds))
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):  # interleaved, so drift on a shared machine hits every variant alike
            for name, fn in variants.items():
                times[name].append(fn(n))
    finally:
        gc.enable()
    print(f"{n} transactions x {rounds} rounds (best); {len(STAGES)} stages, 15 metric calls and 18 clock "
          "reads per purchase now")
    cost = {name: (min(ts) - loop) / n * 1e6 for name, ts in times.items()}
    null_us = cost["NullMetrics (no-ops, clock reads kept)"]
    for name, us in cost.items():
        print(f"  {name:50s} {us:6.2f} µs per transaction")
    ours_us = cost["Metrics (gateway.fastmetrics for the hot calls)"]
    print(f"  metrics add {ours_us - null_us:.2f} µs over the no-ops "
          f"(prometheus-client children would add {cost['same calls, prometheus-client children only'] - null_us:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
