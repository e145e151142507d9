"""Typed security errors. Each carries the CUP response code (field 39) the gateway answers with.

- `MacError` → "A0" (MAC校验错): the message cannot be authenticated.
- `PinFormatError` → "99" (PIN格式错): the PIN block does not decode to a valid block.
- every other `SecurityError` → "A7" (安全处理失败): unknown key, wrong usage, check-value mismatch,
  bad key length or parity, unreadable or tampered key store.

Error text names *what* is wrong (which key, which check) and never carries key material, PINs,
PIN blocks, track data or a full PAN: messages are built from usages, terminal ids and lengths only.
"""

from __future__ import annotations


class SecurityError(Exception):
    """Base of every failure raised by `gateway.security`."""

    #: field 39 the gateway answers with when this error decides a transaction
    response_code = "A7"
    #: short machine-readable kind, usable as a bounded metric label
    kind = "security"


class MacError(SecurityError):
    """A MAC that does not verify, or a MAC/MAB that cannot be a valid one (empty, wrong length)."""

    response_code = "A0"
    kind = "mac"


class PinFormatError(SecurityError):
    """A PIN block (or the PAN it is bound to) that does not decode to a valid ISO 9564 block."""

    response_code = "99"
    kind = "pin_format"


class KeyNotFoundError(SecurityError):
    """No key of that usage for that owner (e.g. a terminal that never signed in)."""

    kind = "key_not_found"


class KeyUsageError(SecurityError):
    """A key used for a purpose other than the one it was made for (e.g. a PIK asked to MAC)."""

    kind = "key_usage"


class KeyFormatError(SecurityError):
    """Key material of the wrong length, with bad DES parity, weak, or not valid hex."""

    kind = "key_format"


class KcvMismatchError(SecurityError):
    """A key whose check value does not match the one delivered with it; the key is not installed."""

    kind = "kcv_mismatch"


class KeyBlockError(SecurityError):
    """A field-62 working-key block of the wrong length or layout, or an unknown key mode."""

    kind = "key_block"


class TrackDataError(SecurityError):
    """Track data that is not a track (bad characters or length) before or after decryption."""

    kind = "track_data"


class DataLengthError(SecurityError):
    """Cipher input that is not a whole number of 8-byte blocks, or is empty."""

    kind = "data_length"


class KeyStoreError(SecurityError):
    """The key store file cannot be read, written or created (I/O, format, existing file)."""

    kind = "key_store"


class KeyStoreIntegrityError(KeyStoreError):
    """The key store does not authenticate: it was tampered with, truncated or written under another LMK."""

    kind = "key_store_integrity"


class LmkError(KeyStoreError):
    """The local master key is missing, malformed, or kept in a file others can read."""

    kind = "lmk"
