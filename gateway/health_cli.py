"""`gateway health`: ask a gateway's admin endpoint whether it is alive (/healthz) or ready (/readyz).

The container's HEALTHCHECK uses it (the slim image has no curl), and so does the README to wait for a
gateway it has just started:

    gateway health --config lab/gateway.toml --ready --wait 30

Exit 0 when the answer is 200, 1 otherwise (after `--wait` seconds of retrying, if given).
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TextIO

from gateway.config import ConfigError, Endpoint, load_config

DEFAULT_ADMIN = "127.0.0.1:9100"
RETRY_EVERY = 0.25
#: no proxy, whatever HTTP(S)_PROXY says: the probe goes to the admin endpoint it names and nowhere else
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def probe(url: str, timeout: float) -> tuple[int | None, str]:
    """HTTP status and body of one GET (None and the reason when there was no answer)."""
    try:
        with _DIRECT.open(url, timeout=timeout) as response:  # http to our own admin endpoint
            return response.status, response.read(4096).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(4096).decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return None, str(reason)


def _admin_address(args: argparse.Namespace) -> str:
    if args.admin:
        return str(Endpoint.parse(args.admin, "--admin"))
    if args.config:
        listen = load_config(Path(args.config)).admin.listen
        if listen is None:
            raise ConfigError(f"{args.config}: admin.listen is off; nothing to ask")
        # a gateway bound to all interfaces is asked on loopback
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listen.host, listen.host)
        return str(Endpoint(host, listen.port))
    return DEFAULT_ADMIN


def cmd_health(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        address = _admin_address(args)
    except ConfigError as exc:
        print(f"gateway health: {exc}", file=sys.stderr)
        return 2
    url = f"http://{address}/{'readyz' if args.ready else 'healthz'}"
    deadline = time.monotonic() + max(args.wait, 0.0)
    while True:
        status, body = probe(url, args.timeout)
        if status == 200 or time.monotonic() >= deadline:
            break
        time.sleep(RETRY_EVERY)
    text = body.strip() if status is not None else f"no answer ({body})"
    print(f"{url}: {status or '-'} {text}", file=out if status == 200 else sys.stderr)
    return 0 if status == 200 else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("health", help="ask a gateway's admin endpoint: alive (/healthz) or --ready",
                              description="Exit 0 when the admin endpoint answers 200.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--config", help="the gateway's TOML file: ask its admin.listen")
    where.add_argument("--admin", metavar="HOST:PORT", help=f"admin endpoint (default {DEFAULT_ADMIN})")
    p.add_argument("--ready", action="store_true", help="ask /readyz (host link and journal) instead of /healthz")
    p.add_argument("--wait", type=float, default=0.0, metavar="S",
                   help="keep asking for up to S seconds until the answer is 200 (default: ask once)")
    p.add_argument("--timeout", type=float, default=3.0, metavar="S", help="per request (default 3)")
    p.set_defaults(func=cmd_health)
