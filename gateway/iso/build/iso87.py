"""Host-side requests of the ISO 8583:1987 ASCII dialect (gateway → acquirer/issuer host), reference §6.

Network management is 0800 with 70 = 001 sign-on, 002 sign-off, 301 echo, 101 key request.
Financial requests carry 7 (transmission date-time MMDDhhmmss), 11, 12/13 (local time/date), 22, 25,
32 (acquirer id), 41, 42, 49 and the card data; MAC'd ones a 16-hex-character placeholder in 64.
Reversals (0400, repeats 0401; or advices 0420/0421) identify their original through field 90.

The host link stamps its own 7 and 11 on every request before journalling it; the values given here
make each message complete on its own (tests, simulators, replays).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Unpack

from gateway.iso.build.common import (
    CardInput,
    TerminalIdent,
    add_mac_placeholder,
    amount12,
    card_fields,
    digits,
    text,
    var_digits,
)
from gateway.iso.build.response import response
from gateway.iso.errors import SubfieldError, ValidationError
from gateway.iso.message import Message
from gateway.iso.mti import is_request, repeat_mti
from gateway.iso.subfields import pack, unpack
from gateway.iso.validate import DialectSettings, dialect_settings, identify

DIALECT: Final = "iso87-ascii"

#: field 70 network management information codes
NMIC_SIGN_ON: Final = "001"
NMIC_SIGN_OFF: Final = "002"
NMIC_KEY_REQUEST: Final = "101"
NMIC_ECHO: Final = "301"

#: key request: which zone key, as the first digit of 53 (1 PIN key, 2 MAC key); the second digit
#: says double-length 3DES, as in the CUP 53 layout
KEY_TYPES: Final = {"ZPK": "1", "ZAK": "2"}
KEY_LAYOUT: Final = "iso87.48.key"
ORIGINAL_LAYOUT: Final = "iso87.90"

#: a reversal sent upstream: a request (0400) or an advice (0420); repeats end in 1 (0401, 0421)
REVERSAL_MTI: Final = "0400"
REVERSAL_ADVICE_MTI: Final = "0420"

#: processing codes (first two digits: transaction type; then from/to account "0000")
PROC_PURCHASE: Final = "000000"
PROC_VOID: Final = "020000"
PROC_REFUND: Final = "200000"
PROC_BALANCE: Final = "310000"

#: what a 0400 keeps from its original 0200; PIN, tracks and 53 go, 90 names the original
_REVERSAL_KEEP: Final[tuple[str, ...]] = (
    "2",
    "3",
    "4",
    "7",
    "11",
    "12",
    "13",
    "14",
    "22",
    "23",
    "25",
    "32",
    "33",
    "41",
    "42",
    "49",
    "55",
)


def _settings() -> DialectSettings:
    return dialect_settings(DIALECT)


@dataclass(frozen=True, slots=True)
class OriginalData:
    """Field 90, original data elements: the MTI, STAN (11), transmission date-time (7), acquirer
    (32) and forwarding institution (33) of the transaction a reversal, void or refund refers to."""

    mti: str
    stan: str
    transmission_dt: str
    acquirer_id: str
    forwarding_id: str = ""

    @classmethod
    def from_request(cls, original: Message) -> OriginalData:
        missing = next((k for k in ("7", "11", "32") if k not in original.fields), None)
        if missing is not None:
            raise ValidationError("original request lacks a field that field 90 needs", field=missing)
        return cls(
            original.mti,
            original.fields["11"],
            original.fields["7"],
            original.fields["32"],
            original.fields.get("33", ""),
        )

    def pack(self) -> str:
        try:
            return pack(
                ORIGINAL_LAYOUT,
                {
                    "orig_mti": self.mti,
                    "orig_stan": self.stan,
                    "orig_transmission": self.transmission_dt,
                    "orig_acquirer_id": var_digits(self.acquirer_id, 11, "90.4").rjust(11, "0"),
                    "orig_forwarding_id": (
                        var_digits(self.forwarding_id, 11, "90.5") if self.forwarding_id else ""
                    ).rjust(11, "0"),
                },
            )
        except SubfieldError as exc:
            raise ValidationError(exc.reason, field=exc.field) from None

    @classmethod
    def parse(cls, value: str) -> OriginalData:
        """From a field 90 value; acquirer and forwarding ids come back zero-filled to 11 digits."""
        p = unpack(ORIGINAL_LAYOUT, value)
        return cls(
            p["orig_mti"],
            p["orig_stan"],
            p["orig_transmission"],
            p["orig_acquirer_id"],
            p["orig_forwarding_id"],
        )


# --- network management ----------------------------------------------------------------------------


def _network(stan: str, transmission_dt: str, nmic: str, acquirer_id: str | None) -> dict[str, str]:
    fields = {"7": digits(transmission_dt, 10, "7"), "11": digits(stan, 6, "11")}
    if acquirer_id is not None:
        fields["32"] = var_digits(acquirer_id, 11, "32")
    fields["70"] = nmic
    return fields


def sign_on(stan: str, transmission_dt: str, acquirer_id: str) -> Message:
    return Message("0800", _network(stan, transmission_dt, NMIC_SIGN_ON, acquirer_id))


def sign_off(stan: str, transmission_dt: str, acquirer_id: str) -> Message:
    return Message("0800", _network(stan, transmission_dt, NMIC_SIGN_OFF, acquirer_id))


def echo(stan: str, transmission_dt: str, acquirer_id: str) -> Message:
    return Message("0800", _network(stan, transmission_dt, NMIC_ECHO, acquirer_id))


def key_request(stan: str, transmission_dt: str, key_type: str, acquirer_id: str | None = None) -> Message:
    """0800 70=101 asking for a new zone key: `key_type` "ZPK" (PIN) or "ZAK" (MAC), told in 53."""
    digit = KEY_TYPES.get(key_type)
    if digit is None:
        raise ValidationError(f"key type must be one of {sorted(KEY_TYPES)}", field="53")
    fields = _network(stan, transmission_dt, NMIC_KEY_REQUEST, acquirer_id)
    fields["53"] = digit + "6" + "0" * 14
    return Message("0800", fields)


def requested_key_type(request: Message) -> str:
    """Which key a 70=101 request (or its answer) is about: "ZPK" or "ZAK"."""
    digit = request.fields.get("53", "")[:1]
    for name, d in KEY_TYPES.items():
        if d == digit:
            return name
    raise ValidationError("53 names no known key type", field="53")


def key_response(request: Message, key_under_zmk: bytes, kcv: bytes, rc: str = "00") -> Message:
    """The host's 0810 to a key request: on approval 48 = the new double-length zone key under the ZMK
    (16 bytes) + its check value (4 bytes), as hex (`make_zone_key_under_zmk(zmk, 16, 4)`)."""
    if rc != "00":
        return response(request, rc, DIALECT)
    try:
        value = pack(KEY_LAYOUT, {"key_under_zmk": key_under_zmk.hex().upper(), "kcv": kcv.hex().upper()})
    except SubfieldError as exc:
        raise ValidationError(exc.reason, field=exc.field) from None
    return response(request, rc, DIALECT, field_48=value)


def parse_key_response(msg: Message) -> tuple[bytes, bytes]:
    """(key under ZMK, KCV) from an approved 0810 to a key request, ready for
    `SecurityModule.install_host_key` (which verifies the KCV)."""
    value = msg.fields.get("48")
    if value is None:
        raise ValidationError("key response carries no key", field="48")
    try:
        p = unpack(KEY_LAYOUT, value)
    except SubfieldError as exc:
        raise ValidationError(exc.reason, field=exc.field) from None
    return bytes.fromhex(p["key_under_zmk"]), bytes.fromhex(p["kcv"])


# --- financial -------------------------------------------------------------------------------------


def _financial(
    processing: str,
    ident: TerminalIdent,
    stan: str,
    transmission_dt: str,
    acquirer_id: str,
    amount: int | None,
    local_dt: str | None,
    currency: str,
    condition: str,
    card: CardInput,
) -> dict[str, str]:
    local = digits(local_dt if local_dt is not None else transmission_dt, 10, "12/13")
    fields = {"3": processing}
    if amount is not None:
        fields["4"] = amount12(amount)
    fields["7"] = digits(transmission_dt, 10, "7")
    fields["11"] = digits(stan, 6, "11")
    fields["12"] = local[4:]
    fields["13"] = local[:4]
    card_fields(fields, _settings(), card, pin_capture=False)
    fields["25"] = digits(condition, 2, "25")
    fields["32"] = var_digits(acquirer_id, 11, "32")
    fields["41"] = ident.terminal_id
    fields["42"] = ident.merchant_id
    fields["49"] = digits(currency, 3, "49")
    return fields


def _finish(fields: dict[str, str]) -> Message:
    add_mac_placeholder(fields, _settings())
    return Message("0200", fields)


def purchase(
    ident: TerminalIdent,
    stan: str,
    transmission_dt: str,
    acquirer_id: str,
    amount: int,
    *,
    local_dt: str | None = None,
    currency: str = "156",
    condition: str = "00",
    **card: Unpack[CardInput],
) -> Message:
    """0200 purchase, 3=000000. `local_dt` (MMDDhhmmss) feeds 13/12; it defaults to `transmission_dt`."""
    return _finish(
        _financial(
            PROC_PURCHASE,
            ident,
            stan,
            transmission_dt,
            acquirer_id,
            amount,
            local_dt,
            currency,
            condition,
            card,
        )
    )


def refund(
    ident: TerminalIdent,
    stan: str,
    transmission_dt: str,
    acquirer_id: str,
    amount: int,
    *,
    original: OriginalData | None = None,
    orig_rrn: str | None = None,
    local_dt: str | None = None,
    currency: str = "156",
    condition: str = "00",
    **card: Unpack[CardInput],
) -> Message:
    """0200 refund, 3=200000, with 90 when the original's data elements are known, else 37 (its RRN)."""
    if original is None and orig_rrn is None:
        raise ValidationError("a refund needs the original's data elements or RRN", field="90/37")
    fields = _financial(
        PROC_REFUND, ident, stan, transmission_dt, acquirer_id, amount, local_dt, currency, condition, card
    )
    if orig_rrn is not None:
        fields["37"] = text(orig_rrn, 12, "37", pad=False)
    if original is not None:
        fields["90"] = original.pack()
    return _finish(fields)


