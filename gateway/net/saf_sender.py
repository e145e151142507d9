"""Store-and-forward sender: drains the persistent reversal queue towards the host.

- First attempt goes as 0400, every repeat as 0401 (jPOS-EE's SAF never switches to the repeat MTI);
  with `reversal.upstream_mti = "0420"` as advices, 0420 then 0421.
- A repeat is the first attempt's message with the MTI's last digit 1 (`reversal.repeat = "identical"`,
  ISO 8583:1987 practice): its STAN and field 7 are allocated once and journalled before the first
  attempt goes out (`Store.record_reversal_ident`), so a repeat is identical after a crash, and after
  another instance took the entry over, too. `repeat = "fresh"`: a new STAN and field 7 each attempt.
- With several instances (PostgreSQL) the queue read claims entries with a lease: only the holder
  records an attempt or parks; a sender whose lease was taken over meanwhile (`LeaseLost`) lets the
  entry go without counting anything: the new holder's attempt counts. An acknowledgement is recorded
  whoever holds the lease (the host's word: it ends the entry once, idempotently).
- A timeout counts as an attempt (jPOS-EE's does not, so a silent host is retried forever).
- Attempts back off on the configured schedule; after `max_attempts` the entry is parked with its
  reason for an operator (`gateway saf list|retry|drop`), with a log line and a metric.
- The host answering 00 acknowledges the reversal. 25 ("original not found") is final too: the host
  never booked the original, so nothing is charged — unless the host approves that original late (the
  reversal overtook it on the host's side): then the 25 counts as a failed attempt, and a 25 already
  taken as final is reopened by the journal when the late approval comes (`Store.record_late_answer`).
  A 25 is never final for an original whose authenticated approval the journal holds already (delivered,
  undeliverable, or rejected for a reason other than its MAC): the host booked it, so it is a failed
  attempt (`host_approved_original`).
  Anything else is a failed attempt.
- While the host link is down nothing is sent and no attempt is counted.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import anyio
import anyio.abc

from gateway.config import ReversalConfig
from gateway.core.reversal import build_host_reversal
from gateway.metrics import Metrics
from gateway.net.host_link import HostLink, HostNotSent, HostTimeout
from gateway.ratelog import RateLimitedLog
from gateway.store.base import Store
from gateway.store.errors import LeaseLost, StateConflict, StoreError
from gateway.store.records import (
    CHARGED_RCS,
    RC_ORIGINAL_NOT_FOUND,
    REASON_MAC_FAILURE,
    SafEntry,
    TxnState,
)

log = logging.getLogger("gateway.saf")

#: the host's answers that end a reversal (a 25 unless the original was approved late: see the store)
FINAL_RCS = frozenset({"00", RC_ORIGINAL_NOT_FOUND})
#: the states a reversed original may come from with the host's own approval of it in the journal, its
#: MAC verified (`completed` and `undeliverable` passed every check; `host_rejected` did unless its
#: reversal reason says the MAC failed)
_APPROVED_IN_HAND = frozenset({TxnState.COMPLETED, TxnState.UNDELIVERABLE, TxnState.HOST_REJECTED})


def host_approved_original(entry: SafEntry) -> bool:
    """Whether the journal holds the host's authenticated approval of the original this reversal undoes:
    then the host booked it, and a 25 ("original not found") to the reversal is not true. Taken as final
    it would leave the journal saying reversed while the host keeps the debit; it counts as a failed
    attempt instead (repeated, then parked for an operator), as a 25 contradicted by a late approval does."""
    txn = entry.txn
    if txn.rc not in CHARGED_RCS or txn.reversed_from not in _APPROVED_IN_HAND:
        return False
    return not (txn.reversed_from is TxnState.HOST_REJECTED and txn.reversal_reason == REASON_MAC_FAILURE)


class SafSender:
    def __init__(self, config: ReversalConfig, store: Store, link: HostLink, metrics: Metrics,
                 acquirer_id: str, forwarding_id: str) -> None:
        self.config = config
        self.store = store
        self.link = link
        self.metrics = metrics
        self.acquirer_id = acquirer_id
        self.forwarding_id = forwarding_id
        self._wake = anyio.Event()
        self._busy: set[int] = set()
        #: entries whose attempt ended while the queue was being read: that read's snapshot may predate
        #: the attempt's journal write (an acknowledged reversal would look due again and go out twice)
        self._ended_during_read: set[int] = set()
        #: `repeat = "fresh"`: an entry queued before this process started may have reached the host just
        #: before the old process died: its next attempt is a repeat (0401) though no attempt was recorded
        self._started_at = time.time()
        self.faults = RateLimitedLog(log)

    def wake(self) -> None:
        """Something was queued: look at the queue now instead of at the next poll."""
        self._wake.set()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with anyio.create_task_group() as tg:
            while True:
                with anyio.move_on_after(self.config.poll_interval):
                    await self._wake.wait()
                self._wake = anyio.Event()
                if not self.link.ready:
                    continue
                self._ended_during_read = set()
                try:
                    due = await self.store.due_reversals(time.time(), 64)
                except Exception:
                    self.faults.error("reversal queue unreadable",
                                      "could not read the reversal queue; trying again at the next poll", exc_info=True)
                    continue
                for entry in due:
                    if entry.saf_id in self._busy:
                        continue  # one attempt at a time per original: keeps them ordered
                    if entry.saf_id in self._ended_during_read:
                        continue  # possibly a stale view of it: the next poll reads it afresh
                    self._busy.add(entry.saf_id)
                    tg.start_soon(self._attempt, entry)

    async def _attempt(self, entry: SafEntry) -> None:
        try:
            await self._send(entry)
        except LeaseLost as exc:
            # this instance stalled past its lease and another took the entry over: its attempt counts
            log.info("reversal of txn %s: %s; left to it", entry.txn_id, exc)
        except StateConflict as exc:
            # it moved on while this attempt was out: acknowledged (by another instance's attempt, or
            # this one's late answer), or dropped by an operator: nothing left to record
            log.info("reversal of txn %s moved on meanwhile: %s", entry.txn_id, exc)
        except Exception as exc:
            # an operator may have dropped the entry meanwhile, or the journal hiccupped: log it and
            # let the next poll look again; the sender (and with it the gateway) must keep running.
            # A failing journal fails every attempt: one traceback per episode, then counts.
            key = "reversal journal write" if isinstance(exc, StoreError) else f"reversal attempt {entry.saf_id}"
            self.faults.error(key, "reversal attempt for txn %s failed inside the gateway", entry.txn_id,
                              exc_info=True)
        finally:
            self._busy.discard(entry.saf_id)
            self._ended_during_read.add(entry.saf_id)

    async def _send(self, entry: SafEntry) -> None:
        attempts: int = entry.attempts
        identical = self.config.repeat == "identical"
        if identical:
            # the journal says whether this reversal may have gone out already: an attempt was counted,
            # or its STAN was fixed (which happens before any send)
            repeat = entry.is_repeat
            if entry.reversal_stan is None:
                # write before you send: the STAN and field 7 every attempt of this reversal carries
                stan, stamped = await self.store.record_reversal_ident(entry.saf_id, *self.link.allocate())
                entry = replace(entry, reversal_stan=stan, reversal_datetime=stamped)
        else:
            # an entry queued before this process started may have reached the host just before the old
            # process died, though no attempt was recorded
            repeat = entry.is_repeat or entry.queued_at < self._started_at
        msg = build_host_reversal(entry, repeat=repeat, acquirer_id=self.acquirer_id,
                                  forwarding_id=self.forwarding_id, advice=self.config.upstream_mti == "0420")
        if not identical:
            self.link.stamp(msg)
        try:
            reply = await self.link.request(msg)
        except HostNotSent:
            return  # not sent: no attempt used
        except HostTimeout as exc:
            self.metrics.reversals_sent.inc()
            await self._failed(entry, attempts + 1, f"timeout: {exc}")
            return
        self.metrics.reversals_sent.inc()
        rc = reply.message.get("39")
        if rc == RC_ORIGINAL_NOT_FOUND and reply.mac_ok and host_approved_original(entry):
            await self._failed(entry, attempts + 1, f"host answered {rc} but approved the original "
                                                    f"(rc {entry.txn.rc}, auth {entry.txn.auth_code or '-'})")
        elif rc in FINAL_RCS and reply.mac_ok:
            if await self.store.ack_reversal(entry.saf_id, rc, attempt_at=time.time()):
                self.metrics.reversals_acknowledged.inc()
                log.info("reversal of txn %s acknowledged by the host (rc %s, attempt %d)",
                         entry.txn_id, rc, attempts + 1)
            else:
                await self._failed(entry, attempts + 1, f"host answered {rc} but approved the original late")
        else:
            said = rc if rc is not None else "without a response code"  # the operator sees this line
            await self._failed(entry, attempts + 1, f"host answered {said}" + ("" if reply.mac_ok else " (bad MAC)"))

    async def _failed(self, entry: SafEntry, attempts: int, error: str) -> None:
        saf_id = entry.saf_id
        if attempts >= self.config.max_attempts:
            reason = f"gave up after {attempts} attempts: {error}"
            await self.store.park_reversal(saf_id, reason, final_attempt_at=time.time())
            self.metrics.reversals_parked.inc()
            log.error("reversal of txn %s parked for an operator: %s", entry.txn_id, reason)
            return
        schedule = self.config.backoff
        delay = schedule[min(attempts - 1, len(schedule) - 1)]
        now = time.time()
        await self.store.mark_reversal_attempt(saf_id, now, now + delay, error)
        log.warning("reversal of txn %s attempt %d failed (%s); next in %.1fs",
                    entry.txn_id, attempts, error, delay)
