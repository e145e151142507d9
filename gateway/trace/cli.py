"""`gateway trace …`: the conformance-run tools. This module only assembles the sub-commands; each
group lives with the code it drives (`replay_cli`: replay and diff)."""

from __future__ import annotations

import argparse

from gateway.trace.replay_cli import register_trace_commands


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("trace", help="conformance runs against recorded traces (replay, diff)")
    trace_subparsers = p.add_subparsers(dest="trace_command", metavar="TRACE-COMMAND")
    register_trace_commands(trace_subparsers)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