def void(
    ident: TerminalIdent,
    stan: str,
    transmission_dt: str,
    acquirer_id: str,
    amount: int,
    original: OriginalData,
    *,
    orig_rrn: str | None = None,
    orig_auth: str | None = None,
    local_dt: str | None = None,
    currency: str = "156",
    condition: str = "00",
    **card: Unpack[CardInput],
) -> Message:
    """0200 void, 3=020000, 90 = the original's data elements (37/38 when known)."""
    fields = _financial(
        PROC_VOID, ident, stan, transmission_dt, acquirer_id, amount, local_dt, currency, condition, card
    )
    if orig_rrn is not None:
        fields["37"] = text(orig_rrn, 12, "37", pad=False)
    if orig_auth is not None:
        fields["38"] = text(orig_auth, 6, "38")
    fields["90"] = original.pack()
    return _finish(fields)


def balance_inquiry(
    ident: TerminalIdent,
    stan: str,
    transmission_dt: str,
    acquirer_id: str,
    *,
    local_dt: str | None = None,
    currency: str = "156",
    condition: str = "00",
    **card: Unpack[CardInput],
) -> Message:
    """0200 balance inquiry, 3=310000, no amount."""
    return _finish(
        _financial(
            PROC_BALANCE, ident, stan, transmission_dt, acquirer_id, None, local_dt, currency, condition, card
        )
    )


def reversal(original_host_request: Message, reason_rc: str, repeat: bool = False, *, advice: bool = False) -> Message:
    """0400 (0401 when `repeat`) for a reversible 0200: the original's amount, card and terminal fields
    without PIN/track data, 90 built from its MTI/11/7/32/33, 39 = `reason_rc` when the dialect
    carries a reason, and a MAC placeholder. `advice`: the same as an acquirer reversal advice, 0420
    (0421), as a POSP sends a terminal's 0400 on to the network (reference §3.8)."""
    original = original_host_request
    flow = identify(DIALECT, original)
    if flow is None or not flow.reversible or not is_request(original.mti):
        raise ValidationError("not a reversible request", field="t")
    settings = _settings()
    fields = {k: original.fields[k] for k in _REVERSAL_KEEP if k in original.fields}
    fields["90"] = OriginalData.from_request(original).pack()
    if settings.reversal_reason_field:
        fields["39"] = text(reason_rc, 2, "39", pad=False)
    add_mac_placeholder(fields, settings)
    mti = REVERSAL_ADVICE_MTI if advice else REVERSAL_MTI
    return Message(repeat_mti(mti) if repeat else mti, fields)
