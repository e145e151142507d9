"""End-to-end throughput of the gateway against its floors, in one run on this machine.

    python bench/gateway.py [--quick] [--rss-count N] [--json PATH] [--plots DIR] [--profile SECONDS]

Three systems are driven by the same load generator (`gateway.load.run_load`, open loop, 64 sessions,
one per terminal connection) with the same message: a CUP POS 0200 purchase (PIN block, TDK-encrypted
track 2, MAC) with TPDU + header framing, built by `bench/common.py` the way a terminal builds it:

1. echo: `python -m gateway.load.echo`, the raw framed echo (I/O floor). Its "len2" framing is
   byte-for-byte the CUP framing (the CUP length prefix counts TPDU + header + body), so it echoes the
   identical frame; the session checks the echoed bytes.
2. bare relay: `bench/relay.py relay` in front of `bench/relay.py codec-host` (codec floor: decode and
   re-encode each way, nothing else); the session decodes the 0210 and checks MTI, STAN and 39.
3. full gateway: `gateway serve` (MAC verify + generate, PIN translate, track decrypt, journal with
   group commit on a SQLite file with synchronous=FULL, metrics on) in front of `gateway sim-host`
   (same ZMK; terminals BT000001.. registered with the TMK the sessions know); sessions sign in first,
   then check MTI, STAN, 39 = 00 and the answer's MAC.

For each: a closed-loop probe (64 in flight) gives the saturation rate P; then open-loop steps at fixed
fractions of P; the first step with p99 >= 50 ms, any error or an achieved rate under 95 % of its target
ends the search (then, in the full run, one bisection step between the last pass and that failure). The
maximum sustainable rate is the highest passing target. Steps are `warmup` + `duration` seconds and
bounded in number. Every system is up for the whole search and the searches take turns, one step
each (probe 1, probe 2, probe 3, step 1, step 2, step 3, ...): this machine is shared and its speed
drifts by tens of percent over minutes, so measuring one system after the other would put that drift
into the ratios.

Also measured: the gateway with metrics off (admin.metrics = false, so `NullMetrics`) and with an
in-memory journal (`run_gateway(durable=False)` through `bench/common.py`'s launcher: `gateway serve`
has no such switch), each at its own maximum and, in interleaved rounds together with the bare relay,
at 50 % and 100 % of the full gateway's maximum (CPU time per transaction at one common rate is the
sharp comparison there; the full gateway's p50/p99 at 50 % come from these rounds); a fresh full
gateway's RSS (VmRSS, VmHWM from /proc/PID/status) sampled every fifth of `--rss-count` transactions;
optionally a py-spy (or cProfile) profile of the gateway.

CPU time per transaction of every process (from /proc/PID/stat over the steady part of a step) is
reported next to each rate: with two cores, the load generator and the upstream host share one core
while the system under test has the other (pinned with sched_setaffinity), so the figures say which
side ran out of CPU. The machine may be shared: before every step the bench waits (boundedly) for
other work to stop, reports the other work seen during each step, and repeats once a failing step that
other work disturbed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository first: `gateway` is the package

from common import (
    BENCH_CARD,
    MERCHANT_ID,
    CupFrameDriver,
    Mode,
    Service,
    Services,
    children,
    cpu_seconds,
    free_port,
    machine_busy_seconds,
    main_thread_cpu_seconds,
    memory_kb,
    own_working_keys,
    purchase_body,
    wait_ready,
    write_gateway_config,
    write_host_config,
)

from gateway.iso.build import TerminalIdent
from gateway.iso.codec import Codec
from gateway.iso.framing import ENVELOPE_LEN
from gateway.iso.spec import load_dialect
from gateway.load import LoadConfig, LoadError, LoadReport, run_load
from gateway.load.hdr import run_histogram, summary_ms
from gateway.load.runner import Tick
from gateway.security.algorithms import generate_key

#: the parts of a run, in order (`--only` picks some)
PARTS = ("echo", "relay", "gateway", "variants", "rss")
#: every system, in the order of the tables
SYSTEMS = ("echo", "codec_echo", "relay", "gateway", "gateway_nometrics", "gateway_memory", "gateway_trace")
P99_LIMIT_MS = 50.0
MIN_ACHIEVED = 0.95
SESSIONS = 64
#: the common rates of the metrics / journal comparisons: this fraction of the full gateway's maximum,
#: and the maximum itself
SAME_RATE_FRACTION = 0.5
#: the RSS run's rate, as a fraction of the full gateway's maximum (sustainable, and 100k fit the budget)
RSS_RATE_FRACTION = 0.8
RSS_PHASES = 5
#: CPU time of other work on the machine (not our processes) above this share of one core marks a step
#: as disturbed; a disturbed step that fails is repeated once
DISTURBED = 0.2
MACHINE = "machine"
#: seconds of each look at the machine's load before a run
QUIET_PROBE = 0.3
#: closed-loop probe of the gateway: requests per second to build ahead for (more are built on the fly)
PROBE_RATE_GUESS = 3000.0
OTHER = "other"
PY = sys.executable


@dataclass(frozen=True)
class Plan:
    warmup: float
    duration: float
    probe_warmup: float
    probe_duration: float
    #: open-loop steps as fractions of the closed-loop probe's rate
    fractions: tuple[float, ...]
    refine: int
    rss_count: int
    #: seconds the whole run may wait for other work on the machine to stop
    quiet_wait: float
    #: interleaved rounds of the metrics / journal comparison, and the measured seconds of each
    compare_rounds: int
    compare_duration: float


FULL = Plan(warmup=1.0, duration=4.0, probe_warmup=0.5, probe_duration=2.0,
            fractions=(0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3), refine=1, rss_count=100_000,
            quiet_wait=60.0, compare_rounds=4, compare_duration=4.0)
QUICK = Plan(warmup=0.5, duration=1.5, probe_warmup=0.5, probe_duration=1.0,
             fractions=(0.6, 0.8, 1.0, 1.2), refine=0, rss_count=10_000, quiet_wait=20.0,
             compare_rounds=1, compare_duration=2.0)


@dataclass
class Target:
    """A system under test as the load generator sees it."""

    key: str
    label: str
    mode: Mode
    port: int
    sut: Service
    upstream: Service | None = None
    services: list[Service] = field(default_factory=list)


@dataclass
class Step:
    kind: str  #: "open" or "closed"
    rate: float | None  #: open loop: target rate
    achieved: float
    requests: int
    errors: dict[str, int]
    p50: float | None
    p99: float | None
    p999: float | None
    max: float | None
    send_lag_ms: float | None
    passed: bool | None
    #: CPU µs per transaction and CPU utilisation (1.0 = one core) by process: load, sut, upstream
    cpu_us: dict[str, float]
    util: dict[str, float]
    note: str = ""

    @property
    def disturbed(self) -> bool:
        return self.util.get(OTHER, 0.0) > DISTURBED

    def line(self) -> str:
        target = f"target {self.rate:7.0f}/s" if self.rate is not None else f"closed {SESSIONS} in flight"
        lat = "p50 -  p99 -" if self.p99 is None else f"p50 {self.p50:7.2f} ms  p99 {self.p99:7.2f} ms"
        cpu = "  ".join(f"{k} {self.cpu_us[k]:5.0f}µs/{self.util[k]:4.0%}" for k in self.cpu_us)
        other = self.util.get(OTHER, 0.0)
        cpu += f"  other work {other:4.0%}" + (" DISTURBED" if self.disturbed else "")
        verdict = "" if self.passed is None else ("  pass" if self.passed else "  FAIL")
        errs = f"  errors {sum(self.errors.values())} {dict(self.errors)}" if self.errors else ""
        return (f"    {target}  achieved {self.achieved:7.0f}/s  {lat}  lag {self.send_lag_ms or 0:6.2f} ms  "
                f"[cpu/txn, util: {cpu}]{errs}{verdict}{self.note}")


class MaxSearch:
    """One target's search for its maximum sustainable rate, a step at a time: open-loop steps at
    `plan.fractions` of the closed-loop probe's rate until the first failure; if even the first fails,
    down by 0.6 (at most 3 times); then `plan.refine` bisections between the last pass and the failure
    while they are more than 4 % apart. The highest passing rate is the maximum."""

    DESCENTS = 3

    def __init__(self, plan: Plan, probe: Step) -> None:
        self.plan = plan
        self.probe = probe
        self.steps: list[Step] = []
        self.good: Step | None = None
        self.bad: Step | None = None
        self.good_report: LoadReport | None = None
        #: why the search stopped early (a process of the system died), None when it ran its course
        self.error: str | None = None
        self._climbed = 0
        self._descents = 0
        self._refines = 0

    @property
    def max_rate(self) -> float:
        return self.good.rate if self.good is not None and self.good.rate is not None else 0.0

    def next_rate(self) -> float | None:
        """The next step's target rate; None when the search is over."""
        plan, peak = self.plan, self.probe.achieved
        if self.bad is None and self._climbed < len(plan.fractions):
            return nice_rate(peak * plan.fractions[self._climbed])
        if self.good is None:
            if self._descents < self.DESCENTS:
                return nice_rate(peak * plan.fractions[0] * 0.6 ** (self._descents + 1))
            return None
        good, bad = self.good.rate, self.bad.rate if self.bad is not None else None
        if self._refines < plan.refine and good is not None and bad is not None and (bad - good) / bad >= 0.04:
            return nice_rate((good + bad) / 2)
        return None

    def record(self, report: LoadReport | None, step: Step) -> None:
        if self.bad is None and self._climbed < len(self.plan.fractions):
            self._climbed += 1
        elif self.good is None:
            self._descents += 1
        else:
            self._refines += 1
        self.steps.append(step)
        if step.passed:
            self.good, self.good_report = step, report
        else:
            self.bad = step


