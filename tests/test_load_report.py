"""Load reports: JSON fields, merging partials, PNG plot."""

from __future__ import annotations

import itertools
import json
import struct
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hdrh.histogram import HdrHistogram

from gateway.load.config import LoadConfig, parse_mix
from gateway.load.driver import LoadError
from gateway.load.hdr import SecondStats, run_histogram, summary_ms, to_us
from gateway.load.plot import build_figure, percentile_points, plot_report, plot_title
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
    for i, (code, n) in enumerate(errors.items()):
        per_second.setdefault(i % seconds, SecondStats()).errors += n
        per_second[i % seconds].count += n
        per_second[i % seconds].codes[code] += n
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
    assert set(data["series"][0]) == {"second", "count", "errors", "p50_ms", "p99_ms", "errors_by_code"}
    assert [s["errors_by_code"] for s in data["series"]] == [{"51": 2}, {"timeout": 1}, {}]
    assert data["error_rate"] == pytest.approx(3 / 103, abs=1e-6)
    assert {"target", "driver", "started_at"} <= data.keys()
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
    # errors by code merge per second too
    assert report.series[0].errors_by_code == {"51": 3}
    assert report.series[1].errors_by_code == {"exc:ConnectionResetError": 1}
    assert report.errors_by_code() == [("51", 3), ("exc:ConnectionResetError", 1)]
    assert report.errors_line() == "errors by code: 51=3 (1.47%), exc:ConnectionResetError=1 (0.49%)"


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


def plotted_report():
    report = merge([make_partial([1.0, 2.0, 3.0, 50.0] * 30 + [400.0], {"96": 3, "51": 5, "timeout": 1})], CONFIG,
                   processes=1)
    report.target, report.driver = "127.0.0.1:5000", "cup"
    report.started_at = datetime(2026, 11, 23, 17, 45, tzinfo=UTC)
    return report


def test_plot_is_a_valid_png(tmp_path: Path):
    path = tmp_path / "load.png"
    plot_report(plotted_report(), path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1500, 700)
    assert data[-8:-4] == b"IEND"


def test_plot_title_says_target_driver_sessions_and_date():
    report = plotted_report()
    assert plot_title(report) == "127.0.0.1:5000 · driver cup · 4 sessions · open loop 100/s · 1 process · " \
                                 "2026-11-23 17:45 UTC"
    fig = build_figure(report)
    assert fig._suptitle.get_text() == plot_title(report)
    report.target = report.driver = report.started_at = None  # e.g. bench/gateway.py's own reports
    assert plot_title(report) == "4 sessions · open loop 100/s · 1 process"


def test_plot_shows_errors_by_code_and_the_percentile_distribution():
    report = plotted_report()
    fig = build_figure(report)
    _latency_ax, rate_ax, dist_ax = fig.axes
    legend = [t.get_text() for t in rate_ax.get_legend().get_texts()]
    assert {"errors 51", "errors 96", "errors timeout"} <= set(legend)
    # the stacked areas: one polygon collection per code
    assert len(rate_ax.collections) == 3
    assert dist_ax.get_xscale() == "log" and dist_ax.get_yscale() == "log"
    labels = [t.get_text() for t in dist_ax.get_xticklabels()]
    assert {"90%", "99%", "99.9%"} <= set(labels)
    [line] = [ln for ln in dist_ax.get_lines() if ln.get_label() == "latency at percentile"]
    _xs, ys = line.get_data()
    assert list(ys) == sorted(ys)  # latency grows with the percentile
    assert ys[0] == pytest.approx(1.0, rel=0.01) and max(ys) == pytest.approx(400.0, rel=0.01)
    assert "121 successful requests" in dist_ax.get_title()


def test_percentile_points_follow_the_histogram():
    report = plotted_report()
    xs, ys = percentile_points(report)
    assert xs[0] == pytest.approx(1.0) and all(b > a for a, b in itertools.pairwise(xs))
    # x = 1/(1-p): at x = 2 (p50) the latency is the run's p50
    p50 = min(zip(xs, ys, strict=True), key=lambda point: abs(point[0] - 2.0))[1]
    assert p50 == pytest.approx(report.latency_ms["p50"], rel=0.02)


def test_an_empty_run_still_plots(tmp_path: Path):
    report = merge([make_partial([], {"connect:OSError": 5})], CONFIG, processes=1)
    plot_report(report, tmp_path / "empty.png")
    assert percentile_points(report) == ([], [])


def test_parse_mix():
    expected = (("purchase", 8.0), ("refund", 1.0), ("balance", 1.0))
    assert parse_mix("purchase=8,refund=1, balance=1") == expected
    assert parse_mix("echo") == (("echo", 1.0),)
    for bad in ("", "a=x", "a=-1", "=3", "a=0"):
        with pytest.raises(LoadError):
            parse_mix(bad)
