"""gateway.net.loopclock: the loop's clock, the one anyio's deadlines and sleep_until use."""

from __future__ import annotations

import anyio
import pytest

from gateway.net.loopclock import loop_clock

pytestmark = pytest.mark.anyio


async def test_loop_clock_is_the_clock_of_anyio_deadlines() -> None:
    now = loop_clock()
    before = anyio.current_time()
    reading = now()
    after = anyio.current_time()
    assert before <= reading <= after
    # a deadline computed from it is met by sleep_until on the same clock
    await anyio.sleep_until(now() + 0.01)
    # uvloop's clock counts whole milliseconds, so compare at that resolution: 14022.575 + 0.01 is
    # 14022.585000000001 in floating point, one rounding step past the 14022.585 the loop woke at
    assert round(anyio.current_time(), 3) >= round(reading + 0.01, 3)
