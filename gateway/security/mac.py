"""Message authentication codes: the CUP POS "ECB" MAC, ANSI X9.19 (ISO 9797-1 MAC algorithm 3,
"retail MAC") and ISO 9797-1 MAC algorithm 1 (CBC-MAC), all with padding method 1 (zero bytes).

Keys may be `DesKey` objects (cipher contexts cached: the gateway's hot path) or clear bytes (the
simulators' form). An empty MAB is refused with `MacError`: a MAC over nothing authenticates nothing.
"""

from __future__ import annotations

import binascii
import hmac
from dataclasses import dataclass
from typing import Final

from gateway.security.des import BLOCK, KeyLike, as_des_key
from gateway.security.errors import KeyFormatError, MacError

#: terminal MAC algorithms a module can be configured with
TERMINAL_MAC_ALGORITHMS: Final = ("cup-ecb", "x919")
#: field 64 in the CUP POS dialect: 8 bytes on the wire, the MAC as 8 ASCII hex characters
CUP_MAC_LENGTH: Final = 8


def pad_method1(data: bytes) -> bytes:
    """ISO 9797-1 padding method 1: append 0x00 up to a multiple of 8 (nothing if already aligned)."""
    if not data:
        raise MacError("MAC input is empty")
    rem = len(data) % BLOCK
    return bytes(data) + bytes(BLOCK - rem) if rem else bytes(data)


def xor_blocks(data: bytes) -> bytes:
    """CUP MAC step b: XOR of all 8-byte blocks, the last one zero-padded.

    Read little-endian, the zero padding is the integer's high-order zeros, so no padded copy is
    needed; folding the integer in halves XORs the blocks in ~log2(n) big-int operations instead of
    n Python-level ones.
    """
    if not data:
        raise MacError("MAC input is empty")
    n = -(-len(data) // BLOCK)
    x = int.from_bytes(data, "little")
    while n > 1:
        half = (n + 1) // 2
        bits = 64 * half
        x = (x & ((1 << bits) - 1)) ^ (x >> bits)
        n = half
    return x.to_bytes(BLOCK, "little")


def hex_upper(block: bytes) -> bytes:
    """CUP MAC steps c and g: bytes → uppercase ASCII hex (8 bytes → 16 characters)."""
    return binascii.hexlify(block).upper()


def _xor8(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(BLOCK, "big")


@dataclass(frozen=True, slots=True)
class CupMacSteps:
    """Every intermediate of the CUP POS MAC (reference §4.1), for tests and for debugging against
    another implementation. None of these values is key material."""

    xored: bytes  #: b: XOR of all 8-byte blocks of the MAB
    expanded: bytes  #: c: 16 uppercase hex characters of `xored`
    first_encrypted: bytes  #: d: MAK-encryption of the first 8 characters
    mixed: bytes  #: e: `first_encrypted` XOR the last 8 characters
    second_encrypted: bytes  #: f: MAK-encryption of `mixed`
    expanded_result: bytes  #: g: 16 uppercase hex characters of `second_encrypted`
    mac: bytes  #: h: the first 8 characters: field 64


def cup_mac_steps(mak: KeyLike, mab: bytes) -> CupMacSteps:
    """The CUP POS MAC computed step by step (slow path; `cup_mac` is the same, inlined)."""
    key = as_des_key(mak, "MAK")
    xored = xor_blocks(mab)
    expanded = hex_upper(xored)
    first = key.encrypt(expanded[:BLOCK])
    mixed = _xor8(first, expanded[BLOCK:])
    second = key.encrypt(mixed)
    result = hex_upper(second)
    return CupMacSteps(xored, expanded, first, mixed, second, result, result[:CUP_MAC_LENGTH])


def cup_mac(mak: KeyLike, mab: bytes) -> bytes:
    """CUP POS MAC (reference §4.1): 8 uppercase ASCII hex bytes for field 64.

    The MAK is used as given: single DES for the usual 8-byte MAK, 2-key TDES for a 16-byte one.
    """
    key = as_des_key(mak, "MAK")
    expanded = binascii.hexlify(xor_blocks(mab)).upper()
    mixed = int.from_bytes(key.encrypt(expanded[:BLOCK]), "big") ^ int.from_bytes(expanded[BLOCK:], "big")
    second = key.encrypt(mixed.to_bytes(BLOCK, "big"))
    # the first 8 hex characters are the hex of the first 4 bytes
    return binascii.hexlify(second[:4]).upper()


def retail_mac(key: KeyLike, data: bytes) -> bytes:
    """ANSI X9.19 / ISO 9797-1 MAC algorithm 3 with padding method 1; the full 8-byte MAC.

    Single-DES CBC under K1 over all blocks but the last; the last block goes through
    E_K1(D_K2(E_K1(·))), which is exactly 2-key TDES under K1‖K2‖K1: the key's own ECB encryptor.
    An 8-byte key gives K1 = K2, i.e. the plain CBC-DES MAC (X9.9).
    """
    k = as_des_key(key, "MAC key")
    if k.length == 24:
        raise KeyFormatError("X9.19 MAC needs an 8- or 16-byte key, got 24")
    padded = pad_method1(data)
    if len(padded) == BLOCK:
        return k.encrypt(padded)
    chain = k.cbc_left_last_block(padded[:-BLOCK])
    return k.encrypt(_xor8(chain, padded[-BLOCK:]))


def cbc_mac(key: KeyLike, data: bytes) -> bytes:
    """ISO 9797-1 MAC algorithm 1 (CBC-MAC, DES or TDES under the whole key), padding method 1:
    the last CBC block, 8 bytes."""
    k = as_des_key(key, "MAC key")
    return k.cbc_last_block(pad_method1(data))


def terminal_mac(mak: KeyLike, mab: bytes, algorithm: str = "cup-ecb") -> bytes:
    """Field 64 for the CUP POS dialect (8 ASCII hex bytes) under the configured algorithm.

    "x919" carries the first 4 bytes of the X9.19 MAC as 8 hex characters, the form CUP terminals
    with a double-length MAK use in the same 8-byte field.
    """
    if algorithm == "cup-ecb":
        return cup_mac(mak, mab)
    if algorithm == "x919":
        return binascii.hexlify(retail_mac(mak, mab)[:4]).upper()
    raise MacError(f"unknown terminal MAC algorithm {algorithm!r}")


def macs_equal(expected: bytes, received: bytes) -> bool:
    """Constant-time comparison of two MACs of the same form."""
    return hmac.compare_digest(bytes(expected), bytes(received))