class CpuSampler:
    """Progress sink of `run_load`: samples the CPU time of each process at every measured second, so
    CPU per transaction is taken over the steady part of a run (warm-up and connect excluded)."""

    def __init__(self, processes: dict[str, int], threads: dict[str, int]) -> None:
        self.processes = processes
        self.threads = threads  #: name → pid whose main thread is sampled separately
        self.samples: list[tuple[float, dict[str, float], int]] = []
        self.completed = 0
        self.warmup_completions = 0

    def read(self) -> dict[str, float]:
        out = {name: cpu_seconds(pid) for name, pid in self.processes.items()}
        out.update({name: main_thread_cpu_seconds(pid) for name, pid in self.threads.items()})
        out[MACHINE] = machine_busy_seconds()
        return out

    def __call__(self, tick: Tick) -> None:
        self.warmup_completions = tick.warmup_completions
        if tick.second is None:
            return
        self.completed += tick.stats.count if tick.stats is not None else 0
        self.samples.append((time.perf_counter(), self.read(), self.completed))

    def per_transaction(self, whole: tuple[float, dict[str, float], float, dict[str, float], int]
                        ) -> tuple[dict[str, float], dict[str, float]]:
        """(CPU µs per transaction, utilisation) by name; over the measured seconds when there are at
        least two samples, else over the whole run (`whole`: t0, cpu0, t1, cpu1, transactions)."""
        if len(self.samples) >= 2 and self.samples[-1][2] > self.samples[0][2]:
            (t0, c0, n0), (t1, c1, n1) = self.samples[0], self.samples[-1]
        else:
            t0, c0, t1, c1, n1 = whole
            n0 = 0
        n = max(1, n1 - n0)
        wall = max(1e-9, t1 - t0)
        ours = sum(c1[k] - c0[k] for k in self.processes)
        other = max(0.0, (c1[MACHINE] - c0[MACHINE]) - ours)
        keys = [k for k in c0 if k != MACHINE]
        cpu_us = {k: (c1[k] - c0[k]) / n * 1e6 for k in keys}
        util = {k: (c1[k] - c0[k]) / wall for k in keys}
        util[OTHER] = other / wall
        return cpu_us, util


