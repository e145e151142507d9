"""DES and triple-DES primitives on top of `cryptography`: key checks, parity, KCV, key generation,
and `DesKey`, a clear key held together with its cipher contexts.

Single, 2-key and 3-key DES all run as TripleDES from `cryptography.hazmat.decrepit` with the key
expanded to 24 bytes (K‖K‖K, K1‖K2‖K1, K1‖K2‖K3): EDE with equal keys *is* single DES, and 8- or
16-byte keys given to TripleDES directly raise CryptographyDeprecationWarning.

Why `DesKey` caches contexts: building a `Cipher` and its encryptor costs ~3.5 µs, about as much as
the whole CUP MAC. An ECB context carries no state between block-aligned `update` calls, so one
encryptor and one decryptor per key serve every call. CBC contexts do carry state (the last
ciphertext block); `_CbcChain` reuses one anyway by folding that state into the next message's first
block, which turns the running chain back into a chain with a zero IV (see `_CbcChain.last_block`).
"""

from __future__ import annotations

import binascii
import hmac
import secrets
import threading
from typing import Final, TypeAlias

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, modes

from gateway.security.errors import DataLengthError, KeyFormatError

BLOCK: Final = 8
KEY_LENGTHS: Final = (8, 16, 24)
ZERO_BLOCK: Final = bytes(BLOCK)


def _odd_parity_byte(value: int) -> int:
    # bit 0 of each DES key byte is the parity bit: make the byte's population count odd
    return value ^ (0 if bin(value).count("1") % 2 else 1)


#: bytes.translate table mapping every byte to its odd-parity form
_ODD_PARITY: Final = bytes(_odd_parity_byte(b) for b in range(256))

#: DES weak and semi-weak keys (FIPS 74): encryption with them is an involution or nearly so
_WEAK_KEYS: Final = frozenset(
    bytes.fromhex(h)
    for h in (
        "0101010101010101", "FEFEFEFEFEFEFEFE", "E0E0E0E0F1F1F1F1", "1F1F1F1F0E0E0E0E",
        "01FE01FE01FE01FE", "FE01FE01FE01FE01", "1FE01FE00EF10EF1", "E01FE01FF10EF10E",
        "01E001E001F101F1", "E001E001F101F101", "1FFE1FFE0EFE0EFE", "FE1FFE1FFE0EFE0E",
        "011F011F010E010E", "1F011F010E010E01", "E0FEE0FEF1FEF1FE", "FEE0FEE0FEF1FEF1",
    )
)


def set_odd_parity(key: bytes) -> bytes:
    """The key with every byte's low bit adjusted to give odd parity."""
    return bytes(key).translate(_ODD_PARITY)


def has_odd_parity(key: bytes) -> bool:
    return bytes(key).translate(_ODD_PARITY) == bytes(key)


def check_key_length(key: bytes, what: str = "key") -> None:
    if len(key) not in KEY_LENGTHS:
        raise KeyFormatError(f"{what} must be 8, 16 or 24 bytes, got {len(key)}")


def is_weak(key: bytes) -> bool:
    """True when any 8-byte part is a DES weak/semi-weak key or a multi-part key repeats a part
    (K1 = K2 turns 2-key TDES into single DES)."""
    parts = [set_odd_parity(key[i : i + BLOCK]) for i in range(0, len(key), BLOCK)]
    return any(p in _WEAK_KEYS for p in parts) or len(set(parts)) != len(parts)


def expand_key(key: bytes) -> bytes:
    """24-byte TripleDES key: K‖K‖K for single DES, K1‖K2‖K1 for 2-key TDES, as is for 3-key."""
    n = len(key)
    if n == 8:
        return key * 3
    if n == 16:
        return key + key[:8]
    if n == 24:
        return bytes(key)
    raise KeyFormatError(f"key must be 8, 16 or 24 bytes, got {n}")


def parse_hex_key(text: str, what: str = "key") -> bytes:
    """Hex text (spaces allowed) to key bytes. The error names the problem, never the text."""
    cleaned = "".join(text.split())
    try:
        key = binascii.unhexlify(cleaned)
    except (binascii.Error, ValueError):
        raise KeyFormatError(f"{what} is not valid hex ({len(cleaned)} characters)") from None
    check_key_length(key, what)
    return key


def generate_key(length: int = 16) -> bytes:
    """A fresh DES/TDES key from the OS CSPRNG, odd parity, no weak part, no repeated part."""
    if length not in KEY_LENGTHS:
        raise KeyFormatError(f"key length must be 8, 16 or 24 bytes, got {length}")
    while True:
        key = set_odd_parity(secrets.token_bytes(length))
        if not is_weak(key):
            return key


def combine_components(components: list[bytes], what: str = "key") -> bytes:
    """XOR key components as a key ceremony does. Every component must have odd parity (a typo
    check); the result is then forced to odd parity, since an even number of odd components XORs
    to even parity (HSMs do the same)."""
    if len(components) < 2:
        raise KeyFormatError(f"{what}: at least two components are needed, got {len(components)}")
    length = len(components[0])
    for i, comp in enumerate(components, 1):
        check_key_length(comp, f"{what} component {i}")
        if len(comp) != length:
            raise KeyFormatError(f"{what} component {i} is {len(comp)} bytes, component 1 is {length}")
        if not has_odd_parity(comp):
            raise KeyFormatError(f"{what} component {i} does not have odd DES parity")
    acc = 0
    for comp in components:
        acc ^= int.from_bytes(comp, "big")
    key = set_odd_parity(acc.to_bytes(length, "big"))
    if is_weak(key):
        raise KeyFormatError(f"{what}: the combined key is a weak DES key")
    return key


