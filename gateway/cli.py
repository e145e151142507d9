"""The one `gateway` command. Each sub-command group lives in the module that owns it and adds itself
through `register(subparsers)`; this file only assembles them and turns expected errors into exit codes.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from gateway import logs

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


def _add_log_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """-v and --log-format, accepted before and after the sub-command (`gateway serve -vv`). On the
    sub-commands they default to SUPPRESS, so an option given before the sub-command is not undone."""
    verbose: dict[str, object] = {"default": 0} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("-v", "--verbose", action="count", **verbose,  # type: ignore[arg-type]
                        help="more logging (serve: INFO by default, -v debug; other commands: -v info, "
                             "-vv debug). Debug includes a masked trace of every message; -vv adds other "
                             f"libraries' debug lines. Default from ${logs.LEVEL_ENV} (debug, info, warning, error)")
    parser.add_argument("--log-format", choices=logs.FORMATS, default=None if top else argparse.SUPPRESS,
                        help=f"log lines as text or as one JSON object per line (default: ${logs.FORMAT_ENV} "
                             "or text)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="ISO 8583 acquirer gateway")
    _add_log_options(parser, top=True)
    parser.add_argument("--version", action=_VersionAction, help="version, Python, event loops and codec")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    for sub in {id(p): p for p in subparsers.choices.values()}.values():  # aliases share a parser
        _add_log_options(sub, top=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        logs.configure(args.verbose, args.log_format, command=args.command)
    except logs.LogConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
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
