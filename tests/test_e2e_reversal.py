"""End-to-end proof of issue 5, "never charged without a receipt".

Real host simulator, gateway and terminals on loopback sockets, a real SQLite journal, fresh keys, and
faults scripted at the host. Each test drives one way a purchase can go wrong between the card and the
issuer, waits (always with a bound) until the journal reaches a final state, and then reads BOTH books:

- the gateway's journal: final state of the transaction, why it was reversed and by whom, SAF entries,
  late answers;
- the simulated host: its ledger (approved / reversed per original), its reversal counter and the
  card balances.

`assert_no_charge_without_receipt` states the promise once for all tests: every debit still standing
at the host belongs to a purchase whose approval reached the terminal (a receipt), every receipt is a
standing debit, each card's balance is its opening balance minus exactly those purchases, and nothing
in the journal is left open.

The gateway waits `HOST_TIMEOUT` (0.5 s) for the host and the SAF schedules are short, so even the
slow paths cost about a second.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.abc
import pytest

from gateway.config import ReversalConfig, StoreConfig
from gateway.iso.build import TerminalIdent, cup
from gateway.iso.codec import Codec
from gateway.iso.framing import CupEnvelope, Frame, make_framer
from gateway.iso.message import Message, mask_pan
from gateway.iso.spec import load_dialect
from gateway.iso.stan import StanAllocator
from gateway.lab import (
    CARD_CUP,
    CARD_CUP_2,
    LAB_ACCOUNTS,
    LAB_CARDS,
    LOOPBACK,
    MERCHANT_ID,
    Lab,
    lab_config,
    open_lab,
    terminal_ids,
)
from gateway.security.algorithms import cup_mac, generate_key, macs_equal, parse_key_block
from gateway.security.keys import KeyUsage
from gateway.serve import RunningGateway, run_gateway
from gateway.sim.host import HostSimConfig, HostSimulator
from gateway.sim.host_rules import Fault, HostRulesConfig, LedgerEntry, TxnKey
from gateway.sim.terminal import Card, TerminalSimulator, TxnResult
from gateway.store import (
    LateAnswer,
    ReversalInitiator,
    SafState,
    SqliteStore,
    TxnKind,
    TxnRecord,
    TxnRequest,
    TxnState,
)
from gateway.store.postgres import PostgresStore

pytestmark = pytest.mark.anyio

T = TypeVar("T")

#: how long the gateway waits for the host in these tests
HOST_TIMEOUT = 0.5
#: upper bound of any single wait for a state to be reached
BOUND = 10.0
#: a SAF schedule fast enough for tests
FAST_SAF = ReversalConfig(max_attempts=5, backoff=(0.2, 0.5, 1.0), poll_interval=0.05,
                          original_wait=HOST_TIMEOUT + 2.0)
OPENING = {account.id: account.balance for account in LAB_ACCOUNTS}
#: states after which nothing more happens to a transaction by itself
FINAL_STATES = frozenset({
    TxnState.COMPLETED, TxnState.DECLINED, TxnState.REVERSED, TxnState.REVERSAL_FAILED, TxnState.REVERSAL_DROPPED,
})

#: (terminal id, batch, terminal STAN): a purchase whose approval reached the terminal
Receipt = tuple[str, str, str]


# --- the journal: SQLite (the default) or PostgreSQL (the `journal` fixture) ---------------------


@pytest.fixture(params=["sqlite", "postgres"])
def journal(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """`open_lab` overrides that put the gateway's journal on SQLite (none) or on the real PostgreSQL
    server, in a schema of this test's own (`[store] url`)."""
    if request.param == "sqlite":
        return {}
    url = request.getfixturevalue("pg_url")
    return {"store": StoreConfig(path=tmp_path / "journal.db", url=url, instance_id="e2e-gateway",
                                 pan_hash_key_hex="11" * 32)}


def open_journal(config: StoreConfig) -> AbstractAsyncContextManager[Any]:
    """The gateway's journal opened directly, as that gateway instance (the same instance id)."""
    pan_key = bytes.fromhex(config.pan_hash_key_hex or "")
    if config.url is not None:
        return PostgresStore.open(config.url, instance_id=config.instance_id, pan_key=pan_key)
    return SqliteStore.open(config.path, pan_key=pan_key)


# --- waiting, reading both books -----------------------------------------------------------------


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str, bound: float = BOUND) -> T:
    """Poll `probe` until it returns something truthy; fail the test (naming `what`) after `bound` s."""
    last: T | None = None
    try:
        with anyio.fail_after(bound):
            while True:
                last = await probe()
                if last:
                    return last
                await anyio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"{what}: not reached within {bound}s (last seen: {last!r})")


async def only_txn(lab: Lab) -> TxnRecord:
    rows = await lab.gateway.store.list_transactions()
    assert len(rows) == 1, rows
    return rows[0]


