"""The gateway service: carries out the core's decisions between terminals, the journal and the host.

One terminal request goes: decode → identify the flow → screen it (registered? signed in? batch? MAC?
valid? limits?) → translate to the host dialect → journal it (durable) → host → translate back →
answer the terminal → journal the outcome. Every approval ends either delivered or reversed:

- host timeout, or link lost mid-request → terminal gets 98, reversal queued (atomically with the state);
- approval that fails validation (bad host MAC, other amount) → terminal gets 96, reversal queued;
- approval that cannot be written to the terminal → reversal queued;
- a late host answer after the timeout → journalled, never forwarded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import anyio

from gateway.config import GatewayConfig
from gateway.core import decisions, translate
from gateway.core.clock import local_now
from gateway.core.limits import RiskLimits
from gateway.core.sessions import SessionTable
from gateway.core.settlement import reconcile
from gateway.iso.codec import Codec
from gateway.iso.errors import IsoError
from gateway.iso.framing import Frame
from gateway.iso.message import Message
from gateway.iso.mti import is_request, match_class
from gateway.iso.spec import load_dialect
from gateway.iso.validate import FlowSpec, UnsupportedFlow, identify, validate
from gateway.iso.validate import flow as flow_spec
from gateway.metrics import Metrics
from gateway.net.host_link import HostLink, HostNotSent, HostReply, HostTimeout, HostUnavailable
from gateway.net.saf_sender import SafSender
from gateway.net.terminal_server import TerminalConnection, Undeliverable
from gateway.security.errors import MacError, PinFormatError, SecurityError
from gateway.security.module import SecurityModule
from gateway.store.base import Store
from gateway.store.errors import DuplicateRequest, NotReversible, StateConflict
from gateway.store.records import TxnRecord, TxnState
from gateway.trace.format import Direction, EventKind, Leg, format_match_key
from gateway.trace.tap import Tap

log = logging.getLogger("gateway.flow")

RC_APPROVED = "00"


@dataclass(slots=True)
class Answer:
    """What to write back to the terminal."""

    message: Message
    resign: bool = False  #: set the CUP header's processing requirement to 3 (re-sign-in)


@dataclass(slots=True)
class Admitted:
    """A terminal frame, decoded in wire order by `GatewayService.admit`."""

    frame: Frame
    message: Message | None
    error: IsoError | None
    in_flight_key: tuple[str, str, str] | None = None
    done: anyio.Event | None = None


class GatewayService:
    def __init__(self, config: GatewayConfig, security: SecurityModule, store: Store, link: HostLink,
                 saf: SafSender, metrics: Metrics) -> None:
        self.config = config
        self.security = security
        self.store = store
        self.link = link
        self.saf = saf
        self.metrics = metrics
        self.dialect = load_dialect(config.terminal_side.dialect)
        self.codec = Codec(self.dialect)
        self.mac_len = self.dialect.mac_wire_len
        self.sessions = SessionTable()
        self.limits = RiskLimits(config.limits)
        #: originals still waiting for the host, so a terminal reversal can wait for them
        self.in_flight: dict[tuple[str, str, str], anyio.Event] = {}
        self._rrn_seq = 0
        self.journal_healthy = True
        self.tap: Tap | None = None  #: records the traffic when set (gateway.trace)

    # --- start-up ----------------------------------------------------------------------------------

    async def recover(self) -> int:
        """Settle every request whose outcome is unknown (the gateway stopped while it was in flight):
        reversible kinds are reversed; the others (refund, balance inquiry) are marked timed out."""
        queued = 0
        for rec in await self.store.unknown_outcomes():
            if self._reversible(rec.kind):
                await self.store.queue_reversal(rec.txn_id, "06", state="timed_out")
                self.metrics.reversals_queued.inc()
                queued += 1
                log.warning("txn %s (terminal %s stan %s) had no known outcome at start: reversal queued",
                            rec.txn_id, rec.terminal_id, rec.terminal_stan)
            else:
                await self.store.record_outcome(rec.txn_id, "timed_out")
        if queued:
            self.saf.wake()
        return queued

    def _reversible(self, kind: str) -> bool:
        """Whether the terminal dialect reverses this kind of transaction (specs/flows.toml, reference
        §3.1 "引发冲正"): the same rule decides at a timeout and at start-up recovery."""
        try:
            return flow_spec(self.dialect.name, kind).reversible
        except IsoError:
            return False

    # --- terminal side -----------------------------------------------------------------------------

    def admit(self, frame: Frame) -> Admitted:
        """Called by the terminal server for each frame in wire order, before any frame of the
        connection is processed concurrently: a financial request is registered as in flight here, so
        a reversal pipelined right behind it always finds it and waits for its outcome."""
        try:
            msg = self.codec.decode(frame.body)
        except IsoError as exc:
            return Admitted(frame, None, exc)
        admitted = Admitted(frame, msg, None)
        if msg.mti in decisions.FINANCIAL_REQUEST_MTIS:
            key = (msg.fields.get("41", ""), decisions.batch_of(msg), msg.fields.get("11", ""))
            if key not in self.in_flight:  # a duplicate STAN waits on the first one's event
                admitted.in_flight_key = key
                admitted.done = self.in_flight[key] = anyio.Event()
        return admitted

    async def handle_frame(self, admitted: Admitted, conn: TerminalConnection) -> None:
        started = anyio.current_time()
        try:
            await self._handle(admitted, conn)
        finally:
            # only now, with the outcome journalled, may a waiting reversal look at the original
            if admitted.done is not None:
                self.in_flight.pop(admitted.in_flight_key, None)  # type: ignore[arg-type]
                admitted.done.set()
            if admitted.message is not None:
                self.metrics.end_to_end.observe(anyio.current_time() - started)

    async def _handle(self, admitted: Admitted, conn: TerminalConnection) -> None:
        frame, msg = admitted.frame, admitted.message
        if msg is None:
            exc = admitted.error
            # without a decodable STAN and terminal id no answer could be matched by the terminal:
            # close cleanly, so it reverses or retries on a fresh connection
            self.metrics.decode_error("unknown_mti" if getattr(exc, "field", None) == "t" else exc.kind).inc()  # type: ignore[union-attr]
            log.warning("undecodable message from %s (%s): closing the connection", conn.peer, exc)
            await conn.close()
            return
        self.metrics.message("terminal_in", msg.mti, "").inc()
        if not is_request(msg.mti):
            self.metrics.decode_error("unknown_mti").inc()
            log.warning("terminal %s sent a non-request MTI %s: ignored", conn.peer, msg.mti)
            return
        self.metrics.in_flight.inc()
        try:
            try:
                answer, on_delivery = await self._decide(msg, frame.body)
            except Exception:
                # a bug guard: the terminal gets a defined answer instead of silence; anything already
                # journalled as pending is reversed by recovery, never left charged
                log.exception("error while processing %s from terminal %s", msg.mti, msg.get("41"))
                answer, on_delivery = Answer(decisions.refuse(msg, "96")), None
            # shielded: once an answer is decided, writing it and journalling whether it was delivered
            # must both happen even during shutdown (the write is bounded by write_timeout)
            with anyio.CancelScope(shield=True):
                delivered = await self._send(conn, frame, answer)
                if on_delivery is not None:
                    await on_delivery(delivered)
        finally:
            self.metrics.in_flight.dec()

    async def _send(self, conn: TerminalConnection, frame: Frame, answer: Answer) -> bool:
        """Write the answer; False when it could not be, for any reason (then an approval is reversed)."""
        msg = answer.message
        try:
            body = self._encode_for_terminal(msg)
        except (IsoError, SecurityError) as exc:
            # e.g. the terminal signed off (keys gone) while its purchase was at the host, or the host
            # sent a value the terminal dialect cannot carry: the answer cannot go out
            log.error("answer %s to terminal %s cannot be encoded: %s", msg.mti, msg.get("41"), exc)
            return False
        envelope = frame.envelope.reply(3 if answer.resign else None) if frame.envelope is not None else None
        try:
            await conn.send(body, envelope)
        except Undeliverable as exc:
            log.warning("answer %s to terminal %s not delivered: %s", msg.mti, msg.get("41"), exc)
            if self.tap is not None:
                self.tap.event(Leg.TERMINAL, conn, EventKind.UNDELIVERED, format_match_key(
                    {"class": match_class(msg.mti), "11": msg.fields.get("11", ""),
                     "41": msg.fields.get("41", ""), "39": msg.fields.get("39", "")}))
            return False
        if self.tap is not None:
            self.tap.frame(Leg.TERMINAL, Direction.OUT, conn, body, envelope)
        self.metrics.message("terminal_out", msg.mti, msg.fields.get("39", "")).inc()
        return True

    def _encode_for_terminal(self, msg: Message) -> bytes:
        body = self.codec.encode(msg)
        if self.dialect.mac_field in msg.fields:
            mab = body[: -self.mac_len]
            mac = self.security.generate_terminal_mac(msg.fields["41"], mab)
            body = mab + mac
            msg.fields[self.dialect.mac_field] = mac.decode("ascii")
        return body

    async def _decide(self, msg: Message, body: bytes) -> tuple[Answer, decisions.OnDelivery | None]:
        flow = identify(self.dialect.name, msg)
        if flow is None:
            return Answer(decisions.refuse(msg, decisions.unsupported_rc(msg))), None
        entry = self.config.terminal(msg.fields.get("41", ""))
        if entry is None:
            return Answer(decisions.refuse(msg, "97")), None
        if msg.fields.get("42", entry.merchant_id) != entry.merchant_id:
            log.warning("terminal %s sent merchant id %r, registered %r: 03", entry.terminal_id,
                        msg.fields.get("42"), entry.merchant_id)
            return Answer(decisions.refuse(msg, "03")), None
        problems = validate(self.dialect.name, msg)
        if any(isinstance(p, UnsupportedFlow) for p in problems):
            return Answer(decisions.refuse(msg, "40")), None
        if flow.name == "sign_in":
            return self._sign_in(msg, entry.merchant_id), None
        session = self.sessions.get(entry.terminal_id)
        refusal = decisions.screen_session(msg, session)
        if refusal is not None:
            return Answer(decisions.refuse(msg, refusal), resign=True), None
        if flow.mac:
            try:
                mac = body[-self.mac_len :]
                self.security.verify_terminal_mac(entry.terminal_id, body[: -self.mac_len], mac)
            except MacError:
                self.metrics.mac_failures.inc()
                log.warning("bad MAC from terminal %s stan %s: A0", entry.terminal_id, msg.get("11"))
                return Answer(decisions.refuse(msg, "A0")), None
            except SecurityError as exc:
                return Answer(decisions.refuse(msg, exc.response_code)), None
        if problems:
            log.warning("terminal %s %s fails validation: %s", entry.terminal_id, msg.mti, problems[0])
            self.metrics.decode_error("validation").inc()
            return Answer(decisions.refuse(msg, "30")), None
        if flow.name in ("purchase", "void", "refund", "balance_inquiry"):
            return await self._financial(msg, flow)
        if flow.reverses:
            return await self._terminal_reversal(msg, flow), None
        if flow.name == "settlement":
            return await self._settlement(msg), None
        if flow.name in ("batch_upload", "batch_upload_end"):
            if flow.name == "batch_upload_end":
                self.sessions.close_batch(entry.terminal_id)
            return Answer(decisions.answer(msg, RC_APPROVED)), None
        if flow.name == "sign_off":
            self.sessions.sign_off(entry.terminal_id)
            self.security.drop_working_keys(entry.terminal_id)
            return Answer(decisions.answer(msg, RC_APPROVED)), None
        if flow.name == "echo":
            return Answer(decisions.answer(msg, RC_APPROVED)), None
        return Answer(decisions.refuse(msg, "40")), None

    # --- sign-in -----------------------------------------------------------------------------------

    def _sign_in(self, msg: Message, merchant_id: str) -> Answer:
        terminal_id = msg.fields["41"]
        batch, key_mode = decisions.sign_in_request(msg, self.config.security.key_mode)
        try:
            block = self.security.issue_working_keys(terminal_id, key_mode)
        except SecurityError as exc:
            log.error("working keys for terminal %s could not be issued: %s", terminal_id, exc)
            return Answer(decisions.refuse(msg, exc.response_code))
        self.sessions.sign_in(terminal_id, merchant_id, batch, key_mode)
        log.info("terminal %s signed in (batch %s, key mode %s)", terminal_id, batch, key_mode)
        return Answer(decisions.sign_in_answer(msg, block, self.config.host.acquirer_id, self._next_rrn()))

    def _next_rrn(self) -> str:
        """A retrieval reference number for answers the gateway gives itself (sign-in): day-of-year,
        hour, minute and a sequence, 12 digits."""
        self._rrn_seq = self._rrn_seq % 99999 + 1
        return f"{datetime.now():%j%H%M}{self._rrn_seq:05d}"

    # --- financial ---------------------------------------------------------------------------------

    async def _financial(self, msg: Message, flow: FlowSpec) -> tuple[Answer, decisions.OnDelivery | None]:
        terminal_id = msg.fields["41"]
        name = flow.name
        original: TxnRecord | None = None
        if name in ("void", "refund"):
            original = await self._find_referenced_original(msg)
            earlier = await self.store.find_referencing(original.txn_id) if original is not None else []
            problem = decisions.original_problem(msg, original, earlier, flow_name=name)
            # a refund may refer to a sale we never saw (another day, another gateway): the host decides
            if problem is not None and not (name == "refund" and original is None):
                log.info("terminal %s %s refused with %s (original check)", terminal_id, name, problem)
                return Answer(decisions.refuse(msg, problem)), None
        if not self.link.ready:
            # answered at once: the terminal must not wait a full timeout for a host we know is down
            log.warning("host link down: terminal %s stan %s gets 91", terminal_id, msg.get("11"))
            return Answer(decisions.refuse(msg, "91")), None
        amount = int(msg.fields.get("4", "0") or 0)
        day = local_now().day
        reserved = name == "purchase"
        if reserved:
            rc = self.limits.reserve(terminal_id, amount, day)
            if rc is not None:
                log.info("terminal %s purchase of %d refused by risk limits", terminal_id, amount)
                return Answer(decisions.refuse(msg, rc)), None
        released = not reserved

        def release() -> None:
            """Give the reserved amount back to the day's limit, once, whichever path gets here first."""
            nonlocal released
            if not released:
                released = True
                self.limits.release(terminal_id, amount, day)

        try:
            card = translate.card_data(msg, self.security)
        except SecurityError as exc:
            release()
            self.metrics.security_failure(exc.kind).inc()
            if isinstance(exc, PinFormatError):
                self.metrics.pin_failures.inc()
            log.warning("terminal %s stan %s refused by the security module: %s (%s)",
                        terminal_id, msg.get("11"), exc.response_code, exc.kind)
            return Answer(decisions.refuse(msg, exc.response_code)), None
        stan, transmission_dt = self.link.allocate()
        host_req = translate.to_host(msg, name, card, self.config.host, stan, transmission_dt, original)
        fingerprint = self.store.fingerprint(card.pan) if card.pan else ""
        record = translate.journal_record(msg, host_req, name, card, fingerprint, original)
        try:
            txn_id = await self.store.record_request(record)
            self.journal_healthy = True
        except DuplicateRequest:
            release()
            log.warning("terminal %s repeated batch/stan %s: 94", terminal_id, msg.get("11"))
            return Answer(decisions.refuse(msg, "94")), None
        except Exception:
            self.journal_healthy = False  # /readyz says so until a write succeeds again
            log.exception("journal write failed: refusing terminal %s stan %s", terminal_id, msg.get("11"))
            release()
            return Answer(decisions.refuse(msg, "96")), None
        try:
            return await self._exchange(msg, host_req, txn_id, flow, card.pan, release)
        except Exception:
            # journalled but the outcome could not be settled normally: never leave it pending while
            # the gateway runs on. The request may have left, so reverse what is reversible.
            log.exception("txn %s (terminal %s stan %s) failed mid-exchange", txn_id, terminal_id, msg.get("11"))
            with anyio.CancelScope(shield=True):
                release()
                await self._settle_unknown(txn_id, flow)
            return Answer(decisions.refuse(msg, "96")), None

    async def _settle_unknown(self, txn_id: int, flow: FlowSpec) -> None:
        try:
            if flow.reversible:
                await self.store.queue_reversal(txn_id, "06", state="timed_out")
                self.metrics.reversals_queued.inc()
                self.saf.wake()
            else:
                await self.store.record_outcome(txn_id, "timed_out", rc="96")
        except Exception:
            log.exception("txn %s stays pending: start-up recovery will settle it", txn_id)

    async def _find_referenced_original(self, msg: Message) -> TxnRecord | None:
        batch, trace, _ = translate.original_refs(msg)
        original = None
        if batch and trace:
            # a void sent the moment its sale's answer arrived: let the sale's outcome be journalled first
            await self._wait_in_flight((msg.fields["41"], batch, trace))
            original = await self.store.find_original(msg.fields["41"], batch, trace)
        if original is None and "37" in msg.fields:
            original = await self.store.find_by_rrn(msg.fields["37"], terminal_id=msg.fields["41"])
        return original

    async def _exchange(self, msg: Message, host_req: Message, txn_id: int, flow: FlowSpec, pan: str | None,
                        release: Callable[[], None]) -> tuple[Answer, decisions.OnDelivery | None]:
        """`release` gives back the risk-limit reservation (idempotent) when no money moved."""
        terminal_id = msg.fields["41"]
        sent_at = anyio.current_time()

        try:
            reply = await self.link.request(host_req)
        except HostNotSent as exc:
            rc = "91" if isinstance(exc, HostUnavailable) else "96"
            release()
            await self.store.record_outcome(txn_id, "declined", rc=rc)
            log.warning("not sent to the host (%s): terminal %s stan %s gets %s", exc, terminal_id, msg.get("11"), rc)
            return Answer(decisions.refuse(msg, rc)), None
        except HostTimeout as exc:
            self.metrics.timeouts.inc()
            release()
            if flow.reversible:
                await self.store.record_timeout_and_queue_reversal(txn_id, "98")
                self.metrics.reversals_queued.inc()
                self.saf.wake()
                log.warning("txn %s (terminal %s stan %s): %s; terminal gets 98, reversal queued",
                            txn_id, terminal_id, msg.get("11"), exc)
            else:
                await self.store.record_outcome(txn_id, "timed_out", rc="98")
                log.warning("txn %s (%s): %s; terminal gets 98", txn_id, flow.name, exc)
            return Answer(decisions.refuse(msg, "98")), None
        self.metrics.upstream.observe(anyio.current_time() - sent_at)
        host = reply.message
        rc = host.fields.get("39", "96")
        if rc == RC_APPROVED:
            problem = decisions.check_host_answer(host_req, host, reply.mac_ok)
            if problem is not None:
                release()
                log.error("host approval for txn %s not trusted (%s): terminal gets 96", txn_id, problem)
                if flow.reversible:
                    await self.store.queue_reversal(txn_id, "A0" if not reply.mac_ok else "06",
                                                    state="host_rejected", rc=rc)
                    self.metrics.reversals_queued.inc()
                    self.saf.wake()
                else:
                    await self.store.record_outcome(txn_id, "host_rejected", rc=rc)
                return Answer(decisions.refuse(msg, "96")), None
        answer = translate.to_terminal(msg, host, self.config.host.acquirer_id, pan)
        if rc != RC_APPROVED:
            release()
            await self.store.record_outcome(txn_id, "declined", rc=rc, rrn=host.get("37"))
            return Answer(answer), None
        rrn, auth_code = host.get("37"), host.get("38")

        async def on_delivery(delivered: bool) -> None:
            if delivered:
                # Not awaited: the terminal has its answer, nothing here waits for this row, so it rides
                # along with the next commit instead of costing one (reads in this process flush it
                # first). Until it is on disk a crash reverses the delivered sale: the merchant's side.
                self.store.record_outcome_soon(txn_id, "completed", rc=rc, rrn=rrn, auth_code=auth_code,
                                               on_error=lambda exc: self._completion_failed(txn_id, exc))
                return
            release()
            if flow.reversible:
                await self.store.queue_reversal(txn_id, "96", state="undeliverable", rc=rc, rrn=rrn,
                                                auth_code=auth_code)
                self.metrics.reversals_queued.inc()
                self.saf.wake()
                log.warning("approval of txn %s could not be delivered to terminal %s: reversal queued",
                            txn_id, terminal_id)
            else:
                await self.store.record_outcome(txn_id, "undeliverable", rc=rc, rrn=rrn, auth_code=auth_code)

        return Answer(answer), on_delivery

    def _completion_failed(self, txn_id: int, exc: BaseException) -> None:
        if not isinstance(exc, StateConflict):  # e.g. an operator acted on it meanwhile: keep their state
            self.journal_healthy = False  # the disk is failing: /readyz says so until a write succeeds
        log.error("txn %s delivered but could not be marked completed: %s", txn_id, exc)

    async def on_unmatched_host_answer(self, reply: HostReply) -> None:
        """A host answer nobody waits for any more: journal it, never forward it. Its reversal was
        queued when the request timed out, so a late approval changes nothing for the customer; if the
        host had already answered that reversal 25 ("original not found": the reversal overtook the
        original), the journal reopens the reversal and it goes again (only for an approval whose MAC
        verified: anything else proves nothing)."""
        host = reply.message
        stan = host.fields.get("11", "")
        original = await self.store.find_by_host_stan(stan, terminal_id=host.fields.get("41")) if stan else None
        txn_id = original.txn_id if original is not None else None
        amount = host.fields.get("4", "")
        recorded = await self.store.record_late_answer(
            txn_id, host.fields.get("39", "")[:2] or "??", auth_code=host.get("38"), rrn=host.get("37"),
            host_mti=host.mti, host_stan=stan or None, terminal_id=host.get("41"),
            amount=int(amount) if amount.isdigit() else None, authenticated=reply.mac_ok,
        )
        log.warning("late host answer %s stan %s (rc %s, txn %s%s) journalled, not forwarded",
                    host.mti, stan, host.get("39"), txn_id, "" if reply.mac_ok else ", MAC not verified")
        if recorded.reopened:
            self.metrics.reversals_queued.inc()
            self.saf.wake()
            log.warning("txn %s: the host approved it after answering its reversal 25: reversal reopened", txn_id)

    # --- terminal reversal -------------------------------------------------------------------------

    async def _terminal_reversal(self, msg: Message, flow: FlowSpec) -> Answer:
        terminal_id = msg.fields["41"]
        batch = msg.fields.get("60", "")[2:8]
        stan = msg.fields["11"]
        await self._wait_in_flight((terminal_id, batch, stan))
        original = await self.store.find_original(terminal_id, batch, stan)
        rc = decisions.terminal_reversal_rc(msg, original, self.config.reversal.unknown_original_rc, flow.reverses)
        if rc == RC_APPROVED and original is not None and decisions.needs_host_reversal(original):
            # still pending after the wait: hold the 0400 back until the original's own exchange is over,
            # so it cannot overtake the original at the host
            not_before = time.time() + self.config.host.timeout if original.state is TxnState.PENDING else None
            try:
                queued = await self.store.queue_reversal(original.txn_id, msg.fields.get("39", "06"),
                                                         initiator="terminal", not_before=not_before)
            except NotReversible:
                queued = None
            if queued is not None and queued.created:
                self.metrics.reversals_queued.inc()
                self.saf.wake()
                log.info("terminal %s reversed stan %s (reason %s): forwarded via SAF",
                         terminal_id, stan, msg.get("39"))
        return Answer(decisions.answer(msg, rc))

    async def _wait_in_flight(self, key: tuple[str, str, str]) -> None:
        """Until the request `key` (terminal, batch, STAN) has its outcome journalled, bounded."""
        waiting = self.in_flight.get(key)
        if waiting is not None:
            with anyio.move_on_after(self.config.reversal.original_wait):
                await waiting.wait()

    # --- settlement --------------------------------------------------------------------------------

    async def _settlement(self, msg: Message) -> Answer:
        terminal_id = msg.fields["41"]
        batch = msg.fields.get("60", "")[2:8]
        # answers the terminal already has may still be on their way into the journal: wait for them
        for key in [k for k in self.in_flight if k[0] == terminal_id]:
            await self._wait_in_flight(key)
        ours = await self.store.settlement_totals(terminal_id, batch)
        field48, balanced = reconcile(msg.fields.get("48", ""), ours)
        log.info("terminal %s batch %s settlement: %s", terminal_id, batch,
                 "balanced" if balanced else f"NOT balanced (terminal {field48}, journal {ours})")
        answer = decisions.answer(msg, RC_APPROVED)
        answer.fields["48"] = field48
        return Answer(answer)
