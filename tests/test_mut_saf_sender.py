"""Promises of the SAF sender (gateway/net/saf_sender.py) that mutation testing (issue 16) checks,
against a scripted host link and the memory journal, through the sender's own loop:

- a reversal the host never answers uses an attempt each time, backs off on the schedule, and is
  parked for an operator after `max_attempts`, with the reason and a metric (never resent for ever);
- an answer other than 00/25, or a 00 with a bad MAC, is a failed attempt that says why;
- nothing is sent and no attempt used while the link is down or the request was not sent;
- the first attempt is 0400, repeats 0401 (0420/0421 as advices), identical repeats keep STAN and
  field 7, fresh ones do not.
"""

from __future__ import annotations

import time

import anyio
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_store_support import PAN_KEY, request

from gateway.config import ReversalConfig
from gateway.iso.message import Message
from gateway.metrics import Metrics
from gateway.net.host_link import HostNotSent, HostReply, HostTimeout
from gateway.net.saf_sender import SafSender
from gateway.store import MemoryStore
from gateway.store.errors import LeaseLost, StateConflict, StoreIOError
from gateway.store.records import SafEntry

pytestmark = pytest.mark.anyio


class ScriptedLink:
    """The host's reaction to each reversal in turn (the last one from then on): a field 39, "timeout",
    "not sent", or "bad mac"."""

    def __init__(self, *script: str, ready: bool = True) -> None:
        self.script = script
        self.ready = ready
        self.sent: list[Message] = []
        self.tries = 0
        self.stan = 0

    def allocate(self) -> tuple[str, str]:
        self.stan += 1
        return f"{self.stan:06d}", f"1202{self.stan:06d}"

    def stamp(self, msg: Message) -> Message:
        msg.fields["11"], msg.fields["7"] = self.allocate()
        return msg

    async def request(self, msg: Message, timeout: float | None = None) -> HostReply:
        self.tries += 1
        step = self.script[min(self.tries, len(self.script)) - 1]
        if step == "not sent":
            raise HostNotSent("the link went down before the frame was written")
        self.sent.append(Message(msg.mti, dict(msg.fields)))
        if step == "timeout":
            raise HostTimeout("no answer within 0.01s")
        if step == "bad mac":
            return HostReply(Message("0410", {"39": "00"}), mac_ok=False)
        return HostReply(Message("0410", {"39": step}), mac_ok=True)


def value(metrics: Metrics, name: str) -> float:
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for s in family.samples:
            if s.name == name:
                return s.value
    raise AssertionError(f"{name} not exposed")


async def queued(store: MemoryStore, stan: str = "000001") -> int:
    txn = await store.record_request(request(stan))
    await store.queue_reversal(txn, "98", state="timed_out")
    return txn


async def run_until(sender: SafSender, store: MemoryStore, done, limit: float = 5.0) -> SafEntry:
    async with anyio.create_task_group() as tg:
        await tg.start(sender.run)
        with anyio.fail_after(limit):
            while not done((await store.list_saf())[0]):
                await anyio.sleep(0.005)
        tg.cancel_scope.cancel()
    return (await store.list_saf())[0]


def sender_for(store: MemoryStore, link: ScriptedLink, metrics: Metrics, **config: object) -> SafSender:
    cfg = ReversalConfig(**{"poll_interval": 0.005, "backoff": (0.0,), "max_attempts": 3, **config})  # type: ignore[arg-type]
    return SafSender(cfg, store, link, metrics, acquirer_id="00000001234", forwarding_id="00000005678")  # type: ignore[arg-type]


async def test_a_host_that_never_answers_reversals_gets_them_parked_after_max_attempts():
    store, link, metrics = MemoryStore(pan_key=PAN_KEY), ScriptedLink("timeout"), Metrics(process_metrics=False)
    await queued(store)
    entry = await run_until(sender_for(store, link, metrics), store, lambda e: e.state.value == "parked")
    assert [m.mti for m in link.sent] == ["0400", "0401", "0401"]
    assert (entry.attempts, entry.total_attempts) == (3, 3)
    assert entry.parked_reason == "gave up after 3 attempts: timeout: no answer within 0.01s"
    assert value(metrics, "gateway_reversals_parked_total") == 1
    assert value(metrics, "gateway_reversals_sent_total") == 3
    assert value(metrics, "gateway_reversals_acknowledged_total") == 0


