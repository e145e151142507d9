"""Load reports: JSON fields, merging partials, PNG plot."""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

import pytest
from hdrh.histogram import HdrHistogram

from gateway.load.config import LoadConfig, parse_mix
from gateway.load.driver import LoadError
from gateway.load.hdr import SecondStats, run_histogram, summary_ms, to_us
from gateway.load.plot import plot_report
from gateway.load.report import merge, partial_from

CONFIG = LoadConfig(rate=100, duration=3, warmup=1, mix=(("purchase", 8.0), ("refund", 2.0)))


def make_partial(latencies_ms: list[float], errors: dict[str, int], *, seconds: int = 3, sessions: int = 4):
    hist = run_histogram()
    per_second: dict[int, SecondStats] = {}
    for i, ms in enumerate(latencies_ms):
        us = to_us(ms / 1000)
        hist.record_value(us)
        stats = per_second.setdefault(i % seconds, SecondStats())
        stats.count += 1
        stats.hist.record_value(us)
    for i, n in enumerate(errors.values()):
        per_second.setdefault(i % seconds, SecondStats()).errors += n
        per_second[i % seconds].count += n
    requests = len(latencies_ms) + sum(errors.values())
    return partial_from(requests, len(latencies_ms), Counter(errors), float(seconds), hist, per_second,
                        max_in_flight=3, sessions=sessions, lag_sum=0.01, lag_max=0.004, lag_n=10)


def test_report_json_has_every_field(tmp_path: Path):
    report = merge([make_partial([1.0] * 90 + [10.0] * 9 + [100.0], {"51": 2, "timeout": 1})], CONFIG,
                   processes=1)
    path = tmp_path / "report.json"
    report.write_json(path)
    data = json.loads(path.read_text())
    assert {"mode", "target_rate", "concurrency", "sessions", "processes", "warmup_s", "duration_s",
            "count_target", "elapsed_s", "requests", "ok", "errors", "achieved_rate", "ok_rate",
            "latency_ms", "send_lag_ms", "max_in_flight", "mix", "series", "hdr"} <= data.keys()
    assert data["mode"] == "open" and data["target_rate"] == 100
    assert data["requests"] == 103 and data["ok"] == 100
    assert data["errors"] == {"51": 2, "timeout": 1}
    assert data["achieved_rate"] == pytest.approx(103 / 3, rel=1e-3)
    lat = data["latency_ms"]
    assert set(lat) == {"p50", "p90", "p99", "p99.9", "max", "min", "mean"}
    assert lat["p50"] == pytest.approx(1.0, rel=0.01)
    assert lat["p99"] == pytest.approx(10.0, rel=0.01)
    assert lat["max"] == pytest.approx(100.0, rel=0.01)
    assert data["send_lag_ms"] == {"mean": 1.0, "max": 4.0}
    assert data["mix"] == {"purchase": 8.0, "refund": 2.0}
    assert [s["second"] for s in data["series"]] == [0, 1, 2]
    assert set(data["series"][0]) == {"second", "count", "errors", "p50_ms", "p99_ms"}
    assert sum(s["count"] for s in data["series"]) == 103
    assert HdrHistogram.decode(data["hdr"].encode()).get_total_count() == 100
    assert "latency ms p50 1.000" in report.summary_line()


def test_merge_sums_counts_errors_histograms_and_series():
    a = make_partial([1.0] * 50, {"51": 1}, sessions=4)
    b = make_partial([2.0] * 150, {"51": 2, "exc:ConnectionResetError": 1}, sessions=5)
    report = merge([a, b], CONFIG, processes=2)
    assert report.requests == 50 + 1 + 150 + 3
    assert report.ok == 200
    assert report.errors == {"51": 3, "exc:ConnectionResetError": 1}
    assert report.histogram.get_total_count() == 200
    assert report.latency_ms["p50"] == pytest.approx(2.0, rel=0.01)
    assert report.sessions == 9 and report.processes == 2
    assert report.max_in_flight == 6
    assert sum(s.count for s in report.series) == report.requests
    assert sum(s.errors for s in report.series) == 4


def test_empty_run_reports_no_latency_rather_than_crashing():
    report = merge([make_partial([], {"connect:OSError": 5})], CONFIG, processes=1)
    assert report.ok == 0 and report.latency_ms["p99"] is None
    json.dumps(report.to_dict())


def test_latencies_outside_the_histogram_range_are_clamped():
    assert to_us(0) == 1
    assert to_us(120.0) == 60_000_000
    hist = run_histogram()
    hist.record_value(to_us(120.0))
    assert summary_ms(hist)["max"] == pytest.approx(60_000, rel=0.001)


def test_plot_is_a_valid_png(tmp_path: Path):
    report = merge([make_partial([1.0, 2.0, 3.0, 50.0] * 30, {"96": 3})], CONFIG, processes=1)
    path = tmp_path / "load.png"
    plot_report(report, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1000, 650)
    assert data[-8:-4] == b"IEND"


def test_parse_mix():
    expected = (("purchase", 8.0), ("refund", 1.0), ("balance", 1.0))
    assert parse_mix("purchase=8,refund=1, balance=1") == expected
    assert parse_mix("echo") == (("echo", 1.0),)
    for bad in ("", "a=x", "a=-1", "=3", "a=0"):
        with pytest.raises(LoadError):
            parse_mix(bad)
