"""The journal's rules (`gateway/store/machine.py`) one promise at a time, for mutation testing (issue 16).

Every backend persists what these functions decide, so a rule that bends here bends on all three: an
outcome written over a queued reversal, a reversal counted twice or not at all, a 25 that stands after
the host approved the original late, a lease that another instance can ignore. The functions do no I/O,
so each promise is checked directly on what they return; the stores' own suites check the writing.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.store import machine
from gateway.store.errors import InvalidRecord, LeaseLost, NotReversible, StateConflict
from gateway.store.machine import SafView, TxnView
from gateway.store.records import (
    APPROVAL_RCS,
    MISSING_SAF,
    ONLY_PARKED,
    REOPENED_BY_LATE_APPROVAL,
    ReversalInitiator,
    SafState,
    TxnState,
)

T = TxnState
S = SafState
NOW = 1_000.0
GW = ReversalInitiator.GATEWAY


def txn(state: TxnState, *, rc: str | None = None, late_approved_at: float | None = None) -> TxnView:
    return TxnView(7, state, rc, late_approved_at)


def saf(state: SafState = S.PENDING, *, attempts: int = 2, total: int = 5, stan: str | None = None,
        lease: str | None = None) -> SafView:
    return SafView(3, 7, state, attempts, total, stan, lease)


def queue(state: TxnState, **kwargs: object) -> machine.NewReversal | None:
    args: dict[str, object] = {"reason": "98", "outcome": None, "initiator": GW, "rc": None, "auth_code": None,
                               "rrn": None, "not_before": None, "now": NOW}
    args.update(kwargs)
    return machine.queue_reversal(txn(state), **args)  # type: ignore[arg-type]


# --- outcomes ---------------------------------------------------------------------------------------


def test_an_outcome_after_the_reversal_was_queued_is_refused_and_says_why() -> None:
    with pytest.raises(StateConflict) as err:
        machine.outcome(txn(T.REVERSAL_QUEUED), T.COMPLETED, rc="00", auth_code=None, rrn=None, now=NOW)
    assert (err.value.what, err.value.ident, err.value.current) == ("transaction", 7, T.REVERSAL_QUEUED)
    assert err.value.wanted == "record outcome completed"


def test_an_outcome_writes_the_state_and_only_the_fields_given() -> None:
    full = machine.outcome(txn(T.PENDING), T.COMPLETED, rc="00", auth_code="123456", rrn="000000000001", now=NOW)
    assert full == {"state": T.COMPLETED, "updated_at": NOW, "rc": "00", "auth_code": "123456",
                    "rrn": "000000000001"}
    # a retried write that leaves the codes out keeps the ones recorded
    assert machine.outcome(txn(T.COMPLETED), T.COMPLETED, rc=None, auth_code=None, rrn=None, now=NOW) == {
        "state": T.COMPLETED, "updated_at": NOW}
    assert machine.outcome(txn(T.COMPLETED), T.UNDELIVERABLE, rc=None, auth_code="1", rrn=None, now=NOW) == {
        "state": T.UNDELIVERABLE, "updated_at": NOW, "auth_code": "1"}


# --- queueing a reversal ----------------------------------------------------------------------------


def test_a_second_reversal_is_never_queued() -> None:
    for state in (T.REVERSAL_QUEUED, T.REVERSED, T.REVERSAL_FAILED, T.REVERSAL_DROPPED):
        assert queue(state) is None, state


def test_a_declined_transaction_is_not_reversible() -> None:
    with pytest.raises(NotReversible) as err:
        queue(T.DECLINED)
    assert (err.value.ident, err.value.current) == (7, T.DECLINED)
    assert "no money moved" in err.value.wanted


def test_a_reversal_cannot_record_an_outcome_its_state_does_not_allow() -> None:
    with pytest.raises(StateConflict) as err:
        queue(T.TIMED_OUT, outcome=T.UNDELIVERABLE)
    assert not isinstance(err.value, NotReversible)
    assert (err.value.current, err.value.wanted) == (T.TIMED_OUT, "record outcome undeliverable")
    # the same outcome again, and an allowed one, are fine
    assert queue(T.TIMED_OUT, outcome=T.TIMED_OUT) is not None
    allowed = queue(T.COMPLETED, outcome=T.UNDELIVERABLE)
    assert allowed is not None and allowed.txn["reversed_from"] == T.UNDELIVERABLE
    with pytest.raises(InvalidRecord):
        queue(T.PENDING, outcome=T.DECLINED)


def test_a_queued_reversal_starts_fresh_and_due_now() -> None:
    new = queue(T.COMPLETED, reason="96", initiator=ReversalInitiator.TERMINAL)
    assert new is not None
    assert new.txn == {"state": T.REVERSAL_QUEUED, "reversed_from": T.COMPLETED, "reversal_reason": "96",
                       "reversal_initiator": ReversalInitiator.TERMINAL, "updated_at": NOW}
    assert new.saf == {"txn_id": 7, "state": S.PENDING, "reason": "96", "initiator": ReversalInitiator.TERMINAL,
                       "attempts": 0, "total_attempts": 0, "queued_at": NOW, "updated_at": NOW,
                       "next_attempt_at": NOW}


def test_a_reversal_waits_for_not_before_but_never_goes_into_the_past() -> None:
    later = queue(T.PENDING, not_before=NOW + 30)
    earlier = queue(T.PENDING, not_before=NOW - 30)
    assert later is not None and later.saf["next_attempt_at"] == NOW + 30
    assert earlier is not None and earlier.saf["next_attempt_at"] == NOW


def test_a_reversal_keeps_the_host_codes_it_is_given() -> None:
    new = queue(T.PENDING, outcome=T.HOST_REJECTED, rc="00", auth_code="654321", rrn="000000000009")
    assert new is not None
    assert (new.txn["rc"], new.txn["auth_code"], new.txn["rrn"]) == ("00", "654321", "000000000009")
    assert new.txn["reversed_from"] == T.HOST_REJECTED
    bare = queue(T.PENDING)
    assert bare is not None and not {"rc", "auth_code", "rrn"} & set(bare.txn)


def test_a_missing_saf_entry_is_a_conflict_naming_the_transaction() -> None:
    err = machine.missing_saf(txn(T.REVERSAL_QUEUED))
    assert isinstance(err, StateConflict)
    assert (err.what, err.ident, err.current, err.wanted) == ("transaction", 7, T.REVERSAL_QUEUED, MISSING_SAF)


# --- late answers and reopening ---------------------------------------------------------------------


@pytest.mark.parametrize("rc", sorted(APPROVAL_RCS | {"10"}))
def test_an_authenticated_late_approval_is_remembered(rc: str) -> None:
    change, after = machine.late_answer(txn(T.REVERSED, rc="25"), rc, authenticated=True, now=NOW)
    assert change == {"late_rc": rc, "late_at": NOW, "updated_at": NOW, "late_approved_at": NOW}
    assert after == TxnView(7, T.REVERSED, "25", NOW)


@pytest.mark.parametrize(("rc", "authenticated"), [("00", False), ("05", True), ("51", True)])
def test_a_decline_or_an_unverified_approval_is_not_an_approval(rc: str, authenticated: bool) -> None:
    change, after = machine.late_answer(txn(T.REVERSED, rc="25"), rc, authenticated=authenticated, now=NOW)
    assert change["late_approved_at"] is None and after.late_approved_at is None
    assert change["late_rc"] == rc
    assert not machine.wants_reopen(after, rc, authenticated=authenticated)


def test_a_late_approval_is_never_forgotten_by_a_later_answer() -> None:
    first = txn(T.REVERSAL_QUEUED, late_approved_at=NOW - 50)
    change, after = machine.late_answer(first, "05", authenticated=True, now=NOW)
    assert change["late_approved_at"] == NOW - 50 and after.late_approved_at == NOW - 50
    change, after = machine.late_answer(first, "00", authenticated=True, now=NOW)
    assert change["late_approved_at"] == NOW - 50  # the first approval's time stands


def test_only_an_authenticated_approval_of_a_reversal_answered_25_reopens_it() -> None:
    overtaken = txn(T.REVERSED, rc="25", late_approved_at=NOW)
    assert machine.wants_reopen(overtaken, "00", authenticated=True)
    assert machine.wants_reopen(overtaken, "10", authenticated=True)
    assert not machine.wants_reopen(overtaken, "00", authenticated=False)
    assert not machine.wants_reopen(overtaken, "05", authenticated=True)
    assert not machine.wants_reopen(txn(T.REVERSED, rc="00", late_approved_at=NOW), "00", authenticated=True)
    assert not machine.wants_reopen(txn(T.REVERSAL_QUEUED, rc="25", late_approved_at=NOW), "00",
                                    authenticated=True)
    assert not machine.wants_reopen(txn(T.REVERSED, rc="25"), "00", authenticated=True)


def test_a_reopened_reversal_goes_again_now_as_a_repeat_with_a_new_stan() -> None:
    step = machine.reopen(txn(T.REVERSED, rc="25", late_approved_at=NOW), saf(S.DONE, stan="000123"), now=NOW)
    assert step is not None
    assert step.txn == {"state": T.REVERSAL_QUEUED, "reversal_rc": None, "updated_at": NOW}
    assert step.saf == {"state": S.PENDING, "attempts": 1, "next_attempt_at": NOW, "ack_rc": None,
                        "last_error": REOPENED_BY_LATE_APPROVAL, "updated_at": NOW, "reversal_stan": None,
                        "reversal_datetime": None, "lease_owner": None, "lease_expires_at": None}


def test_nothing_is_reopened_unless_a_25_was_overtaken_and_its_entry_is_done() -> None:
    overtaken = txn(T.REVERSED, rc="25", late_approved_at=NOW)
    assert machine.reopen(overtaken, None, now=NOW) is None
    assert machine.reopen(overtaken, saf(S.PENDING), now=NOW) is None
    assert machine.reopen(overtaken, saf(S.DROPPED), now=NOW) is None
    assert machine.reopen(txn(T.REVERSED, rc="00", late_approved_at=NOW), saf(S.DONE), now=NOW) is None
    assert machine.reopen(txn(T.REVERSED, rc="25"), saf(S.DONE), now=NOW) is None
    assert machine.reopen(txn(T.REVERSAL_QUEUED, rc="25", late_approved_at=NOW), saf(S.DONE), now=NOW) is None


# --- store and forward ------------------------------------------------------------------------------


def test_a_failed_attempt_counts_once_and_lets_the_lease_go() -> None:
    change = machine.attempt(saf(lease="gw-a"), instance="gw-a", attempted_at=NOW - 1, next_attempt_at=NOW + 9,
                             error="timeout", now=NOW)
    assert change == {"attempts": 3, "total_attempts": 6, "last_attempt_at": NOW - 1, "next_attempt_at": NOW + 9,
                      "last_error": "timeout", "updated_at": NOW, "lease_owner": None, "lease_expires_at": None}


@pytest.mark.parametrize("state", [S.PARKED, S.DONE, S.DROPPED])
def test_an_attempt_is_only_for_a_pending_entry(state: SafState) -> None:
    with pytest.raises(StateConflict) as err:
        machine.attempt(saf(state), instance=None, attempted_at=NOW, next_attempt_at=NOW, error="x", now=NOW)
    assert (err.value.what, err.value.ident, err.value.current) == ("SAF entry", 3, state)
    assert not isinstance(err.value, LeaseLost)


def test_an_instance_that_lost_the_lease_can_record_nothing_but_the_ack() -> None:
    taken = saf(lease="gw-b")
    with pytest.raises(LeaseLost) as err:
        machine.attempt(taken, instance="gw-a", attempted_at=NOW, next_attempt_at=NOW, error="x", now=NOW)
    assert (err.value.holder, err.value.ident, err.value.wanted) == ("gw-b", 3, "record an attempt")
    with pytest.raises(LeaseLost) as err:
        machine.park(taken, instance="gw-a", reason="gave up", final_attempt_at=None, now=NOW)
    assert err.value.wanted == "park it"
    with pytest.raises(LeaseLost) as err:
        machine.reversal_ident(taken, instance="gw-a", stan="000001", transmission_datetime="0115120000", now=NOW)
    assert err.value.wanted == "fix its STAN"
    with pytest.raises(LeaseLost):
        machine.attempt(taken, instance=None, attempted_at=NOW, next_attempt_at=NOW, error="x", now=NOW)
    assert machine.ack(taken, txn(T.REVERSAL_QUEUED), "00", attempt_at=None, now=NOW).accepted
    # nobody holds it, or this instance does: allowed
    machine.attempt(saf(), instance="gw-a", attempted_at=NOW, next_attempt_at=NOW, error="x", now=NOW)
    machine.park(taken, instance="gw-b", reason="gave up", final_attempt_at=None, now=NOW)


def test_an_ack_ends_the_reversal_and_counts_the_attempt_it_answers() -> None:
    decided = machine.ack(saf(lease="gw-a"), txn(T.REVERSAL_QUEUED), "00", attempt_at=NOW - 2, now=NOW)
    assert decided.accepted and decided.step is not None
    assert decided.step.txn == {"state": T.REVERSED, "reversal_rc": "00", "updated_at": NOW}
    assert decided.step.saf == {"state": S.DONE, "ack_rc": "00", "attempts": 3, "total_attempts": 6,
                                "updated_at": NOW, "lease_owner": None, "lease_expires_at": None,
                                "last_attempt_at": NOW - 2}
    # an ack found without an attempt in flight (e.g. on restart) counts none
    found = machine.ack(saf(S.PARKED), txn(T.REVERSAL_FAILED), "25", attempt_at=None, now=NOW)
    assert found.step is not None
    assert (found.step.saf["attempts"], found.step.saf["total_attempts"]) == (2, 5)
    assert "last_attempt_at" not in found.step.saf
    assert found.step.txn["reversal_rc"] == "25"


def test_a_repeated_ack_changes_nothing() -> None:
    assert machine.ack(saf(S.DONE), txn(T.REVERSED, rc="00"), "00", attempt_at=NOW, now=NOW) == machine.Ack(True, None)


def test_a_25_is_refused_once_the_host_approved_the_original_late() -> None:
    approved = txn(T.REVERSAL_QUEUED, late_approved_at=NOW - 5)
    assert machine.ack(saf(), approved, "25", attempt_at=NOW, now=NOW) == machine.Ack(False, None)
    # its 00 is still the host's word; a 25 without a late approval ends it
    assert machine.ack(saf(), approved, "00", attempt_at=NOW, now=NOW).accepted
    assert machine.ack(saf(), txn(T.REVERSAL_QUEUED), "25", attempt_at=NOW, now=NOW).accepted


def test_parking_waits_for_an_operator_and_counts_the_final_attempt() -> None:
    step = machine.park(saf(lease="gw-a"), instance="gw-a", reason="gave up", final_attempt_at=NOW - 1, now=NOW)
    assert step.txn == {"state": T.REVERSAL_FAILED, "updated_at": NOW}
    assert step.saf == {"state": S.PARKED, "parked_reason": "gave up", "attempts": 3, "total_attempts": 6,
                        "updated_at": NOW, "lease_owner": None, "lease_expires_at": None,
                        "last_attempt_at": NOW - 1}
    again = machine.park(saf(S.PARKED), instance=None, reason="again", final_attempt_at=None, now=NOW)
    assert (again.saf["attempts"], again.saf["total_attempts"]) == (2, 5) and "last_attempt_at" not in again.saf


@pytest.mark.parametrize("state", [S.DONE, S.DROPPED])
def test_a_closed_entry_cannot_be_parked_or_dropped(state: SafState) -> None:
    with pytest.raises(StateConflict) as err:
        machine.park(saf(state), instance=None, reason="x", final_attempt_at=None, now=NOW)
    assert (err.value.current, err.value.wanted) == (state, "park it")
    with pytest.raises(StateConflict) as err:
        machine.drop(saf(state), note="x", now=NOW)
    assert (err.value.current, err.value.wanted) == (state, "drop it")


def test_an_operator_retry_sends_a_fresh_0400() -> None:
    step = machine.retry(saf(S.PARKED, stan="000042", lease="gw-a"), now=NOW)
    assert step.txn == {"state": T.REVERSAL_QUEUED, "updated_at": NOW}
    assert step.saf == {"state": S.PENDING, "attempts": 0, "next_attempt_at": NOW, "parked_reason": None,
                        "updated_at": NOW, "reversal_stan": None, "reversal_datetime": None, "lease_owner": None,
                        "lease_expires_at": None}


@pytest.mark.parametrize("state", [S.PENDING, S.DONE, S.DROPPED])
def test_only_a_parked_entry_can_be_retried(state: SafState) -> None:
    with pytest.raises(StateConflict) as err:
        machine.retry(saf(state), now=NOW)
    assert (err.value.ident, err.value.current, err.value.wanted) == (3, state, ONLY_PARKED)


def test_an_operator_drop_overrides_any_lease() -> None:
    for state in (S.PENDING, S.PARKED):
        step = machine.drop(saf(state, lease="gw-b"), note="refunded by hand", now=NOW)
        assert step.txn == {"state": T.REVERSAL_DROPPED, "updated_at": NOW}
        assert step.saf == {"state": S.DROPPED, "operator_note": "refunded by hand", "updated_at": NOW,
                            "lease_owner": None, "lease_expires_at": None}


def test_the_first_stan_fixed_for_a_reversal_is_the_one_every_attempt_carries() -> None:
    assert machine.reversal_ident(saf(lease="gw-a"), instance="gw-a", stan="000001",
                                  transmission_datetime="0115120000", now=NOW) == {
        "reversal_stan": "000001", "reversal_datetime": "0115120000", "updated_at": NOW}
    assert machine.reversal_ident(saf(stan="000001"), instance=None, stan="000002",
                                  transmission_datetime="0115120001", now=NOW) is None
    with pytest.raises(StateConflict) as err:
        machine.reversal_ident(saf(S.PARKED), instance=None, stan="000002", transmission_datetime="0115120001",
                               now=NOW)
    assert (err.value.current, err.value.wanted) == (S.PARKED, "fix its STAN")


# --- what a refused step says: what, which one, its state and what was asked ------------------------


@pytest.mark.parametrize(("step", "said"), [
    (lambda: queue(T.DECLINED), "transaction 7 is declined: cannot reverse it: no money moved"),
    (lambda: queue(T.TIMED_OUT, outcome=T.UNDELIVERABLE),
     "transaction 7 is timed_out: cannot record outcome undeliverable"),
    (lambda: machine.outcome(txn(T.DECLINED), T.COMPLETED, rc=None, auth_code=None, rrn=None, now=NOW),
     "transaction 7 is declined: cannot record outcome completed"),
    (lambda: machine.attempt(saf(S.PARKED), instance=None, attempted_at=NOW, next_attempt_at=NOW, error="x",
                             now=NOW), "SAF entry 3 is parked: cannot record an attempt"),
    (lambda: machine.attempt(saf(lease="gw-b"), instance="gw-a", attempted_at=NOW, next_attempt_at=NOW,
                             error="x", now=NOW), "SAF entry 3 is leased by gw-b: cannot record an attempt"),
    (lambda: machine.park(saf(S.DONE), instance=None, reason="x", final_attempt_at=None, now=NOW),
     "SAF entry 3 is done: cannot park it"),
    (lambda: machine.park(saf(lease="gw-b"), instance=None, reason="x", final_attempt_at=None, now=NOW),
     "SAF entry 3 is leased by gw-b: cannot park it"),
    (lambda: machine.retry(saf(S.DROPPED), now=NOW), f"SAF entry 3 is dropped: cannot {ONLY_PARKED}"),
    (lambda: machine.drop(saf(S.DONE), note="x", now=NOW), "SAF entry 3 is done: cannot drop it"),
    (lambda: machine.reversal_ident(saf(S.DONE), instance=None, stan="000001", transmission_datetime="0115120000",
                                    now=NOW), "SAF entry 3 is done: cannot fix its STAN"),
    (lambda: machine.reversal_ident(saf(lease="gw-b"), instance=None, stan="000001",
                                    transmission_datetime="0115120000", now=NOW),
     "SAF entry 3 is leased by gw-b: cannot fix its STAN"),
])
def test_a_refused_step_names_the_entry_its_state_and_what_was_asked(step: Any, said: str) -> None:
    with pytest.raises(StateConflict) as err:
        step()
    assert str(err.value) == said
    assert err.value.ident == (7 if said.startswith("transaction") else 3)


def test_a_refused_reversal_is_not_reversible_only_when_no_money_moved() -> None:
    with pytest.raises(NotReversible) as err:
        queue(T.DECLINED)
    assert (err.value.what, err.value.current, err.value.wanted) == (
        "transaction", T.DECLINED, "reverse it: no money moved")


@pytest.mark.parametrize(("reversal_rc", "approved_at", "unknown_rc", "reopens"), [
    ("25", 5.0, "25", True),
    ("25", 5.0, "00", True),  # a 25 is "not found" whatever else the host answers
    ("25", None, "00", False),  # no late approval: nothing contradicts the 25
    ("00", 5.0, "25", False),  # this host's 00 is a real reversal
    ("00", 5.0, "00", True),  # this host answers 00 for unbooked originals too
    ("00", None, "00", False),
])
def test_which_reversed_transactions_a_late_approval_reopens(
        reversal_rc: str, approved_at: float | None, unknown_rc: str, reopens: bool) -> None:
    txn = TxnView(1, TxnState.REVERSED, reversal_rc, approved_at)
    assert machine.wants_reopen(txn, "00", authenticated=True, unknown_rc=unknown_rc) is reopens
    done = SafView(7, 1, SafState.DONE, 1, 1, "000123", None)
    assert (machine.reopen(txn, done, now=9.0, unknown_rc=unknown_rc) is not None) is reopens
