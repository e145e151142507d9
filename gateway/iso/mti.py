"""MTI arithmetic. MTIs are 4-digit strings: version, class, function, origin (ISO 8583:1987)."""

from __future__ import annotations


def response_mti(mti: str) -> str:
    """0200 → 0210, 0401 → 0410, 0800 → 0810: request function digit +1, repeat flag dropped."""
    if len(mti) != 4 or not mti.isdigit():
        raise ValueError(f"not an MTI: {mti!r}")
    function = int(mti[2])
    if function % 2 == 1:
        raise ValueError(f"{mti} is already a response")
    return f"{mti[:2]}{function + 1}0"


def repeat_mti(mti: str) -> str:
    """0400 → 0401, 0220 → 0221: the 'repeat' form of a request (origin digit 1)."""
    return f"{mti[:3]}1"


def original_mti(mti: str) -> str:
    """0401 → 0400: a repeat maps back to the first-attempt MTI."""
    return f"{mti[:3]}0" if mti[3] == "1" else mti


def is_request(mti: str) -> bool:
    return int(mti[2]) % 2 == 0


def is_response(mti: str) -> bool:
    return not is_request(mti)


def is_reversal(mti: str) -> bool:
    return mti[1] == "4"


def mti_class(mti: str) -> str:
    """Message class digit: 1 authorization, 2 financial, 3 file action, 4 reversal, 5 reconciliation,
    8 network management."""
    return mti[1]


def match_class(mti: str) -> str:
    """The part of an MTI that pairs a request with its response: 0200/0210 → '020',
    0400/0401/0410 → '040'. Used in the host link's match key."""
    return f"{mti[:2]}{int(mti[2]) & ~1}"
