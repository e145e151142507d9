"""When requests start: open-loop (fixed intended times) and closed-loop (as soon as a session is free).

A schedule hands out tickets `(start_time, measured)`; `None` means the run is over. Each session's
worker takes the next ticket when it is free, so in the open loop the schedule does not bend to the
server: a ticket's time is fixed when the run starts, however late a worker gets to it.
"""

from __future__ import annotations

import math
from typing import Protocol

Ticket = tuple[float, bool]


class Schedule(Protocol):
    def next_ticket(self, now: float) -> Ticket | None: ...


class OpenLoopSchedule:
    """Ticket i starts at `start + i / rate`; those before `measure_from` are warm-up."""

    __slots__ = ("_first_measured", "_i", "_interval", "_limit", "_measured", "_start", "_stop", "measure_from")

    def __init__(self, start: float, rate: float, measure_from: float, duration: float | None,
                 count: int | None) -> None:
        self._start = start
        self._interval = 1.0 / rate
        self.measure_from = measure_from
        # decided on ticket indexes, not on float times: a ticket due exactly at a boundary must not
        # fall on either side of it by rounding (rate × duration tickets, exactly)
        self._first_measured = math.ceil((measure_from - start) * rate - 1e-9)
        self._stop = self._first_measured + round(duration * rate) if duration is not None else math.inf
        self._limit = count if count is not None else math.inf
        self._i = 0
        self._measured = 0

    def next_ticket(self, now: float) -> Ticket | None:
        if self._i >= self._stop or self._measured >= self._limit:
            return None
        intended = self._start + self._i * self._interval
        measured = self._i >= self._first_measured
        self._i += 1
        if measured:
            self._measured += 1
        return intended, measured

    @property
    def issued(self) -> int:
        return self._i


class ClosedLoopSchedule:
    """A ticket is "now" until the duration has passed or `count` measured requests were issued."""

    __slots__ = ("_end", "_limit", "_measured", "measure_from")

    def __init__(self, measure_from: float, duration: float | None, count: int | None) -> None:
        self.measure_from = measure_from
        self._end = measure_from + duration if duration is not None else math.inf
        self._limit = count if count is not None else math.inf
        self._measured = 0

    def next_ticket(self, now: float) -> Ticket | None:
        if now >= self._end:
            return None
        measured = now >= self.measure_from
        if measured:
            if self._measured >= self._limit:
                return None
            self._measured += 1
        return now, measured
