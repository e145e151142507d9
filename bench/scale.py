"""Scale-out: CPU per transaction and maximum rate of the gateway for 1 and N workers on PostgreSQL and
1 on SQLite, side by side in one run, and the 16-core model those costs give.

    python bench/scale.py [--quick] [--workers 1,2] [--pg-url URL] [--json PATH] [--keep]

Systems (each with its own `gateway sim-host`, all up for the whole run, their searches taking turns
one step at a time as in `bench/gateway.py`, whose load driver, search and CPU sampling this uses):

- `sqlite-1`: `gateway serve` on a SQLite journal (synchronous = FULL), the embedded default;
- `pg-N` for every N of `--workers`: `gateway serve --workers N` (N = 1: plain `gateway serve`) on a
  database of its own on the PostgreSQL server (created for the run, dropped at its end).

Then every system at one common rate (half the smallest maximum) in interleaved rounds: CPU per
transaction at the same arrival pattern is the sharp comparison, and the model's input.

CPU per transaction, from /proc over the steady part of each step, by part:
`load` (the load generator: this process, one event loop), `sut` (the gateway: the process, or the
supervisor and every worker), `upstream` (the host simulator), `db` (the PostgreSQL backends of the
system's own database, by their process title), `db_shared` (the server's own processes: WAL writer,
checkpointer, background writer, ...; shared by every database on the server, so other work on it lands
here too). Nothing is pinned: on a 2-core machine generator, host simulator, database and gateway
share both cores, and the `util` columns say which of them ran out first.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository first: `gateway` is the package

from common import LOOPBACK, Services, cpu_seconds, free_port, machine_busy_seconds, wait_ready, write_gateway_config

# bench/gateway.py is a script whose name is the package's: load it under another name
_spec = importlib.util.spec_from_file_location("bench_gateway", Path(__file__).with_name("gateway.py"))
assert _spec is not None and _spec.loader is not None
bg = importlib.util.module_from_spec(_spec)
sys.modules["bench_gateway"] = bg
_spec.loader.exec_module(bg)

PY = sys.executable
SESSIONS = bg.SESSIONS
DEFAULT_PG = os.environ.get("GATEWAY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
PARTS = ("load", "sut", "upstream", "db", "db_shared")
#: the PostgreSQL server's own processes, by their title (`postgres: <title>`)
PG_AUX = ("checkpointer", "background writer", "walwriter", "autovacuum", "logical replication", "stats",
          "archiver", "io worker")
TARGET_RATE = 13_236  #: VisaNet's 2013 peak, msg/s (issue 15)
CORES_MODEL = 16
USABLE = 0.8  #: of each core, for the model: headroom for the kernel's network work, bursts, GC


class PidGroup:
    """CPU seconds of a changing set of processes: each pid's highest reading is kept, so a process
    that ends (a database backend closing) does not take its CPU time back out of the sum."""

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self.pids = pids
        self.seen: dict[int, float] = {}

    def __call__(self) -> float:
        for pid in self.pids():
            with contextlib.suppress(OSError, IndexError, ValueError):  # gone meanwhile
                self.seen[pid] = max(self.seen.get(pid, 0.0), cpu_seconds(pid))
        return sum(self.seen.values())


def postgres_processes() -> list[tuple[int, str]]:
    """(pid, title) of every PostgreSQL server process on this machine."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if title.startswith("postgres:") or title.split(" ")[0].endswith("/postgres"):
            out.append((int(entry), title))
    return out


def backends_of(database: str) -> Callable[[], list[int]]:
    def pids() -> list[int]:
        return [pid for pid, title in postgres_processes() if f" {database} " in f" {title} "]
    return pids


def server_processes() -> list[int]:
    return [pid for pid, title in postgres_processes()
            if any(aux in title for aux in PG_AUX) or title.split(" ")[0].endswith("/postgres")]


class GroupSampler(bg.CpuSampler):  # type: ignore[misc,name-defined]
    """`bench/gateway.py`'s sampler over named CPU sources instead of single pids."""

    def __init__(self, sources: dict[str, Callable[[], float]]) -> None:
        super().__init__(dict.fromkeys(sources, 0), {})
        self.sources = sources

    def read(self) -> dict[str, float]:
        out = {name: source() for name, source in self.sources.items()}
        out[bg.MACHINE] = machine_busy_seconds()
        return out


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


