"""Wall-clock fields of a transaction, formatted once per second.

Every purchase needs the local date for the risk-limit day, local time for the host's field 12/13 and
the terminal's 12/13, and the UTC transmission date-time (field 7). `strftime` costs about a
microsecond per call; at thousands of transactions a second they all fall in the same second, so the
strings are cached per whole second of `time.time()`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LocalTimes:
    day: str  #: YYYYMMDD, the risk-limit day
    mmddhhmmss: str  #: host field 12+13 style local date-time
    hhmmss: str  #: field 12
    mmdd: str  #: field 13


@dataclass(frozen=True, slots=True)
class _Cached:
    second: int
    local: LocalTimes
    utc_mmddhhmmss: str


def _format(second: int) -> _Cached:
    local = time.localtime(second)
    hhmmss, mmdd = time.strftime("%H%M%S", local), time.strftime("%m%d", local)
    return _Cached(second, LocalTimes(time.strftime("%Y", local) + mmdd, mmdd + hhmmss, hhmmss, mmdd),
                   time.strftime("%m%d%H%M%S", time.gmtime(second)))


_cached = _format(int(time.time()))


def _now() -> _Cached:
    global _cached
    second = int(time.time())
    if second != _cached.second:
        _cached = _format(second)
    return _cached


def local_now() -> LocalTimes:
    """The local date/time strings of the current second."""
    return _now().local


def utc_mmddhhmmss() -> str:
    """Field 7 (transmission date-time, MMDDhhmmss in UTC, as ISO 8583:1987 says GMT) of this second."""
    return _now().utc_mmddhhmmss
