"""Dialect translation: a CUP POS terminal request → the host's ISO 8583:1987 request, and the host's
answer → the terminal's answer. The security module translates the PIN block (PIK → ZPK) and decrypts
TDK-encrypted track data on the way; no clear PIN or key ever passes through here.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import HostConfig
from gateway.core import decisions
from gateway.core.clock import local_now
from gateway.iso.build import OriginalData, TerminalIdent, iso87
from gateway.iso.message import Message, mask_pan
from gateway.security.module import SecurityModule
from gateway.store.records import TxnRecord, TxnRequest

#: 53.1 = "2": the PIN block is bound to the PAN (ISO 9564 format 0); "1": without PAN
PIN_WITH_PAN = "2"
#: 53.3 = "1": tracks 35/36 are encrypted under the TDK (reference §4.4)
TRACK_ENCRYPTED = "1"


@dataclass(frozen=True, slots=True)
class CardData:
    pan: str | None  #: from field 2, or the track's account number; for hashing/masking only
    fields: dict[str, str]  #: keyword arguments for the host builders (CardInput)


def card_org(pan: str | None) -> str:
    """CUP for 内卡 (62 BINs), otherwise the international organisation (外卡) by its BIN."""
    if not pan:
        return "000"
    if pan.startswith("62"):
        return "CUP"
    if pan.startswith("4"):
        return "VIS"
    if pan[:2] in {"51", "52", "53", "54", "55"} or pan.startswith("2"):
        return "MCC"
    if pan.startswith("35"):
        return "JCB"
    if pan[:2] in {"34", "37"}:
        return "AMX"
    return "000"


def card_data(request: Message, security: SecurityModule) -> CardData:
    """The card fields for the host: clear track (decrypted), PIN block under the ZPK."""
    terminal_id = request.fields["41"]
    control = request.fields.get("53", "")
    card: dict[str, str] = {}
    pan = request.fields.get("2")
    track = request.fields.get("35")
    if track is not None:
        if control[2:3] == TRACK_ENCRYPTED:
            track = security.decrypt_track2(terminal_id, track)
        card["track2"] = track
        if pan is None:
            pan = track.replace("=", "D").split("D", 1)[0]
    if "2" in request.fields:
        card["pan"] = request.fields["2"]
    for key, name in (("14", "expiry"), ("22", "entry_mode"), ("23", "card_seq"), ("55", "icc")):
        if key in request.fields:
            card[name] = request.fields[key]
    if "52" in request.fields:
        bound = pan if control[:1] != "1" else None
        pin_block = security.translate_pin_to_host(terminal_id, bytes.fromhex(request.fields["52"]), bound)
        card["pin_block"] = pin_block.hex().upper()
    return CardData(pan, card)


def to_host(request: Message, flow: str, card: CardData, host: HostConfig, stan: str, transmission_dt: str,
            original: TxnRecord | None) -> Message:
    """The host request for a terminal's purchase / void / refund / balance inquiry."""
    ident = TerminalIdent(request.fields["41"], request.fields["42"])
    common = {
        "local_dt": local_now().mmddhhmmss,
        "currency": request.fields.get("49", "156"),
        "condition": request.fields.get("25", "00"),
    }
    amount = int(request.fields.get("4", "0") or 0)
    if flow == "purchase":
        return iso87.purchase(ident, stan, transmission_dt, host.acquirer_id, amount, **common, **card.fields)
    if flow == "balance_inquiry":
        return iso87.balance_inquiry(ident, stan, transmission_dt, host.acquirer_id, **common, **card.fields)
    orig_data = original_data(original, host.acquirer_id) if original is not None else None
    if flow == "void":
        assert orig_data is not None  # the service refuses a void without its original (25)
        return iso87.void(ident, stan, transmission_dt, host.acquirer_id, amount, orig_data,
                          orig_rrn=request.fields.get("37"), orig_auth=request.fields.get("38"),
                          **common, **card.fields)
    if flow == "refund":
        return iso87.refund(ident, stan, transmission_dt, host.acquirer_id, amount, original=orig_data,
                            orig_rrn=request.fields.get("37"), **common, **card.fields)
    raise ValueError(f"no host translation for flow {flow!r}")


def original_data(original: TxnRecord, acquirer_id: str) -> OriginalData:
    """Field 90 of a void/refund: the original's host MTI, STAN and transmission date-time."""
    return OriginalData(original.host_mti or "0200", original.host_stan or "000000",
                        original.transmission_datetime or "0000000000", acquirer_id)


def original_refs(request: Message) -> tuple[str | None, str | None, str | None]:
    """(batch, trace, MMDD) of the original from field 61 (void: 12 digits; refund: 16)."""
    f61 = request.fields.get("61", "")
    batch = f61[0:6] if len(f61) >= 6 else None
    trace = f61[6:12] if len(f61) >= 12 else None
    date = f61[12:16] if len(f61) >= 16 else None
    return batch, trace, date


def to_terminal(request: Message, host_answer: Message, acquirer_id: str, pan: str | None) -> Message:
    """The terminal's answer from the host's: its code, RRN, auth code and balance, our local time."""
    extra: dict[str, str] = {"field_32": acquirer_id, **decisions.local_time_fields()}
    for key in ("37", "38", "54"):
        if key in host_answer.fields:
            extra[f"field_{key}"] = host_answer.fields[key]
    if "15" in host_answer.fields:
        extra["field_15"] = host_answer.fields["15"]
    extra["field_63"] = card_org(pan)  # 63.1: decides 内卡/外卡 in the terminal's settlement totals
    return decisions.answer(request, host_answer.fields.get("39", "96"), **extra)


def journal_record(request: Message, host_request: Message, flow: str, card: CardData, fingerprint: str,
                   original: TxnRecord | None) -> TxnRequest:
    """What the journal keeps of a request: never the PIN block, the track or the clear PAN."""
    orig_batch, orig_stan, orig_date = original_refs(request)
    return TxnRequest(
        terminal_id=request.fields["41"],
        merchant_id=request.fields["42"],
        batch=decisions.batch_of(request),
        terminal_stan=request.fields["11"],
        terminal_mti=request.mti,
        processing_code=host_request.fields["3"],
        kind=flow,  # type: ignore[arg-type]
        amount=int(request.fields.get("4", "0") or 0),
        currency=request.fields.get("49", "156"),
        pan_masked=mask_pan(card.pan) if card.pan else "",
        pan_fingerprint=fingerprint,
        card_org=card_org(card.pan),
        host_mti=host_request.mti,
        host_stan=host_request.fields["11"],
        transmission_datetime=host_request.fields["7"],
        pos_entry_mode=request.fields.get("22"),
        pos_condition_code=request.fields.get("25"),
        orig_txn_id=original.txn_id if original is not None else None,
        orig_batch=orig_batch,
        orig_stan=orig_stan,
        orig_rrn=request.fields.get("37") if flow in ("void", "refund") else None,
        orig_date=orig_date,
        orig_auth_code=request.fields.get("38") if flow == "void" else None,
    )
