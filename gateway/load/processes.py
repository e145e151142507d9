"""Several load processes: one anyio loop cannot drive much more than ~20k requests/s, so the rate,
count and sessions are split over K worker processes (multiprocessing, spawn) and their HDR
histograms and per-second series are merged afterwards.

Each worker rebuilds its driver from the factory's import reference and the options dict, connects and
prepares its sessions, then waits on a shared barrier, so every worker's clock starts together. Open-loop
workers run interleaved schedules (worker j is offset by j / total rate), so together they keep the
total rate's spacing. Progress lines are merged per second in the parent.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import multiprocessing.synchronize
import queue
import threading
import time
import traceback
from collections.abc import Mapping
from typing import Any

import anyio

from gateway.load.config import LoadConfig
from gateway.load.driver import DriverFactory, LoadError, factory_reference, lookup_factory, resolve_reference
from gateway.load.hdr import SecondStats, decode_into, encode
from gateway.load.report import LoadReport, Partial, merge
from gateway.load.runner import LoadRunner, ProgressPrinter, Tick, run_load

log = logging.getLogger("gateway.load")

#: how long workers may take to start and connect before the run is abandoned
START_TIMEOUT = 60.0


def split_config(config: LoadConfig, processes: int) -> list[LoadConfig]:
    """Each worker's share: rate / K, count and sessions split as evenly as whole numbers allow."""
    if processes < 1:
        raise LoadError("processes must be at least 1")
    if config.concurrency is not None and config.concurrency < processes:
        raise LoadError(f"concurrency {config.concurrency} cannot be split over {processes} processes")
    if config.count is not None and config.count < processes:
        raise LoadError(f"count {config.count} cannot be split over {processes} processes")
    sessions = config.session_count
    if config.concurrency is None and sessions < processes:
        raise LoadError(f"{sessions} sessions cannot be split over {processes} processes")

    def share(total: int, j: int) -> int:
        return total // processes + (1 if j < total % processes else 0)

    shares = []
    for j in range(processes):
        changes: dict[str, Any] = {}
        if config.rate is not None:
            changes["rate"] = config.rate / processes
            changes["phase"] = j / config.rate  # interleave: together the workers keep the total spacing
            changes["sessions"] = share(sessions, j)
        else:
            assert config.concurrency is not None
            changes["concurrency"] = share(config.concurrency, j)
        if config.count is not None:
            changes["count"] = share(config.count, j)
        if config.seed is not None:
            changes["seed"] = config.seed + j
        shares.append(config.replace(**changes))
    return shares


def worker_options(options: Mapping[str, Any], index: int, count: int) -> dict[str, Any]:
    """The options one worker's driver factory gets: `worker_index` and `worker_count` added, so a
    driver can give each process its own identity space (e.g. distinct terminal ids per process)."""
    return {**options, "worker_index": index, "worker_count": count}


