"""Versioned schema of the SQLite journal: ordered steps, applied at open.

The version lives in `PRAGMA user_version` (0 = empty file). Each step runs in its own `BEGIN
IMMEDIATE` transaction together with the version bump, so a crash mid-migration leaves the previous
version intact, and two processes opening the same file at once apply each step only once (the second
re-reads the version under the write lock). A database newer than this code is refused, not guessed at.

Add a step by appending a `Migration` with the next version; never edit a released step.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Final

from gateway.store.errors import SchemaError


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(
        1,
        "journal and store-and-forward queue",
        (
            """
            CREATE TABLE txn (
                txn_id INTEGER PRIMARY KEY,
                terminal_id TEXT NOT NULL,
                merchant_id TEXT NOT NULL,
                batch TEXT NOT NULL,
                terminal_stan TEXT NOT NULL,
                terminal_mti TEXT NOT NULL,
                processing_code TEXT NOT NULL,
                kind TEXT NOT NULL,
                amount INTEGER NOT NULL CHECK (amount >= 0),
                currency TEXT NOT NULL,
                pan_masked TEXT NOT NULL,
                pan_fingerprint TEXT NOT NULL,
                card_org TEXT NOT NULL,
                host_mti TEXT,
                host_stan TEXT,
                transmission_datetime TEXT,
                pos_entry_mode TEXT,
                pos_condition_code TEXT,
                orig_txn_id INTEGER REFERENCES txn (txn_id),
                orig_batch TEXT,
                orig_stan TEXT,
                orig_rrn TEXT,
                orig_date TEXT,
                orig_auth_code TEXT,
                state TEXT NOT NULL,
                rc TEXT,
                auth_code TEXT,
                rrn TEXT,
                reversal_reason TEXT,
                reversal_initiator TEXT,
                reversed_from TEXT,
                reversal_rc TEXT,
                created_at REAL NOT NULL,
                updated_at REAL NOT NULL
            )
            """,
            # a terminal's own 0400 repeats the original's STAN, so it is left out of the uniqueness
            """
            CREATE UNIQUE INDEX txn_terminal_stan ON txn (terminal_id, batch, terminal_stan)
                WHERE kind <> 'reversal'
            """,
            "CREATE INDEX txn_rrn ON txn (rrn) WHERE rrn IS NOT NULL",
            "CREATE INDEX txn_host_stan ON txn (host_stan) WHERE host_stan IS NOT NULL",
            "CREATE INDEX txn_orig ON txn (orig_txn_id) WHERE orig_txn_id IS NOT NULL",
            "CREATE INDEX txn_pending ON txn (txn_id) WHERE state = 'pending'",
            """
            CREATE TABLE saf (
                saf_id INTEGER PRIMARY KEY,
                txn_id INTEGER NOT NULL UNIQUE REFERENCES txn (txn_id),
                state TEXT NOT NULL,
                reason TEXT NOT NULL,
                initiator TEXT NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                total_attempts INTEGER NOT NULL DEFAULT 0,
                queued_at REAL NOT NULL,
                next_attempt_at REAL NOT NULL,
                last_attempt_at REAL,
                last_error TEXT,
                ack_rc TEXT,
                parked_reason TEXT,
                operator_note TEXT,
                updated_at REAL NOT NULL
            )
            """,
            "CREATE INDEX saf_state ON saf (state, saf_id)",
        ),
    ),
    Migration(
        2,
        "late host answers; card and time indexes",
        (
            "ALTER TABLE txn ADD COLUMN late_rc TEXT",
            "ALTER TABLE txn ADD COLUMN late_at REAL",
            """
            CREATE TABLE late_answer (
                late_id INTEGER PRIMARY KEY,
                txn_id INTEGER REFERENCES txn (txn_id),
                rc TEXT NOT NULL,
                auth_code TEXT,
                rrn TEXT,
                host_mti TEXT,
                host_stan TEXT,
                terminal_id TEXT,
                amount INTEGER,
                received_at REAL NOT NULL
            )
            """,
            "CREATE INDEX late_answer_txn ON late_answer (txn_id) WHERE txn_id IS NOT NULL",
            "CREATE INDEX txn_fingerprint ON txn (pan_fingerprint) WHERE pan_fingerprint <> ''",
            "CREATE INDEX txn_created ON txn (created_at)",
        ),
    ),
    Migration(
        3,
        "late approvals that reopen a reversal answered 25",
        ("ALTER TABLE txn ADD COLUMN late_approved_at REAL",),
    ),
    Migration(
        4,
        "refusals the gateway decided itself; lookups by terminal STAN and authorisation code",
        (
            """
            CREATE TABLE refusal (
                refusal_id INTEGER PRIMARY KEY,
                terminal_id TEXT NOT NULL,
                mti TEXT NOT NULL,
                rc TEXT,
                reason TEXT NOT NULL,
                merchant_id TEXT,
                batch TEXT,
                stan TEXT,
                kind TEXT,
                amount INTEGER,
                pan_masked TEXT NOT NULL,
                pan_fingerprint TEXT NOT NULL,
                refused_at REAL NOT NULL
            )
            """,
            "CREATE INDEX refusal_terminal ON refusal (terminal_id, refusal_id)",
            "CREATE INDEX refusal_fingerprint ON refusal (pan_fingerprint) WHERE pan_fingerprint <> ''",
            "CREATE INDEX txn_auth_code ON txn (auth_code) WHERE auth_code IS NOT NULL",
        ),
    ),
    Migration(
        5,
        "identical reversal repeats (the first attempt's STAN and field 7); SAF lease columns",
        (
            "ALTER TABLE saf ADD COLUMN reversal_stan TEXT",
            "ALTER TABLE saf ADD COLUMN reversal_datetime TEXT",
            # leases matter only with several instances on one database (PostgreSQL); here always NULL,
            # kept so that every backend reads the same SAF entry
            "ALTER TABLE saf ADD COLUMN lease_owner TEXT",
            "ALTER TABLE saf ADD COLUMN lease_expires_at REAL",
        ),
    ),
)

LATEST_VERSION: Final = MIGRATIONS[-1].version


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, *, target: int = LATEST_VERSION) -> list[int]:
    """Apply the missing steps up to `target` on a connection in autocommit mode (isolation_level
    None); returns the versions applied. `SchemaError` for a newer database or a failed step."""
    current = schema_version(conn)
    if current > LATEST_VERSION:
        raise SchemaError(
            f"database schema version {current} is newer than this gateway's ({LATEST_VERSION}):"
            " upgrade the gateway"
        )
    applied: list[int] = []
    for step in MIGRATIONS:
        if step.version > target or step.version <= current:
            continue
        try:
            conn.execute("BEGIN IMMEDIATE")
            if schema_version(conn) >= step.version:  # another process got there first
                conn.execute("ROLLBACK")
                continue
            for statement in step.statements:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {step.version:d}")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise SchemaError(f"migration {step.version} ({step.description}) failed: {exc}") from exc
        applied.append(step.version)
    return applied
