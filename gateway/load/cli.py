"""`gateway load`: drive an endpoint open-loop (--rate) or closed-loop (--concurrency) and report."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from typing import Any

from gateway.load.config import DEFAULT_OPEN_LOOP_SESSIONS, LoadConfig, parse_mix
from gateway.load.driver import LoadError, driver_names
from gateway.load.processes import run_load_processes
from gateway.load.thresholds import Thresholds, parse_ms, parse_rate
from gateway.sim.keyfile import KeyFileError, LabKeys, read_test_keys

DEFAULT_DURATION = 10.0
#: exit codes: the run could not be done / no request succeeded / a --max-* limit was exceeded
EXIT_LOAD_ERROR, EXIT_NOTHING_OK, EXIT_LIMIT_EXCEEDED = 1, 3, 4


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "load",
        help="generate load against an endpoint and report latency percentiles",
        description="Open loop (--rate: fixed schedule, latency from the intended start, so a slow server "
                    "cannot hide its queueing) or closed loop (--concurrency: N requests in flight).",
    )
    p.add_argument("--target", required=True, metavar="HOST:PORT", help="endpoint to drive")
    p.add_argument("--driver", default="echo", metavar="NAME",
                   help=f"request driver: {', '.join(driver_names())}, or package.module:factory "
                        "(default: %(default)s)")
    load = p.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=float, metavar="R", help="open loop: requests per second")
    load.add_argument("--concurrency", type=int, metavar="N", help="closed loop: requests in flight")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--duration", type=float, metavar="S",
                        help=f"measured seconds after the warm-up (default {DEFAULT_DURATION:g})")
    length.add_argument("--count", type=int, metavar="N", help="measured requests after the warm-up")
    p.add_argument("--warmup", type=float, default=0.0, metavar="S",
                   help="seconds of load excluded from the statistics (default 0)")
    p.add_argument("--mix", default="purchase=1", metavar="KIND=W,...",
                   help="weighted request kinds, e.g. purchase=8,refund=1,balance=1 (default %(default)s)")
    p.add_argument("--sessions", type=int, metavar="N",
                   help="open loop: connections the schedule is spread over (default 64)")
    p.add_argument("--processes", type=int, default=1, metavar="K",
                   help="split the load over K worker processes (default 1)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="per-request timeout; a timed-out session is replaced (default 10)")
    p.add_argument("--seed", type=int, help="seed for the kind mix (repeatable runs)")
    p.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio",
                   help="event loop of the load processes (asyncio uses uvloop)")
    p.add_argument("--keys", metavar="FILE",
                   help="cup driver: the TEST KEYS file of `gateway init` (registered terminals and their "
                        "TMKs); open-loop sessions default to its terminals (at most 64)")
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="driver option, repeatable (echo: size=BYTES)")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    p.add_argument("--plot", metavar="PATH",
                   help="write a PNG: latency, rate and errors by code over time, and the latency percentile "
                        "distribution")
    p.add_argument("--max-error-rate", metavar="RATE",
                   help=f"fail (exit {EXIT_LIMIT_EXCEEDED}) when more than this share of requests does not "
                        "succeed: 0.01 or 1%%")
    p.add_argument("--max-p99", metavar="MS",
                   help=f"fail (exit {EXIT_LIMIT_EXCEEDED}) when the p99 latency exceeds this many milliseconds")
    p.add_argument("--state", metavar="PATH",
                   help="where simulated terminals keep their batch number between runs, so a rerun is not "
                        "refused as a duplicate (cup driver; default $XDG_STATE_HOME/gateway/terminals.json); "
                        "'none': keep nothing and start from a random batch")
    p.add_argument("--progress", action="store_true",
                   help="a progress line per second on stderr (default: only when stderr is a terminal)")
    p.set_defaults(func=run)


def parse_options(pairs: list[str]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise LoadError(f"driver option {pair!r} is not KEY=VALUE")
        options[key.strip()] = value
    return options


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    duration = args.duration
    if duration is None and args.count is None:
        duration = DEFAULT_DURATION
    sessions = args.sessions
    if sessions is None and args.concurrency is None and getattr(args, "keys", None):
        sessions = min(DEFAULT_OPEN_LOOP_SESSIONS, len(_test_keys(args.keys).terminals)) or None
    return LoadConfig(
        rate=args.rate,
        concurrency=args.concurrency,
        duration=duration,
        count=args.count,
        warmup=args.warmup,
        mix=parse_mix(args.mix),
        sessions=sessions,
        request_timeout=args.timeout,
        seed=args.seed,
    )


def _test_keys(path: str) -> LabKeys:
    try:
        return read_test_keys(path)
    except KeyFileError as exc:
        raise LoadError(str(exc)) from None


def driver_options(args: argparse.Namespace) -> dict[str, Any]:
    """What a driver factory receives: every CLI option (picklable), `options` from -o KEY=VALUE."""
    options = {k: v for k, v in vars(args).items() if k != "func"}
    options["options"] = parse_options(args.option)
    return options


def thresholds_from_args(args: argparse.Namespace) -> Thresholds:
    return Thresholds(
        max_error_rate=parse_rate(args.max_error_rate) if args.max_error_rate is not None else None,
        max_p99_ms=parse_ms(args.max_p99) if args.max_p99 is not None else None,
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        thresholds = thresholds_from_args(args)
        started = datetime.now().astimezone()
        report = run_load_processes(args.driver, driver_options(args), config, args.processes,
                                    backend=args.backend, progress=args.progress or sys.stderr.isatty())
        report.target, report.driver, report.started_at = args.target, args.driver, started
        print(report.summary_line())
        if report.errors:
            print(report.errors_line())
        if args.json:
            report.write_json(args.json)
        if args.plot:
            from gateway.load.plot import plot_report

            plot_report(report, args.plot)
    except LoadError as exc:
        print(f"gateway load: {exc}", file=sys.stderr)
        return EXIT_LOAD_ERROR
    if not report.ok:
        print("gateway load: FAILED: no request succeeded")
        return EXIT_NOTHING_OK
    failures = thresholds.failures(report)
    for line in failures:
        print(f"gateway load: FAILED: {line}")
    return EXIT_LIMIT_EXCEEDED if failures else 0
