"""`gateway serve --workers N`: N gateway processes on one machine, each its own event loop, host
connection, journal connections and PostgreSQL instance id, under one supervising parent.

Why each choice:

- **SO_REUSEPORT, not one acceptor passing descriptors.** Every worker binds the terminal port itself
  (`TerminalServer.reuse_port`) and the kernel spreads new connections over the workers' listening
  sockets by a hash of the connection's addresses: no extra hop, no parent on the money path, no
  thundering herd on one shared accept queue, and a busy worker does not starve the others the way
  a shared epoll-woken socket lets the first waker take most connections. An acceptor passing each
  connection over a Unix socket (SCM_RIGHTS) costs two system calls and a context switch per
  connection in one process, which CUP terminals opening a connection per transaction would make a
  per-transaction cost and a single-core ceiling. The price of SO_REUSEPORT: the connections waiting
  in a worker's own accept queue when it dies are reset (no request was read from them, so no money
  moved; the terminal dials again). Linux only lets processes of the same user join the port.
- **Metrics: each worker keeps its own lock-free in-process metrics (`gateway.fastmetrics`), the
  parent merges at scrape time.** prometheus-client's multiprocess mode would put every increment
  through an mmap'd file value with a lock (several times the 0.13 µs of a fast-metrics observe, on
  every transaction) and cannot carry custom collectors or function gauges at all. Here a worker
  listens on a loopback ephemeral admin port; the parent's admin endpoint (the configured
  `[admin] listen`) fetches every worker's /metrics when it is scraped and answers one exposition:
  counters and histograms summed over the workers (the dashboards and alerts work unchanged), gauges
  per worker with a `worker` label (a sum of link states or start times means nothing). So that a
  worker's restart does not look like a counter reset of the sum, the parent keeps each worker's last
  scraped counts and carries a dead worker's forward; only what it counted after the last scrape is
  lost. `/workers` lists the workers' pids and admin ports, to look at one of them alone.
- **/healthz** (group liveness): 200 while at least one worker runs. **/readyz**: 200 once every
  worker has come up, while a worker runs, every running worker is ready and the group is not
  draining; the JSON names what is not, per worker. A worker being restarted does not make the group
  unready: the kernel sends new connections only to the listening sockets that exist.
- **Signals**: workers run in their own session, so a Ctrl-C reaches the parent only and the parent
  forwards it (a terminal's SIGINT to the whole process group would otherwise count as every worker's
  first signal twice: drain, then stop at once). The first SIGTERM/SIGINT drains every worker
  (`gateway.shutdown`), a second stops them at once; the parent exits 0 when every worker did.
  A worker whose parent dies (even SIGKILLed) sees its lifeline socket close and drains itself.
- **Restarts**: a worker that dies is restarted under the same instance id (so it recovers its own
  pending requests and SAF entries at start) after a back-off that doubles from RESTART_BACKOFF up to
  RESTART_BACKOFF_MAX, logged and counted (`gateway_worker_restarts_total{worker}`). More than
  MAX_RESTARTS restarts of one worker within RESTART_WINDOW seconds: the parent gives up, drains the
  group and exits 1 (a supervisor such as systemd sees a failure instead of a restart loop). A worker
  that fails at the group's first start stops the group at once (a configuration error, not a crash).
- **SQLite refuses N > 1**: its journal is one process's file.

Instance ids: `<[store] instance_id or host name>-w<slot>`, stable per slot across restarts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Final, cast

import anyio
import anyio.abc
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from gateway.config import ConfigError, GatewayConfig
from gateway.logs import WORKER_SLOT_ENV
from gateway.metrics import Metrics
from gateway.net.admin import AdminHandler, parse_request_line, render_response

log = logging.getLogger("gateway.workers")

MAX_WORKERS: Final = 64
#: seconds before the first restart of a dead worker; doubles per restart in a row, up to the max
RESTART_BACKOFF: Final = 0.5
RESTART_BACKOFF_MAX: Final = 30.0
#: a worker that ran this long before dying starts its back-off afresh
STABLE_AFTER: Final = 60.0
MAX_RESTARTS: Final = 5
RESTART_WINDOW: Final = 300.0
#: how long a worker may take to come up (migrations, recovery, host sign-on) before it counts as failed
START_TIMEOUT: Final = 120.0
#: a worker's /metrics or /readyz, fetched by the parent
FETCH_TIMEOUT: Final = 3.0
#: environment of a worker: its slot and the fd of its lifeline socket
SLOT_ENV: Final = WORKER_SLOT_ENV
LIFELINE_ENV: Final = "GATEWAY_WORKER_LIFELINE_FD"
INSTANCE_ENV: Final = "GATEWAY_STORE__INSTANCE_ID"
ADMIN_ENV: Final = "GATEWAY_ADMIN__LISTEN"
TRACE_ENV: Final = "GATEWAY_TRACE__PATH"
#: sample-name suffixes of the families whose values add up across processes
ADDITIVE_TYPES: Final = frozenset({"counter", "histogram", "summary"})


def refuse_workers(config: GatewayConfig, workers: int) -> str | None:
    """Why `--workers N` cannot run with this configuration, or None."""
    if not 1 <= workers <= MAX_WORKERS:
        return f"--workers: expected 1..{MAX_WORKERS}, got {workers}"
    if workers > 1 and config.store.url is None:
        return (f"--workers {workers} needs the PostgreSQL store: set [store] url = \"postgresql://...\" "
                f"(the SQLite journal at store.path = {str(config.store.path)!r}, the default store, belongs to "
                "one process; run one worker with it)")
    return None


def worker_instance_id(base: str, slot: int) -> str:
    suffix = f"-w{slot}"
    return base[: 64 - len(suffix)] + suffix


# --- metrics merging (pure) ---------------------------------------------------------------------------

SampleKey = tuple[str, str, tuple[tuple[str, str], ...]]  #: (family, sample name, sorted labels)


@dataclass(slots=True)
class Scrape:
    """One worker's exposition, split into what adds up across workers and what does not."""

    families: dict[str, tuple[str, str]] = field(default_factory=dict)  #: name -> (type, documentation)
    additive: dict[SampleKey, float] = field(default_factory=dict)
    gauges: list[tuple[SampleKey, float]] = field(default_factory=list)


