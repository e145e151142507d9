"""Pass/fail limits for a load run (`--max-error-rate`, `--max-p99`), for CI: a run that exceeds one
exits non-zero with one line per limit saying which and by how much."""

from __future__ import annotations

import math
from dataclasses import dataclass

from gateway.load.driver import LoadError
from gateway.load.report import LoadReport


@dataclass(frozen=True, slots=True)
class Thresholds:
    #: highest acceptable share of requests that did not succeed (0.01 = 1 %)
    max_error_rate: float | None = None
    #: highest acceptable p99 latency of the successful requests, milliseconds
    max_p99_ms: float | None = None

    def failures(self, report: LoadReport) -> list[str]:
        """One line per limit the run exceeded; empty when it passed."""
        lines = []
        if self.max_error_rate is not None and report.error_rate > self.max_error_rate:
            top = ", ".join(f"{code}={n}" for code, n in report.errors_by_code()[:5])
            lines.append(f"error rate {report.error_rate:.2%} ({report.error_count} of {report.requests}: {top}) "
                         f"exceeds --max-error-rate {self.max_error_rate:.2%}")
        if self.max_p99_ms is not None:
            p99 = report.latency_ms.get("p99")
            if p99 is None:
                lines.append(f"p99 unknown (no successful request was measured); --max-p99 is {self.max_p99_ms:g} ms")
            elif p99 > self.max_p99_ms:
                lines.append(f"p99 {p99:.3f} ms exceeds --max-p99 {self.max_p99_ms:g} ms")
        return lines


def parse_rate(text: str) -> float:
    """"0.01" or "1%" → 0.01 (argparse type for --max-error-rate)."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise LoadError(f"--max-error-rate {text!r} is not a fraction (0.01) or a percentage (1%)") from None
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise LoadError(f"--max-error-rate {text!r} must lie between 0 and 1 (0 % and 100 %)")
    return value


def parse_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise LoadError(f"--max-p99 {text!r} is not a number of milliseconds") from None
    if not (math.isfinite(value) and value > 0):
        raise LoadError(f"--max-p99 {text!r} must be a positive number of milliseconds")
    return value
