"""`Message`: an MTI plus field values, as pyiso8583 decodes them.

Field keys are pyiso8583's: "2" .. "128" (never "t", "p", "1", "h": the codec owns those). Values are
strings exactly as pyiso8583 represents them, so decode → Message → encode needs no conversion:
numeric and text fields are their digits/characters, binary fields (data_enc "b", e.g. 52, 55, 62, 64
in the CUP dialect) are uppercase hex.

Secrets never leak through `repr`/`str`/`masked()`: the PAN shows first 6 / last 4, and track data,
PIN blocks, chip data and key material show only their length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

#: fields whose content is never shown anywhere outside the security module
REDACTED_FIELDS: Final = frozenset({"35", "36", "45", "52", "55", "62", "96"})
PAN_FIELD: Final = "2"
#: fields shown as a PAN is (6+4): the PAN, and where ISO 8583:1987 also carries a card number (34 PAN
#: extended; 102/103 account identification, the PAN at many hosts)
PAN_LIKE_FIELDS: Final = frozenset({PAN_FIELD, "34", "102", "103"})


def mask_pan(pan: str) -> str:
    """First 6 and last 4 digits, the rest as '*'. Short values are masked whole."""
    if len(pan) < 13:
        return "*" * len(pan)
    return f"{pan[:6]}{'*' * (len(pan) - 10)}{pan[-4:]}"


#: field 48 is "additional data, private": batch uploads carry full PANs in it and key exchanges carry
#: keys, so it is shown only where it holds plain figures (settlement totals, 05xx)
FIELD_48_SHOWN_CLASS: Final = "5"


def masked_value(key: str, value: str, mti: str = "") -> str:
    if key in PAN_LIKE_FIELDS:
        return mask_pan(value)
    if key in REDACTED_FIELDS or (key == "48" and mti[1:2] != FIELD_48_SHOWN_CLASS):
        return f"<redacted {len(value)}>"
    return value


@dataclass(slots=True)
class Message:
    mti: str
    fields: dict[str, str] = field(default_factory=dict)

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.fields.get(key, default)

    def __getitem__(self, key: str) -> str:
        return self.fields[key]

    def __contains__(self, key: object) -> bool:
        return key in self.fields

    def with_fields(self, mti: str | None = None, **updates: str) -> Message:
        """A copy with some fields replaced; pass `field_39="00"` style keys or use `set`."""
        new = dict(self.fields)
        for k, v in updates.items():
            new[k.removeprefix("field_")] = v
        return Message(mti or self.mti, new)

    def masked(self) -> dict[str, str]:
        """Field values safe for logs, traces and JSON output, in field order."""
        out = {"t": self.mti}
        for k in sorted(self.fields, key=int):
            out[k] = masked_value(k, self.fields[k], self.mti)
        return out

    def __repr__(self) -> str:
        inner = " ".join(f"{k}={v!r}" for k, v in self.masked().items() if k != "t")
        return f"Message({self.mti} {inner})"

    __str__ = __repr__
