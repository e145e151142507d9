"""A real PostgreSQL server for the tests (no tests here).

The server is the one at `GATEWAY_TEST_POSTGRES_URL` (default: 127.0.0.1:5432, user postgres, trust
auth, as on the project's machines and in CI). Other test runs use the same server at the same time,
so a test session creates its own uniquely named database and drops it at the end (the `pg_database`
fixture in conftest.py); each test gets its own schema in it (`schema_url`), so tests never see each
other's rows and may reopen "their" journal.

No server reachable: the PostgreSQL tests are skipped with the reason, unless
`GATEWAY_REQUIRE_POSTGRES` is set (CI sets it), where a missing server fails them loudly.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import secrets
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest

ADMIN_URL = os.environ.get("GATEWAY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REQUIRE_ENV = "GATEWAY_REQUIRE_POSTGRES"


def required() -> bool:
    return os.environ.get(REQUIRE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def create_database() -> str:
    """A new database of our own on the server; its URL. Skips (or fails, when required) without one."""
    try:
        admin = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        reason = f"no PostgreSQL server at {ADMIN_URL} ({type(exc).__name__}: {str(exc).strip()[:200]})"
        if required():
            pytest.fail(f"{reason}, and {REQUIRE_ENV} is set", pytrace=False)
        pytest.skip(reason)
    name = f"gw_test_{os.getpid()}_{secrets.token_hex(4)}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return with_database(ADMIN_URL, name)


def drop_database(url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def schema_url(database_url: str, key: str) -> str:
    """The URL of a schema of its own (created if needed) for `key` (e.g. a test's tmp_path): every
    connection opened with it works in that schema only."""
    schema = "t_" + hashlib.sha256(key.encode()).hexdigest()[:16]
    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    parts = urlsplit(database_url)
    option = quote(f"-csearch_path={schema}", safe="")
    query = f"{parts.query}&options={option}" if parts.query else f"options={option}"
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


#: the session's database, set by the `pg_database` fixture (conftest.py)
DATABASE: str | None = None


def database() -> str:
    """The session's database; created here when a test reaches PostgreSQL without the `pg_database`
    fixture (e.g. parametrised over BACKENDS directly), and then dropped when the process exits."""
    global DATABASE
    if DATABASE is None:
        DATABASE = create_database()
        atexit.register(drop_database, DATABASE)
    return DATABASE
