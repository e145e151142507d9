"""Why the gateway's latency metrics use `time.perf_counter()`, not the event loop's clock.

Times the same short piece of work (a ~50 µs busy loop followed by a zero sleep, about one decode's
worth) with `anyio.current_time()` and with `time.perf_counter()`, on asyncio+uvloop and on trio, and
prints the smallest step each clock showed and the distinct readings it produced. On uvloop the loop
clock counts whole milliseconds (libuv's `uv_now`, refreshed once per loop iteration), so a 50 µs
stage reads 0 or 1 ms; trio's loop clock and `perf_counter` resolve it.

    python bench/clock_resolution.py [--samples 2000]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Callable

import anyio


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def measure(clock: Callable[[], float], samples: int, work: float) -> list[float]:
    readings = []
    for _ in range(samples):
        start = clock()
        busy(work)
        await anyio.sleep(0)
        readings.append(clock() - start)
    return readings


def smallest_step(clock: Callable[[], float]) -> float:
    """The smallest non-zero difference between two consecutive readings (bounded loop)."""
    best = float("inf")
    last = clock()
    for _ in range(200_000):
        now = clock()
        if now != last:
            best = min(best, now - last)
            last = now
    return best


async def report(backend: str, samples: int, work: float) -> None:
    for name, clock in (("anyio.current_time", anyio.current_time), ("time.perf_counter", time.perf_counter)):
        readings = await measure(clock, samples, work)
        distinct = Counter(round(r * 1e6) for r in readings)
        zero = sum(1 for r in readings if r == 0)
        mean_us = sum(readings) / len(readings) * 1e6
        print(f"  {backend:8s} {name:20s} step {smallest_step(clock) * 1e6:9.3f} µs  mean {mean_us:8.1f} µs  "
              f"zero readings {zero / len(readings):6.1%}  distinct values {len(distinct)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--work-us", type=float, default=50.0)
    args = parser.parse_args()
    print(f"{args.samples} samples of {args.work_us:g} µs of work + a zero sleep")
    for backend, options in (("asyncio", {"use_uvloop": True}), ("trio", {})):
        anyio.run(report, backend, args.samples, args.work_us / 1e6, backend=backend, backend_options=options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
