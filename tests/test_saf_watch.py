"""The SAF watcher: the journal's parked count and oldest pending reversal reach the metrics, on both
store backends (real SQLite file and memory) and both anyio backends."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_store_support import BACKENDS, FakeClock, open_store, request

from gateway.metrics import Metrics
from gateway.net.saf_watch import watch_saf

pytestmark = pytest.mark.anyio


def value(metrics: Metrics, name: str) -> float:
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for s in family.samples:
            if s.name == name:
                return s.value
    raise AssertionError(f"{name} not exposed")


@pytest.mark.parametrize("kind", BACKENDS)
async def test_store_summary_counts_pending_and_parked_and_finds_the_oldest(kind: str, tmp_path: Path):
    clock = FakeClock(1_800_000_000.0)
    async with open_store(kind, tmp_path, clock=clock) as store:
        empty = await store.saf_summary()
        assert (empty.pending, empty.parked, empty.oldest_pending_queued_at) == (0, 0, None)
        ids = [await store.record_request(request(f"{n:06d}")) for n in range(1, 5)]
        for n, txn_id in enumerate(ids):
            clock.now = 1_800_000_000.0 + 10 * n  # queued 10 s apart
            await store.record_timeout_and_queue_reversal(txn_id)
        entries = await store.list_saf()
        await store.park_reversal(entries[0].saf_id, "gave up")  # the oldest is parked, not pending
        await store.ack_reversal(entries[3].saf_id, "00")
        summary = await store.saf_summary()
        assert (summary.pending, summary.parked) == (2, 1)
        assert summary.oldest_pending_queued_at == pytest.approx(1_800_000_010.0)


@pytest.mark.parametrize("kind", BACKENDS)
async def test_watcher_exports_parked_count_and_a_growing_age(kind: str, tmp_path: Path):
    metrics = Metrics(process_metrics=False)
    async with open_store(kind, tmp_path, observer=metrics.journal) as store, anyio.create_task_group() as tg:
        await tg.start(watch_saf, store, metrics, 0.05)
        assert value(metrics, "gateway_saf_oldest_pending_age_seconds") == 0
        ids = [await store.record_request(request(f"{n:06d}")) for n in (1, 2)]
        for txn_id in ids:
            await store.record_timeout_and_queue_reversal(txn_id)
        await store.park_reversal((await store.list_saf())[1].saf_id, "gave up")
        with anyio.fail_after(10):
            while value(metrics, "gateway_saf_parked") != 1:
                await anyio.sleep(0.02)
        first = value(metrics, "gateway_saf_oldest_pending_age_seconds")
        assert first >= 0
        await anyio.sleep(0.1)
        assert value(metrics, "gateway_saf_oldest_pending_age_seconds") > first
        assert value(metrics, "gateway_saf_depth") == 2  # the observer's own count agrees
        await store.ack_reversal((await store.list_saf())[0].saf_id, "00")
        with anyio.fail_after(10):
            while value(metrics, "gateway_saf_oldest_pending_age_seconds") != 0:
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()


class BrokenStore:
    def __init__(self) -> None:
        self.calls = 0

    async def saf_summary(self) -> None:
        self.calls += 1
        raise OSError("disk gone")


async def test_a_failing_read_is_logged_once_and_keeps_the_last_values(caplog: pytest.LogCaptureFixture):
    metrics = Metrics(process_metrics=False)
    metrics.saf.update(parked=4, oldest_pending_queued_at=None)
    store = BrokenStore()
    async with anyio.create_task_group() as tg:
        await tg.start(watch_saf, store, metrics, 0.01)
        with anyio.fail_after(10):
            while store.calls < 5:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert value(metrics, "gateway_saf_parked") == 4
    warnings = [r for r in caplog.records if "reversal queue" in r.getMessage()]
    assert len(warnings) == 1 and "disk gone" in warnings[0].getMessage()
