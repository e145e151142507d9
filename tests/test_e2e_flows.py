"""End to end over real loopback sockets: simulated terminals → gateway → simulated host, with a real
SQLite journal and real cryptography. Every flow, every refusal code, host down/up, reconnect, and a
burst of concurrent purchases."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import anyio
import pytest

from gateway.config import LimitsConfig
from gateway.iso.build import OriginalData, TerminalIdent, cup
from gateway.iso.codec import Codec
from gateway.iso.framing import CupEnvelope, Frame, make_framer
from gateway.iso.message import Message
from gateway.iso.spec import load_dialect
from gateway.lab import CARD_CUP, CARD_CUP_2, CARD_LOW, CARD_VISA, LOOPBACK, MERCHANT_ID, lab_config, open_lab
from gateway.security.algorithms import cup_mac, generate_key
from gateway.security.keys import KeyUsage
from gateway.serve import run_gateway
from gateway.sim.host import HostSimConfig, HostSimulator
from gateway.sim.host_rules import Fault, HostRulesConfig
from gateway.sim.terminal import TerminalSimulator
from gateway.store.records import TxnState

pytestmark = pytest.mark.anyio

CUP = load_dialect("cup-pos")
CODEC = Codec(CUP)
ENVELOPE = CupEnvelope.from_hex("6000010000", "603100310000")


class RawTerminal:
    """A bare CUP client for messages a well-behaved terminal simulator would never send."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.framer = make_framer("cup", envelope=ENVELOPE)

    async def exchange(self, body: bytes, timeout: float = 5.0) -> Frame | None:
        """Send one body; the answer frame, or None when the gateway closed the connection."""
        async with await anyio.connect_tcp(LOOPBACK, self.port) as stream:
            await stream.send(self.framer.encode(body, ENVELOPE))
            decoder = self.framer.decoder()
            with anyio.fail_after(timeout):
                while True:
                    try:
                        chunk = await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        return None
                    frames = decoder.feed(chunk)
                    if frames:
                        return frames[0]

    async def send_bytes(self, data: bytes, timeout: float = 5.0) -> bool:
        """Send raw bytes; True when the gateway closed the connection (within the timeout)."""
        async with await anyio.connect_tcp(LOOPBACK, self.port) as stream:
            await stream.send(data)
            with anyio.fail_after(timeout):
                try:
                    while await stream.receive():
                        pass
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return True
        return False


def purchase_request(terminal_id: str, stan: str = "000123", batch: str = "000001") -> Message:
    return cup.purchase(TerminalIdent(terminal_id, MERCHANT_ID), stan, batch, 1_000, track2=CARD_CUP.track2)


def metric(lab: object, name: str, **labels: str) -> float:
    """One sample from the gateway's Prometheus registry (0 when the series does not exist yet)."""
    value = lab.gateway.metrics.registry.get_sample_value(name, labels)  # type: ignore[attr-defined]
    return value or 0.0


def host_key(rec: object, acquirer_id: str) -> str:
    """The host's name for a journalled transaction: field 90 of its reversal."""
    return OriginalData(rec.host_mti, rec.host_stan, rec.transmission_datetime, acquirer_id).pack()  # type: ignore[attr-defined]


async def wait_state(store: object, txn_id: int, state: TxnState, timeout: float = 8.0) -> object:
    with anyio.fail_after(timeout):
        while True:
            rec = await store.get(txn_id)  # type: ignore[attr-defined]
            if rec is not None and rec.state is state:
                return rec
            await anyio.sleep(0.05)


