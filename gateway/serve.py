"""Assembly: config → security module, journal, host link, SAF sender, terminal server, admin endpoint,
all in one task group; and the `gateway serve` command.

Start-up order matters for the money promises: the journal opens first, then every request whose
outcome is unknown (the previous process died while it was in flight) is queued for reversal, and only
then are terminals accepted.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path

import anyio
import anyio.abc

from gateway import gcpolicy
from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.iso.stan import STAN_MAX, StanAllocator
from gateway.metrics import Metrics, NullMetrics
from gateway.net.admin import serve_admin
from gateway.net.host_link import HostLink
from gateway.net.saf_sender import SafSender
from gateway.net.saf_watch import watch_saf
from gateway.net.terminal_server import TerminalServer
from gateway.security.errors import SecurityError
from gateway.security.module import SecurityModule, SoftwareSecurityModule
from gateway.security.startup import require_zone_master_key, warn_missing_terminal_master_keys
from gateway.service import GatewayService
from gateway.shutdown import drain
from gateway.store.base import Store
from gateway.store.memory import MemoryStore
from gateway.store.records import TxnRecord
from gateway.store.sqlite import SqliteStore
from gateway.trace.recorder import open_recorder
from gateway.workers import WorkerRole, refuse_workers, run_supervisor

log = logging.getLogger("gateway")

PAN_KEY_ENV = "GATEWAY_PAN_HASH_KEY"


#: STANs a previous process may have handed out after its newest journalled request (reversal repeats,
#: echo tests, requests allocated but not yet committed when it died)
STAN_RESUME_MARGIN = 10_000


def resume_host_stans(newest: list[TxnRecord], slot: int = 0, slots: int = 1) -> StanAllocator:
    """Go on after the journal's newest request. Field 90 names an original by MTI + STAN + field 7 (to
    the second) + acquirer, so a gateway restarted within the same second must not hand out a STAN of
    its previous life: the host would take a new purchase for a duplicate, and that purchase's reversal
    would undo an older one the customer holds a receipt for.

    Worker `slot` of `slots` (`serve --workers`) starts that far apart in the STAN cycle, so workers
    sharing one acquirer id do not send the same STAN in the same second (a stopgap until STANs come
    in blocks from the shared journal: sequences this far apart meet only after hundreds of thousands
    of requests)."""
    offset = slot * (STAN_MAX // max(slots, 1))
    if not newest or not newest[0].host_stan:
        return StanAllocator(start=offset + 1)
    return StanAllocator(start=(int(newest[0].host_stan) + STAN_RESUME_MARGIN + offset) % STAN_MAX + 1)


@dataclass(slots=True)
class RunningGateway:
    service: GatewayService
    link: HostLink
    saf: SafSender
    store: Store
    metrics: Metrics
    terminal_port: int
    admin_port: int | None
    recovered: int  #: reversals queued at start for requests whose outcome was unknown
    server: TerminalServer | None = None  #: the terminal listener (a graceful shutdown stops it accepting)


def pan_hash_key(config: GatewayConfig, *, create: bool = True) -> bytes:
    """The key of the journal's PAN fingerprints: env, config, or a key file kept next to the journal
    (created once, owner-only), so fingerprints stay comparable across restarts. `create=False` (the
    operator's card lookup) refuses to make one up: a new key would match nothing."""
    text = os.environ.get(PAN_KEY_ENV) or config.store.pan_hash_key_hex
    if text:
        try:
            return bytes.fromhex(text)
        except ValueError:
            raise ConfigError("store.pan_hash_key_hex: expected hex") from None
    if config.store.url is not None:
        # instances on one journal must share the key, or their fingerprints of one card differ
        log.warning("store.url is set but no PAN fingerprint key is: set %s (the same for every instance)",
                    PAN_KEY_ENV)
    key_file = config.store.path.with_name(config.store.path.name + ".pankey")
    if key_file.exists():
        return bytes.fromhex(key_file.read_text().strip())
    if not create:
        raise ConfigError(f"no PAN fingerprint key: {key_file} is missing and neither {PAN_KEY_ENV} nor "
                          "store.pan_hash_key_hex is set (the gateway creates the file when it first starts)")
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex())
    log.warning("created a PAN fingerprint key at %s; set %s to manage it yourself", key_file, PAN_KEY_ENV)
    return key


