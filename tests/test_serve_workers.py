"""Issue 15 item 5: `gateway serve --workers 2` on PostgreSQL, a real process group over loopback with
the host simulator in this process.

Purchases through both workers are approved (each worker's own /metrics shows it served some, the
group's one scrape shows their sum); a SIGKILLed worker is restarted by the parent under its instance
id, counted, and the merged counters carry what it had counted; SIGTERM with purchases in flight on
both workers drains the group: every one answered, exit 0, nothing pending in the journal; with
SQLite, `--workers 2` is refused naming [store] url.

The host simulator serves every worker's link with that link's own zone keys.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import anyio.abc
import psycopg
import pytest
from crash_support import free_port
from fault_support import REPO, ChildSetup, PipedGateway, http_get, wait_until_up, write_child_config
from prometheus_client.parser import text_string_to_metric_families

import gateway.workers as workers_module
from gateway.lab import CARD_CUP_2, LAB_ACCOUNTS, LOOPBACK, MERCHANT_ID, terminal_ids
from gateway.security.algorithms import generate_key
from gateway.sim.host import HostSimConfig, HostSimulator
from gateway.sim.host_rules import Fault, HostRulesConfig
from gateway.sim.terminal import TerminalSimulator

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

HOST_TIMEOUT = 2.0
#: connections per round: the kernel spreads them over the workers by a hash of the addresses, so all
#: of them landing on one of two workers has a chance of 2 in 2**24
TERMINALS = 24


class GroupGateway(PipedGateway):
    """The supervisor's output pipe is also its workers': it can still be open when the clean-up closes
    it (the supervisor gone, a worker still exiting), which is not the test's failure."""

    async def _read_output(self, process: anyio.abc.Process) -> None:
        with contextlib.suppress(anyio.ClosedResourceError):
            await super()._read_output(process)


def approved_purchases(metrics_text: str, worker: str | None = None) -> float:
    """gateway_messages_total{direction=terminal_out, mti=0210, rc=00} (of one worker label, if given)."""
    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == "gateway_messages_total" and s.labels.get("direction") == "terminal_out" \
                    and s.labels.get("mti") == "0210" and s.labels.get("rc") == "00":
                assert "worker" not in s.labels, "counters are summed over the workers, not labelled"
                total += s.value
    return total