async def test_every_terminal_flow_end_to_end(tmp_path: Path) -> None:
    async with open_lab(tmp_path, terminals=2) as lab:
        t = lab.terminal()
        await t.connect()
        assert (await t.sign_in()).rc == "00"
        assert (await t.echo()).rc == "00"
        start = lab.host.balance(CARD_CUP.pan)

        p = await t.purchase(10_000, CARD_CUP)
        assert p.approved and p.rrn and p.mac_ok
        assert lab.host.balance(CARD_CUP.pan) == start - 10_000

        manual = await t.purchase(2_000, CARD_VISA, entry="manual")  # keyed PAN in field 2, no track
        assert manual.approved

        b = await t.balance(CARD_CUP)
        assert b.rc == "00" and b.balance == start - 10_000

        v = await t.void(manual)
        assert v.approved

        r = await t.refund(3_000, CARD_CUP, original=p)
        assert r.approved
        assert lab.host.balance(CARD_CUP.pan) == start - 10_000 + 3_000

        # the terminal's own reversal of an approved purchase goes upstream once, via the SAF
        p2 = await t.purchase(4_000, CARD_CUP_2)
        assert p2.approved
        rev = await t.reversal(p2, "96")
        assert rev.rc == "00"

        store = lab.gateway.store
        txns = {rec.terminal_stan: rec for rec in await store.list_transactions(terminal_id=t.ident.terminal_id)}
        assert txns[p.stan].state is TxnState.COMPLETED and txns[p.stan].rrn == p.rrn
        assert txns[v.stan].state is TxnState.COMPLETED and txns[v.stan].orig_txn_id == txns[manual.stan].txn_id
        assert txns[r.stan].kind == "refund" and txns[r.stan].orig_rrn == p.rrn
        await wait_state(store, txns[p2.stan].txn_id, TxnState.REVERSED)
        assert lab.host.reversal_count(host_key(txns[p2.stan], lab.config.host.acquirer_id)) == 1
        # the journal never keeps the PAN in clear, the PIN block or the track
        raw = (tmp_path / "journal.db").read_bytes() + (tmp_path / "journal.db-wal").read_bytes()
        for secret in (CARD_CUP.pan, CARD_VISA.pan, CARD_CUP.track2):
            assert secret.encode() not in raw

        s = await t.settle()
        assert s.rc == "00" and s.balanced, s
        assert t.batch == "000002"
        # after batch upload end the gateway moved the session to the next batch too
        assert (await t.purchase(1_000, CARD_CUP)).approved

        assert (await t.sign_off()).rc == "00"
        # signed off: the next request of that terminal gets 77 and the re-sign-in flag
        raw = RawTerminal(lab.gateway.terminal_port)
        answer = await raw.exchange(CODEC.encode(purchase_request(t.ident.terminal_id, batch=t.batch)))
        assert answer is not None and CODEC.decode(answer.body).fields["39"] == "77"


