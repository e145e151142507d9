"""ISO 9564-1 PIN blocks, formats 0 (ANSI X9.8, CUP field 52) and 3: encode, decode and validate,
encrypt/decrypt, and translation from one key to another with the clear block kept local.

Format 0/3 clear block = PIN field XOR PAN field, where
- PIN field: control nibble (0 or 3) ‖ PIN length (4–12) ‖ PIN digits ‖ fill (F for format 0,
  random A–F for format 3), 16 nibbles;
- PAN field: 0000 ‖ the 12 rightmost PAN digits excluding the check digit (zero-filled on the left
  for short PANs). `pan=None` is CUP's "without PAN" variant (53.1 = 1): a PAN field of zeros.

Errors are `PinFormatError` (response code 99) and name the check that failed, never the PIN or PAN.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Final

from gateway.security.des import BLOCK, KeyLike, as_des_key
from gateway.security.errors import PinFormatError

PIN_FORMATS: Final = (0, 3)
MIN_PIN, MAX_PIN = 4, 12
MIN_PAN, MAX_PAN = 8, 19
_FORMAT3_FILL: Final = "ABCDEF"


def pan_field(pan: str | None) -> int:
    """The PAN field as a 64-bit integer (0 for the without-PAN variant)."""
    if pan is None:
        return 0
    if not (MIN_PAN <= len(pan) <= MAX_PAN) or not pan.isascii() or not pan.isdigit():
        raise PinFormatError(f"PAN must be {MIN_PAN}-{MAX_PAN} digits (got {len(pan)} characters)")
    return int(pan[-13:-1], 16)  # the 12 digits before the check digit as nibbles; short PANs zero-fill


def _pin_field(pin: str, fmt: int) -> int:
    if fmt not in PIN_FORMATS:
        raise PinFormatError(f"unsupported PIN block format {fmt}")
    if not (MIN_PIN <= len(pin) <= MAX_PIN) or not pin.isascii() or not pin.isdigit():
        raise PinFormatError(f"PIN must be {MIN_PIN}-{MAX_PIN} digits")
    n_fill = 14 - len(pin)
    fill = "F" * n_fill if fmt == 0 else "".join(secrets.choice(_FORMAT3_FILL) for _ in range(n_fill))
    return int(f"{fmt:X}{len(pin):X}{pin}{fill}", 16)


def make_pin_block(pin: str, pan: str | None, fmt: int = 0) -> bytes:
    """The clear 8-byte PIN block."""
    return (_pin_field(pin, fmt) ^ pan_field(pan)).to_bytes(BLOCK, "big")


def _decode_field(field: int, accept: tuple[int, ...]) -> str:
    nibbles = f"{field:016X}"
    control = int(nibbles[0], 16)
    if control not in accept:
        raise PinFormatError(f"PIN block control field is not one of the accepted formats {accept}")
    length = int(nibbles[1], 16)
    if not MIN_PIN <= length <= MAX_PIN:
        raise PinFormatError("PIN length in the PIN block is out of range 4-12")
    digits, fill = nibbles[2 : 2 + length], nibbles[2 + length :]
    if not digits.isdigit():
        raise PinFormatError("PIN block holds a non-decimal PIN digit")
    if control == 0:
        if fill != "F" * len(fill):
            raise PinFormatError("format-0 PIN block fill is not all F (wrong key or wrong PAN?)")
    elif fill.strip(_FORMAT3_FILL):
        raise PinFormatError("format-3 PIN block fill is not A-F (wrong key or wrong PAN?)")
    return digits


def decode_pin_block(clear_block: bytes, pan: str | None, accept: tuple[int, ...] = PIN_FORMATS) -> str:
    """Validate a clear PIN block and return the PIN. Raises PinFormatError."""
    if len(clear_block) != BLOCK:
        raise PinFormatError(f"PIN block must be 8 bytes, got {len(clear_block)}")
    return _decode_field(int.from_bytes(clear_block, "big") ^ pan_field(pan), accept)


def encrypt_pin_block(key: KeyLike, pin: str, pan: str | None, fmt: int = 0) -> bytes:
    """Terminal side: build the PIN block and encrypt it (ECB) under the PIK."""
    return as_des_key(key, "PIN key").encrypt(make_pin_block(pin, pan, fmt))


def decrypt_pin_block(key: KeyLike, pin_block: bytes, pan: str | None,
                      accept: tuple[int, ...] = PIN_FORMATS) -> str:
    """Decrypt and decode a PIN block; returns the clear PIN (simulators only)."""
    if len(pin_block) != BLOCK:
        raise PinFormatError(f"PIN block must be 8 bytes, got {len(pin_block)}")
    return decode_pin_block(as_des_key(key, "PIN key").decrypt(bytes(pin_block)), pan, accept)


def check_pin_block(key: KeyLike, pin_block: bytes, pan: str | None, expected_pin: str,
                    accept: tuple[int, ...] = PIN_FORMATS) -> bool:
    """Host side: does the encrypted PIN block carry `expected_pin`? A block that does not decode
    raises PinFormatError (answer 99); a valid block with another PIN returns False (answer 55)."""
    pin = decrypt_pin_block(key, pin_block, pan, accept)
    return hmac.compare_digest(pin.encode(), expected_pin.encode())


def translate_pin_block(source: KeyLike, target: KeyLike, pin_block: bytes, pan: str | None,
                        accept: tuple[int, ...] = (0,), out_format: int = 0) -> bytes:
    """Decrypt under `source`, validate, re-encrypt under `target`; the clear block never leaves.

    A block already in `out_format` is re-encrypted as is; otherwise it is re-encoded.
    """
    if len(pin_block) != BLOCK:
        raise PinFormatError(f"PIN block must be 8 bytes, got {len(pin_block)}")
    clear = as_des_key(source, "PIN key").decrypt(bytes(pin_block))
    pan_bits = pan_field(pan)
    field = int.from_bytes(clear, "big") ^ pan_bits
    pin = _decode_field(field, accept)
    if field >> 60 != out_format:
        clear = make_pin_block(pin, pan, out_format)
    return as_des_key(target, "PIN key").encrypt(clear)
