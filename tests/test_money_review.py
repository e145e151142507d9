"""An adversarial review of the money path while the gateway runs (no crashes): races and odd host or
terminal behaviour that could leave a cardholder charged without a receipt, credited twice, or a risk
limit counting the wrong amount.

Every test drives a real gateway over loopback sockets against the host simulator (the `open_lab`
bench of the end-to-end tests) and reads both books at the end: the gateway's journal and the host's
ledger and balances.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from test_e2e_reversal import FAST_SAF, FINAL_STATES, HOST_TIMEOUT, RawTerminal, eventually
from test_store_support import PAN_KEY
from test_store_support import request as store_request

from gateway.iso.build.response import response
from gateway.iso.message import Message
from gateway.iso.stan import StanAllocator
from gateway.lab import CARD_CUP, CARD_CUP_2, CARD_LOW, Lab, open_lab
from gateway.net.saf_sender import host_approved_original
from gateway.sim.host import HostReply
from gateway.sim.host_rules import Fault
from gateway.sim.terminal import TerminalSimulator
from gateway.store import MemoryStore
from gateway.store.records import TxnKind, TxnRecord, TxnState

pytestmark = pytest.mark.anyio


async def signed_in(lab: Lab) -> TerminalSimulator:
    t = lab.terminal(auto_reverse=False, timeout=5.0)
    await t.connect()
    await t.sign_in()
    return t


async def all_final(lab: Lab) -> list[TxnRecord]:
    async def probe() -> list[TxnRecord] | None:
        rows = await lab.gateway.store.list_transactions(limit=1000)
        return rows if rows and all(r.state in FINAL_STATES for r in rows) else None

    return await eventually(probe, "every journal row in a final state")


# --- a sale's reversal while a void or refund of it stands ------------------------------------------


@pytest.mark.parametrize("credit", ["void", "refund"])
async def test_a_terminal_reversal_of_a_sale_already_credited_back_does_not_credit_it_again(
        tmp_path: Path, credit: str) -> None:
    """Sale 5,000 approved, then voided (or refunded in full): the cardholder has the money back. A
    0400 for the sale afterwards (a faulty or dishonest terminal: it names the sale's batch, STAN and
    amount) must not reverse the sale at the host as well, or the card is credited twice."""
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        t = await signed_in(lab)
        opening = lab.host.balance(CARD_CUP.pan)
        sale = await t.purchase(5_000, CARD_CUP)
        assert sale.approved
        if credit == "void":
            back = await t.void(sale)
        else:
            back = await t.refund(5_000, CARD_CUP, original=sale)
        assert back.approved
        assert lab.host.balance(CARD_CUP.pan) == opening  # sale and credit cancel out
        await t.reversal(sale, "96")
        await all_final(lab)
        await anyio.sleep(0.3)  # let a reversal the SAF may have queued reach the host
        assert lab.host.balance(CARD_CUP.pan) <= opening, (
            "the card was credited more than the sale: credited back by the "
            f"{credit} and again by the sale's reversal")


async def test_a_void_journalled_between_the_reversal_check_and_its_write_still_refuses_the_reversal(
        tmp_path: Path) -> None:
    """The 0400's check (`find_referencing`) and its journal write are apart: a void of the sale arriving
    on another connection can be journalled between them. Simulated by a check that sees nothing: the
    write must still refuse (12), leave the sale unreversed and the card credited once, by the void."""
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        t = await signed_in(lab)
        opening = lab.host.balance(CARD_CUP.pan)
        sale = await t.purchase(5_000, CARD_CUP)
        assert sale.approved and (await t.void(sale)).approved
        store = lab.gateway.service.store

        async def nothing_yet(orig_txn_id: int) -> list[TxnRecord]:
            return []

        store.find_referencing = nothing_yet  # type: ignore[method-assign]
        answer = await t.reversal(sale, "96")
        assert answer.rc == "12"
        rows = await all_final(lab)
        assert [r.state for r in rows if r.kind is TxnKind.PURCHASE] == [TxnState.COMPLETED]
        assert await store.list_saf() == []
        await anyio.sleep(0.3)  # a reversal queued anyway would reach the host in this time
        assert lab.host.balance(CARD_CUP.pan) == opening


# --- the same purchase twice (same batch and STAN) -------------------------------------------------


async def test_a_purchase_retransmitted_while_at_the_host_gets_no_refusal_before_its_answer(tmp_path: Path) -> None:
    """A terminal sends its purchase, and the same frame again (same batch, STAN, amount) while the
    first is still at the host. The card is charged once, by the first. A terminal matches the first
    answer carrying its STAN: if that is the duplicate's 94, it shows "declined" and prints nothing,
    while the gateway delivers the approval behind it and journals it completed: a charge without a
    receipt. The first answer written for that STAN must be the charge's own outcome."""
    async with open_lab(tmp_path, terminals=1, host_timeout=2.0, reversal=FAST_SAF) as lab:
        lab.host.add_fault(Fault("delay", seconds=0.4, pan=CARD_CUP.pan, mti=("0200",), limit=1))
        async with RawTerminal(lab) as t:
            await t.sign_in()
            request = t.purchase(2_500, CARD_CUP)
            await t.send(request)
            await anyio.sleep(0.1)  # the first is at the host now
            await t.send(request)
            first = await t.receive()
            second = await t.receive()
        assert {first.fields["11"], second.fields["11"]} == {request.fields["11"]}
        rows = await all_final(lab)
        charged = [r for r in rows if r.kind is TxnKind.PURCHASE and r.state is TxnState.COMPLETED]
        assert len(charged) == 1  # one charge, delivered (as the gateway sees it)
        assert first.fields["39"] == "00", (
            f"the terminal's first answer for STAN {request.fields['11']} is {first.fields['39']} "
            f"(then {second.fields['39']}), though its card is charged and the journal says delivered")


