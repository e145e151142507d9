"""Kill tests for gateway/store/group_commit.py's mutation survivors (issue 16), with the recording apply
function of test_store_group_commit.py instead of a database: a closed committer says why it refuses a
write; a write that arrives while a commit is in flight does not pay the commit delay (it goes with the
next batch as soon as the thread is free); and a lone write, awaited or `soon`, reaches the thread
without help (each bounded: a write that nobody hands over must fail the test, not hang it)."""

from __future__ import annotations

import time

import anyio
import pytest
from test_store_group_commit import FakeDb, append

from gateway.store import StoreClosed
from gateway.store.group_commit import MAX_COMMIT_DELAY, GroupCommitter

pytestmark = pytest.mark.anyio


def unexpected(exc: BaseException) -> None:
    raise AssertionError(f"the write failed: {exc!r}")


async def test_a_closed_committer_says_why_it_refuses_a_write() -> None:
    committer: GroupCommitter[list[object]] = GroupCommitter(FakeDb().apply)
    with pytest.raises(StoreClosed) as err:
        committer.submit_soon(append(1), on_error=unexpected)
    assert str(err.value) == "the store is not open for writes"
    with pytest.raises(StoreClosed) as err:
        await committer.submit(append(1))
    assert str(err.value) == "the store is not open for writes"


async def test_a_lone_write_is_handed_to_the_idle_thread_by_itself() -> None:
    db = FakeDb()
    committer: GroupCommitter[list[object]] = GroupCommitter(db.apply, soon_delay=0.01)
    async with anyio.create_task_group() as tg:
        await tg.start(committer.run)
        with anyio.fail_after(2):
            assert await committer.submit(append("alone")) == 1
        committer.submit_soon(append("soon"), on_error=unexpected)
        with anyio.fail_after(2):
            while len(db.rows) < 2:
                await anyio.sleep(0.005)
        committer.close()
    assert db.rows == ["alone", "soon"] and db.batches == [1, 1]


async def test_a_write_queued_behind_a_commit_does_not_pay_the_commit_delay() -> None:
    """The delay is for an idle thread only: a write that finds a commit in flight is handed over with
    the next batch the moment that commit is back, not `commit_delay` after it arrived."""
    db = FakeDb()
    committer: GroupCommitter[list[object]] = GroupCommitter(db.apply, commit_delay=MAX_COMMIT_DELAY)
    async with anyio.create_task_group() as tg:
        await tg.start(committer.run)
        db.gate.clear()  # the first commit stalls in the thread
        tg.start_soon(committer.submit, append("first"))
        with anyio.fail_after(5):
            while committer._in_flight is None:  # led, delayed, then handed over
                await anyio.sleep(0.005)
        took: list[float] = []

        async def behind() -> None:
            started = time.monotonic()
            await committer.submit(append("behind"))
            took.append(time.monotonic() - started)

        tg.start_soon(behind)
        await anyio.wait_all_tasks_blocked()
        db.gate.set()
        with anyio.fail_after(5):
            while not took:
                await anyio.sleep(0.001)
        committer.close()
    assert db.batches == [1, 1]
    # a stalled-then-released commit and a thread hand-off take milliseconds; the delay is 100 ms
    assert took[0] < MAX_COMMIT_DELAY * 0.8, took