def parse_scrape(text: str) -> Scrape:
    scrape = Scrape()
    parsed = list(text_string_to_metric_families(text))
    additive_names = {f.name for f in parsed if f.type in ADDITIVE_TYPES}
    for family in parsed:
        if family.type not in ADDITIVE_TYPES and family.name.endswith("_created") \
                and family.name.removesuffix("_created") in additive_names:
            continue  # a counter's creation time is neither a sum nor a gauge of the group
        scrape.families.setdefault(family.name, (family.type, family.documentation))
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
            if family.type in ADDITIVE_TYPES:
                scrape.additive[key] = scrape.additive.get(key, 0.0) + sample.value
            else:
                scrape.gauges.append((key, sample.value))
    return scrape


def merge_scrapes(retired: dict[SampleKey, float], counted: list[Scrape],
                  live_gauges: list[tuple[int, Scrape]]) -> list[Metric]:
    """The group's families: counters and histograms summed over `counted` (every worker's last good
    scrape) plus `retired` (what dead workers had counted), gauges of `live_gauges` with a `worker`
    label. Families come in the order the workers expose them."""
    families: dict[str, tuple[str, str]] = {}
    for scrape in counted + [s for _, s in live_gauges]:
        for name, meta in scrape.families.items():
            families.setdefault(name, meta)
    totals: dict[SampleKey, float] = dict(retired)
    for scrape in counted:
        for key, value in scrape.additive.items():
            totals[key] = totals.get(key, 0.0) + value
    out: dict[str, Metric] = {}
    for name, (kind, doc) in families.items():
        out[name] = Metric(name, doc, kind)
    for (fam, sample, labels), value in totals.items():
        if fam in out:
            out[fam].add_sample(sample, dict(labels), value)
    for slot, scrape in live_gauges:
        for (fam, sample, labels), value in scrape.gauges:
            if fam in out:
                out[fam].add_sample(sample, {**dict(labels), "worker": str(slot)}, value)
    return [m for m in out.values() if m.samples]


# --- the parent -------------------------------------------------------------------------------------


@dataclass(slots=True)
class WorkerSlot:
    index: int
    instance_id: str
    process: anyio.abc.Process | None = None
    admin_port: int | None = None
    up: bool = False  #: reported up (its gateway accepts terminals) and not yet exited
    started_at: float = 0.0
    restarts: int = 0
    recent: deque[float] = field(default_factory=deque)  #: times of recent restarts
    last_exit: int | None = None
    scrape: Scrape = field(default_factory=Scrape)  #: last good /metrics
    fresh: bool = False  #: `scrape` is from the current scrape round
    readiness: dict[str, object] | None = None  #: last /readyz body

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.returncode is None else None


