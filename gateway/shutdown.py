"""Graceful shutdown: what `gateway serve` does on its first SIGTERM or SIGINT before it exits 0.

1. Stop accepting terminals (the listener closes, open connections stay); /readyz answers 503 (its
   check `not_draining` fails); new financial requests on the open connections are refused at once (91), while terminal
   reversals, sign-ins and settlements are still served.
2. Wait, up to host.timeout + terminal write_timeout, for the requests in flight. Each ends the way any
   request ends: its answer delivered, or 98 with its reversal queued, or an approval that could not be
   delivered reversed. Nothing is cut off mid-exchange.
3. A bounded last try, host.timeout each: the journal retry queue writes what it keeps in memory, and
   the SAF sends the reversals that are due.
4. One summary line: answered, reversals queued, reversals still in the SAF (sent by the next start),
   requests left for start-up recovery; then the caller stops everything.

A second signal stops at once (`gateway.serve`); start-up recovery settles whatever is left, as it
always could.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from gateway.store.errors import StoreError
from gateway.store.records import SafState

if TYPE_CHECKING:
    from gateway.serve import RunningGateway

log = logging.getLogger("gateway")

#: how often the drain looks at what is still going on
POLL = 0.02


@dataclass(frozen=True, slots=True)
class DrainSummary:
    seconds: float
    answered: int  #: answers written to terminals during the drain
    reversals_queued: int  #: reversals this process queued during the drain
    still_in_flight: int  #: requests still being processed when the wait ended
    saf_pending: int  #: reversals still queued at the end (persistent: the next start sends them)
    pending: int  #: journal rows with no outcome (start-up recovery reverses them)
    kept_in_memory: int  #: journal writes the journal never took (lost with the process)

    @property
    def left_for_recovery(self) -> int:
        return self.pending + self.kept_in_memory

    def __str__(self) -> str:
        return (f"drained in {self.seconds:.2f}s: {self.answered} answered, {self.reversals_queued} reversals "
                f"queued, {self.saf_pending} reversals still to send, {self.left_for_recovery} left for "
                f"recovery ({self.pending} pending in the journal, {self.kept_in_memory} writes kept in memory, "
                f"{self.still_in_flight} requests still in flight)")


async def drain(gateway: RunningGateway) -> DrainSummary:
    service, store = gateway.service, gateway.store
    config = service.config
    started = anyio.current_time()
    answered, queued = service.answered, service.reversals_queued
    service.draining = True
    if gateway.server is not None:
        gateway.server.stop_accepting()
    log.warning("draining: no new terminals or purchases; %d requests in flight", service.active)

    with anyio.move_on_after(config.host.timeout + config.terminal_side.write_timeout):
        while service.active:
            await anyio.sleep(POLL)
    still_in_flight = service.active

    await service.journal_retry.flush(config.host.timeout)
    gateway.saf.wake()
    with anyio.move_on_after(config.host.timeout):
        while gateway.link.ready and await _reversals_due(gateway):
            await anyio.sleep(POLL)

    pending = saf_pending = 0
    try:
        pending = len(await store.unknown_outcomes())
        saf_pending = len(await store.list_saf(SafState.PENDING))
    except StoreError as exc:
        log.error("could not read the journal for the shutdown summary: %s", exc)
    summary = DrainSummary(
        seconds=anyio.current_time() - started, answered=service.answered - answered,
        reversals_queued=service.reversals_queued - queued, still_in_flight=still_in_flight,
        saf_pending=saf_pending, pending=pending, kept_in_memory=service.journal_retry.backlog,
    )
    log.warning("%s", summary)
    for what in service.journal_retry.kept():
        log.error("not journalled before exit: %s", what)
    return summary


async def _reversals_due(gateway: RunningGateway) -> bool:
    """Some reversal is due now (or being sent): the SAF's last try is not over."""
    try:
        return bool(await gateway.store.due_reversals(time.time(), 1))
    except StoreError:
        return False