async def test_failed_attempts_back_off_on_the_schedule_and_say_why():
    store, metrics = MemoryStore(pan_key=PAN_KEY), Metrics(process_metrics=False)
    await queued(store)
    link = ScriptedLink("91")
    sender = sender_for(store, link, metrics, backoff=(30.0, 60.0), max_attempts=6)
    before = time.time()
    entry = await run_until(sender, store, lambda e: e.attempts == 1)
    assert entry.state.value == "pending" and entry.last_error == "host answered 91"
    assert 30.0 <= entry.next_attempt_at - before <= 31.0 + (time.time() - before)
    assert value(metrics, "gateway_reversals_sent_total") == 1


async def test_the_schedule_stays_at_its_last_step():
    store, metrics = MemoryStore(pan_key=PAN_KEY), Metrics(process_metrics=False)
    await queued(store)
    link = ScriptedLink("91", "91", "91", "91")
    sender = sender_for(store, link, metrics, backoff=(0.0, 0.0, 45.0), max_attempts=9)
    before = time.time()
    entry = await run_until(sender, store, lambda e: e.attempts == 3)
    await anyio.sleep(0.05)
    entry = (await store.list_saf())[0]
    assert entry.attempts == 3 and len(link.sent) == 3
    assert 45.0 <= entry.next_attempt_at - before <= 46.0 + (time.time() - before)


async def test_an_approval_with_a_bad_mac_does_not_end_the_reversal():
    store, metrics = MemoryStore(pan_key=PAN_KEY), Metrics(process_metrics=False)
    await queued(store)
    link = ScriptedLink("bad mac", "00")
    entry = await run_until(sender_for(store, link, metrics), store, lambda e: e.state.value == "done")
    assert entry.ack_rc == "00" and entry.total_attempts == 2
    assert entry.last_error == "host answered 00 (bad MAC)"
    assert value(metrics, "gateway_reversals_acknowledged_total") == 1


async def test_a_25_ends_the_reversal():
    store, metrics = MemoryStore(pan_key=PAN_KEY), Metrics(process_metrics=False)
    await queued(store)
    entry = await run_until(sender_for(store, ScriptedLink("25"), metrics), store, lambda e: e.state.value == "done")
    assert (entry.ack_rc, entry.total_attempts) == ("25", 1)


async def test_nothing_is_sent_or_counted_while_the_link_is_down_or_the_request_was_not_sent():
    store, metrics = MemoryStore(pan_key=PAN_KEY), Metrics(process_metrics=False)
    await queued(store)
    down = ScriptedLink("00", ready=False)
    sender = sender_for(store, down, metrics)
    async with anyio.create_task_group() as tg:
        await tg.start(sender.run)
        await anyio.sleep(0.1)
        tg.cancel_scope.cancel()
    assert down.tries == 0 and (await store.list_saf())[0].attempts == 0
    link = ScriptedLink("not sent", "not sent", "00")
    entry = await run_until(sender_for(store, link, metrics), store, lambda e: e.state.value == "done")
    assert link.tries == 3 and entry.total_attempts == 1
    assert len(link.sent) == 1  # a 0401: its STAN was fixed before the first try, which may have gone out
    assert value(metrics, "gateway_reversals_sent_total") == 1


async def test_identical_repeats_keep_stan_and_field_7_fresh_ones_do_not():
    store, metrics = MemoryStore(pan_key=PAN_KEY), Metrics(process_metrics=False)
    await queued(store)
    link = ScriptedLink("timeout", "00")
    await run_until(sender_for(store, link, metrics), store, lambda e: e.state.value == "done")
    assert [(m.mti, m.fields["11"], m.fields["7"]) for m in link.sent] == \
        [("0400", "000001", "1202000001"), ("0401", "000001", "1202000001")]

    store = MemoryStore(pan_key=PAN_KEY)
    link = ScriptedLink("timeout", "00")
    sender = sender_for(store, link, metrics, repeat="fresh")
    await anyio.sleep(0.01)  # queued after this sender started: its first attempt is a 0400
    await queued(store)
    await run_until(sender, store, lambda e: e.state.value == "done")
    assert [(m.mti, m.fields["11"]) for m in link.sent] == [("0400", "000001"), ("0401", "000002")]


async def test_advices_go_as_0420_then_0421():
    store, metrics = MemoryStore(pan_key=PAN_KEY), Metrics(process_metrics=False)
    await queued(store)
    link = ScriptedLink("timeout", "00")
    await run_until(sender_for(store, link, metrics, upstream_mti="0420"), store, lambda e: e.state.value == "done")
    assert [m.mti for m in link.sent] == ["0420", "0421"]
    assert link.sent[0].fields.get("32") == "00000001234"


