"""The gateway service: carries out the core's decisions between terminals, the journal and the host.

One terminal request goes: decode → identify the flow → screen it (registered? signed in? batch? MAC?
valid? limits?) → translate to the host dialect → journal it (durable) → host → translate back →
answer the terminal → journal the outcome. Every approval ends either delivered or reversed:

- host timeout, or link lost mid-request → terminal gets 98, reversal queued (atomically with the state);
- approval that fails validation (bad host MAC, other amount) → terminal gets 96, reversal queued;
- approval that cannot be written to the terminal → reversal queued;
- a late host answer after the timeout → journalled, never forwarded.

When the journal cannot be written while a transaction is under way (disk full, I/O error), the step
that settles it is kept in memory and retried until the journal takes it (`gateway.journal_retry`):
the terminal still gets its answer at once (98, 96, the approval), and nothing stays pending until a
restart. Every refusal the gateway decides itself is put on record (`Store.record_refusal_soon`) in
one place, `_handle`, from the `refusal` reason its `Answer` carries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

import anyio
import anyio.abc

from gateway import logs
from gateway.config import GatewayConfig
from gateway.core import decisions, translate
from gateway.core.clock import local_now
from gateway.core.settlement import reconcile
from gateway.core.state import Limits, LocalLimits, LocalSessions, Sessions
from gateway.iso.codec import Codec
from gateway.iso.errors import IsoError
from gateway.iso.framing import Frame
from gateway.iso.message import Message, mask_pan
from gateway.iso.mti import is_request, match_class
from gateway.iso.spec import load_dialect
from gateway.iso.validate import FlowSpec, UnsupportedFlow, identify, validate
from gateway.iso.validate import flow as flow_spec
from gateway.journal_retry import JOURNAL_FAULT, RETRYABLE, JournalRetry, Kind
from gateway.metrics import Metrics, clock
from gateway.net.host_link import HostLink, HostNotSent, HostReply, HostTimeout, HostUnavailable
from gateway.net.saf_sender import SafSender
from gateway.net.terminal_server import TerminalConnection, Undeliverable
from gateway.ratelog import RateLimitedLog
from gateway.security.errors import MacError, PinFormatError, SecurityError
from gateway.security.module import SecurityModule
from gateway.store.base import Store
from gateway.store.errors import (
    CREDIT_REFUSALS,
    DuplicateRequest,
    NotReversible,
    OriginalRefused,
    StateConflict,
    StoreError,
)
from gateway.store.records import (
    APPROVAL_RCS,
    CHARGED_RCS,
    QueuedReversal,
    RefusalRecord,
    TxnKind,
    TxnRecord,
    TxnState,
    reversal_refusal,
)
from gateway.trace.format import Direction, EventKind, Leg, format_match_key
from gateway.trace.tap import Tap

log = logging.getLogger("gateway.flow")

RC_APPROVED = "00"

#: the reasons behind `decisions.original_problem`'s codes (a void's or refund's original), for the record
ORIGINAL_PROBLEMS = CREDIT_REFUSALS
#: why a terminal 0400 of a sale is refused 12 (`records.reversal_refusal`)
STANDING_CREDIT = "reversal: the sale has a void or refund standing"
#: the reasons behind `decisions.terminal_reversal_rc`'s refusals
REVERSAL_PROBLEMS = {
    "25": "original never seen by the gateway",
    "12": "the original is not a kind this reversal may undo",
    "64": "amount differs from the original's",
}


@dataclass(slots=True)
class Answer:
    """What to write back to the terminal."""

    message: Message
    resign: bool = False  #: set the CUP header's processing requirement to 3 (re-sign-in)
    #: why the gateway refused the request itself (put on record as a refusal); None for an approval,
    #: a host decline or any other answer that is not the gateway's own refusal
    refusal: str | None = None
    #: the journal entry of the request, when it was journalled
    txn_id: int | None = None
    #: the card's PAN when it was read (decrypted track), for the refusal's masked PAN and fingerprint
    pan: str | None = field(default=None, repr=False)


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
        #: in this process; shared by the instances on one PostgreSQL database (gateway.store.shared_state)
        self.sessions: Sessions = LocalSessions()
        self.limits: Limits = LocalLimits(config.limits)
        #: originals still waiting for the host, so a terminal reversal can wait for them
        self.in_flight: dict[tuple[str, str, str], anyio.Event] = {}
        self._rrn_seq = 0
        #: journal faults and repeated warnings: one full line per episode, then counts
        self.faults = RateLimitedLog(log)
        self.journal_retry = JournalRetry(
            store, metrics, settle_lost=self._settle_unknown_step, faults=self.faults,
            interval=min(config.reversal.poll_interval, config.host.timeout / 4),
        )
        #: set by a graceful shutdown: new financial requests are refused (91), the rest goes on
        self.draining = False
        #: terminal requests being processed now (the shutdown waits for them)
        self.active = 0
        #: since start: answers written to terminals, reversals this process queued
        self.answered = 0
        self.reversals_queued = 0
        self.tap: Tap | None = None  #: records the traffic when set (gateway.trace)

    @property
    def journal_healthy(self) -> bool:
        """/readyz: the last journal write worked and nothing waits in memory for the journal."""
        return self.journal_retry.healthy

    # --- start-up ----------------------------------------------------------------------------------

    async def recover(self) -> int:
        """Settle every request whose outcome is unknown (the gateway stopped while it was in flight):
        reversible kinds are reversed; the others (refund, balance inquiry) are marked timed out."""
        queued = 0
        for rec in await self.store.unknown_outcomes():
            await self._settle_unknown_step(rec)
            if self._reversible(rec.kind):
                queued += 1
                log.warning("txn %s (terminal %s stan %s) had no known outcome at start: reversal queued",
                            rec.txn_id, rec.terminal_id, rec.terminal_stan)
        return queued

    async def settle_orphans(self, records: list[TxnRecord]) -> int:
        """Settle requests another instance left `pending` (taken over with `claim_orphaned_pending`), as
        start-up recovery would; returns the reversals queued. One that got its outcome meanwhile (that
        instance was alive after all) is left as it is: the state machine refuses a timeout after an
        outcome."""
        queued = 0
        for rec in records:
            try:
                await self._settle_unknown_step(rec)
            except StateConflict as exc:
                log.info("txn %s of a stopped instance has moved on since (%s): left as it is", rec.txn_id, exc)
                continue
            if self._reversible(rec.kind):
                queued += 1
                log.warning("txn %s (terminal %s stan %s) was left pending by an instance that stopped:"
                            " reversal queued", rec.txn_id, rec.terminal_id, rec.terminal_stan)
        return queued

    async def sweep_orphans(self, *, interval: float, stale_after: float,
                            task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Several instances on one journal: settle the pending requests of an instance whose heartbeat
        is older than `stale_after` (it died, or lost the database), without waiting for its restart.
        The store hands each to exactly one live instance."""
        task_status.started()
        while True:
            await anyio.sleep(interval)
            try:
                orphans = await self.store.claim_orphaned_pending(stale_after)
                if orphans:
                    await self.settle_orphans(orphans)
            except Exception:  # a journal hiccup: the next sweep tries again
                self.faults.error("orphan sweep", "could not settle the pending requests of stopped instances",
                                  exc_info=True)

    async def _settle_unknown_step(self, rec: TxnRecord) -> None:
        """The outcome of a request nobody knows the answer to: reversed when reversible, else timed
        out. `state="timed_out"` makes it a no-op unless the row is still pending (or timed out)."""
        if self._reversible(rec.kind):
            await self._queue_reversal(rec.txn_id, "06", state="timed_out")
        else:
            await self.store.record_outcome(rec.txn_id, "timed_out")

    async def _queue_reversal(self, txn_id: int, reason: str, **options: object) -> QueuedReversal:
        queued = await self.store.queue_reversal(txn_id, reason, **options)  # type: ignore[arg-type]
        if queued.created:
            self._reversal_queued()
        return queued

    def _reversal_queued(self) -> None:
        self.metrics.reversals_queued.inc()
        self.reversals_queued += 1
        self.saf.wake()

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
        started = clock()
        try:
            msg = self.codec.decode(frame.body)
        except IsoError as exc:
            return Admitted(frame, None, exc)
        self.metrics.stages.decode.observe(clock() - started)
        logs.trace("terminal_in", msg)
        admitted = Admitted(frame, msg, None)
        if msg.mti in decisions.FINANCIAL_REQUEST_MTIS:
            key = (msg.fields.get("41", ""), decisions.batch_of(msg), msg.fields.get("11", ""))
            if key not in self.in_flight:  # a duplicate STAN waits on the first one's event
                admitted.in_flight_key = key
                admitted.done = self.in_flight[key] = anyio.Event()
        return admitted

    async def handle_frame(self, admitted: Admitted, conn: TerminalConnection) -> None:
        started = clock()
        txn, token = logs.begin_transaction(admitted.message)  # log lines of this request carry its ids
        try:
            await self._handle(admitted, conn)
        finally:
            # only now, with the outcome journalled, may a waiting reversal look at the original
            if admitted.done is not None:
                self.in_flight.pop(admitted.in_flight_key, None)  # type: ignore[arg-type]
                admitted.done.set()
            if admitted.message is not None:
                self.metrics.end_to_end(txn.flow, txn.rc if txn.delivered else None).observe(clock() - started)
            logs.end_transaction(token)

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
        self.active += 1
        try:
            try:
                if admitted.done is None and msg.mti in decisions.FINANCIAL_REQUEST_MTIS:
                    # the same terminal, batch and STAN is in flight already (a retransmission): decide it
                    # once the first has its outcome, so the terminal's first answer for that STAN is the
                    # charge's own (this one then gets 94 from the journal)
                    await self._wait_in_flight((msg.fields.get("41", ""), decisions.batch_of(msg),
                                                msg.fields.get("11", "")))
                answer, on_delivery = await self._decide(msg, frame.body)
            except StoreError as exc:
                # a journal read or write failed (an original's lookup, a terminal reversal's queueing):
                # nothing new is pending because of it, the terminal gets a defined answer
                if isinstance(exc, RETRYABLE):
                    self.journal_retry.note_failure()
                self.faults.error(JOURNAL_FAULT, "journal failed while processing %s from terminal %s: 96",
                                  msg.mti, msg.get("41"), exc_info=True)
                answer, on_delivery = self._refused(msg, "96", f"journal failed: {exc}"), None
            except Exception as exc:
                # a bug guard: the terminal gets a defined answer instead of silence; anything already
                # journalled as pending is settled by the journal retry's sweep, never left charged
                log.exception("error while processing %s from terminal %s", msg.mti, msg.get("41"))
                answer, on_delivery = self._refused(msg, "96", f"internal error: {type(exc).__name__}"), None
            if answer.refusal is not None:
                self._record_refusal(msg, answer)  # on record before the terminal sees it (costs no wait)
            # shielded: once an answer is decided, writing it and journalling whether it was delivered
            # must both happen even during shutdown (the write is bounded by write_timeout)
            with anyio.CancelScope(shield=True):
                delivered = await self._send(conn, frame, answer, msg)
                logs.note(rc=answer.message.fields.get("39"), delivered=delivered)
                try:
                    if on_delivery is not None:
                        await on_delivery(delivered)
                except Exception:
                    log.exception("txn %s: journalling the delivery failed", answer.txn_id)
                finally:
                    if answer.txn_id is not None:
                        self.journal_retry.finished(answer.txn_id)
        finally:
            self.active -= 1
            self.metrics.in_flight.dec()

    async def _send(self, conn: TerminalConnection, frame: Frame, answer: Answer, request: Message) -> bool:
        """Write the answer; False when it could not be, for any reason (then an approval is reversed).

        An answer that cannot be encoded (the host sent a value the terminal dialect cannot carry, or
        the terminal signed off, keys gone, while its purchase was at the host) is replaced in `answer`
        by a 96 refusal, written at once so the terminal does not wait out its timeout; False all the
        same, since the answer decided was not delivered."""
        msg = answer.message
        try:
            body = self._encode_for_terminal(msg)
        except (IsoError, SecurityError) as exc:
            log.error("answer %s (rc %s) to terminal %s cannot be encoded: %s; it gets 96 instead", msg.mti,
                      msg.get("39"), msg.get("41"), exc)
            fallback = self._refused(request, "96", f"the answer {msg.mti} rc {msg.get('39')} cannot be encoded "
                                                    f"for the terminal: {exc}")
            answer.message, answer.refusal, answer.resign = fallback.message, fallback.refusal, False
            self._record_refusal(request, answer)
            try:
                body = self._encode_for_terminal(fallback.message)  # a 96 carries no MAC: no keys needed
            except (IsoError, SecurityError) as again:
                log.error("the 96 to terminal %s cannot be encoded either: %s", request.get("41"), again)
                return False
            await self._write(conn, frame, answer, body)
            return False
        return await self._write(conn, frame, answer, body)

    async def _write(self, conn: TerminalConnection, frame: Frame, answer: Answer, body: bytes) -> bool:
        msg = answer.message
        logs.trace("terminal_out", msg)
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
        self.answered += 1
        if self.tap is not None:
            self.tap.frame(Leg.TERMINAL, Direction.OUT, conn, body, envelope)
        self.metrics.message("terminal_out", msg.mti, msg.fields.get("39", "")).inc()
        return True

    # --- refusals on record ------------------------------------------------------------------------

    def _refused(self, msg: Message, rc: str, why: str, *, resign: bool = False, pan: str | None = None) -> Answer:
        """The gateway's own refusal of `msg`, with the reason put on record (`_record_refusal`)."""
        return Answer(decisions.refuse(msg, rc), resign=resign, refusal=why, pan=pan)

    def _record_refusal(self, msg: Message, answer: Answer) -> None:
        """Journal a refusal (joins the next commit; nothing waits for it). Never costs the answer.
        While the journal fails it is kept for the journal retry instead (and serves as its probe)."""
        try:
            record = self._refusal_record(msg, answer)
            if self.journal_retry.healthy:
                self.store.record_refusal_soon(record, on_error=lambda exc: self._refusal_failed(record, exc))
            else:
                self._keep_refusal(record)
        except Exception as exc:
            self._refusal_not_recorded(exc)

    def _refusal_failed(self, record: RefusalRecord, exc: BaseException) -> None:
        if isinstance(exc, RETRYABLE):
            self.journal_retry.note_failure()
            self._keep_refusal(record)
        else:
            self._refusal_not_recorded(exc)

    def _keep_refusal(self, record: RefusalRecord) -> None:
        late = dataclasses.replace(record, reason=f"{record.reason} (refused at {datetime.now():%Y-%m-%d %H:%M:%S}, "
                                                  "journalled later)")
        self.journal_retry.keep(None, f"refusal {record.rc} of terminal {record.terminal_id} stan {record.stan}",
                                functools.partial(self._write_refusal_now, late), kind=Kind.REFUSAL)

    async def _write_refusal_now(self, record: RefusalRecord) -> None:
        """`record_refusal_soon`, awaited: a read flushes this process's writes first (Store protocol),
        so once it returns the refusal is committed, or its `on_error` has run."""
        failed: list[BaseException] = []
        self.store.record_refusal_soon(record, on_error=failed.append)
        await self.store.refusals(limit=1)
        if failed:
            raise failed[0]

    def _refusal_record(self, msg: Message, answer: Answer) -> RefusalRecord:
        fields = msg.fields
        flow = identify(self.dialect.name, msg)
        amount = fields.get("4", "")
        pan = answer.pan or _readable_pan(msg)
        masked = fingerprint = ""
        if pan and pan.isdigit() and 13 <= len(pan) <= 19:
            masked = mask_pan(pan)
            with contextlib.suppress(StoreError):  # no fingerprint key: the masked PAN alone
                fingerprint = self.store.fingerprint(pan)
        return RefusalRecord(
            terminal_id=fields.get("41", ""), mti=msg.mti, rc=answer.message.fields.get("39", "96"),
            reason=answer.refusal or "refused", merchant_id=fields.get("42"), batch=decisions.batch_of(msg) or None,
            stan=fields.get("11"), kind=flow.name if flow is not None else None,
            amount=int(amount) if amount.isdigit() else None, pan_masked=masked, pan_fingerprint=fingerprint,
        )

    def _refusal_not_recorded(self, exc: BaseException) -> None:
        self.metrics.refusals_unrecorded.inc()
        self.faults.warning("refusal not journalled", "a refusal could not be journalled: %s", exc)

    def _encode_for_terminal(self, msg: Message) -> bytes:
        body = self.codec.encode(msg)
        if self.dialect.mac_field in msg.fields:
            mab = body[: -self.mac_len]
            started = clock()
            mac = self.security.generate_terminal_mac(msg.fields["41"], mab)
            self.metrics.stages.security.observe(clock() - started)
            body = mab + mac
            msg.fields[self.dialect.mac_field] = mac.hex().upper()  # field 64 is binary (8 bytes)
        return body

    async def _decide(self, msg: Message, body: bytes) -> tuple[Answer, decisions.OnDelivery | None]:
        flow = identify(self.dialect.name, msg)
        if flow is None:
            return self._refused(msg, decisions.unsupported_rc(msg), "no such transaction in the terminal dialect "
                                 f"(MTI {msg.mti}, processing code {msg.fields.get('3', '-')})"), None
        logs.note(flow=flow.name)
        entry = self.config.terminal(msg.fields.get("41", ""))
        if entry is None:
            # one key for every unregistered id: they come from the wire, the log must stay bounded
            self.faults.warning("unregistered terminal", "terminal %r is not registered: 97", msg.fields.get("41"))
            return self._refused(msg, "97", "terminal not registered"), None
        if msg.fields.get("42", entry.merchant_id) != entry.merchant_id:
            self.faults.warning(f"03:{entry.terminal_id}", "terminal %s sent merchant id %r, registered %r: 03",
                                entry.terminal_id, msg.fields.get("42"), entry.merchant_id)
            return self._refused(msg, "03", "the merchant id (field 42) is not the one registered for the "
                                 "terminal"), None
        problems = validate(self.dialect.name, msg)
        if any(isinstance(p, UnsupportedFlow) for p in problems):
            return self._refused(msg, "40", f"unsupported: {problems[0]}"), None
        if flow.name == "sign_in":
            return await self._sign_in(msg, entry.merchant_id), None
        session = self.sessions.get(entry.terminal_id)
        refusal = decisions.screen_session(msg, session)
        if refusal is not None and await self.sessions.refresh(entry.terminal_id):
            # signed in, or its batch moved on, on another instance sharing the sessions
            session = self.sessions.get(entry.terminal_id)
            refusal = decisions.screen_session(msg, session)
        if refusal is not None:
            why = ("not signed in" if session is None else
                   f"batch {decisions.batch_of(msg)} is not the signed-in batch {session.batch}")
            return self._refused(msg, refusal, why, resign=True), None
        if flow.mac:
            try:
                mac = body[-self.mac_len :]
                started = clock()
                try:
                    self.security.verify_terminal_mac(entry.terminal_id, body[: -self.mac_len], mac)
                except MacError:
                    # new working keys from a sign-in on another instance: once more with the shared ones
                    if not await self.sessions.refresh(entry.terminal_id):
                        raise
                    self.security.verify_terminal_mac(entry.terminal_id, body[: -self.mac_len], mac)
                self.metrics.stages.security.observe(clock() - started)
            except MacError:
                self.metrics.mac_failures.inc()
                log.warning("bad MAC from terminal %s stan %s: A0", entry.terminal_id, msg.get("11"))
                return self._refused(msg, "A0", "the request's MAC does not verify"), None
            except SecurityError as exc:
                return self._refused(msg, exc.response_code, f"MAC check failed: {exc.kind}"), None
        if problems:
            log.warning("terminal %s %s fails validation: %s", entry.terminal_id, msg.mti, problems[0])
            self.metrics.decode_error("validation").inc()
            return self._refused(msg, "30", f"format error: {problems[0]}"), None
        if flow.name in ("purchase", "void", "refund", "balance_inquiry"):
            return await self._financial(msg, flow)
        if flow.reverses:
            return await self._terminal_reversal(msg, flow), None
        if flow.name == "settlement":
            return await self._settlement(msg), None
        if flow.name in ("batch_upload", "batch_upload_end"):
            if flow.name == "batch_upload_end":
                await self.sessions.close_batch(entry.terminal_id)
            return Answer(decisions.answer(msg, RC_APPROVED)), None
        if flow.name == "sign_off":
            await self.sessions.sign_off(entry.terminal_id)
            self.security.drop_working_keys(entry.terminal_id)
            return Answer(decisions.answer(msg, RC_APPROVED)), None
        if flow.name == "echo":
            return Answer(decisions.answer(msg, RC_APPROVED)), None
        return self._refused(msg, "40", f"transaction {flow.name} is not supported by this gateway"), None

    # --- sign-in -----------------------------------------------------------------------------------

    async def _sign_in(self, msg: Message, merchant_id: str) -> Answer:
        terminal_id = msg.fields["41"]
        batch, key_mode = decisions.sign_in_request(msg, self.config.security.key_mode)
        try:
            block = self.security.issue_working_keys(terminal_id, key_mode)
        except SecurityError as exc:
            log.error("working keys for terminal %s could not be issued: %s", terminal_id, exc)
            return self._refused(msg, exc.response_code, f"working keys could not be issued: {exc.kind}")
        await self.sessions.sign_in(terminal_id, merchant_id, batch, key_mode)  # on record before the answer
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
            if original is not None and self.journal_retry.holds(original.txn_id):
                # its outcome waits in memory for the journal: the row does not say yet what happened
                return self._refused(msg, "96", f"the original (txn {original.txn_id}) is not journalled yet: "
                                     "the journal is failing"), None
            earlier = await self.store.find_referencing(original.txn_id) if original is not None else []
            problem = decisions.original_problem(msg, original, earlier, flow_name=name)
            # a refund may refer to a sale we never saw (another day, another gateway): the host decides
            if problem is not None and not (name == "refund" and original is None):
                log.info("terminal %s %s refused with %s (original check)", terminal_id, name, problem)
                return self._refused(msg, problem, f"original check: {ORIGINAL_PROBLEMS.get(problem, problem)}"), None
        if self.draining:
            return self._refused(msg, "91", "the gateway is shutting down"), None
        if not self.link.ready:
            # answered at once: the terminal must not wait a full timeout for a host we know is down
            self.faults.warning("host link down", "host link down: terminal %s stan %s gets 91", terminal_id,
                                msg.get("11"))
            return self._refused(msg, "91", "host link down"), None
        if self.journal_retry.full:
            # the journal has been failing long enough to fill the retry queue: take on nothing new
            return self._refused(msg, "96", "journal failing: its retry queue is full"), None
        amount = int(msg.fields.get("4", "0") or 0)
        day = local_now().day
        reserved = name == "purchase"
        if reserved:
            rc = await self.limits.reserve(terminal_id, amount, day)
            if rc is not None:
                log.info("terminal %s purchase of %d refused by risk limits", terminal_id, amount)
                which = ("per-transaction" if amount > self.config.limits.per_transaction else "daily")
                return self._refused(msg, rc, f"over the {which} risk limit"), None
        released = not reserved

        def release() -> None:
            """Give the reserved amount back to the day's limit, once, whichever path gets here first."""
            nonlocal released
            if not released:
                released = True
                self.limits.release(terminal_id, amount, day)

        try:
            started = clock()
            card = translate.card_data(msg, self.security)
            self.metrics.stages.security.observe(clock() - started)
        except SecurityError as exc:
            release()
            self.metrics.security_failure(exc.kind).inc()
            if isinstance(exc, PinFormatError):
                self.metrics.pin_failures.inc()
            log.warning("terminal %s stan %s refused by the security module: %s (%s)",
                        terminal_id, msg.get("11"), exc.response_code, exc.kind)
            return self._refused(msg, exc.response_code, f"security module: {exc.kind}"), None
        stan, transmission_dt = self.link.allocate()
        host_req = translate.to_host(msg, name, card, self.config.host, stan, transmission_dt, original)
        fingerprint = self.store.fingerprint(card.pan) if card.pan else ""
        record = translate.journal_record(msg, host_req, name, card, fingerprint, original)
        try:
            started = clock()
            txn_id = await self.store.record_request(record)
            self.metrics.stages.journal.observe(clock() - started)
            logs.note(txn_id=txn_id)
        except OriginalRefused as exc:
            # another void or refund of the same sale was journalled between our check and this write
            # (another connection, or another instance on a shared journal): the journal's check wins
            release()
            log.info("terminal %s %s refused with %s at the journal: %s", terminal_id, name, exc.rc, exc)
            return self._refused(msg, exc.rc, f"original check at the journal: {exc}", pan=card.pan), None
        except DuplicateRequest:
            release()
            self.faults.warning(f"94:{terminal_id}", "terminal %s repeated batch/stan %s: 94", terminal_id,
                                msg.get("11"))
            return self._refused(msg, "94", f"duplicate: batch {record.batch} stan {record.terminal_stan} is "
                                 "already journalled", pan=card.pan), None
        except Exception as exc:
            release()
            if isinstance(exc, RETRYABLE):
                self.journal_retry.note_failure()  # /readyz says so until the journal takes writes again
                self.faults.error(JOURNAL_FAULT, "journal write failed: refusing terminal %s stan %s with 96",
                                  terminal_id, msg.get("11"), exc_info=True)
            else:
                log.exception("journal refused terminal %s stan %s: 96", terminal_id, msg.get("11"))
            return self._refused(msg, "96", f"journal write failed: {exc}", pan=card.pan), None
        self.journal_retry.note_success()
        self.journal_retry.opened(txn_id)
        try:
            answer, on_delivery = await self._exchange(msg, host_req, txn_id, flow, card.pan, release)
        except Exception:
            # journalled but the outcome could not be settled normally: never leave it pending while
            # the gateway runs on. The request may have left, so reverse what is reversible.
            log.exception("txn %s (terminal %s stan %s) failed mid-exchange", txn_id, terminal_id, msg.get("11"))
            with anyio.CancelScope(shield=True):
                release()
                await self._settle_unknown(txn_id, flow)
            answer, on_delivery = self._refused(msg, "96", f"internal error mid-exchange (txn {txn_id}): "
                                                "settled as unknown"), None
        answer.txn_id, answer.pan = txn_id, card.pan
        return answer, on_delivery

    async def _settle(self, txn_id: int, what: str, step: Callable[[], Awaitable[object]]) -> bool:
        """Write a step that settles `txn_id`; when the journal fails, keep it for a retry (False)."""
        return await self.journal_retry.attempt(txn_id, f"{what} of txn {txn_id}", step)

    async def _settle_unknown(self, txn_id: int, flow: FlowSpec) -> None:
        async def step() -> None:
            if flow.reversible:
                await self._queue_reversal(txn_id, "06", state="timed_out")
            else:
                await self.store.record_outcome(txn_id, "timed_out", rc="96")

        try:
            await self._settle(txn_id, "settlement as unknown", step)
        except StoreError as exc:
            log.error("txn %s could not be settled (%s): the journal retry's sweep will", txn_id, exc)

    async def _find_referenced_original(self, msg: Message) -> TxnRecord | None:
        batch, trace, _ = translate.original_refs(msg)
        original = None
        if batch and trace:
            # a void sent the moment its sale's answer arrived: let the sale's outcome be journalled first
            key = (msg.fields["41"], batch, trace)
            here = key in self.in_flight
            await self._wait_in_flight(key)
            original = await self.store.find_original(*key)
            if (original is not None and original.state is TxnState.PENDING and not here
                    and not self.journal_retry.holds(original.txn_id)):
                original = await self._outcome_from_elsewhere(original)
        if original is None and "37" in msg.fields:
            original = await self.store.find_by_rrn(msg.fields["37"], terminal_id=msg.fields["41"])
            if original is None and msg.mti == "0220":
                # a refund at another till of the merchant: the sale is in the journal, so it is checked
                # and counted against that sale like one of its own terminal (else it would go upstream
                # unchecked, and the sale's own terminal could refund it in full once more)
                other = await self.store.find_by_rrn(msg.fields["37"])
                if (other is not None and other.kind is TxnKind.PURCHASE
                        and other.merchant_id == msg.fields.get("42")):
                    original = other
        return original

    async def _outcome_from_elsewhere(self, original: TxnRecord) -> TxnRecord:
        """A pending original that is not in flight here: another instance on the shared journal has it (its
        answer is out, its outcome on its way into the journal). Polled until it is there, bounded."""
        with anyio.move_on_after(self.config.reversal.original_wait):
            delay = 0.005
            while original.state is TxnState.PENDING:
                await anyio.sleep(delay)
                delay = min(delay * 2, 0.1)
                original = await self.store.get(original.txn_id) or original
        return original

    async def _exchange(self, msg: Message, host_req: Message, txn_id: int, flow: FlowSpec, pan: str | None,
                        release: Callable[[], None]) -> tuple[Answer, decisions.OnDelivery | None]:
        """`release` gives back the risk-limit reservation (idempotent) when no money moved. Every
        outcome goes through `_settle`: if the journal cannot take it now, it is kept and retried, and
        the terminal gets its answer all the same."""
        terminal_id = msg.fields["41"]
        sent_at = clock()
        store = self.store

        try:
            reply = await self.link.request(host_req)
        except HostNotSent as exc:
            rc = "91" if isinstance(exc, HostUnavailable) else "96"
            release()
            await self._settle(txn_id, "decline", lambda: store.record_outcome(txn_id, "declined", rc=rc))
            log.warning("not sent to the host (%s): terminal %s stan %s gets %s", exc, terminal_id, msg.get("11"), rc)
            return self._refused(msg, rc, f"not sent to the host: {exc}"), None
        except HostTimeout as exc:
            self.metrics.timeouts.inc()
            release()
            if flow.reversible:
                async def timeout_and_reversal() -> None:
                    # one transaction: a timed-out charge never exists without its reversal
                    if (await store.record_timeout_and_queue_reversal(txn_id, "98")).created:
                        self._reversal_queued()

                written = await self._settle(txn_id, "timeout and reversal", timeout_and_reversal)
                log.warning("txn %s (terminal %s stan %s): %s; terminal gets 98, reversal %s", txn_id, terminal_id,
                            msg.get("11"), exc, "queued" if written else "kept until the journal takes it")
            else:
                await self._settle(txn_id, "timeout", lambda: store.record_outcome(txn_id, "timed_out", rc="98"))
                log.warning("txn %s (%s): %s; terminal gets 98", txn_id, flow.name, exc)
            return self._refused(msg, "98", f"no host answer in time (txn {txn_id}): {exc}"), None
        self.metrics.upstream.observe(clock() - sent_at)
        host = reply.message
        rc = host.fields.get("39", "96")
        # the customer was charged, or may have been (a MAC that fails covers field 39 too; an answer
        # without field 39 does not say): an answer we cannot trust or carry is reversed
        if rc in CHARGED_RCS or not reply.mac_ok or "39" not in host.fields:
            problem = ("the answer has no response code (field 39)" if "39" not in host.fields
                       else decisions.check_host_answer(host_req, host, reply.mac_ok))
            if problem is not None:
                release()
                log.error("host answer for txn %s not trusted (%s): terminal gets 96", txn_id, problem)
                if flow.reversible:
                    reason = "A0" if not reply.mac_ok else "06"
                    await self._settle(txn_id, "reversal of an untrusted approval", lambda: self._queue_reversal(
                        txn_id, reason, state="host_rejected", rc=rc))
                else:
                    await self._settle(txn_id, "rejection", lambda: store.record_outcome(
                        txn_id, "host_rejected", rc=rc))
                return self._refused(msg, "96", f"host approval not trusted (txn {txn_id}): {problem}"), None
        answer = translate.to_terminal(msg, host, self.config.host.acquirer_id, pan)
        if rc not in APPROVAL_RCS:
            release()
            try:
                await self._settle(txn_id, "decline", lambda: store.record_outcome(
                    txn_id, "declined", rc=rc, rrn=host.get("37")))
            except StateConflict as exc:  # settled meanwhile: the terminal still gets the host's word
                await self._answer_after_settlement(txn_id, reply, exc)
            return Answer(answer), None
        rrn, auth_code = host.get("37"), host.get("38")

        async def on_delivery(delivered: bool) -> None:
            if delivered:
                # Awaited, though the terminal has its answer: the shorter the time between the answer
                # and its completion on disk, the fewer receipts a crash turns into reversed sales (the
                # policy for that window is in the README). A failed write is kept and retried: a
                # delivered approval is never reversed because the disk hiccupped.
                try:
                    await self._settle(txn_id, "completion", lambda: store.record_outcome(
                        txn_id, "completed", rc=rc, rrn=rrn, auth_code=auth_code))
                except StateConflict as exc:  # e.g. an operator or the terminal's own 0400 acted meanwhile
                    log.error("txn %s delivered but could not be marked completed: %s", txn_id, exc)
                    await self._answer_after_settlement(txn_id, reply, exc)
                return
            release()
            if flow.reversible:
                async def reverse_undeliverable() -> None:
                    queued = await self._queue_reversal(txn_id, "96", state="undeliverable", rc=rc, rrn=rrn,
                                                        auth_code=auth_code)
                    if not queued.created:  # reversed meanwhile, maybe on a 25 that overtook this original
                        await self._answer_after_settlement(txn_id, reply, None)

                await self._settle(txn_id, "reversal of an undeliverable approval", reverse_undeliverable)
                log.warning("approval of txn %s could not be delivered to terminal %s: reversal queued",
                            txn_id, terminal_id)
            else:
                await self._settle(txn_id, "undeliverable outcome", lambda: store.record_outcome(
                    txn_id, "undeliverable", rc=rc, rrn=rrn, auth_code=auth_code))

        return Answer(answer), on_delivery

    async def on_unmatched_host_answer(self, reply: HostReply) -> None:
        """A host answer nobody waits for any more: journal it, never forward it. Its reversal was
        queued when the request timed out, so a late approval changes nothing for the customer; if the
        host had already answered that reversal 25 ("original not found": the reversal overtook the
        original), the journal reopens the reversal and it goes again (only for an approval whose MAC
        verified: anything else proves nothing). When the journal fails, it is kept and retried."""
        host = reply.message
        stan = host.fields.get("11", "")

        async def journal_it() -> None:
            original = await self.store.find_by_host_stan(stan, terminal_id=host.fields.get("41")) if stan else None
            txn_id = original.txn_id if original is not None else None
            await self._record_late(txn_id, reply)
            # one line per episode, then a count: a storm of stray answers is thousands of them (the
            # journal has each; a reopened reversal is a line of its own)
            self.faults.warning("late host answer", "late host answer %s stan %s (rc %s, txn %s%s) journalled, "
                                "not forwarded", host.mti, stan, host.get("39"), txn_id,
                                "" if reply.mac_ok else ", MAC not verified")

        await self.journal_retry.attempt(None, f"late host answer {host.mti} stan {stan} rc {host.get('39')}",
                                         journal_it, kind=Kind.LATE)

    async def _record_late(self, txn_id: int | None, reply: HostReply) -> None:
        """Journal a host answer as a late one; an authenticated approval of a transaction whose reversal
        the host answered 25 (it overtook the original) reopens that reversal."""
        host = reply.message
        amount = host.fields.get("4", "")
        recorded = await self.store.record_late_answer(
            txn_id, host.fields.get("39", "")[:2] or "??", auth_code=host.get("38"), rrn=host.get("37"),
            host_mti=host.mti, host_stan=host.get("11") or None, terminal_id=host.get("41"),
            amount=int(amount) if amount.isdigit() else None, authenticated=reply.mac_ok,
            unknown_rc=self.config.host.unknown_reversal_rc,
        )
        if recorded.reopened:
            self._reversal_queued()
            log.warning("txn %s: the host approved it after answering its reversal %s: reversal reopened",
                        txn_id, "25 or 00" if self.config.host.unknown_reversal_rc == "00" else "25")

    async def _answer_after_settlement(self, txn_id: int, reply: HostReply, conflict: StateConflict | None) -> None:
        """The host answered a request that was settled while it waited: reversed by another instance
        that took this one for dead (stalled past store.orphan_after) or by an operator. For the journal
        that answer is a late one: an approval then reopens a reversal the host had answered 25 because
        it got there before this original (else the cardholder stays charged, or the host keeps money
        the journal calls reversed)."""
        log.warning("txn %s was settled while its host answer (rc %s) was on the way%s: journalled as a late answer",
                    txn_id, reply.message.get("39"), f" ({conflict})" if conflict is not None else "")
        await self._settle(txn_id, "answer after settlement", lambda: self._record_late(txn_id, reply))

    # --- terminal reversal -------------------------------------------------------------------------

    async def _terminal_reversal(self, msg: Message, flow: FlowSpec) -> Answer:
        terminal_id = msg.fields["41"]
        batch = msg.fields.get("60", "")[2:8]
        stan = msg.fields["11"]
        await self._wait_in_flight((terminal_id, batch, stan))
        original = await self.store.find_original(terminal_id, batch, stan)
        rc = decisions.terminal_reversal_rc(msg, original, self.config.reversal.unknown_original_rc, flow.reverses)
        # a void or refund of this sale that may have credited the card: reversing the sale too would
        # credit it twice (the terminal may reverse that void instead)
        if (rc == RC_APPROVED and original is not None and original.kind is TxnKind.PURCHASE
                and reversal_refusal(original, await self.store.find_referencing(original.txn_id))):
            return self._refused(msg, "12", STANDING_CREDIT)
        if rc == RC_APPROVED and original is not None and decisions.needs_host_reversal(original):
            # still pending after the wait: hold the 0400 back until the original's own exchange is over,
            # so it cannot overtake the original at the host
            not_before = time.time() + self.config.host.timeout if original.state is TxnState.PENDING else None
            try:
                queued = await self.store.queue_reversal(original.txn_id, msg.fields.get("39", "06"),
                                                         initiator="terminal", not_before=not_before)
            except NotReversible:
                queued = None
            except OriginalRefused:  # a void or refund journalled since the check above (another connection)
                return self._refused(msg, "12", STANDING_CREDIT)
            if queued is not None and queued.created:
                self._reversal_queued()
                if original.kind == "purchase" and original.state is TxnState.COMPLETED:
                    # the sale kept its risk-limit reservation when it completed; reversed, it no longer
                    # counts (a restart seeds the limits from completed purchases only). A pending one
                    # is left to its own exchange, which gives the reservation back when it fails.
                    day = time.strftime("%Y%m%d", time.localtime(original.created_at))
                    self.limits.release(terminal_id, original.amount, day)
                log.info("terminal %s reversed stan %s (reason %s): forwarded via SAF",
                         terminal_id, stan, msg.get("39"))
        if rc != RC_APPROVED:
            return self._refused(msg, rc, f"reversal: {REVERSAL_PROBLEMS.get(rc, 'refused')}")
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


def _readable_pan(msg: Message) -> str | None:
    """The card number of a request as it arrived, for a refusal decided before the card data was read:
    field 2, or the account number at the front of track 2, which stays clear in a TDK-encrypted track
    (reference §4.4: only the last 17 digits but one are enciphered). None when there is no readable one."""
    pan = msg.fields.get("2")
    if pan is None:
        track = msg.fields.get("35", "")
        if msg.fields.get("53", "")[2:3] == translate.TRACK_ENCRYPTED:
            track = track[: max(len(track) - 17, 0)]
        pan, sep, _ = track.replace("=", "D").partition("D")
        if not sep:
            return None
    return pan if pan.isascii() and pan.isdigit() and 13 <= len(pan) <= 19 else None
