"""A terminal's working keys as one sealed blob, for instances that share terminal sessions.

Several gateway instances on one database serve the same terminals, so the working keys one of them
issued at sign-in (PIK, MAK, TDK) must reach the others; they travel and rest only sealed under the LMK,
as the key store seals its file: AES-256-GCM, with the terminal id in the associated data (a blob copied
onto another terminal's row fails authentication instead of yielding its keys)::

    "GWWKEYS1" (8) ‖ LMK check (4) ‖ nonce (12) ‖ AES-256-GCM(JSON [{usage, key, kcv}, ...])

Only this package sees the clear keys: `seal_working_keys` reads them from the security module's key
store, `install_working_keys` puts them back into another module's store (not saved to its file: the
database holds them), with the cipher contexts warmed as at sign-in.
"""

from __future__ import annotations

import binascii
import hmac
import json
from typing import Final

from cryptography.exceptions import InvalidTag

from gateway.security.des import ZERO_BLOCK, DesKey
from gateway.security.errors import KeyStoreError, KeyStoreIntegrityError, SecurityError
from gateway.security.keys import WORKING_USAGES, KeyUsage
from gateway.security.keystore import LocalMasterKey, make_key
from gateway.security.mac import terminal_mac
from gateway.security.module import SoftwareSecurityModule

MAGIC: Final = b"GWWKEYS1"
_HEADER_LEN: Final = len(MAGIC) + 4


def _associated(header: bytes, terminal_id: str) -> bytes:
    return header + terminal_id.encode()


def seal_working_keys(module: SoftwareSecurityModule, terminal_id: str, lmk: LocalMasterKey) -> bytes:
    """The terminal's working keys (as issued at its sign-in) sealed under the LMK."""
    entries = []
    for usage in WORKING_USAGES:
        key = module.store.find(usage, terminal_id)
        if key is not None:
            entries.append({"usage": str(usage), "key": key.cipher.material.hex().upper(),
                            "kcv": key.kcv.hex().upper()})
    if not entries:
        raise KeyStoreError(f"terminal {terminal_id!r} has no working keys to share")
    header = MAGIC + lmk.check
    return header + lmk.seal(json.dumps(entries, separators=(",", ":")).encode(), _associated(header, terminal_id))


def install_working_keys(module: SoftwareSecurityModule, terminal_id: str, sealed: bytes,
                         lmk: LocalMasterKey) -> None:
    """Replace the terminal's working keys in `module` with the sealed ones (integrity checked: a blob of
    another LMK, another terminal or tampered with raises `KeyStoreIntegrityError`)."""
    header = bytes(sealed[:_HEADER_LEN])
    if len(sealed) <= _HEADER_LEN or not header.startswith(MAGIC):
        raise KeyStoreIntegrityError(f"the shared working keys of terminal {terminal_id!r} are not a sealed blob")
    if not hmac.compare_digest(header[len(MAGIC):], lmk.check):
        raise KeyStoreIntegrityError(f"the shared working keys of terminal {terminal_id!r} are sealed under "
                                     "another LMK: every instance needs the same one")
    try:
        plain = lmk.open(bytes(sealed[_HEADER_LEN:]), _associated(header, terminal_id))
    except InvalidTag:
        what = f"the shared working keys of terminal {terminal_id!r}"
        raise KeyStoreIntegrityError(f"{what} fail authentication") from None
    keys: dict[KeyUsage, DesKey] = {}
    try:
        for entry in json.loads(plain):
            usage = KeyUsage(entry["usage"])
            cipher = DesKey(binascii.unhexlify(entry["key"]), what=f"{usage}/{terminal_id}")
            if usage not in WORKING_USAGES or cipher.kcv.hex().upper() != entry["kcv"]:
                raise KeyStoreIntegrityError(f"the shared {usage} of terminal {terminal_id!r} fails its KCV")
            keys[usage] = cipher
    except SecurityError:
        raise
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise KeyStoreError(f"the shared working keys of terminal {terminal_id!r} are malformed") from None
    for usage, cipher in keys.items():  # warm the contexts, as a sign-in on this instance would
        if usage is KeyUsage.MAK:
            terminal_mac(cipher, ZERO_BLOCK, module.terminal_mac_algorithm)
        else:
            cipher.decrypt(ZERO_BLOCK)
    module.store.remove([u for u in WORKING_USAGES if u not in keys], terminal_id, save=False)
    module.store.put_all([make_key(u, k, terminal_id) for u, k in keys.items()], save=False)
