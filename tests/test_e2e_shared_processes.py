"""Shared terminal sessions between real `gateway serve` processes: `--workers 2` on PostgreSQL, the kernel
spreading connections over the workers (SO_REUSEPORT), an LMK file for the shared working keys.

A terminal signs in once, then makes every purchase on a new connection (as CUP terminals do): each is
approved, whichever worker it lands on, and the journal shows both workers served that one terminal. So
a sign-in on one process serves purchases on the other, through `gateway serve`'s own configuration.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import psycopg
import pytest
from crash_support import free_port
from fault_support import ChildSetup, PipedGateway, wait_until_up, write_child_config

from gateway.lab import CARD_CUP_2, LAB_ACCOUNTS, LOOPBACK, MERCHANT_ID, terminal_ids
from gateway.security.algorithms import generate_key
from gateway.security.keystore import write_lmk_file
from gateway.sim.host import HostSimConfig, HostSimulator
from gateway.sim.host_rules import HostRulesConfig
from gateway.sim.terminal import TerminalSimulator

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

HOST_TIMEOUT = 2.0
#: purchases, each on its own connection: all of them on one of two workers has a chance of 2 in 2**16
PURCHASES = 16


def shared_config(tmp_path: Path, setup: ChildSetup, url: str) -> Path:
    path = write_child_config(tmp_path / "gateway.toml", setup)
    lmk = tmp_path / "lmk"
    write_lmk_file(lmk)
    text = path.read_text().replace(f'path = "{setup.journal}"', f'url = "{url}"\ninstance_id = "gw"')
    text = text.replace(f'zmk = "{setup.zmk.hex().upper()}"', f'zmk = "{setup.zmk.hex().upper()}"\nlmk_file = "{lmk}"')
    assert "lmk_file" in text and "url =" in text
    path.write_text(text)
    return path


async def test_a_sign_in_on_one_worker_serves_purchases_on_the_other(
        tmp_path: Path, pg_url: str, anyio_backend: tuple[str, dict[str, object]]) -> None:
    zmk = generate_key(16)
    tmks = {tid: generate_key(16) for tid in terminal_ids(1)}
    [tid] = tmks
    host = HostSimulator(HostSimConfig(zmk=zmk, rules=HostRulesConfig(accounts=LAB_ACCOUNTS, limit=2_000_000)))
    async with anyio.create_task_group() as tg:
        host_port = await tg.start(host.serve, LOOPBACK, 0)
        setup = ChildSetup(free_port(), free_port(), host_port, zmk, tmks, MERCHANT_ID, tmp_path / "unused.db",
                           HOST_TIMEOUT)
        gateway = PipedGateway(shared_config(tmp_path, setup, pg_url), anyio_backend[0])
        gateway.command += ["--workers", "2"]
        await gateway.start(tg)
        try:
            await wait_until_up(gateway, setup.admin_port, timeout=60)
            term = TerminalSimulator(LOOPBACK, setup.terminal_port, tid, MERCHANT_ID, tmks[tid], cards=(CARD_CUP_2,),
                                     timeout=3 * HOST_TIMEOUT, auto_reverse=False)
            rcs: list[str] = []
            with anyio.fail_after(60):
                await term.connect()
                await term.sign_in()
                for i in range(PURCHASES):
                    await term.aclose()
                    await term.connect()  # a new connection: either worker
                    rcs.append((await term.purchase(1_000 + i, CARD_CUP_2)).rc)
                await term.aclose()
            gateway.signal()
            code = await gateway.wait(3 * HOST_TIMEOUT + 20)
        finally:
            await gateway.stop_quietly()
            (tmp_path / "gateway.log").write_text(gateway.text)
        tg.cancel_scope.cancel()
    assert code == 0, gateway.text[-3000:]
    assert rcs == ["00"] * PURCHASES, (rcs, gateway.text[-3000:])
    assert "sessions stay per instance" not in gateway.text
    with psycopg.connect(pg_url, connect_timeout=5) as conn:
        owners = dict(conn.execute("SELECT owner, count(*) FROM txn WHERE terminal_id = %s GROUP BY owner",
                                   (tid,)).fetchall())
    assert set(owners) == {"gw-w0", "gw-w1"}, owners  # one sign-in, purchases on both workers
    assert sum(owners.values()) == PURCHASES
