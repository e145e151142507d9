"""`gateway init DIR`: a working lab in one command: everything `gateway serve` needs, on loopback.

    DIR/gateway.toml     config: listens on 127.0.0.1, its host is the host simulator on 127.0.0.1
    DIR/lmk              the local master key (0600) the key store is encrypted under
    DIR/keys.bin         key store: the ZMK shared with the host simulator and every terminal's TMK
    DIR/test-keys.toml   the same ZMK and TMKs in clear, marked TEST KEYS, for the simulators only
    DIR/.gitignore       "*": nothing of a lab is ever committed by accident

The gateway reads only the config, the LMK and the key store; the simulators read only the test-keys
file (`--keys`), so no key is typed or computed by hand and the terminals the load tool drives are
exactly the terminals the gateway has registered. init refuses a directory that already holds files:
it never overwrites a key.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TextIO

from gateway.config import ConfigError, load_config
from gateway.security.des import generate_key
from gateway.security.errors import SecurityError
from gateway.security.keys import KeyUsage
from gateway.security.keystore import KeyStore, write_lmk_file
from gateway.security.module import SoftwareSecurityModule
from gateway.sim.keyfile import LabKeys, LabTerminal, write_test_keys

FIRST_TERMINAL = 10000001
MERCHANT_ID = "898100012340001"
DEFAULT_TERMINALS = 16
TERMINAL_PORT, HOST_PORT, ADMIN_PORT = 5000, 6000, 9100
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class LabFiles:
    directory: Path
    config: Path
    lmk: Path
    keystore: Path
    test_keys: Path
    journal: Path
    zmk_kcv: str = ""  #: check value of the shared ZMK, once written

    @classmethod
    def under(cls, directory: Path) -> LabFiles:
        d = directory.resolve()
        return cls(d, d / "gateway.toml", d / "lmk", d / "keys.bin", d / "test-keys.toml", d / "journal.db")


@dataclass(frozen=True, slots=True)
class Ports:
    terminals: int = TERMINAL_PORT
    host: int = HOST_PORT
    admin: int = ADMIN_PORT


def render_config(files: LabFiles, terminals: tuple[LabTerminal, ...], ports: Ports) -> str:
    """The lab's gateway.toml: loopback addresses, absolute paths (it works from any directory)."""
    stamp = datetime.now().astimezone().isoformat(timespec="seconds")
    lines = [
        f"# Lab configuration written by `gateway init` on {stamp}.",
        "# Loopback only: the gateway listens on 127.0.0.1 and its host is the host simulator on 127.0.0.1.",
        "# examples/gateway.toml documents every key; GATEWAY_<SECTION>__<KEY> overrides any of them.",
        "",
        "[terminal_side]",
        f'listen = "{LOOPBACK}:{ports.terminals}"',
        "",
        "[host]",
        f'address = "{LOOPBACK}:{ports.host}"  # gateway sim-host --keys {files.test_keys.name} listens here',
        "timeout = 10",
        "",
        "[security]",
        f"keystore = {_toml_text(files.keystore)}  # ZMK and TMKs, encrypted under the LMK",
        f"lmk_file = {_toml_text(files.lmk)}",
        "",
        "[store]",
        f"path = {_toml_text(files.journal)}",
        "",
        "[admin]",
        f'listen = "{LOOPBACK}:{ports.admin}"  # /metrics /healthz /readyz',
        "",
        "# The terminals the gateway accepts; their TMKs are in the key store (clear copies for the",
        f"# simulators in {files.test_keys.name}).",
    ]
    for t in terminals:
        lines += ["[[terminals]]", f'terminal_id = "{t.terminal_id}"', f'merchant_id = "{t.merchant_id}"', ""]
    return "\n".join(lines)


def _toml_text(path: Path) -> str:
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


