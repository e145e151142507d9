"""Terminal-side requests of the CUP POS dialect (reference §3.3).

Field 60 is "60.1 transaction type + 60.2 batch + 60.3 network code" (+ 60.4/60.5 on financial
messages). MAC'd flows (purchase, void, refund, balance inquiry, reversal) carry an 8-character MAC
placeholder in 64; the sender splices the real MAC in after encoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Unpack

from gateway.iso.build.common import (
    CardInput,
    TerminalIdent,
    add_mac_placeholder,
    amount12,
    card_fields,
    digits,
    hex_value,
    text,
)
from gateway.iso.errors import SubfieldError, ValidationError
from gateway.iso.message import Message
from gateway.iso.mti import is_request
from gateway.iso.subfields import pack
from gateway.iso.totals import BatchItem, SettlementTotals, pack_batch_end, pack_batch_items
from gateway.iso.validate import DialectSettings, dialect_settings, identify

DIALECT: Final = "cup-pos"

#: 60.1 transaction type codes (reference §3.1)
TXN_BALANCE: Final = "01"
TXN_PURCHASE: Final = "22"
TXN_VOID: Final = "23"
TXN_REFUND: Final = "25"
TXN_MANAGEMENT: Final = "00"

#: 60.3 network management codes (reference §3.2)
NET_FINANCIAL: Final = "000"
KEY_MODES: Final = frozenset({"001", "003", "004"})  #: sign-in: DES / 3DES / 3DES + TDK
NET_SIGN_OFF: Final = "002"
NET_SETTLEMENT: Final = "201"  #: also batch upload of magstripe/online details
NET_BATCH_END_NOT_BALANCED: Final = "202"
NET_BATCH_END_BALANCED: Final = "207"
NET_ECHO: Final = "301"

#: what a 0400 keeps from its original request (reference §3.3): track data, PIN, 26, 37, 53 and
#: vendor fields go; 61 stays for a reversed void, 55 for IC
_REVERSAL_KEEP: Final[tuple[str, ...]] = (
    "2",
    "3",
    "4",
    "11",
    "14",
    "22",
    "23",
    "25",
    "41",
    "42",
    "49",
    "55",
    "60",
    "61",
)


def _settings() -> DialectSettings:
    return dialect_settings(DIALECT)


def _ident_fields(ident: TerminalIdent, stan: str | None) -> dict[str, str]:
    fields: dict[str, str] = {}
    if stan is not None:
        fields["11"] = digits(stan, 6, "11")
    fields["41"] = ident.terminal_id
    fields["42"] = ident.merchant_id
    return fields


def _management_60(batch: str, net_code: str) -> str:
    return pack(
        "cup.60", {"txn_type": TXN_MANAGEMENT, "batch": digits(batch, 6, "60.2"), "net_code": net_code}
    )


def _financial_60(txn_type: str, batch: str, read_capability: str, fallback: bool) -> str:
    try:
        return pack(
            "cup.60",
            {
                "txn_type": txn_type,
                "batch": digits(batch, 6, "60.2"),
                "net_code": NET_FINANCIAL,
                "read_capability": read_capability,
                "ic_condition": "2" if fallback else "0",
            },
        )
    except SubfieldError as exc:
        raise ValidationError(exc.reason, field=exc.field) from None


def _code3(value: str, field: str) -> str:
    """An an3 code (operator, card organisation): shorter values are space-padded (LY: "01 ")."""
    padded = text(value, 3, field)
    if not padded.replace(" ", "").isalnum() or not padded.isascii():
        raise ValidationError("expected up to 3 letters or digits", field=field)
    return padded


# --- management ------------------------------------------------------------------------------------


def sign_in(
    ident: TerminalIdent, stan: str, batch: str, key_mode: str = "004", operator: str = "01"
) -> Message:
    """0800 sign-in; `key_mode` is 60.3 (001 DES, 003 3DES, 004 3DES + TDK)."""
    if key_mode not in KEY_MODES:
        raise ValidationError("key mode must be 001, 003 or 004", field="60.3")
    fields = _ident_fields(ident, stan)
    fields["60"] = _management_60(batch, key_mode)
    fields["63"] = _code3(operator, "63")
    return Message("0800", fields)


def sign_off(ident: TerminalIdent, stan: str, batch: str) -> Message:
    fields = _ident_fields(ident, stan)
    fields["60"] = _management_60(batch, NET_SIGN_OFF)
    return Message("0820", fields)


def echo(ident: TerminalIdent, batch: str) -> Message:
    """0820 echo test; like LY it carries no STAN."""
    fields = _ident_fields(ident, None)
    fields["60"] = _management_60(batch, NET_ECHO)
    return Message("0820", fields)


def settlement(
    ident: TerminalIdent, stan: str, batch: str, totals: SettlementTotals, operator: str = "01"
) -> Message:
    """0500 batch settlement with the terminal's totals in 48 (result codes "0" in a request)."""
    fields = _ident_fields(ident, stan)
    try:
        fields["48"] = totals.to_field48()
    except SubfieldError as exc:
        raise ValidationError(exc.reason, field=exc.field) from None
    fields["49"] = "156"
    fields["60"] = _management_60(batch, NET_SETTLEMENT)
    fields["63"] = _code3(operator, "63")
    return Message("0500", fields)


def batch_upload(ident: TerminalIdent, stan: str, batch: str, items: Sequence[BatchItem]) -> Message:
    """0320 (60.3=201) with up to 8 transaction details in 48."""
    fields = _ident_fields(ident, stan)
    try:
        fields["48"] = pack_batch_items(items)
    except SubfieldError as exc:
        raise ValidationError(exc.reason, field=exc.field) from None
    fields["60"] = _management_60(batch, NET_SETTLEMENT)
    return Message("0320", fields)


