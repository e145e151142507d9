"""The security module: keys (encrypted at rest under a local master key), MACs, PIN blocks, track
encryption and key exchange. Nothing outside this package sees a clear key or PIN: the gateway uses
`SecurityModule`; the simulators use the clear-key functions of `gateway.security.algorithms`."""

from gateway.security.errors import (
    KcvMismatchError,
    KeyBlockError,
    KeyFormatError,
    KeyNotFoundError,
    KeyStoreError,
    KeyStoreIntegrityError,
    KeyUsageError,
    LmkError,
    MacError,
    PinFormatError,
    SecurityError,
    TrackDataError,
)
from gateway.security.keys import KeyUsage
from gateway.security.keystore import KeyStore, LocalMasterKey, load_lmk
from gateway.security.module import SecurityModule, SoftwareSecurityModule

__all__ = [
    "KcvMismatchError",
    "KeyBlockError",
    "KeyFormatError",
    "KeyNotFoundError",
    "KeyStore",
    "KeyStoreError",
    "KeyStoreIntegrityError",
    "KeyUsage",
    "KeyUsageError",
    "LmkError",
    "LocalMasterKey",
    "MacError",
    "PinFormatError",
    "SecurityError",
    "SecurityModule",
    "SoftwareSecurityModule",
    "TrackDataError",
    "load_lmk",
]
