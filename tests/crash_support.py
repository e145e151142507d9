"""Support for the gateway crash test (tests/test_crash_recovery.py): the gateway as a real child
process, a host simulator that remembers which connection carried each reversal, terminal
simulators that behave like POS terminals across gateway restarts, and what each terminal saw.

Nothing here decides whether the gateway is right; it only drives it and writes down the facts the
test checks afterwards.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterable, Mapping
from contextlib import closing
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc
from ports import free_port as free_port  # re-exported: the tests import it from here

from gateway.config import load_config
from gateway.iso.message import Message
from gateway.iso.mti import is_reversal
from gateway.sim.host import HostReply, HostSimConfig, HostSimulator
from gateway.sim.host_rules import TxnKey
from gateway.sim.terminal import (  # _Answer: what the simulator's exchange step returns
    REASON_MAC_FAILURE,
    REASON_OTHER,
    REASON_TIMEOUT,
    Card,
    NotSignedIn,
    SignInError,
    TerminalConnectionError,
    TerminalSimulator,
    TxnResult,
    _Answer,
)

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
#: answers to a terminal's 0400 after which it is done with that reversal (as the simulator reads them)
REVERSAL_DONE_RCS = frozenset({"00", "12", "25"})


# --- the gateway's configuration and process --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GatewaySetup:
    terminal_port: int
    host_port: int
    zmk: bytes
    tmks: Mapping[str, bytes]
    merchant_id: str
    journal: Path
    pan_key: bytes
    host_timeout: float


def write_gateway_config(path: Path, setup: GatewaySetup) -> Path:
    """The TOML file `gateway serve --config` reads, in the lab's shape (see `gateway.lab.lab_config`):
    lab keys, a fixed terminal port, the journal in the test's directory, admin endpoint off, a SAF
    that retries quickly and does not give up within the test."""
    terminals = "".join(
        f'\n[[terminals]]\nterminal_id = "{tid}"\nmerchant_id = "{setup.merchant_id}"\ntmk = "{key.hex().upper()}"\n'
        for tid, key in setup.tmks.items()
    )
    path.write_text(
        f"""\
[terminal_side]
listen = "{LOOPBACK}:{setup.terminal_port}"
idle_timeout = 60.0
write_timeout = 2.0

[host]
address = "{LOOPBACK}:{setup.host_port}"
timeout = {setup.host_timeout}
echo_interval = 30.0
reconnect_min = 0.05
reconnect_max = 0.5

[security]
zmk = "{setup.zmk.hex().upper()}"

[store]
path = "{setup.journal}"
synchronous = "FULL"
pan_hash_key_hex = "{setup.pan_key.hex()}"

[reversal]
max_attempts = 50
backoff = [0.1, 0.2, 0.5]
poll_interval = 0.05
original_wait = {setup.host_timeout + 2.0}

[limits]
per_transaction = 1000000
per_day = 500000000

[admin]
listen = ""
{terminals}""",
        encoding="utf-8",
    )
    config = load_config(path, environ={})  # fail here, with the key named, not in the child
    assert config.admin.listen is None and config.terminal_side.listen.port == setup.terminal_port
    return path


def _child_environment() -> dict[str, str]:
    """The test's environment without GATEWAY_* overrides (the child must run the file as written)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return env