class Bench:
    def __init__(self, plan: Plan, services: Services, workdir: Path, sut_cpus: set[int] | None,
                 other_cpus: set[int] | None, log: Callable[[str], None]) -> None:
        self.plan = plan
        self.services = services
        self.workdir = workdir
        self.sut_cpus = sut_cpus
        self.other_cpus = other_cpus
        self.log = log
        self._batch = 0
        self.zmk = generate_key(16)
        self.host_config = workdir / "host.toml"
        write_host_config(self.host_config)
        self.reports: dict[str, LoadReport] = {}
        self.steps_run: list[Step] = []
        self.quiet_budget = plan.quiet_wait
        self.waited = 0.0

    # --- systems ---------------------------------------------------------------------------------------

    def start_echo(self) -> Target:
        echo, m = self.services.start("echo server", [PY, "-m", "gateway.load.echo", "--port", "0"],
                                      cpus=self.sut_cpus, ready=r"^port (\d+)")
        assert m is not None
        return Target("echo", "1 raw framed echo (I/O floor)", "echo", int(m.group(1)), echo, None, [echo])

    def start_codec_echo(self) -> Target:
        echo, m = self.services.start("codec echo server", [PY, "bench/codec_echo.py", "serve", "--codec", "compiled",
                                                             "--port", "0"], cpus=self.sut_cpus, ready=r"^port (\d+)")
        assert m is not None
        return Target("codec_echo", "1b codec echo (compiled codec)", "codec_echo", int(m.group(1)), echo, None,
                      [echo])

    def start_relay(self) -> Target:
        host, m = self.services.start("codec host", [PY, "bench/relay.py", "codec-host"], cpus=self.other_cpus,
                                      ready=r"^port (\d+)")
        assert m is not None
        relay, m = self.services.start("bare relay", [PY, "bench/relay.py", "relay", "--upstream",
                                                      f"127.0.0.1:{m.group(1)}"], cpus=self.sut_cpus,
                                       ready=r"^port (\d+)")
        assert m is not None
        return Target("relay", "2 bare relay (codec floor)", "relay", int(m.group(1)), relay, host, [relay, host])

    def start_gateway(self, key: str, label: str, *, metrics: bool = True, memory: bool = False,
                      trace: bool = False, profile: Path | None = None) -> Target:
        host, m = self.services.start(f"sim-host for {key}", [
            PY, "-m", "gateway.cli", "sim-host", "--listen", "127.0.0.1:0", "--config", str(self.host_config),
            "--zmk", self.zmk.hex().upper()], cpus=self.other_cpus, ready=r"listening on 127\.0\.0\.1:(\d+)")
        assert m is not None
        terminal_port, admin_port = free_port(), free_port()
        config = self.workdir / f"{key}.toml"
        write_gateway_config(config, terminal_port=terminal_port, admin_port=admin_port, host_port=int(m.group(1)),
                             zmk=self.zmk, journal=self.workdir / f"{key}.db", metrics=metrics, terminals=SESSIONS,
                             trace=self.workdir / f"{key}.trace.jsonl" if trace else None)
        if memory or profile is not None:
            argv = [PY, "bench/common.py", "gateway", "--config", str(config)]
            argv += ["--memory"] if memory else []
            argv += ["--profile", str(profile)] if profile is not None else []
        else:
            argv = [PY, "-m", "gateway.cli", "serve", "--config", str(config)]
        gateway, _ = self.services.start(key, argv, cpus=self.sut_cpus)
        wait_ready(gateway, admin_port)
        return Target(key, label, "gateway", terminal_port, gateway, host, [gateway, host])

    def stop(self, target: Target) -> None:
        for service in target.services:
            self.services.stop(service)

    # --- one load run ----------------------------------------------------------------------------------

    def wait_quiet(self) -> None:
        """Before a run (our processes idle): wait while other work keeps the machine busy, within the
        run's waiting budget. The machine may be shared; what was waited and what still disturbed a
        step is reported."""
        logged = False
        while self.quiet_budget > 0:
            t0, b0 = time.perf_counter(), machine_busy_seconds()
            time.sleep(QUIET_PROBE)
            busy = (machine_busy_seconds() - b0) / (time.perf_counter() - t0)
            if busy <= DISTURBED:
                return
            self.waited += QUIET_PROBE
            self.quiet_budget -= QUIET_PROBE
            if not logged:
                self.log(f"    (other work keeps {busy:.0%} of a core busy: waiting for it, at most "
                         f"{self.quiet_budget:.0f} s more in this run)")
                logged = True

    def frames_for(self, target: Target, config: LoadConfig) -> int:
        """Requests each gateway session builds ahead: its share of the run, with room to spare."""
        if target.mode != "gateway":
            return 0
        rate = config.rate if config.rate is not None else PROBE_RATE_GUESS
        total = (config.count or 0) + rate * (config.warmup + (config.duration or 0.0))
        return math.ceil(total / SESSIONS * 1.5) + 8

    def sampler_for(self, target: Target) -> CpuSampler:
        """What a run's CPU figures are taken of: the load generator (this process), the system under
        test (and its event-loop thread), the upstream host."""
        processes = {"load": os.getpid(), "sut": target.sut.pid}
        if target.upstream is not None:
            processes["upstream"] = target.upstream.pid
        for n, child in enumerate(children(target.sut.pid)):  # a recording gateway's trace writer
            processes["writer" if n == 0 else f"writer{n}"] = child
        threads = {"sut_loop": target.sut.pid} if target.mode == "gateway" else {}
        return CpuSampler(processes, threads)

    def run(self, target: Target, config: LoadConfig) -> tuple[LoadReport, Step]:
        self.wait_quiet()
        self._batch += 1  # a new batch for every run: STANs restart at 1, (terminal, batch, STAN) stays unique
        driver = CupFrameDriver(target.port, target.mode, self._batch, self.frames_for(target, config))
        sampler = self.sampler_for(target)
        t0, c0 = time.perf_counter(), sampler.read()
        report = anyio.run(lambda: run_load(driver, config, progress=sampler), backend="asyncio",
                           backend_options={"use_uvloop": True})
        t1, c1 = time.perf_counter(), sampler.read()
        for service in target.services:
            service.check()
        cpu_us, util = sampler.per_transaction((t0, c0, t1, c1, report.requests + sampler.warmup_completions))
        lat = report.latency_ms
        step = Step(kind=config.mode, rate=config.rate, achieved=report.achieved_rate, requests=report.requests,
                    errors=dict(report.errors), p50=lat["p50"], p99=lat["p99"], p999=lat["p99.9"], max=lat["max"],
                    send_lag_ms=report.send_lag_ms["mean"], passed=None, cpu_us=cpu_us, util=util)
        if driver.built_late:
            step.note = f"  ({driver.built_late} requests built during the run)"
        self.steps_run.append(step)
        return report, step

    def step(self, target: Target, rate: float, *, retried: bool = False) -> tuple[LoadReport | None, Step]:
        config = LoadConfig(rate=rate, duration=self.plan.duration, warmup=self.plan.warmup, sessions=SESSIONS,
                            request_timeout=10.0)
        try:
            report, step = self.run(target, config)
        except LoadError as exc:  # e.g. sign-ins timing out under the previous step's backlog
            step = Step("open", rate, 0.0, 0, {"load": 1}, None, None, None, None, None, False, {}, {},
                        note=f"  ({exc})")
            self.log(step.line() + f"  ({target.label})")
            return None, step
        step.passed = (step.p99 is not None and step.p99 < P99_LIMIT_MS and not step.errors
                       and step.achieved >= MIN_ACHIEVED * rate)
        self.log(step.line() + f"  ({target.label})")
        if not step.passed and step.disturbed and not retried:
            self.log("    (other work on the machine during a failed step: repeating it once)")
            return self.step(target, rate, retried=True)
        return report, step

    # --- the searches ----------------------------------------------------------------------------------

    def find_max(self, targets: dict[str, Target]) -> dict[str, dict[str, Any]]:
        """The maximum sustainable rate of every target. The searches take turns one step at a time
        (probe A, probe B, step A, step B, ...), so a slow spell of the shared machine falls on all of
        them alike instead of on whichever system happened to be measured then: the ratios between
        them are what this benchmark is about."""
        searches: dict[str, MaxSearch] = {}
        for target in targets.values():
            self.log(f"\n{target.label}: {target.sut.name} pid {target.sut.pid}"
                     + (f", upstream {target.upstream.name} pid {target.upstream.pid}" if target.upstream else ""))
        self.log("\nclosed-loop probes, then open-loop steps taking turns")
        out: dict[str, dict[str, Any]] = {}
        for key, target in targets.items():
            try:
                _, probe = self.run(target, LoadConfig(concurrency=SESSIONS, duration=self.plan.probe_duration,
                                                       warmup=self.plan.probe_warmup, request_timeout=10.0))
            except Exception as exc:  # e.g. its process died: the other systems are still measured
                self.log(f"  → {target.label}: probe failed ({exc!r}): left out")
                out[key] = {"label": target.label, "error": repr(exc)}
                continue
            self.log(probe.line() + f"  (probe, {target.label})")
            searches[key] = MaxSearch(self.plan, probe)
        pending = dict(searches)
        while pending:
            for key, search in list(pending.items()):
                rate = search.next_rate()
                if rate is None:
                    del pending[key]
                    self.log(f"  → {targets[key].label}: max sustainable {search.max_rate:.0f}/s (first failing step "
                             f"{search.bad.rate if search.bad is not None else '-'}/s)")
                    continue
                try:
                    report, step = self.step(targets[key], rate)
                except Exception as exc:  # the search ends here; what it found so far stands
                    del pending[key]
                    search.error = repr(exc)
                    self.log(f"  → {targets[key].label}: search stopped at {rate:.0f}/s ({exc!r}); max so far "
                             f"{search.max_rate:.0f}/s")
                    continue
                search.record(report, step)
        for key, search in searches.items():
            if search.good_report is not None:
                self.reports[key] = search.good_report
            out[key] = {"label": targets[key].label, "closed_loop_probe": asdict(search.probe),
                        "max_rate": search.max_rate, "first_fail": search.bad.rate if search.bad is not None else None,
                        "at_max": asdict(search.good) if search.good is not None else None,
                        "steps": [asdict(st) for st in search.steps], "error": search.error}
        return out

    def compare(self, targets: dict[str, Target], rate: float, rounds: int) -> dict[str, Any]:
        """Every variant at `rate` in turn, `rounds` times (A B C A B C ...), so drift and other work on the
        machine fall on all of them alike; per variant the median CPU per transaction and the latency of
        all its rounds together."""
        config = LoadConfig(rate=rate, duration=self.plan.compare_duration, warmup=self.plan.warmup,
                            sessions=SESSIONS, request_timeout=10.0)
        hists = {key: run_histogram() for key in targets}
        steps: dict[str, list[Step]] = {key: [] for key in targets}
        for n in range(rounds):
            for key, target in targets.items():
                try:
                    report, step = self.run(target, config)
                except LoadError as exc:
                    self.log(f"    {target.label}: {exc}")
                    continue
                hists[key].add(report.histogram)
                steps[key].append(step)
                self.log(step.line() + f"  ({target.label}, round {n + 1})")
        out: dict[str, Any] = {"rate": rate, "rounds": rounds, "variants": {}}
        for key, done in steps.items():
            errors: dict[str, int] = {}
            for step in done:
                for k, v in step.errors.items():
                    errors[k] = errors.get(k, 0) + v
            out["variants"][key] = {
                "label": targets[key].label,
                "cpu_us": median([st.cpu_us.get("sut", 0.0) for st in done]),
                "loop_us": median([st.cpu_us["sut_loop"] for st in done if "sut_loop" in st.cpu_us]),
                "writer_us": median([st.cpu_us["writer"] for st in done if "writer" in st.cpu_us]),
                "latency_ms": summary_ms(hists[key]),
                "requests": sum(st.requests for st in done),
                "errors": errors,
                "steps": [asdict(st) for st in done],
            }
        return out

    def rss_run(self, target: Target, rate: float, count: int) -> dict[str, Any]:
        """`count` transactions at `rate` in RSS_PHASES runs, RSS sampled before and after each."""
        pid = target.sut.pid
        self.log(f"\n{target.label}: {count} transactions at {rate:.0f}/s, RSS sampled every {count // RSS_PHASES}")
        samples = [{"transactions": 0, **memory_kb(pid)}]
        self.log(f"    start: VmRSS {samples[0]['VmRSS'] / 1024:.1f} MiB, VmHWM {samples[0]['VmHWM'] / 1024:.1f} MiB")
        hist = run_histogram()
        done = 0
        errors: dict[str, int] = {}
        phases: list[dict[str, Any]] = []
        for i in range(RSS_PHASES):
            n = count // RSS_PHASES + (count % RSS_PHASES if i == RSS_PHASES - 1 else 0)
            report, step = self.run(target, LoadConfig(rate=rate, count=n, sessions=SESSIONS, request_timeout=10.0))
            hist.add(report.histogram)
            done += report.requests
            for k, v in report.errors.items():
                errors[k] = errors.get(k, 0) + v
            sample = {"transactions": done, **memory_kb(pid)}
            samples.append(sample)
            phases.append(asdict(step))
            self.log(step.line())
            self.log(f"    after {done:7d}: VmRSS {sample['VmRSS'] / 1024:.1f} MiB, "
                     f"VmHWM {sample['VmHWM'] / 1024:.1f} MiB")
        return {"rate": rate, "transactions": done, "errors": errors, "latency_ms": summary_ms(hist),
                "rss_kb": samples, "phases": phases}

    def profile(self, seconds: float, rate: float) -> dict[str, Any]:
        """Where the gateway's CPU goes at `rate`. With py-spy (a sampling profiler, dev extra) the real
        `gateway serve` process is sampled from outside: every thread, idle time left out, no slow-down,
        so the shares are shares of CPU. Without it, cProfile inside the process (see `summarize_profile`)."""
        spy = py_spy()
        if spy is None:
            prof = self.workdir / "gateway.prof"
            target = self.start_gateway("gateway_profiled", "gateway under cProfile", profile=prof)
            self.log(f"\nprofile: {target.label}, {seconds:g} s at {rate:.0f}/s (py-spy not found: cProfile, "
                     "which slows call-heavy code and counts idle time; read the shares with care)")
            try:
                _, step = self.run(target, LoadConfig(rate=rate, duration=seconds, warmup=1.0, sessions=SESSIONS))
                self.log(step.line())
            finally:
                self.stop(target)  # SIGTERM: the launcher stops the profiler and writes the stats
            return summarize_profile(prof, step)
        raw = self.workdir / "gateway.spy"
        target = self.start_gateway("gateway_sampled", "gateway sampled by py-spy")
        self.log(f"\nprofile: {target.label}, {seconds:g} s at {rate:.0f}/s")
        sampler = subprocess.Popen([spy, "record", "--pid", str(target.sut.pid), "--format", "raw", "--rate", "250",
                                    "--nonblocking", "--output", str(raw)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _, step = self.run(target, LoadConfig(rate=rate, duration=seconds, warmup=1.0, sessions=SESSIONS))
            self.log(step.line())
        finally:
            sampler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                _, err = sampler.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                sampler.kill()
                _, err = sampler.communicate()
            self.stop(target)
        if not raw.exists():
            self.log(f"    py-spy wrote nothing: {err.decode(errors='replace').strip()[-300:]}")
            return {}
        return summarize_samples(raw, step)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def nice_rate(rate: float) -> float:
    """Two significant digits and a bit: 1234 → 1230, 56789 → 56800."""
    if rate <= 0:
        return 1.0
    digits = len(str(int(rate))) - 3
    return float(max(1, round(rate, -digits if digits > 0 else 0)))


# --- profile summary -------------------------------------------------------------------------------------

#: (area, substrings of "file:function") in order; the first match wins
PROFILE_AREAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("pyiso8583 encode/decode", ("/iso8583/",)),
    ("gateway codec layer (gateway/iso)", ("gateway/iso/",)),
    ("crypto (cryptography, gateway/security)", ("cryptography", "gateway/security/", "_openssl", "_rust")),
    ("journal (gateway/store, sqlite3, to_thread)", ("gateway/store/", "sqlite3", "to_thread", "_thread",
                                                     "threading.py", "queue.py", "concurrent/futures")),
    ("metrics (prometheus_client, gateway/metrics)", ("prometheus_client", "gateway/metrics")),
    ("logging", ("logging/",)),
    ("gateway logic (service, core, net)", ("gateway/service", "gateway/core/", "gateway/net/")),
    ("event loop, sockets, anyio (asyncio/runners.py:run is uvloop's own C time)",
     ("anyio/", "asyncio/", "uvloop", "sniffio/", "weakref.py", "socket", "select", "epoll",
      "<built-in method _asyncio", "method 'send'", "method 'recv'")),
)


def area_of(key: tuple[str, int, str]) -> str:
    text = f"{key[0]}:{key[2]}"
    for area, needles in PROFILE_AREAS:
        if any(n in text for n in needles):
            return area
    return "other (builtins, dataclasses, ...)"


def summarize_profile(path: Path, step: Step) -> dict[str, Any]:
    """Own time by area and the top functions. Built-ins (file "~": dict.get, str.encode, ...) have no
    area of their own: their time goes to the areas of their callers, in proportion."""
    stats = pstats.Stats(str(path))
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values()) or 1.0
    areas: dict[str, float] = {}
    for key, (_, _, tottime, _, callers) in raw.items():
        if key[0] == "~" and callers:
            for caller, entry in callers.items():
                area = area_of(caller)
                areas[area] = areas.get(area, 0.0) + entry[2]
        else:
            area = area_of(key)
            areas[area] = areas.get(area, 0.0) + tottime
    top = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:20]
    return {
        "requests": step.requests,
        "main_thread_total_s": round(total, 3),
        "areas": {k: round(v / total, 4) for k, v in sorted(areas.items(), key=lambda kv: -kv[1])},
        "top": [{"function": f"{short_path(k[0])}:{k[1]}({k[2]})", "calls": v[1],
                 "tottime_share": round(v[2] / total, 4),
                 "tottime_us_per_txn": round(v[2] / max(1, step.requests) * 1e6, 1)} for k, v in top],
    }


