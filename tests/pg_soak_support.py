"""Support for the multi-instance crash soak (tests/test_pg_crash_soak.py): several `gateway serve`
processes on one PostgreSQL journal, each with its own host link, terminals that hop between them,
and the facts the checks need (what the host decided, when and on which link; what each instance had
open when it was killed).

Nothing here decides whether the gateway is right; it drives it and writes down what happened.

One host simulator per instance slot, all booking into ONE ledger (`HostRules` shared): a real host
keeps zone keys per link (each instance signs on and exchanges its own ZPK/ZAK), while the money and
the ledger are the host's one set of books. The simulator keeps one set of zone keys per simulator,
so one simulator per link is how several instances can be connected at once without their MACs
failing each other's key exchange.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc
import psycopg
from crash_support import (
    LOOPBACK,
    CrashTerminal,
    GatewayProcess,
    GatewaySetup,
    ReversalSeen,
    TerminalBook,
    TerminalDriver,
    write_gateway_config,
)

from gateway.config import load_config
from gateway.iso.message import Message
from gateway.iso.mti import is_reversal
from gateway.sim.host import HostReply, HostSimConfig, HostSimulator
from gateway.sim.host_rules import HostRules, TxnKey
from gateway.sim.terminal import Card, _Answer

# --- the host: one ledger, one link per instance --------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReversalDecided:
    """A reversal message the host decided: when, on which instance's link, and which message it was."""

    at: float  #: time.monotonic() the answer leaves (the decision, plus the delay of a fault)
    slot: int  #: the instance slot whose link carried it
    connection: int  #: unique across all links (one per instance lifetime)
    mti: str
    original: TxnKey
    identity: tuple[str, str]  #: the reversal's own STAN and field 7: a 0401 repeat keeps them
    rc: str | None


@dataclass(slots=True)
class HostBooks:
    """What all the links share: the ledger and balances, and the record of every reversal decided."""

    rules: HostRules
    decided: list[ReversalDecided] = field(default_factory=list)
    #: the same facts in the single-instance crash test's shape, for its per-connection check
    reversals_seen: list[ReversalSeen] = field(default_factory=list)
    connections: itertools.count[int] = field(default_factory=lambda: itertools.count(1))


_LINK: ContextVar[int] = ContextVar("soak_host_connection", default=0)


class LinkHost(HostSimulator):
    """The host as one instance slot's link sees it: its own zone keys, the shared books."""

    def __init__(self, config: HostSimConfig, books: HostBooks, slot: int) -> None:
        super().__init__(config)
        self.rules = books.rules  # one ledger for every link
        self.books = books
        self.slot = slot

    async def _connection(self, stream: anyio.abc.SocketStream) -> None:
        # each connection is served by its own task, which also runs `handle` for its frames
        _LINK.set(next(self.books.connections))
        await super()._connection(stream)

    def handle(self, body: bytes) -> HostReply:
        reply = super().handle(body)
        request = reply.request
        if request is not None and is_reversal(request.mti) and "90" in request.fields:
            rc = reply.decision.rc if reply.decision is not None else None
            original = TxnKey.from_field_90(request.fields["90"])
            connection = _LINK.get()
            self.books.decided.append(ReversalDecided(
                time.monotonic() + reply.delay, self.slot, connection, request.mti, original,
                (request.fields.get("11", ""), request.fields.get("7", "")), rc))
            self.books.reversals_seen.append(ReversalSeen(connection, request.mti, original, rc))
        return reply


# --- the instances ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PgSettings:
    """The [store] lines that put an instance on the shared journal."""

    url: str
    lease: float
    heartbeat: float
    orphan_after: float
    poll: float  #: the SAF sender's poll interval (each poll of each instance is a claim query)


