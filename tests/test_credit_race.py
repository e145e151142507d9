"""Voids and refunds of one sale that race each other: the journal, not only the service's check before
sending, decides which may go out (two refunds of 500 against an 800 sale must not both reach the host,
whether they come on two connections of one gateway or to two gateways on one PostgreSQL journal).

The service checks the original before it sends (`decisions.original_problem`), but that read and the
write that journals the request are apart: two requests can both pass the read. Every store therefore
checks again inside the write (`records.credit_refusal`), where SQLite's one writer, the memory store's
single thread and PostgreSQL's row lock on the original leave no gap."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import anyio
import pg_support
import psycopg
import pytest
from test_store_support import BACKENDS, backend, open_store, request

from gateway.lab import CARD_CUP, open_lab
from gateway.store import TxnKind, TxnState
from gateway.store.errors import OriginalRefused, StoreError
from gateway.store.postgres import PostgresStore
from gateway.store.records import REQUEST_COLUMNS, TxnRecord, credit_refusal
from gateway.store.sqlite import SqliteStore

pytestmark = pytest.mark.anyio

SALE = 800


@pytest.fixture(params=BACKENDS)
def kind(request: pytest.FixtureRequest) -> str:
    return backend(request)


def refund(stan: str, sale: int, amount: int) -> Any:
    return request(stan, kind="refund", terminal_mti="0220", processing_code="200000", amount=amount,
                   orig_txn_id=sale, orig_rrn="RRN000000001", orig_date="1123")


def void(stan: str, sale: int, amount: int = SALE) -> Any:
    return request(stan, kind="void", processing_code="200000", amount=amount, orig_txn_id=sale,
                   orig_batch="000001", orig_stan="000001", orig_rrn="RRN000000001", orig_auth_code="A1B2C3")


async def completed_sale(store: Any) -> int:
    sale: int = await store.record_request(request("000001", amount=SALE))
    await store.record_outcome(sale, "completed", rc="00", rrn="RRN000000001", auth_code="A1B2C3")
    return sale


# --- the rule ----------------------------------------------------------------------------------------


def _txn(kind: TxnKind, state: TxnState, amount: int) -> TxnRecord:
    fields = {name: getattr(request("000001"), name) for name in REQUEST_COLUMNS}
    fields.update(kind=kind, amount=amount)
    return TxnRecord(**fields, txn_id=1, state=state, created_at=0.0, updated_at=0.0)


@pytest.mark.parametrize(
    ("kind_", "amount", "original", "earlier", "expected"),
    [
        ("refund", 300, None, [], "25"),
        ("refund", 300, (TxnKind.PURCHASE, TxnState.PENDING), [], "12"),
        ("refund", 300, (TxnKind.PURCHASE, TxnState.REVERSED), [], "12"),
        ("refund", 300, (TxnKind.REFUND, TxnState.COMPLETED), [], "12"),
        ("refund", SALE, (TxnKind.PURCHASE, TxnState.COMPLETED), [], None),
        ("refund", SALE + 1, (TxnKind.PURCHASE, TxnState.COMPLETED), [], "64"),
        # refunds in flight count as well as completed ones; declined, timed out or reversed ones do not
        ("refund", 500, (TxnKind.PURCHASE, TxnState.COMPLETED), [(TxnKind.REFUND, TxnState.PENDING, 500)], "64"),
        ("refund", 300, (TxnKind.PURCHASE, TxnState.COMPLETED), [(TxnKind.REFUND, TxnState.PENDING, 500)], None),
        ("refund", 500, (TxnKind.PURCHASE, TxnState.COMPLETED), [(TxnKind.REFUND, TxnState.COMPLETED, 500)], "64"),
        ("refund", 500, (TxnKind.PURCHASE, TxnState.COMPLETED), [(TxnKind.REFUND, TxnState.DECLINED, 500)], None),
        ("refund", 500, (TxnKind.PURCHASE, TxnState.COMPLETED), [(TxnKind.REFUND, TxnState.REVERSED, 500)], None),
        # a refund is not reversible: timed out, undeliverable or rejected after approval, the host may
        # have credited it — a second one could credit twice (an operator settles those)
        ("refund", SALE, (TxnKind.PURCHASE, TxnState.COMPLETED), [(TxnKind.REFUND, TxnState.TIMED_OUT, SALE)], "64"),
        ("refund", SALE, (TxnKind.PURCHASE, TxnState.COMPLETED),
         [(TxnKind.REFUND, TxnState.UNDELIVERABLE, SALE)], "64"),
        ("refund", SALE, (TxnKind.PURCHASE, TxnState.COMPLETED),
         [(TxnKind.REFUND, TxnState.HOST_REJECTED, SALE)], "64"),
        # a void whose reversal is still open (queued, parked, dropped by an operator): the host may hold it
        ("refund", 100, (TxnKind.PURCHASE, TxnState.COMPLETED), [(TxnKind.VOID, TxnState.REVERSAL_QUEUED, SALE)], "12"),
        ("refund", 100, (TxnKind.PURCHASE, TxnState.COMPLETED), [(TxnKind.VOID, TxnState.REVERSAL_FAILED, SALE)], "12"),
        ("refund", 100, (TxnKind.PURCHASE, TxnState.COMPLETED),
         [(TxnKind.VOID, TxnState.REVERSAL_DROPPED, SALE)], "12"),
        ("void", SALE, (TxnKind.PURCHASE, TxnState.COMPLETED), [(TxnKind.VOID, TxnState.REVERSED, SALE)], None),
        ("refund", 100, (TxnKind.PURCHASE, TxnState.COMPLETED), [(TxnKind.VOID, TxnState.PENDING, SALE)], "12"),
        ("refund", 100, (TxnKind.PURCHASE, TxnState.COMPLETED), [(TxnKind.VOID, TxnState.DECLINED, SALE)], None),
        ("void", SALE, (TxnKind.PURCHASE, TxnState.COMPLETED), [], None),
        ("void", SALE - 1, (TxnKind.PURCHASE, TxnState.COMPLETED), [], "64"),
        ("void", SALE, (TxnKind.PURCHASE, TxnState.COMPLETED), [(TxnKind.VOID, TxnState.COMPLETED, SALE)], "12"),
        ("void", SALE, (TxnKind.PURCHASE, TxnState.COMPLETED), [(TxnKind.VOID, TxnState.PENDING, SALE)], "12"),
        # a void credits the whole sale: with a refund standing (or in flight) it would credit more
        ("void", SALE, (TxnKind.PURCHASE, TxnState.COMPLETED), [(TxnKind.REFUND, TxnState.PENDING, 100)], "12"),
        ("void", SALE, (TxnKind.PURCHASE, TxnState.COMPLETED), [(TxnKind.REFUND, TxnState.COMPLETED, 100)], "12"),
        ("void", SALE, (TxnKind.PURCHASE, TxnState.COMPLETED), [(TxnKind.REFUND, TxnState.DECLINED, 100)], None),
    ],
)
def test_credit_refusal_rule(kind_: str, amount: int, original: tuple[TxnKind, TxnState] | None,
                             earlier: list[tuple[TxnKind, TxnState, int]], expected: str | None) -> None:
    orig = _txn(original[0], original[1], SALE) if original else None
    before = [_txn(k, s, a) for k, s, a in earlier]
    assert credit_refusal(kind_, amount, orig, before) == expected


# --- every store, inside its write --------------------------------------------------------------------


async def test_two_refunds_that_together_exceed_the_sale_cannot_both_be_journalled(
        kind: str, tmp_path: Path) -> None:
    """Submitted at once (on SQLite and PostgreSQL they land in one commit batch: the second write must
    see the first one of the same batch)."""
    async with open_store(kind, tmp_path) as store:
        sale = await completed_sale(store)
        results: dict[str, object] = {}

        async def journal(stan: str) -> None:
            try:
                results[stan] = await store.record_request(refund(stan, sale, 500))
            except OriginalRefused as exc:
                results[stan] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(journal, "000002")
            tg.start_soon(journal, "000003")
        refused = [r for r in results.values() if isinstance(r, OriginalRefused)]
        assert len(refused) == 1, results
        assert refused[0].rc == "64" and refused[0].orig_txn_id == sale
        refs = await store.find_referencing(sale)
        assert [(r.kind, r.amount, r.state) for r in refs] == [(TxnKind.REFUND, 500, TxnState.PENDING)]
        # the one journalled is still pending: a refund of the 300 left fits, one cent more does not
        await store.record_request(refund("000004", sale, 300))
        with pytest.raises(OriginalRefused) as err:
            await store.record_request(refund("000005", sale, 1))
        assert err.value.rc == "64"


async def test_a_void_is_refused_while_a_refund_stands_and_a_refund_while_a_void_does(
        kind: str, tmp_path: Path) -> None:
    async with open_store(kind, tmp_path) as store:
        sale = await completed_sale(store)
        first = await store.record_request(refund("000002", sale, 300))
        with pytest.raises(OriginalRefused) as err:
            await store.record_request(void("000003", sale))
        assert err.value.rc == "12"
        await store.record_outcome(first, "declined", rc="05")  # the refund did not happen after all
        voided = await store.record_request(void("000004", sale))
        with pytest.raises(OriginalRefused) as err:
            await store.record_request(refund("000005", sale, 100))
        assert err.value.rc == "12"
        with pytest.raises(OriginalRefused) as err:
            await store.record_request(void("000006", sale))
        assert err.value.rc == "12"
        refs = await store.find_referencing(sale)
        assert [(r.txn_id, r.kind) for r in refs] == [(first, TxnKind.REFUND), (voided, TxnKind.VOID)]
        # a refused write left nothing behind, not even its STAN: the terminal may use it again
        assert await store.find_original("T0000001", "000001", "000005") is None


async def test_a_refund_whose_outcome_is_unknown_still_counts_against_the_sale(kind: str, tmp_path: Path) -> None:
    """A refund cannot be reversed: timed out (the terminal printed 98) the host may still have credited
    it, so the cashier's retry of the full amount is refused until an operator settles the first."""
    async with open_store(kind, tmp_path) as store:
        sale = await completed_sale(store)
        first = await store.record_request(refund("000002", sale, SALE))
        await store.record_outcome(first, "timed_out")
        with pytest.raises(OriginalRefused) as err:
            await store.record_request(refund("000003", sale, SALE))
        assert err.value.rc == "64"
        refs = await store.find_referencing(sale)
        assert [(r.txn_id, r.state) for r in refs] == [(first, TxnState.TIMED_OUT)]