def _ecb(key24: bytes) -> Cipher[modes.ECB]:
    return Cipher(TripleDES(key24), modes.ECB())


class _CbcChain:
    """One long-lived CBC encryptor reused for every MAC computed with a key.

    After a message, the context's chaining value is that message's last ciphertext block C. XORing
    C into the next message's first block cancels it: E(P1 ⊕ C ⊕ C) = E(P1), i.e. a CBC chain with a
    zero IV, without building a new context. The lock keeps read-chain/update/store atomic should a
    caller ever use one key from several threads.
    """

    __slots__ = ("_chain", "_ctx", "_lock")

    def __init__(self, key24: bytes) -> None:
        self._ctx: CipherContext = Cipher(TripleDES(key24), modes.CBC(ZERO_BLOCK)).encryptor()
        self._chain = 0
        self._lock = threading.Lock()

    def last_block(self, padded: bytes) -> bytes:
        """Last CBC block (zero IV) of `padded`, a non-empty multiple of 8 bytes."""
        with self._lock:
            if self._chain:
                first = (int.from_bytes(padded[:BLOCK], "big") ^ self._chain).to_bytes(BLOCK, "big")
                padded = first + padded[BLOCK:]
            tail = self._ctx.update(padded)[-BLOCK:]
            self._chain = int.from_bytes(tail, "big")
        return tail


class DesKey:
    """A clear DES/TDES key (8, 16 or 24 bytes) with its cipher contexts, built on first use.

    `repr` shows only the length and KCV. The clear bytes stay inside `gateway.security`: `material`
    exists for the key store, key wrapping and the simulators' clear-key helpers.
    """

    __slots__ = ("_cbc_full", "_cbc_left", "_dec", "_enc", "_expanded", "_kcv", "_material")

    def __init__(self, material: bytes, *, check_parity: bool = True, what: str = "key") -> None:
        material = bytes(material)
        check_key_length(material, what)
        if check_parity and not has_odd_parity(material):
            raise KeyFormatError(f"{what} does not have odd DES parity")
        self._material = material
        self._expanded = expand_key(material)
        self._enc: CipherContext | None = None
        self._dec: CipherContext | None = None
        self._cbc_left: _CbcChain | None = None
        self._cbc_full: _CbcChain | None = None
        self._kcv: bytes | None = None

    @property
    def material(self) -> bytes:
        return self._material

    @property
    def length(self) -> int:
        return len(self._material)

    def encrypt(self, data: bytes) -> bytes:
        """ECB encryption of whole 8-byte blocks."""
        if not data or len(data) % BLOCK:
            # an unaligned update would leave a partial block buffered in the shared context
            raise DataLengthError(f"cipher input must be a non-empty multiple of 8 bytes, got {len(data)}")
        enc = self._enc
        if enc is None:
            enc = self._enc = _ecb(self._expanded).encryptor()
        return enc.update(data)

    def decrypt(self, data: bytes) -> bytes:
        """ECB decryption of whole 8-byte blocks."""
        if not data or len(data) % BLOCK:
            raise DataLengthError(f"cipher input must be a non-empty multiple of 8 bytes, got {len(data)}")
        dec = self._dec
        if dec is None:
            dec = self._dec = _ecb(self._expanded).decryptor()
        return dec.update(data)

    def cbc_last_block(self, padded: bytes) -> bytes:
        """Last block of a zero-IV CBC encryption under the whole key (ISO 9797-1 MAC algorithm 1)."""
        chain = self._cbc_full
        if chain is None:
            chain = self._cbc_full = _CbcChain(self._expanded)
        return chain.last_block(padded)

    def cbc_left_last_block(self, padded: bytes) -> bytes:
        """Last block of a zero-IV single-DES CBC under the left key K1 (first stage of X9.19)."""
        chain = self._cbc_left
        if chain is None:
            chain = self._cbc_left = _CbcChain(self._material[:BLOCK] * 3)
        return chain.last_block(padded)

    def check_value(self, length: int = 3) -> bytes:
        """First `length` bytes of the encryption of eight zero bytes (3 for a KCV, 4 in CUP field 62)."""
        if self._kcv is None:
            self._kcv = self.encrypt(ZERO_BLOCK)  # builds the encryptor the hot path needs anyway
        return self._kcv[:length]

    @property
    def kcv(self) -> bytes:
        return self.check_value(3)

    def same_key(self, other: DesKey) -> bool:
        return hmac.compare_digest(self._material, other._material)

    def __repr__(self) -> str:
        return f"DesKey(len={self.length}, kcv={self.kcv.hex().upper()})"

    __str__ = __repr__

    def __reduce__(self) -> str | tuple[object, ...]:
        # pickling would write the clear key wherever the pickle goes
        raise TypeError("DesKey cannot be pickled")


KeyLike: TypeAlias = bytes | bytearray | DesKey


def as_des_key(key: KeyLike, what: str = "key", *, check_parity: bool = True) -> DesKey:
    """Accept a `DesKey` or clear bytes (the simulators' form)."""
    if isinstance(key, DesKey):
        return key
    return DesKey(bytes(key), check_parity=check_parity, what=what)


def kcv(key: KeyLike, length: int = 3) -> bytes:
    """Key check value: the first `length` bytes of encrypting 8 zero bytes with the key."""
    return as_des_key(key, check_parity=False).check_value(length)


def encrypt_ecb(key: KeyLike, data: bytes) -> bytes:
    return as_des_key(key, check_parity=False).encrypt(data)


def decrypt_ecb(key: KeyLike, data: bytes) -> bytes:
    return as_des_key(key, check_parity=False).decrypt(data)
