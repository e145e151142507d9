"""Latency recording in HDR histograms (µs, 1 µs .. 60 s): whole run and per second.

The run histogram keeps 3 significant digits; per-second histograms keep 2 (1 % resolution is plenty
for a time series, and they are ~10× smaller, so hour-long runs stay in memory). Histograms travel
between processes in hdrh's compressed base64 encoding and merge by addition.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Final

from hdrh.histogram import HdrHistogram

LOWEST_US: Final = 1
HIGHEST_US: Final = 60_000_000
RUN_DIGITS: Final = 3
SECOND_DIGITS: Final = 2


def run_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, RUN_DIGITS)


def second_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SECOND_DIGITS)


def to_us(seconds: float) -> int:
    """Clamp into the histogram's range: a 0 µs or a > 60 s latency is still one recorded request."""
    us = int(seconds * 1_000_000 + 0.5)
    if us < LOWEST_US:
        return LOWEST_US
    if us > HIGHEST_US:
        return HIGHEST_US
    return us


def encode(hist: HdrHistogram) -> str:
    encoded: bytes = hist.encode()
    return encoded.decode("ascii")


def decode_into(target: HdrHistogram, encoded: str) -> None:
    target.decode_and_add(encoded.encode("ascii"))


def percentile_ms(hist: HdrHistogram, percentile: float) -> float | None:
    if hist.get_total_count() == 0:
        return None
    value: int = hist.get_value_at_percentile(percentile)
    return value / 1000.0


def summary_ms(hist: HdrHistogram) -> dict[str, float | None]:
    """p50/p90/p99/p99.9/max/min/mean in milliseconds (None when nothing was recorded)."""
    empty = hist.get_total_count() == 0
    return {
        "p50": percentile_ms(hist, 50),
        "p90": percentile_ms(hist, 90),
        "p99": percentile_ms(hist, 99),
        "p99.9": percentile_ms(hist, 99.9),
        "max": None if empty else hist.get_max_value() / 1000.0,
        "min": None if empty else hist.get_min_value() / 1000.0,
        "mean": None if empty else round(hist.get_mean_value() / 1000.0, 3),
    }


@dataclass(slots=True)
class SecondStats:
    """Completions in one second of the measured run."""

    count: int = 0
    errors: int = 0
    hist: HdrHistogram = field(default_factory=second_histogram)
    #: errors of this second by result code or failure kind ("51", "timeout", ...)
    codes: Counter[str] = field(default_factory=Counter)