@pytest.mark.parametrize("credit", ["void", "refund"])
async def test_a_terminal_reversal_of_a_sale_is_refused_in_the_write_while_a_credit_of_it_stands(
        kind: str, tmp_path: Path, credit: str) -> None:
    """A void (or refund) of the sale journalled on another connection after the service's own check of
    the 0400 (`find_referencing`): the store's write that would queue the sale's reversal refuses it 12
    and changes nothing, or the card is credited by the void and again by the reversal. Once the credit
    is known not to have happened (declined), the terminal's reversal goes through."""
    async with open_store(kind, tmp_path) as store:
        sale = await completed_sale(store)
        back = await store.record_request(void("000002", sale) if credit == "void" else refund("000002", sale, 300))
        with pytest.raises(OriginalRefused) as err:
            await store.queue_reversal(sale, "06", initiator="terminal")
        assert err.value.rc == "12" and err.value.orig_txn_id == sale
        after = await store.get(sale)
        assert after is not None and after.state is TxnState.COMPLETED
        assert await store.list_saf() == []
        await store.record_outcome(back, "declined", rc="05")
        queued = await store.queue_reversal(sale, "06", initiator="terminal")
        assert queued.created and queued.entry.txn_id == sale


async def test_sqlite_refused_write_does_not_fail_the_rest_of_its_batch(tmp_path: Path) -> None:
    """The check raises before the insert (no savepoint for this write): a purchase in the same commit
    batch is journalled."""
    async with SqliteStore.open(tmp_path / "journal.db", pan_key=b"k" * 32) as store:
        sale = await completed_sale(store)
        await store.record_request(refund("000002", sale, SALE))
        ids: list[int] = []

        async def other_purchase() -> None:
            ids.append(await store.record_request(request("000009", amount=1)))

        async def refused_refund() -> None:
            with pytest.raises(OriginalRefused):
                await store.record_request(refund("000003", sale, 1))

        async with anyio.create_task_group() as tg:
            tg.start_soon(refused_refund)
            tg.start_soon(other_purchase)
        rec = await store.get(ids[0])
        assert rec is not None and rec.state is TxnState.PENDING and rec.amount == 1


