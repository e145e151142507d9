"""`gateway trace ...`: the conformance-run tools. A simple registry: each module in
`TRACE_COMMAND_MODULES` has `add_command(subparsers)` adding one `gateway trace <name>` sub-command, so
record/import/check and replay/diff live in their own modules and are added here by name."""

from __future__ import annotations

import argparse
import importlib

#: modules that add `gateway trace` sub-commands, in help order
TRACE_COMMAND_MODULES: list[str] = [
    "gateway.trace.check_cli",  # check
    "gateway.trace.import_cli",  # import
    "gateway.trace.proxy",  # proxy
]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("trace", help="conformance traces: record (proxy), import, check")
    trace_sub = parser.add_subparsers(dest="trace_command", metavar="TRACE_COMMAND")
    for name in TRACE_COMMAND_MODULES:
        importlib.import_module(name).add_command(trace_sub)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
