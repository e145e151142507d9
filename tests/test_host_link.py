"""The host link against the host simulator: idle echo tests, a dead host recycled, answers out of
order matched by the configured key, sign-on and key exchange on every connect."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from gateway.lab import CARD_CUP, CARD_VISA, open_lab
from gateway.sim.host_rules import Fault

pytestmark = pytest.mark.anyio


async def test_echo_tests_on_idle_from_the_gateway_side(tmp_path: Path) -> None:
    async with open_lab(tmp_path, host_options={"echo_interval": 0.2}) as lab:
        await anyio.sleep(1.0)
        stats = lab.host.stats
        echoes = stats.messages["0800"] - stats.sign_ons - stats.key_exchanges
        assert echoes >= 2
        assert lab.gateway.link.ready


async def test_unanswered_echo_recycles_the_connection(tmp_path: Path) -> None:
    # 0800 number 4 on the first connection is the first echo (sign-on, ZPK, ZAK come first)
    async with open_lab(tmp_path, host_timeout=0.3, host_options={"echo_interval": 0.2},
                        faults=[Fault("drop", mti=("0800",), nth=4)]) as lab:
        with anyio.fail_after(5):
            while lab.host.stats.sign_ons < 2:
                await anyio.sleep(0.05)
            await lab.gateway.link.wait_signed_on()
        assert lab.host.stats.key_exchanges >= 4  # fresh zone keys on the new connection too
        t = lab.terminal()
        await t.connect()
        await t.sign_in()
        assert (await t.purchase(1_000, CARD_CUP)).approved


@pytest.mark.parametrize("match_key", [("mti_class", "stan", "terminal"), ("mti_class", "stan")])
async def test_answers_out_of_order_reach_their_requests(tmp_path: Path, match_key: tuple[str, ...]) -> None:
    async with open_lab(tmp_path, host_options={"match_key": match_key},
                        faults=[Fault("delay", seconds=0.5, pan=CARD_CUP.pan, mti=("0200",))]) as lab:
        t = lab.terminal()
        await t.connect()
        await t.sign_in()
        finished: list[str] = []

        async def buy(card: object, amount: int) -> None:
            result = await t.purchase(amount, card)  # type: ignore[arg-type]
            assert result.approved and result.amount == amount
            finished.append(card.pan)  # type: ignore[attr-defined]

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(buy, CARD_CUP, 1_111)
                await anyio.sleep(0.05)
                tg.start_soon(buy, CARD_VISA, 2_222)
        assert finished == [CARD_VISA.pan, CARD_CUP.pan]  # the slow one was answered last
