"""Rate-limited logging: one full line (with its traceback) per fault episode, then a count.

When a fault hits every request (a journal that cannot be written, a terminal repeating STANs), a line
per occurrence buries everything else: 370 tracebacks in 25 s were seen. `RateLimitedLog` writes the
first occurrence of a key in full (traceback included), counts the ones that follow, and while they go
on writes one line per `interval` that says how many were not written. An episode ends when the key
stays quiet for a whole `interval`, or when the caller says so (`end`, e.g. the journal took a write
again): its count is written then, and the next occurrence starts a new episode with a full line.

Keys are chosen by the code ("journal", "duplicate:10000001"), never taken raw from the wire without a
bound: at most `max_keys` episodes are tracked, the oldest is ended to make room.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

DEFAULT_INTERVAL: Final = 10.0
DEFAULT_MAX_KEYS: Final = 256


@dataclass(slots=True)
class _Episode:
    level: int
    started: float
    last_line: float  #: when a line was last written for this key
    last_seen: float
    suppressed: int = 0  #: occurrences counted since `last_line`, not written


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, interval: float = DEFAULT_INTERVAL, *,
                 max_keys: int = DEFAULT_MAX_KEYS, clock: Callable[[], float] = time.monotonic) -> None:
        if interval <= 0 or max_keys < 1:
            raise ValueError("interval must be positive and max_keys at least 1")
        self.logger = logger
        self.interval = interval
        self.max_keys = max_keys
        self._clock = clock
        self._episodes: dict[str, _Episode] = {}
        #: occurrences not written one by one, since start (for tests and diagnostics)
        self.suppressed_total = 0

    def log(self, level: int, key: str, msg: str, *args: object, exc_info: bool = False) -> bool:
        """Write `msg % args` (with the current exception's traceback when `exc_info`) if it starts an
        episode of `key`; else count it, and write it without traceback, with the count, once per
        interval. True when a line was written."""
        now = self._clock()
        episode = self._episodes.get(key)
        if episode is not None and now - episode.last_seen >= self.interval:
            self._close(key, episode)  # quiet for a whole interval: that episode is over
            episode = None
        if episode is None:
            if len(self._episodes) >= self.max_keys:
                oldest = next(iter(self._episodes))
                self._close(oldest, self._episodes[oldest])
            self._episodes[key] = _Episode(level, now, now, now)
            self.logger.log(level, msg, *args, exc_info=exc_info)
            return True
        episode.last_seen = now
        if now - episode.last_line < self.interval:
            episode.suppressed += 1
            self.suppressed_total += 1
            return False
        self.logger.log(level, msg + " (%d more like this in the last %.0fs, not logged one by one)",
                        *args, episode.suppressed, now - episode.last_line)
        episode.suppressed = 0
        episode.last_line = now
        return True

    def warning(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)

    def error(self, key: str, msg: str, *args: object, exc_info: bool = False) -> bool:
        return self.log(logging.ERROR, key, msg, *args, exc_info=exc_info)

    def active(self, key: str) -> bool:
        """Whether an episode of `key` is going on (ended ones, even quiet ones, are not)."""
        episode = self._episodes.get(key)
        return episode is not None and self._clock() - episode.last_seen < self.interval

    def end(self, key: str, summary: str | None = None) -> None:
        """The cause of `key` is gone: write its count (and `summary`) now, start afresh next time."""
        episode = self._episodes.get(key)
        if episode is not None:
            self._close(key, episode, summary)

    def _close(self, key: str, episode: _Episode, summary: str | None = None) -> None:
        del self._episodes[key]
        if episode.suppressed or summary:
            self.logger.log(episode.level, "%s: episode over after %.1fs%s", summary or key,
                            episode.last_seen - episode.started,
                            f", {episode.suppressed} more not logged one by one" if episode.suppressed else "")
