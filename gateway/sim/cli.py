"""`gateway sim-host` and `gateway sim-terminal`: the simulators from the command line.

    gateway sim-host --listen 127.0.0.1:6000 [--config rules.toml] [--keys test-keys.toml | --zmk HEX]
                     [--tls-cert PEM --tls-key PEM [--tls-ca PEM --tls-client-certs required]]
    gateway sim-terminal --target 127.0.0.1:5000 --keys test-keys.toml [--terminal-id ID] [--count N]
    gateway sim-terminal --target 127.0.0.1:5000 --terminal-id T0000001 --tmk HEX [--count N]
                     [--tls-ca PEM [--tls-cert PEM --tls-key PEM] [--tls-server-name NAME]]

`--keys` reads the TEST KEYS file `gateway init` writes (gateway.sim.keyfile): the host simulator's
ZMK, the terminal's id, merchant id and TMK, so they match what the gateway has registered.
The `--tls-*` options speak TLS to (or as) a gateway configured with [terminal_side.tls] / [host.tls].
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import secrets
import ssl
import sys
from pathlib import Path
from typing import Any

import anyio

from gateway.config import ConfigError, Endpoint, TlsClientConfig, TlsServerConfig
from gateway.iso.message import mask_pan
from gateway.net.tls import client_context, server_context
from gateway.security.algorithms import parse_hex_key
from gateway.security.errors import SecurityError
from gateway.sim.host import HostSimConfig, HostSimulator, parse_zmk
from gateway.sim.host_rules import SimConfigError
from gateway.sim.keyfile import KeyFileError, read_test_keys
from gateway.sim.terminal import Card, TerminalError, TerminalSimulator

DEFAULT_TMK = "0123456789ABCDEFFEDCBA9876543210"
DEFAULT_MERCHANT = "123456789012345"
DEFAULT_PAN = "6222020000000015"


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    host = subparsers.add_parser("sim-host", help="run the host simulator (ISO 8583:1987 acquirer host)")
    host.add_argument("--listen", default="127.0.0.1:6000", help="HOST:PORT to listen on (port 0: any)")
    host.add_argument("--config", help="TOML file: rules, card ranges, balances, PINs, faults, dialect")
    zmk = host.add_mutually_exclusive_group()
    zmk.add_argument("--keys", metavar="FILE", help="the TEST KEYS file of `gateway init` (its ZMK)")
    zmk.add_argument("--zmk", help="zone master key shared with the gateway, 32 hex characters")
    host.add_argument("--dialect", help="host dialect (default iso87-ascii)")
    host.add_argument("--framing", choices=("len2", "ascii4", "cup"), help="length framing (default len2)")
    host.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    host.add_argument("--tls-cert", help="speak TLS: the host's PEM certificate (with --tls-key)")
    host.add_argument("--tls-key", help="the PEM private key of --tls-cert")
    host.add_argument("--tls-ca", help="PEM CA bundle client certificates must chain to")
    host.add_argument("--tls-client-certs", choices=("none", "optional", "required"), default="none",
                      help="ask the gateway for a client certificate (needs --tls-ca)")
    host.set_defaults(func=run_host)

    term = subparsers.add_parser("sim-terminal", help="sign a simulated CUP terminal in and run purchases")
    term.add_argument("--target", default="127.0.0.1:5000",
                      help="the gateway's terminal port, HOST:PORT (default %(default)s)")
    term.add_argument("--keys", metavar="FILE",
                      help="the TEST KEYS file of `gateway init`: terminal id, merchant id and TMK from it")
    term.add_argument("--terminal-id", help="field 41, 8 characters (with --keys: default its first terminal)")
    term.add_argument("--merchant-id", help="field 42, 15 characters (default: from --keys, else 123456789012345)")
    term.add_argument("--tmk", help="the terminal's master key, hex (default: from --keys, else the demo key)")
    term.add_argument("--batch", help="batch number (60.2) to start in, 6 digits (default: random, so a "
                                      "rerun's STANs are not duplicates of the last run's)")
    term.add_argument("--count", type=int, default=3, help="purchases to run (default 3)")
    term.add_argument("--amount", type=int, default=100, help="amount in minor units (default 100)")
    term.add_argument("--pan", default=DEFAULT_PAN, help="test card number")
    term.add_argument("--pin", help="PIN to enter (default: no PIN)")
    term.add_argument("--key-mode", choices=("001", "003", "004"), default="004")
    term.add_argument("--timeout", type=float, default=10.0)
    term.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    term.add_argument("--tls", action="store_true", help="speak TLS (implied by any --tls-* option)")
    term.add_argument("--tls-ca", help="PEM CA bundle the gateway's certificate must chain to (default: system)")
    term.add_argument("--tls-cert", help="the terminal's PEM client certificate (with --tls-key), for mTLS")
    term.add_argument("--tls-key", help="the PEM private key of --tls-cert")
    term.add_argument("--tls-server-name", help="name the gateway's certificate must carry (default: the target host)")
    term.set_defaults(func=run_terminal)


def _host_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not (args.tls_cert or args.tls_key):
        return None
    if not (args.tls_cert and args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    if args.tls_client_certs != "none" and not args.tls_ca:
        raise ConfigError("--tls-client-certs needs --tls-ca")
    return server_context(TlsServerConfig(cert=Path(args.tls_cert), key=Path(args.tls_key),
                                          ca=Path(args.tls_ca) if args.tls_ca else None,
                                          client_certs=args.tls_client_certs), "--tls")


def _terminal_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name):
        return None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    return client_context(TlsClientConfig(ca=Path(args.tls_ca) if args.tls_ca else None,
                                          cert=Path(args.tls_cert) if args.tls_cert else None,
                                          key=Path(args.tls_key) if args.tls_key else None), "--tls")


def _backend_options(backend: str) -> dict[str, Any]:
    return {"use_uvloop": True} if backend == "asyncio" else {}


def _fail(text: str) -> int:
    print(f"error: {text}", file=sys.stderr)
    return 2


def run_host(args: argparse.Namespace) -> int:
    try:
        listen = Endpoint.parse(args.listen, "--listen")
        config = HostSimConfig.from_toml(args.config) if args.config else HostSimConfig()
        changes: dict[str, Any] = {}
        if args.keys:
            changes["zmk"] = read_test_keys(args.keys).zmk
        if args.zmk:
            changes["zmk"] = parse_zmk(args.zmk)
        if args.dialect:
            changes["dialect"] = args.dialect
        if args.framing:
            changes["framing"] = args.framing
        if changes:
            config = HostSimConfig(**{**_fields(config), **changes})
        sim = HostSimulator(config)
        tls = _host_tls(args)
    except (ConfigError, SimConfigError, KeyFileError) as exc:
        return _fail(str(exc))

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            port = await tg.start(functools.partial(sim.serve, listen.host, listen.port, ssl_context=tls))
            print(f"host simulator listening on {listen.host}:{port} ({config.dialect}, {config.framing}"
                  f"{', TLS' if tls is not None else ''})", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(main, backend=args.backend, backend_options=_backend_options(args.backend))
    return 0


def _fields(config: HostSimConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in HostSimConfig.__dataclass_fields__}


def _terminal_identity(args: argparse.Namespace) -> tuple[str, str, bytes]:
    """Terminal id, merchant id and TMK: from the options, else the test-keys file, else the demo's."""
    terminal_id, merchant_id, tmk_text = args.terminal_id, args.merchant_id, args.tmk
    tmk = parse_hex_key(tmk_text, "TMK") if tmk_text else None
    if args.keys:
        entry = read_test_keys(args.keys).terminal(terminal_id)
        terminal_id, merchant_id = entry.terminal_id, merchant_id or entry.merchant_id
        tmk = tmk or entry.tmk
    if terminal_id is None:
        raise KeyFileError("--terminal-id is needed without --keys")
    return terminal_id, merchant_id or DEFAULT_MERCHANT, tmk or parse_hex_key(DEFAULT_TMK, "TMK")


