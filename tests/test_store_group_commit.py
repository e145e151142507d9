"""The group committer on its own, with a recording apply function instead of a database."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import anyio
import pytest
from test_store_support import Recorder

from gateway.store import StoreClosed, StoreError, StoreIOError
from gateway.store.group_commit import GroupCommitter, Write

pytestmark = pytest.mark.anyio


class FakeDb:
    """Applies ops to a list 'connection'; optional gate to hold a batch in the worker thread."""

    def __init__(self) -> None:
        self.rows: list[object] = []
        self.batches: list[int] = []
        self.threads: set[int] = set()
        self.gate = threading.Event()
        self.gate.set()
        self.fail_commit = False

    def apply(self, writes: Sequence[Write[list[object]]]) -> None:
        self.gate.wait(10)
        self.threads.add(threading.get_ident())
        staged = list(self.rows)
        for write in writes:
            try:
                write.result = write.op(staged, *write.args)
            except Exception as exc:
                write.error = exc
        if self.fail_commit:
            raise OSError("disk on fire")
        self.rows = staged
        self.batches.append(len(writes))


def append(value: object) -> Callable[[list[object]], int]:
    def op(rows: list[object]) -> int:
        rows.append(value)
        return len(rows)

    return op


def failing(rows: list[object]) -> None:
    raise StoreError("this one is wrong")


async def test_waiters_get_their_own_results_and_errors() -> None:
    db = FakeDb()
    observer = Recorder()
    committer: GroupCommitter[list[object]] = GroupCommitter(db.apply, observer=observer)
    results: dict[int, object] = {}

    async def writer(i: int) -> None:
        try:
            results[i] = await committer.submit(failing if i == 3 else append(i))
        except StoreError as exc:
            results[i] = exc

    async with anyio.create_task_group() as tg:
        await tg.start(committer.run)
        async with anyio.create_task_group() as writers:
            for i in range(10):
                writers.start_soon(writer, i)
        committer.close()
    assert isinstance(results.pop(3), StoreError)
    assert sorted(results.values()) == list(range(1, 10))  # type: ignore[type-var]
    assert sum(db.batches) == 10 and len(db.batches) == 1
    assert observer.commits[0][0] == 10
    assert db.threads and threading.get_ident() not in db.threads  # applied off the event loop


async def test_batches_form_while_a_commit_is_in_progress() -> None:
    db = FakeDb()
    committer: GroupCommitter[list[object]] = GroupCommitter(db.apply, max_batch=16)
    submitted: list[object] = []

    async def writer(value: object) -> None:
        submitted.append(value)  # submit queues the op before its first await: this is queue order
        await committer.submit(append(value))

    async with anyio.create_task_group() as tg:
        await tg.start(committer.run)
        db.gate.clear()  # the first commit stalls, as an fsync would
        async with anyio.create_task_group() as writers:
            writers.start_soon(writer, "first")
            await anyio.wait_all_tasks_blocked()
            for i in range(40):
                writers.start_soon(writer, i)
            await anyio.wait_all_tasks_blocked()
            db.gate.set()
        committer.close()
    assert db.batches == [1, 16, 16, 8]  # everything that queued meanwhile, in max_batch slices
    assert db.rows == submitted  # applied in submission order (trio starts tasks in any order)
    assert sorted(db.rows[1:]) == list(range(40))  # type: ignore[type-var]
    assert len(db.threads) == 1  # one long-lived commit thread, not a pool call per batch
    for thread in threading.enumerate():
        if thread.ident in db.threads:  # still listed: it must be on its way out
            thread.join(5)
            assert not thread.is_alive()  # the commit thread stops with the committer


async def test_a_failed_commit_fails_every_write_of_the_batch_only() -> None:
    db = FakeDb()
    committer: GroupCommitter[list[object]] = GroupCommitter(db.apply)
    async with anyio.create_task_group() as tg:
        await tg.start(committer.run)
        db.fail_commit = True
        with pytest.raises(StoreIOError):
            await committer.submit(append("lost"))
        db.fail_commit = False
        assert await committer.submit(append("kept")) == 1
        committer.close()
    assert db.rows == ["kept"]


async def test_a_broken_observer_does_not_stop_the_journal() -> None:
    class Broken(Recorder):
        def commit(self, batch_size: int, seconds: float) -> None:
            raise RuntimeError("metrics bug")

    db = FakeDb()
    committer: GroupCommitter[list[object]] = GroupCommitter(db.apply, observer=Broken())
    async with anyio.create_task_group() as tg:
        await tg.start(committer.run)
        assert await committer.submit(append(1)) == 1
        assert await committer.submit(append(2)) == 2
        committer.close()


async def test_closed_or_cancelled_committer_refuses_and_fails_queued_writes() -> None:
    db = FakeDb()
    committer: GroupCommitter[list[object]] = GroupCommitter(db.apply)
    with pytest.raises(StoreClosed):
        await committer.submit(append("too early"))
    outcome: list[object] = []

    async def writer() -> None:
        try:
            outcome.append(await committer.submit(append("queued")))
        except StoreClosed as exc:
            outcome.append(exc)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(committer.run)
            db.gate.clear()
            tg.start_soon(writer)  # in the stalled batch: still committed
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(writer)  # queued behind it: failed when the committer is cancelled
            await anyio.wait_all_tasks_blocked()
            tg.cancel_scope.cancel()
            # let `run` reach its cleanup (it stops feeding the thread) before the stalled batch comes
            # back: a batch that returns earlier may still, correctly, hand the queued one over
            with anyio.CancelScope(shield=True), anyio.fail_after(5):
                while committer._thread is not None:
                    await anyio.sleep(0.001)
            db.gate.set()
    assert outcome[0] == 1 and isinstance(outcome[1], StoreClosed)
    assert not committer.running
    with pytest.raises(StoreClosed):
        await committer.submit(append("too late"))


async def test_a_caller_cancelled_during_the_commit_gets_its_outcome_then_the_cancellation() -> None:
    db = FakeDb()
    committer: GroupCommitter[list[object]] = GroupCommitter(db.apply)
    scopes: dict[str, anyio.CancelScope] = {}
    seen: dict[str, list[object]] = {"ok": [], "bad": []}

    async def writer(name: str, op: Callable[[list[object]], object]) -> None:
        with anyio.CancelScope() as scope:
            scopes[name] = scope
            try:
                seen[name].append(await committer.submit(op))
            except StoreError as exc:
                seen[name].append(exc)
            await anyio.sleep(5)  # the first checkpoint after the write: the cancellation lands here
            seen[name].append("not cancelled")
        seen[name].append(scope.cancelled_caught)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(committer.run)
            db.gate.clear()  # the batch stalls in the commit thread, as in a slow fsync
            tg.start_soon(writer, "ok", append("row"))
            tg.start_soon(writer, "bad", failing)
            await anyio.wait_all_tasks_blocked()
            scopes["ok"].cancel()
            scopes["bad"].cancel()
            await anyio.wait_all_tasks_blocked()
            assert seen == {"ok": [], "bad": []}  # still waiting for the batch, not gone
            db.gate.set()
            committer.close()
    assert seen["ok"] == [1, True]  # its result, then the cancellation
    assert isinstance(seen["bad"][0], StoreError) and seen["bad"][1:] == [True]
    assert db.rows == ["row"] and db.batches == [2]


async def test_a_bare_asyncio_cancel_is_raised_once_the_write_is_settled(anyio_backend_name: str) -> None:
    if anyio_backend_name != "asyncio":
        pytest.skip("Task.cancel() outside any cancel scope is asyncio's alone")
    import asyncio

    db = FakeDb()
    committer: GroupCommitter[list[object]] = GroupCommitter(db.apply)
    async with anyio.create_task_group() as tg:
        await tg.start(committer.run)
        db.gate.clear()
        task = asyncio.ensure_future(committer.submit(append("row")))
        await anyio.wait_all_tasks_blocked()
        task.cancel()  # not a cancel scope's: it would not be delivered again, so it is not swallowed
        await anyio.wait_all_tasks_blocked()
        assert not task.done()  # the write is still in the pipeline
        db.gate.set()
        with anyio.fail_after(10):
            with pytest.raises(asyncio.CancelledError):
                await task
        committer.close()
    assert db.rows == ["row"]  # applied all the same


async def test_a_caller_cancelled_before_its_batch_reaches_the_thread_still_gets_its_write() -> None:
    db = FakeDb()
    committer: GroupCommitter[list[object]] = GroupCommitter(db.apply)
    seen: list[object] = []

    async def writer() -> None:
        with anyio.CancelScope() as scope:
            scope.cancel()  # cancelled before the call: the write is queued all the same, then completes
            seen.append(await committer.submit(append("row")))
        seen.append(scope.cancelled_caught)

    async with anyio.create_task_group() as tg:
        await tg.start(committer.run)
        tg.start_soon(writer)
        with anyio.move_on_after(10):
            while len(seen) < 2:
                await anyio.sleep(0.01)
        # (had the batch never reached the thread, leaving this block would cancel the committer,
        # which fails the queued write: the test fails rather than hangs)
        assert seen == [1, False]
        committer.close()
    assert db.rows == ["row"]


async def test_commit_delay_lets_writes_that_trickle_in_share_one_commit() -> None:
    """Writes arriving one by one, 5 ms apart, while the thread is idle: with a 100 ms commit delay the
    first waits and the others join its batch (without one, each would be handed over at once)."""

    async def trickle(committer: GroupCommitter[list[object]], db: FakeDb) -> list[int]:
        async with anyio.create_task_group() as tg:
            await tg.start(committer.run)
            with anyio.fail_after(10):
                async with anyio.create_task_group() as writers:
                    for i in range(4):
                        writers.start_soon(committer.submit, append(i))
                        await anyio.sleep(0.005)
            committer.close()
        return db.batches

    delayed = FakeDb()
    assert await trickle(GroupCommitter(delayed.apply, commit_delay=0.1), delayed) == [4]
    assert delayed.rows == [0, 1, 2, 3]  # every write applied, in submission order


def test_commit_delay_is_bounded() -> None:
    with pytest.raises(ValueError, match="commit_delay"):
        GroupCommitter(FakeDb().apply, commit_delay=0.5)


async def test_a_submit_soon_write_rides_along_with_the_next_awaited_write() -> None:
    db = FakeDb()
    failures: list[BaseException] = []
    committer: GroupCommitter[list[object]] = GroupCommitter(db.apply, soon_delay=5.0)
    async with anyio.create_task_group() as tg:
        await tg.start(committer.run)
        committer.submit_soon(append("completed"), on_error=failures.append)
        with anyio.fail_after(2):  # far less than the 5 s backstop: the awaited write led the batch
            assert await committer.submit(append("next request")) == 2
        committer.close()
    assert db.batches == [2] and db.rows == ["completed", "next request"] and not failures


async def test_a_lone_submit_soon_write_is_committed_by_the_backstop_or_a_flush() -> None:
    db = FakeDb()
    committer: GroupCommitter[list[object]] = GroupCommitter(db.apply, soon_delay=0.05)
    async with anyio.create_task_group() as tg:
        await tg.start(committer.run)
        committer.submit_soon(append("alone"), on_error=pytest.fail)
        with anyio.fail_after(2):
            while not db.batches:  # bounded by the fail_after: the backstop's 50 ms
                await anyio.sleep(0.01)
        committer.submit_soon(append("flushed"), on_error=pytest.fail)
        with anyio.fail_after(0.04):  # before the backstop would: flush hands it over at once
            await committer.flush()
        assert db.rows == ["alone", "flushed"]
        committer.submit_soon(append("at close"), on_error=pytest.fail)
        committer.close()  # commits what nobody leads
    assert db.rows == ["alone", "flushed", "at close"] and db.batches == [1, 1, 1]


async def test_a_submit_soon_failure_goes_to_its_error_handler() -> None:
    db = FakeDb()
    failures: list[BaseException] = []
    committer: GroupCommitter[list[object]] = GroupCommitter(db.apply)
    async with anyio.create_task_group() as tg:
        await tg.start(committer.run)
        committer.submit_soon(failing, on_error=failures.append)
        await committer.flush()
        committer.close()
    assert len(failures) == 1 and isinstance(failures[0], StoreError)
    with pytest.raises(StoreClosed):
        committer.submit_soon(append("after close"), on_error=failures.append)
