"""The SAF sender against a journal read that returns a stale view: a reversal acknowledged while the
queue was being read must not go out a second time (found by the crash test: "the same original was
reversed twice by one gateway lifetime")."""

from __future__ import annotations

import anyio
import pytest
from test_store_support import PAN_KEY, request

from gateway.config import ReversalConfig
from gateway.iso.message import Message
from gateway.metrics import Metrics
from gateway.net.host_link import HostReply
from gateway.net.saf_sender import SafSender
from gateway.store import MemoryStore
from gateway.store.records import SafEntry

pytestmark = pytest.mark.anyio


class StaleReadStore(MemoryStore):
    """The second queue read starts before the first attempt's acknowledgement is journalled and returns
    only after it: the snapshot it returns still shows the entry as due (as a read transaction that
    began before the ack's commit does)."""

    def __init__(self) -> None:
        super().__init__(pan_key=PAN_KEY)
        self.reads = 0
        self.acked = anyio.Event()

    async def due_reversals(self, now: float, limit: int = 64) -> list[SafEntry]:
        self.reads += 1
        snapshot = await super().due_reversals(now, limit)
        if self.reads == 2:
            await self.acked.wait()
        return snapshot

    async def ack_reversal(self, saf_id: int, rc: str, *, attempt_at: float | None = None) -> bool:
        acknowledged = await super().ack_reversal(saf_id, rc, attempt_at=attempt_at)
        self.acked.set()
        return acknowledged


class AnsweringLink:
    ready = True

    def __init__(self, codes: tuple[str, ...] = ("00",)) -> None:
        self.sent: list[Message] = []
        self.stan = 0
        #: the host's field 39 to each reversal in turn (the last one from then on)
        self.codes = codes

    def allocate(self) -> tuple[str, str]:
        self.stan += 1
        return f"{self.stan:06d}", "1123120000"

    def stamp(self, msg: Message) -> Message:
        msg.fields["11"], msg.fields["7"] = self.allocate()
        return msg

    async def request(self, msg: Message, timeout: float | None = None) -> HostReply:
        self.sent.append(msg)
        await anyio.sleep(0.05)  # the answer takes a while: the sender polls the queue meanwhile
        rc = self.codes[min(len(self.sent), len(self.codes)) - 1]
        return HostReply(Message("0410", {"39": rc}), mac_ok=True)


async def test_a_reversal_acknowledged_during_a_queue_read_is_not_sent_again() -> None:
    store = StaleReadStore()
    txn = await store.record_request(request("000001"))
    await store.queue_reversal(txn, "98", state="timed_out")
    link = AnsweringLink()
    sender = SafSender(ReversalConfig(poll_interval=0.01), store, link, Metrics(process_metrics=False),  # type: ignore[arg-type]
                       acquirer_id="00000001234", forwarding_id="00000001234")
    async with anyio.create_task_group() as tg:
        await tg.start(sender.run)
        with anyio.fail_after(5):
            await store.acked.wait()
            while store.reads < 6:  # several more polls after the stale one
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert len(link.sent) == 1, [m.mti for m in link.sent]
    assert (await store.list_saf())[0].state.value == "done"  # acknowledged by the host


async def test_a_25_after_a_late_approval_is_a_failed_attempt_and_the_repeat_reverses() -> None:
    """The host approved the original late, then answered its reversal 25 ("not found"): not final. The
    sender counts a failed attempt and repeats (0401) on its back-off until the host acknowledges."""
    store = MemoryStore(pan_key=PAN_KEY)
    link = AnsweringLink(codes=("25", "00"))
    config = ReversalConfig(poll_interval=0.01, backoff=(0.05,), max_attempts=5)
    sender = SafSender(config, store, link, Metrics(process_metrics=False),  # type: ignore[arg-type]
                       acquirer_id="00000001234", forwarding_id="00000001234")
    await anyio.sleep(0.01)  # queued after the sender started: its first attempt is a 0400
    txn = await store.record_request(request("000001"))
    await store.queue_reversal(txn, "98", state="timed_out")
    await store.record_late_answer(txn, "00")
    async with anyio.create_task_group() as tg:
        await tg.start(sender.run)
        with anyio.fail_after(5):
            while (await store.list_saf())[0].state.value != "done":
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert [m.mti for m in link.sent] == ["0400", "0401"]
    (entry,) = await store.list_saf()
    assert (entry.ack_rc, entry.total_attempts) == ("00", 2)
    assert entry.last_error == "host answered 25 but approved the original late"
    rec = await store.get(txn)
    assert rec is not None and (rec.state.value, rec.reversal_rc) == ("reversed", "00")
