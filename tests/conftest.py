"""Shared test fixtures. Async tests run on both anyio backends: asyncio (with uvloop) and trio."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pg_support
import pytest


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"use_uvloop": True}), id="asyncio"),
        pytest.param(("trio", {}), id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, object]]:
    return request.param


@pytest.fixture(autouse=True)
def _private_terminal_state(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated terminals keep their batch in $XDG_STATE_HOME (gateway.sim.terminal_state): tests keep
    theirs in a directory of their own, never in the user's home."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A PostgreSQL database of this test session's own, dropped at its end (see tests/pg_support.py)."""
    if pg_support.DATABASE is not None:  # made already by a test that needed it first (dropped at exit)
        yield pg_support.DATABASE
        return
    url = pg_support.create_database()
    pg_support.DATABASE = url
    try:
        yield url
    finally:
        pg_support.DATABASE = None
        pg_support.drop_database(url)


@pytest.fixture
def pg_url(pg_database: str, tmp_path: Path) -> str:
    """A schema of this test's own in the session's database."""
    return pg_support.schema_url(pg_database, str(tmp_path))
