"""Helpers shared by the tests/test_store_*.py files (no tests here): request builders, an observer
that records what the store reports, and one way to open either backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pg_support
import pytest

from gateway.iso.message import mask_pan
from gateway.store import MemoryStore, SqliteStore, TxnRequest, pan_fingerprint
from gateway.store.postgres import PostgresStore

PAN_KEY = b"test-fingerprint-key-0123456789ab"
#: a test card; tests scan database files for these digits
TEST_PAN = "6222021234567894321"
OTHER_PAN = "4761739001010119"

BACKENDS = ("sqlite", "memory", "postgres")


def backend(request: pytest.FixtureRequest) -> str:
    """The body of a test module's backend fixture (`params=BACKENDS`): PostgreSQL needs the session's
    database (skipped, or failed when required, without a server)."""
    kind: str = request.param
    if kind == "postgres":
        request.getfixturevalue("pg_database")
    return kind


class Recorder:
    """A StoreObserver that keeps every report."""

    def __init__(self) -> None:
        self.commits: list[tuple[int, float]] = []
        self.depths: list[int] = []

    def commit(self, batch_size: int, seconds: float) -> None:
        self.commits.append((batch_size, seconds))

    def saf_depth(self, n: int) -> None:
        self.depths.append(n)


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def request(stan: str = "000001", *, pan: str = TEST_PAN, **overrides: Any) -> TxnRequest:
    """A valid purchase request; override any field."""
    fields: dict[str, Any] = {
        "terminal_id": "T0000001",
        "merchant_id": "M00000000000001",
        "batch": "000001",
        "terminal_stan": stan,
        "terminal_mti": "0200",
        "processing_code": "000000",
        "kind": "purchase",
        "amount": 1000,
        "currency": "156",
        "pan_masked": mask_pan(pan),
        "pan_fingerprint": pan_fingerprint(PAN_KEY, pan),
        "card_org": "CUP",
        "host_mti": "0200",
        "host_stan": stan,
        "transmission_datetime": "1123101500",
        "pos_entry_mode": "021",
        "pos_condition_code": "00",
    }
    fields.update(overrides)
    return TxnRequest(**fields)


@asynccontextmanager
async def open_store(kind: str, tmp_path: Path, **options: Any) -> AsyncIterator[Any]:
    """Any backend, opened the same way; `options` go to the backend (observer, clock, ...)."""
    options.setdefault("pan_key", PAN_KEY)
    if kind == "sqlite":
        async with SqliteStore.open(tmp_path / "journal.db", **options) as store:
            yield store
    elif kind == "postgres":
        url = await anyio.to_thread.run_sync(pg_support.schema_url, pg_support.database(), str(tmp_path))
        options.setdefault("instance_id", "test-instance")
        async with PostgresStore.open(url, **options) as store:
            yield store
    else:
        async with MemoryStore.open(**options) as store:
            yield store