def py_spy() -> str | None:
    """The py-spy executable next to this interpreter (the dev extra installs it there) or on PATH."""
    here = Path(sys.executable).with_name("py-spy")
    return str(here) if here.exists() else shutil.which("py-spy")


def summarize_samples(path: Path, step: Step) -> dict[str, Any]:
    """py-spy's raw output ("frame;frame;... count" per line, frames "function (file:line)"): each
    sample's leaf frame gives the area (so the shares are of CPU, all threads), and the inclusive share
    of the gateway's own functions shows which step of a transaction pays for it."""
    leaf_areas: dict[str, int] = {}
    leaves: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        leaf = frames[-1]
        name, _, where = leaf.rpartition(" (")
        area = area_of(("/" + where.rstrip(")"), 0, name))
        leaf_areas[area] = leaf_areas.get(area, 0) + count
        leaves[leaf] = leaves.get(leaf, 0) + count
        for frame in {f.rsplit(":", 1)[0] for f in frames if "gateway/" in f}:
            inclusive[frame] = inclusive.get(frame, 0) + count
    total = total or 1
    return {
        "profiler": "py-spy",
        "requests": step.requests,
        "samples": total,
        "areas": {k: round(v / total, 4) for k, v in sorted(leaf_areas.items(), key=lambda kv: -kv[1])},
        "top": [{"function": k, "share": round(v / total, 4)}
                for k, v in sorted(leaves.items(), key=lambda kv: -kv[1])[:20]],
        "inclusive": [{"function": k, "share": round(v / total, 4)}
                      for k, v in sorted(inclusive.items(), key=lambda kv: -kv[1])[:25]],
    }