async def test_every_attempt_is_timestamped_in_the_journal():
    """`gateway saf list` shows when each reversal was last tried: a failed try, the parking one, the ack."""
    store, metrics = MemoryStore(pan_key=PAN_KEY), Metrics(process_metrics=False)
    await queued(store)
    before = time.time()
    entry = await run_until(sender_for(store, ScriptedLink("91"), metrics, backoff=(30.0,)), store,
                            lambda e: e.attempts == 1)
    assert entry.last_attempt_at is not None and before <= entry.last_attempt_at <= time.time()

    for script, done in (("timeout", "parked"), ("00", "done")):
        store = MemoryStore(pan_key=PAN_KEY)
        await queued(store)
        before = time.time()
        entry = await run_until(sender_for(store, ScriptedLink(script), metrics), store,
                                lambda e, done=done: e.state.value == done)
        assert entry.last_attempt_at is not None and before <= entry.last_attempt_at <= time.time(), script


async def test_the_operator_log_names_the_reversal_its_attempt_and_what_comes_next(caplog):
    store, metrics = MemoryStore(pan_key=PAN_KEY), Metrics(process_metrics=False)
    txn = await queued(store)
    caplog.set_level("INFO", logger="gateway.saf")
    link = ScriptedLink("91", "timeout", "00")
    await run_until(sender_for(store, link, metrics, backoff=(0.0, 0.25), max_attempts=5), store,
                    lambda e: e.state.value == "done")
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "gateway.saf"]
    assert lines == [
        ("WARNING", f"reversal of txn {txn} attempt 1 failed (host answered 91); next in 0.0s"),
        ("WARNING", f"reversal of txn {txn} attempt 2 failed (timeout: no answer within 0.01s); next in 0.2s"),
        ("INFO", f"reversal of txn {txn} acknowledged by the host (rc 00, attempt 3)"),
    ]


async def test_a_parked_reversal_is_logged_as_an_error_for_an_operator(caplog):
    store, metrics = MemoryStore(pan_key=PAN_KEY), Metrics(process_metrics=False)
    txn = await queued(store)
    caplog.set_level("INFO", logger="gateway.saf")
    await run_until(sender_for(store, ScriptedLink("96"), metrics, max_attempts=2), store,
                    lambda e: e.state.value == "parked")
    errors = [r.getMessage() for r in caplog.records if r.name == "gateway.saf" and r.levelname == "ERROR"]
    assert errors == [f"reversal of txn {txn} parked for an operator: gave up after 2 attempts: host answered 96"]


class HeldLink(ScriptedLink):
    """Answers 00 at once, except the first reversal, which waits for `release` (an answer in flight)."""

    def __init__(self) -> None:
        super().__init__("00")
        self.first_out = anyio.Event()
        self.release = anyio.Event()
        self.reads_when_sent: list[int] = []
        self.store: CountingStore | None = None

    async def request(self, msg: Message, timeout: float | None = None) -> HostReply:
        if self.store is not None:
            self.reads_when_sent.append(self.store.reads)
        if not self.first_out.is_set():
            self.first_out.set()
            self.sent.append(Message(msg.mti, dict(msg.fields)))
            await self.release.wait()
            return HostReply(Message("0410", {"39": "00"}), mac_ok=True)
        return await super().request(msg, timeout)


class CountingStore(MemoryStore):
    """Counts queue reads; can fail the first ones, and can fail writes the sender makes."""

    def __init__(self, *, failing_reads: int = 0, fail_write: Exception | None = None) -> None:
        super().__init__(pan_key=PAN_KEY)
        self.reads = 0
        self.failing_reads = failing_reads
        self.fail_write = fail_write
        self.write_failed = anyio.Event()
        self.failed_writes = 0

    async def due_reversals(self, now: float, limit: int = 64) -> list[SafEntry]:
        self.reads += 1
        if self.reads <= self.failing_reads:
            raise StoreIOError("database is locked")
        return await super().due_reversals(now, limit)

    def _fail(self) -> None:
        if self.fail_write is not None:
            self.failed_writes += 1
            self.write_failed.set()
            raise self.fail_write

    async def mark_reversal_attempt(self, saf_id: int, now: float, next_attempt_at: float, error: str) -> int:
        self._fail()
        return await super().mark_reversal_attempt(saf_id, now, next_attempt_at, error)

    async def ack_reversal(self, saf_id: int, rc: str, *, attempt_at: float | None = None) -> bool:
        self._fail()
        return await super().ack_reversal(saf_id, rc, attempt_at=attempt_at)