class _GroupCollector(Collector):
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        sup = self.supervisor
        live = [(s.index, s.scrape) for s in sup.slots if s.fresh]
        yield from merge_scrapes(sup.retired, [s.scrape for s in sup.slots], live)


class GroupMetrics:
    """The parent's registry: the merged workers and the supervisor's own few series. Duck-types the
    part of `Metrics` the admin endpoint uses (`registry`, `admin_connections_shed`)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_GroupCollector(supervisor))
        self.workers = Gauge("gateway_workers", "Worker processes configured (serve --workers)",
                             registry=self.registry)
        self.worker_up = Gauge("gateway_worker_up", "1 while the worker process runs and has come up",
                               ["worker"], registry=self.registry)
        self.restarts = Counter("gateway_worker_restarts", "Worker processes restarted after dying",
                                ["worker"], registry=self.registry)
        self.scrape_failures = Counter("gateway_worker_scrape_failures",
                                       "Worker /metrics fetches that failed (its last counts were used)",
                                       ["worker"], registry=self.registry)
        self.admin_connections_shed = Counter("gateway_supervisor_admin_connections_shed",
                                              "Connections to the group's admin endpoint shed at its cap",
                                              registry=self.registry)


class GroupAdminHandler(AdminHandler):
    """The group's /metrics, /healthz, /readyz and /workers: each fetches from the workers first."""

    def __init__(self, supervisor: Supervisor) -> None:
        super().__init__(cast(Metrics, supervisor.metrics), {})
        self.supervisor = supervisor

    async def respond_async(self, head: bytes) -> bytes:
        try:
            method, path = parse_request_line(head)
        except Exception:  # malformed: the base answers it (400)
            return self.respond(head)
        if method not in ("GET", "HEAD"):
            return self.respond(head)
        head_only = method == "HEAD"
        sup = self.supervisor
        if path == "/metrics":
            await sup.scrape_all()
            return self.respond(head)
        if path == "/healthz":
            alive = sum(1 for s in sup.slots if s.pid is not None)
            text = f"{'ok' if alive else 'no worker running'}: {alive}/{len(sup.slots)} workers running\n"
            return render_response(200 if alive else 503, "text/plain; charset=utf-8", text.encode(),
                                   head_only=head_only)
        if path == "/readyz":
            status, body = await sup.readiness_report()
            return render_response(status, "application/json", body, head_only=head_only)
        if path == "/workers":
            return render_response(200, "application/json", sup.workers_report(), head_only=head_only)
        return self.respond(head)


async def fetch(port: int, path: str, timeout: float = FETCH_TIMEOUT) -> tuple[int, bytes]:
    """GET http://127.0.0.1:port/path (a worker's admin endpoint): status and body."""
    with anyio.fail_after(timeout):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            data = bytearray()
            try:
                async for chunk in stream:
                    data += chunk
            except anyio.BrokenResourceError:
                pass
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    try:
        return int(head.split(b" ")[1]), body
    except (IndexError, ValueError):
        raise OSError(f"not an HTTP answer from port {port}") from None