def short_path(path: str) -> str:
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


# --- output ----------------------------------------------------------------------------------------------


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def ratio(a: float, b: float) -> float | None:
    """a / b; None when either is missing (0: a system or a figure this run did not measure)."""
    return a / b if a and b else None


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render(results: dict[str, Any]) -> str:
    out: list[str] = []
    systems = results["systems"]
    out.append("")
    out.append("=" * 118)
    out.append(f"gateway end-to-end benchmark ({results['mode']} run, {results['elapsed_s']:.0f} s) — "
               f"max sustainable open-loop rate with p99 < {P99_LIMIT_MS:g} ms, {SESSIONS} sessions")
    out.append(results["placement"])
    out.append(f"message: CUP POS 0200 purchase (PIN block, encrypted track 2, MAC), TPDU+header framing, "
               f"{results['message_bytes']} bytes on the wire; every session prepares its requests before the clock "
               "starts (unique STAN and MAC each against the gateway)")
    other = results.get("other_work")
    if other:
        out.append(f"other work on this (shared) machine: up to {other['max_util']:.0%} of a core during a step, "
                   f"{other['disturbed_steps']} of {other['steps']} steps above {DISTURBED:.0%}; "
                   f"{other['waited_s']:.0f} s spent waiting for quiet")
    out.append("=" * 118)
    head = (f"{'system':<32} {'max rate':>9} {'1st fail':>8} {'p50@max':>8} {'p99@max':>8} │ "
            f"{'probe':>6} {'SUT':>4} {'other':>5} │ {'SUT':>5} {'load':>5} {'host':>5}")
    out.append(f"{'':<32} {'(p99<50ms)':>9} {'':>8} {'ms':>8} {'ms':>8} │ "
               f"{'closed loop, cores':>18} │ {'CPU µs/txn @max':>17}")
    out.append(head)
    out.append("─" * len(head))
    for key in SYSTEMS:
        r = systems.get(key)
        if r is None:
            continue
        if "closed_loop_probe" not in r:
            out.append(f"{r['label']:<32} not measured: {r.get('error')}")
            continue
        at = r["at_max"] or {}
        cpu = at.get("cpu_us", {})
        probe = r["closed_loop_probe"]
        util = probe.get("util", {})
        other_core = util.get("load", 0.0) + util.get("upstream", 0.0)

        def c(name: str, cpu: dict[str, float] = cpu) -> str:
            return f"{cpu[name]:.0f}" if name in cpu else "-"

        first_fail = "-" if r["first_fail"] is None else f"{r['first_fail']:.0f}"
        out.append(f"{r['label']:<32} {r['max_rate']:>7.0f}/s {first_fail:>8} {fmt_ms(at.get('p50')):>8} "
                   f"{fmt_ms(at.get('p99')):>8} │ {probe['achieved']:>6.0f} {util.get('sut', 0.0):>4.0%} "
                   f"{other_core:>5.0%} │ {c('sut'):>5} {c('load'):>5} {c('upstream'):>5}")
    out.append("probe: closed loop with 64 in flight (saturation); SUT = utilisation of the SUT's core, other = load "
               "generator + upstream host on the other core (100 % = one core): the side near 100 % is the limit.")
    out.append("CPU µs/txn: CPU time per transaction of each process over the steady seconds of the max step.")
    rat = results["ratios"]
    out += render_targets(results)
    out.append("")
    out.append("ratios (max sustainable rates measured side by side in this run)")
    out.append(f"  3/2 full gateway / bare relay       {fmt_ratio(rat['gateway_over_relay']):>6}"
               "   (issue target >= 0.60)")
    out.append(f"  3/1 full gateway / raw echo         {fmt_ratio(rat['gateway_over_echo']):>6}")
    out.append(f"  2/1 bare relay / raw echo           {fmt_ratio(rat['relay_over_echo']):>6}")
    out.append(f"  by SUT CPU per transaction: relay µs / gateway µs = {fmt_ratio(rat['cpu_relay_over_gateway'])} "
               "(each at its own max)")
    compare = results.get("compare") or {}
    if "relay" in compare.get("max", {}).get("variants", {}):
        out.append(f"  by SUT CPU per transaction at one common rate: relay µs / gateway µs = "
                   f"{fmt_ratio(rat['cpu_relay_over_gateway_half'])} at {compare['half']['rate']:.0f}/s, "
                   f"{fmt_ratio(rat['cpu_relay_over_gateway_max'])} at {compare['max']['rate']:.0f}/s")
    for name, block in compare.items():
        title = "50 % of" if name == "half" else "100 % of"
        out.append("")
        out.append(f"systems at one common rate, {block['rate']:.0f}/s ({title} the full gateway's max), "
                   f"{block['rounds']} interleaved round(s) each:")
        out.append(f"  {'variant':<32} {'p50 ms':>7} {'p99 ms':>7} {'p99.9 ms':>8} {'µs/txn':>7} {'loop':>6} "
                   f"{'threads':>7} {'txns':>6} {'errors':>6}")
        for v in block["variants"].values():
            total, loop = v["cpu_us"], v["loop_us"]
            lat = v["latency_ms"]
            cpu = "-" if total is None else f"{total:.0f}"
            loop_text = "-" if loop is None else f"{loop:.0f}"
            # clamped: the process and its main thread are read a moment apart (10 ms clock ticks)
            threads = "-" if total is None or loop is None else f"{max(0.0, total - loop):.0f}"
            out.append(f"  {v['label']:<32} {fmt_ms(lat['p50']):>7} {fmt_ms(lat['p99']):>7} {fmt_ms(lat['p99.9']):>8} "
                       f"{cpu:>7} {loop_text:>6} {threads:>7} {v['requests']:>6} {sum(v['errors'].values()):>6}")
    if compare:
        out.append("  (µs/txn: CPU of the system's process per transaction, median of the rounds; for a gateway, "
                   "loop = its main thread (event loop), threads = its other threads, i.e. the SQLite commits)")
    if "gateway" in systems and "gateway_nometrics" in systems:
        out.append("")
        out.append("metrics cost (target <= 5 %)")
        out.append(f"  max rate: metrics on {rat['max_metrics_on']:.0f}/s vs off {rat['max_metrics_off']:.0f}/s → "
                   f"cost {fmt_pct(rat['metrics_cost_at_max'])}  (the search's step is ~5-10 %: read it with the "
                   "CPU figures)")
        out.append(f"  CPU per transaction, on vs off: {fmt_pct(rat['metrics_cost_cpu_half'])} at 50 % of max, "
                   f"{fmt_pct(rat['metrics_cost_cpu_max'])} at the full gateway's max rate")
    if "gateway" in systems and "gateway_trace" in systems:
        out.append("trace recording cost ([trace] path set; the recorder's writer is a process of its own)")
        out.append(f"  max rate: recording off {rat['max_metrics_on']:.0f}/s vs on {rat['max_trace']:.0f}/s")
        for block, title in (("half", "50 % of max"), ("max", "the full gateway's max rate")):
            if rat.get(f"trace_cost_cpu_{block}") is not None:
                process, total = rat[f"trace_cost_cpu_{block}"], rat[f"trace_cost_total_{block}"]
                out.append(f"  at {title}: gateway process CPU per transaction {fmt_pct(process)}, "
                           f"gateway + trace writer (the machine's CPU) {fmt_pct(total)}")
    if "gateway" in systems and "gateway_memory" in systems:
        out.append("durable SQLite journal (synchronous=FULL) vs in-memory journal (target >= 0.80)")
        out.append(f"  max rate durable / in-memory: {rat['max_metrics_on']:.0f} / {rat['max_memory']:.0f} = "
                   f"{fmt_ratio(rat['durable_over_memory'])};  CPU per transaction, in-memory / durable: "
                   f"{fmt_ratio(rat['cpu_memory_over_durable_half'])} at 50 %, "
                   f"{fmt_ratio(rat['cpu_memory_over_durable_max'])} at 100 % of max")
    half = compare.get("half", {}).get("variants", {}).get("gateway")
    if half:
        lat = half["latency_ms"]
        out.append("")
        out.append(f"full gateway at 50 % of its max ({compare['half']['rate']:.0f}/s, {half['requests']} "
                   f"transactions): p50 {fmt_ms(lat['p50'])} ms, p99 {fmt_ms(lat['p99'])} ms, "
                   f"p99.9 {fmt_ms(lat['p99.9'])} ms, "
                   f"max {fmt_ms(lat['max'])} ms")
    rss = results.get("rss")
    if rss:
        lat = rss["latency_ms"]
        out.append("")
        out.append(f"memory: full gateway, fresh process, {rss['transactions']} transactions at {rss['rate']:.0f}/s "
                   f"({RSS_RATE_FRACTION:.0%} of max), errors {sum(rss['errors'].values())}; latency p50 "
                   f"{fmt_ms(lat['p50'])} ms, p99 {fmt_ms(lat['p99'])} ms, max {fmt_ms(lat['max'])} ms")
        samples = rss["rss_kb"]
        out.append("  RSS by transactions: " + ", ".join(
            f"{s['transactions'] // 1000}k {s['VmRSS'] / 1024:.1f} MiB" for s in samples))
        first, last = samples[1], samples[-1]
        out.append(f"  RSS growth from {first['transactions']} to {last['transactions']} transactions: "
                   f"{(last['VmRSS'] - first['VmRSS']) / 1024:+.1f} MiB;  peak RSS (VmHWM) after "
                   f"{last['transactions']}: {last['VmHWM'] / 1024:.1f} MiB")
    prof = results.get("profile")
    if prof and prof.get("profiler") == "py-spy":
        out.append("")
        out.append(f"where the gateway's CPU goes (py-spy, {prof['samples']} samples of every thread over "
                   f"{prof['requests']} transactions; area of the innermost frame):")
        for area, share in prof["areas"].items():
            out.append(f"  {share:6.1%}  {area}")
        out.append("  top innermost functions:")
        for row in prof["top"][:12]:
            out.append(f"  {row['share']:6.1%}  {row['function']}")
        out.append("  the gateway's functions, inclusive:")
        for row in prof["inclusive"][:15]:
            out.append(f"  {row['share']:6.1%}  {row['function']}")
    elif prof:
        out.append("")
        out.append(f"where the gateway's main-thread time goes (cProfile, {prof['requests']} transactions; "
                   "SQLite commits run in worker threads, see 'threads' above):")
        for area, share in prof["areas"].items():
            out.append(f"  {share:6.1%}  {area}")
        out.append("  top functions by own time:")
        for row in prof["top"][:12]:
            out.append(f"  {row['tottime_share']:6.1%}  {row['tottime_us_per_txn']:7.1f} µs/txn  {row['function']}")
    out.append("")
    return "\n".join(out)