async def test_a_link_that_comes_up_later_gets_the_reversal():
    store, metrics = MemoryStore(pan_key=PAN_KEY), Metrics(process_metrics=False)
    await queued(store)
    link = ScriptedLink("00", ready=False)
    sender = sender_for(store, link, metrics)
    async with anyio.create_task_group() as tg:
        await tg.start(sender.run)
        await anyio.sleep(0.05)  # down for several polls
        assert link.tries == 0
        link.ready = True
        with anyio.fail_after(5):
            while (await store.list_saf())[0].state.value != "done":
                await anyio.sleep(0.005)
        tg.cancel_scope.cancel()
    assert [m.mti for m in link.sent] == ["0400"]


async def test_an_unreadable_queue_is_logged_once_and_read_again_at_the_next_poll(caplog):
    store, metrics = CountingStore(failing_reads=3), Metrics(process_metrics=False)
    await queued(store)
    caplog.set_level("INFO", logger="gateway.saf")
    entry = await run_until(sender_for(store, ScriptedLink("00"), metrics), store, lambda e: e.state.value == "done")
    assert entry.total_attempts == 1 and store.reads > 3
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert [r.getMessage() for r in errors] == ["could not read the reversal queue; trying again at the next poll"]
    assert errors[0].exc_info is not None and isinstance(errors[0].exc_info[1], StoreIOError)


async def test_a_reversal_waiting_for_its_answer_does_not_hold_up_the_others():
    store, metrics = CountingStore(), Metrics(process_metrics=False)
    link = HeldLink()
    sender = sender_for(store, link, metrics)
    first = await queued(store)
    async with anyio.create_task_group() as tg:
        await tg.start(sender.run)
        with anyio.fail_after(5):
            await link.first_out.wait()
            second = await queued(store, "000002")
            sender.wake()
            while {e.txn_id for e in await store.list_saf("done")} != {second}:
                await anyio.sleep(0.005)
            link.release.set()
            while len(await store.list_saf("done")) != 2:
                await anyio.sleep(0.005)
        tg.cancel_scope.cancel()
    # one attempt each: the first was never sent again while its answer was out
    assert len(link.sent) == 2
    assert {(e.txn_id, e.total_attempts) for e in await store.list_saf()} == {(first, 1), (second, 1)}


async def test_no_more_than_a_queue_reads_worth_of_reversals_is_in_flight():
    """A host that holds every answer gets at most 64 reversals at once (one queue read), not the backlog."""
    store, metrics = MemoryStore(pan_key=PAN_KEY), Metrics(process_metrics=False)
    for i in range(70):
        txn = await store.record_request(request(f"{i + 1:06d}"))
        await store.queue_reversal(txn, "98", state="timed_out")
    gate = anyio.Event()
    in_flight: list[Message] = []

    class Holding(ScriptedLink):
        async def request(self, msg: Message, timeout: float | None = None) -> HostReply:
            in_flight.append(msg)
            await gate.wait()
            return HostReply(Message("0410", {"39": "00"}), mac_ok=True)

    sender = sender_for(store, Holding("00"), metrics)
    async with anyio.create_task_group() as tg:
        await tg.start(sender.run)
        with anyio.fail_after(5):
            while len(in_flight) < 64:
                await anyio.sleep(0.005)
        await anyio.sleep(0.05)  # several more polls: none adds to what is out
        assert len(in_flight) == 64
        gate.set()
        with anyio.fail_after(5):
            while len(await store.list_saf("done")) != 70:
                await anyio.sleep(0.005)
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("fault, line", [
    (LeaseLost(1, "gw-b", "record an attempt"),
     "reversal of txn {txn}: SAF entry 1 is leased by gw-b: cannot record an attempt; left to it"),
    (StateConflict("SAF entry", 1, "dropped", "record an attempt"),
     "reversal of txn {txn} moved on meanwhile: SAF entry 1 is dropped: cannot record an attempt"),
], ids=["lease lost", "moved on"])
async def test_an_entry_another_instance_or_an_operator_took_is_let_go_without_counting(caplog, fault, line):
    store, metrics = CountingStore(fail_write=fault), Metrics(process_metrics=False)
    txn = await queued(store)
    caplog.set_level("INFO", logger="gateway.saf")
    async with anyio.create_task_group() as tg:
        await tg.start(sender_for(store, ScriptedLink("91"), metrics).run)
        with anyio.fail_after(5):
            await store.write_failed.wait()
        tg.cancel_scope.cancel()
    entry = (await store.list_saf())[0]
    assert (entry.attempts, entry.state.value) == (0, "pending")
    infos = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert infos and set(infos) == {line.format(txn=txn)}
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_a_failing_journal_gives_one_traceback_a_bug_one_per_reversal(caplog):
    """A journal that fails every write is one episode (one traceback, then counts); an unexpected error
    is logged in full for each reversal it hits (they may be different bugs)."""
    for fault, tracebacks in ((StoreIOError("disk full"), 1), (RuntimeError("bug"), 2)):
        caplog.clear()
        store, metrics = CountingStore(fail_write=fault), Metrics(process_metrics=False)
        first, second = await queued(store), await queued(store, "000002")
        caplog.set_level("INFO", logger="gateway.saf")
        async with anyio.create_task_group() as tg:
            await tg.start(sender_for(store, ScriptedLink("00"), metrics).run)
            with anyio.fail_after(5):
                while store.failed_writes < 2:
                    await anyio.sleep(0.005)
            tg.cancel_scope.cancel()
        full = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and r.exc_info]
        assert len(full) == tracebacks, (fault, full)
        assert set(full) <= {f"reversal attempt for txn {t} failed inside the gateway" for t in (first, second)}
        assert len(set(full)) == tracebacks
        assert all(e.state.value == "pending" for e in await store.list_saf())