class GatewayProcess:
    """`python -m gateway.cli serve --config FILE` as a child process, one log file per lifetime.
    Signals go only to the pid this object started."""

    def __init__(self, config: Path, log_dir: Path, backend: str) -> None:
        self.command = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--backend", backend]
        self.log_dir = log_dir
        self.process: anyio.abc.Process | None = None
        self.logs: list[Path] = []
        self.kills = 0

    @property
    def lifetimes(self) -> int:
        return len(self.logs)

    async def start(self) -> None:
        assert self.process is None, "the previous gateway is still running"
        log_path = self.log_dir / f"gateway-{len(self.logs) + 1:03d}.log"
        self.logs.append(log_path)
        with open(log_path, "wb") as log:
            self.process = await anyio.open_process(
                self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=_child_environment(), cwd=self.log_dir,
            )

    def exited(self) -> int | None:
        return None if self.process is None else self.process.returncode

    async def kill(self) -> None:
        """SIGKILL: no clean-up of any kind runs in the gateway."""
        process = self._take()
        if process.returncode is None:
            os.kill(process.pid, signal.SIGKILL)
        code = await process.wait()
        await process.aclose()
        self.kills += 1
        assert code == -signal.SIGKILL, f"gateway exited by itself with {code} before the kill:\n{self.tail()}"

    async def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait: the graceful stop of `gateway serve`."""
        process = self._take()
        if process.returncode is None:
            os.kill(process.pid, signal.SIGTERM)
        try:
            with anyio.fail_after(timeout):
                code = await process.wait()
        except TimeoutError:
            os.kill(process.pid, signal.SIGKILL)
            await process.wait()
            raise AssertionError(f"gateway ignored SIGTERM for {timeout}s:\n{self.tail()}") from None
        finally:
            await process.aclose()
        return code

    async def stop_quietly(self) -> None:
        """Test clean-up: whatever happened, leave no child behind."""
        process, self.process = self.process, None
        if process is None:
            return
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                os.kill(process.pid, signal.SIGKILL)
            await process.wait()
            await process.aclose()

    def _take(self) -> anyio.abc.Process:
        process, self.process = self.process, None
        assert process is not None, "no gateway running"
        return process

    def tail(self, chars: int = 3000) -> str:
        if not self.logs or not self.logs[-1].exists():
            return "(no log)"
        return self.logs[-1].read_text(errors="replace")[-chars:]

    def tracebacks(self) -> list[str]:
        """Lifetime logs that contain a Python traceback (a crash the gateway did to itself)."""
        return [p.name for p in self.logs if p.exists() and "Traceback" in p.read_text(errors="replace")]


def open_work(journal: Path) -> tuple[int, int]:
    """(transactions still pending or reversal_queued, SAF entries still pending), read from the live
    journal through a read-only connection (WAL lets it read while the gateway writes)."""
    with closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5.0)) as conn:
        txns = conn.execute("SELECT count(*) FROM txn WHERE state IN ('pending', 'reversal_queued')").fetchone()[0]
        saf = conn.execute("SELECT count(*) FROM saf WHERE state = 'pending'").fetchone()[0]
    return int(txns), int(saf)


# --- the host: which connection carried each reversal -----------------------------------------------

_CONNECTION: ContextVar[int] = ContextVar("host_connection", default=0)


@dataclass(frozen=True, slots=True)
class ReversalSeen:
    connection: int  #: 1-based count of connections the host accepted (one per gateway lifetime)
    mti: str
    original: TxnKey
    rc: str | None


class RecordingHost(HostSimulator):
    """The host simulator, plus a note of every reversal it decided and the connection it came on:
    one gateway lifetime holds one host connection, so "at most one reversal per original per
    connection" is "a gateway never sends the same reversal twice unless it died in between"."""

    def __init__(self, config: HostSimConfig) -> None:
        super().__init__(config)
        self.connections = 0
        self.reversals_seen: list[ReversalSeen] = []

    async def _connection(self, stream: anyio.abc.SocketStream) -> None:
        # each connection is served by its own task, which also runs `handle` for its frames
        self.connections += 1
        _CONNECTION.set(self.connections)
        await super()._connection(stream)

    def handle(self, body: bytes) -> HostReply:
        reply = super().handle(body)
        request = reply.request
        if request is not None and is_reversal(request.mti) and "90" in request.fields:
            rc = reply.decision.rc if reply.decision is not None else None
            self.reversals_seen.append(
                ReversalSeen(_CONNECTION.get(), request.mti, TxnKey.from_field_90(request.fields["90"]), rc)
            )
        return reply


# --- terminals ---------------------------------------------------------------------------------------


class CrashTerminal(TerminalSimulator):
    """A terminal simulator that remembers the last request it put on the wire. When the gateway dies
    mid-purchase the simulator raises TerminalConnectionError and the request is lost with it; a POS
    keeps it to send the reversal, and so must the test."""

    last_request: Message | None = None

    async def _exchange(self, request: Message, body: bytes) -> _Answer | None:
        self.last_request = request
        return await super()._exchange(request, body)


@dataclass(slots=True)
class Purchase:
    """One purchase as its terminal saw it."""

    terminal_id: str
    batch: str
    stan: str
    amount: int
    pan: str = field(repr=False)  #: test card data, still kept out of reprs and failure messages
    rc: str | None  #: the answer's field 39; None: no answer (timeout, or the gateway died)
    approved: bool  #: rc 00 with a valid MAC and echo: the receipt is printed
    resign: bool = False  #: the answer asked for a new sign-in (77 after a gateway restart)


@dataclass(frozen=True, slots=True)
class OwedReversal:
    original: TxnResult
    reason: str  #: 98 no answer, A0 bad MAC on the approval, 06 other answer problems


@dataclass(slots=True)
class TerminalBook:
    """Everything the terminals saw, for the checks at the end."""

    purchases: dict[tuple[str, str, str], Purchase] = field(default_factory=dict)
    #: reversals the terminals still owe (no valid final answer yet), by terminal
    owed: dict[str, list[OwedReversal]] = field(default_factory=dict)
    #: (terminal, batch, stan) of the original → the gateway's final answer to the terminal's 0400
    terminal_reversals: dict[tuple[str, str, str], str] = field(default_factory=dict)
    sign_ins: int = 0
    connection_losses: int = 0
    refused_connects: int = 0
    resign_answers: int = 0  #: purchases or reversals answered 77 with the re-sign-in flag

    def record(self, terminal_id: str, request: Message, card: Card, result: TxnResult | None) -> Purchase:
        batch, stan = request.fields["60"][2:8], request.fields["11"]
        purchase = Purchase(
            terminal_id, batch, stan, int(request.fields["4"]), card.pan,
            rc=None if result is None else result.rc,
            approved=result is not None and result.approved,
            resign=result is not None and (result.rc == "77" or result.needs_sign_in),
        )
        self.purchases[(terminal_id, batch, stan)] = purchase
        return purchase