class ScaleBench(bg.Bench):  # type: ignore[misc,name-defined]
    def __init__(self, *args: Any, pg_admin: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pg_admin = pg_admin
        self.databases: list[str] = []
        self.sources: dict[str, dict[str, Callable[[], float]]] = {}
        self.server = PidGroup(server_processes)

    def create_database(self, key: str) -> str:
        import psycopg

        name = f"gw_bench_{os.getpid()}_{secrets.token_hex(3)}_{key.replace('-', '_')}"
        with psycopg.connect(self.pg_admin, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        self.databases.append(name)
        return name

    def drop_databases(self) -> None:
        import psycopg

        with psycopg.connect(self.pg_admin, autocommit=True, connect_timeout=5) as admin:
            for name in self.databases:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def start_system(self, key: str, label: str, *, workers: int, postgres: bool) -> Any:
        host, m = self.services.start(f"sim-host for {key}", [
            PY, "-m", "gateway.cli", "sim-host", "--listen", "127.0.0.1:0", "--config", str(self.host_config),
            "--zmk", self.zmk.hex().upper()], cpus=None, ready=r"listening on 127\.0\.0\.1:(\d+)")
        assert m is not None
        terminal_port, admin_port = free_port(), free_port()
        config = self.workdir / f"{key}.toml"
        journal = self.workdir / f"{key}.db"
        write_gateway_config(config, terminal_port=terminal_port, admin_port=admin_port, host_port=int(m.group(1)),
                             zmk=self.zmk, journal=journal, metrics=True, terminals=SESSIONS)
        database = None
        if postgres:
            database = self.create_database(key)
            url = with_database(self.pg_admin, database)
            text = config.read_text().replace(f'path = "{journal}"', f'url = "{url}"\ninstance_id = "{key}"')
            config.write_text(text)
        argv = [PY, "-m", "gateway.cli", "serve", "--config", str(config)]
        if workers > 1:
            argv += ["--workers", str(workers)]
        gateway, _ = self.services.start(key, argv, cpus=None)
        wait_ready(gateway, admin_port, timeout=90.0)
        pids = [gateway.pid] + (worker_pids(admin_port) if workers > 1 else [])
        sources: dict[str, Callable[[], float]] = {
            "load": PidGroup(lambda: [os.getpid()]), "sut": PidGroup(lambda: pids),
            "upstream": PidGroup(lambda: [host.pid])}
        if database is not None:
            sources["db"] = PidGroup(backends_of(database))
            sources["db_shared"] = self.server
        self.sources[key] = sources
        self.log(f"{label}: pids {pids}" + (f", database {database}" if database else ", SQLite journal"))
        return bg.Target(key, label, "gateway", terminal_port, gateway, host, [gateway, host])

    def sampler_for(self, target: Any) -> Any:
        return GroupSampler(self.sources[target.key])


def worker_pids(admin_port: int) -> list[int]:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{admin_port}/workers", timeout=5) as r:
        rows = json.loads(r.read())["workers"]
    return [int(w["pid"]) for w in rows if w["pid"]]


def parts_of(steps: list[dict[str, Any]], what: str) -> dict[str, float]:
    """Median over `steps` of each part's `what` ("cpu_us" or "util")."""
    out = {}
    for part in PARTS:
        values = [st[what][part] for st in steps if part in st.get(what, {})]
        if values:
            out[part] = statistics.median(values)
    return out


def model(cost: dict[str, float], per_worker_max: float | None) -> dict[str, Any]:
    """The 16-core figures of one system's CPU per transaction (µs): rate the cores carry with the
    generator and host elsewhere (gateway + database on the box) and with everything on the box."""
    box = cost.get("sut", 0.0) + cost.get("db", 0.0) + cost.get("db_shared", 0.0)
    everything = box + cost.get("load", 0.0) + cost.get("upstream", 0.0)
    capacity = CORES_MODEL * USABLE * 1e6
    out: dict[str, Any] = {
        "box_us": box, "all_us": everything,
        "rate_gateway_and_db_on_box": capacity / box if box else None,
        "rate_everything_on_box": capacity / everything if everything else None,
        "cores_for_target": TARGET_RATE * box / 1e6 / USABLE,
        "generator_cores_for_target": TARGET_RATE * cost.get("load", 0.0) / 1e6 / USABLE,
        "host_sim_cores_for_target": TARGET_RATE * cost.get("upstream", 0.0) / 1e6 / USABLE,
        "gateway_cores_for_target": TARGET_RATE * cost.get("sut", 0.0) / 1e6 / USABLE,
        "db_cores_for_target": TARGET_RATE * (cost.get("db", 0.0) + cost.get("db_shared", 0.0)) / 1e6 / USABLE,
    }
    if per_worker_max:
        out["workers_for_target"] = math.ceil(TARGET_RATE / per_worker_max)
    return out


def render(results: dict[str, Any]) -> str:
    lines = ["", "=== scale-out bench ===", results["placement"], ""]
    systems = results["systems"]
    common = results.get("common", {})
    lines.append(f"{'system':<10} {'max/s':>7}   at max, util (1.0 = one core) of: load sut upstream db db_shared "
                 "| total")
    for key, sysres in systems.items():
        at = sysres.get("at_max") or {}
        util = at.get("util", {})
        total = sum(util.get(p, 0.0) for p in PARTS)
        cells = " ".join(f"{util.get(p, 0.0):4.2f}" for p in PARTS)
        lines.append(f"{key:<10} {sysres.get('max_rate', 0):7.0f}   {cells} | {total:4.2f} of {results['cpus']} cores"
                     f" (other work {util.get('other', 0.0):4.2f})")
    if common:
        lines += ["", f"CPU µs per transaction at a common {common['rate']:.0f}/s ({common['rounds']} interleaved "
                  "round(s), medians):",
                  f"{'system':<10} " + " ".join(f"{p:>9}" for p in PARTS) + f" {'box':>7} {'p50 ms':>7} {'p99 ms':>7}"]
        for key, var in common["variants"].items():
            cost = var["cpu_us_parts"]
            box = cost.get("sut", 0.0) + cost.get("db", 0.0) + cost.get("db_shared", 0.0)
            lat = var.get("latency_ms") or {}
            lines.append(f"{key:<10} " + " ".join(f"{cost.get(p, 0.0):9.0f}" for p in PARTS)
                         + f" {box:7.0f} {lat.get('p50') or 0:7.2f} {lat.get('p99') or 0:7.2f}")
    for key, m in results.get("model", {}).items():
        lines += ["", f"16-core model from {key} (box = gateway + database = {m['box_us']:.0f} µs/txn, "
                  f"{USABLE:.0%} of each core usable):",
                  f"  gateway + database on the box, generator and host elsewhere: "
                  f"{m['rate_gateway_and_db_on_box'] or 0:,.0f}/s",
                  f"  everything on the box (as here):                              "
                  f"{m['rate_everything_on_box'] or 0:,.0f}/s",
                  f"  {TARGET_RATE:,}/s needs {m['cores_for_target']:.1f} cores (gateway "
                  f"{m['gateway_cores_for_target']:.1f} + database {m['db_cores_for_target']:.1f}), plus "
                  f"{m['generator_cores_for_target']:.1f} generator and {m['host_sim_cores_for_target']:.1f} host "
                  "simulator cores elsewhere"
                  + (f"; at least {m['workers_for_target']} workers (one worker's max here)"
                     if "workers_for_target" in m else "")]
    lines += ["", f"elapsed {results.get('elapsed_s', 0):.0f} s; other work on the machine: "
              f"{results.get('other_work')}"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter steps, fewer of them (a few minutes)")
    parser.add_argument("--workers", default="1,2", help="worker counts on PostgreSQL (default 1,2)")
    parser.add_argument("--no-sqlite", action="store_true", help="leave out the SQLite system")
    parser.add_argument("--pg-url", default=DEFAULT_PG,
                        help="a PostgreSQL server (a database of each system's own is created there and dropped)")
    parser.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    args = parser.parse_args()
    counts = sorted({int(n) for n in args.workers.split(",") if n.strip()})
    plan = bg.QUICK if args.quick else bg.FULL
    cpus = len(os.sched_getaffinity(0))
    placement = (f"placement: {cpus} CPUs, nothing pinned: load generator (this process, one event loop), host "
                 "simulators, PostgreSQL and the gateway's processes share them")

    def log(line: str) -> None:
        print(line, flush=True)

    results: dict[str, Any] = {"mode": "quick" if args.quick else "full", "placement": placement, "cpus": cpus,
                               "sessions": SESSIONS, "plan": asdict(plan), "systems": {}}
    workdir = Path(tempfile.mkdtemp(prefix="gateway-scale-"))
    started = time.monotonic()
    log(placement)
    bench: ScaleBench | None = None
    try:
        with Services(workdir) as services:
            bench = ScaleBench(plan, services, workdir, None, None, log, pg_admin=args.pg_url)
            targets: dict[str, Any] = {}
            if not args.no_sqlite:
                targets["sqlite-1"] = bench.start_system("sqlite-1", "SQLite, 1 process", workers=1, postgres=False)
            for n in counts:
                targets[f"pg-{n}"] = bench.start_system(f"pg-{n}", f"PostgreSQL, {n} worker(s)", workers=n,
                                                        postgres=True)
            systems = bench.find_max(targets)
            results["systems"] = systems
            maxima = [s["max_rate"] for s in systems.values() if s.get("max_rate")]
            if maxima:
                rate = bg.nice_rate(0.5 * min(maxima))
                log(f"\nevery system at {rate:.0f}/s (half the smallest maximum), {plan.compare_rounds} interleaved "
                    "round(s)")
                common = bench.compare(targets, rate, plan.compare_rounds)
                for var in common["variants"].values():
                    var["cpu_us_parts"] = parts_of(var["steps"], "cpu_us")
                    var["util_parts"] = parts_of(var["steps"], "util")
                results["common"] = common
                one = systems.get("pg-1", {}).get("max_rate")
                results["model"] = {key: model(var["cpu_us_parts"], one)
                                    for key, var in common["variants"].items() if key.startswith("pg-")}
            for target in targets.values():
                bench.stop(target)
    finally:
        results["elapsed_s"] = time.monotonic() - started
        if bench is not None:
            others = [st.util.get(bg.OTHER, 0.0) for st in bench.steps_run]
            results["other_work"] = {"waited_s": round(bench.waited, 1), "steps": len(others),
                                     "disturbed_steps": sum(o > bg.DISTURBED for o in others),
                                     "max_util": round(max(others, default=0.0), 2)}
            try:
                bench.drop_databases()
            except Exception as exc:  # the figures stand; say what was left behind
                log(f"could not drop the bench databases {bench.databases}: {exc}")
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