async def test_a_stale_view_of_one_reversal_does_not_delay_the_others_in_that_read():
    """The queue read that overlapped an acknowledgement skips that reversal (its view may be stale) but
    sends the other due ones from the same read."""
    first_out, second_read, acked = anyio.Event(), anyio.Event(), anyio.Event()
    sent_at_read: dict[int, int] = {}

    class Store(MemoryStore):
        reads = 0
        second_txn = 0

        async def due_reversals(self, now: float, limit: int = 64) -> list[SafEntry]:
            self.reads += 1
            if self.reads != 2:
                return await super().due_reversals(now, limit)
            await self.queue_reversal(self.second_txn, "98", state="timed_out")  # due from this read on
            snapshot = await super().due_reversals(time.time(), limit)
            second_read.set()
            await acked.wait()  # the first one's acknowledgement commits while this read is open
            return snapshot

        async def ack_reversal(self, saf_id: int, rc: str, *, attempt_at: float | None = None) -> bool:
            done = await super().ack_reversal(saf_id, rc, attempt_at=attempt_at)
            acked.set()
            return done

    class Link(ScriptedLink):
        async def request(self, msg: Message, timeout: float | None = None) -> HostReply:
            sent_at_read[int(msg.fields["90"][4:10])] = store.reads
            if not first_out.is_set():
                first_out.set()
                await second_read.wait()
            return HostReply(Message("0410", {"39": "00"}), mac_ok=True)

    store = Store(pan_key=PAN_KEY)
    first = await queued(store)
    store.second_txn = await store.record_request(request("000002"))
    entry = await run_until(sender_for(store, Link("00"), Metrics(process_metrics=False)), store,
                            lambda e: len(sent_at_read) == 2)
    assert entry.txn_id == first
    assert sorted(sent_at_read.values()) == [1, 2]


async def test_an_answer_without_a_response_code_is_a_failed_attempt_that_says_so():
    class Silent(ScriptedLink):
        async def request(self, msg: Message, timeout: float | None = None) -> HostReply:
            self.sent.append(msg)
            return HostReply(Message("0410", {"11": msg.fields["11"]}), mac_ok=True)

    store, metrics = MemoryStore(pan_key=PAN_KEY), Metrics(process_metrics=False)
    await queued(store)
    entry = await run_until(sender_for(store, Silent("00"), metrics, backoff=(30.0,)), store, lambda e: e.attempts == 1)
    assert (entry.state.value, entry.last_error) == ("pending", "host answered without a response code")


async def test_a_25_after_a_late_approval_uses_one_attempt_not_more():
    """With two attempts allowed, a 25 the journal refuses (the original was approved late) leaves one
    attempt: the repeat goes out and the host's 00 ends the reversal, instead of it being parked."""
    store, metrics = MemoryStore(pan_key=PAN_KEY), Metrics(process_metrics=False)
    txn = await queued(store)
    await store.record_late_answer(txn, "00")
    link = ScriptedLink("25", "00")
    entry = await run_until(sender_for(store, link, metrics, max_attempts=2), store,
                            lambda e: e.state.value in ("done", "parked"))
    assert (entry.state.value, entry.ack_rc, entry.total_attempts) == ("done", "00", 2)


