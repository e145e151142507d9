"""Settlement value objects: the totals of CUP field 48 in 0500/0510 and the batch-upload items of
0320 (reference §3.7). Amounts are `int` minor units; the wire forms go through the layouts of
specs/subfields.toml, so a total that does not fit (amount ≥ 10^12, count ≥ 1000) is a typed
`SubfieldError`, never a silently truncated field.

Debit = purchases (and other sales); credit = voids and refunds. A voided purchase stays in debit and
its void is counted in credit (LY `ChkOption.c`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Final

from gateway.iso.errors import SubfieldError
from gateway.iso.message import mask_pan
from gateway.iso.subfields import pack, unpack

TOTALS_LAYOUT: Final = "cup.48.totals"
ITEMS_LAYOUT: Final = "cup.48.batch_items"
END_LAYOUT: Final = "cup.48.batch_end"
MAX_BATCH_ITEMS: Final = 8

#: 对账应答代码: what a request carries, and the host's three verdicts
RESULT_REQUEST: Final = "0"
RESULT_BALANCED: Final = "1"
RESULT_NOT_BALANCED: Final = "2"
RESULT_ERROR: Final = "3"

CARD_ORG_DOMESTIC: Final = "00"  #: 内卡 (CUP cards) in batch-upload items
CARD_ORG_FOREIGN: Final = "01"  #: 外卡


def _num(value: int, width: int, field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 10**width:
        raise SubfieldError(f"not an integer of at most {width} digits", field=field)
    return f"{value:0{width}d}"


@dataclass(frozen=True, slots=True)
class CardTotals:
    """Totals of one card group (内卡 or 外卡) and the host's reconciliation result for it."""

    debit_amount: int = 0
    debit_count: int = 0
    credit_amount: int = 0
    credit_count: int = 0
    result: str = RESULT_REQUEST

    def add_debit(self, amount: int) -> CardTotals:
        return replace(self, debit_amount=self.debit_amount + amount, debit_count=self.debit_count + 1)

    def add_credit(self, amount: int) -> CardTotals:
        return replace(self, credit_amount=self.credit_amount + amount, credit_count=self.credit_count + 1)

    def same_figures(self, other: CardTotals) -> bool:
        """Amounts and counts agree (the result codes are not compared)."""
        return (self.debit_amount, self.debit_count, self.credit_amount, self.credit_count) == (
            other.debit_amount,
            other.debit_count,
            other.credit_amount,
            other.credit_count,
        )


@dataclass(frozen=True, slots=True)
class SettlementTotals:
    domestic: CardTotals = field(default_factory=CardTotals)
    foreign: CardTotals = field(default_factory=CardTotals)

    @property
    def balanced(self) -> bool:
        """Both groups reconciled (the terminal then uploads only IC TCs and ends with 60.3=207)."""
        return self.domestic.result == RESULT_BALANCED and self.foreign.result == RESULT_BALANCED

    def reconciled(self, actual: SettlementTotals) -> SettlementTotals:
        """These (terminal-claimed) totals with each group's result set by comparing with `actual`:
        what a host puts in the 0510's field 48."""

        def verdict(claimed: CardTotals, real: CardTotals) -> str:
            return RESULT_BALANCED if claimed.same_figures(real) else RESULT_NOT_BALANCED

        return SettlementTotals(
            replace(self.domestic, result=verdict(self.domestic, actual.domestic)),
            replace(self.foreign, result=verdict(self.foreign, actual.foreign)),
        )

    def to_field48(self) -> str:
        parts: dict[str, str] = {}
        for prefix, group, first in (("domestic", self.domestic, 1), ("foreign", self.foreign, 6)):
            parts[f"{prefix}_debit_amount"] = _num(group.debit_amount, 12, f"48.{first}")
            parts[f"{prefix}_debit_count"] = _num(group.debit_count, 3, f"48.{first + 1}")
            parts[f"{prefix}_credit_amount"] = _num(group.credit_amount, 12, f"48.{first + 2}")
            parts[f"{prefix}_credit_count"] = _num(group.credit_count, 3, f"48.{first + 3}")
            parts[f"{prefix}_result"] = group.result
        return pack(TOTALS_LAYOUT, parts)

    @classmethod
    def from_field48(cls, value: str) -> SettlementTotals:
        p = unpack(TOTALS_LAYOUT, value)

        def group(prefix: str) -> CardTotals:
            return CardTotals(
                int(p[f"{prefix}_debit_amount"]),
                int(p[f"{prefix}_debit_count"]),
                int(p[f"{prefix}_credit_amount"]),
                int(p[f"{prefix}_credit_count"]),
                p[f"{prefix}_result"],
            )

        return cls(group("domestic"), group("foreign"))


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One transaction detail of a 0320 (60.3=201) batch upload. The PAN is masked in `repr`."""

    card_org: str  #: CARD_ORG_DOMESTIC or CARD_ORG_FOREIGN
    trace: str  #: the original's field 11, 6 digits
    pan: str
    amount: int

    def __repr__(self) -> str:
        return (
            f"BatchItem(card_org={self.card_org!r}, trace={self.trace!r}, "
            f"pan={mask_pan(self.pan)!r}, amount={self.amount})"
        )

    __str__ = __repr__


def pack_batch_items(items: Sequence[BatchItem]) -> str:
    """Field 48 of a 0320 with 60.3=201: n2 count + 40 digits per item, at most 8 items."""
    if not 1 <= len(items) <= MAX_BATCH_ITEMS:
        raise SubfieldError(
            f"{len(items)} items, a batch upload message carries 1..{MAX_BATCH_ITEMS}", field="48"
        )
    parts: dict[str, str] = {}
    for i, item in enumerate(items, 1):
        if len(item.pan) > 20:
            raise SubfieldError("PAN longer than 20 digits", field=f"48.item{i}.pan")
        parts[f"item{i}.card_org"] = item.card_org
        parts[f"item{i}.trace"] = item.trace
        parts[f"item{i}.pan"] = item.pan.rjust(20, "0")  # right-justified, zero-filled
        parts[f"item{i}.amount"] = _num(item.amount, 12, f"48.item{i}.amount")
    return pack(ITEMS_LAYOUT, parts)


def unpack_batch_items(value: str) -> list[BatchItem]:
    p = unpack(ITEMS_LAYOUT, value)
    return [
        BatchItem(
            p[f"item{i}.card_org"],
            p[f"item{i}.trace"],
            p[f"item{i}.pan"].lstrip("0"),
            int(p[f"item{i}.amount"]),
        )
        for i in range(1, int(p["count"]) + 1)
    ]


def pack_batch_end(count: int) -> str:
    """Field 48 of the closing 0320 (60.3=202/207): the number of items uploaded, n4."""
    return pack(END_LAYOUT, {"count": _num(count, 4, "48")})


def unpack_batch_end(value: str) -> int:
    return int(unpack(END_LAYOUT, value)["count"])