def _worker_main(index: int, factory_ref: str, options: dict[str, Any], config: LoadConfig, backend: str,
                 barrier: multiprocessing.synchronize.Barrier, results: Any, ticks: Any | None) -> None:
    """Entry point of a worker process: run its share, put ("ok", index, Partial) or ("error", ...)."""
    try:
        driver = resolve_reference(factory_ref)(options)

        async def wait_for_everyone() -> None:
            await anyio.to_thread.run_sync(barrier.wait, START_TIMEOUT)

        def send_tick(tick: Tick) -> None:
            if ticks is not None and tick.second is not None:
                stats = tick.stats or SecondStats()
                ticks.put((index, tick.second, stats.count, stats.errors, encode(stats.hist), tick.in_flight))

        async def main() -> Partial:
            runner = LoadRunner(driver, config, progress=send_tick if ticks is not None else None,
                                before_start=wait_for_everyone)
            return await runner.run()

        backend_options = {"use_uvloop": True} if backend == "asyncio" else {}
        partial = anyio.run(main, backend=backend, backend_options=backend_options)
        results.put(("ok", index, partial))
    except threading.BrokenBarrierError:
        results.put(("aborted", index, "another worker failed before the start"))
    except BaseException as exc:
        barrier.abort()  # never leave the others waiting for a worker that is gone
        results.put(("error", index, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}"))


class _TickMerger:
    """Prints a merged progress line once every worker has reported a second."""

    def __init__(self, processes: int, printer: ProgressPrinter) -> None:
        self.processes = processes
        self.printer = printer
        self.pending: dict[int, list[Any]] = {}

    def add(self, item: tuple[int, int, int, int, str, int]) -> None:
        _, second, count, errors, encoded, in_flight = item
        slot = self.pending.setdefault(second, [0, SecondStats(), 0])
        slot[0] += 1
        stats: SecondStats = slot[1]
        stats.count += count
        stats.errors += errors
        decode_into(stats.hist, encoded)
        slot[2] += in_flight
        if slot[0] == self.processes:
            del self.pending[second]
            self.printer(Tick(second, stats, slot[2], 0))

    def flush(self) -> None:
        """At the end: print the seconds not every worker reported (a worker may end a second early)."""
        for second in sorted(self.pending):
            _, stats, in_flight = self.pending.pop(second)
            self.printer(Tick(second, stats, in_flight, 0))


def run_load_processes(driver: str | DriverFactory, options: Mapping[str, Any], config: LoadConfig,
                       processes: int, *, backend: str = "asyncio", progress: bool = False) -> LoadReport:
    """Run `config` split over `processes` worker processes and merge their results.

    `driver` is a registered driver name, a "module:function" reference or a module-level factory;
    `options` is what the factory receives (must be picklable). With `processes == 1` the run happens in
    this process (no spawn cost)."""
    if isinstance(driver, str):
        factory, ref = lookup_factory(driver)
    else:
        factory, ref = driver, factory_reference(driver)
    if processes == 1:
        built = factory(worker_options(options, 0, 1))
        backend_options = {"use_uvloop": True} if backend == "asyncio" else {}
        return anyio.run(lambda: run_load(built, config, progress=progress), backend=backend,
                         backend_options=backend_options)
    shares = split_config(config, processes)
    factory(worker_options(options, 0, processes))  # fail fast here on bad options, not in K workers
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes)
    results = ctx.Queue()
    ticks = ctx.Queue() if progress else None
    merger = _TickMerger(processes, ProgressPrinter()) if progress else None
    workers = [
        ctx.Process(target=_worker_main, name=f"gateway-load-{j}", daemon=True,
                    args=(j, ref, worker_options(options, j, processes), share, backend, barrier, results,
                          ticks))
        for j, share in enumerate(shares)
    ]
    for w in workers:
        w.start()
    run_time = config.warmup + (config.duration if config.duration is not None else math.inf)
    deadline = time.monotonic() + START_TIMEOUT + run_time + config.request_timeout + 30
    partials: dict[int, Partial] = {}
    failures: list[str] = []
    aborted = 0
    try:
        while len(partials) + len(failures) + aborted < processes:
            if ticks is not None and merger is not None:
                _drain(ticks, merger)
            try:
                status, index, payload = results.get(timeout=0.2)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise LoadError("load workers did not finish in time") from None
                dead = [w for w in workers if not w.is_alive() and w.exitcode not in (0, None)]
                if dead and results.empty():
                    time.sleep(0.5)  # a result put just before exiting may still be in flight
                    if results.empty():
                        raise LoadError(f"load worker {dead[0].name} died (exit code {dead[0].exitcode})") \
                            from None
                continue
            if status == "ok":
                partials[index] = payload
            elif status == "aborted":
                aborted += 1
            else:
                failures.append(f"worker {index}: {payload}")
        if ticks is not None and merger is not None:
            _drain(ticks, merger, linger=0.2)  # the last ticks travel on another queue than the results
            merger.flush()
    finally:
        for w in workers:
            w.join(timeout=5)
            if w.is_alive():
                w.terminate()  # this worker is ours (started above); end it by its own handle
                w.join(timeout=5)
    if aborted and not failures:
        failures.append("worker: start barrier broken")
    if failures:
        for failure in failures:
            log.debug("%s", failure)
        raise LoadError(f"load {failures[0].splitlines()[0]}")
    return merge([partials[j] for j in range(processes)], config, processes=processes)


def _drain(ticks: Any, merger: _TickMerger, linger: float = 0.0) -> None:
    while True:
        try:
            merger.add(ticks.get(timeout=linger) if linger else ticks.get_nowait())
        except queue.Empty:
            return