# --- a host answer whose MAC does not verify -------------------------------------------------------


async def test_a_decline_whose_mac_does_not_verify_is_not_taken_at_its_word(tmp_path: Path) -> None:
    """The host books the purchase, and the 0210 that reaches the gateway says 05 with a MAC that does
    not verify (corrupted or forged on the way: the MAC covers field 39, so the gateway cannot tell
    what the host decided). Taken at its word, the terminal shows "declined" while the debit stands.
    An answer that fails its MAC proves nothing: the charge must be reversed (and the terminal get no
    approval), as for an approval whose MAC fails."""
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        # approve_as + wrong_mac: booked as approved, answered 05 under a MAC that fails
        lab.host.add_fault(Fault("approve_as", code="05", pan=CARD_CUP.pan, mti=("0200",), limit=1))
        lab.host.add_fault(Fault("wrong_mac", pan=CARD_CUP.pan, mti=("0200",), limit=1))
        t = await signed_in(lab)
        opening = lab.host.balance(CARD_CUP.pan)
        result = await t.purchase(3_000, CARD_CUP)
        assert not result.approved
        assert lab.host.faults.fired("wrong_mac") == 1
        await all_final(lab)
        await anyio.sleep(0.3)
        assert lab.host.balance(CARD_CUP.pan) == opening, (
            f"the terminal got {result.rc} on an answer whose MAC failed, and the host's debit stands")


def rewrite_approvals(lab: Lab, monkeypatch: pytest.MonkeyPatch, change: dict[str, str]) -> list[Message]:
    """Make the host answer its purchase approvals with `change` applied to the 0210, under the host's own
    valid MAC (the host itself says so: nothing was corrupted on the way). Returns the answers changed."""
    host = lab.host
    handle = host.handle
    changed: list[Message] = []

    def rewriting(body: bytes) -> Any:
        reply = handle(body)
        if reply.body is not None and reply.request is not None and reply.request.mti == "0200":
            answer = host.codec.decode(reply.body)
            if answer.fields.get("39") == "00":
                answer.fields.update(change)
                reply.body = host.encode_answer(answer)
                changed.append(answer)
        return reply

    monkeypatch.setattr(host, "handle", rewriting)
    return changed


