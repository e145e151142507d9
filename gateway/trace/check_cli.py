"""`gateway trace check TRACE [TRACE ...]`: the offline check, with a summary line, --json, --junit.
Several files are read as one stream, in the order given (rotated parts: oldest first)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from gateway.iso.errors import IsoError
from gateway.trace.check import DEFAULT_WINDOW, Checker, CheckOptions
from gateway.trace.format import Record, TraceFormatError, read_trace
from gateway.trace.report import summary_line, write_json, write_junit

#: findings printed to the terminal (all of them go to --json / --junit)
SHOWN = 20


def _stream(paths: list[Path], checker_box: list[Checker], options: CheckOptions,
            progress: bool) -> Iterator[Record]:
    count = 0
    for i, path in enumerate(paths):
        header, records = read_trace(path)
        if i == 0:
            try:
                options.continued = int(header.notes.get("part", 1)) > 1
                checker_box.append(Checker(header, options))
            except (IsoError, ValueError, TypeError) as exc:  # an unknown dialect or framing in the header
                raise TraceFormatError(f"{path}: {exc}") from None
        for rec in records:
            count += 1
            if progress and count % 250_000 == 0:
                print(f"  ... {count:,} records", file=sys.stderr, flush=True)
            yield rec


def _check_command(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.traces]
    options = CheckOptions(window=args.window)
    started = time.perf_counter()
    box: list[Checker] = []
    try:
        for rec in _stream(paths, box, options, args.progress):
            box[0].feed(rec)
    except (OSError, TraceFormatError) as exc:
        print(f"gateway trace check: {exc}", file=sys.stderr)
        return 2
    if not box:
        print("gateway trace check: no trace given", file=sys.stderr)
        return 2
    checker = box[0]
    cases = checker.results()
    seconds = time.perf_counter() - started
    title = f"trace check {paths[-1].name}"
    print(summary_line(title, cases, seconds) + f" ({checker.frames:,} frames, {checker.events:,} events)")
    shown = 0
    for case in cases:
        for finding in case.findings:
            if shown < SHOWN:
                print(f"  {case.name.split(':')[0]}: {finding.message}")
            shown += 1
    if shown > SHOWN:
        print(f"  ... {shown - SHOWN} more findings (see --json / --junit)")
    if args.json:
        write_json(Path(args.json), title, cases, seconds)
    if args.junit:
        write_junit(Path(args.junit), title, cases, seconds)
    return 0 if all(not c.findings for c in cases) else 1


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="check a trace offline: decode/re-encode, pairing, cross-message invariants")
    p.add_argument("traces", nargs="+", metavar="TRACE", help="trace file(s); rotated parts oldest first")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--junit", metavar="FILE", help="write the results as JUnit XML")
    p.add_argument("--window", type=float, default=DEFAULT_WINDOW,
                   help="seconds of trace time a request may wait for its answer (default %(default)s)")
    p.add_argument("--progress", action="store_true", help="print progress to stderr on long runs")
    p.set_defaults(func=_check_command)
