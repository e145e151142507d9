"""A recorded lab trace replayed against a fresh gateway with the same keys and settings, in one
process: what `gateway demo` does at its end, and the quickest conformance check of a change."""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from pathlib import Path

import anyio
import anyio.abc

from gateway.config import Endpoint, GatewayConfig
from gateway.lab import LOOPBACK, MERCHANT_ID, lab_config
from gateway.serve import RunningGateway, run_gateway
from gateway.sim.keyfile import LabKeys, LabTerminal
from gateway.trace.replay import ReplayOptions, ReplayStats, replay
from gateway.trace.report import CaseSink
from gateway.trace.rulesfile import load_rules


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


async def replay_in_lab(trace: Path, work_dir: Path, zmk: bytes, tmks: Mapping[str, bytes], sink: CaseSink, *,
                        host_timeout: float, say: Callable[[str], None] = lambda line: None,
                        answer_timeout: float = 5.0, grace: float = 2.0) -> ReplayStats:
    """Replay `trace` against a new gateway (empty journal in `work_dir`) whose host is the trace host."""
    port = free_loopback_port()
    config = lab_config(work_dir, port, tmks, zmk, host_timeout=host_timeout, admin=False)
    keys = LabKeys(zmk, tuple(LabTerminal(tid, MERCHANT_ID, key) for tid, key in tmks.items()))
    async with anyio.create_task_group() as tg:
        gateway: RunningGateway = await tg.start(_gateway, config)
        options = ReplayOptions(target=Endpoint(LOOPBACK, gateway.terminal_port), host_listen=Endpoint(LOOPBACK, port),
                                keys=keys, rules=load_rules(None, trace=trace), answer_timeout=answer_timeout,
                                grace=grace, progress=0)
        stats = await replay(trace, options, sink, say)
        tg.cancel_scope.cancel()
    return stats


async def _gateway(config: GatewayConfig, *,
                   task_status: anyio.abc.TaskStatus[RunningGateway] = anyio.TASK_STATUS_IGNORED) -> None:
    await run_gateway(config, task_status=task_status)
