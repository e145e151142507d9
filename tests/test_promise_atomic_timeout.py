"""Issue 16, named escape 1: a host timeout's state change and its reversal are one step.

The promise (README, `Store.queue_reversal`): a timed-out charge never exists without its queued
reversal, whatever instant the gateway dies at. The tests crash the journal after its k-th completed
write, for every k the step has: that write is durable but its caller never hears so, and nothing
written after it reaches the journal (as when the process dies right after a commit). The journal is
then reopened (SQLite file, PostgreSQL schema; the memory store is read as it was left) and every row
must be either still `pending` (start-up recovery reverses it) or `reversal_queued` with its SAF entry:
never `timed_out` alone. Two places could split the step: the store's
`record_timeout_and_queue_reversal`, and the service's timeout branch; each has a test here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pg_support
import pytest
from test_e2e_reversal import FAST_SAF, HOST_TIMEOUT
from test_store_support import BACKENDS, backend, open_store, request

from gateway.config import StoreConfig
from gateway.lab import CARD_CUP, open_lab
from gateway.sim.host_rules import Fault
from gateway.store.errors import StoreIOError
from gateway.store.postgres import PostgresStore
from gateway.store.records import SafState, TxnState

pytestmark = pytest.mark.anyio

#: every write of the store interface (the `*_soon` ones are handled apart: nothing awaits them) and the
#: durable backends' commit entry point, which each of them goes through
WRITES = (
    "record_request", "record_outcome", "queue_reversal", "record_timeout_and_queue_reversal",
    "record_late_answer", "record_reversal_ident", "mark_reversal_attempt", "ack_reversal", "park_reversal",
    "retry_saf", "drop_saf", "_write",
)
INTERFACE_WRITES = WRITES[:-1]
#: more writes than a purchase takes up to its queued reversal (each counted twice: method and commit)
MAX_WRITES = 8


class Crash(StoreIOError):
    """The journal 'died': this write may be on disk, its caller never learns, nothing later lands."""


class CrashAfter:
    """Counts the completed writes of one store object (its methods are replaced on the instance, so a
    method calling another of its own, `self.record_outcome(...)`, goes through the count too); the
    `at`-th completion raises `Crash` instead of returning, and every write after it fails before it
    reaches the store."""

    def __init__(self, store: Any, at: int, names: tuple[str, ...] = WRITES) -> None:
        self.at = at
        self.completed = 0
        self.crashed = False
        for name in names:
            if hasattr(store, name):
                setattr(store, name, self._counted(getattr(store, name)))
        for name in ("record_outcome_soon", "record_refusal_soon"):
            setattr(store, name, self._soon(getattr(store, name)))

    def _counted(self, write: Callable[..., Any]) -> Callable[..., Any]:
        async def counted(*args: Any, **kwargs: Any) -> Any:
            if self.crashed:
                raise Crash("the journal is gone")
            result = await write(*args, **kwargs)
            self.completed += 1
            if self.completed >= self.at and not self.crashed:
                self.crashed = True
                raise Crash(f"crashed right after write {self.completed}")
            return result

        return counted

    def _soon(self, write: Callable[..., None]) -> Callable[..., None]:
        def soon(*args: Any, on_error: Callable[[BaseException], None], **kwargs: Any) -> None:
            if self.crashed:
                on_error(Crash("the journal is gone"))
                return
            write(*args, on_error=on_error, **kwargs)

        return soon


async def assert_no_timeout_without_reversal(store: Any, crash_at: int) -> None:
    """Every row pending (recovery's to reverse) or reversal_queued with a pending SAF entry."""
    rows = await store.list_transactions(limit=1000)
    assert rows, "the request itself is missing"
    for rec in rows:
        saf = await store.saf_for_txn(rec.txn_id)
        assert rec.state is not TxnState.TIMED_OUT or saf is not None, (
            f"crash after write {crash_at}: txn {rec.txn_id} is timed out with no reversal queued")
        assert rec.state in (TxnState.PENDING, TxnState.REVERSAL_QUEUED), (crash_at, rec.state)
        if rec.state is TxnState.REVERSAL_QUEUED:
            assert saf is not None and saf.state is SafState.PENDING, (crash_at, saf)


@pytest.fixture(params=BACKENDS)
def kind(request: pytest.FixtureRequest) -> str:
    return backend(request)


async def test_the_stores_timeout_and_reversal_survive_a_crash_after_any_write(kind: str, tmp_path: Path) -> None:
    outcomes = []
    for crash_at in range(1, MAX_WRITES + 1):
        directory = tmp_path / f"crash-after-{crash_at}"
        directory.mkdir()
        async with open_store(kind, directory) as store:
            txn_id = await store.record_request(request())
            crash = CrashAfter(store, crash_at)
            try:
                queued = await store.record_timeout_and_queue_reversal(txn_id, "98")
            except Crash:
                pass
            else:
                assert queued.created and queued.entry.txn_id == txn_id
            if kind == "memory":  # nothing to reopen: the object is the journal as the crash left it
                await assert_no_timeout_without_reversal(store, crash_at)
        if kind != "memory":
            async with open_store(kind, directory) as reopened:
                await assert_no_timeout_without_reversal(reopened, crash_at)
        outcomes.append(crash.crashed)
        if not crash.crashed:
            break
    assert outcomes[0] and not outcomes[-1], "the crash never hit the step, or every k did"


async def test_the_services_timeout_step_survives_a_crash_after_any_write(kind: str, tmp_path: Path) -> None:
    """The gateway's own timeout branch (a real host that answers too late, a real terminal): crash the
    journal after each write from the purchase's request on, up to the write that queues the reversal,
    and look at what the journal holds."""
    for crash_at in range(1, MAX_WRITES + 1):
        directory = tmp_path / f"crash-after-{crash_at}"
        directory.mkdir()
        overrides: dict[str, Any] = {}
        if kind == "postgres":
            url = await anyio.to_thread.run_sync(pg_support.schema_url, pg_support.database(), str(directory))
            overrides["store"] = StoreConfig(url=url, instance_id="crash-test", pan_hash_key_hex="11" * 32)
        async with open_lab(directory, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF,
                            durable=kind != "memory", **overrides) as lab:
            lab.host.add_fault(Fault("delay", seconds=HOST_TIMEOUT + 0.3, pan=CARD_CUP.pan, mti=("0200",), limit=1))
            t = lab.terminal(auto_reverse=False)
            await t.connect()
            await t.sign_in()
            store = lab.gateway.store
            # the interface's writes only: PostgreSQL's SAF poll claims leases through `_write` meanwhile
            CrashAfter(store, crash_at, INTERFACE_WRITES)
            # the answer comes after the service tried its step: 96 when the request's own write crashed
            result = await t.purchase(2_500, CARD_CUP)
            assert result.rc in ("96", "98"), result.rc
            if kind == "memory":  # the object is the journal as the crash left it
                states = await journal_states(store, crash_at)
        if kind == "sqlite":
            async with open_store("sqlite", directory) as reopened:
                states = await journal_states(reopened, crash_at)
        elif kind == "postgres":
            async with PostgresStore.open(overrides["store"].url, instance_id="crash-test") as reopened:
                states = await journal_states(reopened, crash_at)
        if TxnState.REVERSAL_QUEUED in states:
            break  # the crash came after the reversal was queued: every earlier instant is checked
    else:
        pytest.fail(f"no reversal queued within {MAX_WRITES} writes of the purchase")


async def journal_states(store: Any, crash_at: int) -> set[TxnState]:
    await assert_no_timeout_without_reversal(store, crash_at)
    return {rec.state for rec in await store.list_transactions(limit=1000)}