# --- a 25 to the reversal of an approval the journal holds (money review, stop 21) -------------------


async def queued_after(store: MemoryStore, how: str, stan: str = "000001") -> int:
    """A reversal queued the way the service queues it for each fate of a purchase."""
    txn = await store.record_request(request(stan))
    if how == "completed":  # the terminal's own 0400 of a delivered approval
        await store.record_outcome(txn, "completed", rc="00", auth_code="123456", rrn="000000000001")
        await store.queue_reversal(txn, "96", initiator="terminal")
    elif how == "completed_no_auth":
        await store.record_outcome(txn, "completed", rc="00", rrn="000000000001")
        await store.queue_reversal(txn, "96", initiator="terminal")
    elif how == "undeliverable":
        await store.queue_reversal(txn, "96", state="undeliverable", rc="00", auth_code="123456")
    elif how == "rejected_amount":  # approval whose amount did not check: the host booked it
        await store.queue_reversal(txn, "06", state="host_rejected", rc="00")
    elif how == "rejected_mac":  # an approval whose MAC failed: it may not be the host's at all
        await store.queue_reversal(txn, "A0", state="host_rejected", rc="00")
    elif how == "decline_bad_mac":  # a 05 under a MAC that fails
        await store.queue_reversal(txn, "A0", state="host_rejected", rc="05")
    elif how == "no_field_39":  # an answer without a response code: nothing says the host booked it
        await store.queue_reversal(txn, "06", state="host_rejected", rc=None)
    else:
        await store.record_timeout_and_queue_reversal(txn, "98")
    return txn


IN_HAND = {"completed": True, "completed_no_auth": True, "undeliverable": True, "rejected_amount": True,
           "rejected_mac": False, "decline_bad_mac": False, "no_field_39": False, "timed_out": False}


@pytest.mark.parametrize("how", sorted(IN_HAND))
async def test_a_25_ends_a_reversal_only_where_the_host_approval_is_not_in_hand(how: str) -> None:
    """A 25 ("original not found") is believed where the journal holds no authenticated approval of the
    original (a timeout, an approval whose MAC failed, an answer without field 39); where it does, the
    host booked the original, so the 25 is a failed attempt that says why, and the repeat's 00 ends it.
    Taken as final it would mark the sale reversed while the host keeps the debit."""
    store, metrics = MemoryStore(pan_key=PAN_KEY), Metrics(process_metrics=False)
    await queued_after(store, how)
    link = ScriptedLink("25", "00")
    entry = await run_until(sender_for(store, link, metrics, max_attempts=3), store, lambda e: e.state.value == "done")
    if IN_HAND[how]:
        auth = "-" if how in ("completed_no_auth", "rejected_amount") else "123456"
        assert (entry.ack_rc, entry.total_attempts) == ("00", 2), entry
        assert entry.last_error == f"host answered 25 but approved the original (rc 00, auth {auth})"
        assert [m.mti for m in link.sent] == ["0400", "0401"]
    else:
        assert (entry.ack_rc, entry.total_attempts) == ("25", 1), entry
        assert [m.mti for m in link.sent] == ["0400"]


async def test_a_host_that_keeps_answering_25_to_a_booked_original_gets_it_parked() -> None:
    """One attempt per 25, no more, no fewer: after max_attempts the reversal waits for an operator."""
    store, metrics = MemoryStore(pan_key=PAN_KEY), Metrics(process_metrics=False)
    await queued_after(store, "completed")
    link = ScriptedLink("25")
    entry = await run_until(sender_for(store, link, metrics, max_attempts=3), store,
                            lambda e: e.state.value == "parked")
    assert (entry.attempts, entry.total_attempts, len(link.sent)) == (3, 3, 3)
    assert entry.parked_reason is not None and "host answered 25 but approved the original" in entry.parked_reason
    assert value(metrics, "gateway_reversals_acknowledged_total") == 0


async def test_a_00_to_the_reversal_of_a_booked_original_ends_it_at_once() -> None:
    store, metrics = MemoryStore(pan_key=PAN_KEY), Metrics(process_metrics=False)
    await queued_after(store, "completed")
    entry = await run_until(sender_for(store, ScriptedLink("00"), metrics), store, lambda e: e.state.value == "done")
    assert (entry.ack_rc, entry.total_attempts, entry.last_error) == ("00", 1, None)