def run_terminal(args: argparse.Namespace) -> int:
    try:
        target = Endpoint.parse(args.target, "--target")
        terminal_id, merchant_id, tmk = _terminal_identity(args)
        tls = _terminal_tls(args)
    except (ConfigError, SecurityError, KeyFileError) as exc:
        return _fail(str(exc))
    if len(terminal_id) != 8:
        return _fail("--terminal-id: expected 8 characters")
    if len(merchant_id) != 15:
        return _fail("--merchant-id: expected 15 characters")
    if args.count < 0:
        return _fail("--count: must not be negative")
    batch = args.batch or f"{secrets.randbelow(999_999) + 1:06d}"
    if len(batch) != 6 or not batch.isdigit():
        return _fail("--batch: expected 6 digits")
    card = Card(args.pan, pin=args.pin)

    async def main() -> int:
        terminal = TerminalSimulator(
            target.host, target.port, terminal_id, merchant_id, tmk,
            timeout=args.timeout, key_mode=args.key_mode, batch=batch, ssl_context=tls,
            tls_hostname=args.tls_server_name,
        )
        failures = 0
        async with terminal:
            signed = await terminal.sign_in()
            print(f"signed in {terminal_id} batch {terminal.batch} rc {signed.rc}", flush=True)
            for _ in range(args.count):
                result = await terminal.purchase(args.amount, card)
                rc = result.rc or "--"
                note = " (timeout)" if result.timed_out else " (bad MAC)" if result.mac_ok is False else ""
                if result.reversal is not None:
                    note += f" reversed: {result.reversal.rc or '--'}"
                print(f"{mask_pan(card.pan)} {args.amount:>12} rc {rc} rrn {result.rrn or '-':<12}"
                      f" stan {result.stan}{note}", flush=True)
                failures += not result.approved
        return 1 if failures else 0

    try:
        return anyio.run(main, backend=args.backend, backend_options=_backend_options(args.backend))
    except TerminalError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130