def sample(metrics_text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def pg_config(tmp_path: Path, setup: ChildSetup, url: str) -> Path:
    """The child's configuration on PostgreSQL: its workers share the host simulator, each link with
    its own zone keys."""
    path = write_child_config(tmp_path / "gateway.toml", setup)
    text = path.read_text().replace(f'path = "{setup.journal}"', f'url = "{url}"\ninstance_id = "gw"')
    path.write_text(text)
    return path


async def workers(admin_port: int) -> list[dict[str, object]]:
    status, body = await http_get(admin_port, "/workers")
    assert status == 200, body
    rows: list[dict[str, object]] = json.loads(body)["workers"]
    return rows


async def buy_round(setup: ChildSetup, tmks: dict[str, bytes], first_amount: int) -> list[str]:
    """Each terminal on a new connection: sign in, one purchase; the answer codes."""
    rcs: list[str] = []

    async def one(i: int, tid: str) -> None:
        term = TerminalSimulator(LOOPBACK, setup.terminal_port, tid, MERCHANT_ID, tmks[tid], cards=(CARD_CUP_2,),
                                 timeout=3 * HOST_TIMEOUT, auto_reverse=False)
        try:
            await term.connect()
            await term.sign_in()
            rcs.append((await term.purchase(first_amount + i, CARD_CUP_2)).rc)
        finally:
            await term.aclose()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for i, tid in enumerate(tmks):
                tg.start_soon(one, i, tid)
    return rcs


def journal_states(url: str) -> dict[str, int]:
    with psycopg.connect(url, connect_timeout=5) as conn:
        return dict(conn.execute("SELECT state, count(*) FROM txn GROUP BY state").fetchall())


async def test_two_workers_serve_merge_metrics_restart_and_drain(
        tmp_path: Path, pg_url: str, anyio_backend: tuple[str, dict[str, object]]) -> None:
    zmk = generate_key(16)
    tmks = {tid: generate_key(16) for tid in terminal_ids(3 * TERMINALS)}
    first, second, third = (dict(list(tmks.items())[i * TERMINALS:(i + 1) * TERMINALS]) for i in range(3))
    host = HostSimulator(HostSimConfig(zmk=zmk, rules=HostRulesConfig(accounts=LAB_ACCOUNTS, limit=2_000_000)))
    async with anyio.create_task_group() as tg:
        host_port = await tg.start(host.serve, LOOPBACK, 0)
        setup = ChildSetup(free_port(), free_port(), host_port, zmk, tmks, MERCHANT_ID, tmp_path / "unused.db",
                           HOST_TIMEOUT)
        gateway = GroupGateway(pg_config(tmp_path, setup, pg_url), anyio_backend[0])
        gateway.command += ["--workers", "2"]
        await gateway.start(tg)
        try:
            await wait_until_up(gateway, setup.admin_port, timeout=60)
            before = {str(w["worker"]): w for w in await workers(setup.admin_port)}
            assert [w["instance_id"] for w in before.values()] == ["gw-w0", "gw-w1"]

            rcs = await buy_round(setup, first, 1_000)
            assert rcs == ["00"] * TERMINALS, rcs
            per_worker = {}
            for key, w in before.items():
                status, text = await http_get(int(str(w["admin_port"])), "/metrics")
                assert status == 200
                per_worker[key] = approved_purchases(text)
            assert all(n > 0 for n in per_worker.values()), f"one worker served everything: {per_worker}"
            status, merged = await http_get(setup.admin_port, "/metrics")
            assert status == 200
            assert approved_purchases(merged) == sum(per_worker.values()) == TERMINALS, per_worker
            assert sample(merged, "gateway_workers") == 2
            assert sample(merged, "gateway_in_flight_transactions", worker="1") is not None  # gauges: per worker

            # a worker dies: the parent restarts it under the same instance id and counts it
            killed = int(str(before["1"]["pid"]))
            os.kill(killed, signal.SIGKILL)
            with anyio.fail_after(30):
                while True:
                    now = {str(w["worker"]): w for w in await workers(setup.admin_port)}
                    if now["1"]["up"] and now["1"]["pid"] not in (None, killed):
                        break
                    await anyio.sleep(0.1)
            assert now["1"]["restarts"] == 1 and now["1"]["last_exit"] == -signal.SIGKILL, now
            assert now["0"]["pid"] == before["0"]["pid"]  # the other worker was left alone
            await wait_until_up(gateway, setup.admin_port, timeout=30)

            rcs = await buy_round(setup, second, 2_000)
            assert rcs == ["00"] * TERMINALS, rcs
            status, merged = await http_get(setup.admin_port, "/metrics")
            # the dead worker's counts are carried: the sum never goes back
            assert approved_purchases(merged) == 2 * TERMINALS
            assert sample(merged, "gateway_worker_restarts_total", worker="1") == 1
            assert "killed by SIGKILL" in gateway.text and "restarting it in" in gateway.text

            # SIGTERM with a round in flight (the host answers after 1 s): both workers drain, every
            # purchase is answered, the group exits 0
            host.faults.set([Fault("delay", seconds=1.0, pan=CARD_CUP_2.pan, mti=("0200",))])
            at_host = host.stats.messages["0200"]
            async with anyio.create_task_group() as buyers:
                last: list[str] = []

                async def third_round() -> None:
                    last.extend(await buy_round(setup, third, 3_000))

                buyers.start_soon(third_round)
                with anyio.fail_after(20):
                    while host.stats.messages["0200"] < at_host + TERMINALS:
                        await anyio.sleep(0.01)
                gateway.signal(signal.SIGTERM)
            code = await gateway.wait(3 * HOST_TIMEOUT + 20)
            assert last == ["00"] * TERMINALS, last
        finally:
            await gateway.stop_quietly()
            (tmp_path / "gateway.log").write_text(gateway.text)  # the group's log, to read after a failure
        tg.cancel_scope.cancel()
    assert code == 0, gateway.tail()
    drained = re.findall(r"drained in [0-9.]+s: (\d+) answered, (\d+) reversals queued", gateway.text)
    assert len(drained) == 2 and sum(int(a) for a, _ in drained) == TERMINALS, drained  # both, the round's
    assert all(q == "0" for _, q in drained), drained
    # the workers share the group's stderr: each line says whose it is
    assert set(re.findall(r"worker (\d) [\w.]+: drained in", gateway.text)) == {"0", "1"}, gateway.tail()
    assert journal_states(pg_url) == {"completed": 3 * TERMINALS}
    booked = [e for e in host.rules.ledger.values() if e.kind == "purchase" and e.approved]
    assert len(booked) == 3 * TERMINALS and not any(e.reversed for e in booked)


def test_sqlite_refuses_more_than_one_worker(tmp_path: Path) -> None:
    setup = ChildSetup(free_port(), free_port(), free_port(), generate_key(16), {}, MERCHANT_ID,
                       tmp_path / "journal.db", HOST_TIMEOUT)
    config = write_child_config(tmp_path / "gateway.toml", setup)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--workers", "2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--workers 2 needs the PostgreSQL store: set [store] url" in done.stdout, done.stdout
    assert not (tmp_path / "journal.db").exists()  # refused before anything was opened


def gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped by whoever adopted it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


async def test_workers_drain_and_exit_when_the_parent_is_killed(
        tmp_path: Path, pg_url: str, anyio_backend: tuple[str, dict[str, object]]) -> None:
    zmk = generate_key(16)
    tmks = {tid: generate_key(16) for tid in terminal_ids(4)}
    host = HostSimulator(HostSimConfig(zmk=zmk, rules=HostRulesConfig(accounts=LAB_ACCOUNTS, limit=2_000_000)))
    async with anyio.create_task_group() as tg:
        host_port = await tg.start(host.serve, LOOPBACK, 0)
        setup = ChildSetup(free_port(), free_port(), host_port, zmk, tmks, MERCHANT_ID, tmp_path / "unused.db",
                           HOST_TIMEOUT)
        gateway = GroupGateway(pg_config(tmp_path, setup, pg_url), anyio_backend[0])
        gateway.command += ["--workers", "2"]
        await gateway.start(tg)
        pids: list[int] = []
        try:
            await wait_until_up(gateway, setup.admin_port, timeout=60)
            pids = [int(str(w["pid"])) for w in await workers(setup.admin_port)]
            assert await buy_round(setup, tmks, 1_000) == ["00"] * 4
            gateway.signal(signal.SIGKILL)  # the supervisor only: its workers are in a session of their own
            await gateway.wait(10)
            with anyio.fail_after(3 * HOST_TIMEOUT + 10):
                while not all(gone(pid) for pid in pids):
                    await anyio.sleep(0.05)
        finally:
            for pid in pids:  # the test's own grandchildren, by pid, if they outlived the check
                if not gone(pid):
                    os.kill(pid, signal.SIGKILL)
            await gateway.stop_quietly()
            (tmp_path / "gateway.log").write_text(gateway.text)  # the group's log, to read after a failure
        tg.cancel_scope.cancel()
    assert journal_states(pg_url) == {"completed": 4}


async def test_a_worker_that_keeps_dying_makes_the_group_give_up_with_exit_1(
        tmp_path: Path, pg_url: str, anyio_backend: tuple[str, dict[str, object]]) -> None:
    """MAX_RESTARTS restarts within RESTART_WINDOW and one more death: the parent stops restarting and exits
    1, so a supervisor such as systemd sees a failure rather than a restart loop that never ends."""
    if anyio_backend[0] != "asyncio":
        pytest.skip("the supervisor's restart logic does not depend on the backend; ~20 s of back-off once is enough")
    zmk = generate_key(16)
    tmks = {tid: generate_key(16) for tid in terminal_ids(1)}
    host = HostSimulator(HostSimConfig(zmk=zmk, rules=HostRulesConfig(accounts=LAB_ACCOUNTS, limit=2_000_000)))
    async with anyio.create_task_group() as tg:
        host_port = await tg.start(host.serve, LOOPBACK, 0)
        setup = ChildSetup(free_port(), free_port(), host_port, zmk, tmks, MERCHANT_ID, tmp_path / "unused.db",
                           HOST_TIMEOUT)
        gateway = GroupGateway(pg_config(tmp_path, setup, pg_url), anyio_backend[0])
        gateway.command += ["--workers", "2"]  # (one worker is a plain gateway, with no supervisor)
        await gateway.start(tg)
        killed: list[int] = []
        try:
            await wait_until_up(gateway, setup.admin_port, timeout=60)
            with anyio.fail_after(120):  # back-off 0.5+1+2+4+8 s, plus six starts
                while len(killed) <= workers_module.MAX_RESTARTS and gateway.running():
                    try:
                        row = (await workers(setup.admin_port))[1]
                    except (OSError, AssertionError):  # the parent is giving up and closing its endpoint
                        break
                    pid = row["pid"]
                    if row["up"] and pid is not None and int(str(pid)) not in killed:
                        killed.append(int(str(pid)))
                        os.kill(killed[-1], signal.SIGKILL)
                    await anyio.sleep(0.05)
                code = await gateway.wait(30)
        finally:
            await gateway.stop_quietly()
            (tmp_path / "gateway.log").write_text(gateway.text)
        tg.cancel_scope.cancel()
    assert code == 1, gateway.tail()
    assert len(killed) == workers_module.MAX_RESTARTS + 1, killed
    assert f"{workers_module.MAX_RESTARTS} restarts within" in gateway.text and "giving up on the group" in gateway.text
    assert gateway.text.count("restarting it in") == workers_module.MAX_RESTARTS
    assert "worker 0 gateway: drained in" in gateway.text  # the healthy worker was drained, not cut off
