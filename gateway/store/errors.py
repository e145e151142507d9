"""Typed store errors. Every failure the journal or the SAF queue reports is one of these, never a bare
sqlite3/KeyError/ValueError, so the core can map it to a response code and a metric.

Error text names *what* is wrong (which id, which field, which state) and never carries a PAN: the
store holds only masked PANs and keyed fingerprints, and validation messages never echo values.
"""

from __future__ import annotations

from typing import Final


class StoreError(Exception):
    """Base of everything `gateway.store` raises."""

    #: short machine-readable kind, usable as a bounded metric label
    kind = "store"


class InvalidRecord(StoreError):
    """A record or argument that breaks the journal's rules (bad length, clear PAN, unknown state)."""

    kind = "invalid_record"

    def __init__(self, reason: str, *, field: str) -> None:
        self.reason = reason
        self.field = field
        super().__init__(f"{reason} (field {field})")


class NotFound(StoreError):
    """No journal entry or SAF entry with that id."""

    kind = "not_found"

    def __init__(self, what: str, ident: int) -> None:
        self.what = what
        self.ident = ident
        super().__init__(f"no {what} with id {ident}")


class StateConflict(StoreError):
    """The entry is not in a state that allows the operation (e.g. an outcome for a transaction whose
    reversal is already queued: that answer is a late answer, journal it with `record_late_answer`)."""

    kind = "state_conflict"

    def __init__(self, what: str, ident: int, current: str, wanted: str) -> None:
        self.what = what
        self.ident = ident
        self.current = current
        self.wanted = wanted
        super().__init__(f"{what} {ident} is {current}: cannot {wanted}")


class NotReversible(StateConflict):
    """A reversal asked for a transaction that moved no money (declined): nothing to reverse."""

    kind = "not_reversible"


class DuplicateRequest(StoreError):
    """A financial request whose terminal id + batch + terminal STAN is already journalled. The core
    answers 94 (duplicate transmission); the first request keeps its entry."""

    kind = "duplicate"

    def __init__(self, terminal_id: str, batch: str, stan: str) -> None:
        self.terminal_id = terminal_id
        self.batch = batch
        self.stan = stan
        super().__init__(f"terminal {terminal_id} batch {batch} stan {stan} is already journalled")


class OriginalRefused(StoreError):
    """A void or refund the journal refused at the moment of writing it, because of what was already
    journalled against its original (another void or refund got there first, possibly on another
    instance of the gateway): `rc` is the answer for the terminal, 12 or 64."""

    kind = "original_refused"

    def __init__(self, orig_txn_id: int, rc: str) -> None:
        self.orig_txn_id = orig_txn_id
        self.rc = rc
        super().__init__(f"original txn {orig_txn_id}: {CREDIT_REFUSALS.get(rc, rc)}")


#: why `records.credit_refusal` refuses, by its response code
CREDIT_REFUSALS: Final = {
    "25": "original not found",
    "12": "original is not a completed purchase, or was voided already",
    "64": "amount does not fit the original",
}


class StoreClosed(StoreError):
    """The store is closed (or closing): the write was not applied."""

    kind = "closed"


class StoreIOError(StoreError):
    """The database could not be read or written (disk full, I/O error, lock timeout). The write was
    not applied: every write of the failed commit gets this error."""

    kind = "io"


class SchemaError(StoreError):
    """The database schema is newer than this code, or a migration step failed."""

    kind = "schema"


class LeaseLost(StateConflict):
    """Another instance holds this SAF entry's lease (it took the entry over after this instance's
    lease expired): this instance must not record anything for it but the host's acknowledgement."""

    kind = "lease_lost"

    def __init__(self, saf_id: int, holder: str, wanted: str) -> None:
        super().__init__("SAF entry", saf_id, f"leased by {holder}", wanted)
        self.holder = holder
