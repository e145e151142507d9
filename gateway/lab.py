"""A lab bench in one process: host simulator + gateway + simulated terminals on loopback, with fresh
demo keys. `gateway demo`, the end-to-end tests and the benchmarks all stand on it, so they exercise
the same real sockets, real journal file and real cryptography.
"""

from __future__ import annotations

import dataclasses
import functools
import ssl
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from gateway.config import (
    AdminConfig,
    Endpoint,
    GatewayConfig,
    HostConfig,
    LimitsConfig,
    ReversalConfig,
    SecurityConfig,
    StoreConfig,
    TerminalEntry,
    TerminalSideConfig,
)
from gateway.metrics import Metrics
from gateway.security.algorithms import generate_key
from gateway.serve import RunningGateway, run_gateway
from gateway.sim.host import HostSimConfig, HostSimulator
from gateway.sim.host_rules import Account, Fault, HostRulesConfig
from gateway.sim.terminal import Card, TerminalSimulator

LOOPBACK = "127.0.0.1"

#: issuer accounts of the simulated host (minor units): a rich CUP debit range, a poor one, a Visa range
LAB_ACCOUNTS: tuple[Account, ...] = (
    Account("cup-debit", 10_000_000, ("622202", "621700"), pin="123456"),
    Account("cup-low", 5_000, ("621799",), pin="111111"),
    Account("visa-credit", 5_000_000, ("4",), pin="1234"),
)
CARD_CUP = Card("6222021234567890123", pin="123456")
CARD_CUP_2 = Card("6217001111222233334", pin="123456")
CARD_LOW = Card("6217990000111122223", pin="111111")
CARD_VISA = Card("4111111111111111", pin="1234")
LAB_CARDS: tuple[Card, ...] = (CARD_CUP, CARD_CUP_2, CARD_LOW, CARD_VISA)


def terminal_ids(n: int) -> list[str]:
    return [f"{10000001 + i:08d}" for i in range(n)]


MERCHANT_ID = "898100012340001"


@dataclass(slots=True)
class Lab:
    config: GatewayConfig
    host: HostSimulator
    host_port: int
    gateway: RunningGateway
    tmks: dict[str, bytes]
    zmk: bytes
    terminals: list[TerminalSimulator] = field(default_factory=list)

    def terminal(self, terminal_id: str | None = None, **options: Any) -> TerminalSimulator:
        """A terminal simulator for a registered terminal (the first one by default), not yet connected."""
        tid = terminal_id or self.config.terminals[0].terminal_id
        tmk = self.tmks.get(tid) or generate_key(16)
        sim = TerminalSimulator(LOOPBACK, self.gateway.terminal_port, tid, MERCHANT_ID, tmk,
                                cards=LAB_CARDS, **options)
        self.terminals.append(sim)
        return sim


def lab_config(tmp_dir: Path, host_port: int, tmks: Mapping[str, bytes], zmk: bytes, *,
               host_timeout: float = 2.0, durable_path: Path | None = None, admin: bool = True,
               limits: LimitsConfig | None = None, reversal: ReversalConfig | None = None,
               host_options: Mapping[str, Any] | None = None) -> GatewayConfig:
    host = HostConfig(address=Endpoint(LOOPBACK, host_port), timeout=host_timeout, echo_interval=30.0,
                      reconnect_min=0.05, reconnect_max=1.0)
    return GatewayConfig(
        terminal_side=TerminalSideConfig(listen=Endpoint(LOOPBACK, 0), idle_timeout=60.0, write_timeout=2.0),
        host=dataclasses.replace(host, **(host_options or {})),
        security=SecurityConfig(zmk=zmk.hex().upper()),
        store=StoreConfig(path=durable_path or tmp_dir / "journal.db", pan_hash_key_hex="11" * 32),
        reversal=reversal or ReversalConfig(max_attempts=5, backoff=(0.2, 0.5, 1.0), poll_interval=0.1,
                                            original_wait=host_timeout + 2.0),
        limits=limits or LimitsConfig(per_transaction=1_000_000, per_day=50_000_000),
        admin=AdminConfig(listen=Endpoint(LOOPBACK, 0) if admin else None),
        terminals=tuple(TerminalEntry(tid, MERCHANT_ID, key.hex().upper()) for tid, key in tmks.items()),
    )


@asynccontextmanager
async def open_lab(tmp_dir: Path, *, terminals: int = 3, host_timeout: float = 2.0,
                   faults: Iterable[Fault] = (), durable: bool = True, metrics: Metrics | None = None,
                   host_limit: int = 2_000_000, host_options: Mapping[str, Any] | None = None,
                   host_ssl_context: ssl.SSLContext | None = None,
                   **config_overrides: Any) -> AsyncIterator[Lab]:
    """Host simulator and gateway running on loopback until the block ends. `host_options` replace
    fields of the gateway's HostConfig (echo interval, match key, TLS, ...); `host_ssl_context` makes
    the host simulator speak TLS; `config_overrides` replace whole sections of the GatewayConfig."""
    zmk = generate_key(16)
    tmks = {tid: generate_key(16) for tid in terminal_ids(terminals)}
    host = HostSimulator(HostSimConfig(zmk=zmk, rules=HostRulesConfig(accounts=LAB_ACCOUNTS, limit=host_limit,
                                                                      faults=tuple(faults))))
    async with anyio.create_task_group() as tg:
        host_port = await tg.start(functools.partial(host.serve, LOOPBACK, 0, ssl_context=host_ssl_context))
        config = lab_config(tmp_dir, host_port, tmks, zmk, host_timeout=host_timeout, host_options=host_options)
        if config_overrides:
            config = dataclasses.replace(config, **config_overrides)
        gateway = await tg.start(_run_gateway, config, durable, metrics)
        with anyio.fail_after(10):
            await gateway.link.wait_signed_on()
        lab = Lab(config, host, host_port, gateway, tmks, zmk)
        try:
            yield lab
        finally:
            for sim in lab.terminals:
                await sim.aclose()
            tg.cancel_scope.cancel()


async def _run_gateway(config: GatewayConfig, durable: bool, metrics: Metrics | None, *,
                       task_status: anyio.abc.TaskStatus[RunningGateway] = anyio.TASK_STATUS_IGNORED) -> None:
    await run_gateway(config, durable=durable, metrics=metrics, task_status=task_status)
