"""Start-up checks of the keys the configuration needs, run before the gateway accepts anything.

A key that is missing at start is an operator's mistake with a known fix, so the gateway refuses to
start with one line that names the key and the command that imports it, rather than coming up and
failing every sign-on (the host link would retry its key exchange forever with "no ZMK key").
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from gateway.security.errors import KeyNotFoundError, KeyStoreError
from gateway.security.module import SecurityModule

log = logging.getLogger("gateway.security")

#: terminals named in the warning about missing TMKs (the rest are counted)
_NAMED_TERMINALS = 5


def require_zone_master_key(security: SecurityModule, *, keystore: Path | None, key_exchange: bool,
                            lmk_file: Path | None = None) -> None:
    """With host key exchange on, the ZPK and ZAK arrive under the ZMK: without one no sign-on can
    complete. Raises `KeyStoreError` saying how to import it."""
    if not key_exchange:
        return
    try:
        security.key_check_value("ZMK")
    except KeyNotFoundError:
        store = f" --store {keystore}" if keystore is not None else ""
        if keystore is not None and lmk_file is not None:
            store += f" --lmk-file {lmk_file}"
        where = f"the key store {keystore}" if keystore is not None else "the in-memory key store"
        raise KeyStoreError(
            f"host.key_exchange is on but {where} has no ZMK: import it with "
            f"`gateway keys zmk-import{store} --component - --component -` "
            "(or set host.key_exchange = false)"
        ) from None


def warn_missing_terminal_master_keys(security: SecurityModule, terminal_ids: Iterable[str]) -> list[str]:
    """Terminals configured without a TMK cannot sign in (each gets a refusal): a warning, not a
    refusal to start, since the other terminals work. Returns the ones missing."""
    missing = [tid for tid in terminal_ids if not security.has_terminal_master_key(tid)]
    if missing:
        named = ", ".join(missing[:_NAMED_TERMINALS]) + (" ..." if len(missing) > _NAMED_TERMINALS else "")
        log.warning("%d configured terminal(s) have no TMK and cannot sign in: %s (import with "
                    "`gateway keys tmk-import TERMINAL_ID --component - --component -`)", len(missing), named)
    return missing
