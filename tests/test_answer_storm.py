"""An answer storm from the host: thousands of unmatched answers in one burst (stray, replayed, or very
late) while honest purchases go through. The host reader must never wait for the journal: the honest
answers behind the storm reach their requests in time (no 98, nothing reversed), the unmatched ones are
journalled in batches, and whatever the bounded backlog cannot hold is dropped, counted and logged."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import anyio
import pytest

from gateway.iso.message import Message
from gateway.lab import CARD_CUP, open_lab
from gateway.net.host_link import LATE_ANSWER_BACKLOG, HostReply, _LateAnswers
from gateway.sim.terminal import TxnResult

pytestmark = pytest.mark.anyio

STORM = 3_000 * (3 if os.environ.get("GATEWAY_HEAVY") == "1" else 1)
HONEST = 15


def stray_answer(i: int) -> Message:
    """A 0210 approval for a STAN this gateway never used (its STANs start at 1 in a fresh journal)."""
    return Message("0210", {
        "3": "000000", "4": f"{1_000 + i:012d}", "7": "1201120000", "11": f"{500_000 + i:06d}",
        "32": "00000001234", "37": f"{i:012d}", "38": "AB1234", "39": "00", "41": "10000001",
    })


async def test_an_answer_storm_does_not_stall_honest_answers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.host")
    async with open_lab(tmp_path, host_timeout=2.0) as lab:
        t = lab.terminal()
        await t.connect()
        await t.sign_in()
        results: list[TxnResult] = []
        started = anyio.current_time()
        async with anyio.create_task_group() as tg:

            async def honest() -> None:
                for _ in range(HONEST):
                    results.append(await t.purchase(1_000, CARD_CUP))
                    await anyio.sleep(0.1)

            tg.start_soon(honest)
            await anyio.sleep(0.2)
            storm = [stray_answer(i) for i in range(STORM)]
            assert await lab.host.send_unsolicited(storm) == 1
        seconds = anyio.current_time() - started
        rcs = [r.rc for r in results]
        assert rcs == ["00"] * HONEST, f"honest purchases during the storm got {rcs} ({seconds:.1f}s)"
        assert not any(r.reversal for r in results)

        registry = lab.gateway.metrics.registry
        seen = registry.get_sample_value("gateway_late_host_answers_total")
        with anyio.fail_after(60):
            while True:  # the journal catches up in batches after the burst
                journalled = len(await lab.gateway.store.late_answers(limit=10 * STORM))
                dropped = registry.get_sample_value("gateway_late_host_answers_dropped_total") or 0.0
                if journalled + dropped >= STORM:
                    break
                await anyio.sleep(0.2)
        assert seen == STORM and journalled + dropped == STORM
        assert journalled >= LATE_ANSWER_BACKLOG  # at least a full backlog's worth was kept
        drop_lines = [r for r in caplog.records if "dropped" in r.getMessage()]
        assert (dropped > 0) == bool(drop_lines)
        assert len(drop_lines) <= seconds + 2  # counted lines, not one per answer


def test_a_full_backlog_drops_anything_before_a_verified_approval() -> None:
    def reply(stan: int, rc: str = "00", mac_ok: bool = True) -> HostReply:
        return HostReply(Message("0210", {"11": f"{stan:06d}", "39": rc}), mac_ok)

    backlog = _LateAnswers(3)
    assert backlog.put(reply(1)) is None
    assert backlog.put(reply(2, mac_ok=False)) is None
    assert backlog.put(reply(3, rc="05")) is None
    unverified = reply(4, mac_ok=False)
    assert backlog.put(unverified) is unverified  # full: the newcomer is dropped...
    dropped = backlog.put(reply(5))  # ...unless it is a verified approval: the oldest other one makes way
    assert dropped is not None and dropped.message.fields["11"] == "000002"
    assert backlog.put(reply(6)) is not None and backlog.put(reply(7)) is not None
    assert [a.message.fields["11"] for a in backlog._items] == ["000001", "000005", "000006"]
    assert backlog.put(reply(8)).message.fields["11"] == "000008"  # type: ignore[union-attr]  # all verified: newest