# --- two gateways on one PostgreSQL journal ------------------------------------------------------------


async def _waiting_for_locks(url: str, count: int) -> None:
    """Until `count` sessions of this database wait for a row lock (bounded)."""
    with anyio.fail_after(10):
        while True:
            with psycopg.connect(pg_support.database(), autocommit=True) as conn:
                row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                   "AND datname = current_database()").fetchone()
            if row is not None and row[0] >= count:
                return
            await anyio.sleep(0.02)


#: a server whose default isolation is REPEATABLE READ (a DBA's choice): the journal's writes must still
#: read, after their row lock, what the other instance committed meanwhile
REPEATABLE_READ = "-cdefault_transaction_isolation=repeatable\\ read"


@pytest.mark.parametrize("server_options", ["", REPEATABLE_READ], ids=["server-default", "repeatable-read"])
async def test_two_instances_refunding_one_sale_at_the_same_moment_journal_one(
        tmp_path: Path, server_options: str) -> None:
    """Both instances' writes reach the database while a third session holds the sale's row: both pass
    any read made before the lock. Released, exactly one refund is journalled; the other instance gets
    64. (Without the row lock both reads see no refund and both inserts succeed; under REPEATABLE READ
    the read after the lock would still see the snapshot from before it.)"""
    url = await anyio.to_thread.run_sync(pg_support.schema_url, pg_support.database(), str(tmp_path))
    if server_options:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        query["options"] = (query.get("options", "") + " " + server_options).strip()
        url = urlunsplit(parts._replace(query=urlencode(query, quote_via=quote)))
        with psycopg.connect(url, autocommit=True) as plain:  # the setting the test means to survive
            row = plain.execute("SHOW default_transaction_isolation").fetchone()
            assert row is not None and row[0] == "repeatable read"
    async with (PostgresStore.open(url, pan_key=b"k" * 32, instance_id="a") as a,
                PostgresStore.open(url, pan_key=b"k" * 32, instance_id="b") as b):
        sale = await completed_sale(a)
        blocker = await anyio.to_thread.run_sync(lambda: psycopg.connect(url))
        try:
            await anyio.to_thread.run_sync(
                lambda: blocker.execute("SELECT txn_id FROM txn WHERE txn_id = %s FOR UPDATE", (sale,)))
            results: dict[str, object] = {}

            async def journal(store: PostgresStore, stan: str) -> None:
                try:
                    results[stan] = await store.record_request(refund(stan, sale, 500))
                except OriginalRefused as exc:
                    results[stan] = exc

            async with anyio.create_task_group() as tg:
                tg.start_soon(journal, a, "000002")
                tg.start_soon(journal, b, "000003")
                await _waiting_for_locks(url, 2)
                await anyio.to_thread.run_sync(blocker.commit)
        finally:
            await anyio.to_thread.run_sync(blocker.close)
        refused = [r for r in results.values() if isinstance(r, OriginalRefused)]
        assert len(refused) == 1 and refused[0].rc == "64", results
        refs = await b.find_referencing(sale)
        assert [(r.kind, r.amount) for r in refs] == [(TxnKind.REFUND, 500)]


