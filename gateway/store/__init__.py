"""The durable journal and the store-and-forward (SAF) reversal queue.

- `records`: what is kept (`TxnRequest`, `TxnRecord`, `SafEntry`, states) and the transition rules;
  `pan_fingerprint(key, pan)` for matching cards without keeping PANs.
- `base`: the `Store` interface every backend implements, and the metrics `StoreObserver`.
- `sqlite`: the durable default (WAL, group commit); `memory`: same interface, no I/O.
- `group_commit`: many concurrent writes share one transaction and one fsync.
- `migrations`: the versioned schema; `cli`: `gateway saf …` and `gateway journal show`.
"""

from gateway.store.base import NullObserver, Store, StoreObserver
from gateway.store.errors import (
    DuplicateRequest,
    InvalidRecord,
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
