"""The host reversal (0400, repeats 0401; or advices 0420/0421) for a journalled transaction, rebuilt
from the journal alone: the SAF queue must be able to reverse after a crash, when nothing but the
database is left. The journal keeps no PAN, so the reversal identifies its original through field 90
(MTI, STAN, transmission date-time, acquirer) plus terminal, amount and processing code, as ISO
8583:1987 intends.
"""

from __future__ import annotations

from gateway.iso.build import iso87
from gateway.iso.message import Message
from gateway.store.records import SafEntry


def original_host_request(entry: SafEntry, acquirer_id: str, forwarding_id: str) -> Message:
    txn = entry.txn
    fields = {
        "3": txn.processing_code,
        "4": f"{txn.amount:012d}",
        "7": txn.transmission_datetime or "0000000000",
        "11": txn.host_stan or "000000",
        "22": txn.pos_entry_mode or "000",
        "25": txn.pos_condition_code or "00",
        "32": acquirer_id,
        "41": txn.terminal_id,
        "42": txn.merchant_id,
        "49": txn.currency,
    }
    if forwarding_id.strip("0"):
        fields["33"] = forwarding_id
    return Message(txn.host_mti or "0200", fields)


def build_host_reversal(entry: SafEntry, *, repeat: bool, acquirer_id: str, forwarding_id: str,
                        advice: bool = False) -> Message:
    """The reversal as sent upstream. Its own 11 and 7 are the entry's (`reversal_stan`/`_datetime`)
    when it has them, so a repeat is the first attempt's message with the MTI's last digit 1 (the host
    link's MAC, computed over the whole message, then covers the new MTI); otherwise the caller stamps
    fresh ones."""
    original = original_host_request(entry, acquirer_id, forwarding_id)
    msg = iso87.reversal(original, entry.reason, repeat=repeat, advice=advice)
    if entry.reversal_stan is not None and entry.reversal_datetime is not None:
        msg.fields["11"], msg.fields["7"] = entry.reversal_stan, entry.reversal_datetime
    return msg