def open_store(config: GatewayConfig, metrics: Metrics, *, durable: bool = True) -> AbstractAsyncContextManager[Store]:
    key = pan_hash_key(config) if durable else secrets.token_bytes(32)
    if not durable:
        return MemoryStore.open(observer=metrics.journal, pan_key=key,  # type: ignore[return-value]
                                max_refusals=config.store.max_refusals)
    if config.store.url is not None:
        return _open_postgres(config, metrics, key)
    config.store.path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteStore.open(config.store.path, synchronous=config.store.synchronous,  # type: ignore[return-value]
                            commit_delay=config.store.commit_delay, observer=metrics.journal, pan_key=key,
                            max_refusals=config.store.max_refusals)


def _open_postgres(config: GatewayConfig, metrics: Metrics, key: bytes) -> AbstractAsyncContextManager[Store]:
    try:
        from gateway.store.postgres import PostgresStore
    except ImportError as exc:  # psycopg is the `postgres` extra
        raise ConfigError(f"store.url: the PostgreSQL store needs psycopg: pip install "
                          f"'iso8583-gateway[postgres]' ({exc})") from None
    st = config.store
    return PostgresStore.open(st.url or "", instance_id=st.instance_id, commit_delay=st.commit_delay,  # type: ignore[return-value]
                              observer=metrics.journal, pan_key=key, lease=st.saf_lease,
                              heartbeat_interval=st.heartbeat_interval, pool_size=st.pool_size,
                              max_refusals=st.max_refusals, lock_timeout=st.lock_timeout)


