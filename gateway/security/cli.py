"""`gateway keys ...`: the key ceremony and key store administration commands.

    gateway keys init        --store PATH [--lmk-file PATH [--generate-lmk]]
    gateway keys tmk-generate TERMINAL_ID [--length 16] [--components N]
    gateway keys tmk-import   TERMINAL_ID --component HEX --component HEX [...] [--kcv HEX]
    gateway keys zmk-import   --component HEX --component HEX [...] [--kcv HEX]
    gateway keys list
    gateway keys rotate-lmk   --new-lmk-file PATH [--generate]

Every command takes `--store PATH` (default: $GATEWAY_SECURITY__KEYSTORE) and `--lmk-file PATH`
(default: $GATEWAY_SECURITY__LMK_FILE, else the LMK itself from $GATEWAY_LMK). Output shows key
names, usages and check values, never a key, except the components `tmk-generate --components`
prints on purpose for injection into the terminal.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from gateway.security.des import DesKey, combine_components, generate_key, parse_hex_key, set_odd_parity
from gateway.security.errors import KcvMismatchError, KeyFormatError, KeyStoreError, SecurityError
from gateway.security.keys import KeyUsage, key_name
from gateway.security.keystore import KeyStore, LocalMasterKey, load_lmk, read_lmk_file, write_lmk_file
from gateway.security.module import SoftwareSecurityModule

STORE_ENV = "GATEWAY_SECURITY__KEYSTORE"
LMK_FILE_ENV = "GATEWAY_SECURITY__LMK_FILE"

Command = Callable[[argparse.Namespace], int]


def register(subparsers: argparse._SubParsersAction) -> None:
    keys = subparsers.add_parser(
        "keys", help="key store: master keys, check values, LMK rotation",
        description="Manage the encrypted key store. Output shows check values (KCV), never keys.",
    )
    actions = keys.add_subparsers(dest="keys_action", metavar="ACTION", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", type=Path, default=_env_path(STORE_ENV),
                        help=f"key store file (default ${STORE_ENV})")
    common.add_argument("--lmk-file", type=Path, default=_env_path(LMK_FILE_ENV),
                        help=f"LMK file, owner-only (default ${LMK_FILE_ENV}, else the LMK in $GATEWAY_LMK)")

    p = actions.add_parser("init", parents=[common], help="create an empty encrypted key store")
    p.add_argument("--generate-lmk", action="store_true",
                   help="first write a new random LMK to --lmk-file (mode 0600; never overwrites)")
    p.set_defaults(func=_guard(cmd_init))

    p = actions.add_parser("tmk-generate", parents=[common], help="generate a random TMK for a terminal")
    p.add_argument("terminal_id")
    p.add_argument("--length", type=int, choices=(8, 16, 24), default=16, help="key length in bytes")
    p.add_argument("--components", type=int, default=0, metavar="N",
                   help="also print the TMK as N clear components (with KCVs) for key injection")
    p.add_argument("--replace", action="store_true", help="replace an existing TMK")
    p.set_defaults(func=_guard(cmd_tmk_generate))

    component_help = "a key component in hex (repeat, at least twice); '-' reads it from a hidden prompt"
    for name, usage in (("tmk-import", KeyUsage.TMK), ("zmk-import", KeyUsage.ZMK)):
        p = actions.add_parser(name, parents=[common], help=f"import a {usage} from clear components (XOR)")
        if usage is KeyUsage.TMK:
            p.add_argument("terminal_id")
        p.add_argument("--component", action="append", required=True, metavar="HEX", help=component_help)
        p.add_argument("--kcv", help="expected KCV of the combined key (key form); refuse on a mismatch")
        p.add_argument("--replace", action="store_true", help=f"replace an existing {usage}")
        p.set_defaults(func=_guard(cmd_import), usage=usage)

    p = actions.add_parser("list", parents=[common], help="key names, usages and KCVs")
    p.set_defaults(func=_guard(cmd_list))

    p = actions.add_parser("rotate-lmk", parents=[common], help="re-encrypt the key store under a new LMK",
                           description="Re-encrypt the store under a new LMK in one atomic step. A running "
                                       "gateway must be restarted with the new LMK afterwards.")
    p.add_argument("--new-lmk-file", type=Path, required=True, help="file holding (or to hold) the new LMK")
    p.add_argument("--generate", action="store_true", help="write a new random LMK to --new-lmk-file first")
    p.set_defaults(func=_guard(cmd_rotate_lmk))


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def _guard(command: Command) -> Command:
    """Expected failures become one line on stderr and exit status 1, not a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except SecurityError as exc:
            print(f"gateway keys: error: {exc}", file=sys.stderr)
            return 1

    run.__doc__ = command.__doc__
    return run


def _store_path(args: argparse.Namespace) -> Path:
    if args.store is None:
        raise KeyStoreError(f"no key store: give --store PATH or set {STORE_ENV}")
    return Path(args.store)


def _open(args: argparse.Namespace) -> KeyStore:
    return KeyStore.open(_store_path(args), load_lmk(args.lmk_file))