class Supervisor:
    def __init__(self, config: GatewayConfig, args: argparse.Namespace, workers: int, base_instance_id: str) -> None:
        self.config = config
        self.args = args
        self.slots = [WorkerSlot(i, worker_instance_id(base_instance_id, i)) for i in range(workers)]
        self.metrics = GroupMetrics(self)
        self.metrics.workers.set(workers)
        self.retired: dict[SampleKey, float] = {}
        self.draining = False
        self.exit_code = 0
        self._stop = anyio.Event()  #: set when the group is to stop (signal, gave up, failed start)
        self._all_up = anyio.Event()

    # --- the group's life

    async def run(self) -> int:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._forward_signals, signals)
                if self.config.admin.listen is not None:
                    await tg.start(self._serve_admin)
                for slot in self.slots:
                    tg.start_soon(self._keep_running, slot)
                tg.start_soon(self._log_when_up)
                await self._stop.wait()
                await self._stop_workers()
                tg.cancel_scope.cancel()
        return self.exit_code

    async def _log_when_up(self) -> None:
        await self._all_up.wait()
        log.info("worker group up: %d workers (%s), terminals on %s, group admin on %s", len(self.slots),
                 ", ".join(f"{s.instance_id} pid {s.pid}" for s in self.slots), self.config.terminal_side.listen,
                 self.config.admin.listen)

    async def _forward_signals(self, signals: AsyncIterator[int]) -> None:
        first = True
        async for signum in signals:
            if first:
                log.warning("signal %s: draining all %d workers (a second signal stops them at once)", signum,
                            len(self.slots))
                first = False
            else:
                log.warning("signal %s again: stopping the workers at once", signum)
            self.draining = True
            self._signal_all(signal.SIGTERM)
            self._stop.set()

    def _signal_all(self, signum: int) -> None:
        for slot in self.slots:
            if slot.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signum)

    async def _stop_workers(self) -> None:
        """After the stop: every worker drains (it got SIGTERM) within its bound, else it is told again
        (stop at once), and at last killed."""
        if not self.draining:  # gave up, or a failed start: the parent decided, not a signal
            self.draining = True
            self._signal_all(signal.SIGTERM)
        host, term = self.config.host, self.config.terminal_side
        bound = 2 * host.timeout + term.write_timeout + 10.0
        with anyio.move_on_after(bound):
            await self._all_exited()
            return
        log.error("workers still running %.0fs after the signal: stopping them at once", bound)
        self._signal_all(signal.SIGTERM)
        with anyio.move_on_after(10.0):
            await self._all_exited()
            return
        log.error("workers still running: killing them")
        self._signal_all(signal.SIGKILL)
        await self._all_exited()

    async def _all_exited(self) -> None:
        for slot in self.slots:
            if slot.process is not None:
                await slot.process.wait()
        # the slots' tasks see the exits; give them a moment to record the codes
        while any(s.process is not None and s.up for s in self.slots):
            await anyio.sleep(0.01)

    def _give_up(self, code: int) -> None:
        self.exit_code = max(self.exit_code, code)
        self._stop.set()

    # --- one worker slot

    async def _keep_running(self, slot: WorkerSlot) -> None:
        first = True
        delay = RESTART_BACKOFF
        while not self._stop.is_set():
            came_up, code = await self._run_once(slot, first)
            if self._stop.is_set():
                if code != 0:
                    log.error("worker %d (%s) exited with %s during the shutdown", slot.index, slot.instance_id,
                              _describe_exit(code))
                    self.exit_code = max(self.exit_code, 1)
                return
            if first and not came_up:
                log.error("worker %d (%s) could not start (%s): stopping the group", slot.index, slot.instance_id,
                          _describe_exit(code))
                self._give_up(1)
                return
            first = False
            now = time.monotonic()
            lived = now - slot.started_at
            if lived >= STABLE_AFTER:
                delay = RESTART_BACKOFF
            while slot.recent and slot.recent[0] < now - RESTART_WINDOW:
                slot.recent.popleft()
            if len(slot.recent) >= MAX_RESTARTS:
                log.error("worker %d (%s) died again (%s): %d restarts within %.0fs, giving up on the group",
                          slot.index, slot.instance_id, _describe_exit(code), len(slot.recent), RESTART_WINDOW)
                self._give_up(1)
                return
            log.error("worker %d (%s) died after %.1fs (%s): restarting it in %.1fs", slot.index, slot.instance_id,
                      lived, _describe_exit(code), delay)
            with anyio.move_on_after(delay):
                await self._stop.wait()
            if self._stop.is_set():
                return
            slot.recent.append(time.monotonic())
            slot.restarts += 1
            self.metrics.restarts.labels(str(slot.index)).inc()
            delay = min(RESTART_BACKOFF_MAX, delay * 2)

    async def _run_once(self, slot: WorkerSlot, first: bool) -> tuple[bool, int]:
        """Start the worker, wait for its report, then for its exit: (came up, exit code)."""
        parent_end, child_end = socket.socketpair()
        came_up = False
        try:
            env = self._worker_environment(slot, child_end.fileno())
            slot.process = await anyio.open_process(
                self._worker_command(), stdin=subprocess.DEVNULL, stdout=None, stderr=None, env=env,
                pass_fds=(child_end.fileno(),), start_new_session=True)
            child_end.close()
            slot.started_at = time.monotonic()
            slot.fresh = False
            stream = await anyio.abc.UNIXSocketStream.from_socket(parent_end)
            parent_end = None  # type: ignore[assignment]  # owned by the stream now
            async with stream, anyio.create_task_group() as tg:
                came_up = await self._wait_report(slot, stream, tg)
                code = await slot.process.wait()
                tg.cancel_scope.cancel()
        finally:
            child_end.close()
            if parent_end is not None:
                parent_end.close()
        self._retire(slot)
        slot.last_exit = code
        return came_up, code

    async def _wait_report(self, slot: WorkerSlot, stream: anyio.abc.SocketStream, tg: anyio.abc.TaskGroup) -> bool:
        """The worker writes one JSON line when its gateway is up; the stream closes if it dies first."""
        process = slot.process
        assert process is not None
        line = bytearray()
        with anyio.move_on_after(START_TIMEOUT) as scope:
            try:
                while b"\n" not in line:
                    line += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return False
        if scope.cancelled_caught:
            log.error("worker %d (%s) did not come up within %.0fs: killing it", slot.index, slot.instance_id,
                      START_TIMEOUT)
            with _quiet():
                process.kill()
            return False
        report = json.loads(line.partition(b"\n")[0])
        slot.admin_port = report.get("admin_port")
        slot.up = True
        self.metrics.worker_up.labels(str(slot.index)).set(1)
        log.info("worker %d up: pid %d, instance id %s, admin port %s", slot.index, process.pid, slot.instance_id,
                 slot.admin_port)
        if all(s.up for s in self.slots):
            self._all_up.set()
        tg.start_soon(_drain_stream, stream)  # keeps our end open: the worker's lifeline
        return True

    def _retire(self, slot: WorkerSlot) -> None:
        """The worker is gone: its last scraped counts go on counting in the group's sums."""
        for key, value in slot.scrape.additive.items():
            self.retired[key] = self.retired.get(key, 0.0) + value
        slot.scrape = Scrape()
        slot.fresh = False
        slot.up = False
        slot.admin_port = None
        slot.readiness = None
        self.metrics.worker_up.labels(str(slot.index)).set(0)

    def _worker_command(self) -> list[str]:
        args = self.args
        command = [sys.executable, "-m", "gateway.cli"]
        if getattr(args, "verbose", 0):
            command.append("-" + "v" * int(args.verbose))
        if getattr(args, "log_format", None):
            command += ["--log-format", args.log_format]
        command += ["serve", "--backend", args.backend]
        if args.config:
            command += ["--config", args.config]
        return command

    def _worker_environment(self, slot: WorkerSlot, lifeline_fd: int) -> dict[str, str]:
        env = dict(os.environ)
        env[SLOT_ENV] = f"{slot.index}/{len(self.slots)}"
        env[LIFELINE_ENV] = str(lifeline_fd)
        env[INSTANCE_ENV] = slot.instance_id
        if self.config.admin.listen is not None:
            env[ADMIN_ENV] = "127.0.0.1:0"  # the group's endpoint is the parent's; workers' stay loopback
        if self.config.trace.path is not None:
            trace = self.config.trace.path
            env[TRACE_ENV] = str(trace.with_name(f"{trace.name}.w{slot.index}"))
        return env

    # --- the group's admin endpoint

    async def _serve_admin(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        listen = self.config.admin.listen
        assert listen is not None
        handler = GroupAdminHandler(self)
        listener = await anyio.create_tcp_listener(local_host=listen.host, local_port=listen.port)
        log.info("worker group admin endpoint on http://%s/metrics (/workers lists the workers)", listen)
        async with listener:
            task_status.started()
            await listener.serve(handler.handle)

    async def scrape_all(self) -> None:
        async def one(slot: WorkerSlot) -> None:
            port = slot.admin_port
            slot.fresh = False
            if port is None:
                return
            try:
                status, body = await fetch(port, "/metrics")
                if status != 200:
                    raise OSError(f"HTTP {status}")
                scrape = parse_scrape(body.decode())
            except (OSError, TimeoutError, ValueError) as exc:
                self.metrics.scrape_failures.labels(str(slot.index)).inc()
                log.warning("worker %d: /metrics failed (%s); its last counts are used", slot.index, exc)
                return
            if slot.admin_port == port:  # not restarted meanwhile
                slot.scrape, slot.fresh = scrape, True

        async with anyio.create_task_group() as tg:
            for slot in self.slots:
                tg.start_soon(one, slot)

    async def readiness_report(self) -> tuple[int, bytes]:
        async def one(slot: WorkerSlot) -> None:
            slot.readiness = None
            if slot.admin_port is None:
                return
            try:
                _, body = await fetch(slot.admin_port, "/readyz")
                slot.readiness = json.loads(body)
            except (OSError, TimeoutError, ValueError) as exc:
                slot.readiness = {"ready": False, "not_ready": [f"unreachable: {type(exc).__name__}"]}

        async with anyio.create_task_group() as tg:
            for slot in self.slots:
                tg.start_soon(one, slot)
        not_ready: list[str] = []
        workers: dict[str, object] = {}
        running = 0
        for slot in self.slots:
            entry: dict[str, object] = {"pid": slot.pid, "instance_id": slot.instance_id, "up": slot.up}
            if slot.up and slot.readiness is not None:
                running += 1
                entry["ready"] = bool(slot.readiness.get("ready"))
                entry["not_ready"] = slot.readiness.get("not_ready", [])
                if not entry["ready"]:
                    not_ready.append(f"worker {slot.index}: {', '.join(map(str, entry['not_ready']))}")  # type: ignore[call-overload]
            else:
                entry["ready"] = False
            workers[str(slot.index)] = entry
        if not self._all_up.is_set():
            not_ready.append("starting")  # not every worker has come up yet (once they have, a restart is not this)
        if self.draining:
            not_ready.append("not_draining")
        if running == 0:
            not_ready.append("no worker up")
        body = {"ready": not not_ready, "not_ready": not_ready, "workers": workers,
                "running": running, "configured": len(self.slots)}
        return (503 if not_ready else 200), (json.dumps(body, sort_keys=True) + "\n").encode()

    def workers_report(self) -> bytes:
        rows = [{"worker": s.index, "instance_id": s.instance_id, "pid": s.pid, "up": s.up,
                 "admin_port": s.admin_port, "restarts": s.restarts, "last_exit": s.last_exit} for s in self.slots]
        return (json.dumps({"workers": rows, "draining": self.draining}, sort_keys=True) + "\n").encode()


async def _drain_stream(stream: anyio.abc.SocketStream) -> None:
    with _quiet():
        async for _ in stream:
            pass


def _quiet() -> contextlib.suppress:
    """Suppress the errors of talking to a process that has just gone."""
    return contextlib.suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def run_supervisor(config: GatewayConfig, args: argparse.Namespace, workers: int) -> int:
    """`gateway serve --workers N` with N > 1 (the caller checked `refuse_workers`)."""
    from gateway.serve import pan_hash_key
    from gateway.store.postgres import default_instance_id

    pan_hash_key(config)  # made once here, not raced for by N workers starting at once
    base = config.store.instance_id or default_instance_id()
    supervisor = Supervisor(config, args, workers, base)
    return anyio.run(supervisor.run, backend=args.backend,
                     backend_options={"use_uvloop": True} if args.backend == "asyncio" else {})


# --- the worker's side ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """What a worker process knows of its group (from its environment)."""

    slot: int
    slots: int
    lifeline_fd: int

    @classmethod
    def from_environment(cls, environ: dict[str, str] | os._Environ[str] | None = None) -> WorkerRole | None:
        env = os.environ if environ is None else environ
        text, fd = env.get(SLOT_ENV), env.get(LIFELINE_ENV)
        if not text or not fd:
            return None
        slot, _, slots = text.partition("/")
        try:
            return cls(int(slot), int(slots), int(fd))
        except ValueError:
            raise ConfigError(f"{SLOT_ENV}/{LIFELINE_ENV}: malformed ({text!r}, {fd!r})") from None

    async def report_up(self, admin_port: int | None) -> None:
        """Tell the parent the gateway is up, then hold the lifeline: when the parent goes (even killed),
        the socket closes and this worker drains as on SIGTERM."""
        sock = socket.socket(fileno=self.lifeline_fd)
        stream = await anyio.abc.UNIXSocketStream.from_socket(sock)
        async with stream:
            await stream.send(json.dumps({"admin_port": admin_port, "pid": os.getpid()}).encode() + b"\n")
            with _quiet():
                async for _ in stream:
                    pass
        log.warning("worker %d: the supervising parent is gone: draining", self.slot)
        os.kill(os.getpid(), signal.SIGTERM)
