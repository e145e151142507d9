"""Issue 16, named escape 2: a host that never answers reversals. Each unanswered reversal is an attempt
(jPOS-EE's SAF does not count timeouts and so retries a silent host for ever): the attempts back off on
the configured schedule, the entry is parked after `max_attempts` for an operator, and nothing more is
sent for it after that.

Real loopback sockets, the host simulator dropping every reversal (it never answers), the real SAF
sender and journal. Timing is asserted as lower bounds only (a loaded machine is slower, never faster).
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from pathlib import Path

import anyio
import pytest
from test_e2e_reversal import eventually

from gateway.config import ReversalConfig
from gateway.lab import CARD_CUP, open_lab
from gateway.sim.host_rules import Fault
from gateway.store.records import SafState, TxnState

pytestmark = pytest.mark.anyio

HOST_TIMEOUT = 0.3
MAX_ATTEMPTS = 4
BACKOFF = (0.1, 0.3, 0.6)
SILENT_SAF = ReversalConfig(max_attempts=MAX_ATTEMPTS, backoff=BACKOFF, poll_interval=0.05,
                            original_wait=HOST_TIMEOUT + 1.0)
REVERSAL_MTIS = ("0400", "0401")


class ArrivalCounter(Counter[str]):
    """The host simulator's per-MTI message counter, also noting when each reversal arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.reversals: list[float] = []

    def __setitem__(self, mti: str, count: int) -> None:
        if mti in REVERSAL_MTIS:
            self.reversals.append(time.monotonic())
        super().__setitem__(mti, count)


async def test_a_host_that_never_answers_reversals_gets_backed_off_attempts_then_a_parked_entry(
        tmp_path: Path) -> None:
    silent = Fault("drop", mti=("0200", *REVERSAL_MTIS))  # the purchase times out, and so does every reversal
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=SILENT_SAF,
                        faults=(silent,)) as lab:
        arrivals = ArrivalCounter()
        lab.host.stats.messages = arrivals
        store = lab.gateway.store
        scheduled: list[tuple[float, float, str]] = []
        mark = store.mark_reversal_attempt

        async def recording_mark(saf_id: int, now: float, next_attempt_at: float, error: str) -> int:
            scheduled.append((now, next_attempt_at, error))
            return await mark(saf_id, now, next_attempt_at, error)

        store.mark_reversal_attempt = recording_mark  # type: ignore[method-assign]
        t = lab.terminal(auto_reverse=False)
        await t.connect()
        await t.sign_in()
        assert (await t.purchase(1_200, CARD_CUP)).rc == "98"
        txn_id = (await store.list_transactions())[0].txn_id

        async def parked() -> object:
            saf = await store.saf_for_txn(txn_id)
            return saf if saf is not None and saf.state is SafState.PARKED else None

        saf = await eventually(parked, "the reversal parked", bound=10 + MAX_ATTEMPTS * (HOST_TIMEOUT + max(BACKOFF)))
        rec = await store.get(txn_id)
        assert rec is not None and rec.state is TxnState.REVERSAL_FAILED
        assert saf.attempts == MAX_ATTEMPTS and saf.total_attempts == MAX_ATTEMPTS, saf
        assert saf.parked_reason is not None and "timeout" in saf.parked_reason, saf.parked_reason
        # every failed attempt before the last was a timeout and was given the next step of the schedule
        assert [e.split(":")[0] for _, _, e in scheduled] == ["timeout"] * (MAX_ATTEMPTS - 1), scheduled
        delays = [round(due - now, 6) for now, due, _ in scheduled]
        expected = [BACKOFF[min(i, len(BACKOFF) - 1)] for i in range(MAX_ATTEMPTS - 1)]
        assert delays == expected, delays
        # on the wire: exactly max_attempts reversals, each after the previous one's timeout and back-off
        sent = list(arrivals.reversals)
        assert len(sent) == MAX_ATTEMPTS, f"{len(sent)} reversals sent for {MAX_ATTEMPTS} attempts"
        gaps = [b - a for a, b in itertools.pairwise(sent)]
        for i, gap in enumerate(gaps):
            assert gap >= HOST_TIMEOUT + expected[i] - 0.02, (i, gaps)
        # parked means left alone: nothing more goes out however long the gateway runs on
        await anyio.sleep(HOST_TIMEOUT + 2 * max(BACKOFF) + 5 * SILENT_SAF.poll_interval)
        assert len(arrivals.reversals) == MAX_ATTEMPTS, "a parked reversal was sent again"
        assert (await store.saf_for_txn(txn_id)).state is SafState.PARKED  # type: ignore[union-attr]
        assert lab.gateway.service.limits.used(lab.config.terminals[0].terminal_id) == 0
