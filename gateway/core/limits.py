"""Risk limits: a cap per transaction and a cap per terminal per day on purchases.

The daily total counts approved purchases *and* purchases in flight (reserved), so a burst of
concurrent requests cannot jointly overshoot the cap; a decline, timeout or reversal releases the
reservation. Totals are seeded from the journal at start so a restart does not reset the day.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.config import LimitsConfig

RC_LIMIT_EXCEEDED = "61"  # 超出金额限制: single-transaction or daily-cumulative limit (reference §5)


@dataclass(slots=True)
class RiskLimits:
    config: LimitsConfig
    _day: str = ""
    _totals: dict[str, int] = field(default_factory=dict)

    def _roll(self, day: str) -> None:
        if day != self._day:
            self._day = day
            self._totals.clear()

    def seed(self, day: str, totals: dict[str, int]) -> None:
        self._roll(day)
        for terminal_id, amount in totals.items():
            self._totals[terminal_id] = self._totals.get(terminal_id, 0) + amount

    def reserve(self, terminal_id: str, amount: int, day: str) -> str | None:
        """Reserve `amount` for the terminal today; a response code when a limit refuses it."""
        if amount > self.config.per_transaction:
            return RC_LIMIT_EXCEEDED
        self._roll(day)
        used = self._totals.get(terminal_id, 0)
        if used + amount > self.config.per_day:
            return RC_LIMIT_EXCEEDED
        self._totals[terminal_id] = used + amount
        return None

    def release(self, terminal_id: str, amount: int, day: str) -> None:
        if day != self._day:
            return  # yesterday's reservation: the day rolled over and the totals with it
        self._totals[terminal_id] = max(0, self._totals.get(terminal_id, 0) - amount)

    def used(self, terminal_id: str) -> int:
        return self._totals.get(terminal_id, 0)
