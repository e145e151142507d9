"""Keys as the key store holds them: a clear `DesKey` tagged with its usage and owner.

Usage is enforced: `Key.require(usage)` hands out the cipher only for the purpose the key was made
for, so a PIK can never MAC and a MAK can never decrypt a PIN block.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from gateway.security.des import DesKey
from gateway.security.errors import KeyUsageError


class KeyUsage(StrEnum):
    TMK = "TMK"  #: terminal master key: encrypts a terminal's working keys (field 62)
    ZMK = "ZMK"  #: zone master key: encrypts the host zone keys in a key exchange
    ZPK = "ZPK"  #: zone PIN key: PIN blocks towards the host
    ZAK = "ZAK"  #: zone authentication key: MACs on the host link
    PIK = "PIK"  #: terminal PIN key (working)
    MAK = "MAK"  #: terminal MAC key (working)
    TDK = "TDK"  #: terminal track-data key (working)

    @classmethod
    def parse(cls, text: str) -> KeyUsage:
        try:
            return cls(text.upper())
        except ValueError:
            raise KeyUsageError(f"unknown key usage {text!r}; expected one of {', '.join(cls)}") from None


TERMINAL_USAGES = frozenset({KeyUsage.TMK, KeyUsage.PIK, KeyUsage.MAK, KeyUsage.TDK})
WORKING_USAGES = (KeyUsage.PIK, KeyUsage.MAK, KeyUsage.TDK)
HOST_USAGES = frozenset({KeyUsage.ZMK, KeyUsage.ZPK, KeyUsage.ZAK})


def key_name(usage: KeyUsage, owner: str) -> str:
    """Display name: "TMK/12345678" for terminal keys, "ZPK" for host keys."""
    return f"{usage}/{owner}" if owner else str(usage)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True, slots=True, eq=False, repr=False)
class Key:
    usage: KeyUsage
    cipher: DesKey
    owner: str = ""  #: terminal id for TMK/PIK/MAK/TDK, "" for host keys
    created: str = ""  #: ISO 8601 UTC

    @property
    def name(self) -> str:
        return key_name(self.usage, self.owner)

    @property
    def kcv(self) -> bytes:
        return self.cipher.kcv

    @property
    def length(self) -> int:
        return self.cipher.length

    def require(self, usage: KeyUsage) -> DesKey:
        """The cipher, if this key is a `usage` key; KeyUsageError otherwise."""
        if self.usage is not usage:
            raise KeyUsageError(f"{self.name} is a {self.usage} key and cannot be used as a {usage}")
        return self.cipher

    def __repr__(self) -> str:
        return f"Key({self.name}, kcv={self.kcv.hex().upper()})"

    __str__ = __repr__