async def test_a_void_and_a_terminal_reversal_of_one_sale_on_two_instances_leave_one_credit(tmp_path: Path) -> None:
    """Instance a queues the terminal's 0400 of the sale while instance b journals a void of it; a third
    session holds the sale's row until both writes wait on it. Released, exactly one goes through: a
    void (then the reversal is refused 12) or the reversal (then the void is refused 12: the sale is no
    longer a completed purchase). Both would credit the card twice."""
    url = await anyio.to_thread.run_sync(pg_support.schema_url, pg_support.database(), str(tmp_path))
    async with (PostgresStore.open(url, pan_key=b"k" * 32, instance_id="a") as a,
                PostgresStore.open(url, pan_key=b"k" * 32, instance_id="b") as b):
        sale = await completed_sale(a)
        blocker = await anyio.to_thread.run_sync(lambda: psycopg.connect(url))
        results: dict[str, object] = {}

        async def reverse() -> None:
            try:
                results["reversal"] = await a.queue_reversal(sale, "06", initiator="terminal")
            except OriginalRefused as exc:
                results["reversal"] = exc

        async def void_it() -> None:
            try:
                results["void"] = await b.record_request(void("000002", sale))
            except OriginalRefused as exc:
                results["void"] = exc

        try:
            await anyio.to_thread.run_sync(
                lambda: blocker.execute("SELECT txn_id FROM txn WHERE txn_id = %s FOR UPDATE", (sale,)))
            async with anyio.create_task_group() as tg:
                tg.start_soon(reverse)
                tg.start_soon(void_it)
                await _waiting_for_locks(url, 2)
                await anyio.to_thread.run_sync(blocker.commit)
        finally:
            await anyio.to_thread.run_sync(blocker.close)
        refused = {name: r.rc for name, r in results.items() if isinstance(r, OriginalRefused)}
        assert len(refused) == 1 and set(refused.values()) == {"12"}, results
        voids = await b.find_referencing(sale)
        reversals = await b.list_saf()
        assert len(voids) + len(reversals) == 1, (voids, reversals)


# --- the service: the terminal gets the journal's answer ------------------------------------------------


