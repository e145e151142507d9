"""Crash safety: a child process journals as fast as it can and prints each id once `record_request`
(or `record_outcome`) has returned; the test SIGKILLs it mid-stream, reopens the file and checks that
every write the child saw return is there. The child is this file run as a script."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

REPO = Path(__file__).resolve().parents[1]
WRITERS = 16
KILL_AFTER_LINES = 400


async def _child(path: Path) -> None:
    from test_store_support import request

    from gateway.store import SqliteStore

    async with SqliteStore.open(path) as store:

        async def writer(w: int) -> None:
            for i in range(1_000_000):
                txn_id = await store.record_request(request(f"{i:06d}", terminal_id=f"T{w:07d}"))
                print(f"R {txn_id} {w} {i}", flush=True)
                if i % 2 == 0:
                    await store.record_outcome(txn_id, "completed", rc="00")
                    print(f"O {txn_id}", flush=True)

        async with anyio.create_task_group() as tg:
            for w in range(WRITERS):
                tg.start_soon(writer, w)


def _read_until(proc: subprocess.Popen[bytes], lines: int, timeout: float) -> bytes:
    """Everything the child printed until `lines` lines were seen (or the timeout)."""
    assert proc.stdout is not None
    data = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while data.count(b"\n") < lines and time.monotonic() < deadline:
            if sel.select(timeout=0.5):
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                data += chunk
    return data


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_every_returned_write_survives_sigkill(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "crash.db"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    proc = subprocess.Popen(
        [sys.executable, __file__, str(path), backend],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        seen = _read_until(proc, KILL_AFTER_LINES, timeout=30)
        os.kill(proc.pid, signal.SIGKILL)  # mid-stream: writers are queued and commits are in flight
        rest, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == -signal.SIGKILL, err.decode(errors="replace")[-2000:]
    output = (seen + rest).decode()
    complete = output[: output.rfind("\n") + 1].splitlines()  # a torn last line proves nothing
    requests = {int(p[1]): (int(p[2]), int(p[3])) for p in (line.split() for line in complete) if p[0] == "R"}
    outcomes = {int(line.split()[1]) for line in complete if line.startswith("O ")}
    assert len(requests) >= KILL_AFTER_LINES // 2, f"the child wrote too little: {output[-500:]!r}"

    async def check() -> None:
        from gateway.store import SqliteStore, TxnState

        async with SqliteStore.open(path) as store:
            for txn_id, (w, i) in requests.items():
                rec = await store.get(txn_id)
                assert rec is not None, f"txn {txn_id} returned to the child but is missing"
                assert (rec.terminal_id, rec.terminal_stan) == (f"T{w:07d}", f"{i:06d}")
            for txn_id in outcomes:
                assert (await store.get(txn_id)).state == TxnState.COMPLETED  # type: ignore[union-attr]
            # whatever was in flight is pending (reversed at restart), never half-written
            journal = await store.list_transactions(limit=1_000_000)
            assert {r.state for r in journal} <= {TxnState.PENDING, TxnState.COMPLETED}
            assert len(journal) >= len(requests)

    anyio.run(check)


if __name__ == "__main__":
    anyio.run(_child, Path(sys.argv[1]), backend=sys.argv[2])
