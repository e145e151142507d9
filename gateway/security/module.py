"""The security module interface the gateway core talks to, and its software implementation.

`SecurityModule` speaks in terminal ids, key usages and encrypted blobs: no method takes or returns
a clear key, a clear PIN or clear track data, so a hardware HSM can implement the same interface.
`SoftwareSecurityModule` implements it on the key store and the algorithms of this package.

Per transaction the gateway calls `verify_terminal_mac`, `translate_pin_to_host`,
`generate_host_mac`, `verify_host_mac` and `generate_terminal_mac`. Each is a dict lookup for the
key plus one or two calls into cipher contexts that were built when the key arrived (sign-in, host
key exchange), never a context built per call. Working keys are persisted at sign-in; lookups never
touch the file.

Errors are typed (`gateway.security.errors`) and carry the response code: MacError → A0,
PinFormatError → 99, any other SecurityError → A7.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Final, Protocol, runtime_checkable

from gateway.security.des import ZERO_BLOCK, DesKey, generate_key, is_weak, parse_hex_key
from gateway.security.errors import (
    KeyFormatError,
    KeyNotFoundError,
    KeyStoreError,
    KeyUsageError,
    MacError,
    SecurityError,
)
from gateway.security.keyblock import KeyBlockLayout, build_key_block, get_layout, unwrap_zone_key
from gateway.security.keys import WORKING_USAGES, KeyUsage
from gateway.security.keystore import KeyStore, load_lmk, make_key
from gateway.security.mac import CUP_MAC_LENGTH, TERMINAL_MAC_ALGORITHMS, macs_equal, retail_mac, terminal_mac
from gateway.security.pin import translate_pin_block
from gateway.security.track import decrypt_track

if TYPE_CHECKING:
    from gateway.config import SecurityConfig, TerminalEntry

log = logging.getLogger("gateway.security")

HOST_MAC_LENGTH: Final = 8
_HOST_KEY_USAGES: Final = (KeyUsage.ZPK, KeyUsage.ZAK)


@runtime_checkable
class SecurityModule(Protocol):
    """What the gateway needs from a security module (software or HSM)."""

    #: "cup-ecb" or "x919": how field 64 of terminal messages is computed
    terminal_mac_algorithm: str

    def issue_working_keys(self, terminal_id: str, mode: str = "004") -> bytes:
        """Fresh PIK/MAK(/TDK) for the terminal under its TMK; stores them and returns field 62."""
        ...

    def has_working_keys(self, terminal_id: str) -> bool: ...

    def drop_working_keys(self, terminal_id: str) -> None:
        """Sign-off: forget the terminal's working keys."""
        ...

    def has_terminal_master_key(self, terminal_id: str) -> bool: ...

    def verify_terminal_mac(self, terminal_id: str, mab: bytes, mac: bytes) -> None:
        """Raises MacError when `mac` (field 64's 8 wire bytes: normally ASCII hex characters, but any
        byte may arrive) does not authenticate `mab`."""
        ...

    def generate_terminal_mac(self, terminal_id: str, mab: bytes) -> bytes:
        """Field 64's 8 wire bytes for a message to the terminal (ASCII hex characters)."""
        ...

    def translate_pin_to_host(self, terminal_id: str, pin_block: bytes, pan: str | None) -> bytes:
        """PIN block under the terminal's PIK → format-0 block under the ZPK. Raises PinFormatError.
        `pan=None` for CUP's without-PAN blocks (53.1 = 1)."""
        ...

    def decrypt_track2(self, terminal_id: str, track2: str) -> str:
        """Track data encrypted by the terminal under its TDK → clear track (for the host only)."""
        ...

    def generate_host_mac(self, mab: bytes) -> bytes:
        """8-byte X9.19 MAC under the ZAK."""
        ...

    def verify_host_mac(self, mab: bytes, mac: bytes) -> None: ...

    def install_host_key(self, usage: str, key_under_zmk: bytes, kcv: bytes) -> None:
        """Install a ZPK or ZAK received under the ZMK, after verifying its check value."""
        ...

    def key_check_value(self, usage: str, owner: str = "") -> bytes:
        """The 3-byte KCV of a stored key (for operators and logs; never the key)."""
        ...