async def settled(lab: Lab, txn_id: int) -> TxnRecord:
    """The transaction once it reached a final state (reversed, parked, completed, declined)."""

    async def probe() -> TxnRecord | None:
        rec = await lab.gateway.store.get(txn_id)
        return rec if rec is not None and rec.state in FINAL_STATES else None

    return await eventually(probe, f"txn {txn_id} in a final state")


async def late_answers_of(lab: Lab, txn_id: int) -> list[LateAnswer]:
    return await eventually(lambda: lab.gateway.store.late_answers(txn_id=txn_id), f"late answer of txn {txn_id}")


def txn_key(rec: TxnRecord, acquirer_id: str) -> TxnKey:
    """How the host names the original a journal row sent upstream (what field 90 carries)."""
    return TxnKey(rec.host_mti or "", rec.host_stan or "", rec.transmission_datetime or "", acquirer_id.zfill(11))


def host_key(lab: Lab, rec: TxnRecord) -> TxnKey:
    return txn_key(rec, lab.config.host.acquirer_id)


def host_entry(lab: Lab, rec: TxnRecord) -> LedgerEntry:
    entry = lab.host.ledger.get(host_key(lab, rec))
    assert entry is not None, f"the host never booked txn {rec.txn_id}"
    return entry


def receipt(result: TxnResult) -> Receipt:
    return result.request.fields["41"], result.batch, result.stan


def counter(lab: Lab, name: str) -> float:
    return lab.gateway.metrics.registry.get_sample_value(f"gateway_{name}_total") or 0.0


def messages(lab: Lab, direction: str, mti: str) -> float:
    """Messages the gateway counted in one direction with one MTI, whatever their response code."""
    total = 0.0
    for metric in lab.gateway.metrics.registry.collect():
        for sample in metric.samples:
            if (sample.name == "gateway_messages_total" and sample.labels.get("direction") == direction
                    and sample.labels.get("mti") == mti):
                total += sample.value
    return total


async def assert_no_charge_without_receipt(lab: Lab, receipts: Iterable[Receipt] = ()) -> None:
    """Issue 5 across both books (see the module docstring)."""
    store = lab.gateway.store

    async def all_final() -> bool:
        return all(r.state in FINAL_STATES for r in await store.list_transactions(limit=1000))

    # a delivered approval is journalled `completed` just after it was written to the terminal
    await eventually(all_final, "every journal row in a final state")
    expected: dict[TxnKey, int] = {}
    for terminal_id, batch, stan in receipts:
        rec = await store.find_original(terminal_id, batch, stan)
        assert rec is not None and rec.state is TxnState.COMPLETED, (terminal_id, stan, rec)
        expected[host_key(lab, rec)] = rec.amount
    standing = {key: e.amount for key, e in lab.host.ledger.items() if e.approved and e.delta < 0 and not e.reversed}
    assert standing == expected, "a debit stands at the host without a receipt (or a receipt without a debit)"
    spent: Counter[str] = Counter()
    for key, amount in expected.items():
        spent[lab.host.ledger[key].account or ""] += amount
    for account, opening in OPENING.items():
        assert lab.host.balance(account) == opening - spent[account], account


def assert_reversed(rec: TxnRecord, *, reason: str, was: TxnState,
                    by: ReversalInitiator = ReversalInitiator.GATEWAY) -> None:
    assert rec.state is TxnState.REVERSED, rec
    assert rec.reversed_from is was, rec
    assert rec.reversal_reason == reason, rec
    assert rec.reversal_initiator is by, rec
    assert rec.reversal_rc == "00", rec


# --- a bare terminal ---------------------------------------------------------------------------------


