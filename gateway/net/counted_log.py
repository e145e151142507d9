"""A log line for events that can come in floods (connections shed, answers dropped): at most one line
per interval, each saying how many events it stands for. The metric next to it counts every event; the
log only has to say that it happens, and must not become the flood itself."""

from __future__ import annotations

import logging
import math
import time


class CountedLog:
    __slots__ = ("_interval", "_level", "_logged_at", "_logger", "_unlogged")

    def __init__(self, logger: logging.Logger, *, interval: float = 1.0, level: int = logging.WARNING) -> None:
        self._logger = logger
        self._interval = interval
        self._level = level
        self._unlogged = 0
        self._logged_at = -math.inf

    def note(self, msg: str, *args: object) -> None:
        """One more event; logged now (with the count of those not logged since) unless a line about
        this kind of event was logged less than `interval` seconds ago."""
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at < self._interval:
            return
        more = self._unlogged - 1
        if more:
            msg += f" (and {more} more like it since the last such line)"
        self._logger.log(self._level, msg, *args)
        self._unlogged, self._logged_at = 0, now
