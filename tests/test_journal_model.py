"""Issue 16 item 4: the journal's state machine (`gateway/store/machine.py`) against a model, with
hypothesis: random sequences of requests, outcomes, timeouts, undeliverable and untrusted approvals,
late answers (approvals and declines, authenticated or not), terminal reversals, SAF attempts,
acknowledgements (00 and 25), parking, operator retries and drops, and crashes (the store closed and
reopened from its file or schema, then start-up recovery and the risk limits seeded from the journal,
as `gateway serve` does). The model is written from the rules as documented (store/base.py,
machine.py's table), not from the code's tables, and is checked against the store after every step.

Invariants, besides "the store agrees with the model":
- every approval is delivered (completed) or reversed (its reversal queued, done, or with an operator),
  and a reversal answered 25 whose original the host approved late is reopened;
- a transaction has at most one reversal, and is never reversed twice (only a reopened 25 goes again);
- the daily limit never overshoots: what stands charged is within it, and the limits in memory never
  count less than what the journal says stands (after a crash they are seeded from the journal).

Run against the memory and SQLite stores, and PostgreSQL with fewer examples (a schema per example);
about 15 s in all by default, `GATEWAY_HEAVY=1` for ten times as many examples.
"""

from __future__ import annotations

import functools
import itertools
import os
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test
from test_store_support import FakeClock, open_store, request

from gateway.config import LimitsConfig
from gateway.core.limits import RiskLimits
from gateway.store.errors import NotReversible, StateConflict
from gateway.store.records import SafState, TxnState

T = TxnState
S = SafState
TERMINALS = ("T0000001", "T0000002")
LIMITS = LimitsConfig(per_transaction=5_000, per_day=12_000)
DAY = "20270115"
#: states a transaction is in once its reversal exists
REVERSAL = frozenset({T.REVERSAL_QUEUED, T.REVERSED, T.REVERSAL_FAILED, T.REVERSAL_DROPPED})
#: from these a reversal may be queued (money moved, or may have)
REVERSIBLE = frozenset({T.PENDING, T.COMPLETED, T.TIMED_OUT, T.UNDELIVERABLE, T.HOST_REJECTED})
#: the outcomes the service records with queue_reversal(state=...) for a purchase
REVERSED_OUTCOMES = (T.TIMED_OUT, T.UNDELIVERABLE, T.HOST_REJECTED)
#: purchase amounts: hypothesis favours small integers, so the limits' edges and big (four- and
#: five-digit) amounts are drawn on purpose; a store that loses big amounts must meet them in a short run
AMOUNTS = st.one_of(st.sampled_from((999, 1_000, 4_999, 5_000, 5_001)), st.integers(1_000, 6_000),
                    st.integers(1, 6_000))


@dataclass
class ModelSaf:
    saf_id: int
    state: SafState = S.PENDING
    attempts: int = 0
    total: int = 0


@dataclass
class ModelTxn:
    txn_id: int
    terminal: str
    amount: int
    state: TxnState = T.PENDING
    booked: bool = False  #: the host approved it (so money moved unless reversed)
    reserved: bool = True  #: its amount is reserved in the risk limits
    late_approved: bool = False
    reversal_rc: str | None = None
    saf: ModelSaf | None = None
    reversed_times: int = 0
    reopened_times: int = 0


def outcome_allowed(current: TxnState, new: TxnState) -> bool:
    """The documented rule (Store.record_outcome): pending → any outcome; completed → undeliverable; the
    same outcome again is a retried write."""
    outcomes = {T.COMPLETED, T.DECLINED, T.TIMED_OUT, T.UNDELIVERABLE, T.HOST_REJECTED}
    if current == new:
        return new in outcomes
    return (current is T.PENDING and new in outcomes) or (current is T.COMPLETED and new is T.UNDELIVERABLE)


