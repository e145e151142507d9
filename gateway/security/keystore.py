"""The key store: every key the gateway holds, in one file encrypted at rest under the LMK.

File format (version 1)::

    "GWKEYST1" (8) ‖ LMK check (4) ‖ nonce (12) ‖ AES-256-GCM(JSON of all keys) with the first 12
    bytes as associated data

The LMK check (HMAC of the LMK, not the LMK) lets a wrong LMK be told apart from a tampered file;
GCM's tag makes either fail loudly with `KeyStoreIntegrityError` instead of yielding wrong keys.
Writes go to a temporary file that is fsynced and renamed over the store, so a crash leaves the old
or the new store, never half of one.

Several processes may share one store (the gateway, and `gateway keys` importing a TMK while it
runs): a save takes an exclusive lock on `<store>.lock`, re-reads the file if another process has
changed it since, and applies only this process's own changes on top. A lookup that misses re-reads
a changed file too, so a TMK imported by the CLI is found at the terminal's next sign-in.

Lookups are plain dict lookups; the `Key` objects keep their cipher contexts for the process's life.
`KeyStore.in_memory()` is the same store without a file, for tests, benchmarks and the demo.
"""

from __future__ import annotations

import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.security.des import DesKey
from gateway.security.errors import (
    KeyFormatError,
    KeyNotFoundError,
    KeyStoreError,
    KeyStoreIntegrityError,
    LmkError,
    SecurityError,
)
from gateway.security.keys import TERMINAL_USAGES, Key, KeyUsage, key_name, now_iso

try:  # POSIX advisory locks; elsewhere the store is single-process
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("gateway.security.keystore")

LMK_ENV: Final = "GATEWAY_LMK"
LMK_BYTES: Final = 32
MAGIC: Final = b"GWKEYST1"
_CHECK_LEN: Final = 4
_NONCE_LEN: Final = 12
_HEADER_LEN: Final = len(MAGIC) + _CHECK_LEN
_FORMAT_VERSION: Final = 1


class LocalMasterKey:
    """The 32-byte AES key the store is encrypted under. `repr` shows only its check value."""

    __slots__ = ("_aead", "_key")

    def __init__(self, key: bytes) -> None:
        if len(key) != LMK_BYTES:
            raise LmkError(f"LMK must be {LMK_BYTES} bytes ({2 * LMK_BYTES} hex characters), got {len(key)}")
        self._key = bytes(key)
        self._aead = AESGCM(self._key)

    @classmethod
    def generate(cls) -> LocalMasterKey:
        return cls(secrets.token_bytes(LMK_BYTES))

    @classmethod
    def from_hex(cls, text: str, source: str) -> LocalMasterKey:
        cleaned = text.strip()
        if len(cleaned) != 2 * LMK_BYTES:
            raise LmkError(f"LMK from {source} must be {2 * LMK_BYTES} hex characters, got {len(cleaned)}")
        try:
            return cls(binascii.unhexlify(cleaned))
        except (binascii.Error, ValueError):
            raise LmkError(f"LMK from {source} is not valid hex") from None

    @property
    def check(self) -> bytes:
        """Identifies the LMK without revealing it (an HMAC of a fixed label under the LMK)."""
        return hmac.new(self._key, b"gateway key store LMK check", hashlib.sha256).digest()[:_CHECK_LEN]

    def seal(self, plaintext: bytes, header: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE_LEN)
        return nonce + self._aead.encrypt(nonce, plaintext, header)

    def open(self, sealed: bytes, header: bytes) -> bytes:
        nonce, ciphertext = sealed[:_NONCE_LEN], sealed[_NONCE_LEN:]
        return self._aead.decrypt(nonce, ciphertext, header)

    def to_hex(self) -> str:
        return self._key.hex().upper()

    def __repr__(self) -> str:
        return f"LocalMasterKey(check={self.check.hex().upper()})"

    __str__ = __repr__

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("LocalMasterKey cannot be pickled")


def read_lmk_file(path: Path) -> LocalMasterKey:
    """Read an LMK file (64 hex characters). A file group or others can access is refused."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise LmkError(f"LMK file {path} does not exist") from None
    except OSError as exc:
        raise LmkError(f"cannot read LMK file {path}: {exc.strerror}") from None
    if os.name == "posix" and stat.S_IMODE(st.st_mode) & 0o077:
        raise LmkError(
            f"LMK file {path} is accessible by group/others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"it must be owner-only: chmod 600 {path}"
        )
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        raise LmkError(f"cannot read LMK file {path}") from None
    return LocalMasterKey.from_hex(text, str(path))


def write_lmk_file(path: Path, lmk: LocalMasterKey | None = None) -> LocalMasterKey:
    """Create a new owner-only (0600) LMK file; refuses to overwrite an existing one."""
    lmk = lmk or LocalMasterKey.generate()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise LmkError(f"LMK file {path} already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise LmkError(f"cannot create LMK file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="ascii") as f:
        os.fchmod(f.fileno(), 0o600)  # the umask may have narrowed nothing, but never widen
        f.write(lmk.to_hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    return lmk


def load_lmk(lmk_file: Path | None = None, environ: Mapping[str, str] | None = None) -> LocalMasterKey:
    """The LMK from `lmk_file` if given, else from the GATEWAY_LMK environment variable."""
    if lmk_file is not None:
        return read_lmk_file(lmk_file)
    env = os.environ if environ is None else environ
    text = env.get(LMK_ENV)
    if not text:
        raise LmkError(f"no LMK: give an LMK file or set {LMK_ENV} (64 hex characters)")
    return LocalMasterKey.from_hex(text, LMK_ENV)


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":  # pragma: no cover
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _signature(path: Path) -> tuple[int, int, int] | None:
    """What identifies one version of the file (a rename gives a new inode)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


