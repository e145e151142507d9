"""Issue 11 items 1, 2 and 10: the journal fails while approvals are at a slow host, with the gateway
running on. A real `gateway serve` process, a real journal file, a write fault set from outside
(RLIMIT_FSIZE = 0 via prlimit(2): every write to a regular file fails, as on a full disk), a host
simulator in this process, terminal simulators on loopback.

While the fault lasts: three purchases at the host time out (98) and are approved late, three are
approved in time and delivered (receipts), and new purchases are refused (96). Their outcomes cannot be
journalled. Once the fault is lifted, and with no restart:

- every host approval is either a receipt or reversed at the host within 2 × host.timeout;
- the delivered approvals end `completed`, not reversed (no printed receipt for a reversed sale);
- the late answers are on record, nothing is left `pending`, /readyz is ready again;
- the gateway logged one traceback for the whole fault, not one per refused purchase.
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

import anyio
import pytest
from crash_support import free_port
from fault_support import ChildSetup, PipedGateway, http_get, wait_until_up, write_child_config

from gateway.lab import CARD_CUP, CARD_CUP_2, CARD_VISA, LAB_ACCOUNTS, LOOPBACK, MERCHANT_ID, terminal_ids
from gateway.security.algorithms import generate_key
from gateway.sim.host import HostSimConfig, HostSimulator
from gateway.sim.host_rules import Fault, HostRulesConfig
from gateway.sim.terminal import TerminalSimulator, TxnResult

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

HOST_TIMEOUT = 1.5
LATE = HOST_TIMEOUT + 1.0  #: the host approves these after the gateway stopped waiting
IN_TIME = 0.7  #: the host approves these in time, while the journal is failing
REFUSED_DURING_FAULT = 12  #: purchases sent while the journal cannot be written
TRACEBACK = "Traceback (most recent call last)"


def journal_rows(journal: Path) -> tuple[Counter[str], int, int]:
    """(transaction states, late answers, open SAF entries) from the live journal, read-only."""
    with closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5.0)) as conn:
        states = Counter(s for (s,) in conn.execute("SELECT state FROM txn"))
        late = conn.execute("SELECT count(*) FROM late_answer").fetchone()[0]
        open_saf = conn.execute("SELECT count(*) FROM saf WHERE state <> 'done'").fetchone()[0]
    return states, int(late), int(open_saf)


def refusal_reasons(journal: Path) -> Counter[str]:
    with closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5.0)) as conn:
        return Counter(reason.split(":")[0] for (reason,) in conn.execute("SELECT reason FROM refusal"))


async def test_a_journal_fault_settles_every_unknown_outcome_once_the_disk_is_back(
    tmp_path: Path, anyio_backend: tuple[str, dict[str, object]]
) -> None:
    zmk = generate_key(16)
    tids = terminal_ids(7)
    tmks = {tid: generate_key(16) for tid in tids}
    host = HostSimulator(HostSimConfig(zmk=zmk, rules=HostRulesConfig(accounts=LAB_ACCOUNTS, limit=2_000_000)))
    opening = dict(host.rules.balances)
    journal = tmp_path / "journal.db"
    terminals: list[TerminalSimulator] = []
    async with anyio.create_task_group() as tg:
        host_port = await tg.start(host.serve, LOOPBACK, 0)
        setup = ChildSetup(free_port(), free_port(), host_port, zmk, tmks, MERCHANT_ID, journal, HOST_TIMEOUT)
        gateway = PipedGateway(write_child_config(tmp_path / "gateway.toml", setup), anyio_backend[0])
        try:
            await gateway.start(tg)
            await wait_until_up(gateway, setup.admin_port)
            pid = gateway.pid
            for tid in tids:
                term = TerminalSimulator(LOOPBACK, setup.terminal_port, tid, MERCHANT_ID, tmks[tid],
                                         cards=(CARD_CUP, CARD_CUP_2, CARD_VISA), timeout=HOST_TIMEOUT + 5,
                                         auto_reverse=False)  # the gateway must settle them by itself
                terminals.append(term)
                await term.connect()
                await term.sign_in()
            warm_up = await terminals[0].purchase(100, CARD_VISA)
            assert warm_up.approved

            # --- six purchases go to a slow host; the journal fails while they are there -------------------
            host.faults.set([Fault("delay", seconds=LATE, pan=CARD_CUP.pan, mti=("0200",)),
                             Fault("delay", seconds=IN_TIME, pan=CARD_CUP_2.pan, mti=("0200",))])
            sent_before = host.stats.messages["0200"]
            results: dict[int, TxnResult] = {}

            async def buy(i: int) -> None:
                card = CARD_CUP if i < 3 else CARD_CUP_2
                results[i] = await terminals[i].purchase(1_000 + i, card)

            async with anyio.create_task_group() as buyers:
                for i in range(6):
                    buyers.start_soon(buy, i)
                with anyio.fail_after(10):
                    while host.stats.messages["0200"] < sent_before + 6:  # all six journalled and sent
                        await anyio.sleep(0.005)
                gateway.limit_file_size(0)
                fault_at = anyio.current_time()
                refused = [await terminals[6].purchase(10 + n, CARD_VISA) for n in range(REFUSED_DURING_FAULT)]
                status, body = await http_get(setup.admin_port, "/readyz")
                assert status == 503 and '"journal": false' in body, body
            assert all(r.approved for r in (results[3], results[4], results[5]))
            assert [r.rc for r in refused] == ["96"] * REFUSED_DURING_FAULT
            # the late approvals arrive while the journal still fails
            await anyio.sleep(max(0.0, fault_at + LATE + 0.3 - anyio.current_time()))
            late_approved = [e for e in host.rules.ledger.values() if e.approved and e.amount in (1_000, 1_001, 1_002)]
            assert len(late_approved) == 3 and not any(e.reversed for e in late_approved)
            assert journal_rows(journal)[0]["pending"] == 6, "the fault did not stop the journal"

            # --- the disk comes back ----------------------------------------------------------------------
            gateway.lift_file_size_limit()
            lifted_at = time.monotonic()
            while not all(e.reversed for e in late_approved) and time.monotonic() - lifted_at < 2 * HOST_TIMEOUT:
                await anyio.sleep(0.01)
            settled_after = time.monotonic() - lifted_at
            unsettled = sum(1 for e in late_approved if not e.reversed)
            assert not unsettled, (f"{unsettled} host approvals neither delivered nor reversed {settled_after:.1f}s "
                                   f"after the disk came back; journal {journal_rows(journal)[0]}")
            with anyio.fail_after(10):
                while True:
                    states, late, open_saf = journal_rows(journal)
                    if not states["pending"] and not states["reversal_queued"] and not open_saf:
                        break
                    await anyio.sleep(0.05)
            status, body = await http_get(setup.admin_port, "/readyz")

            # --- both books ---------------------------------------------------------------------------------
            assert gateway.running() and gateway.pid == pid, "the gateway restarted"
            receipts = {r.amount for r in (warm_up, *results.values()) if r.approved}
            standing = [e for e in host.rules.ledger.values() if e.kind == "purchase" and e.approved
                        and not e.reversed]
            assert sorted(e.amount for e in standing) == sorted(receipts), "approvals without a receipt stand"
            for account, balance in opening.items():
                charged = sum(e.amount for e in standing if e.account == account)
                assert host.balance(account) == balance - charged, account
            assert states == Counter({"completed": 4, "reversed": 3}), states  # the receipts are not reversed
            assert late == 3, "late approvals not journalled"
            # the purchases refused during the fault are on record too, with why
            assert refusal_reasons(journal)["journal write failed"] == REFUSED_DURING_FAULT, refusal_reasons(journal)
            assert [results[i].rc for i in range(6)] == ["98"] * 3 + ["00"] * 3  # a timeout is a 98, fault or not
            assert status == 200, body
            tracebacks = gateway.text.count(TRACEBACK)
            assert tracebacks == 1, f"{tracebacks} tracebacks for one fault episode:\n{gateway.tail()}"
            print(f"\njournal fault ({anyio_backend[0]}): settled {settled_after:.2f}s after the disk came back "
                  f"(bound {2 * HOST_TIMEOUT:.1f}s); {REFUSED_DURING_FAULT} purchases refused during the fault, "
                  f"{tracebacks} traceback(s) in {gateway.text.count(chr(10))} log lines; journal {dict(states)}")

            gateway.signal()
            assert await gateway.wait(3 * HOST_TIMEOUT + 5) == 0, gateway.tail()
        finally:
            for term in terminals:
                await term.aclose()
            await gateway.stop_quietly()
            tg.cancel_scope.cancel()
