"""The durable journal and the store-and-forward (SAF) reversal queue.

- `records`: what is kept (`TxnRequest`, `TxnRecord`, `SafEntry`, states) and the transition tables;
  `pan_fingerprint(key, pan)` for matching cards without keeping PANs.
- `machine`: the journal's state machine as pure functions, written once; the backends only persist.
- `base`: the `Store` interface every backend implements, and the metrics `StoreObserver`.
- `sqlite`: the durable default (WAL, group commit); `memory`: same interface, no I/O;
  `postgres` (`PostgresStore`, the `postgres` extra, imported on its own so psycopg stays optional):
  several instances on one database, SAF leases, orphaned pending requests taken over.
- `group_commit`: many concurrent writes share one transaction and one fsync.
- `migrations` / `pg_migrations`: the versioned schemas; `cli`: `gateway saf …` and `gateway journal …`.
"""

from gateway.store.base import NullObserver, Store, StoreObserver
from gateway.store.errors import (
    DuplicateRequest,
    InvalidRecord,
    LeaseLost,
    NotFound,
    NotReversible,
    SchemaError,
    StateConflict,
    StoreClosed,
    StoreError,
    StoreIOError,
)
from gateway.store.memory import MemoryStore
from gateway.store.records import (
    LateAnswer,
    LateRecorded,
    QueuedReversal,
    Refusal,
    RefusalRecord,
    ReversalInitiator,
    SafEntry,
    SafState,
    TxnKind,
    TxnQuery,
    TxnRecord,
    TxnRequest,
    TxnState,
    pan_fingerprint,
)
from gateway.store.sqlite import SqliteStore

__all__ = [
    "DuplicateRequest",
    "InvalidRecord",
    "LateAnswer",
    "LateRecorded",
    "LeaseLost",
    "MemoryStore",
    "NotFound",
    "NotReversible",
    "NullObserver",
    "QueuedReversal",
    "Refusal",
    "RefusalRecord",
    "ReversalInitiator",
    "SafEntry",
    "SafState",
    "SchemaError",
    "SqliteStore",
    "StateConflict",
    "Store",
    "StoreClosed",
    "StoreError",
    "StoreIOError",
    "StoreObserver",
    "TxnKind",
    "TxnQuery",
    "TxnRecord",
    "TxnRequest",
    "TxnState",
    "pan_fingerprint",
]
