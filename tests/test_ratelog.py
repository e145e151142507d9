"""The rate-limited log helper (gateway/ratelog.py): one full line per episode, then counts."""

from __future__ import annotations

import logging

import pytest

from gateway.ratelog import RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, bool]]:
    """(message, has a traceback) per record."""
    return [(r.getMessage(), r.exc_info is not None) for r in caplog.records]


def test_one_traceback_per_episode_then_a_count_per_interval(caplog: pytest.LogCaptureFixture, clock: Clock) -> None:
    caplog.set_level(logging.WARNING)
    limited = RateLimitedLog(logging.getLogger("t"), interval=10.0, clock=clock)
    for i in range(370):  # the storm of issue 11 item 10: one failure every 67 ms for 25 s
        try:
            raise OSError("disk full")
        except OSError:
            limited.error("journal", "refused %d", i, exc_info=True)
        clock.now += 25 / 370
    logged = lines(caplog)
    assert sum(tb for _, tb in logged) == 1  # the first one only
    assert logged[0] == ("refused 0", True)
    assert 2 <= len(logged) <= 3, logged  # and one line per 10 s with the count
    assert "more like this in the last 10s" in logged[1][0]
    assert limited.suppressed_total == 370 - len(logged)


def test_end_writes_the_count_and_the_next_fault_starts_with_a_full_line(caplog: pytest.LogCaptureFixture,
                                                                         clock: Clock) -> None:
    caplog.set_level(logging.WARNING)
    limited = RateLimitedLog(logging.getLogger("t"), interval=10.0, clock=clock)
    for _ in range(5):
        limited.warning("journal", "write failed")
    limited.end("journal", "journal back")
    assert lines(caplog)[-1] == ("journal back: episode over after 0.0s, 4 more not logged one by one", False)
    assert limited.warning("journal", "write failed again")
    assert not limited.active("other")


def test_a_quiet_interval_ends_an_episode(caplog: pytest.LogCaptureFixture, clock: Clock) -> None:
    caplog.set_level(logging.WARNING)
    limited = RateLimitedLog(logging.getLogger("t"), interval=10.0, clock=clock)
    limited.warning("94:1", "duplicate")
    limited.warning("94:1", "duplicate")
    assert limited.active("94:1")
    clock.now += 11
    assert not limited.active("94:1")
    assert limited.warning("94:1", "duplicate")  # a new episode: written in full
    messages = [m for m, _ in lines(caplog)]
    assert messages == ["duplicate", "94:1: episode over after 0.0s, 1 more not logged one by one", "duplicate"]


def test_keys_are_bounded(caplog: pytest.LogCaptureFixture, clock: Clock) -> None:
    caplog.set_level(logging.WARNING)
    limited = RateLimitedLog(logging.getLogger("t"), interval=10.0, max_keys=4, clock=clock)
    for i in range(100):
        limited.warning(f"k{i}", "x")
    assert len(limited._episodes) == 4