_Slot = tuple[KeyUsage, str]


class KeyStore:
    def __init__(self, *, path: Path | None = None, lmk: LocalMasterKey | None = None) -> None:
        if path is not None and lmk is None:
            raise LmkError("a key store file needs an LMK")
        self._path = path
        self._lmk = lmk
        self._keys: dict[_Slot, Key] = {}
        #: changes not yet written: slot → new key, or None for a removal
        self._pending: dict[_Slot, Key | None] = {}
        self._signature: tuple[int, int, int] | None = None
        #: serialises changes and saves (a sign-in may run in a worker thread); lookups stay lock-free
        self._mutex = threading.RLock()
        #: usages kept in memory only: never written to the file, and never replaced by what is on it
        #: (working keys, when the module does not persist them: a save for any other key must not
        #: put every terminal's session keys on disk)
        self.volatile: frozenset[KeyUsage] = frozenset()

    # --- opening -----------------------------------------------------------------------------------

    @classmethod
    def in_memory(cls) -> KeyStore:
        return cls()

    @classmethod
    def create(cls, path: Path, lmk: LocalMasterKey) -> KeyStore:
        """A new, empty store file. Refuses to replace an existing one."""
        if path.exists():
            raise KeyStoreError(f"key store {path} already exists")
        store = cls(path=path, lmk=lmk)
        store.save()
        return store

    @classmethod
    def open(cls, path: Path, lmk: LocalMasterKey) -> KeyStore:
        if not path.exists():
            raise KeyStoreError(f"key store {path} does not exist (create it with `gateway keys init`)")
        store = cls(path=path, lmk=lmk)
        with store._locked():
            store._keys, store._signature = store._read()
        return store

    @classmethod
    def open_or_create(cls, path: Path, lmk: LocalMasterKey) -> KeyStore:
        return cls.open(path, lmk) if path.exists() else cls.create(path, lmk)

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def lmk_check(self) -> bytes | None:
        return self._lmk.check if self._lmk else None

    # --- lookups -----------------------------------------------------------------------------------

    def find(self, usage: KeyUsage, owner: str = "") -> Key | None:
        """The key, or None. A plain dict lookup: this is the per-transaction path."""
        return self._keys.get((usage, owner))

    def get(self, usage: KeyUsage, owner: str = "") -> Key:
        key = self._keys.get((usage, owner))
        if key is None and self.refresh():
            key = self._keys.get((usage, owner))
        if key is None:
            raise KeyNotFoundError(f"no {key_name(usage, owner)} key in the key store")
        return key

    def entries(self) -> list[Key]:
        """Every key, sorted by owner then usage."""
        return sorted(self._keys.values(), key=lambda k: (k.owner, k.usage))

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, slot: object) -> bool:
        return slot in self._keys

    # --- changes -----------------------------------------------------------------------------------

    def put(self, key: Key, *, save: bool = True) -> None:
        self.put_all([key], save=save)

    def put_all(self, keys: Iterable[Key], *, save: bool = True) -> None:
        batch = list(keys)
        for key in batch:
            if key.usage in TERMINAL_USAGES and not key.owner:
                raise KeyStoreError(f"a {key.usage} key needs a terminal id")
        with self._mutex:
            for key in batch:
                slot = (key.usage, key.owner)
                self._keys[slot] = key
                self._pending[slot] = key
            if save:
                self.save()

    def remove(self, usages: Iterable[KeyUsage], owner: str = "", *, save: bool = True) -> int:
        """Remove the keys of these usages for `owner`; returns how many there were."""
        removed = 0
        with self._mutex:
            for usage in usages:
                slot = (usage, owner)
                if self._keys.pop(slot, None) is not None:
                    removed += 1
                self._pending[slot] = None
            if save and removed:
                self.save()
        return removed

    # --- persistence -------------------------------------------------------------------------------

    def save(self) -> None:
        """Write the store (no-op in memory), merging in changes other processes saved meanwhile."""
        if self._path is None:
            self._pending.clear()
            return
        with self._mutex, self._locked():
            if _signature(self._path) not in (None, self._signature):
                self._merge_disk()
            self._write()
            self._pending.clear()

    def refresh(self) -> bool:
        """Re-read the file if another process changed it; keeps this process's unsaved changes."""
        if self._path is None or _signature(self._path) in (None, self._signature):
            return False
        with self._mutex, self._locked():
            self._merge_disk()
        return True

    def rotate_lmk(self, new_lmk: LocalMasterKey) -> None:
        """Re-encrypt the whole store under `new_lmk` (one atomic rename)."""
        if self._path is None:
            raise KeyStoreError("an in-memory key store has no LMK")
        with self._mutex, self._locked():
            if _signature(self._path) not in (None, self._signature):
                self._merge_disk()
            old = self._lmk
            self._lmk = new_lmk
            try:
                self._write()
            except BaseException:
                self._lmk = old
                raise
            self._pending.clear()
        log.info("key store %s re-encrypted under LMK %s", self._path, new_lmk.check.hex().upper())

    def _merge_disk(self) -> None:
        disk, signature = self._read()
        merged: dict[_Slot, Key] = {slot: key for slot, key in self._keys.items() if slot[0] in self.volatile}
        for slot, key in disk.items():
            if slot[0] in self.volatile:
                continue  # ours stand (a stale copy a persisting run left must not come back)
            mine = self._keys.get(slot)
            # keep our object when it is the same key: it carries warmed-up cipher contexts
            merged[slot] = mine if mine is not None and mine.cipher.same_key(key.cipher) else key
        for slot, change in self._pending.items():
            if change is None:
                merged.pop(slot, None)
            else:
                merged[slot] = change
        self._keys = merged
        self._signature = signature

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        assert self._path is not None
        if fcntl is None:  # pragma: no cover
            yield
            return
        lock_path = self._path.with_name(self._path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise KeyStoreError(f"cannot open lock file {lock_path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _write(self) -> None:
        assert self._path is not None and self._lmk is not None
        entries = [
            {
                "usage": str(k.usage),
                "owner": k.owner,
                "key": k.cipher.material.hex().upper(),
                "kcv": k.kcv.hex().upper(),
                "created": k.created,
            }
            for k in self.entries()
            if k.usage not in self.volatile
        ]
        plaintext = json.dumps({"version": _FORMAT_VERSION, "keys": entries}, separators=(",", ":")).encode()
        header = MAGIC + self._lmk.check
        try:
            _atomic_write(self._path, header + self._lmk.seal(plaintext, header))
        except OSError as exc:
            raise KeyStoreError(f"cannot write key store {self._path}: {exc.strerror}") from None
        self._signature = _signature(self._path)

    def _read(self) -> tuple[dict[_Slot, Key], tuple[int, int, int] | None]:
        assert self._path is not None and self._lmk is not None
        path = self._path
        try:
            signature = _signature(path)
            data = path.read_bytes()
        except OSError as exc:
            raise KeyStoreError(f"cannot read key store {path}: {exc.strerror}") from None
        if len(data) < _HEADER_LEN + _NONCE_LEN + 16 or not data.startswith(MAGIC):
            raise KeyStoreIntegrityError(f"{path} is not a gateway key store (bad header or truncated)")
        header = data[:_HEADER_LEN]
        if not hmac.compare_digest(header[len(MAGIC) :], self._lmk.check):
            raise KeyStoreIntegrityError(
                f"key store {path} was written under another LMK (store LMK check "
                f"{header[len(MAGIC):].hex().upper()}, given LMK check {self._lmk.check.hex().upper()})"
            )
        try:
            plaintext = self._lmk.open(data[_HEADER_LEN:], header)
        except InvalidTag:
            raise KeyStoreIntegrityError(
                f"key store {path} failed authentication: tampered or corrupt"
            ) from None
        return _parse_entries(plaintext, path), signature

    def __repr__(self) -> str:
        where = str(self._path) if self._path else "memory"
        return f"KeyStore({where}, {len(self._keys)} keys)"


def _parse_entries(plaintext: bytes, path: Path) -> dict[_Slot, Key]:
    try:
        doc: Any = json.loads(plaintext)
        if doc.get("version") != _FORMAT_VERSION:
            raise KeyStoreError(f"key store {path} has unsupported version {doc.get('version')!r}")
        keys: dict[_Slot, Key] = {}
        for i, entry in enumerate(doc["keys"]):
            usage = KeyUsage(entry["usage"])
            owner = str(entry["owner"])
            cipher = DesKey(binascii.unhexlify(entry["key"]), what=key_name(usage, owner))
            if cipher.kcv.hex().upper() != entry["kcv"]:
                raise KeyStoreIntegrityError(
                    f"key store {path}: entry {i} ({key_name(usage, owner)}) fails its KCV"
                )
            keys[(usage, owner)] = Key(usage, cipher, owner, str(entry.get("created", "")))
        return keys
    except SecurityError as exc:
        if isinstance(exc, KeyFormatError):
            raise KeyStoreError(f"key store {path} holds an invalid key: {exc}") from None
        raise
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
        raise KeyStoreError(f"key store {path} content is malformed") from None


def make_key(usage: KeyUsage, cipher: DesKey, owner: str = "") -> Key:
    """A `Key` stamped with the current time."""
    return Key(usage, cipher, owner, now_iso())
