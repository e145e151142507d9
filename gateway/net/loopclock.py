"""The event loop's clock, for code that reads it once or twice per message.

`anyio.current_time()` on asyncio is `asyncio.get_running_loop().time()`, and on CPython 3.11 every
`get_running_loop()` makes a `getpid()` system call (a fork check, dropped in 3.12). Sampled at
saturation (py-spy --native), `getpid` was 12 % of the gateway's busy CPU, a good part of it from our
own clock reads. The loop's bound `time` method is the very same clock without that call, so the
terminal server and the host link take it once per connection and keep it.

On trio (or any other backend) `anyio.current_time` is already cheap and is returned as it is. Either
way the result is the clock that `anyio.sleep_until` and cancel-scope deadlines use.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import anyio


def loop_clock() -> Callable[[], float]:
    """The running event loop's clock as a plain function (call it from inside the loop)."""
    try:
        return asyncio.get_running_loop().time
    except RuntimeError:  # not asyncio: trio
        return anyio.current_time
