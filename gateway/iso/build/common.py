"""What the builders of both dialects share: terminal identity, card data, value checks.

Builders take Python values (amounts as `int` minor units, identifiers as strings) and produce field
values exactly as pyiso8583 represents them for the target dialect. A value that cannot go on the
wire raises `ValidationError` naming the field, before any message exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, TypedDict

from gateway.iso.errors import ValidationError
from gateway.iso.validate import DialectSettings

#: 26 (CUP): maximum PIN length the terminal accepts, sent when a PIN was entered (LY sends 12)
PIN_CAPTURE_CODE: Final = "12"
_HEXDIGITS: Final = frozenset("0123456789ABCDEF")


@dataclass(frozen=True, slots=True)
class TerminalIdent:
    """Field 41 (8 characters) and field 42 (15 characters) of a terminal."""

    terminal_id: str
    merchant_id: str

    def __post_init__(self) -> None:
        text(self.terminal_id, 8, "41", pad=False)
        text(self.merchant_id, 15, "42", pad=False)


class CardInput(TypedDict, total=False):
    """Card data of a financial request. Every key is optional (None = absent), but pan or track2
    is required."""

    pan: str | None  #: field 2
    track2: str | None  #: field 35, '=' or 'D' as separator (converted to the dialect's)
    expiry: str | None  #: field 14, YYMM
    entry_mode: str | None  #: field 22, 3 digits (default "021": magstripe, PIN entered)
    card_seq: str | None  #: field 23, 3 digits (IC)
    pin_block: str | None  #: field 52, 16 hex characters (already encrypted)
    security_control: str | None  #: field 53, 16 digits (default with a PIN block: security_control())
    icc: str | None  #: field 55, hex TLV


def security_control(
    *, pin_with_pan: bool = True, triple_des: bool = True, track_encrypted: bool = False
) -> str:
    """Field 53: PIN format (2 = ISO 9564 format 0 with PAN, 1 = without), algorithm (6 = 2-key 3DES,
    0 = DES), track-encryption flag, then 13 zeros (reference §2, field 53)."""
    return (
        ("2" if pin_with_pan else "1")
        + ("6" if triple_des else "0")
        + ("1" if track_encrypted else "0")
        + "0" * 13
    )


def digits(value: object, width: int, field: str) -> str:
    """Exactly `width` ASCII digits."""
    if not isinstance(value, str) or len(value) != width or not (value.isascii() and value.isdigit()):
        raise ValidationError(f"expected {width} digits", field=field)
    return value


def var_digits(value: object, max_len: int, field: str, min_len: int = 1) -> str:
    if (
        not isinstance(value, str)
        or not min_len <= len(value) <= max_len
        or not (value.isascii() and value.isdigit())
    ):
        raise ValidationError(f"expected {min_len}..{max_len} digits", field=field)
    return value


def amount12(amount: object, field: str = "4") -> str:
    """An amount in minor units as the 12-digit wire value."""
    if isinstance(amount, bool) or not isinstance(amount, int) or not 0 <= amount < 10**12:
        raise ValidationError("amount must be an int in 0..999999999999 minor units", field=field)
    return f"{amount:012d}"


def hex_value(value: object, field: str, length: int | None = None) -> str:
    """Binary data as pyiso8583 represents it: uppercase hex, whole bytes."""
    if not isinstance(value, str) or len(value) % 2 or not value:
        raise ValidationError("expected whole bytes of hex", field=field)
    upper = value.upper()
    if not _HEXDIGITS.issuperset(upper):
        raise ValidationError("expected hex digits", field=field)
    if length is not None and len(upper) != length:
        raise ValidationError(f"expected {length} hex characters", field=field)
    return upper


def text(value: object, width: int, field: str, *, pad: bool = True) -> str:
    """A fixed printable text field; shorter values are right-padded with spaces when `pad`."""
    if (
        not isinstance(value, str)
        or not value.isprintable()
        or len(value) > width
        or (not pad and len(value) != width)
    ):
        raise ValidationError(
            f"expected {'at most ' if pad else ''}{width} printable characters", field=field
        )
    return value.ljust(width)


def track2(value: object, separator: str, *, encrypted: bool = False) -> str:
    """Track 2 equivalent data with the dialect's separator ('=' in ASCII, nibble 'D' in BCD). A
    TDK-encrypted track (53.3 = 1, reference §4.4) is ciphertext nibbles: any uppercase hex."""
    if not isinstance(value, str) or not 1 <= len(value) <= 37:
        raise ValidationError("track 2 must be 1..37 characters", field="35")
    normal = value.upper().replace("=", "D")
    if encrypted:
        if not _HEXDIGITS.issuperset(normal):
            raise ValidationError("encrypted track 2 must be hex digits", field="35")
        return normal
    if normal.count("D") != 1 or not normal.replace("D", "").isdigit() or not normal.isascii():
        raise ValidationError("track 2 must be digits with one separator", field="35")
    return normal.replace("D", separator)


def card_fields(
    fields: dict[str, str], settings: DialectSettings, card: CardInput, *, pin_capture: bool
) -> None:
    """Add the card fields (2, 14, 22, 23, 26, 35, 52, 53, 55) to `fields`. `pin_capture` adds 26
    with a PIN block (CUP)."""
    given = {k: v for k, v in card.items() if v is not None}
    pan, trk = given.get("pan"), given.get("track2")
    if pan is None and trk is None:
        raise ValidationError("card data absent: give pan or track2", field="2/35")
    if pan is not None:
        fields["2"] = var_digits(pan, 19, "2", min_len=12)
    if "expiry" in given:
        fields["14"] = digits(given["expiry"], 4, "14")
    fields["22"] = digits(given.get("entry_mode", "021"), 3, "22")
    if "card_seq" in given:
        fields["23"] = digits(given["card_seq"], 3, "23")
    pin_block = given.get("pin_block")
    raw_control = given.get("security_control")
    control = None if raw_control is None else digits(raw_control, 16, "53")
    if trk is not None:
        encrypted = control is not None and control[2] == "1"  # 53.3: track encrypted under the TDK
        fields["35"] = track2(trk, settings.track2_separator, encrypted=encrypted)
    if pin_block is not None:
        if pin_capture:
            fields["26"] = PIN_CAPTURE_CODE
        fields["52"] = hex_value(pin_block, "52", 16)
        control = control if control is not None else security_control()
    if control is not None:
        fields["53"] = control
    if "icc" in given:
        fields["55"] = hex_value(given["icc"], "55")


def add_mac_placeholder(fields: dict[str, str], settings: DialectSettings) -> None:
    """The MAC field at its wire size; the sender computes the MAC over body[:-n] and splices it in.
    Call it last: the MAC field (64, or 128 with a secondary bitmap) depends on the other fields."""
    for k in settings.mac_fields:
        fields.pop(k, None)
    fields[settings.mac_field_for(fields)] = settings.mac_placeholder
