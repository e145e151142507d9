"""Kill tests for gateway/store/memory.py's mutation survivors (issue 16), held by every backend (memory,
SQLite in a real file, PostgreSQL in a schema of the test's own): every bad argument of the SAF and
lookup calls is refused by name before anything changes, the ids of late answers and refusals are the
journal's own (unique, growing), and fixing a reversal's STAN stamps the entry's time."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_store_lookups import failed, refusal
from test_store_support import BACKENDS, FakeClock, backend, open_store, request

from gateway.store import InvalidRecord, SafState, TxnState

pytestmark = pytest.mark.anyio


@pytest.fixture(params=BACKENDS)
def kind(request: pytest.FixtureRequest) -> str:
    return backend(request)


async def test_bad_saf_and_lookup_arguments_are_refused_by_name(kind: str, tmp_path: Path) -> None:
    async with open_store(kind, tmp_path) as store:
        txn = await store.record_request(request("000001"))
        saf_id = (await store.record_timeout_and_queue_reversal(txn)).saf_id
        entry = await store.get_saf(saf_id)
        calls = (
            (store.ack_reversal("1", "00"), "saf_id"),
            (store.ack_reversal(saf_id, "000"), "rc"),  # a response code is two characters
            (store.mark_reversal_attempt("1", 1.0, 2.0, "timeout"), "saf_id"),
            (store.find_referencing("1"), "orig_txn_id"),
            (store.list_transactions(state="settled"), "state"),
            (store.queue_reversal(txn, "06", initiator="the moon"), "initiator"),
        )
        for call, field in calls:
            with pytest.raises(InvalidRecord) as err:
                await call
            assert err.value.field == field
        assert await store.get_saf(saf_id) == entry  # nothing changed: the entry is still pending, unsent
        assert entry is not None and entry.state is SafState.PENDING
        assert (await store.get(txn)).state is TxnState.REVERSAL_QUEUED  # type: ignore[union-attr]


async def test_a_store_without_the_key_says_it_cannot_fingerprint(kind: str, tmp_path: Path) -> None:
    async with open_store(kind, tmp_path, pan_key=None) as store:
        with pytest.raises(InvalidRecord) as err:
            store.fingerprint("6222021234567894321")
        assert (err.value.field, err.value.reason) == (
            "pan_key", "the store was opened without a PAN fingerprint key")


async def test_late_answers_and_refusals_get_unique_growing_ids(kind: str, tmp_path: Path) -> None:
    async with open_store(kind, tmp_path) as store:
        first = await store.record_late_answer(None, "00", host_stan="000001")
        second = await store.record_late_answer(None, "05", host_stan="000002")
        assert 0 < first.late_id < second.late_id
        assert [(a.late_id, a.rc) for a in await store.late_answers()] == [(second.late_id, "05"),
                                                                           (first.late_id, "00")]
        for stan in ("000001", "000002", "000003"):
            store.record_refusal_soon(refusal(stan=stan), on_error=failed)
        ids = [r.refusal_id for r in await store.refusals()]  # newest first
        assert ids == sorted(ids, reverse=True) and len(set(ids)) == 3 and min(ids) > 0


async def test_fixing_a_reversals_stan_stamps_the_entry(kind: str, tmp_path: Path) -> None:
    clock = FakeClock()
    async with open_store(kind, tmp_path, clock=clock) as store:
        txn = await store.record_request(request("000001"))
        saf_id = (await store.record_timeout_and_queue_reversal(txn)).saf_id
        clock.now += 5
        assert await store.record_reversal_ident(saf_id, "000123", "1123101505") == ("000123", "1123101505")
        entry = await store.get_saf(saf_id)
        assert entry is not None and (entry.reversal_stan, entry.updated_at) == ("000123", clock.now)