async def test_refusal_codes(tmp_path: Path) -> None:
    async with open_lab(tmp_path, terminals=2, limits=LimitsConfig(per_transaction=50_000, per_day=60_000)) as lab:
        raw = RawTerminal(lab.gateway.terminal_port)
        host_messages_before = sum(lab.host.stats.messages.values())

        # 97: a terminal id the gateway does not know
        answer = await raw.exchange(CODEC.encode(purchase_request("99999999")))
        assert answer is not None and CODEC.decode(answer.body).fields["39"] == "97"

        # 77 + header re-sign-in: a registered terminal that never signed in
        tid = lab.config.terminals[0].terminal_id
        answer = await raw.exchange(CODEC.encode(purchase_request(tid)))
        assert answer is not None
        msg = CODEC.decode(answer.body)
        assert msg.fields["39"] == "77" and "64" not in msg.fields
        assert answer.envelope is not None and answer.envelope.processing_requirement == 3
        assert answer.envelope.destination == ENVELOPE.source and answer.envelope.source == ENVELOPE.destination

        # 40: a transaction type the gateway does not support
        unsupported = purchase_request(tid)
        unsupported.fields["3"] = "330000"
        unsupported.fields["60"] = "99" + unsupported.fields["60"][2:]
        answer = await raw.exchange(CODEC.encode(unsupported))
        assert answer is not None and CODEC.decode(answer.body).fields["39"] == "40"
        assert sum(lab.host.stats.messages.values()) == host_messages_before  # 97, 77, 40: nothing upstream

        t = lab.terminal(tid)
        await t.connect()
        await t.sign_in()
        # 61: per transaction, then per day (the approved 40,000 counts against the 60,000 day)
        assert (await t.purchase(50_001, CARD_CUP)).rc == "61"
        assert (await t.purchase(40_000, CARD_CUP)).approved
        assert (await t.purchase(30_000, CARD_CUP)).rc == "61"
        # host declines pass through: 51 insufficient funds, 55 wrong PIN
        assert (await t.purchase(9_000, CARD_LOW)).rc == "51"
        assert (await t.purchase(1_000, CARD_CUP, pin="999999")).rc == "55"

        # A0: a MAC made with the wrong key; the answer carries no MAC and nothing goes upstream
        sent_before = sum(lab.host.stats.messages.values())
        good_mak = t._keys[KeyUsage.MAK]
        t._keys[KeyUsage.MAK] = generate_key(8)
        bad = await t.purchase(1_000, CARD_CUP)
        assert bad.rc == "A0" and "64" not in bad.fields
        t._keys[KeyUsage.MAK] = good_mak
        # 99: a PIN block under the wrong PIK
        good_pik = t._keys[KeyUsage.PIK]
        t._keys[KeyUsage.PIK] = generate_key(16)
        assert (await t.purchase(1_000, CARD_CUP)).rc == "99"
        t._keys[KeyUsage.PIK] = good_pik
        assert sum(lab.host.stats.messages.values()) == sent_before
        assert metric(lab, "gateway_mac_failures_total") >= 1

        # 30: valid MAC, but the message breaks its flow's rules (processing code against 60.1)
        inconsistent = purchase_request(tid, stan="000999")
        inconsistent.fields["3"] = "330000"
        body = CODEC.encode(inconsistent)
        body = body[:-8] + cup_mac(t._keys[KeyUsage.MAK], body[:-8])
        answer = await raw.exchange(body)
        assert answer is not None and CODEC.decode(answer.body).fields["39"] == "30"

        t2 = lab.terminal(lab.config.terminals[1].terminal_id)
        await t2.connect()
        await t2.sign_in()
        # 25 / 12: a void whose original is unknown, and a void of a declined purchase
        declined = await t2.purchase(9_000, CARD_LOW)
        assert declined.rc == "51"
        assert (await t2.void(dataclasses.replace(declined, rc="00", rrn="000000000000"))).rc == "12"
        ghost = dataclasses.replace(declined, stan="777777", rc="00", rrn="999999999999")
        assert (await t2.void(ghost)).rc == "25"

        # a frame the codec cannot decode: the connection is closed cleanly, a metric moves
        codec_errors = metric(lab, "gateway_decode_errors_total", kind="codec")
        closed = await raw.send_bytes(make_framer("cup").encode(b"\x02\x00garbage", ENVELOPE))
        assert closed
        assert metric(lab, "gateway_decode_errors_total", kind="codec") == codec_errors + 1
        # an oversized length prefix: closed too
        framing_errors = metric(lab, "gateway_decode_errors_total", kind="framing")
        assert await raw.send_bytes(b"\xff\xff" + b"\x60" * 32)
        assert metric(lab, "gateway_decode_errors_total", kind="framing") == framing_errors + 1

        # issue 11 item 13: every refusal the gateway decided itself is on record with its reason; the
        # host's own declines (51, 55) are journalled as transactions, not as refusals
        refusals = await lab.gateway.store.refusals(limit=1000)
        assert {r.rc for r in refusals} == {"97", "77", "40", "61", "A0", "99", "30", "12", "25"}, refusals
        assert all(r.reason for r in refusals)
        assert {r.terminal_id for r in refusals if r.rc == "97"} == {"99999999"}


