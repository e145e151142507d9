"""Sessions and risk limits: the pure state the flows consult."""

from __future__ import annotations

from gateway.config import LimitsConfig
from gateway.core.limits import RiskLimits
from gateway.core.sessions import SessionTable, next_batch


def test_sign_in_sign_off_and_batch_close() -> None:
    table = SessionTable()
    assert table.get("T1") is None
    table.sign_in("T1", "M1", "000041", "004")
    assert table.get("T1").batch == "000041"
    assert table.close_batch("T1") == "000042"
    table.sign_off("T1")
    assert table.get("T1") is None
    assert table.close_batch("T1") is None


def test_batch_wraps_to_one() -> None:
    assert next_batch("999999") == "000001"
    assert next_batch("000009") == "000010"


def test_per_transaction_and_daily_limits() -> None:
    limits = RiskLimits(LimitsConfig(per_transaction=1000, per_day=2500))
    assert limits.reserve("T1", 1001, "20261123") == "61"
    assert limits.reserve("T1", 1000, "20261123") is None
    assert limits.reserve("T1", 1000, "20261123") is None
    assert limits.reserve("T1", 600, "20261123") == "61"  # 2600 > 2500
    assert limits.reserve("T2", 600, "20261123") is None  # per terminal
    limits.release("T1", 1000, "20261123")  # a decline gives the room back
    assert limits.reserve("T1", 600, "20261123") is None
    assert limits.used("T1") == 1600


def test_day_rollover_resets_and_ignores_stale_release() -> None:
    limits = RiskLimits(LimitsConfig(per_transaction=1000, per_day=1000))
    assert limits.reserve("T1", 1000, "20261123") is None
    assert limits.reserve("T1", 1, "20261123") == "61"
    assert limits.reserve("T1", 1000, "20261124") is None
    limits.release("T1", 1000, "20261123")  # yesterday's: must not free today's room
    assert limits.reserve("T1", 1, "20261124") == "61"


def test_seed_from_journal_counts_against_the_cap() -> None:
    limits = RiskLimits(LimitsConfig(per_transaction=1000, per_day=1500))
    limits.seed("20261123", {"T1": 1200})
    assert limits.reserve("T1", 400, "20261123") == "61"
    assert limits.reserve("T1", 300, "20261123") is None