class JournalMachine(RuleBasedStateMachine):
    kind: ClassVar[str]
    portal: ClassVar[BlockingPortal]
    root: ClassVar[Path]

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(dir=self.root))
        self.clock = FakeClock()
        self.stans = itertools.count(1)
        self.txns: dict[int, ModelTxn] = {}
        self.limits = RiskLimits(LIMITS)
        self._cm: AbstractContextManager[Any] | None = None
        self._open()

    # --- plumbing ----------------------------------------------------------------------------------

    def _open(self) -> None:
        self._cm = self.portal.wrap_async_context_manager(open_store(self.kind, self.dir, clock=self.clock))
        self.store = self._cm.__enter__()

    def _close(self) -> None:
        cm, self._cm = self._cm, None
        if cm is not None:
            cm.__exit__(None, None, None)

    def teardown(self) -> None:
        self._close()

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.clock.now += 1.0
        return self.portal.call(functools.partial(fn, *args, **kwargs))

    def pick(self, index: int, states: frozenset[TxnState] | None = None) -> ModelTxn | None:
        found = [t for t in self.txns.values() if states is None or t.state in states]
        return found[index % len(found)] if found else None

    def picks(self, index: int, saf_states: frozenset[SafState]) -> ModelTxn | None:
        found = [t for t in self.txns.values() if t.saf is not None and t.saf.state in saf_states]
        return found[index % len(found)] if found else None

    def release(self, txn: ModelTxn) -> None:
        if txn.reserved:
            self.limits.release(txn.terminal, txn.amount, DAY)
            txn.reserved = False

    def queued(self, txn: ModelTxn, saf_id: int) -> None:
        txn.state = T.REVERSAL_QUEUED
        txn.saf = ModelSaf(saf_id)

    def reversed_by_ack(self, txn: ModelTxn, rc: str) -> None:
        assert txn.saf is not None
        txn.saf.state, txn.state, txn.reversal_rc = S.DONE, T.REVERSED, rc
        txn.saf.attempts += 1
        txn.saf.total += 1
        txn.reversed_times += 1

    # --- the exchange -------------------------------------------------------------------------------

    @rule(terminal=st.sampled_from(TERMINALS), amount=AMOUNTS)
    def purchase_request(self, terminal: str, amount: int) -> None:
        """Screened by the risk limits as the service does (reserve before journalling)."""
        if self.limits.reserve(terminal, amount, DAY) is not None:
            return  # refused: nothing journalled
        stan = f"{next(self.stans):06d}"
        txn_id = self.call(self.store.record_request, request(stan, terminal_id=terminal, amount=amount))
        assert txn_id not in self.txns
        self.txns[txn_id] = ModelTxn(txn_id, terminal, amount)

    @precondition(lambda self: any(t.state is T.PENDING for t in self.txns.values()))
    @rule(i=st.integers(0, 99), approved=st.booleans())
    def host_answers_in_time(self, i: int, approved: bool) -> None:
        txn = self.pick(i, frozenset({T.PENDING}))
        assert txn is not None
        if approved:  # delivered to the terminal: completed, the reservation stands
            self.call(self.store.record_outcome, txn.txn_id, T.COMPLETED, rc="00", auth_code="123456",
                      rrn="000000000001")
            txn.state, txn.booked = T.COMPLETED, True
        else:
            self.call(self.store.record_outcome, txn.txn_id, T.DECLINED, rc="51")
            txn.state = T.DECLINED
            self.release(txn)

    @precondition(lambda self: any(t.state is T.PENDING for t in self.txns.values()))
    @rule(i=st.integers(0, 99), outcome=st.sampled_from(REVERSED_OUTCOMES), booked=st.booleans())
    def no_good_answer(self, i: int, outcome: TxnState, booked: bool) -> None:
        """Timeout (the host may have booked it), undeliverable or untrusted approval: reversed."""
        txn = self.pick(i, frozenset({T.PENDING}))
        assert txn is not None
        if outcome is T.TIMED_OUT:
            queued = self.call(self.store.record_timeout_and_queue_reversal, txn.txn_id, "98")
        else:
            queued = self.call(self.store.queue_reversal, txn.txn_id, "96", state=outcome, rc="00")
        assert queued.created and queued.entry.txn_id == txn.txn_id
        txn.booked = booked or outcome is not T.TIMED_OUT
        self.queued(txn, queued.entry.saf_id)
        self.release(txn)

    @precondition(lambda self: any(t.state is not T.PENDING for t in self.txns.values()))
    @rule(i=st.integers(0, 99), new=st.sampled_from((T.COMPLETED, T.DECLINED)))
    def stale_outcome(self, i: int, new: TxnState) -> None:
        """An outcome written after the transaction moved on: a retried write of the same outcome
        changes nothing; any other is a conflict (e.g. the answer came after its reversal was queued)."""
        txn = self.pick(i, frozenset(TxnState) - {T.PENDING})
        assert txn is not None
        if outcome_allowed(txn.state, new):
            assert new is txn.state
            self.call(self.store.record_outcome, txn.txn_id, new)
        else:
            with pytest.raises(StateConflict):
                self.call(self.store.record_outcome, txn.txn_id, new)

    @precondition(lambda self: any(t.state in REVERSAL for t in self.txns.values()))
    @rule(i=st.integers(0, 99), rc=st.sampled_from(("00", "05")), authenticated=st.booleans())
    def late_answer(self, i: int, rc: str, authenticated: bool) -> None:
        """A host answer after the timeout (so to a transaction whose reversal exists): journalled; an
        authenticated approval of a reversal answered 25 reopens it."""
        txn = self.pick(i, REVERSAL)
        assert txn is not None
        recorded = self.call(self.store.record_late_answer, txn.txn_id, rc, authenticated=authenticated,
                             host_mti="0210", terminal_id=txn.terminal, amount=txn.amount)
        if authenticated and rc == "00":
            txn.late_approved = True
            txn.booked = True
        reopen = (txn.state is T.REVERSED and txn.reversal_rc == "25" and txn.late_approved
                  and txn.saf is not None and txn.saf.state is S.DONE)
        assert recorded.reopened == reopen, (txn, recorded)
        if reopen:
            assert txn.saf is not None
            txn.state, txn.reversal_rc = T.REVERSAL_QUEUED, None
            txn.saf.state, txn.saf.attempts = S.PENDING, 1
            txn.reopened_times += 1

    @precondition(lambda self: bool(self.txns))
    @rule(i=st.integers(0, 99))
    def terminal_reversal(self, i: int) -> None:
        txn = self.pick(i)
        assert txn is not None
        if txn.state in REVERSAL:
            saf_before = txn.saf
            queued = self.call(self.store.queue_reversal, txn.txn_id, "06", initiator="terminal")
            assert not queued.created and saf_before is not None and queued.entry.saf_id == saf_before.saf_id
        elif txn.state in REVERSIBLE:
            queued = self.call(self.store.queue_reversal, txn.txn_id, "06", initiator="terminal")
            assert queued.created
            self.queued(txn, queued.entry.saf_id)
        else:
            with pytest.raises(NotReversible):
                self.call(self.store.queue_reversal, txn.txn_id, "06", initiator="terminal")

    # --- store and forward ---------------------------------------------------------------------------

    @precondition(lambda self: any(t.saf is not None for t in self.txns.values()))
    @rule(i=st.integers(0, 99))
    def failed_attempt(self, i: int) -> None:
        txn = self.picks(i, frozenset(SafState))
        assert txn is not None and txn.saf is not None
        now = self.clock.now
        if txn.saf.state is S.PENDING:
            count = self.call(self.store.mark_reversal_attempt, txn.saf.saf_id, now, now + 5, "timeout: test")
            txn.saf.attempts += 1
            txn.saf.total += 1
            assert count == txn.saf.attempts
        else:
            with pytest.raises(StateConflict):
                self.call(self.store.mark_reversal_attempt, txn.saf.saf_id, now, now + 5, "timeout: test")

    @precondition(lambda self: any(t.saf is not None for t in self.txns.values()))
    @rule(i=st.integers(0, 99), rc=st.sampled_from(("00", "25")))
    def host_acknowledges(self, i: int, rc: str) -> None:
        txn = self.picks(i, frozenset(SafState))
        assert txn is not None and txn.saf is not None
        accepted = self.call(self.store.ack_reversal, txn.saf.saf_id, rc, attempt_at=self.clock.now)
        if txn.saf.state is S.DONE:
            assert accepted  # a repeated acknowledgement changes nothing
        elif rc == "25" and txn.late_approved:
            assert not accepted  # the host approved the original late: "not found" is not true
        else:
            assert accepted
            self.reversed_by_ack(txn, rc)

    @precondition(lambda self: any(t.saf is not None for t in self.txns.values()))
    @rule(i=st.integers(0, 99))
    def sender_gives_up(self, i: int) -> None:
        txn = self.picks(i, frozenset(SafState))
        assert txn is not None and txn.saf is not None
        if txn.saf.state in (S.PENDING, S.PARKED):
            self.call(self.store.park_reversal, txn.saf.saf_id, "gave up", final_attempt_at=self.clock.now)
            txn.saf.state, txn.state = S.PARKED, T.REVERSAL_FAILED
            txn.saf.attempts += 1
            txn.saf.total += 1
        else:
            with pytest.raises(StateConflict):
                self.call(self.store.park_reversal, txn.saf.saf_id, "gave up", final_attempt_at=self.clock.now)

    @precondition(lambda self: any(t.saf is not None for t in self.txns.values()))
    @rule(i=st.integers(0, 99), drop=st.booleans())
    def operator(self, i: int, drop: bool) -> None:
        txn = self.picks(i, frozenset(SafState))
        assert txn is not None and txn.saf is not None
        saf = txn.saf
        if drop:
            if saf.state in (S.PENDING, S.PARKED):
                self.call(self.store.drop_saf, saf.saf_id, "customer refunded by hand")
                saf.state, txn.state = S.DROPPED, T.REVERSAL_DROPPED
            else:
                with pytest.raises(StateConflict):
                    self.call(self.store.drop_saf, saf.saf_id, "customer refunded by hand")
        elif saf.state is S.PARKED:
            self.call(self.store.retry_saf, saf.saf_id)
            saf.state, saf.attempts, txn.state = S.PENDING, 0, T.REVERSAL_QUEUED
        else:
            with pytest.raises(StateConflict):
                self.call(self.store.retry_saf, saf.saf_id)

    # --- crash ----------------------------------------------------------------------------------------

    @rule()
    def crash_and_restart(self) -> None:
        """The process dies: reservations in memory are gone; the journal is reopened (memory: kept as
        it is, it has no file), pending requests are reversed (they may have reached the host) and the
        limits are seeded from the journal's completed purchases."""
        if self.kind != "memory":
            self._close()
            self._open()
        for rec in self.call(self.store.unknown_outcomes):
            txn = self.txns[rec.txn_id]
            assert txn.state is T.PENDING
            queued = self.call(self.store.queue_reversal, rec.txn_id, "06", state=T.TIMED_OUT)
            assert queued.created
            self.queued(txn, queued.entry.saf_id)
        assert {t.txn_id for t in self.txns.values() if t.state is T.PENDING} == set()
        self.limits = RiskLimits(LIMITS)
        self.limits.seed(DAY, self.call(self.store.purchase_totals_since, 0.0))
        for txn in self.txns.values():
            txn.reserved = txn.state is T.COMPLETED

    # --- invariants -----------------------------------------------------------------------------------

    @invariant()
    def store_agrees_with_the_model(self) -> None:
        rows = {r.txn_id: r for r in self.call(self.store.list_transactions, limit=1000)}
        assert set(rows) == set(self.txns)
        entries = self.call(self.store.list_saf, limit=1000)
        by_txn = {}
        for entry in entries:
            assert entry.txn_id not in by_txn, f"txn {entry.txn_id} has two reversals"
            by_txn[entry.txn_id] = entry
        for txn in self.txns.values():
            rec = rows[txn.txn_id]
            assert rec.state is txn.state, (txn, rec.state)
            entry = by_txn.get(txn.txn_id)
            if txn.saf is None:
                assert entry is None, (txn, entry)
            else:
                assert entry is not None and entry.saf_id == txn.saf.saf_id, (txn, entry)
                assert (entry.state, entry.attempts, entry.total_attempts) == (
                    txn.saf.state, txn.saf.attempts, txn.saf.total), (txn, entry)
            assert rec.state not in REVERSED_OUTCOMES, f"txn {txn.txn_id} {rec.state} with no reversal step"
        # what the limits are seeded from after a crash: every completed purchase, whatever its amount
        standing: dict[str, int] = {}
        for txn in self.txns.values():
            if txn.state is T.COMPLETED:
                standing[txn.terminal] = standing.get(txn.terminal, 0) + txn.amount
        assert self.call(self.store.purchase_totals_since, 0.0) == standing

    @invariant()
    def every_approval_is_delivered_or_reversed(self) -> None:
        for txn in self.txns.values():
            if txn.booked:
                assert txn.state is T.COMPLETED or txn.state in REVERSAL, txn
            if txn.state is T.REVERSED and txn.reversal_rc == "25":
                assert not txn.late_approved, f"txn {txn.txn_id}: approved late, its 25 not reopened"
            assert txn.reversed_times <= 1 + txn.reopened_times, f"txn {txn.txn_id} reversed twice"

    @invariant()
    def limits_never_overshoot(self) -> None:
        for terminal in TERMINALS:
            standing = sum(t.amount for t in self.txns.values() if t.terminal == terminal and t.state is T.COMPLETED)
            assert standing <= LIMITS.per_day, (terminal, standing)
            assert standing <= self.limits.used(terminal) <= LIMITS.per_day, (terminal, standing,
                                                                             self.limits.used(terminal))


#: examples per backend: sized for about 15 s in all on the shared CI machine (the memory model is
#: cheap; PostgreSQL makes a schema per example); `GATEWAY_HEAVY=1` runs ten times as many. At the default
#: size it still fails on a store that drops big amounts from the seeded totals, or that does not reopen
#: a 25 whose original the host approved late (both planted by hand on SQLite, issue 16).
HEAVY = 10 if os.environ.get("GATEWAY_HEAVY") == "1" else 1
EXAMPLES = {"memory": 60 * HEAVY, "sqlite": 20 * HEAVY, "postgres": 6 * HEAVY}


@pytest.mark.parametrize("kind", ["memory", "sqlite", "postgres"])
def test_journal_state_machine_against_the_model(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if kind == "postgres":
        request.getfixturevalue("pg_database")  # skipped (or failed, when required) without a server
    with start_blocking_portal("asyncio") as portal:
        machine = type(f"JournalMachine_{kind}", (JournalMachine,), {"kind": kind, "portal": portal,
                                                                      "root": tmp_path})
        run_state_machine_as_test(machine, settings=settings(
            max_examples=EXAMPLES[kind], stateful_step_count=30, deadline=None, derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much], database=None,
        ))