def batch_upload_end(ident: TerminalIdent, stan: str, batch: str, count: int, balanced: bool) -> Message:
    """The closing 0320: 60.3 207 after a balanced settlement, 202 otherwise; 48 = items uploaded."""
    fields = _ident_fields(ident, stan)
    try:
        fields["48"] = pack_batch_end(count)
    except SubfieldError as exc:
        raise ValidationError(exc.reason, field=exc.field) from None
    fields["60"] = _management_60(batch, NET_BATCH_END_BALANCED if balanced else NET_BATCH_END_NOT_BALANCED)
    return Message("0320", fields)


# --- financial -------------------------------------------------------------------------------------


def _financial(
    mti: str,
    processing: str,
    txn_type: str,
    ident: TerminalIdent,
    stan: str,
    batch: str,
    amount: int | None,
    currency: str,
    read_capability: str,
    fallback: bool,
    card: CardInput,
) -> dict[str, str]:
    settings = _settings()
    fields = _ident_fields(ident, stan)
    fields["3"] = processing
    if amount is not None:
        fields["4"] = amount12(amount)
    card_fields(fields, settings, card, pin_capture=True)
    fields["25"] = "00"
    fields["49"] = digits(currency, 3, "49")
    fields["60"] = _financial_60(txn_type, batch, read_capability, fallback)
    return fields


def purchase(
    ident: TerminalIdent,
    stan: str,
    batch: str,
    amount: int,
    *,
    currency: str = "156",
    read_capability: str = "5",
    fallback: bool = False,
    **card: Unpack[CardInput],
) -> Message:
    """0200 purchase (3=000000, 25=00, 60.1=22). With a PIN block: 26 and 53 too."""
    fields = _financial(
        "0200", "000000", TXN_PURCHASE, ident, stan, batch, amount, currency, read_capability, fallback, card
    )
    add_mac_placeholder(fields, _settings())
    return Message("0200", fields)


def void(
    ident: TerminalIdent,
    stan: str,
    batch: str,
    amount: int,
    *,
    orig_rrn: str,
    orig_batch: str,
    orig_trace: str,
    orig_auth: str | None = None,
    currency: str = "156",
    read_capability: str = "5",
    fallback: bool = False,
    **card: Unpack[CardInput],
) -> Message:
    """0200 purchase void (3=200000, 60.1=23): 37 original RRN, 38 original auth code, 61 original
    batch + trace."""
    fields = _financial(
        "0200", "200000", TXN_VOID, ident, stan, batch, amount, currency, read_capability, fallback, card
    )
    fields["37"] = text(orig_rrn, 12, "37", pad=False)
    if orig_auth is not None:
        fields["38"] = text(orig_auth, 6, "38")
    fields["61"] = digits(orig_batch, 6, "61.1") + digits(orig_trace, 6, "61.2")
    add_mac_placeholder(fields, _settings())
    return Message("0200", fields)


def refund(
    ident: TerminalIdent,
    stan: str,
    batch: str,
    amount: int,
    *,
    orig_rrn: str,
    orig_date: str,
    orig_batch: str = "000000",
    orig_trace: str = "000000",
    card_org: str = "000",
    currency: str = "156",
    read_capability: str = "5",
    fallback: bool = False,
    **card: Unpack[CardInput],
) -> Message:
    """0220 refund (3=200000, 60.1=25): 37 original RRN, 61 original batch + trace + MMDD (zeros when
    batch/trace are unknown, as LY does), 63 card organisation ("000" when unknown)."""
    fields = _financial(
        "0220", "200000", TXN_REFUND, ident, stan, batch, amount, currency, read_capability, fallback, card
    )
    fields["37"] = text(orig_rrn, 12, "37", pad=False)
    fields["61"] = (
        digits(orig_batch, 6, "61.1") + digits(orig_trace, 6, "61.2") + digits(orig_date, 4, "61.3")
    )
    fields["63"] = _code3(card_org, "63")
    add_mac_placeholder(fields, _settings())
    return Message("0220", fields)


def balance_inquiry(
    ident: TerminalIdent,
    stan: str,
    batch: str,
    *,
    currency: str = "156",
    read_capability: str = "5",
    fallback: bool = False,
    **card: Unpack[CardInput],
) -> Message:
    """0200 balance inquiry (3=310000, 60.1=01), no amount."""
    fields = _financial(
        "0200", "310000", TXN_BALANCE, ident, stan, batch, None, currency, read_capability, fallback, card
    )
    add_mac_placeholder(fields, _settings())
    return Message("0200", fields)


def reversal(
    original: Message, reason: str, auth_code: str | None = None, *, icc: str | None = None
) -> Message:
    """0400 for a reversible request (purchase, void), reference §3.3: same 3, 11 and 60 as the
    original; 35/36/52/26/37/53 dropped; 39 = the reason (98 timeout, 96 terminal fault after
    approval, A0 response MAC failure, 06 other); 38 when an auth code was received; `icc` replaces
    55 with the reduced reversal tag set."""
    flow = identify(DIALECT, original)
    if flow is None or not flow.reversible or not is_request(original.mti):
        raise ValidationError("not a reversible request", field="t")
    settings = _settings()
    if reason not in settings.reversal_reasons:
        raise ValidationError(
            f"reversal reason must be one of {sorted(settings.reversal_reasons)}", field="39"
        )
    fields = {k: original.fields[k] for k in _REVERSAL_KEEP if k in original.fields}
    if icc is not None:
        fields["55"] = hex_value(icc, "55")
    if auth_code is not None:
        fields["38"] = text(auth_code, 6, "38")
    fields["39"] = reason
    add_mac_placeholder(fields, settings)
    return Message("0400", fields)
