"""The one `gateway` command. Each sub-command group lives in the module that owns it and adds itself
through `register(subparsers)`; this file only assembles them and turns expected errors into exit codes.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

#: modules that add sub-commands, in help order
COMMAND_MODULES = (
    "gateway.serve",  # serve
    "gateway.initdir",  # init
    "gateway.config_cli",  # config check|show
    "gateway.health_cli",  # health
    "gateway.demo",  # demo
    "gateway.iso.cli",  # decode, encode
    "gateway.security.cli",  # keys
    "gateway.store.cli",  # saf, journal
    "gateway.sim.cli",  # sim-host, sim-terminal
    "gateway.load.cli",  # load
    "gateway.trace.cli",  # trace
)


class _VersionAction(argparse.Action):
    """Like argparse's "version" action, but the report is built only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help=str(kwargs.get("help", "")))

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        from gateway.version import version_report

        print(version_report())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="ISO 8583 acquirer gateway")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("--version", action=_VersionAction, help="version, Python, event loops and codec")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
