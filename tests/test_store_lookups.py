"""Refusals on record and operator lookups, on both backends (SQLite in a real file, and memory)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from test_store_support import BACKENDS, OTHER_PAN, PAN_KEY, TEST_PAN, FakeClock, backend, open_store, request

from gateway.iso.message import mask_pan
from gateway.store import InvalidRecord, RefusalRecord, TxnKind, TxnQuery, TxnState, pan_fingerprint

pytestmark = pytest.mark.anyio


@pytest.fixture(params=BACKENDS)
def kind(request: pytest.FixtureRequest) -> str:
    return backend(request)


def refusal(rc: str = "A0", *, terminal_id: str = "T0000001", pan: str | None = TEST_PAN, **overrides: object
            ) -> RefusalRecord:
    fields: dict[str, object] = {
        "terminal_id": terminal_id, "mti": "0200", "rc": rc, "reason": "bad MAC", "merchant_id": "M00000000000001",
        "batch": "000001", "stan": "000042", "kind": "refund", "amount": 1500,
        "pan_masked": mask_pan(pan) if pan else "", "pan_fingerprint": pan_fingerprint(PAN_KEY, pan) if pan else "",
    }
    fields.update(overrides)
    return RefusalRecord(**fields)  # type: ignore[arg-type]


def failed(exc: BaseException) -> None:
    raise AssertionError(f"refusal not journalled: {exc!r}")


async def test_refusals_are_journalled_and_found_by_terminal_card_code_and_time(kind: str, tmp_path: Path) -> None:
    clock = FakeClock()
    async with open_store(kind, tmp_path, clock=clock) as store:
        store.record_refusal_soon(refusal("A0"), on_error=failed)
        clock.now += 10
        store.record_refusal_soon(refusal("61", reason="daily limit"), on_error=failed)
        clock.now += 10
        store.record_refusal_soon(refusal("97", terminal_id="X9999999", pan=OTHER_PAN), on_error=failed)
        everything = await store.refusals()
        assert [r.rc for r in everything] == ["97", "61", "A0"]  # newest first
        newest = everything[0]
        assert (newest.terminal_id, newest.kind, newest.amount, newest.refused_at) == (
            "X9999999", "refund", 1500, clock.now)
        assert newest.pan_masked == mask_pan(OTHER_PAN)
        assert [r.rc for r in await store.refusals(terminal_id="T0000001")] == ["61", "A0"]
        mine = pan_fingerprint(PAN_KEY, TEST_PAN)
        assert [r.reason for r in await store.refusals(pan_fingerprint=mine)] == ["daily limit", "bad MAC"]
        assert [r.rc for r in await store.refusals(rc="61")] == ["61"]
        start = clock.now - 20
        assert [r.rc for r in await store.refusals(since=start + 10, until=start + 20)] == ["61"]
        assert [r.rc for r in await store.refusals(limit=1)] == ["97"]


async def test_refusals_are_bounded_the_oldest_go_first(kind: str, tmp_path: Path) -> None:
    async with open_store(kind, tmp_path, max_refusals=5) as store:
        for i in range(12):
            store.record_refusal_soon(refusal(stan=f"{i:06d}"), on_error=failed)
        kept = await store.refusals(limit=100)
        assert [r.stan for r in kept] == [f"{i:06d}" for i in range(11, 6, -1)]
    if kind == "sqlite":  # the rows are really gone from the file, not only hidden
        with sqlite3.connect(tmp_path / "journal.db") as conn:
            assert conn.execute("SELECT count(*) FROM refusal").fetchone()[0] == 5


async def test_a_refusal_of_garbage_is_kept_printable_and_never_holds_a_clear_pan(kind: str, tmp_path: Path) -> None:
    async with open_store(kind, tmp_path) as store:
        garbage = RefusalRecord(terminal_id="\x00\x01ab\ncd" * 5, mti="0\x0200", rc="30",
                                reason=f"field 2 {TEST_PAN} is not numeric", stan="12\x003456789")
        store.record_refusal_soon(garbage, on_error=failed)
        (rec,) = await store.refusals()
        assert rec.terminal_id.isprintable() and len(rec.terminal_id) <= 16
        assert rec.mti == "0?00" and rec.stan == "12?345"
        assert TEST_PAN not in rec.reason and mask_pan(TEST_PAN) in rec.reason
    if kind == "sqlite":
        assert TEST_PAN.encode() not in (tmp_path / "journal.db").read_bytes()


def test_a_refusal_record_checks_what_the_gateway_itself_fills_in() -> None:
    with pytest.raises(InvalidRecord) as err:
        refusal(pan_masked=TEST_PAN)
    assert err.value.field == "pan_masked"
    with pytest.raises(InvalidRecord) as err:
        refusal(rc="000")
    assert err.value.field == "rc"
    with pytest.raises(InvalidRecord) as err:
        refusal(reason=" ")
    assert err.value.field == "reason"


async def test_search_finds_transactions_by_every_operator_key(kind: str, tmp_path: Path) -> None:
    clock = FakeClock()
    async with open_store(kind, tmp_path, clock=clock) as store:
        first = await store.record_request(request("000001", amount=1000))
        await store.record_outcome(first, "completed", rc="00", rrn="123456789012", auth_code="A1B2C3")
        clock.now += 3600
        second = await store.record_request(request("000002", amount=2500, pan=OTHER_PAN,
                                                    pan_masked=mask_pan(OTHER_PAN),
                                                    pan_fingerprint=pan_fingerprint(PAN_KEY, OTHER_PAN)))
        await store.record_outcome(second, "declined", rc="51")
        clock.now += 3600
        third = await store.record_request(request("000003", amount=1000, kind="refund", processing_code="200000"))

        async def ids(**filters: object) -> list[int]:
            return [r.txn_id for r in await store.search(TxnQuery(**filters))]  # type: ignore[arg-type]

        assert await ids() == [third, second, first]
        assert await ids(rrn="123456789012") == [first]
        assert await ids(auth_code="A1B2C3") == [first]
        assert await ids(terminal_stan="000002") == [second]
        assert await ids(host_stan="000003") == [third]
        assert await ids(amount=1000) == [third, first]
        assert await ids(kind=TxnKind.REFUND) == [third]
        assert await ids(state=TxnState.DECLINED) == [second]
        assert await ids(pan_fingerprint=pan_fingerprint(PAN_KEY, TEST_PAN)) == [third, first]
        start = clock.now - 7200
        assert await ids(since=start, until=start + 3600) == [first]
        assert await ids(since=start + 3600) == [third, second]
        assert await ids(amount=1000, since=start + 1) == [third]
        assert await ids(terminal_id="T0000009") == []
        assert [r.txn_id for r in await store.search(TxnQuery(), limit=2)] == [third, second]


async def test_saf_for_txn_gives_the_reversal_history(kind: str, tmp_path: Path) -> None:
    async with open_store(kind, tmp_path) as store:
        txn = await store.record_request(request("000001"))
        other = await store.record_request(request("000002"))
        assert await store.saf_for_txn(txn) is None
        queued = await store.record_timeout_and_queue_reversal(txn)
        await store.mark_reversal_attempt(queued.saf_id, 1.0, 2.0, "timeout: no answer")
        entry = await store.saf_for_txn(txn)
        assert entry is not None and entry.saf_id == queued.saf_id
        assert (entry.attempts, entry.last_error) == (1, "timeout: no answer")
        assert await store.saf_for_txn(other) is None
