"""Reads the reversal queue's state into metrics every few seconds: how many reversals are parked for
an operator and how long the oldest pending one has waited (the alerts in deploy/prometheus/alerts.yml
watch both).

One grouped query per interval (`Store.saf_summary`), off the money path; the age itself is computed at
scrape time from the queue time read here, so it keeps growing between two reads. A failing read is
logged once per failure episode and leaves the last values in place: a journal that cannot be read is
what `/readyz` and the journal alert report.
"""

from __future__ import annotations

import logging
from typing import Final

import anyio
import anyio.abc

from gateway.metrics import Metrics
from gateway.store.base import Store

log = logging.getLogger("gateway.saf")

#: seconds between two reads of the queue: far below any sensible alert threshold
DEFAULT_INTERVAL: Final = 5.0


async def watch_saf(store: Store, metrics: Metrics, interval: float = DEFAULT_INTERVAL, *,
                    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    """Until cancelled: read the queue's summary into `metrics.saf`, first at once, then every `interval`."""
    failing = False
    task_status.started()
    while True:
        try:
            summary = await store.saf_summary()
        except Exception as exc:
            if not failing:
                log.warning("cannot read the reversal queue for its metrics: %s", exc)
            failing = True
        else:
            if failing:
                log.info("reversal queue readable again")
            failing = False
            metrics.saf.update(parked=summary.parked, oldest_pending_queued_at=summary.oldest_pending_queued_at)
        await anyio.sleep(interval)
