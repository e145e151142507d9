"""Kill tests for gateway/store/group_commit.py's mutation survivors (issue 16), with the recording apply
function of test_store_group_commit.py instead of a database: what a closed committer says; when writes
are handed over and batched (commit delay, one batch in the thread at a time, max_batch, the backstop,
flush); the totals and the observer; close and cancellation (queued writes committed or failed, `run`
waiting for the batch in the thread); and that every fault (a failed commit, a broken observer, hook,
error handler or hand-back, a report that cannot reach the event loop) is logged and the journal goes on.

Every test runs its event loop in a thread of its own and joins it with a timeout (`within`): a mutant
that makes a write, close() or a shielded wait for a batch never end fails the test, not hang it (a
cancel scope's deadline cannot reach a shielded wait)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from types import SimpleNamespace
from typing import Any, cast

import anyio
import anyio.abc
import pytest
from test_store_group_commit import FakeDb, append
from test_store_support import Recorder

from gateway.store import StoreClosed, StoreIOError
from gateway.store.group_commit import MAX_COMMIT_DELAY, GroupCommitter, Write, _Batch, _CommitThread


def unexpected(exc: BaseException) -> None:
    raise AssertionError(f"the write failed: {exc!r}")


def within(anyio_backend: tuple[str, dict[str, object]], body: Callable[[], Awaitable[None]],
           seconds: float = 5.0) -> None:
    name, options = anyio_backend
    outcome: list[BaseException | None] = []

    def main() -> None:
        try:
            anyio.run(body, backend=name, backend_options=options)
        except BaseException as exc:  # handed to the test's own thread below
            outcome.append(exc)
        else:
            outcome.append(None)

    loop = threading.Thread(target=main, name="test-event-loop", daemon=True)
    loop.start()
    loop.join(seconds)
    assert not loop.is_alive(), f"the committer hung (no result within {seconds} s)"
    if outcome[0] is not None:
        raise outcome[0]


def test_a_closed_committer_says_why_it_refuses_a_write(anyio_backend: tuple[str, dict[str, object]]) -> None:
    committer: GroupCommitter[list[object]] = GroupCommitter(FakeDb().apply)
    with pytest.raises(StoreClosed) as err:
        committer.submit_soon(append(1), on_error=unexpected)
    assert str(err.value) == "the store is not open for writes"

    async def body() -> None:
        with pytest.raises(StoreClosed) as err:
            await committer.submit(append(1))
        assert str(err.value) == "the store is not open for writes"

    within(anyio_backend, body)


def test_a_lone_write_is_handed_to_the_idle_thread_by_itself(anyio_backend: tuple[str, dict[str, object]]) -> None:
    db = FakeDb()
    committer: GroupCommitter[list[object]] = GroupCommitter(db.apply, soon_delay=0.01)

    async def body() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(committer.run)
            with anyio.fail_after(2):
                assert await committer.submit(append("alone")) == 1
            committer.submit_soon(append("soon"), on_error=unexpected)
            with anyio.fail_after(2):
                while len(db.rows) < 2:
                    await anyio.sleep(0.005)
            committer.close()

    within(anyio_backend, body)
    assert db.rows == ["alone", "soon"] and db.batches == [1, 1]


def test_a_write_queued_behind_a_commit_does_not_pay_the_commit_delay(
        anyio_backend: tuple[str, dict[str, object]]) -> None:
    """The delay is for an idle thread only: a write that finds a commit in flight is handed over with
    the next batch the moment that commit is back, not `commit_delay` after it arrived."""
    db = FakeDb()
    committer: GroupCommitter[list[object]] = GroupCommitter(db.apply, commit_delay=MAX_COMMIT_DELAY)
    took: list[float] = []

    async def behind() -> None:
        started = time.monotonic()
        await committer.submit(append("behind"))
        took.append(time.monotonic() - started)

    async def body() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(committer.run)
            db.gate.clear()  # the first commit stalls in the thread
            tg.start_soon(committer.submit, append("first"))
            with anyio.fail_after(5):
                while committer._in_flight is None:  # led, delayed, then handed over
                    await anyio.sleep(0.005)
            tg.start_soon(behind)
            await anyio.wait_all_tasks_blocked()
            db.gate.set()
            with anyio.fail_after(5):
                while not took:
                    await anyio.sleep(0.001)
            committer.close()

    within(anyio_backend, body)
    assert db.batches == [1, 1]
    # a stalled-then-released commit and a thread hand-off take milliseconds; the delay is 100 ms
    assert took[0] < MAX_COMMIT_DELAY * 0.8, took


# --- bounded runs: every test below runs its event loop in a thread of its own and joins it with a
# timeout, so a write, a close() or a shielded wait that never ends fails the test instead of hanging
# it (a cancel scope's deadline cannot reach a shielded wait for a batch that never comes back)


def add(rows: list[object], value: object, times: int = 1) -> int:
    """An op with arguments: they must reach it as submitted."""
    rows.extend([value] * times)
    return len(rows)


class SlowDb(FakeDb):
    """Each batch takes at least `seconds` in the thread, as a commit's fsync would; and notes the
    thread it ran in."""

    def __init__(self, seconds: float = 0.0) -> None:
        super().__init__()
        self.seconds = seconds
        self.thread_seen: list[threading.Thread] = []

    def apply(self, writes: Sequence[Write[list[object]]]) -> None:
        self.thread_seen.append(threading.current_thread())
        time.sleep(self.seconds)
        super().apply(writes)


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_sequential_writes_commit_count_and_report_then_close_returns(
        anyio_backend: tuple[str, dict[str, object]], caplog: pytest.LogCaptureFixture) -> None:
    """Writes one after another, each awaited: each is its own commit with its own result (the op's
    arguments reach it), the totals and the observer count them, each commit's time is measured, and
    close() ends `run`, which stops the commit thread (a daemon, named for diagnostics)."""
    db = SlowDb(0.02)
    observer = Recorder()
    after: list[int] = []
    committer: GroupCommitter[list[object]] = GroupCommitter(
        db.apply, observer=observer, after_batch=lambda: after.append(len(db.rows)))
    assert committer.running is False

    async def body() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(committer.run)
            assert committer.running is True
            with anyio.fail_after(3):
                assert await committer.submit(add, "a") == 1
                assert await committer.submit(add, "b", 2) == 3
                assert await committer.submit(append("c")) == 4
            committer.close()
        assert committer.running is False

    within(anyio_backend, body)
    assert db.rows == ["a", "b", "b", "c"] and db.batches == [1, 1, 1]
    assert (committer.commits, committer.writes) == (3, 3)
    assert [size for size, _ in observer.commits] == [1, 1, 1]
    for _, seconds in observer.commits:
        assert 0.015 <= seconds < 3.0
    assert after == [1, 3, 4]  # once per batch, after it is applied
    (thread,) = set(db.thread_seen)
    assert thread.name == "journal-commit" and thread.daemon
    thread.join(3)
    assert not thread.is_alive()
    assert errors(caplog) == []


def test_a_burst_shares_one_commit_and_the_totals_count_its_writes(
        anyio_backend: tuple[str, dict[str, object]]) -> None:
    db = FakeDb()
    observer = Recorder()
    committer: GroupCommitter[list[object]] = GroupCommitter(db.apply, observer=observer)
    results: list[int] = []

    async def body() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(committer.run)
            with anyio.fail_after(3):
                async with anyio.create_task_group() as writers:
                    for i in range(5):
                        writers.start_soon(write_one, i)
            committer.close()

    async def write_one(i: int) -> None:
        results.append(await committer.submit(add, i))

    within(anyio_backend, body)
    assert db.batches == [5] and sorted(results) == [1, 2, 3, 4, 5]
    assert (committer.commits, committer.writes) == (1, 5)
    assert [size for size, _ in observer.commits] == [5]


def test_max_batch_is_validated_and_one_means_a_commit_per_write(
        anyio_backend: tuple[str, dict[str, object]]) -> None:
    with pytest.raises(ValueError) as err:
        GroupCommitter(FakeDb().apply, max_batch=0)
    assert str(err.value) == "max_batch must be at least 1"
    db = FakeDb()
    committer: GroupCommitter[list[object]] = GroupCommitter(db.apply, max_batch=1)

    async def body() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(committer.run)
            with anyio.fail_after(3):
                async with anyio.create_task_group() as writers:
                    for i in range(3):
                        writers.start_soon(committer.submit, add, i)
            committer.close()

    within(anyio_backend, body)
    assert db.batches == [1, 1, 1] and sorted(db.rows) == [0, 1, 2]  # type: ignore[type-var]


def test_writes_arriving_one_by_one_during_a_commit_wait_for_it_together(
        anyio_backend: tuple[str, dict[str, object]]) -> None:
    """While the thread holds a batch, later writes are not handed over behind it (one batch in the
    thread at a time): they all go in the next batch, however far apart they came."""
    db = FakeDb()
    committer: GroupCommitter[list[object]] = GroupCommitter(db.apply)

    async def body() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(committer.run)
            db.gate.clear()
            with anyio.fail_after(3):
                tg.start_soon(committer.submit, add, "first")
                while committer._in_flight is None:
                    await anyio.sleep(0.001)
                tg.start_soon(committer.submit, add, "second")
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(committer.submit, add, "third")
                await anyio.wait_all_tasks_blocked()
                db.gate.set()
                await committer.flush()
            committer.close()

    within(anyio_backend, body)
    assert db.batches == [1, 2] and db.rows == ["first", "second", "third"]


def test_close_during_a_commit_still_commits_what_is_queued(anyio_backend: tuple[str, dict[str, object]]) -> None:
    db = FakeDb()
    committer: GroupCommitter[list[object]] = GroupCommitter(db.apply)
    outcome: dict[str, object] = {}

    async def writer(value: str) -> None:
        try:
            outcome[value] = await committer.submit(add, value)
        except Exception as exc:
            outcome[value] = exc

    async def body() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(committer.run)
            db.gate.clear()
            with anyio.fail_after(3):
                tg.start_soon(writer, "in flight")
                while committer._in_flight is None:
                    await anyio.sleep(0.001)
                tg.start_soon(writer, "queued")
                await anyio.wait_all_tasks_blocked()
                committer.close()
                db.gate.set()

    within(anyio_backend, body)
    assert outcome == {"in flight": 1, "queued": 2} and db.batches == [1, 1]


def test_close_before_run_makes_run_return_at_once(anyio_backend: tuple[str, dict[str, object]]) -> None:
    db = FakeDb()
    committer: GroupCommitter[list[object]] = GroupCommitter(db.apply)
    committer.close()

    async def body() -> None:
        with anyio.fail_after(3):
            await committer.run()
        with pytest.raises(StoreClosed):
            await committer.submit(add, "late")

    within(anyio_backend, body)
    assert db.rows == [] and committer.running is False


def test_a_cancelled_run_waits_for_the_batch_in_the_thread_and_fails_the_queued_one(
        anyio_backend: tuple[str, dict[str, object]], caplog: pytest.LogCaptureFixture) -> None:
    db = FakeDb()
    committer: GroupCommitter[list[object]] = GroupCommitter(db.apply)
    outcome: dict[str, object] = {}
    rows_when_run_returned: list[object] = []

    async def writer(value: str) -> None:
        try:
            outcome[value] = await committer.submit(add, value)
        except Exception as exc:
            outcome[value] = exc

    async def body() -> None:
        run_scope = anyio.CancelScope()

        async def serve(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            with run_scope:
                await committer.run(task_status=task_status)
            rows_when_run_returned.extend(db.rows)

        async with anyio.create_task_group() as tg:
            await tg.start(serve)
            db.gate.clear()
            with anyio.fail_after(3):
                tg.start_soon(writer, "in flight")
                while committer._in_flight is None:
                    await anyio.sleep(0.001)
                tg.start_soon(writer, "queued")
                await anyio.wait_all_tasks_blocked()
                run_scope.cancel()
                threading.Timer(0.1, db.gate.set).start()  # the commit comes back after the cancel

    within(anyio_backend, body)
    assert rows_when_run_returned == ["in flight"]  # `run` returned only once its batch was back
    assert outcome["in flight"] == 1
    queued = outcome["queued"]
    assert isinstance(queued, StoreClosed)
    assert str(queued) == "the store closed before this write was committed"
    assert committer.running is False
    assert errors(caplog) == []  # the batch that came back during the cleanup was handed back cleanly


def test_a_failed_commit_names_its_cause_and_is_logged(
        anyio_backend: tuple[str, dict[str, object]], caplog: pytest.LogCaptureFixture) -> None:
    db = FakeDb()
    committer: GroupCommitter[list[object]] = GroupCommitter(db.apply)

    async def body() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(committer.run)
            db.fail_commit = True
            with anyio.fail_after(3):
                with pytest.raises(StoreIOError) as err:
                    await committer.submit(add, "lost")
                assert str(err.value) == "commit failed: OSError"
                db.fail_commit = False
                assert await committer.submit(add, "kept") == 1
            committer.close()

    within(anyio_backend, body)
    assert "group commit failed" in errors(caplog)


def test_broken_observer_and_after_batch_hook_are_logged_and_the_journal_goes_on(
        anyio_backend: tuple[str, dict[str, object]], caplog: pytest.LogCaptureFixture) -> None:
    class Broken(Recorder):
        def commit(self, batch_size: int, seconds: float) -> None:
            raise RuntimeError("metrics bug")

    def broken_hook() -> None:
        raise RuntimeError("hook bug")

    db = FakeDb()
    committer: GroupCommitter[list[object]] = GroupCommitter(db.apply, observer=Broken(), after_batch=broken_hook)

    async def body() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(committer.run)
            with anyio.fail_after(3):
                assert await committer.submit(add, 1) == 1
                assert await committer.submit(add, 2) == 2
            committer.close()

    within(anyio_backend, body)
    assert errors(caplog) == ["store observer failed", "store after-batch hook failed"] * 2


def test_a_soon_write_failure_reaches_its_handler_and_a_broken_handler_is_logged(
        anyio_backend: tuple[str, dict[str, object]], caplog: pytest.LogCaptureFixture) -> None:
    from test_store_group_commit import failing

    db = FakeDb()
    committer: GroupCommitter[list[object]] = GroupCommitter(db.apply, soon_delay=5.0)
    failures: list[BaseException] = []

    def broken_handler(exc: BaseException) -> None:
        raise RuntimeError("handler bug")

    async def body() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(committer.run)
            with anyio.fail_after(3):
                committer.submit_soon(failing, on_error=broken_handler)
                committer.submit_soon(failing, on_error=failures.append)
                committer.submit_soon(add, "fine", on_error=failures.append)
                await committer.flush()
                assert await committer.submit(add, "after") == 2  # the journal goes on
            committer.close()

    within(anyio_backend, body)
    assert [str(f) for f in failures] == ["this one is wrong"]
    assert errors(caplog) == ["a journal write's error handler failed"]
    assert db.rows == ["fine", "after"]


def test_a_failing_hand_back_is_logged_not_raised_into_the_event_loop(
        anyio_backend: tuple[str, dict[str, object]], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    db = FakeDb()
    committer: GroupCommitter[list[object]] = GroupCommitter(db.apply)

    def broken_notify(size: int, elapsed: float) -> None:
        raise RuntimeError("hand-back bug")

    monkeypatch.setattr(committer, "_notify", broken_notify)

    async def body() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(committer.run)
            with anyio.fail_after(3):
                assert await committer.submit(add, "row") == 1  # its waiter was woken before the fault
            committer.close()

    within(anyio_backend, body)
    assert errors(caplog) == ["group commit hand-back failed"]


def test_flush_returns_at_once_when_idle_and_hands_over_an_unled_batch(
        anyio_backend: tuple[str, dict[str, object]]) -> None:
    db = FakeDb()
    committer: GroupCommitter[list[object]] = GroupCommitter(db.apply, soon_delay=5.0)

    async def body() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(committer.run)
            with anyio.fail_after(1):  # far less than the 5 s backstop
                await committer.flush()  # nothing submitted: nothing to wait for
                committer.submit_soon(add, "soon", on_error=unexpected)
                await committer.flush()
                assert db.rows == ["soon"]
                await committer.flush()  # everything committed already
            committer.close()

    within(anyio_backend, body)
    assert db.batches == [1]


def test_the_backstop_commits_each_lone_soon_write(anyio_backend: tuple[str, dict[str, object]]) -> None:
    db = FakeDb()
    committer: GroupCommitter[list[object]] = GroupCommitter(db.apply, soon_delay=0.01)

    async def body() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(committer.run)
            with anyio.fail_after(3):
                for n, value in enumerate(["one", "two", "three"], 1):
                    committer.submit_soon(add, value, on_error=unexpected)
                    while len(db.rows) < n:  # nobody flushes: only the backstop can commit it
                        await anyio.sleep(0.002)
            committer.close()

    within(anyio_backend, body)
    assert db.rows == ["one", "two", "three"] and db.batches == [1, 1, 1]


class _Backend:
    """Stands in for the event loop the commit thread reports to: the first report fails to get there."""

    def __init__(self, first: BaseException) -> None:
        self.first: BaseException | None = first
        self.reports: list[tuple[Callable[..., object], tuple[object, ...]]] = []

    def run_sync_soon(self, func: Callable[..., object], args: tuple[object, ...], native: object) -> None:
        assert native == "loop"
        if self.first is not None:
            exc, self.first = self.first, None
            raise exc
        self.reports.append((func, args))


def _commit_thread(first: BaseException) -> tuple[_CommitThread[list[object]], _Backend, FakeDb]:
    backend = _Backend(first)
    token = cast(Any, SimpleNamespace(backend_class=backend, native_token="loop"))
    db = FakeDb()
    thread: _CommitThread[list[object]] = _CommitThread(db.apply, lambda batch, seconds: None, token)
    return thread, backend, db


def _batch(value: object) -> _Batch[list[object]]:
    batch: _Batch[list[object]] = _Batch()
    batch.writes.append(Write(add, (value,)))
    return batch


def test_the_commit_thread_logs_a_report_it_cannot_deliver_and_keeps_serving(
        caplog: pytest.LogCaptureFixture) -> None:
    thread, backend, db = _commit_thread(RuntimeError("loop hiccup"))
    # made in the test's own (non-daemon) thread, as a store opened in the main thread makes it: a
    # daemon all the same, so that a loop torn down without `run`'s cleanup cannot keep the process alive
    assert thread._thread.daemon and thread._thread.name == "journal-commit"
    first, second = _batch("a"), _batch("b")
    thread.start()
    thread.inbox.put(first)
    thread.inbox.put(second)
    thread.inbox.put(None)
    thread._thread.join(3)
    assert not thread._thread.is_alive()  # None stops it
    assert db.rows == ["a", "b"]
    ((_report, (batch, seconds)),) = backend.reports
    assert batch is second and isinstance(seconds, float) and 0 <= seconds < 3
    assert errors(caplog) == ["could not report a committed batch to the event loop"]


def test_the_commit_thread_stops_when_the_event_loop_is_gone() -> None:
    thread, backend, db = _commit_thread(anyio.RunFinishedError())
    thread.start()
    thread.inbox.put(_batch("a"))
    thread._thread.join(3)
    assert not thread._thread.is_alive() and db.rows == ["a"] and backend.reports == []