def write_instance_config(path: Path, setup: GatewaySetup, instance_id: str, pg: PgSettings) -> Path:
    """The crash test's configuration (gateway.toml of one instance), with the journal on PostgreSQL
    under `instance_id`. The TOML URL is a basic string: the test URL holds no quote or backslash."""
    write_gateway_config(path, setup)
    lines = (f'url = "{pg.url}"\ninstance_id = "{instance_id}"\nsaf_lease = {pg.lease}\n'
             f"heartbeat_interval = {pg.heartbeat}\norphan_after = {pg.orphan_after}\n")
    text = path.read_text(encoding="utf-8")
    assert text.count("[store]\n") == 1 and text.count("poll_interval = 0.05\n") == 1
    text = text.replace("[store]\n", "[store]\n" + lines)
    text = text.replace("poll_interval = 0.05\n", f"poll_interval = {pg.poll}\n")
    path.write_text(text, encoding="utf-8")
    config = load_config(path, environ={})
    assert config.store.url == pg.url and config.store.instance_id == instance_id
    assert config.reversal.poll_interval == pg.poll
    return path


@dataclass(eq=False)
class Instance:
    """One instance slot: a fixed instance id, terminal port and host link, one process at a time."""

    slot: int
    instance_id: str
    terminal_port: int
    host: LinkHost
    process: GatewayProcess
    up: bool = False  #: signed on to the host and taking terminals
    stalled: bool = False  #: SIGSTOPped right now (still "up": its listener queues connections)
    starts: list[float] = field(default_factory=list)  #: seconds from spawn to signed on, per lifetime

    async def start(self, bound: float) -> None:
        """Start the process and wait until it has signed on and exchanged both zone keys."""
        exchanged = self.host.stats.key_exchanges
        began = time.monotonic()
        await self.process.start()
        with anyio.fail_after(bound):
            while self.host.stats.key_exchanges < exchanged + 2:
                assert self.process.exited() is None, f"{self.instance_id} died at start:\n{self.process.tail()}"
                await anyio.sleep(0.01)
        self.starts.append(time.monotonic() - began)
        self.up = True

    async def kill(self) -> None:
        self.up = False
        await self.process.kill()

    async def stall(self, seconds: float) -> bool:
        """SIGSTOP the running process for `seconds`, then SIGCONT it (unless it was killed meanwhile):
        a stall past its lease and heartbeat. False when no process was running."""
        proc = self.process.process
        if proc is None or proc.returncode is not None:
            return False
        os.kill(proc.pid, signal.SIGSTOP)
        self.stalled = True
        try:
            await anyio.sleep(seconds)
        finally:
            self.stalled = False
            if proc.returncode is None:  # not killed (and reaped) meanwhile: still our child
                os.kill(proc.pid, signal.SIGCONT)
        return True


# --- what a killed instance left open ----------------------------------------------------------------

#: its SAF entries (leased by it, or queued by it and not leased yet) and its pending requests that
#: reached the host link (have a host STAN), as the field-90 parts of their original
_LEFT_OPEN = """
SELECT t.host_mti, t.host_stan, t.transmission_datetime, 'reversal' FROM saf s JOIN txn t ON t.txn_id = s.txn_id
 WHERE s.state = 'pending' AND (s.lease_owner = %(id)s OR (s.lease_owner IS NULL AND t.owner = %(id)s))
   AND t.host_stan IS NOT NULL
UNION ALL
SELECT host_mti, host_stan, transmission_datetime, 'pending' FROM txn
 WHERE state = 'pending' AND owner = %(id)s AND host_stan IS NOT NULL
"""


@dataclass(frozen=True, slots=True)
class LeftOpen:
    original: TxnKey
    what: str  #: "reversal" (a queued or in-flight SAF entry) or "pending" (a request with no outcome)


def left_open(url: str, instance_id: str, acquirer: str) -> list[LeftOpen]:
    """Read right after the kill (a blocking call: run it in a thread)."""
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(_LEFT_OPEN, {"id": instance_id}).fetchall()
    return [LeftOpen(TxnKey(mti or "", stan, stamp or "", acquirer), what) for mti, stan, stamp, what in rows]