class RawTerminal:
    """A bare CUP POS client for what `TerminalSimulator` will not do on purpose: hang up right after
    sending, pipeline a reversal behind its in-flight original, send the same 0400 twice or a 0401.
    It signs in for real (working keys from field 62 under the terminal's TMK) and MACs like a terminal.
    """

    def __init__(self, lab: Lab, terminal_id: str | None = None) -> None:
        self.terminal_id = terminal_id or lab.config.terminals[0].terminal_id
        self.ident = TerminalIdent(self.terminal_id, MERCHANT_ID)
        self.tmk = lab.tmks[self.terminal_id]
        self.port = lab.gateway.terminal_port
        self.codec = Codec(load_dialect("cup-pos"))
        self.framer = make_framer("cup", envelope=CupEnvelope.from_hex("6000010000", "603100310000"))
        self.decoder = self.framer.decoder()
        self.frames: deque[Frame] = deque()
        self.stans = StanAllocator()
        self.batch = "000001"
        self.mak: bytes | None = None
        self.stream: anyio.abc.ByteStream | None = None

    async def __aenter__(self) -> RawTerminal:
        with anyio.fail_after(BOUND):
            self.stream = await anyio.connect_tcp(LOOPBACK, self.port)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.hang_up()

    async def hang_up(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            await stream.aclose()

    def next_stan(self) -> str:
        return self.stans.format(self.stans.next())

    async def send(self, msg: Message) -> None:
        assert self.stream is not None
        body = self.codec.encode(msg)
        if "64" in msg.fields:
            assert self.mak is not None, "sign in first"
            body = body[:-8] + cup_mac(self.mak, body[:-8])
        await self.stream.send(self.framer.encode(body))

    async def receive(self) -> Message:
        """The next answer; an approval's MAC is checked the way a terminal checks it."""
        assert self.stream is not None
        with anyio.fail_after(BOUND):
            while not self.frames:
                self.frames.extend(self.decoder.feed(await self.stream.receive()))
        body = self.frames.popleft().body
        msg = self.codec.decode(body)
        if msg.fields.get("39") == "00" and "64" in msg.fields and self.mak is not None:
            assert macs_equal(cup_mac(self.mak, body[:-8]), body[-8:]), f"bad MAC on the {msg.mti} approval"
        return msg

    async def exchange(self, msg: Message) -> Message:
        await self.send(msg)
        return await self.receive()

    async def sign_in(self) -> None:
        answer = await self.exchange(cup.sign_in(self.ident, self.next_stan(), self.batch, "004"))
        assert answer.fields.get("39") == "00", answer
        keys = parse_key_block(self.tmk, bytes.fromhex(answer.fields["62"]), "004")
        self.mak = keys[KeyUsage.MAK]
        self.batch = answer.fields["60"][2:8]

    def purchase(self, amount: int, card: Card) -> Message:
        """A keyed-in purchase without PIN (entry mode 012), not yet sent."""
        return cup.purchase(self.ident, self.next_stan(), self.batch, amount, pan=card.pan, expiry=card.expiry,
                            entry_mode="012")

    @staticmethod
    def reversal(original: Message, reason: str, *, repeat: bool = False) -> Message:
        """The terminal's 0400 for `original` (same STAN and 60); `repeat`: the same as a 0401."""
        msg = cup.reversal(original, reason)
        return Message("0401", dict(msg.fields)) if repeat else msg


# --- 1..5: the host does not answer in time, or the terminal is gone -------------------------------


async def test_host_delay_past_the_timeout_gives_98_and_the_charge_is_reversed(tmp_path, journal):
    """The host books the purchase but answers after the gateway stopped waiting: the terminal gets 98,
    the gateway reverses on its own (reason 98), the late approval is journalled and never forwarded."""
    async with open_lab(tmp_path, host_timeout=HOST_TIMEOUT, **journal) as lab:
        lab.host.add_fault(Fault("delay", seconds=HOST_TIMEOUT + 0.3, pan=CARD_CUP.pan, mti=("0200",), limit=1))
        term = lab.terminal(timeout=5.0)
        await term.connect()
        await term.sign_in()

        result = await term.purchase(1_500, CARD_CUP)
        assert result.rc == "98" and not result.approved
        assert result.reversal is None  # an answered request: the terminal has nothing to reverse

        rec = await settled(lab, (await only_txn(lab)).txn_id)
        assert_reversed(rec, reason="98", was=TxnState.TIMED_OUT)
        late = await late_answers_of(lab, rec.txn_id)
        assert [(a.rc, a.host_stan) for a in late] == [("00", rec.host_stan)]
        after = await lab.gateway.store.get(rec.txn_id)
        assert after is not None and after.state is TxnState.REVERSED and after.late_rc == "00"  # unchanged

        # one answer only: the gateway wrote a single 0210, and nothing else is waiting on the socket
        echo = await term.echo()
        assert echo.rc == "00" and term.late_answers == []
        assert messages(lab, "terminal_out", "0210") == 1

        entry = host_entry(lab, rec)
        assert entry.approved and entry.reversed
        assert lab.host.reversal_count(entry.key) == 1
        await assert_no_charge_without_receipt(lab)


async def test_host_silence_after_debit_gives_98_and_the_charge_is_reversed(tmp_path):
    """The host takes the money and never answers (drop after processing)."""
    async with open_lab(tmp_path, host_timeout=HOST_TIMEOUT) as lab:
        lab.host.add_fault(Fault("drop", pan=CARD_CUP.pan, mti=("0200",), limit=1))
        term = lab.terminal(timeout=5.0)
        await term.connect()
        await term.sign_in()

        result = await term.purchase(2_500, CARD_CUP)
        assert result.rc == "98"
        entry_key = host_key(lab, await only_txn(lab))
        assert lab.host.ledger[entry_key].approved  # the host did debit the card

        rec = await settled(lab, (await only_txn(lab)).txn_id)
        assert_reversed(rec, reason="98", was=TxnState.TIMED_OUT)
        assert lab.host.stats.drops == 1
        assert lab.host.reversal_count(entry_key) == 1
        assert await lab.gateway.store.late_answers(txn_id=rec.txn_id) == []
        await assert_no_charge_without_receipt(lab)


async def test_host_disconnect_mid_transaction_is_reversed_after_reconnect(tmp_path, journal):
    """The host books the purchase and drops the connection instead of answering.

    The terminal gets 98, not 91: the request had left on the link, so its outcome is unknown and
    must be reversed. 91 ("host unavailable") is only for a request that never left because the link
    was down. The reversal waits for the link to reconnect and sign on again (new zone keys), then
    goes through; afterwards purchases are approved again.
    """
    async with open_lab(tmp_path, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF, **journal) as lab:
        lab.host.add_fault(Fault("disconnect", pan=CARD_CUP.pan, mti=("0200",), limit=1))
        term = lab.terminal(timeout=5.0)
        await term.connect()
        await term.sign_in()

        result = await term.purchase(3_500, CARD_CUP)
        assert result.rc == "98"

        rec = await settled(lab, (await only_txn(lab)).txn_id)
        assert_reversed(rec, reason="98", was=TxnState.TIMED_OUT)
        assert lab.host.stats.disconnects == 1
        assert lab.host.stats.sign_ons >= 2 and lab.gateway.link.reconnects >= 1
        assert lab.host.reversal_count(host_entry(lab, rec).key) == 1

        later = await term.purchase(1_200, CARD_CUP)
        assert later.approved
        await assert_no_charge_without_receipt(lab, [receipt(later)])


async def test_terminal_hanging_up_before_the_answer_gets_the_approval_reversed(tmp_path):
    """The host approves in time, but the terminal closed its connection right after sending: the
    approval cannot be delivered, so the journal marks it undeliverable and reverses it (reason 96)."""
    async with open_lab(tmp_path, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        lab.host.add_fault(Fault("delay", seconds=0.25, pan=CARD_CUP.pan, mti=("0200",), limit=1))
        async with RawTerminal(lab) as raw:
            await raw.sign_in()
            await raw.send(raw.purchase(2_000, CARD_CUP))
            await raw.hang_up()

        rec = await settled(lab, (await eventually(lambda: lab.gateway.store.list_transactions(),
                                                   "purchase journalled"))[0].txn_id)
        assert_reversed(rec, reason="96", was=TxnState.UNDELIVERABLE)
        assert rec.rc == "00" and rec.auth_code  # the approval itself is kept
        entry = host_entry(lab, rec)
        assert entry.approved and entry.reversed and lab.host.reversal_count(entry.key) == 1
        assert messages(lab, "terminal_out", "0210") == 0
        await assert_no_charge_without_receipt(lab)


async def test_late_approval_is_journalled_not_forwarded_and_the_reversal_wins(tmp_path):
    """The host approves late, while the gateway's reversal is still being retried (the host refused
    its first attempt): the late approval is journalled against the transaction, changes nothing, is
    not forwarded, and the reversal still goes through: the customer ends up not charged."""
    saf = ReversalConfig(max_attempts=5, backoff=(1.0,), poll_interval=0.05, original_wait=HOST_TIMEOUT + 2.0)
    async with open_lab(tmp_path, host_timeout=HOST_TIMEOUT, reversal=saf) as lab:
        lab.host.add_fault(Fault("late", seconds=HOST_TIMEOUT + 0.25, pan=CARD_CUP.pan, mti=("0200",), limit=1))
        lab.host.add_fault(Fault("reject_reversal", count=1))
        term = lab.terminal(timeout=5.0)
        await term.connect()
        await term.sign_in()

        result = await term.purchase(4_000, CARD_CUP)
        assert result.rc == "98"
        txn_id = (await only_txn(lab)).txn_id

        late = await late_answers_of(lab, txn_id)
        assert [a.rc for a in late] == ["00"] and late[0].auth_code
        during = await lab.gateway.store.get(txn_id)
        assert during is not None and during.state is TxnState.REVERSAL_QUEUED, during  # not "completed"
        assert during.late_rc == "00"
        assert counter(lab, "late_host_answers") == 1

        rec = await settled(lab, txn_id)
        assert_reversed(rec, reason="98", was=TxnState.TIMED_OUT)
        entry = host_entry(lab, rec)
        assert entry.approved and entry.reversed  # approved by the host, and reversed all the same
        assert lab.host.stats.messages["0400"] == 1 and lab.host.stats.messages["0401"] == 1

        echo = await term.echo()
        assert echo.rc == "00" and term.late_answers == []
        assert messages(lab, "terminal_out", "0210") == 1
        await assert_no_charge_without_receipt(lab)


async def test_late_approval_after_a_25_to_the_reversal_is_reversed_again(tmp_path, journal):
    """A slow issuer path: the host books the purchase only after the gateway's timeout. The gateway's
    reversal overtakes it and gets 25 ("original not found", final: nothing booked), then the host
    approves the purchase after all. The late approval reopens the reversal; its repeat (0401) finds
    the original and reverses it: the customer ends up not charged."""
    async with open_lab(tmp_path, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF, **journal) as lab:
        lab.host.add_fault(Fault("booked_late", seconds=HOST_TIMEOUT + 1.5, pan=CARD_CUP.pan, mti=("0200",),
                                 limit=1))
        term = lab.terminal(timeout=5.0)
        await term.connect()
        await term.sign_in()

        result = await term.purchase(4_000, CARD_CUP)
        assert result.rc == "98"
        txn_id = (await only_txn(lab)).txn_id

        async def reversed_with(rc: str) -> TxnRecord | None:
            rec = await lab.gateway.store.get(txn_id)
            return rec if rec is not None and rec.state is TxnState.REVERSED and rec.reversal_rc == rc else None

        first = await eventually(lambda: reversed_with("25"), "the reversal answered 25")
        assert first.late_rc is None and lab.host.ledger.get(host_key(lab, first)) is None  # not booked yet

        late = await late_answers_of(lab, txn_id)
        assert [a.rc for a in late] == ["00"]
        rec = await eventually(lambda: reversed_with("00"), "the reopened reversal acknowledged")
        assert (rec.reversed_from, rec.reversal_reason, rec.late_rc) == (TxnState.TIMED_OUT, "98", "00")
        entry = host_entry(lab, rec)
        assert entry.approved and entry.reversed  # booked late by the host, and reversed all the same
        # one 0400 (answered 25), then repeats (a loaded machine may time one out) until acknowledged
        assert lab.host.stats.messages["0400"] == 1 and lab.host.stats.messages["0401"] >= 1
        (saf,) = await lab.gateway.store.list_saf()
        assert (saf.state, saf.ack_rc, saf.total_attempts) == (SafState.DONE, "00", 1 + lab.host.stats.messages["0401"])
        assert counter(lab, "reversals_queued") == 2  # at the timeout, and again at the late approval
        assert counter(lab, "reversals_acknowledged") == 2

        echo = await term.echo()
        assert echo.rc == "00" and term.late_answers == []
        await assert_no_charge_without_receipt(lab)


# --- 6..9: reversals the terminal sends, and the SAF queue -----------------------------------------


async def test_duplicate_terminal_reversals_reach_the_host_once(tmp_path):
    """An approved purchase, then the terminal's 0400 twice (back to back) and, once it is reversed, a
    0401 repeat: every answer is 00, the host sees one reversal, the charge is undone once."""
    async with open_lab(tmp_path, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab, RawTerminal(lab) as raw:
        await raw.sign_in()
        purchase = raw.purchase(5_000, CARD_CUP)
        approval = await raw.exchange(purchase)
        assert approval.mti == "0210" and approval.fields["39"] == "00"

        await raw.send(raw.reversal(purchase, "96"))
        await raw.send(raw.reversal(purchase, "96"))
        answers = [await raw.receive(), await raw.receive()]
        assert [(a.mti[:3], a.fields["39"]) for a in answers] == [("041", "00"), ("041", "00")]

        rec = await settled(lab, (await only_txn(lab)).txn_id)
        assert_reversed(rec, reason="96", was=TxnState.COMPLETED, by=ReversalInitiator.TERMINAL)
        repeat = await raw.exchange(raw.reversal(purchase, "96", repeat=True))
        assert repeat.mti[:3] == "041" and repeat.fields["39"] == "00"

        entry = host_entry(lab, rec)
        assert entry.reversed
        assert lab.host.reversal_count(entry.key) == 1
        assert lab.host.stats.messages["0400"] == 1 and lab.host.stats.messages["0401"] == 0
        assert len(await lab.gateway.store.list_saf()) == 1
        assert counter(lab, "reversals_queued") == 1
        await assert_no_charge_without_receipt(lab)


async def _approved_then_reversed_by_terminal(lab: Lab, amount: int) -> TxnRecord:
    """Sign in, buy, and reverse it from the terminal (reason 96: approved but no receipt printed)."""
    term = lab.terminal(timeout=5.0)
    await term.connect()
    await term.sign_in()
    result = await term.purchase(amount, CARD_CUP)
    assert result.approved
    reversal = await term.reversal(result, "96")
    assert reversal.rc == "00"
    return await only_txn(lab)


async def test_rejected_reversal_is_repeated_as_0401_until_acknowledged(tmp_path, journal):
    """The host refuses the first two attempts (96): the SAF repeats as 0401 on its schedule and stops
    at the host's 00."""
    async with open_lab(tmp_path, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF, **journal) as lab:
        lab.host.add_fault(Fault("reject_reversal", count=2))
        txn = await _approved_then_reversed_by_terminal(lab, 6_000)

        rec = await settled(lab, txn.txn_id)
        assert_reversed(rec, reason="96", was=TxnState.COMPLETED, by=ReversalInitiator.TERMINAL)
        [entry] = await lab.gateway.store.list_saf()
        assert entry.state is SafState.DONE and entry.ack_rc == "00"
        assert entry.last_error is not None and "96" in entry.last_error
        assert entry.attempts == 3  # two refused attempts and the acknowledged one

        host = host_entry(lab, rec)
        assert host.reversed and lab.host.reversal_count(host.key) == 3
        assert lab.host.stats.messages["0400"] == 1 and lab.host.stats.messages["0401"] == 2
        # ISO 8583:1987 repeats: the first attempt's message with the MTI's last digit 1 (same STAN, field
        # 7, original data); only the MAC changes, because it covers the MTI
        sent = [m for m in lab.host.seen if m.mti in ("0400", "0401")]
        first, *repeats = sent
        mac = "128"  # field 90 makes it a two-bitmap message: the MAC is in 128
        for repeat in repeats:
            assert {k: v for k, v in repeat.fields.items() if k != mac} == {
                k: v for k, v in first.fields.items() if k != mac}
            assert repeat.fields[mac] != first.fields[mac]
        assert repeats[0].fields[mac] == repeats[1].fields[mac]
        assert (entry.reversal_stan, entry.reversal_datetime) == (first.fields["11"], first.fields["7"])
        assert counter(lab, "reversals_sent") == 3 and counter(lab, "reversals_acknowledged") == 1
        await assert_no_charge_without_receipt(lab)


async def test_acknowledged_saf_entry_counts_the_attempt_that_succeeded(tmp_path):
    saf = ReversalConfig(max_attempts=5, backoff=(0.05,), poll_interval=0.05, original_wait=HOST_TIMEOUT + 2.0)
    async with open_lab(tmp_path, host_timeout=HOST_TIMEOUT, reversal=saf) as lab:
        lab.host.add_fault(Fault("reject_reversal", count=2))
        txn = await _approved_then_reversed_by_terminal(lab, 6_100)
        rec = await settled(lab, txn.txn_id)
        assert rec.state is TxnState.REVERSED
        assert lab.host.reversal_count(host_entry(lab, rec).key) == 3
        [entry] = await lab.gateway.store.list_saf()
        assert (entry.attempts, entry.total_attempts) == (3, 3)


async def test_reversal_refused_every_time_is_parked_then_operator_retry_ends_it(tmp_path, journal):
    """A host that refuses every reversal: after `max_attempts` the entry is parked (transaction
    `reversal_failed`, metric moved) and the customer is still charged: an operator's job. Once the
    host is fixed, the operator's retry sends a fresh 0400 and the charge is undone."""
    saf = ReversalConfig(max_attempts=2, backoff=(0.1,), poll_interval=0.05, original_wait=HOST_TIMEOUT + 2.0)
    async with open_lab(tmp_path, host_timeout=HOST_TIMEOUT, reversal=saf, **journal) as lab:
        lab.host.add_fault(Fault("drop", pan=CARD_CUP.pan, mti=("0200",), limit=1))
        lab.host.add_fault(Fault("reject_reversal", count=1_000))
        term = lab.terminal(timeout=5.0)
        await term.connect()
        await term.sign_in()
        result = await term.purchase(7_000, CARD_CUP)
        assert result.rc == "98"

        store = lab.gateway.store
        parked = await settled(lab, (await only_txn(lab)).txn_id)
        assert parked.state is TxnState.REVERSAL_FAILED and parked.reversed_from is TxnState.TIMED_OUT
        [entry] = await store.list_saf()
        assert entry.state is SafState.PARKED
        assert entry.parked_reason is not None and "gave up after 2 attempts" in entry.parked_reason
        assert (entry.attempts, entry.total_attempts) == (2, 2)  # the attempt that made it give up counts
        assert counter(lab, "reversals_parked") == 1
        assert lab.host.stats.messages["0400"] == 1 and lab.host.stats.messages["0401"] == 1
        # parked means the customer IS still charged: that is what the operator is told to fix
        assert lab.host.balance(CARD_CUP.pan) == OPENING["cup-debit"] - 7_000

        lab.host.clear_faults()
        retried = await store.retry_saf(entry.saf_id)
        assert retried.state is SafState.PENDING and retried.attempts == 0

        rec = await settled(lab, parked.txn_id)
        assert_reversed(rec, reason="98", was=TxnState.TIMED_OUT)
        done = await store.get_saf(entry.saf_id)
        assert done is not None and done.state is SafState.DONE and done.ack_rc == "00"
        assert lab.host.stats.messages["0400"] == 2  # the operator's retry starts again with a 0400
        assert counter(lab, "reversals_parked") == 1 and counter(lab, "reversals_acknowledged") == 1
        assert lab.host.reversal_count(host_entry(lab, rec).key) == 3
        await assert_no_charge_without_receipt(lab)


async def test_terminal_reversal_of_an_unknown_original_gets_25_and_goes_nowhere(tmp_path):
    """A 0400 for a purchase the gateway never saw: answered 25 (the configured answer for an unknown
    original), nothing journalled, nothing queued, nothing sent to the host."""
    async with open_lab(tmp_path, host_timeout=HOST_TIMEOUT) as lab, RawTerminal(lab) as raw:
        await raw.sign_in()
        never_sent = raw.purchase(8_000, CARD_CUP)
        answer = await raw.exchange(raw.reversal(never_sent, "98"))
        assert answer.mti == "0410" and answer.fields["39"] == "25"

        await anyio.sleep(3 * lab.config.reversal.poll_interval)  # time enough for a (wrong) SAF send
        assert await lab.gateway.store.list_transactions() == []
        assert await lab.gateway.store.list_saf() == []
        assert lab.host.stats.messages["0400"] == 0 and lab.host.stats.messages["0401"] == 0
        assert counter(lab, "reversals_queued") == 0
        await assert_no_charge_without_receipt(lab)


async def _host_has(lab: Lab, mti: str) -> bool:
    return lab.host.stats.messages[mti] > 0


@pytest.mark.parametrize("host_delay", [
    pytest.param(0.2, id="original-approved-in-time"),
    pytest.param(HOST_TIMEOUT + 0.3, id="original-times-out"),
])
async def test_terminal_reversal_waits_for_its_in_flight_original(tmp_path, caplog, host_delay):
    """The terminal's 0400 arrives (same connection) while its original is at the host. The gateway
    answers it only once the original is decided, and the host gets exactly one reversal: the
    terminal's when the original was approved, the gateway's own (98) when it timed out, with the
    terminal's reversal joining it."""
    async with open_lab(tmp_path, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab, RawTerminal(lab) as raw:
        lab.host.add_fault(Fault("delay", seconds=host_delay, pan=CARD_CUP.pan, mti=("0200",), limit=1))
        await raw.sign_in()
        purchase = raw.purchase(9_000, CARD_CUP)
        await raw.send(purchase)
        await eventually(lambda: _host_has(lab, "0200"), "the original at the host")
        await raw.send(raw.reversal(purchase, "98"))
        first, second = await raw.receive(), await raw.receive()
        timed_out = host_delay > HOST_TIMEOUT
        assert (first.mti, first.fields["39"]) == ("0210", "98" if timed_out else "00")
        assert (second.mti, second.fields["39"]) == ("0410", "00")

        rec = await settled(lab, (await only_txn(lab)).txn_id)
        if timed_out:
            assert_reversed(rec, reason="98", was=TxnState.TIMED_OUT)
            await late_answers_of(lab, rec.txn_id)
        else:
            assert_reversed(rec, reason="98", was=TxnState.COMPLETED, by=ReversalInitiator.TERMINAL)
            assert rec.rc == "00" and rec.auth_code  # the approval's outcome was journalled first
        assert lab.host.reversal_count(host_entry(lab, rec).key) == 1
        assert len(await lab.gateway.store.list_saf()) == 1
        await assert_no_charge_without_receipt(lab)
    assert not [r for r in caplog.records if r.name.startswith("gateway") and r.levelno >= logging.ERROR]


async def test_terminal_reversal_pipelined_behind_its_original_waits_for_it(tmp_path):
    """The same promise when the 0400 is written right behind its 0200 (one TCP write after the other,
    as a terminal that gives up quickly does): the reversal must wait for the original."""
    async with open_lab(tmp_path, host_timeout=1.0, reversal=FAST_SAF) as lab, RawTerminal(lab) as raw:
        lab.host.add_fault(Fault("delay", seconds=0.6, pan=CARD_CUP.pan, mti=("0200",), limit=1))
        await raw.sign_in()
        purchase = raw.purchase(9_000, CARD_CUP)
        await raw.send(purchase)
        await raw.send(raw.reversal(purchase, "98"))
        first, second = await raw.receive(), await raw.receive()
        assert (first.mti, first.fields["39"]) == ("0210", "00")
        assert (second.mti, second.fields["39"]) == ("0410", "00")
        rec = await settled(lab, (await only_txn(lab)).txn_id)
        assert_reversed(rec, reason="98", was=TxnState.COMPLETED, by=ReversalInitiator.TERMINAL)
        assert lab.host.reversal_count(host_entry(lab, rec).key) == 1
        await assert_no_charge_without_receipt(lab)


# --- 10..11: an approval that cannot be trusted; a restart ------------------------------------------


async def test_approval_with_a_wrong_host_mac_gives_96_and_is_reversed(tmp_path):
    """The host approves, but its MAC does not verify: the approval cannot be trusted, so the terminal
    gets 96 (not approved) and the gateway reverses what the host may have booked (reason A0)."""
    async with open_lab(tmp_path, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        lab.host.add_fault(Fault("wrong_mac", pan=CARD_CUP.pan, mti=("0200",), limit=1))
        term = lab.terminal(timeout=5.0)
        await term.connect()
        await term.sign_in()

        result = await term.purchase(10_000, CARD_CUP)
        assert result.rc == "96" and not result.approved

        rec = await settled(lab, (await only_txn(lab)).txn_id)
        assert_reversed(rec, reason="A0", was=TxnState.HOST_REJECTED)
        entry = host_entry(lab, rec)
        assert entry.approved and entry.reversed and lab.host.reversal_count(entry.key) == 1
        assert counter(lab, "mac_failures") >= 1
        await assert_no_charge_without_receipt(lab)

        again = await term.purchase(1_000, CARD_CUP_2)  # the link still works, with the same zone keys
        assert again.approved
        await assert_no_charge_without_receipt(lab, [receipt(again)])


async def test_restart_reverses_every_request_left_pending(tmp_path, journal):
    """The gateway dies while a purchase is at the host (the host took the money and is silent). The
    journal keeps it `pending`. A second row is written `pending` with the store API for a request the
    host never saw. The next gateway on the same journal queues a reversal for both before it accepts
    terminals: the real one gives the money back, the other is closed by the host's 25."""
    zmk = generate_key(16)
    tmks = {tid: generate_key(16) for tid in terminal_ids(1)}
    [terminal_id] = tmks
    rules = HostRulesConfig(accounts=LAB_ACCOUNTS, faults=(Fault("drop", pan=CARD_CUP.pan, mti=("0200",), limit=1),))
    host = HostSimulator(HostSimConfig(zmk=zmk, rules=rules))
    async with anyio.create_task_group() as tg:
        host_port = await tg.start(host.serve, LOOPBACK, 0)
        # the first life waits 30 s for the host: it is killed long before that
        config = lab_config(tmp_path, host_port, tmks, zmk, host_timeout=30.0, admin=False, reversal=FAST_SAF)
        config = dataclasses.replace(config, **journal)

        async with anyio.create_task_group() as first_life:
            gw1: RunningGateway = await first_life.start(run_gateway, config)
            with anyio.fail_after(BOUND):
                await gw1.link.wait_signed_on()
            term = TerminalSimulator(LOOPBACK, gw1.terminal_port, terminal_id, MERCHANT_ID, tmks[terminal_id],
                                     cards=LAB_CARDS, timeout=5.0, auto_reverse=False)
            await term.connect()
            await term.sign_in()
            term.timeout = 0.3  # the terminal gives up; the gateway is still waiting for the host
            result = await term.purchase(11_000, CARD_CUP)
            assert result.timed_out
            assert host.stats.drops == 1 and host.balance(CARD_CUP.pan) == OPENING["cup-debit"] - 11_000
            first_life.cancel_scope.cancel()
        await term.aclose()

        async with open_journal(config.store) as store:
            [in_flight] = await store.unknown_outcomes()
            assert in_flight.kind == "purchase" and in_flight.amount == 11_000
            never_sent = await store.record_request(TxnRequest(
                terminal_id=terminal_id, merchant_id=MERCHANT_ID, batch=in_flight.batch, terminal_stan="900001",
                terminal_mti="0200", processing_code="000000", kind=TxnKind.PURCHASE, amount=12_000, currency="156",
                pan_masked=mask_pan(CARD_CUP_2.pan), pan_fingerprint=store.fingerprint(CARD_CUP_2.pan),
                host_mti="0200", host_stan="900001",
                transmission_datetime=datetime.now(UTC).strftime("%m%d%H%M%S"),
                pos_entry_mode="012", pos_condition_code="00",
            ))

        gw2: RunningGateway = await tg.start(run_gateway, config)
        assert gw2.recovered == 2
        store2 = gw2.store

        async def both_final() -> list[TxnRecord] | None:
            rows = [r for r in (await store2.get(in_flight.txn_id), await store2.get(never_sent)) if r is not None]
            return rows if len(rows) == 2 and all(r.state in FINAL_STATES for r in rows) else None

        real, ghost = await eventually(both_final, "both pending rows settled")
        for rec in (real, ghost):
            # recovery records the unknown outcome as a timeout in the same step as it queues the reversal
            assert rec.state is TxnState.REVERSED and rec.reversed_from is TxnState.TIMED_OUT, rec
            assert rec.reversal_reason == "06" and rec.reversal_initiator is ReversalInitiator.GATEWAY
        assert real.reversal_rc == "00" and ghost.reversal_rc == "25"  # 25: the host had nothing to undo

        key = txn_key(real, config.host.acquirer_id)
        assert host.ledger[key].reversed and host.reversal_count(key) == 1
        assert host.balance(CARD_CUP.pan) == OPENING["cup-debit"]
        assert host.balance(CARD_CUP_2.pan) == OPENING["cup-debit"]
        assert not [e for e in host.ledger.values() if e.approved and e.delta < 0 and not e.reversed]
        tg.cancel_scope.cancel()