async def test_host_down_then_up_and_reconnect(tmp_path: Path) -> None:
    zmk = generate_key(16)
    tid_tmk = {"10000001": generate_key(16)}
    with anyio.fail_after(30):
        # reserve a port for the host that is not listening yet
        probe = await anyio.create_tcp_listener(local_host=LOOPBACK, local_port=0)
        host_port = probe.extra(anyio.abc.SocketAttribute.local_port)
        await probe.aclose()
        config = lab_config(tmp_path, host_port, tid_tmk, zmk, host_timeout=1.0, admin=False)
        async with anyio.create_task_group() as tg:
            gw = await tg.start(lambda task_status: run_gateway(config, task_status=task_status))
            t = TerminalSimulator(LOOPBACK, gw.terminal_port, "10000001", MERCHANT_ID, tid_tmk["10000001"],
                                  cards=[CARD_CUP], timeout=5.0)
            await t.connect()
            await t.sign_in()  # sign-in is local: no host needed
            started = anyio.current_time()
            down = await t.purchase(1_000, CARD_CUP)
            assert down.rc == "91"  # answered at once, not left hanging
            assert anyio.current_time() - started < 1.0
            assert not gw.link.ready

            host = HostSimulator(HostSimConfig(zmk=zmk, rules=HostRulesConfig()))
            async with anyio.create_task_group() as host_tg:
                await host_tg.start(host.serve, LOOPBACK, host_port)
                await gw.link.wait_signed_on()
                assert (await t.purchase(1_000, CARD_CUP)).approved
                # the host drops the connection while a purchase is in flight: 98 + reversal,
                # then the link reconnects, signs on again and the reversal is delivered
                reconnects = gw.link.reconnects
                host.add_fault(Fault("disconnect", pan=CARD_CUP.pan, mti=("0200",), limit=1))
                lost = await t.purchase(2_000, CARD_CUP)
                assert lost.rc == "98"
                await gw.link.wait_signed_on()
                assert gw.link.reconnects > reconnects
                assert (await t.purchase(3_000, CARD_CUP)).approved
                rec = (await gw.store.list_transactions(terminal_id="10000001", limit=10))
                lost_rec = next(r for r in rec if r.terminal_stan == lost.stan)
                await wait_state(gw.store, lost_rec.txn_id, TxnState.REVERSED)
                assert host.stats.sign_ons >= 2
                host_tg.cancel_scope.cancel()
            await t.aclose()
            tg.cancel_scope.cancel()


async def test_burst_of_concurrent_purchases_all_matched(tmp_path: Path) -> None:
    terminals, per_terminal = 20, 50
    async with open_lab(tmp_path, terminals=terminals, host_timeout=10.0) as lab:
        sims = [lab.terminal(entry.terminal_id, timeout=20.0) for entry in lab.config.terminals]
        for sim in sims:
            await sim.connect()
            await sim.sign_in()
        results: list[tuple[str, object]] = []

        async def run(sim: TerminalSimulator, i: int) -> None:
            amount = 100 + i
            result = await sim.purchase(amount, CARD_CUP if i % 2 else CARD_CUP_2)
            results.append((sim.ident.terminal_id, result))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for sim in sims:
                    for i in range(per_terminal):
                        tg.start_soon(run, sim, i)
        assert len(results) == terminals * per_terminal
        seen: set[tuple[str, str]] = set()
        for tid, result in results:
            assert result.approved, result  # type: ignore[attr-defined]
            assert not result.problems  # type: ignore[attr-defined]  # MTI, 3/11/41 echoed correctly
            assert result.fields["41"] == tid  # type: ignore[attr-defined]
            assert result.fields["4"] == result.request.fields["4"]  # type: ignore[attr-defined]
            key = (tid, result.stan)  # type: ignore[attr-defined]
            assert key not in seen
            seen.add(key)
        # the journal records "completed" right after each answer is written: let the last commits land
        with anyio.fail_after(10):
            while True:
                completed = await lab.gateway.store.list_transactions(state=TxnState.COMPLETED, limit=5000)
                if len(completed) == terminals * per_terminal:
                    break
                await anyio.sleep(0.05)
        assert not await lab.gateway.store.list_transactions(state=TxnState.PENDING)
        assert len(lab.host.ledger) >= terminals * per_terminal
