"""`gateway trace ...`: the conformance-run tools. A simple registry: each module in
`TRACE_COMMAND_MODULES` has `add_command(subparsers)` adding one `gateway trace <name>` sub-command, so
record/import/check and replay/diff live in their own modules and are added here by name."""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

#: the shell's exit status for a command killed by SIGPIPE (128 + 13): `gateway trace check ... | head`
EXIT_BROKEN_PIPE = 141

#: modules that add `gateway trace` sub-commands, in help order
TRACE_COMMAND_MODULES: list[str] = [
    "gateway.trace.check_cli",  # check
    "gateway.trace.import_cli",  # import
    "gateway.trace.proxy",  # proxy
    "gateway.trace.replay_cli",  # replay, diff
]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("trace", help="conformance traces: record (proxy), import, check, replay, diff")
    trace_sub = parser.add_subparsers(dest="trace_command", metavar="TRACE_COMMAND")
    for name in TRACE_COMMAND_MODULES:
        importlib.import_module(name).add_command(trace_sub)
    for sub in {id(p): p for p in trace_sub.choices.values()}.values():
        func = sub.get_default("func")
        if func is not None:
            sub.set_defaults(func=_quiet_on_broken_pipe(func))
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _quiet_on_broken_pipe(func: Callable[[argparse.Namespace], Any]) -> Callable[[argparse.Namespace], Any]:
    """A reader that went away (`| head`) ends the command quietly, as SIGPIPE would, not with a
    traceback; stdout is pointed at /dev/null so the interpreter's last flush does not fail again."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> Any:
        try:
            result = func(args)
            sys.stdout.flush()  # inside the guard: buffered output may be what meets the closed pipe
            return result
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return EXIT_BROKEN_PIPE

    return run
