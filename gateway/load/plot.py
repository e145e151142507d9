"""PNG plot of a load report.

Left, over the seconds of the run: p50/p99 latency per second (log scale) with the run's p99 and p99.9;
below it completions per second against the target rate, and the errors of each second stacked by
result code (51, 94, timeout, ...), so a run that degrades shows *which* failure took over and when.
Right: the whole run's latency percentile distribution as HdrHistogram plots it (percentile on a
log(1/(1-p)) axis, so 99 %, 99.9 % and 99.99 % are evenly spaced), which shows the tail a time series of
p99s hides. The title says what was driven: target, driver, sessions, load, date.

matplotlib is an optional dependency (extra "plot"); it is imported only when a plot is drawn, and
through its object API with the Agg canvas, so no GUI backend or pyplot global state is involved.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from gateway.load.driver import LoadError
from gateway.load.report import LoadReport

#: error codes drawn in their own colour; the rest are summed as "other"
MAX_CODES = 8
#: percentiles marked on the distribution's axis
PERCENTILE_TICKS = (0.0, 90.0, 99.0, 99.9, 99.99, 99.999, 99.9999)
#: iteration steps of the HDR percentile iterator per halving of the remaining distance to 100 %
TICKS_PER_HALF_DISTANCE = 5


def plot_title(report: LoadReport) -> str:
    """"127.0.0.1:5000 · driver cup · 64 sessions · open loop 500/s · 1 process · 2026-11-23 17:45"."""
    load = f"open loop {report.target_rate:g}/s" if report.target_rate else \
        f"closed loop, {report.concurrency} in flight"
    parts = [report.target, f"driver {report.driver}" if report.driver else None, f"{report.sessions} sessions",
             load, f"{report.processes} process{'es' if report.processes != 1 else ''}"]
    if report.started_at is not None:
        parts.append(report.started_at.strftime("%Y-%m-%d %H:%M %Z").strip())
    return " · ".join(part for part in parts if part)  # a report built without them (bench) leaves them out


def percentile_points(report: LoadReport) -> tuple[list[float], list[float]]:
    """(x = 1/(1-p), latency ms) of the whole run's HDR histogram, for a log-x percentile plot; the
    100 % point (x infinite) is left out, the maximum is drawn as a line instead."""
    hist = report.histogram
    if hist.get_total_count() == 0:
        return [], []
    xs, ys = [], []
    for item in hist.get_percentile_iterator(TICKS_PER_HALF_DISTANCE):
        p = item.percentile_level_iterated_to
        if p >= 100.0:
            break
        xs.append(1.0 / (1.0 - p / 100.0))
        ys.append(item.value_iterated_to / 1000.0)
    return xs, ys


def error_codes(report: LoadReport) -> list[str]:
    """The codes drawn separately: the most frequent ones of the run."""
    return [code for code, _ in report.errors_by_code()[:MAX_CODES]]


def plot_report(report: LoadReport, path: str | Path) -> None:
    """Write `path` (PNG); see the module docstring for what is on it."""
    build_figure(report).savefig(str(path), format="png")


def build_figure(report: LoadReport) -> Any:
    """The matplotlib `Figure` (Agg canvas) `plot_report` saves."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FixedLocator, FuncFormatter
    except ImportError:
        raise LoadError("plotting needs matplotlib (pip install 'iso8583-gateway[plot]')") from None

    seconds = [s.second + 1 for s in report.series]  # a completion in [0, 1) s is drawn at 1 s
    fig = Figure(figsize=(15, 7), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 2, width_ratios=(3, 2), height_ratios=(3, 2))
    latency_ax = fig.add_subplot(grid[0, 0])
    rate_ax = fig.add_subplot(grid[1, 0], sharex=latency_ax)
    dist_ax = fig.add_subplot(grid[:, 1])
    plain = FuncFormatter(lambda value, _pos: f"{value:g}")

    def points(values: list[float | None]) -> tuple[list[int], list[float]]:
        xs = [x for x, v in zip(seconds, values, strict=True) if v is not None]
        return xs, [v for v in values if v is not None]

    # --- latency over time
    latency_ax.plot(*points([s.p50_ms for s in report.series]), marker=".", label="p50 per second")
    latency_ax.plot(*points([s.p99_ms for s in report.series]), marker=".", label="p99 per second")
    for key, style in (("p99", "--"), ("p99.9", ":")):
        value = report.latency_ms.get(key)
        if value is not None:
            latency_ax.axhline(value, linestyle=style, color="grey", label=f"run {key} {value:.2f} ms")
    if any(s.p99_ms for s in report.series):
        latency_ax.set_yscale("log")
        latency_ax.yaxis.set_major_formatter(plain)
        latency_ax.yaxis.set_minor_formatter(plain)
    latency_ax.set_ylabel("latency (ms)")
    latency_ax.grid(True, which="both", alpha=0.3)
    latency_ax.legend(loc="upper left", fontsize="small")
    latency_ax.set_title(f"{report.achieved_rate:.0f}/s achieved, {report.error_count} errors "
                         f"({report.error_rate:.2%})", fontsize="medium")

    # --- rate, and errors stacked by code
    rate_ax.plot(seconds, [s.count for s in report.series], marker=".", color="black", label="completed / s")
    if report.target_rate:
        rate_ax.axhline(report.target_rate, linestyle="--", color="grey", label="target rate")
    codes = error_codes(report)
    if codes:
        stacks = [[s.errors_by_code.get(code, 0) for s in report.series] for code in codes]
        other = [s.errors - sum(s.errors_by_code.get(code, 0) for code in codes) for s in report.series]
        labels = [f"errors {code}" for code in codes]
        if any(other):
            stacks.append(other)
            labels.append("errors, other codes")
        rate_ax.stackplot(seconds, *stacks, labels=labels, alpha=0.7, step="mid")
    rate_ax.set_xlabel("second of the measured run")
    rate_ax.set_ylabel("requests / s")
    rate_ax.set_ylim(bottom=0)
    rate_ax.grid(True, alpha=0.3)
    rate_ax.legend(loc="lower left", fontsize="small", ncol=2)

    # --- the percentile distribution
    xs, ys = percentile_points(report)
    if xs:
        dist_ax.plot(xs, ys, color="tab:blue", label="latency at percentile")
        dist_ax.set_xscale("log")
        ticks = [1.0 / (1.0 - p / 100.0) for p in PERCENTILE_TICKS]
        dist_ax.xaxis.set_major_locator(FixedLocator(ticks))
        dist_ax.xaxis.set_major_formatter(FuncFormatter(_percentile_label))
        dist_ax.xaxis.set_minor_locator(FixedLocator([]))
        dist_ax.set_xlim(left=1.0, right=max(ticks[3], _next_tick(xs[-1], ticks)))
        maximum = report.latency_ms.get("max")
        if maximum is not None:
            dist_ax.axhline(maximum, linestyle=":", color="grey", label=f"max {maximum:.2f} ms")
        dist_ax.set_yscale("log")
        dist_ax.yaxis.set_major_formatter(plain)
        dist_ax.yaxis.set_minor_formatter(plain)
        dist_ax.legend(loc="upper left", fontsize="small")
    else:
        dist_ax.text(0.5, 0.5, "no successful request", ha="center", va="center", transform=dist_ax.transAxes)
    dist_ax.set_xlabel("percentile")
    dist_ax.set_ylabel("latency (ms)")
    dist_ax.set_title(f"latency by percentile ({report.histogram.get_total_count()} successful requests)",
                      fontsize="medium")
    dist_ax.grid(True, which="both", alpha=0.3)

    fig.suptitle(plot_title(report))
    return fig


def _percentile_label(x: float, _pos: Any) -> str:
    p = 100.0 * (1.0 - 1.0 / x) if x > 0 else 0.0
    return f"{p:.4f}".rstrip("0").rstrip(".") + "%"


def _next_tick(x: float, ticks: list[float]) -> float:
    """The first tick at or beyond `x`, so the axis ends on a labelled percentile."""
    for tick in ticks:
        if tick >= x * (1 - 1e-9):
            return tick
    return ticks[-1] if math.isfinite(ticks[-1]) else x
