"""`gateway trace replay` and `gateway trace diff`: argument parsing, output and exit codes (0 only
when every case passes; 1 when one fails; 2 when the run cannot start)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import anyio

from gateway.config import ConfigError, Endpoint
from gateway.sim.keyfile import KeyFileError, read_test_keys
from gateway.trace.diff import diff
from gateway.trace.format import TraceFormatError
from gateway.trace.pace import Pace
from gateway.trace.replay import DEFAULT_PIN, ReplayError, ReplayOptions, replay
from gateway.trace.report import CaseSink
from gateway.trace.rules import RulesError
from gateway.trace.rulesfile import load_rules

#: where `gateway init` leaves the lab keys when --keys is not given
DEFAULT_KEYS = Path("test-keys.toml")
#: failed cases (and findings per case) shown on the terminal; the reports have all of them
SHOWN_CASES, SHOWN_FINDINGS = 20, 6


def _endpoint(text: str) -> Endpoint:
    try:
        return Endpoint.parse(text, "address")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _pace(text: str) -> Pace:
    try:
        return Pace.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("expected a number >= 0")
    return value


def _report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rules", type=Path, help="rules file (default: NAME.rules.toml beside the trace, if any)")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--junit", type=Path, help="write the results as JUnit XML here (for CI)")
    p.add_argument("--horizon", type=_positive, default=30.0,
                   help="trace seconds a recorded case may stay incomplete (bounds memory; default 30)")


def add_command(trace_subparsers: argparse._SubParsersAction) -> None:
    """The `gateway trace` registry's hook (gateway/trace/cli.py): this module adds two commands."""
    register_trace_commands(trace_subparsers)


def register_trace_commands(trace_subparsers: argparse._SubParsersAction) -> None:
    p = trace_subparsers.add_parser(
        "replay", help="play a trace's terminal leg against a gateway, answer its host from the trace, compare",
        description="Play the recorded terminal leg against a gateway (--target) while a trace host on "
                    "--host-listen answers the gateway's upstream requests from the recorded host leg; "
                    "compare every answer and upstream request field by field. Template cases of the "
                    "rules file run after the trace (or alone, without TRACE).")
    p.add_argument("trace", nargs="?", type=Path, help="the trace (JSON lines); omit to run template cases only")
    p.add_argument("--target", type=_endpoint, required=True, help="the gateway's terminal port, HOST:PORT")
    p.add_argument("--host-listen", type=_endpoint, required=True,
                   help="where the trace host listens, HOST:PORT (the gateway's host address)")
    p.add_argument("--keys", type=Path, default=None,
                   help=f"the TEST KEYS file `gateway init` wrote (default: ./{DEFAULT_KEYS})")
    p.add_argument("--pace", type=_pace, default=Pace(), help="recorded, asap (default) or xN (N times faster)")
    p.add_argument("--concurrency", type=int, default=100, help="cases in flight at most (default 100)")
    p.add_argument("--pin", default=None, help=f"lab PIN in PIN blocks (default: the rules file's, else {DEFAULT_PIN})")
    p.add_argument("--answer-timeout", type=_positive, default=10.0,
                   help="seconds beyond the recorded answer time before an answer counts as missing")
    p.add_argument("--grace", type=_positive, default=5.0,
                   help="seconds beyond the recorded time before an upstream request counts as missing")
    p.add_argument("--ready-timeout", type=_positive, default=30.0,
                   help="seconds to wait for the gateway to connect to the trace host and sign on")
    p.add_argument("--progress", type=_positive, default=10.0, help="seconds between progress lines (0: none)")
    p.add_argument("--terminal-mac", choices=("cup-ecb", "x919"), default="cup-ecb",
                   help="the terminals' MAC algorithm (the gateway's security.terminal_mac)")
    p.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    _report_options(p)
    p.set_defaults(func=_replay_command)

    d = trace_subparsers.add_parser(
        "diff", help="compare two traces case by case (a re-run against a recording; two gateways)",
        description="Compare trace B against trace A under the same rules as a replay (diff mode).")
    d.add_argument("a", type=Path, help="the expected trace")
    d.add_argument("b", type=Path, help="the trace to check")
    _report_options(d)
    d.set_defaults(func=_diff_command)


def _show(sink: CaseSink, out: TextIO) -> None:
    for case in sink.failures[:SHOWN_CASES]:
        print(f"  FAIL {case.name}", file=out)
        for f in case.findings[:SHOWN_FINDINGS]:
            print(f"       {f.message}", file=out)
        if len(case.findings) > SHOWN_FINDINGS:
            print(f"       … {len(case.findings) - SHOWN_FINDINGS} more", file=out)
    if sink.failed > SHOWN_CASES:
        print(f"  … {sink.failed - SHOWN_CASES} more failed cases (see --json / --junit)", file=out)


def _finish(sink: CaseSink, seconds: float) -> int:
    sink.close(seconds)
    _show(sink, sys.stdout)
    print(sink.summary(seconds), flush=True)
    return 0 if sink.ok else 1


def _fail(what: str, exc: Exception) -> int:
    print(f"gateway trace {what}: {exc}", file=sys.stderr, flush=True)
    return 2


def _replay_command(args: argparse.Namespace) -> int:
    try:
        keys_path = args.keys if args.keys is not None else DEFAULT_KEYS
        keys = read_test_keys(keys_path)
        rules = load_rules(args.rules, trace=args.trace)
        if args.trace is None and not rules.templates:
            raise RulesError("nothing to run: give a trace, or a rules file with [[case]] templates")
        if args.concurrency < 1:
            raise ReplayError("--concurrency must be at least 1")
        options = ReplayOptions(
            target=args.target, host_listen=args.host_listen, keys=keys, rules=rules, pace=args.pace,
            concurrency=args.concurrency, pin=args.pin or rules.pin or DEFAULT_PIN,
            answer_timeout=args.answer_timeout, grace=args.grace, horizon=args.horizon,
            ready_timeout=args.ready_timeout, progress=args.progress, terminal_mac=args.terminal_mac)
    except (KeyFileError, RulesError, ReplayError) as exc:
        return _fail("replay", exc)
    sink = CaseSink("trace replay", json_path=args.json, junit_path=args.junit)
    say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    started = time.monotonic()
    try:
        anyio.run(replay, args.trace, options, sink, say, backend=args.backend,
                  backend_options={"use_uvloop": True} if args.backend == "asyncio" else {})
    except (ReplayError, TraceFormatError, OSError) as exc:
        sink.close(time.monotonic() - started)
        return _fail("replay", exc)
    return _finish(sink, time.monotonic() - started)


def _diff_command(args: argparse.Namespace) -> int:
    try:
        rules = load_rules(args.rules, trace=args.a)
        sink = CaseSink("trace diff", json_path=args.json, junit_path=args.junit)
        started = time.monotonic()
        diff(args.a, args.b, rules, sink, horizon=args.horizon)
    except (RulesError, TraceFormatError, OSError) as exc:
        return _fail("diff", exc)
    return _finish(sink, time.monotonic() - started)