def _lost_purchase(term: CrashTerminal, card: Card) -> TxnResult:
    """What a POS keeps of a purchase whose connection died under it: the request, for its 0400."""
    request = term.last_request
    assert request is not None and request.mti == "0200", "the lost request must be the purchase"
    return TxnResult(kind="purchase", rc=None, stan=request.fields["11"], request=request,
                     amount=int(request.fields["4"]), batch=request.fields["60"][2:8], card=card, timed_out=True)


def _reversal_reason(result: TxnResult) -> str | None:
    """Why a POS reverses a purchase on its own (None: it does not)."""
    if result.timed_out or result.rc is None:
        return REASON_TIMEOUT
    if result.rc == "00" and result.mac_ok is False:
        return REASON_MAC_FAILURE
    if result.problems:
        return REASON_OTHER
    return None


class TerminalDriver:
    """One POS terminal buying in a loop against a gateway that keeps dying.

    - The connection drops with the gateway; the terminal reconnects (refused while it is down).
    - After reconnecting it signs in at once half of the time; otherwise it sends the next request
      with the old keys, gets 77 with the re-sign-in flag (sessions live in the gateway's memory) and
      signs in then, as the flag asks.
    - `reverses`: like a real POS, a purchase with no valid answer is reversed by the terminal (0400
      reason 98) and kept until the gateway gives a final answer, across reconnects and restarts. The
      simulator's own automatic reversal is off: the driver owns these reversals so none is lost when
      a connection dies in the middle of one.
    """

    def __init__(self, term: CrashTerminal, cards: Iterable[Card], book: TerminalBook, *, seed: int,
                 reverses: bool, retry: float = 0.02) -> None:
        self.term = term
        self.cards = list(cards)
        self.book = book
        self.rng = random.Random(seed)
        self.reverses = reverses
        self.retry = retry
        self.tid = term.ident.terminal_id
        self.session_ok = False  #: the keys are good for the current connection (as far as it knows)
        book.owed.setdefault(self.tid, [])

    @property
    def owed(self) -> list[OwedReversal]:
        return self.book.owed[self.tid]

    async def run(self, stop: anyio.Event) -> None:
        while not stop.is_set():
            if not await self._session():
                await anyio.sleep(self.retry)
                continue
            if self.owed and not await self._deliver_reversals():
                continue
            await self._purchase()

    async def settle_reversals(self, deadline: float) -> None:
        """After the load: keep at the owed reversals until all are answered (or the deadline)."""
        while self.owed and anyio.current_time() < deadline:
            if await self._session():
                await self._deliver_reversals()
            if self.owed:
                await anyio.sleep(self.retry)

    async def close(self) -> None:
        await self.term.aclose()

    async def _session(self) -> bool:
        term = self.term
        if not term.connected:
            self.session_ok = False
            try:
                await term.connect()
            except TerminalConnectionError:
                self.book.refused_connects += 1
                return False
            # half of the time carry on with the old keys: the gateway answers 77 if it forgot them
            self.session_ok = term.signed_in and self.rng.random() < 0.5
        return self.session_ok or await self._sign_in()

    async def _sign_in(self) -> bool:
        try:
            await self.term.sign_in()
        except (TerminalConnectionError, SignInError):
            await self._lost()
            return False
        self.book.sign_ins += 1
        self.session_ok = True
        return True

    async def _lost(self) -> None:
        self.book.connection_losses += 1
        self.session_ok = False
        await self.term.aclose()

    async def _purchase(self) -> None:
        card = self.rng.choice(self.cards)
        amount = self.rng.randrange(100, 5_000)
        self.term.last_request = None
        try:
            result = await self.term.purchase(amount, card)
        except TerminalConnectionError:
            if self.term.last_request is None:  # never reached the wire
                await self._lost()
                return
            lost = _lost_purchase(self.term, card)
            self.book.record(self.tid, lost.request, card, None)
            if self.reverses:
                self.owed.append(OwedReversal(lost, REASON_TIMEOUT))
            await self._lost()
            return
        except NotSignedIn:
            self.session_ok = False
            return
        purchase = self.book.record(self.tid, result.request, card, result)
        if purchase.resign:
            self.book.resign_answers += 1
            self.session_ok = False
            await self._sign_in()
            return
        reason = _reversal_reason(result)
        if self.reverses and reason is not None:
            self.owed.append(OwedReversal(result, reason))

    async def _deliver_reversals(self) -> bool:
        """Send each owed reversal once; True when none is left."""
        for owed in list(self.owed):
            original = owed.original
            try:
                answer = await self.term.reversal(original, owed.reason)
            except TerminalConnectionError:
                await self._lost()
                return False
            finally:
                self.term.pending_reversals.clear()  # the driver keeps them, not the simulator
            if answer.rc == "77" or answer.needs_sign_in:
                self.book.resign_answers += 1
                self.session_ok = False
                await self._sign_in()
                return False
            if answer.rc in REVERSAL_DONE_RCS and not answer.problems and answer.mac_ok is not False:
                self.owed.remove(owed)
                key = (self.tid, original.request.fields["60"][2:8], original.stan)
                self.book.terminal_reversals[key] = answer.rc
        return not self.owed

