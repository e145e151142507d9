"""`gateway config check FILE` and `gateway config show FILE`.

`check` reads the file as `gateway serve` would (environment overrides included) and prints every
problem, each with its key, or one line saying what the gateway would do with it; exit 0 / 2.
`show` prints the effective configuration as TOML, after the environment and defaults, with secrets
masked (`--reveal` is deliberately absent: a config dump goes into tickets and chat).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

import tomli_w

from gateway.config import ConfigError, GatewayConfig, load_config, to_document

EXIT_BAD_CONFIG = 2


def _load(path: str | None) -> GatewayConfig:
    return load_config(Path(path) if path else None)


def _report(exc: ConfigError, where: str) -> int:
    count = len(exc.problems)
    print(f"{where}: {count} problem{'s' if count != 1 else ''}", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)
    return EXIT_BAD_CONFIG


def cmd_check(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        config = _load(args.file)
    except ConfigError as exc:
        return _report(exc, args.file or "(defaults)")
    admin = config.admin.listen or "off"
    print(f"{args.file or '(defaults)'}: ok: terminals on {config.terminal_side.listen}, host "
          f"{config.host.address}, admin {admin}, journal {config.store.path}, "
          f"{len(config.terminals)} terminal{'s' if len(config.terminals) != 1 else ''} registered", file=out)
    return 0


def cmd_show(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        config = _load(args.file)
    except ConfigError as exc:
        return _report(exc, args.file or "(defaults)")
    print(f"# effective configuration of {args.file or '(defaults)'}: file, GATEWAY_* environment and "
          f"defaults; secrets masked", file=out)
    out.write(render_toml(to_document(config)))
    return 0


def render_toml(doc: dict[str, Any]) -> str:
    """TOML with the terminals as [[terminals]] tables, like the example (tomli_w would inline short ones)."""
    terminals = doc.pop("terminals", [])
    text = tomli_w.dumps(doc)
    for entry in terminals:
        text += "\n[[terminals]]\n" + tomli_w.dumps(entry)
    return text


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("config", help="check a configuration file, or show the effective configuration",
                              description="Read a config as `gateway serve` would (GATEWAY_<SECTION>__<KEY> "
                                          "environment overrides included).")
    actions = p.add_subparsers(dest="config_action", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="every problem with its key; exit 2 when there is one")
    check.add_argument("file", nargs="?", metavar="FILE", help="TOML file (default: defaults + environment)")
    check.set_defaults(func=cmd_check)
    show = actions.add_parser("show", help="the effective configuration as TOML, secrets masked")
    show.add_argument("file", nargs="?", metavar="FILE", help="TOML file (default: defaults + environment)")
    show.set_defaults(func=cmd_show)