async def run_gateway(
    config: GatewayConfig,
    *,
    security: SecurityModule | None = None,
    metrics: Metrics | None = None,
    durable: bool = True,
    role: WorkerRole | None = None,
    task_status: anyio.abc.TaskStatus[RunningGateway] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run the whole gateway until cancelled. `await tg.start(run_gateway, config)` returns a
    `RunningGateway` with the bound ports once terminals can connect. `role`: this process is one
    worker of `serve --workers N` (gateway.workers)."""
    metrics = metrics if metrics is not None else (Metrics() if config.admin.metrics else NullMetrics())
    security = security if security is not None else SoftwareSecurityModule.from_config(
        config.security, config.terminals)
    # refuse to start without the keys the configuration needs (rather than failing every sign-on)
    require_zone_master_key(security, keystore=config.security.keystore, lmk_file=config.security.lmk_file,
                            key_exchange=config.host.key_exchange)
    warn_missing_terminal_master_keys(security, (t.terminal_id for t in config.terminals))
    async with open_store(config, metrics, durable=durable) as store, anyio.create_task_group() as tg:
        link = HostLink(config.host, security, metrics)
        saf = SafSender(config.reversal, store, link, metrics, config.host.acquirer_id, config.host.forwarding_id)
        service = GatewayService(config, security, store, link, saf, metrics)
        link.on_unmatched = service.on_unmatched_host_answer
        recorder = await open_recorder(config, metrics, tg)  # None unless [trace] path is set
        link.tap = service.tap = recorder
        recovered = await service.recover()
        link.stans = resume_host_stans(await store.list_transactions(limit=1), *(
            (role.slot, role.slots) if role is not None else (0, 1)))
        midnight = datetime.now().replace(hour=0, minute=0, second=0, microsecond=0)
        service.limits.seed(midnight.strftime("%Y%m%d"), await store.purchase_totals_since(midnight.timestamp()))
        if config.store.url is not None:  # instances on one database share sessions, limits and STAN blocks
            from gateway.store.shared_state import share_state
            await tg.start(partial(share_state, config, store, security, service, link,
                                   instance_id=getattr(store, "instance_id", "")))
        await tg.start(link.run)
        await tg.start(saf.run)
        await tg.start(watch_saf, store, metrics)
        await tg.start(service.journal_retry.run)
        # instances sharing a journal settle each other's requests when one stops (a no-op otherwise)
        await tg.start(partial(service.sweep_orphans, interval=config.store.orphan_after / 2,
                               stale_after=config.store.orphan_after))
        server = TerminalServer(config.terminal_side, service.handle_frame, metrics, admit=service.admit)
        server.tap = recorder
        server.reuse_port = role is not None
        terminal_port = await tg.start(server.serve)
        committer = getattr(store, "committer", None)

        def journal_ready() -> bool:
            return service.journal_healthy and (committer is None or committer.running)

        metrics.signed_in_terminals.set_function(lambda: len(service.sessions))
        metrics.journal_ready.set_function(lambda: 1.0 if journal_ready() else 0.0)
        admin_port = None
        if config.admin.listen is not None:
            readiness = {"host_link": lambda: link.ready, "journal": journal_ready,
                         "not_draining": lambda: not service.draining}
            admin_port = await tg.start(serve_admin, config.admin.listen.host, config.admin.listen.port,
                                        metrics, readiness)
        log.info("gateway up: terminals on port %s, admin on port %s, host %s", terminal_port, admin_port,
                 config.host.address)
        task_status.started(RunningGateway(service, link, saf, store, metrics, terminal_port, admin_port,
                                           recovered, server))


# --- `gateway serve` ---------------------------------------------------------------------------------


async def _serve_until_signalled(config: GatewayConfig, role: WorkerRole | None = None) -> None:
    """Serve until SIGTERM/SIGINT; the first one drains (see `gateway.shutdown`), a second one stops at
    once (start-up recovery settles whatever is left)."""
    async with anyio.create_task_group() as tg:
        gateway = await tg.start(partial(run_gateway, config, role=role))
        gcpolicy.settle_after_startup()  # the serving process only (see gateway/gcpolicy.py)
        if role is not None:
            tg.start_soon(role.report_up, gateway.admin_port)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            draining = False
            async for signum in signals:
                if draining:
                    log.warning("signal %s again: stopping at once; start-up recovery settles the rest", signum)
                    break
                draining = True
                log.warning("signal %s: draining the requests in flight (a second signal stops at once)", signum)
                tg.start_soon(_drain_then_stop, gateway, tg.cancel_scope)
        tg.cancel_scope.cancel()


async def _drain_then_stop(gateway: RunningGateway, scope: anyio.CancelScope) -> None:
    try:
        await drain(gateway)
    finally:
        scope.cancel()


def _serve_command(args: argparse.Namespace) -> int:
    try:
        config = load_config(Path(args.config) if args.config else None)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"gateway: bad configuration: {problem}", flush=True)
        return 2
    workers = getattr(args, "workers", 1)
    try:
        role = WorkerRole.from_environment()
        refusal = refuse_workers(config, workers if role is None else role.slots)
    except ConfigError as exc:
        refusal = str(exc)
    if refusal is not None:
        print(f"gateway: cannot start: {refusal}", flush=True)
        return 2
    if workers > 1 and role is None:
        return run_supervisor(config, args, workers)
    try:
        anyio.run(_serve_until_signalled, config, role, backend=args.backend,
                  backend_options={"use_uvloop": True} if args.backend == "asyncio" else {})
    except Exception as exc:
        cause = _root_cause(exc)
        if isinstance(cause, ConfigError | SecurityError | OSError):
            # expected start-up failures (port in use, unreadable key store, bad LMK): one line, no trace
            print(f"gateway: cannot start: {type(cause).__name__}: {cause}", flush=True)
            return 1
        raise
    return 0


def _root_cause(exc: BaseException) -> BaseException:
    """The single exception inside (nested) task-group exception groups, or the group itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the gateway (terminals, host link, SAF, admin)")
    p.add_argument("--config", help="TOML file (default: built-in defaults + GATEWAY_* environment)")
    p.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio",
                   help="event loop (asyncio runs on uvloop)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="N gateway processes sharing the terminal port (SO_REUSEPORT), each with its own "
                        "event loop and host connection, under one supervisor that merges their metrics on "
                        "the admin port; N > 1 needs the PostgreSQL store ([store] url)")
    p.set_defaults(func=_serve_command)