@pytest.mark.parametrize(("field", "value", "entry"), [("49", "840", "swipe"), ("2", CARD_CUP_2.pan, "manual")])
async def test_an_approval_of_another_currency_or_card_is_not_delivered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, field: str, value: str, entry: str) -> None:
    """The host approves, but its 0210 names another currency (49) or another card (2) than the
    request: it approved some other transaction than the one the terminal asked for. Fields 3, 4 and 41
    are checked this way (`check_host_answer`); an approval that does not echo what it approves must be
    reversed like one of another amount, not printed as the cardholder's receipt."""
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        changed = rewrite_approvals(lab, monkeypatch, {field: value})
        t = await signed_in(lab)
        opening = lab.host.balance(CARD_CUP.pan)
        result = await t.purchase(4_000, CARD_CUP, entry=entry)  # type: ignore[arg-type]
        assert len(changed) == 1 and field in lab.host.seen[-1].fields  # the request had it; the answer differs
        await all_final(lab)
        await anyio.sleep(0.3)
        assert not result.approved and lab.host.balance(CARD_CUP.pan) == opening, (
            f"an approval whose field {field} is {value!r}, not the request's "
            f"{lab.host.seen[-1].fields[field]!r}, reached the terminal as {result.rc}")


# --- a reversal the host answers 25 though the gateway holds its approval --------------------------


