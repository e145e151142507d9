"""The per-second cache of formatted wall-clock fields gives what strftime gives for the same second."""

from __future__ import annotations

import time

import pytest

from gateway.core import clock


def test_cached_fields_match_strftime_of_the_same_second() -> None:
    for _ in range(50):  # bounded: retried only when the second changed between the two reads
        before = int(time.time())
        local, utc = clock.local_now(), clock.utc_mmddhhmmss()
        if int(time.time()) == before:
            break
    lt, gt = time.localtime(before), time.gmtime(before)
    assert local.day == time.strftime("%Y%m%d", lt)
    assert local.hhmmss == time.strftime("%H%M%S", lt)
    assert local.mmdd == time.strftime("%m%d", lt)
    assert local.mmddhhmmss == time.strftime("%m%d%H%M%S", lt)
    assert utc == time.strftime("%m%d%H%M%S", gt)


def test_a_new_second_gives_new_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    base = 1_790_000_000  # 2026-09-21, a fixed instant
    monkeypatch.setattr(clock.time, "time", lambda: base + 0.25)
    first = clock.utc_mmddhhmmss()
    monkeypatch.setattr(clock.time, "time", lambda: base + 1.5)
    second = clock.utc_mmddhhmmss()
    assert first == time.strftime("%m%d%H%M%S", time.gmtime(base))
    assert second == time.strftime("%m%d%H%M%S", time.gmtime(base + 1))
    assert clock.local_now().day == time.strftime("%Y%m%d", time.localtime(base + 1))