def open_work(url: str) -> tuple[int, int]:
    """(transactions pending or reversal_queued, SAF entries pending) in the shared journal."""
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        txns = conn.execute("SELECT count(*) FROM txn WHERE state IN ('pending', 'reversal_queued')").fetchone()
        saf = conn.execute("SELECT count(*) FROM saf WHERE state = 'pending'").fetchone()
    assert txns is not None and saf is not None
    return int(txns[0]), int(saf[0])


@dataclass(frozen=True, slots=True)
class Kill:
    slot: int
    at: float  #: time.monotonic() right after SIGKILL returned
    left: list[LeftOpen]


# --- terminals that land on any instance -----------------------------------------------------------


class HoppingTerminal(CrashTerminal):
    """Remembers the answer code of its last exchange (the driver reacts to A0)."""

    last_rc: str | None = None

    async def _exchange(self, request: Message, body: bytes) -> _Answer | None:
        self.last_rc = None
        answer = await super()._exchange(request, body)
        self.last_rc = None if answer is None else answer.message.fields.get("39")
        return answer


class HoppingDriver(TerminalDriver):
    """The crash test's POS terminal, in front of a TCP load balancer: every new connection goes to a
    random live instance, and after a purchase it hangs up now and then (CUP terminals often use a
    connection per transaction), so consecutive requests of one terminal land on different instances.
    On an instance that has no session for it the terminal meets 77 and signs in again (or signs in
    at once after reconnecting, half of the time), unless the instances share sessions. Back on an
    instance that still holds an OLDER session of it (it signed in elsewhere since), its MAC fails
    there: A0, and the terminal signs in again, as a POS does after a MAC failure."""

    term: HoppingTerminal

    def __init__(self, term: HoppingTerminal, cards: list[Card], book: TerminalBook, instances: list[Instance], *,
                 seed: int, reverses: bool, hop: float) -> None:
        super().__init__(term, cards, book, seed=seed, reverses=reverses)
        self.instances = instances
        self.hop = hop
        self.hops = 0
        self.mac_refusals = 0  #: A0 answers (the instance's keys for the terminal were not its current ones)

    async def _session(self) -> bool:
        if not self.term.connected:
            live = [i for i in self.instances if i.up]
            if not live:
                return False
            self.term.port = self.rng.choice(live).terminal_port
        return await super()._session()

    async def _purchase(self) -> None:
        await super()._purchase()
        if await self._rekeyed():
            return
        if self.term.connected and self.rng.random() < self.hop:
            self.hops += 1
            await self.term.aclose()

    async def _deliver_reversals(self) -> bool:
        done = await super()._deliver_reversals()
        await self._rekeyed()
        return done

    async def _rekeyed(self) -> bool:
        """After an A0 answer: sign in again (True when it did)."""
        if self.term.last_rc != "A0" or not self.term.connected:
            return False
        self.mac_refusals += 1
        self.session_ok = False
        await self._sign_in()
        return True


def make_driver(tid: str, key: bytes, merchant_id: str, cards: list[Card], book: TerminalBook,
                instances: list[Instance], *, seed: int, reverses: bool, timeout: float,
                hop: float) -> HoppingDriver:
    term = HoppingTerminal(LOOPBACK, instances[0].terminal_port, tid, merchant_id, key, cards=cards, timeout=timeout,
                         auto_reverse=False)
    return HoppingDriver(term, cards, book, instances, seed=seed, reverses=reverses, hop=hop)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; the list must not be empty."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def pick_victim(instances: list[Instance], rng: random.Random, *, stall: bool = False) -> Instance | None:
    """A running instance to kill (or, `stall`, to stall: not one stalled already), only while another
    one runs, not stalled, to take its work over."""
    live = [i for i in instances if i.up and not (stall and i.stalled)]
    victim = rng.choice(live) if live else None
    if victim is None or not any(i.up and not i.stalled for i in instances if i is not victim):
        return None
    return victim
