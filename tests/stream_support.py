"""A byte stream that forwards everything to the real one: tests override `send` to count, stall or
fail the writes that reach the socket."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import anyio.abc


class ForwardingStream(anyio.abc.ByteStream):
    def __init__(self, inner: anyio.abc.ByteStream) -> None:
        self.inner = inner

    async def send(self, item: bytes) -> None:
        await self.inner.send(item)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self.inner.receive(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self.inner.extra_attributes