def _hex(data: bytes) -> str:
    return data.hex().upper()


def cmd_init(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    path = _store_path(args)
    if path.exists():
        raise KeyStoreError(f"key store {path} already exists")
    if args.generate_lmk:
        if args.lmk_file is None:
            raise KeyStoreError("--generate-lmk needs --lmk-file PATH to write the LMK to")
        lmk = write_lmk_file(Path(args.lmk_file))
        print(f"new LMK written to {args.lmk_file} (mode 0600), LMK check {_hex(lmk.check)}", file=out)
    else:
        lmk = load_lmk(args.lmk_file)
    # a store in a directory still to be made (the start-up check names this command for it): make the
    # directory, owner-only, instead of failing on the store's lock file
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    KeyStore.create(path, lmk)
    print(f"key store {path} created, encrypted under LMK check {_hex(lmk.check)}", file=out)
    return 0


def _refuse_existing(store: KeyStore, usage: KeyUsage, owner: str, replace: bool) -> None:
    existing = store.find(usage, owner)
    if existing is not None and not replace:
        raise KeyStoreError(
            f"{key_name(usage, owner)} already exists (KCV {_hex(existing.kcv)}); use --replace to replace it"
        )


def cmd_tmk_generate(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    if args.components and args.components < 2:
        raise KeyStoreError("--components must be at least 2")
    store = _open(args)
    _refuse_existing(store, KeyUsage.TMK, args.terminal_id, args.replace)
    tmk = generate_key(args.length)
    if args.components:
        # N-1 random components and one that XORs them to the TMK: each custodian holds a share
        parts = [generate_key(args.length) for _ in range(args.components - 1)]
        last = int.from_bytes(tmk, "big")
        for part in parts:
            last ^= int.from_bytes(part, "big")
        parts.append(set_odd_parity(last.to_bytes(args.length, "big")))
        tmk = combine_components(parts, "TMK")  # parity-adjusted exactly as tmk-import will
        for i, part in enumerate(parts, 1):
            print(f"component {i}: {_hex(part)}  KCV {_hex(DesKey(part).kcv)}", file=out)
    kcv = SoftwareSecurityModule(store).import_clear_key(KeyUsage.TMK, tmk, args.terminal_id)
    name = key_name(KeyUsage.TMK, args.terminal_id)
    print(f"{name} generated ({args.length} bytes), KCV {_hex(kcv)}", file=out)
    return 0


def _read_component(text: str, index: int, usage: KeyUsage) -> bytes:
    if text == "-":
        text = getpass.getpass(f"{usage} component {index}: ")
    return parse_hex_key(text, f"{usage} component {index}")


def cmd_import(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    usage: KeyUsage = args.usage
    owner = args.terminal_id if usage is KeyUsage.TMK else ""
    store = _open(args)
    _refuse_existing(store, usage, owner, args.replace)
    components = [_read_component(text, i, usage) for i, text in enumerate(args.component, 1)]
    for i, comp in enumerate(components, 1):
        print(f"component {i} KCV {_hex(DesKey(comp, check_parity=False).kcv)}", file=out)
    key = combine_components(components, str(usage))
    kcv = DesKey(key).kcv
    if args.kcv is not None:
        expected = args.kcv.strip().upper()
        if not 4 <= len(expected) <= 6:
            raise KeyFormatError("--kcv must be 4 to 6 hex characters")
        if not _hex(kcv).startswith(expected):
            raise KcvMismatchError(
                f"combined {usage} has KCV {_hex(kcv)}, the key form says {expected}; not stored"
            )
    SoftwareSecurityModule(store).import_clear_key(usage, key, owner)
    print(f"{key_name(usage, owner)} stored ({len(key)} bytes), KCV {_hex(kcv)}", file=out)
    return 0


def cmd_list(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    store = _open(args)
    print(f"key store {store.path}: {len(store)} keys, LMK check {_hex(store.lmk_check or b'')}", file=out)
    print(f"{'NAME':<20} {'USAGE':<5} {'LEN':>3}  {'KCV':<6}  CREATED", file=out)
    for key in store.entries():
        print(f"{key.name:<20} {key.usage:<5} {key.length:>3}  {_hex(key.kcv):<6}  {key.created}", file=out)
    return 0


def cmd_rotate_lmk(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    store = _open(args)
    new_path = Path(args.new_lmk_file)
    new_lmk: LocalMasterKey = write_lmk_file(new_path) if args.generate else read_lmk_file(new_path)
    if new_lmk.check == store.lmk_check:
        raise KeyStoreError("the new LMK is the LMK the store is already under")
    store.rotate_lmk(new_lmk)
    print(f"key store {store.path} re-encrypted: LMK check {_hex(new_lmk.check)} ({len(store)} keys). "
          f"Use {new_path} from now on and restart the gateway.", file=out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m gateway.security.cli keys ...`: the same commands without the rest of the gateway."""
    parser = argparse.ArgumentParser(prog="gateway")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
