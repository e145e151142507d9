"""Slowloris on the terminal port, against the real gateway: 50 connections each declaring an
8,000-byte frame and trickling it a byte at a time. The idle timeout restarts on every byte, so it never
ends them; the frame deadline does, and at max_connections the connection idle or trickling longest
makes room for a real terminal instead of the terminal being refused."""

from __future__ import annotations

import struct
from pathlib import Path

import anyio
import anyio.abc
import pytest

from gateway.config import ConfigError, Endpoint, TerminalSideConfig, parse_config
from gateway.lab import CARD_CUP, LOOPBACK, Lab, open_lab

pytestmark = pytest.mark.anyio

TRICKLERS = 50
#: every trickler sends a byte this often: well inside the idle timeout
BYTE_EVERY = 0.5


class Trickler:
    """Declares an 8,000-byte CUP frame and sends it one byte every BYTE_EVERY seconds."""

    def __init__(self) -> None:
        self.connected_at = 0.0
        self.closed_at: float | None = None

    async def run(self, port: int) -> None:
        async with await anyio.connect_tcp(LOOPBACK, port) as s:
            self.connected_at = anyio.current_time()
            try:
                await s.send(struct.pack(">H", 8_000) + b"\x60")
                for _ in range(8_000):
                    await anyio.sleep(BYTE_EVERY)
                    await s.send(b"\x00")
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                self.closed_at = anyio.current_time()


def terminal_side(frame_timeout: float) -> TerminalSideConfig:
    return TerminalSideConfig(listen=Endpoint(LOOPBACK, 0), max_connections=TRICKLERS, idle_timeout=5.0,
                              write_timeout=2.0, frame_timeout=frame_timeout)


async def start_tricklers(lab: Lab, tg: anyio.abc.TaskGroup) -> list[Trickler]:
    tricklers = [Trickler() for _ in range(TRICKLERS)]
    for t in tricklers:
        tg.start_soon(t.run, lab.gateway.terminal_port)
        await anyio.sleep(0.01)
    server_side_count = lab.gateway.metrics.registry.get_sample_value
    with anyio.fail_after(10):
        while (server_side_count("gateway_terminal_connections") or 0) < TRICKLERS:
            await anyio.sleep(0.05)
    return tricklers


def counted(lab: Lab, name: str) -> float:
    return lab.gateway.metrics.registry.get_sample_value(f"gateway_{name}_total") or 0.0


async def test_a_frame_must_arrive_whole_within_the_frame_timeout(tmp_path: Path) -> None:
    async with open_lab(tmp_path, terminal_side=terminal_side(frame_timeout=2.0)) as lab, \
            anyio.create_task_group() as tg:
        tricklers = await start_tricklers(lab, tg)
        # the idle timeout (5 s) never fires for them; the frame deadline (2 s) does
        with anyio.fail_after(8):
            while any(t.closed_at is None for t in tricklers):
                await anyio.sleep(0.1)
        lifetimes = [t.closed_at - t.connected_at for t in tricklers]  # type: ignore[operator]
        assert max(lifetimes) < 5.0, lifetimes  # closed before the idle timeout could have
        assert counted(lab, "terminal_frame_timeouts") == TRICKLERS
        # and a real terminal is served all along
        t = lab.terminal()
        await t.connect()
        await t.sign_in()
        assert (await t.purchase(1_000, CARD_CUP)).approved
        tg.cancel_scope.cancel()


async def test_at_max_connections_the_longest_trickler_makes_room_for_a_terminal(tmp_path: Path) -> None:
    # a frame deadline far away: only shedding can let the terminal in
    async with open_lab(tmp_path, terminal_side=terminal_side(frame_timeout=60.0)) as lab, \
            anyio.create_task_group() as tg:
        tricklers = await start_tricklers(lab, tg)
        await anyio.sleep(1.0)
        t = lab.terminal()
        await t.connect()
        await t.sign_in()
        assert (await t.purchase(1_000, CARD_CUP)).approved
        assert counted(lab, "terminal_connections_refused") == 0
        assert counted(lab, "terminal_connections_shed") == 1
        with anyio.fail_after(5):
            while not any(tr.closed_at for tr in tricklers):
                await anyio.sleep(0.05)
        shed = [i for i, tr in enumerate(tricklers) if tr.closed_at is not None]
        assert shed == [0], shed  # the one trickling longest
        # a second terminal: the next oldest makes room (the first terminal is idle now, but newer)
        t2 = lab.terminal(lab.config.terminals[1].terminal_id)
        await t2.connect()
        await t2.sign_in()
        assert counted(lab, "terminal_connections_shed") == 2
        assert (await t.purchase(1_000, CARD_CUP)).approved  # the first terminal kept its connection
        tg.cancel_scope.cancel()


def test_frame_timeout_is_configured_like_the_other_timeouts() -> None:
    assert parse_config({"terminal_side": {"frame_timeout": 3}}).terminal_side.frame_timeout == 3.0
    assert TerminalSideConfig().frame_timeout == 10.0
    with pytest.raises(ConfigError, match=r"terminal_side\.frame_timeout: Input should be greater than 0"):
        parse_config({"terminal_side": {"frame_timeout": 0}})