def init_lab(directory: Path, *, terminals: int = DEFAULT_TERMINALS, ports: Ports | None = None) -> LabFiles:
    """Write a lab into `directory` (created if absent, refused if it holds files)."""
    if not 1 <= terminals <= 9999:
        raise ValueError("--terminals: 1 to 9999")
    files = LabFiles.under(directory)
    if files.directory.exists() and any(files.directory.iterdir()):
        raise FileExistsError(f"{directory} is not empty; init writes keys only into a new or empty directory")
    files.directory.mkdir(parents=True, exist_ok=True)
    os.chmod(files.directory, 0o700)  # it holds an LMK and clear test keys
    (files.directory / ".gitignore").write_text("# a gateway lab: keys and journal, never committed\n*\n")

    zmk = generate_key(16)
    lab_terminals = tuple(LabTerminal(f"{FIRST_TERMINAL + i:08d}", MERCHANT_ID, generate_key(16))
                          for i in range(terminals))
    lmk = write_lmk_file(files.lmk)
    store = KeyStore.create(files.keystore, lmk)
    module = SoftwareSecurityModule(store)
    zmk_kcv = module.import_clear_key(KeyUsage.ZMK, zmk, save=False).hex().upper()
    for t in lab_terminals:
        module.import_clear_key(KeyUsage.TMK, t.tmk, t.terminal_id, save=False)
    store.save()
    write_test_keys(files.test_keys, LabKeys(zmk, lab_terminals))
    fd = os.open(files.config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(render_config(files, lab_terminals, ports or Ports()))
    load_config(files.config, environ={})  # what we wrote must be what serve accepts
    return replace(files, zmk_kcv=zmk_kcv)


def next_steps(files: LabFiles, program: str, ports: Ports) -> str:
    """The commands that run the lab, with paths as the operator typed the directory."""
    keys = shlex.quote(_shown(files.test_keys))
    config = shlex.quote(_shown(files.config))
    target = f"{LOOPBACK}:{ports.terminals}"
    return "\n".join([
        "Run each in its own terminal (or end the first two lines with &):",
        f"  {program} sim-host --keys {keys} --listen {LOOPBACK}:{ports.host}",
        f"  {program} serve --config {config}",
        f"  {program} sim-terminal --keys {keys} --target {target}",
        "or load instead of one terminal:",
        f"  {program} load --keys {keys} --driver cup --target {target} --rate 100 --duration 10",
        "Then look at what happened:",
        f"  {program} journal show --config {config}",
        f"  {program} saf list --config {config}",
    ])


def _shown(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:  # pragma: no cover - another drive on Windows
        return str(path)


def _summary(files: LabFiles, terminals: int, out: TextIO) -> None:
    first, last = f"{FIRST_TERMINAL:08d}", f"{FIRST_TERMINAL + terminals - 1:08d}"
    print(f"lab written to {_shown(files.directory)}/: {terminals} terminals {first}..{last}, "
          f"merchant {MERCHANT_ID}", file=out)
    print(f"  config     {_shown(files.config)}  (loopback only)", file=out)
    print(f"  LMK        {_shown(files.lmk)}  (0600: the key store's master key)", file=out)
    print(f"  key store  {_shown(files.keystore)}  (ZMK + {terminals} TMKs, encrypted under the LMK)", file=out)
    print(f"  TEST KEYS  {_shown(files.test_keys)}  (clear copies for the simulators only)", file=out)
    print(f"  ZMK check value {files.zmk_kcv} (the host simulator's, from the test-keys file)", file=out)


def _program() -> str:
    argv0 = sys.argv[0] if sys.argv else ""
    return argv0 if Path(argv0).name == "gateway" else "gateway"


def cmd_init(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    ports = Ports(args.terminal_port, args.host_port, args.admin_port)
    try:
        files = init_lab(Path(args.directory), terminals=args.terminals, ports=ports)
    except (OSError, ValueError, SecurityError, ConfigError) as exc:
        print(f"gateway init: {exc}", file=sys.stderr)
        return 1
    _summary(files, args.terminals, out)
    print(file=out)
    print(next_steps(files, args.program or _program(), ports), file=out)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "init", help="write a loopback lab: config, LMK, key store, test keys for the simulators",
        description="Create DIR with everything `gateway serve` needs on loopback, plus the clear test keys "
                    "the simulators read (--keys). Refuses a directory that already holds files.")
    p.add_argument("directory", metavar="DIR", help="new (or empty) directory, e.g. lab")
    p.add_argument("--terminals", type=int, default=DEFAULT_TERMINALS,
                   help=f"terminals to register, ids from {FIRST_TERMINAL} (default {DEFAULT_TERMINALS})")
    p.add_argument("--terminal-port", type=int, default=TERMINAL_PORT, help="gateway terminal port on 127.0.0.1")
    p.add_argument("--host-port", type=int, default=HOST_PORT, help="host simulator port on 127.0.0.1")
    p.add_argument("--admin-port", type=int, default=ADMIN_PORT, help="admin/metrics port on 127.0.0.1")
    p.add_argument("--program", help=argparse.SUPPRESS)  # how the printed commands call the gateway
    p.set_defaults(func=cmd_init)
