"""What a trace may hold: card numbers wherever a dialect carries them become surrogates, consistently.

ISO 8583:1987 carries a card number in 2 and 34 (PAN, extended), and many hosts put it in 102/103
(account identification) too: `gateway.iso.message.PAN_LIKE_FIELDS`, which the logs mask 6+4. A trace
must not keep there what it replaces in field 2."""

from __future__ import annotations

import json

from gateway.iso.codec import Codec
from gateway.iso.framing import make_framer
from gateway.iso.message import PAN_LIKE_FIELDS, Message
from gateway.iso.spec import load_dialect
from gateway.lab import CARD_CUP, CARD_VISA
from gateway.trace.encoder import TraceEncoder
from gateway.trace.format import Direction, FrameRecord, Leg, SecretKind

ISO = load_dialect("iso87-ascii")


def host_answer() -> Message:
    return Message("0210", {"2": CARD_CUP.pan, "3": "000000", "4": "000000001000", "11": "000123",
                            "34": CARD_CUP.pan, "39": "00", "41": "10000001", "102": CARD_CUP.pan,
                            "103": CARD_VISA.pan})


def test_every_card_number_field_of_the_host_dialect_is_a_surrogate() -> None:
    enc = TraceEncoder({"host": "iso87-ascii"}, {"host": "len2"}, lenient=False)
    body = Codec(ISO).encode(host_answer())
    rec = enc.frame(1.0, Leg.HOST, Direction.IN, "H1", body)
    assert isinstance(rec, FrameRecord), rec
    line = json.dumps(rec.to_json())
    assert CARD_CUP.pan not in line and CARD_VISA.pan not in line
    assert CARD_CUP.pan.encode().hex().upper() not in rec.wire
    for k in PAN_LIKE_FIELDS:
        assert rec.secrets[k] is SecretKind.PAN
    # the same card is the same surrogate in every field that carries it
    assert rec.fields["2"] == rec.fields["34"] == rec.fields["102"] != rec.fields["103"]
    assert rec.fields["103"][:6] == CARD_VISA.pan[:6]


def test_the_surrogated_frame_still_decodes_to_the_recorded_fields() -> None:
    enc = TraceEncoder({"host": "iso87-ascii"}, {"host": "len2"}, lenient=False)
    rec = enc.frame(1.0, Leg.HOST, Direction.IN, "H1", Codec(ISO).encode(host_answer()))
    assert isinstance(rec, FrameRecord)
    [frame] = make_framer("len2").decoder().feed(bytes.fromhex(rec.wire))
    assert Codec(ISO).decode(frame.body).fields == rec.fields