def not_found_once(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> list[Message]:
    """The host answers the first reversal it gets with 25 ("original not found"), under its valid MAC,
    without reversing anything (its lookup missed the original: another node, a booking not yet
    visible); later reversals it handles as usual. Returns the reversals it answered 25."""
    host = lab.host
    handle = host.handle
    refused: list[Message] = []

    def first_not_found(body: bytes) -> Any:
        request = host.codec.decode(body)
        if request.mti in ("0400", "0401") and not refused:
            refused.append(request)
            answer = response(request, "25", "iso87-ascii")
            answer.fields["64"] = "0" * 16  # the host's MAC goes here
            return HostReply(request, host.encode_answer(answer))
        return handle(body)

    monkeypatch.setattr(host, "handle", first_not_found)
    return refused


@pytest.mark.parametrize("how", ["terminal_reversal", "undeliverable"])
async def test_a_25_to_the_reversal_of_an_approval_in_hand_does_not_end_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """The gateway holds the host's own approval of the sale (MAC verified, auth code, rc 00): the host
    booked it. Its reversal (the terminal's 0400, or the gateway's own for an approval it could not
    deliver) is answered 25 "original not found". That answer contradicts what the gateway knows, as a
    late approval does (which reopens a 25, README point 3); taken as final, the journal says reversed
    while the host keeps the debit: a charge without a receipt. It must be retried."""
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        refused = not_found_once(lab, monkeypatch)
        opening = lab.host.balance(CARD_CUP.pan)
        if how == "terminal_reversal":
            t = await signed_in(lab)
            sale = await t.purchase(6_000, CARD_CUP)
            assert sale.approved
            assert (await t.reversal(sale, "96")).rc == "00"
        else:
            lab.host.add_fault(Fault("delay", seconds=0.25, pan=CARD_CUP.pan, mti=("0200",), limit=1))
            async with RawTerminal(lab) as raw:
                await raw.sign_in()
                await raw.send(raw.purchase(6_000, CARD_CUP))
                await raw.hang_up()
        rows = await all_final(lab)
        await anyio.sleep(0.5)  # a retried reversal has time to reach the host
        assert len(refused) == 1
        sale_row = next(r for r in rows if r.kind is TxnKind.PURCHASE)
        assert sale_row.rc == "00" and sale_row.auth_code  # the approval the gateway holds
        assert lab.host.balance(CARD_CUP.pan) == opening, (
            f"the journal says {sale_row.state} (reversal answered {sale_row.reversal_rc}) while the host "
            "keeps the debit it approved")


@pytest.mark.parametrize(("how", "in_hand"), [
    ("completed", True),  # delivered: every check passed
    ("undeliverable", True),  # approved and checked, not written to the terminal
    ("host_rejected_amount", True),  # the host's MAC verified; it approved another amount: it booked
    ("host_rejected_mac", False),  # its MAC failed: the approval proves nothing
    ("timed_out", False),  # no answer: a 25 may well be true
    ("pending", False),  # start-up recovery: nothing known
])
async def test_which_originals_a_25_to_their_reversal_cannot_end(how: str, in_hand: bool) -> None:
    """`host_approved_original`, over the rows a real store builds for each way a reversal is queued."""
    async with MemoryStore.open(pan_key=PAN_KEY) as store:
        txn_id = await store.record_request(store_request())
        if how == "completed":
            await store.record_outcome(txn_id, "completed", rc="00", auth_code="123456", rrn="000000000001")
            await store.queue_reversal(txn_id, "96", initiator="terminal")
        elif how == "undeliverable":
            await store.queue_reversal(txn_id, "96", state="undeliverable", rc="00", auth_code="123456")
        elif how == "host_rejected_amount":
            await store.queue_reversal(txn_id, "06", state="host_rejected", rc="00")
        elif how == "host_rejected_mac":
            await store.queue_reversal(txn_id, "A0", state="host_rejected", rc="00")
        elif how == "timed_out":
            await store.record_timeout_and_queue_reversal(txn_id, "98")
        else:
            await store.queue_reversal(txn_id, "06", state="timed_out")
        [entry] = await store.due_reversals(time.time() + 1, 10)
        assert host_approved_original(entry) is in_hand


# --- the risk-limit counter follows the money --------------------------------------------------------


async def test_the_daily_limit_counts_exactly_what_stays_charged(tmp_path: Path) -> None:
    """One terminal, every fate a purchase can have while the gateway runs: approved and kept, declined by
    the issuer, timed out (reversed), approved but undeliverable (reversed), approved and then reversed
    by the terminal's own 0400, approved but with a MAC that fails (reversed). The day's counter must
    equal the debits still standing at the host, and the journal's charged total (what a restart seeds
    it with): neither counting money that went back (the cap would refuse the merchant) nor missing money
    that stays (the cap would overshoot)."""
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        terminal_id = lab.config.terminals[0].terminal_id
        t = await signed_in(lab)
        assert (await t.purchase(1_000, CARD_CUP)).approved  # stays
        assert (await t.purchase(9_000, CARD_LOW)).rc == "51"  # the issuer declines
        lab.host.add_fault(Fault("delay", seconds=HOST_TIMEOUT + 0.3, pan=CARD_CUP.pan, mti=("0200",), limit=1))
        assert (await t.purchase(2_000, CARD_CUP)).rc == "98"  # timed out: reversed by the gateway
        lab.host.add_fault(Fault("wrong_mac", pan=CARD_CUP.pan, mti=("0200",), limit=1))
        assert (await t.purchase(4_000, CARD_CUP)).rc == "96"  # approval not trusted: reversed
        sale = await t.purchase(8_000, CARD_CUP)
        assert sale.approved
        assert (await t.reversal(sale, "96")).rc == "00"  # the terminal's own 0400
        lab.host.add_fault(Fault("delay", seconds=0.25, pan=CARD_CUP.pan, mti=("0200",), limit=1))
        async with RawTerminal(lab) as raw:  # approved, but nobody is there to take the answer
            raw.stans = StanAllocator(100)  # past the STANs the other terminal simulator used
            await raw.sign_in()
            await raw.send(raw.purchase(16_000, CARD_CUP))
            await raw.hang_up()
        await eventually(lambda: _rows_settled(lab, 6), "six purchases in a final state")
        await anyio.sleep(0.3)
        standing = sum(e.amount for e in lab.host.ledger.values()
                       if e.approved and e.delta < 0 and not e.reversed and e.terminal_id == terminal_id)
        assert standing == 1_000
        charged = (await lab.gateway.store.purchase_totals_since(0.0)).get(terminal_id, 0)
        assert lab.gateway.service.limits.used(terminal_id) == charged == standing


async def _rows_settled(lab: Lab, n: int) -> bool:
    rows = [r for r in await lab.gateway.store.list_transactions(limit=1000) if r.kind is TxnKind.PURCHASE]
    return len(rows) == n and all(r.state in FINAL_STATES for r in rows)


# --- a refund from another terminal of the merchant ------------------------------------------------


async def test_refunds_of_one_sale_from_two_terminals_never_credit_more_than_the_sale(tmp_path: Path) -> None:
    """Terminal A sells 10,000; the customer comes back to another till of the same merchant (terminal
    B), which refunds the sale in full by its RRN; then A refunds it in full too. The gateway has the
    sale in its journal and checks A's refund against the refunds it knows of, but B's refund, whose
    original is not B's own, went to the host unchecked ("a sale we never saw") and is not counted
    against the sale. Together they credit 20,000 for a 10,000 sale."""
    async with open_lab(tmp_path, terminals=2, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        a = lab.terminal(lab.config.terminals[0].terminal_id, auto_reverse=False, timeout=5.0)
        b = lab.terminal(lab.config.terminals[1].terminal_id, auto_reverse=False, timeout=5.0)
        for t in (a, b):
            await t.connect()
            await t.sign_in()
        opening = lab.host.balance(CARD_CUP.pan)
        sale = await a.purchase(10_000, CARD_CUP)
        assert sale.approved
        first = await b.refund(10_000, CARD_CUP, original=sale)
        second = await a.refund(10_000, CARD_CUP, original=sale)
        await all_final(lab)
        credited = lab.host.balance(CARD_CUP.pan) - (opening - 10_000)
        assert credited <= 10_000, (
            f"refunds of {first.rc} (terminal B) and {second.rc} (terminal A) credited {credited} "
            "against a sale of 10,000")


async def test_an_answer_without_a_response_code_is_not_taken_for_a_decline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The host books the purchase and answers a 0210 (valid MAC) that has no field 39 at all. Nothing in
    it says the customer was not charged; the gateway reads the missing code as 96, journals a decline
    and reverses nothing, so the debit stands while the terminal shows an error. An answer that does
    not say what happened is an unknown outcome, like no answer: it must be reversed."""
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        host = lab.host
        handle = host.handle
        stripped: list[Message] = []

        def without_rc(body: bytes) -> Any:
            reply = handle(body)
            if reply.body is not None and reply.request is not None and reply.request.mti == "0200":
                answer = host.codec.decode(reply.body)
                del answer.fields["39"]
                reply.body = host.encode_answer(answer)
                stripped.append(answer)
            return reply

        monkeypatch.setattr(host, "handle", without_rc)
        t = await signed_in(lab)
        opening = lab.host.balance(CARD_CUP.pan)
        result = await t.purchase(7_000, CARD_CUP)
        assert len(stripped) == 1 and not result.approved
        rows = await all_final(lab)
        await anyio.sleep(0.3)
        assert lab.host.balance(CARD_CUP.pan) == opening, (
            f"an answer without field 39 was journalled {rows[0].state} (rc {rows[0].rc}) and the debit stands")


# --- a host that answers 00 to the reversal of an original it has not booked yet ----------------------


@pytest.mark.parametrize("convention", ["00", "25"])
async def test_a_late_approval_after_the_hosts_not_found_answer_reverses_the_charge(
        tmp_path: Path, convention: str) -> None:
    """The host's slow issuer path books the purchase only after the gateway timed out (98). The
    gateway's reversal overtakes the booking; the host answers it as it answers reversals of originals
    it cannot find: 25, or (some hosts; `reversal.unknown_original_rc` is the gateway's own setting of
    the same choice) 00. Then it books the purchase and its approval (MAC verified) comes late. After
    the 25 the reversal is reopened always; after the 00 only where the configuration says this host
    answers 00 for unbooked originals (`host.unknown_reversal_rc = "00"`), since elsewhere a 00 is a
    real reversal. Either way the cardholder must not stay charged for a 98."""
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF,
                        host_options={"unknown_reversal_rc": convention}) as lab:
        lab.host.rules.config = dataclasses.replace(lab.host.rules.config, unknown_original_rc=convention)
        lab.host.add_fault(Fault("booked_late", seconds=HOST_TIMEOUT + 0.4, pan=CARD_CUP.pan, mti=("0200",),
                                 limit=1))
        t = await signed_in(lab)
        opening = lab.host.balance(CARD_CUP.pan)
        result = await t.purchase(3_300, CARD_CUP)
        assert result.rc == "98"
        rec = (await all_final(lab))[0]
        late = await eventually(lambda: lab.gateway.store.late_answers(txn_id=rec.txn_id), "the late approval")
        assert late[0].rc == "00"

        async def reversed_at_host() -> bool | None:
            return True if lab.host.balance(CARD_CUP.pan) == opening else None

        await eventually(reversed_at_host, "the host's debit reversed after the late approval")
        after = await eventually(lambda: _reversed(lab, rec.txn_id), "the journal's reopened reversal done")
        assert after.reversal_rc == "00" and after.late_approved_at is not None


async def _reversed(lab: Lab, txn_id: int) -> TxnRecord | None:
    rec = await lab.gateway.store.get(txn_id)
    return rec if rec is not None and rec.state is TxnState.REVERSED else None


# --- settlement totals ---------------------------------------------------------------------------


async def test_settlement_totals_count_only_what_stayed_charged_or_credited(tmp_path: Path) -> None:
    """A batch with every fate: a kept sale, an issuer decline, a 98 (the gateway reverses it), an
    approval whose MAC fails (96, reversed), a sale reversed by the terminal's own 0400, a sale voided,
    a partial refund. The journal's totals (0510 field 48) must be the money that moved and stayed:
    debits 1,000 + 8,000 (the voided sale) + 9,500, credits 8,000 (the void) + 2,500 (the refund), and
    they must balance with the terminal's own count."""
    async with open_lab(tmp_path, terminals=1, host_timeout=HOST_TIMEOUT, reversal=FAST_SAF) as lab:
        t = await signed_in(lab)
        assert (await t.purchase(1_000, CARD_CUP)).approved
        assert (await t.purchase(9_000, CARD_LOW)).rc == "51"
        lab.host.add_fault(Fault("delay", seconds=HOST_TIMEOUT + 0.3, pan=CARD_CUP.pan, mti=("0200",), limit=1))
        assert (await t.purchase(2_000, CARD_CUP)).rc == "98"
        lab.host.add_fault(Fault("wrong_mac", pan=CARD_CUP.pan, mti=("0200",), limit=1))
        assert (await t.purchase(4_000, CARD_CUP)).rc == "96"
        reversed_sale = await t.purchase(16_000, CARD_CUP)
        assert (await t.reversal(reversed_sale, "96")).rc == "00"
        voided = await t.purchase(8_000, CARD_CUP)
        assert (await t.void(voided)).approved
        refunded = await t.purchase(9_500, CARD_CUP)
        assert (await t.refund(2_500, CARD_CUP, original=refunded)).approved
        await all_final(lab)
        ours = await lab.gateway.store.settlement_totals(t.ident.terminal_id, t.batch)
        assert (ours.domestic.debit_amount, ours.domestic.debit_count) == (18_500, 3)
        assert (ours.domestic.credit_amount, ours.domestic.credit_count) == (10_500, 2)
        settled_batch = await t.settle()
        assert settled_batch.rc == "00" and settled_batch.balanced
