"""Shared test fixtures. Async tests run on both anyio backends: asyncio (with uvloop) and trio."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


# --- secret scan (issue 16 item 3): what the gateway logs and journals never holds a card secret -------

#: modules whose tests drive whole flows or faults: each is scanned (others opt in with the marker)
SECRET_SCAN_MODULES = frozenset({
    "test_crash_recovery", "test_store_crash", "test_journal_faults", "test_journal_fault_steps",
    "test_graceful_shutdown", "test_e2e_failover",
})
#: file names in a test's directory that are a journal (SQLite and its WAL) or a captured gateway log
_JOURNAL_SUFFIXES = (".db", ".db-wal", ".db-journal", ".sqlite", ".sqlite-wal")
_LOG_SUFFIXES = (".log", ".out", ".err")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "secret_scan: scan the test's gateway logs and journal for card secrets")


def _scanned(request: pytest.FixtureRequest) -> bool:
    name = request.module.__name__.rpartition(".")[2]
    return (name.startswith("test_e2e_") or name.startswith("test_promise_") or name in SECRET_SCAN_MODULES
            or request.node.get_closest_marker("secret_scan") is not None)


class _Secrets:
    """The card secrets and keys a test used, learnt as it goes: each card a simulated terminal reads
    (PAN, track 2), each PIN block it builds (clear and enciphered), each key generated in this process
    (ZMK, TMKs, working keys: all come from `des.set_odd_parity`)."""

    def __init__(self) -> None:
        self.texts: dict[str, str] = {}  #: searched text → what it is (never the secret itself)
        self.raw: dict[bytes, str] = {}  #: searched bytes (a journal file) → what it is

    def card(self, pan: str, track2: str) -> None:
        masked = f"{pan[:6]}…{pan[-4:]}"
        self.texts.setdefault(pan, f"the clear PAN of card {masked}")
        self.texts.setdefault(track2, f"track 2 of card {masked}")
        self.raw.setdefault(pan.encode(), f"the clear PAN of card {masked}")

    def block(self, data: bytes, what: str) -> None:
        for text in (data.hex().upper(), data.hex()):
            self.texts.setdefault(text, what)
        self.raw.setdefault(bytes(data), what)

    def find(self, text: str) -> list[str]:
        return sorted({what for secret, what in self.texts.items() if secret in text})

    def find_raw(self, data: bytes) -> list[str]:
        found = {what for secret, what in self.raw.items() if secret in data}
        found.update(what for secret, what in self.texts.items() if secret.encode() in data)
        return sorted(found)


class _Collect(logging.Handler):
    """Every record of every logger, formatted as a handler would (message, traceback, extras)."""

    _PLAIN = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a broken format string is the test's business, not this scan's
            text = f"{record.msg!r} {record.args!r}"
        if record.exc_info and record.exc_info[1] is not None:
            text += "\n" + "".join(traceback.format_exception(record.exc_info[1]))
        extras = {k: v for k, v in record.__dict__.items() if k not in self._PLAIN}
        if extras:
            text += " " + repr(extras)
        self.lines.append((record.name, text))


@pytest.fixture(autouse=True)
def _secret_scan(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Issue 16 item 3: for every e2e flow and fault test, the gateway's log output (every logger at
    DEBUG in this process, the output of the gateway child processes the test started, log files in its
    directory) and its journal files hold none of the card data and keys the test used; the failure
    names the secret's kind and where it was found, never the secret."""
    if not _scanned(request):
        yield
        return
    import fault_support

    from gateway.security import des, pin
    from gateway.sim import terminal

    found = _Secrets()
    real_parity, real_block, real_input = des.set_odd_parity, pin.make_pin_block, terminal.TerminalSimulator._card_input

    def parity(key: bytes) -> bytes:
        out = real_parity(key)
        found.block(out, f"a {len(out)}-byte DES key generated in the test")
        return out

    def make_block(pin_text: str, pan: str | None, fmt: int = 0) -> bytes:
        out = real_block(pin_text, pan, fmt)
        found.block(out, "a clear PIN block")
        return out

    def card_input(self: Any, card: Any, pin_text: str | None, entry: Any) -> dict[str, Any]:
        data: dict[str, Any] = real_input(self, card, pin_text, entry)
        found.card(card.pan, card.track2)
        if data.get("pin_block"):
            found.block(bytes.fromhex(data["pin_block"]), "an enciphered PIN block")
        return data

    monkeypatch.setattr(des, "set_odd_parity", parity)
    monkeypatch.setattr(pin, "make_pin_block", make_block)
    monkeypatch.setattr(terminal.TerminalSimulator, "_card_input", card_input)
    children: list[Any] = []
    real_init = fault_support.PipedGateway.__init__

    def piped_init(self: Any, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        children.append(self)

    monkeypatch.setattr(fault_support.PipedGateway, "__init__", piped_init)
    directory = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    collect = _Collect()
    root = logging.getLogger()
    level = root.level
    root.addHandler(collect)
    root.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        root.removeHandler(collect)
        root.setLevel(level)
    problems: list[str] = []
    # only the gateway's own loggers: the simulated terminals and host hold the card data by design
    text = "\n".join(line for name, line in collect.lines if not name.startswith("gateway.sim"))
    problems += [f"{what}, in this process's log output" for what in found.find(text)]
    for n, child in enumerate(children, 1):
        problems += [f"{what}, in the output of gateway child {n}" for what in found.find(child.text)]
    if directory is not None:
        for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
            if path.name.endswith(_JOURNAL_SUFFIXES) or path.name.endswith(_LOG_SUFFIXES):
                problems += [f"{what}, in {path.relative_to(directory)}" for what in found.find_raw(path.read_bytes())]
    if problems:
        pytest.fail("card secrets where they must never be:\n  " + "\n  ".join(problems), pytrace=False)
