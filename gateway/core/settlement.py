"""Settlement reconciliation: the terminal's batch totals (0500 field 48) against our journal."""

from __future__ import annotations

from gateway.iso.totals import SettlementTotals


def reconcile(terminal_field48: str, journal: SettlementTotals) -> tuple[str, bool]:
    """(0510 field 48 with the 对账应答代码 set: 1 balanced, 2 not balanced, per card group; balanced?)."""
    claimed = SettlementTotals.from_field48(terminal_field48)
    result = claimed.reconciled(journal)
    return result.to_field48(), result.balanced
