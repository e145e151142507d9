"""System trace audit numbers (field 11) for messages the gateway originates.

STANs run 1..999999 and wrap back to 1; 0 is never issued (many hosts read "000000" as "absent").
Not thread-safe on purpose: the gateway runs one event loop, and `next()` has no await point, so two
tasks can never interleave inside it. Share one allocator per host link, from one thread.
"""

from __future__ import annotations

from typing import Final

STAN_MIN: Final = 1
STAN_MAX: Final = 999_999


class StanAllocator:
    """Hands out STANs in sequence: start, start+1, ..., 999999, 1, 2, ..."""

    __slots__ = ("_last",)

    def __init__(self, start: int = STAN_MIN) -> None:
        if not STAN_MIN <= start <= STAN_MAX:
            raise ValueError(f"STAN start must be {STAN_MIN}..{STAN_MAX}")
        self._last = start - 1  # next() returns `start` first

    def next(self) -> int:
        stan = self._last + 1
        if stan > STAN_MAX:
            stan = STAN_MIN
        self._last = stan
        return stan

    @property
    def last(self) -> int | None:
        """The STAN most recently issued (None before the first)."""
        return self._last or None

    @staticmethod
    def format(n: int) -> str:
        """The 6-digit field 11 form: 42 → "000042"."""
        if not STAN_MIN <= n <= STAN_MAX:
            raise ValueError(f"STAN must be {STAN_MIN}..{STAN_MAX}")
        return f"{n:06d}"