def render_targets(results: dict[str, Any]) -> list[str]:
    """Issue 13's table: SUT CPU per transaction at saturation (the closed-loop probe, 64 in flight) and
    at the maximum sustainable rate, for each system, next to the targets."""
    systems = results["systems"]

    def cpu(key: str, where: str) -> str:
        r = systems.get(key) or {}
        step = r.get("closed_loop_probe") if where == "probe" else r.get("at_max")
        value = (step or {}).get("cpu_us", {}).get("sut")
        return "-" if value is None else f"{value:.0f}"

    rows = (("1 raw framed echo (I/O floor), µs/msg", "echo", "-"),
            ("1b codec echo server, µs/msg", "codec_echo", "<= 22"),
            ("2 bare relay, µs/txn", "relay", "<= 40"),
            ("3 full gateway, µs/txn", "gateway", "<= 120"),
            ("3b gateway, metrics off, µs/txn", "gateway_nometrics", "-"),
            ("3d gateway, trace recording on, µs/txn", "gateway_trace", "-"))
    out = ["", "issue 13: SUT CPU per transaction, at saturation (closed-loop probe) and at the max step",
           f"  {'figure':<42} {'saturation':>10} {'@max':>6}  target"]
    for title, key, target in rows:
        if key in systems:
            out.append(f"  {title:<42} {cpu(key, 'probe'):>10} {cpu(key, 'max'):>6}  {target}")
    rat = results["ratios"]
    out.append(f"  {'full gateway max rate / raw echo max rate':<42} {fmt_ratio(rat['gateway_over_echo']):>10} "
               f"{'':>6}  >= 0.25")
    return out


def fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}"


def compute_ratios(results: dict[str, Any]) -> dict[str, Any]:
    s = results["systems"]

    def mx(key: str) -> float:
        return float(s.get(key, {}).get("max_rate", 0.0))

    def sut_cpu(key: str) -> float:
        at = s.get(key, {}).get("at_max") or {}
        return float(at.get("cpu_us", {}).get("sut", 0.0))

    compare = results.get("compare") or {}

    def cpu_at(block: str, key: str) -> float:
        value = compare.get(block, {}).get("variants", {}).get(key, {}).get("cpu_us")
        return float(value) if value else 0.0

    on, off, mem = mx("gateway"), mx("gateway_nometrics"), mx("gateway_memory")

    def trace_cost(block: str, *, with_writer: bool) -> float | None:
        variants = compare.get(block, {}).get("variants", {})
        base, rec = variants.get("gateway", {}), variants.get("gateway_trace", {})
        if not base.get("cpu_us") or not rec.get("cpu_us"):
            return None
        extra = (rec.get("writer_us") or 0.0) if with_writer else 0.0
        return (rec["cpu_us"] + extra) / base["cpu_us"] - 1

    def cost(block: str) -> float | None:
        on_cpu, off_cpu = cpu_at(block, "gateway"), cpu_at(block, "gateway_nometrics")
        return on_cpu / off_cpu - 1 if on_cpu and off_cpu else None

    return {
        "gateway_over_relay": ratio(on, mx("relay")),
        "gateway_over_echo": ratio(on, mx("echo")),
        "relay_over_echo": ratio(mx("relay"), mx("echo")),
        "cpu_relay_over_gateway": ratio(sut_cpu("relay"), sut_cpu("gateway")),
        "cpu_relay_over_gateway_half": ratio(cpu_at("half", "relay"), cpu_at("half", "gateway")),
        "cpu_relay_over_gateway_max": ratio(cpu_at("max", "relay"), cpu_at("max", "gateway")),
        "max_metrics_on": on,
        "max_metrics_off": off,
        "max_memory": mem,
        "metrics_cost_at_max": (1 - on / off) if off else None,
        "metrics_cost_cpu_half": cost("half"),
        "metrics_cost_cpu_max": cost("max"),
        "max_trace": mx("gateway_trace"),
        "trace_cost_cpu_half": trace_cost("half", with_writer=False),
        "trace_cost_total_half": trace_cost("half", with_writer=True),
        "trace_cost_cpu_max": trace_cost("max", with_writer=False),
        "trace_cost_total_max": trace_cost("max", with_writer=True),
        "durable_over_memory": ratio(on, mem),
        "cpu_memory_over_durable_half": ratio(cpu_at("half", "gateway_memory"), cpu_at("half", "gateway")),
        "cpu_memory_over_durable_max": ratio(cpu_at("max", "gateway_memory"), cpu_at("max", "gateway")),
    }


