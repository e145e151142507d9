"""Recording real lab traffic for the replay and diff tests: the lab's gateway records both legs with
its own recorder (`[trace] path`), secrets surrogated; a fresh gateway with the same keys is the
system under test of the replay."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from ports import free_port as free_port  # re-exported: the tests import it from here

from gateway.config import AdminConfig, Endpoint, LimitsConfig, ReversalConfig, TraceConfig
from gateway.lab import (
    CARD_CUP,
    CARD_CUP_2,
    CARD_LOW,
    CARD_VISA,
    LOOPBACK,
    MERCHANT_ID,
    Lab,
    lab_config,
    open_lab,
)
from gateway.serve import RunningGateway, run_gateway
from gateway.sim.host_rules import Fault
from gateway.sim.keyfile import LabKeys, LabTerminal, read_test_keys, render_test_keys

FAST_SAF = ReversalConfig(max_attempts=5, backoff=(0.2, 0.5, 1.0), poll_interval=0.05, original_wait=3.0)


@asynccontextmanager
async def recorded_lab(tmp: Path, trace: Path, *, terminals: int = 3, host_timeout: float = 0.6,
                       faults: Iterable[Fault] = (), zmk: bytes | None = None,
                       tmks: dict[str, bytes] | None = None) -> AsyncIterator[tuple[Lab, Path]]:
    """The lab (host simulator and gateway) recording both legs with `gateway serve`'s own recorder
    ([trace] path), and the TEST KEYS file of its keys. The trace is complete when the block ends."""
    async with open_lab(tmp / "rec", terminals=terminals, host_timeout=host_timeout, faults=faults, zmk=zmk,
                        tmks=tmks, reversal=FAST_SAF, trace=TraceConfig(path=trace),
                        admin=AdminConfig(listen=None)) as lab:
        keys_file = tmp / "lab-keys.toml"
        terminals_ = tuple(LabTerminal(tid, MERCHANT_ID, key) for tid, key in lab.tmks.items())
        keys_file.write_text(render_test_keys(LabKeys(lab.zmk, terminals_)), encoding="utf-8")
        yield lab, keys_file


async def _gateway(config: Any, *, task_status: anyio.abc.TaskStatus[RunningGateway] = anyio.TASK_STATUS_IGNORED
                   ) -> None:
    await run_gateway(config, durable=True, task_status=task_status)


@asynccontextmanager
async def fresh_gateway(tmp: Path, keys_file: Path, host_port: int, *, host_timeout: float = 0.6,
                        limits: LimitsConfig | None = None, reversal: ReversalConfig | None = None,
                        name: str = "sut") -> AsyncIterator[RunningGateway]:
    """A new gateway (empty journal) with the lab keys, its host link pointed at `host_port`."""
    keys = read_test_keys(keys_file)
    config = lab_config(tmp / name, host_port, {t.terminal_id: t.tmk for t in keys.terminals}, keys.zmk,
                        host_timeout=host_timeout, admin=False, limits=limits, reversal=reversal or FAST_SAF)
    async with anyio.create_task_group() as tg:
        gw: RunningGateway = await tg.start(_gateway, config)
        try:
            yield gw
        finally:
            tg.cancel_scope.cancel()


def endpoint(port: int) -> Endpoint:
    return Endpoint(LOOPBACK, port)


async def record_session(tmp: Path, trace: Path, *, host_timeout: float, late: float,
                         zmk: bytes | None = None, tmks: dict[str, bytes] | None = None) -> Path:
    """A representative session: sign-ins, approvals, declines (51, 55), a refund of a purchase by its
    RRN, a void, a balance inquiry, a terminal reversal, a purchase over the limit and its reversal,
    and a host timeout that the gateway reverses by itself (the host's approval arrives `late`).
    Returns the lab keys file."""
    slow = Fault("late", seconds=late, pan=CARD_CUP_2.pan, mti=("0200",), limit=1)
    async with recorded_lab(tmp, trace, host_timeout=host_timeout, faults=[slow], zmk=zmk, tmks=tmks) as (lab, keys):
        t1, t2 = (lab.terminal(entry.terminal_id) for entry in lab.config.terminals[:2])
        await t1.connect()
        await t2.connect()
        assert (await t1.sign_in()).rc == "00"
        assert (await t2.sign_in()).rc == "00"
        sale = await t1.purchase(12_345, CARD_CUP)
        assert sale.approved
        assert (await t2.purchase(8_800, CARD_VISA)).approved
        assert (await t1.purchase(9_000, CARD_LOW)).rc == "51"
        assert (await t2.purchase(1_000, CARD_CUP, pin="999999")).rc == "55"
        assert (await t1.refund(2_000, CARD_CUP, original=sale)).rc == "00"
        sale2 = await t2.purchase(3_300, CARD_VISA)
        assert (await t2.void(sale2)).rc == "00"
        assert (await t1.balance(CARD_CUP)).rc == "00"
        sale3 = await t1.purchase(700, CARD_VISA)
        assert (await t1.reversal(sale3, "96")).rc == "00"
        over = await t2.purchase(1_500_000, CARD_CUP)  # above the per-transaction limit: refused here
        assert over.rc == "61"
        assert (await t2.reversal(over, "06")).rc == "25"  # the gateway never saw an original for it
        timed_out = await t1.purchase(4_200, CARD_CUP_2)
        assert timed_out.rc == "98"
        with anyio.fail_after(10):  # until the gateway's own reversal of it is acknowledged
            while len(lab.host.rules.reversed()) < 2:  # the terminal's reversal and the gateway's
                await anyio.sleep(0.05)
        await anyio.sleep(late)  # the late approval arrives too, and is journalled, never forwarded
    return keys


#: the keys of examples/replay (also in its gateway.toml and lab-keys.toml): lab keys, never production
EXAMPLE_ZMK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
EXAMPLE_TMKS = {"10000001": bytes.fromhex("FDE67607DFC81C9EF2497931AE8097A2"),
                "10000002": bytes.fromhex("83AB7C026129CD9D6ED3CDE386027AC2")}
EXAMPLE_HOST_TIMEOUT, EXAMPLE_LATE = 1.0, 2.0


async def record_example(directory: Path) -> None:
    """Regenerate examples/replay/session.jsonl and session-rerun.jsonl (two recordings of one session)."""
    for name in ("session.jsonl", "session-rerun.jsonl"):
        with tempfile.TemporaryDirectory() as tmp:
            await record_session(Path(tmp), directory / name, host_timeout=EXAMPLE_HOST_TIMEOUT,
                                 late=EXAMPLE_LATE, zmk=EXAMPLE_ZMK, tmks=dict(EXAMPLE_TMKS))


if __name__ == "__main__":  # python -m tests.trace_support examples/replay
    import sys

    anyio.run(record_example, Path(sys.argv[1]))