@pytest.mark.secret_scan
async def test_racing_refunds_through_the_gateway_get_one_approval_and_one_64(tmp_path: Path) -> None:
    """Two refunds of 60 % of a sale from two connections, held until both passed the service's own check
    (as when they arrive together): the host sees one, the terminal gets 64 for the other, and the
    refusal is on record."""
    async with open_lab(tmp_path, terminals=1) as lab:
        t = lab.terminal()
        await t.connect()
        assert (await t.sign_in()).rc == "00"
        sale = await t.purchase(10_000, CARD_CUP)
        assert sale.approved
        store = lab.gateway.store
        both_checked = anyio.Event()
        arrived = 0
        real_find = store.find_referencing

        async def find_referencing_together(txn_id: int) -> Any:
            nonlocal arrived
            found = await real_find(txn_id)
            arrived += 1
            if arrived == 2:
                both_checked.set()
            with anyio.fail_after(5):
                await both_checked.wait()
            return found

        store.find_referencing = find_referencing_together
        balance = lab.host.balance(CARD_CUP.pan)
        answers: list[Any] = []

        async def refund_6000() -> None:
            answers.append(await t.refund(6_000, CARD_CUP, original=sale))

        async with anyio.create_task_group() as tg:
            tg.start_soon(refund_6000)
            tg.start_soon(refund_6000)
        assert sorted(a.rc for a in answers) == ["00", "64"]
        assert lab.host.balance(CARD_CUP.pan) == balance + 6_000  # the host credited one refund only
        refs = await real_find((await store.find_by_rrn(sale.rrn, terminal_id=t.ident.terminal_id)).txn_id)
        assert [(r.kind, r.amount, r.state) for r in refs] == [(TxnKind.REFUND, 6_000, TxnState.COMPLETED)]
        with anyio.fail_after(5):
            while not (refusals := await store.refusals(terminal_id=t.ident.terminal_id)):
                await anyio.sleep(0.02)
        assert [r.rc for r in refusals] == ["64"] and "original check at the journal" in refusals[0].reason


async def test_a_sale_row_held_by_another_session_fails_only_the_write_that_needs_it(tmp_path: Path) -> None:
    """Another session (a dead instance's open transaction, an operator's FOR UPDATE) holds the sale's
    row: the refund that must lock it fails after the writer's lock_timeout instead of stopping the
    journal; a purchase in the same batch is journalled; released, the refund goes through. Without the
    bound both writes wait as long as the row is held (here: until the test lets go after 8 s)."""
    url = await anyio.to_thread.run_sync(pg_support.schema_url, pg_support.database(), str(tmp_path))
    async with PostgresStore.open(url, pan_key=b"k" * 32, instance_id="a", lock_timeout=0.5,
                                  commit_delay=0.05) as store:
        writer = store.writer_connection
        assert writer is not None
        row = await anyio.to_thread.run_sync(lambda: writer.execute("SHOW lock_timeout").fetchone())
        assert row is not None and row[0] == "500ms"  # read back from the live session
        sale = await completed_sale(store)
        blocker = await anyio.to_thread.run_sync(lambda: psycopg.connect(url))
        results: dict[str, object] = {}
        try:
            await anyio.to_thread.run_sync(
                lambda: blocker.execute("SELECT txn_id FROM txn WHERE txn_id = %s FOR UPDATE", (sale,)))

            async def journal(name: str, rec: Any) -> None:
                try:
                    results[name] = await store.record_request(rec)
                except StoreError as exc:
                    results[name] = exc

            async def release_later() -> None:  # without the bound the writes wait for this (a write
                await anyio.sleep(8)  # in flight is not given up on by a cancelled caller)
                await anyio.to_thread.run_sync(blocker.rollback)

            started = anyio.current_time()
            async with anyio.create_task_group() as outer:
                outer.start_soon(release_later)
                async with anyio.create_task_group() as tg:  # one batch: commit_delay gathers both
                    tg.start_soon(journal, "refund", refund("000002", sale, 500))
                    tg.start_soon(journal, "purchase", request("000003", amount=100))
                waited = anyio.current_time() - started
                outer.cancel_scope.cancel()
        finally:
            await anyio.to_thread.run_sync(blocker.close)
        assert isinstance(results["purchase"], int), results
        assert isinstance(results["refund"], StoreError) and not isinstance(results["refund"], OriginalRefused)
        assert "LockNotAvailable" in str(results["refund"]), results
        assert waited < 5, waited  # the pipelined try and the one-by-one retry: about 2 × 0.5 s
        assert await store.find_referencing(sale) == []  # nothing of the failed refund was journalled
        again = await store.record_request(refund("000004", sale, 500))  # the row is free again
        assert [r.txn_id for r in await store.find_referencing(sale)] == [again]