# --- main ------------------------------------------------------------------------------------------------


def message_bytes() -> int:
    """Wire size of the bench 0200 (2-byte length + TPDU + header + body), for the header line."""
    body = purchase_body(Codec(load_dialect("cup-pos")), own_working_keys(), TerminalIdent("BT000001", MERCHANT_ID),
                         "000001", "000001")
    return 2 + ENVELOPE_LEN + len(body)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter steps, fewer of them (about 2 minutes)")
    parser.add_argument("--rss-count", type=int, help="transactions of the RSS run (default 100000, --quick 10000)")
    parser.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    parser.add_argument("--plots", metavar="DIR", help="PNG of each system's max step (load tool's plot)")
    parser.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                        help="also run the gateway under cProfile for this long at 80 %% of its max")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs, journals)")
    parser.add_argument("--only", metavar="PARTS", default=",".join(PARTS),
                        help=f"comma-separated subset of {','.join(PARTS)} (default: all; for quick iterations)")
    args = parser.parse_args()
    only = set(args.only.split(","))
    if not only <= set(PARTS):
        parser.error(f"--only takes a subset of {','.join(PARTS)}")
    plan = QUICK if args.quick else FULL
    rss_count = args.rss_count if args.rss_count is not None else plan.rss_count
    if rss_count < RSS_PHASES:
        parser.error(f"--rss-count must be at least {RSS_PHASES}")

    cpus = sorted(os.sched_getaffinity(0))
    sut_cpus: set[int] | None = None
    other_cpus: set[int] | None = None
    if len(cpus) >= 2 and not args.no_pin:
        sut_cpus, other_cpus = {cpus[-1]}, set(cpus[:-1])
        os.sched_setaffinity(0, other_cpus)  # the load generator (this process)
        placement = (f"placement: {len(cpus)} CPUs; system under test (echo server / relay / gateway) pinned to "
                     f"CPU {cpus[-1]}; load generator (this process, 1 event loop) and upstream host (codec host / "
                     f"sim-host) share CPU {','.join(map(str, cpus[:-1]))} — the load generator's own cost is part "
                     "of the picture")
    else:
        placement = (f"placement: {len(cpus)} CPU(s), nothing pinned; load generator, system under test and upstream "
                     "host share them — the load generator's own cost is part of the picture")

    def log(line: str) -> None:
        print(line, flush=True)

    results: dict[str, Any] = {"mode": "quick" if args.quick else "full", "placement": placement,
                               "p99_limit_ms": P99_LIMIT_MS, "sessions": SESSIONS, "plan": asdict(plan),
                               "card": f"{BENCH_CARD!r}", "systems": {}, "message_bytes": message_bytes()}
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))  # removed in the `finally` below
    started = time.monotonic()
    log(placement)
    log(f"work directory {workdir}; steps of {plan.warmup:g} s warm-up + {plan.duration:g} s measured")
    bench: Bench | None = None
    try:
        with Services(workdir) as services:
            bench = Bench(plan, services, workdir, sut_cpus, other_cpus, log)
            systems = results["systems"]

            # every system up at once (an idle one costs nothing), so their searches can take turns
            targets: dict[str, Target] = {}
            if "echo" in only:
                targets["echo"] = bench.start_echo()
                targets["codec_echo"] = bench.start_codec_echo()
            if "relay" in only:
                targets["relay"] = bench.start_relay()
            variants: tuple[tuple[str, str, bool, bool, bool], ...] = (
                ("gateway", "3 full gateway", True, False, False),
                ("gateway_nometrics", "3b gateway, metrics off", False, False, False),
                ("gateway_memory", "3c gateway, in-memory journal", True, True, False),
                ("gateway_trace", "3d gateway, trace recording on", True, False, True))
            variants = variants if "variants" in only else variants[:1] if "gateway" in only else ()
            gateways: dict[str, Target] = {}
            for key, label, metrics, memory, trace in variants:
                gateways[key] = bench.start_gateway(key, label, metrics=metrics, memory=memory, trace=trace)
            targets.update(gateways)
            if targets:
                systems.update(bench.find_max(targets))
            for floor in ("echo", "codec_echo"):
                if floor in targets:
                    bench.stop(targets[floor])
            full_max = systems.get("gateway", {}).get("max_rate", 0.0)
            # the relay too: at one common rate, CPU per transaction compares the same arrival pattern
            # (at its own, much higher max the relay batches far more than the gateway can at its max)
            same_rate = ({"relay": targets["relay"]} if "relay" in targets else {}) | gateways
            if full_max and len(same_rate) >= 2:
                compare: dict[str, Any] = {}
                results["compare"] = compare
                for name, fraction in (("half", SAME_RATE_FRACTION), ("max", 1.0)):
                    rate = nice_rate(fraction * full_max)
                    bench.log(f"\n{', '.join(t.label for t in same_rate.values())} at {rate:.0f}/s ({fraction:.0%} of "
                              f"the full gateway's max), {plan.compare_rounds} interleaved round(s)")
                    compare[name] = bench.compare(same_rate, rate, plan.compare_rounds)
            if "relay" in targets:
                bench.stop(targets["relay"])
            for target in gateways.values():
                bench.stop(target)

            if full_max and "rss" in only:
                target = bench.start_gateway("gateway_rss", "3 full gateway (fresh process)")
                try:
                    results["rss"] = bench.rss_run(target, nice_rate(RSS_RATE_FRACTION * full_max), rss_count)
                finally:
                    bench.stop(target)
            if full_max and args.profile > 0:
                results["profile"] = bench.profile(args.profile, nice_rate(0.8 * full_max))
            if args.plots:
                from gateway.load.plot import plot_report

                Path(args.plots).mkdir(parents=True, exist_ok=True)
                for key, report in bench.reports.items():
                    plot_report(report, Path(args.plots) / f"{key}.png")
    finally:
        results["elapsed_s"] = time.monotonic() - started
        if bench is not None:
            others = [st.util.get(OTHER, 0.0) for st in bench.steps_run]
            results["other_work"] = {"waited_s": bench.waited, "steps": len(others),
                                     "disturbed_steps": sum(o > DISTURBED for o in others),
                                     "max_util": max(others, default=0.0)}
        results["ratios"] = compute_ratios(results)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
        if args.keep:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
