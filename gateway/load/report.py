"""Run results: the raw `Partial` one process produces (picklable, histograms encoded) and the final
`LoadReport` merged from one or more partials, with its JSON form."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

from gateway.load.config import LoadConfig
from gateway.load.hdr import (
    SecondStats,
    decode_into,
    encode,
    percentile_ms,
    run_histogram,
    second_histogram,
    summary_ms,
)


@dataclass(slots=True)
class Partial:
    """What one process measured. Plain data (histograms as encoded strings) so it crosses processes."""

    requests: int
    ok: int
    errors: dict[str, int]
    #: seconds from the start of measurement to the last measured completion
    elapsed: float
    hdr: str
    #: second → (count, errors, encoded per-second histogram, errors by result code)
    seconds: dict[int, tuple[int, int, str, dict[str, int]]]
    max_in_flight: int
    sessions: int
    #: how late requests went out against their intended start (open loop): sum, max, number
    lag_sum: float = 0.0
    lag_max: float = 0.0
    lag_n: int = 0


def partial_from(requests: int, ok: int, errors: Counter[str], elapsed: float, hist: HdrHistogram,
                 seconds: dict[int, SecondStats], max_in_flight: int, sessions: int, lag_sum: float,
                 lag_max: float, lag_n: int) -> Partial:
    return Partial(
        requests=requests, ok=ok, errors=dict(errors), elapsed=elapsed, hdr=encode(hist),
        seconds={s: (st.count, st.errors, encode(st.hist), dict(st.codes)) for s, st in sorted(seconds.items())},
        max_in_flight=max_in_flight, sessions=sessions, lag_sum=lag_sum, lag_max=lag_max, lag_n=lag_n,
    )


@dataclass(slots=True)
class SecondSummary:
    second: int
    count: int
    errors: int
    p50_ms: float | None
    p99_ms: float | None
    #: the second's errors by result code or failure kind
    errors_by_code: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class LoadReport:
    mode: str
    target_rate: float | None
    concurrency: int | None
    sessions: int
    processes: int
    warmup_s: float
    duration_s: float | None
    count_target: int | None
    elapsed_s: float
    requests: int
    ok: int
    errors: dict[str, int]
    achieved_rate: float
    ok_rate: float
    latency_ms: dict[str, float | None]
    send_lag_ms: dict[str, float | None]
    max_in_flight: int
    mix: dict[str, float]
    series: list[SecondSummary]
    histogram: HdrHistogram = field(repr=False)
    #: what was driven, for the plot's title and the JSON (set by the caller: merge does not know them)
    target: str | None = None
    driver: str | None = None
    started_at: datetime | None = None

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def error_rate(self) -> float:
        """Share of measured requests that did not succeed (0 when there were none)."""
        return self.error_count / self.requests if self.requests else 0.0

    def errors_by_code(self) -> list[tuple[str, int]]:
        """(result code or failure kind, count), most frequent first."""
        return sorted(self.errors.items(), key=lambda item: (-item[1], item[0]))

    def errors_line(self) -> str:
        """"errors by code: 51=120 (1.20%), timeout=3 (0.03%)", or "" without errors."""
        if not self.errors:
            return ""
        total = self.requests or 1
        return "errors by code: " + ", ".join(f"{code}={n} ({n / total:.2%})" for code, n in self.errors_by_code())

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "driver": self.driver,
            "started_at": self.started_at.isoformat(timespec="seconds") if self.started_at else None,
            "mode": self.mode,
            "target_rate": self.target_rate,
            "concurrency": self.concurrency,
            "sessions": self.sessions,
            "processes": self.processes,
            "warmup_s": self.warmup_s,
            "duration_s": self.duration_s,
            "count_target": self.count_target,
            "elapsed_s": round(self.elapsed_s, 6),
            "requests": self.requests,
            "ok": self.ok,
            "errors": dict(sorted(self.errors.items())),
            "error_rate": round(self.error_rate, 6),
            "achieved_rate": round(self.achieved_rate, 3),
            "ok_rate": round(self.ok_rate, 3),
            "latency_ms": self.latency_ms,
            "send_lag_ms": self.send_lag_ms,
            "max_in_flight": self.max_in_flight,
            "mix": self.mix,
            "series": [asdict(s) for s in self.series],
            #: the whole-run histogram (hdrh base64), for later merging or percentile plots
            "hdr": encode(self.histogram),
        }

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    def summary_line(self) -> str:
        lat = self.latency_ms

        def ms(key: str) -> str:
            value = lat.get(key)
            return "-" if value is None else f"{value:.3f}"

        target = f"target {self.target_rate:g}/s" if self.target_rate else f"concurrency {self.concurrency}"
        return (f"{self.mode} loop, {target}: {self.requests} requests in {self.elapsed_s:.2f}s = "
                f"{self.achieved_rate:.1f}/s, errors {self.error_count} ({self.error_rate:.2%}); latency ms "
                f"p50 {ms('p50')} "
                f"p90 {ms('p90')} p99 {ms('p99')} p99.9 {ms('p99.9')} max {ms('max')}")


def merge(partials: list[Partial], config: LoadConfig, *, processes: int, rate: float | None = None,
          concurrency: int | None = None, count: int | None = None) -> LoadReport:
    """One report from the partials of every process. `rate`/`concurrency`/`count` are the totals
    (each process's config carries its share)."""
    hist = run_histogram()
    errors: Counter[str] = Counter()
    per_second: dict[int, list[Any]] = {}
    for p in partials:
        decode_into(hist, p.hdr)
        errors.update(p.errors)
        for second, (n, errs, encoded, codes) in p.seconds.items():
            slot = per_second.setdefault(second, [0, 0, second_histogram(), Counter()])
            slot[0] += n
            slot[1] += errs
            decode_into(slot[2], encoded)
            slot[3].update(codes)
    requests = sum(p.requests for p in partials)
    ok = sum(p.ok for p in partials)
    elapsed = max((p.elapsed for p in partials), default=0.0)
    lag_n = sum(p.lag_n for p in partials)
    series = [
        SecondSummary(second, n, errs, percentile_ms(h, 50), percentile_ms(h, 99), dict(sorted(codes.items())))
        for second, (n, errs, h, codes) in sorted(per_second.items())
    ]
    return LoadReport(
        mode=config.mode,
        target_rate=rate if rate is not None else config.rate,
        concurrency=concurrency if concurrency is not None else config.concurrency,
        sessions=sum(p.sessions for p in partials),
        processes=processes,
        warmup_s=config.warmup,
        duration_s=config.duration,
        count_target=count if count is not None else config.count,
        elapsed_s=elapsed,
        requests=requests,
        ok=ok,
        errors=dict(errors),
        achieved_rate=requests / elapsed if elapsed > 0 else 0.0,
        ok_rate=ok / elapsed if elapsed > 0 else 0.0,
        latency_ms=summary_ms(hist),
        send_lag_ms={
            "mean": round(sum(p.lag_sum for p in partials) / lag_n * 1000, 3) if lag_n else None,
            "max": round(max(p.lag_max for p in partials) * 1000, 3) if lag_n else None,
        },
        max_in_flight=sum(p.max_in_flight for p in partials),
        mix=dict(config.mix),
        series=series,
        histogram=hist,
    )
