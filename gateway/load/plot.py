"""PNG plot of a load report: latency percentiles per second over the achieved rate per second.

matplotlib is an optional dependency (extra "plot"); it is imported only when a plot is drawn, and
through its object API with the Agg canvas, so no GUI backend or pyplot global state is involved.
"""

from __future__ import annotations

from pathlib import Path

from gateway.load.driver import LoadError
from gateway.load.report import LoadReport


def plot_report(report: LoadReport, path: str | Path) -> None:
    """Write `path` (PNG): top, p50/p99 latency per second (log scale) with the run's p99 and p99.9;
    bottom, completions and errors per second against the target rate."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        raise LoadError("plotting needs matplotlib (pip install 'iso8583-gateway[plot]')") from None

    seconds = [s.second + 1 for s in report.series]  # a completion in [0, 1) s is drawn at 1 s
    fig = Figure(figsize=(10, 6.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    latency_ax, rate_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))

    def points(values: list[float | None]) -> tuple[list[int], list[float]]:
        xs = [x for x, v in zip(seconds, values, strict=True) if v is not None]
        return xs, [v for v in values if v is not None]

    latency_ax.plot(*points([s.p50_ms for s in report.series]), marker=".", label="p50 per second")
    latency_ax.plot(*points([s.p99_ms for s in report.series]), marker=".", label="p99 per second")
    for key, style in (("p99", "--"), ("p99.9", ":")):
        value = report.latency_ms.get(key)
        if value is not None:
            latency_ax.axhline(value, linestyle=style, color="grey", label=f"run {key} {value:.2f} ms")
    if any(s.p99_ms for s in report.series):
        latency_ax.set_yscale("log")
        plain = FuncFormatter(lambda value, _pos: f"{value:g}")
        latency_ax.yaxis.set_major_formatter(plain)
        latency_ax.yaxis.set_minor_formatter(plain)
    latency_ax.set_ylabel("latency (ms)")
    latency_ax.grid(True, which="both", alpha=0.3)
    latency_ax.legend(loc="upper left", fontsize="small")
    target = f"open loop at {report.target_rate:g}/s" if report.target_rate else \
        f"closed loop, {report.concurrency} in flight"
    latency_ax.set_title(f"{target}: {report.achieved_rate:.0f}/s achieved, {report.error_count} errors, "
                         f"{report.processes} process(es)")

    rate_ax.plot(seconds, [s.count for s in report.series], marker=".", label="completed / s")
    rate_ax.plot(seconds, [s.errors for s in report.series], marker=".", color="red", label="errors / s")
    if report.target_rate:
        rate_ax.axhline(report.target_rate, linestyle="--", color="grey", label="target rate")
    rate_ax.set_xlabel("second of the measured run")
    rate_ax.set_ylabel("requests / s")
    rate_ax.set_ylim(bottom=0)
    rate_ax.grid(True, alpha=0.3)
    rate_ax.legend(loc="lower left", fontsize="small")
    fig.savefig(str(path), format="png")