class SoftwareSecurityModule:
    """`SecurityModule` on `cryptography`, keys in a `KeyStore` (file-backed or in memory).

    Meant to be driven from one event loop; key objects serialise their stateful CBC contexts with
    a lock, so calls from worker threads are safe too.
    """

    def __init__(self, store: KeyStore | None = None, *, terminal_mac: str = "cup-ecb",
                 layouts: Mapping[str, KeyBlockLayout] | None = None,
                 persist_working_keys: bool = True) -> None:
        if terminal_mac not in TERMINAL_MAC_ALGORITHMS:
            raise SecurityError(f"terminal MAC algorithm must be one of {TERMINAL_MAC_ALGORITHMS}")
        self.store = store if store is not None else KeyStore.in_memory()
        self.terminal_mac_algorithm = terminal_mac
        self._layouts = layouts
        self.persist_working_keys = persist_working_keys

    @property
    def persist_working_keys(self) -> bool:
        """Whether terminals' working keys are written to the key store file. When not, the store
        keeps them in memory only, so saving any other key (a host key exchange, an import) cannot
        write them either."""
        return not self.store.volatile

    @persist_working_keys.setter
    def persist_working_keys(self, persist: bool) -> None:
        self.store.volatile = frozenset() if persist else frozenset(WORKING_USAGES)

    @classmethod
    def from_config(cls, config: SecurityConfig,
                    terminals: Iterable[TerminalEntry] = ()) -> SoftwareSecurityModule:
        """Open the configured key store (or an in-memory one) and import the demo/test keys the
        config may carry in hex (ZMK, per-terminal TMKs). Production keys come from `gateway keys`.
        A configured key store that does not exist is an error (a mistyped path must not quietly
        become a new, empty store): `gateway keys init` creates it."""
        if config.keystore is not None:
            if not config.keystore.exists():  # said before any LMK problem: it is the first thing to fix
                # the command as it must be typed: `keys init` does not read the config's lmk_file
                lmk = f" --lmk-file {config.lmk_file}" if config.lmk_file is not None else ""
                raise KeyStoreError(f"key store {config.keystore} does not exist: create it with "
                                    f"`gateway keys init --store {config.keystore}{lmk}`")
            store = KeyStore.open(config.keystore, load_lmk(config.lmk_file))
        else:
            store = KeyStore.in_memory()
        module = cls(store, terminal_mac=config.terminal_mac)
        imports: list[tuple[KeyUsage, str, str]] = []
        if config.zmk:
            imports.append((KeyUsage.ZMK, "", config.zmk))
        imports += [(KeyUsage.TMK, t.terminal_id, t.tmk) for t in terminals if t.tmk]
        for usage, owner, text in imports:
            module.import_clear_key(usage, parse_hex_key(text, f"{usage} {owner}".strip()), owner, save=False)
        if imports:
            store.save()
        return module

    # --- key management ----------------------------------------------------------------------------

    def import_clear_key(self, usage: KeyUsage | str, key: bytes, owner: str = "", *,
                         save: bool = True) -> bytes:
        """Store a clear key (key ceremony, demo config). Checks length, parity and weakness;
        returns the KCV. Not part of `SecurityModule`: an HSM imports keys its own way."""
        u = KeyUsage.parse(usage) if isinstance(usage, str) else usage
        cipher = DesKey(key, what=f"{u} {owner}".strip())
        if is_weak(cipher.material):
            raise KeyFormatError(f"{u} {owner}".strip() + " is a weak DES key")
        self.store.put(make_key(u, cipher, owner), save=save)
        return cipher.kcv

    def has_terminal_master_key(self, terminal_id: str) -> bool:
        try:
            self.store.get(KeyUsage.TMK, terminal_id)
        except KeyNotFoundError:
            return False
        return True

    def key_check_value(self, usage: str, owner: str = "") -> bytes:
        return self.store.get(KeyUsage.parse(usage), owner).kcv

    # --- sign-in -----------------------------------------------------------------------------------

    def issue_working_keys(self, terminal_id: str, mode: str = "004") -> bytes:
        layout = get_layout(mode, self._layouts)
        tmk = self.store.get(KeyUsage.TMK, terminal_id).require(KeyUsage.TMK)
        fresh: dict[KeyUsage, DesKey] = {}
        for slot in layout.keys:
            length = slot.length
            if (slot.usage is KeyUsage.MAK and self.terminal_mac_algorithm == "x919"
                    and slot.slot >= 16 and tmk.length >= 16):
                length = 16  # X9.19 needs K1 ≠ K2; the 16-byte MAK fills the slot the zeros held
            fresh[slot.usage] = DesKey(generate_key(length))
        block = build_key_block(tmk, fresh, layout)
        # warm the contexts the transactions will use, so the first purchase pays nothing extra
        for usage, key in fresh.items():
            if usage is KeyUsage.MAK:
                terminal_mac(key, ZERO_BLOCK, self.terminal_mac_algorithm)
            else:
                key.decrypt(ZERO_BLOCK)
        stale = [u for u in WORKING_USAGES if u not in fresh]
        self.store.remove(stale, terminal_id, save=False)
        self.store.put_all([make_key(u, k, terminal_id) for u, k in fresh.items()],
                           save=self.persist_working_keys)
        log.info("issued working keys for terminal %r (mode %s): %s", terminal_id, layout.mode,
                 " ".join(f"{u}={k.kcv.hex().upper()}" for u, k in fresh.items()))
        return block

    def has_working_keys(self, terminal_id: str) -> bool:
        find = self.store.find
        return find(KeyUsage.PIK, terminal_id) is not None and find(KeyUsage.MAK, terminal_id) is not None

    def drop_working_keys(self, terminal_id: str) -> None:
        if self.store.remove(WORKING_USAGES, terminal_id, save=self.persist_working_keys):
            log.info("dropped working keys of terminal %r", terminal_id)

    # --- per transaction ---------------------------------------------------------------------------

    def _working(self, usage: KeyUsage, terminal_id: str) -> DesKey:
        key = self.store.find(usage, terminal_id)
        if key is None:
            raise KeyNotFoundError(f"terminal {terminal_id!r} has no {usage} (not signed in)")
        return key.require(usage)

    def _host(self, usage: KeyUsage) -> DesKey:
        key = self.store.find(usage)
        if key is None:
            raise KeyNotFoundError(f"no {usage} installed (host key exchange not done)")
        return key.require(usage)

    def verify_terminal_mac(self, terminal_id: str, mab: bytes, mac: bytes | str, *,
                            expected_length: int | None = None) -> None:
        """`mac` is field 64 as its 8 wire bytes, or as its `Message` value (those bytes in hex: field
        64 is binary, reference §2). `expected_length`, when given, is the MAB length the caller's
        framing implies; a MAB of another length (a truncated message) fails as a MAC error."""
        if isinstance(mac, str):
            try:
                mac = bytes.fromhex(mac)
            except ValueError:
                raise MacError("terminal MAC value is not hex") from None
        if len(mac) != CUP_MAC_LENGTH:
            raise MacError(f"terminal MAC must be {CUP_MAC_LENGTH} bytes, got {len(mac)}")
        if expected_length is not None and len(mab) != expected_length:
            raise MacError(f"MAB is {len(mab)} bytes, the message says {expected_length}")
        computed = terminal_mac(self._working(KeyUsage.MAK, terminal_id), mab, self.terminal_mac_algorithm)
        if not macs_equal(computed, bytes(mac).upper()):
            raise MacError(f"MAC of terminal {terminal_id!r} does not verify")

    def generate_terminal_mac(self, terminal_id: str, mab: bytes) -> bytes:
        return terminal_mac(self._working(KeyUsage.MAK, terminal_id), mab, self.terminal_mac_algorithm)

    def translate_pin_to_host(self, terminal_id: str, pin_block: bytes, pan: str | None) -> bytes:
        """`pan=None` for CUP's without-PAN PIN blocks (53.1 = 1)."""
        return translate_pin_block(self._working(KeyUsage.PIK, terminal_id), self._host(KeyUsage.ZPK),
                                   pin_block, pan, accept=(0,), out_format=0)

    def decrypt_track2(self, terminal_id: str, track2: str) -> str:
        return decrypt_track(self._working(KeyUsage.TDK, terminal_id), track2)

    def generate_host_mac(self, mab: bytes) -> bytes:
        return retail_mac(self._host(KeyUsage.ZAK), mab)

    def verify_host_mac(self, mab: bytes, mac: bytes, *, expected_length: int | None = None) -> None:
        if len(mac) != HOST_MAC_LENGTH:
            raise MacError(f"host MAC must be {HOST_MAC_LENGTH} bytes, got {len(mac)}")
        if expected_length is not None and len(mab) != expected_length:
            raise MacError(f"MAB is {len(mab)} bytes, the message says {expected_length}")
        if not macs_equal(retail_mac(self._host(KeyUsage.ZAK), mab), mac):
            raise MacError("host MAC does not verify")

    # --- host key exchange -------------------------------------------------------------------------

    def install_host_key(self, usage: str, key_under_zmk: bytes, kcv: bytes) -> None:
        u = KeyUsage.parse(usage)
        if u not in _HOST_KEY_USAGES:
            raise KeyUsageError(f"only a ZPK or ZAK can be installed from a key exchange, not a {u}")
        zmk = self.store.get(KeyUsage.ZMK).require(KeyUsage.ZMK)
        key = unwrap_zone_key(zmk, key_under_zmk, kcv, what=str(u))
        if u is KeyUsage.ZAK:
            retail_mac(key, bytes(16))  # warm the CBC context (the ZPK's encryptor is warm from its KCV)
        self.store.put(make_key(u, key))
        log.info("installed %s from the host key exchange, kcv %s", u, key.kcv.hex().upper())

    def __repr__(self) -> str:
        return f"SoftwareSecurityModule({self.store!r}, terminal_mac={self.terminal_mac_algorithm})"
