"""Track-data encryption with the TDK (CUP, reference §4.4; 60.3 = 004, 53.3 = 1).

The track is the digit string carried in the BCD z field, with 'D' as the field separator (e.g.
"6222021234567890123D49121010000000000"). Of it, the 16 characters that end one character before the
last are packed to 8 bytes, TDES-encrypted with the TDK (ECB) and put back in place as 16 uppercase
hex digits. A track shorter than 17 characters is first left-padded with 'F' to 17, so its encrypted
form is 17 characters long; decryption strips that padding again.
"""

from __future__ import annotations

from typing import Final

from gateway.security.des import KeyLike, as_des_key
from gateway.security.errors import TrackDataError

#: track 3 may be up to 104 characters; track 2 up to 37
MAX_TRACK: Final = 104
_WINDOW: Final = 16
_CLEAR_CHARS: Final = frozenset("0123456789D")
_HEX_CHARS: Final = frozenset("0123456789ABCDEF")


def _check(track: str, allowed: frozenset[str], what: str) -> str:
    if not isinstance(track, str) or not 2 <= len(track) <= MAX_TRACK:
        raise TrackDataError(f"{what} must be 2-{MAX_TRACK} characters")
    upper = track.upper()
    if not set(upper) <= allowed:
        raise TrackDataError(f"{what} holds characters other than {''.join(sorted(allowed))}")
    return upper


def encrypt_track(tdk: KeyLike, track: str) -> str:
    """Terminal side: encrypt the track's 16-character window under the TDK."""
    clear = _check(track, _CLEAR_CHARS, "clear track data")
    if len(clear) < _WINDOW + 1:
        clear = clear.rjust(_WINDOW + 1, "F")
    window = bytes.fromhex(clear[-_WINDOW - 1 : -1])
    encrypted = as_des_key(tdk, "TDK").encrypt(window).hex().upper()
    return clear[: -_WINDOW - 1] + encrypted + clear[-1]


def decrypt_track(tdk: KeyLike, track: str) -> str:
    """Gateway side: decrypt the window and check that the result is a track again.

    A wrong TDK almost always yields hex letters other than D, so it fails here with
    TrackDataError instead of passing garbage upstream.
    """
    data = _check(track, _HEX_CHARS, "encrypted track data")
    if len(data) < _WINDOW + 1:
        raise TrackDataError(f"encrypted track data must be at least {_WINDOW + 1} characters")
    window = bytes.fromhex(data[-_WINDOW - 1 : -1])
    clear = data[: -_WINDOW - 1] + as_des_key(tdk, "TDK").decrypt(window).hex().upper() + data[-1]
    clear = clear.lstrip("F")
    if len(clear) < 2 or not set(clear) <= _CLEAR_CHARS:
        raise TrackDataError("decrypted track data is not a track (wrong TDK?)")
    return clear
