"""The terminal simulator: a CUP POS terminal as a client library.

It speaks the CUP POS dialect with the "cup" framing (2-byte length, TPDU, 6-byte header), signs in
and installs the working keys of the 0810's field 62 (check values verified with its clear TMK), and
runs purchases, voids, refunds, balance inquiries, reversals and settlement with real cryptography:
PIN blocks (ISO 9564 format 0 under the PIK), TDK-encrypted track 2 (key mode 004), and the CUP MAC
(under the MAK, over body[:-8], spliced into the last 8 bytes).

It checks every answer the way a certified terminal does (LY `ProcRspPacket`): response MTI, echoed
3/4/11/41 (42 on approvals), and the MAC when 39 = 00. An approval whose MAC fails is reversed by the
terminal itself with reason A0; a reversible request with no answer in time is reversed with 98; a
reversal that gets no answer is kept and sent again before the next financial request.

Several requests may be in flight on one connection; answers are matched by MTI class + STAN. There
is no reader task: whichever caller is waiting reads the socket and hands every frame to its owner
(leader/follower). That keeps a terminal usable from any task, which the load tool needs (it
connects, uses and closes a session from different tasks), with no task group to own.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Final, Literal

import anyio
import anyio.abc

from gateway.iso.build import TerminalIdent, cup, security_control
from gateway.iso.codec import Codec
from gateway.iso.errors import IsoError
from gateway.iso.framing import CupEnvelope, Frame, FrameDecoder, make_framer
from gateway.iso.message import Message, mask_pan
from gateway.iso.mti import match_class, response_mti
from gateway.iso.spec import load_dialect
from gateway.iso.stan import StanAllocator
from gateway.iso.totals import (
    CARD_ORG_DOMESTIC,
    CARD_ORG_FOREIGN,
    MAX_BATCH_ITEMS,
    BatchItem,
    CardTotals,
    SettlementTotals,
)
from gateway.iso.validate import echo_mismatches
from gateway.net.tls import handshake
from gateway.security.algorithms import (
    encrypt_pin_block,
    encrypt_track,
    macs_equal,
    parse_key_block,
    terminal_mac,
)
from gateway.security.errors import SecurityError
from gateway.security.keys import KeyUsage

log = logging.getLogger("gateway.sim.terminal")

DIALECT: Final = "cup-pos"
#: pass as `pin` to send no PIN block even when the card has a PIN configured
NO_PIN: Final = ""
#: 39 of a 0400: the terminal's reversal reasons (reference §4.5)
REASON_TIMEOUT: Final = "98"
REASON_TERMINAL_FAULT: Final = "96"
REASON_MAC_FAILURE: Final = "A0"
REASON_OTHER: Final = "06"
#: header processing requirement (处理要求) 3: the host asks the terminal to sign in again
PR_RESIGN: Final = 3

Entry = Literal["swipe", "manual"]
TxnKind = Literal[
    "sign_in", "sign_off", "echo", "purchase", "void", "refund", "balance", "reversal", "settlement",
    "batch_upload", "batch_upload_end",
]


class TerminalError(Exception):
    """Base of terminal-simulator failures (never carries card data or keys)."""


class TerminalConnectionError(TerminalError):
    """Cannot connect, or the connection was lost while a request waited for its answer."""


class SignInError(TerminalError):
    """Sign-in refused, or its key block rejected (check value mismatch): old keys are kept."""


class NotSignedIn(TerminalError):
    """A MAC'd request before a successful sign-in: the terminal has no working keys."""


@dataclass(frozen=True, slots=True)
class Card:
    """A test card. `pin` is what the cardholder types when the caller does not say otherwise."""

    pan: str
    expiry: str = "3012"  #: YYMM
    pin: str | None = None
    service_code: str = "101"
    discretionary: str = "0000000000"

    @property
    def track2(self) -> str:
        """Track 2 with the BCD separator 'D' (the form the CUP codec and TDK encryption use)."""
        return f"{self.pan}D{self.expiry}{self.service_code}{self.discretionary}"

    @property
    def domestic(self) -> bool:
        """CUP cards (BIN 62...) count as 内卡 in the settlement totals, everything else as 外卡."""
        return self.pan.startswith("62")

    def __repr__(self) -> str:
        return f"Card({mask_pan(self.pan)}, expiry={self.expiry}, pin={'set' if self.pin else 'none'})"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class TxnResult:
    """The outcome of one exchange as the terminal sees it."""

    kind: TxnKind
    rc: str | None  #: field 39; None when no answer came in time
    stan: str
    request: Message
    response: Message | None = None
    amount: int | None = None
    rrn: str | None = None
    auth_code: str | None = None
    balance: int | None = None
    batch: str = ""
    date: str = ""  #: MMDD of the transaction (response 13, else the terminal's clock)
    mac_ok: bool | None = None  #: None when no MAC was due
    problems: tuple[str, ...] = ()  #: response checks that failed (MTI, echoed fields)
    processing_requirement: int | None = None  #: response header 处理要求 nibble
    timed_out: bool = False
    reversal: TxnResult | None = None  #: the reversal the terminal sent on its own, if any
    card: Card | None = field(default=None, repr=False)
    entry: Entry = "swipe"

    @property
    def approved(self) -> bool:
        """39 = 00 on a valid answer whose MAC verified."""
        return self.rc == "00" and not self.problems and self.mac_ok is not False

    @property
    def needs_sign_in(self) -> bool:
        return self.processing_requirement == PR_RESIGN

    @property
    def fields(self) -> dict[str, str]:
        return self.response.fields if self.response is not None else {}

    def __repr__(self) -> str:
        return (
            f"TxnResult({self.kind} rc={self.rc} stan={self.stan} amount={self.amount} rrn={self.rrn} "
            f"mac_ok={self.mac_ok} problems={list(self.problems)} pr={self.processing_requirement}"
            f"{' timed out' if self.timed_out else ''}"
            f"{f' reversal={self.reversal.rc}' if self.reversal is not None else ''})"
        )


@dataclass(frozen=True, slots=True)
class SettlementResult:
    rc: str | None
    balanced: bool
    sent: SettlementTotals  #: what the terminal claimed
    host: SettlementTotals | None  #: the 0510's field 48 (with the host's verdicts)
    uploaded: int  #: transaction details sent in 0320s
    closed_batch: str
    new_batch: str
    exchanges: tuple[TxnResult, ...] = ()


@dataclass(slots=True)
class _Pending:
    wake: anyio.Event = field(default_factory=anyio.Event)
    frame: Frame | None = field(default=None, repr=False)
    message: Message | None = None
    lost: bool = False


@dataclass(slots=True)
class _BatchEntry:
    result: TxnResult
    debit: bool
    reversed: bool = False


@dataclass(frozen=True, slots=True)
class _Answer:
    message: Message
    body: bytes = field(repr=False)
    processing_requirement: int | None


class TerminalSimulator:
    def __init__(
        self,
        host: str,
        port: int,
        terminal_id: str,
        merchant_id: str,
        tmk: bytes,
        *,
        cards: Iterable[Card] = (),
        pins: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        key_mode: str = "004",
        mac_algorithm: str = "cup-ecb",
        batch: str = "000001",
        operator: str = "01",
        nii: str = "0001",
        header: str = "603100310000",
        max_frame: int = 8192,
        auto_reverse: bool = True,
        ssl_context: ssl.SSLContext | None = None,
        tls_hostname: str | None = None,
    ) -> None:
        """With `ssl_context` (e.g. `gateway.net.tls.client_context(...)`) the terminal speaks TLS; the
        gateway's certificate must name `tls_hostname` (default: `host`)."""
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.tls_hostname = tls_hostname
        self.ident = TerminalIdent(terminal_id, merchant_id)
        self._tmk = bytes(tmk)
        self.cards = {c.pan: c for c in cards}
        self._pins = dict(pins or {})
        self.timeout = timeout
        self.key_mode = key_mode
        self.mac_algorithm = mac_algorithm
        self.batch = batch
        self.operator = operator
        envelope = CupEnvelope.from_hex(f"60{nii}0000", header)
        self.auto_reverse = auto_reverse
        self.dialect = load_dialect(DIALECT)
        self.codec = Codec(self.dialect)
        #: TPDU 60 + destination NII + source 0000, and the 6-byte header (processing requirement 0)
        self.framer = make_framer("cup", max_frame, envelope=envelope)
        self.stans = StanAllocator()
        self._keys: dict[KeyUsage, bytes] = {}
        self._stream: anyio.abc.ByteStream | None = None
        self._decoder: FrameDecoder = self.framer.decoder()
        self._send_lock = anyio.Lock()
        self._reading = False
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._batch: list[_BatchEntry] = []
        #: reversals that got no valid answer yet; sent again before the next financial request
        self.pending_reversals: list[TxnResult] = []
        #: answers that arrived after their request had timed out
        self.late_answers: list[Message] = []
        self.last_processing_requirement: int | None = None

    def __repr__(self) -> str:
        return (
            f"TerminalSimulator({self.ident.terminal_id} -> {self.host}:{self.port}, batch={self.batch}, "
            f"signed_in={self.signed_in})"
        )

    # --- connection --------------------------------------------------------------------------------

    @property
    def signed_in(self) -> bool:
        return KeyUsage.MAK in self._keys

    @property
    def connected(self) -> bool:
        return self._stream is not None

    async def connect(self) -> None:
        """Open the TCP connection (closing any previous one). Keys and batch survive a reconnect."""
        await self.aclose()
        try:
            with anyio.fail_after(self.timeout):
                stream: anyio.abc.ByteStream = await anyio.connect_tcp(self.host, self.port)
                if self.ssl_context is not None:
                    try:
                        stream = await handshake(stream, self.ssl_context, server_side=False,
                                                 hostname=self.tls_hostname or self.host)
                    except BaseException:
                        await anyio.aclose_forcefully(stream)
                        raise
                self._stream = stream
        except (OSError, TimeoutError) as exc:  # TlsHandshakeError is an OSError
            raise TerminalConnectionError(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        self._decoder = self.framer.decoder()

    async def aclose(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await anyio.aclose_forcefully(stream)
        self._fail_pending()

    async def __aenter__(self) -> TerminalSimulator:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- management --------------------------------------------------------------------------------

    async def sign_in(self, key_mode: str | None = None) -> TxnResult:
        """0800 sign-in. On 00: install the working keys of field 62 (all check values verified) and
        adopt the host's batch from 60.2. Raises SignInError when refused or the key block fails."""
        mode = key_mode or self.key_mode
        stan = self._stan()
        request = cup.sign_in(self.ident, stan, self.batch, mode, self.operator)
        result = await self._run("sign_in", request)
        if result.rc != "00":
            raise SignInError(f"sign-in answered {result.rc or 'nothing (timeout)'}")
        block = result.fields.get("62")
        if not block:
            raise SignInError("sign-in approved without a key block in field 62")
        try:
            keys = parse_key_block(self._tmk, bytes.fromhex(block), mode)
        except (SecurityError, ValueError) as exc:
            raise SignInError(f"key block rejected: {exc}") from None
        self._keys = keys
        self.key_mode = mode
        host_batch = result.fields.get("60", "")[2:8]
        if len(host_batch) == 6 and host_batch.isdigit():
            self.batch = host_batch
        log.info("terminal %s signed in (mode %s, batch %s)", self.ident.terminal_id, mode, self.batch)
        return replace(result, batch=self.batch)

    async def sign_off(self) -> TxnResult:
        result = await self._run("sign_off", cup.sign_off(self.ident, self._stan(), self.batch))
        self._keys = {}
        return result

    async def echo(self) -> TxnResult:
        return await self._run("echo", cup.echo(self.ident, self.batch))

    # --- financial ---------------------------------------------------------------------------------

    async def purchase(
        self, amount: int, card: Card | str, pin: str | None = None, entry: Entry = "swipe"
    ) -> TxnResult:
        the_card = self._card(card)
        await self._flush_reversals()
        request = cup.purchase(
            self.ident, self._stan(), self.batch, amount, **self._card_input(the_card, pin, entry)
        )
        result = await self._financial("purchase", request, the_card, entry, reversible=True)
        self._journal(result, debit=True)
        return result

    async def void(self, original: TxnResult, pin: str | None = None) -> TxnResult:
        """Cancel an approved purchase of the current batch (same card, same amount)."""
        if original.card is None or original.rrn is None or original.amount is None:
            raise TerminalError("only an answered purchase of this terminal can be voided")
        await self._flush_reversals()
        request = cup.void(
            self.ident,
            self._stan(),
            self.batch,
            original.amount,
            orig_rrn=original.rrn,
            orig_batch=original.batch,
            orig_trace=original.stan,
            orig_auth=original.auth_code,
            **self._card_input(original.card, pin, original.entry),
        )
        result = await self._financial("void", request, original.card, original.entry, reversible=True)
        self._journal(result, debit=False)
        return result

    async def refund(
        self,
        amount: int,
        card: Card | str,
        *,
        original: TxnResult | None = None,
        orig_rrn: str | None = None,
        orig_date: str | None = None,
        orig_batch: str = "000000",
        orig_trace: str = "000000",
        pin: str | None = None,
        entry: Entry = "swipe",
    ) -> TxnResult:
        """0220 refund with the original's RRN, batch, trace and date (from `original` or given)."""
        the_card = self._card(card)
        if original is not None:
            orig_rrn = orig_rrn or original.rrn
            orig_date = orig_date or original.date
            orig_batch, orig_trace = original.batch, original.stan
        if orig_rrn is None:
            raise TerminalError("a refund needs the original's RRN")
        await self._flush_reversals()
        request = cup.refund(
            self.ident,
            self._stan(),
            self.batch,
            amount,
            orig_rrn=orig_rrn,
            orig_date=orig_date or datetime.now().strftime("%m%d"),
            orig_batch=orig_batch,
            orig_trace=orig_trace,
            card_org="CUP" if the_card.domestic else "000",
            **self._card_input(the_card, pin, entry),
        )
        result = await self._financial("refund", request, the_card, entry, reversible=False)
        self._journal(result, debit=False)
        return result

    async def balance(self, card: Card | str, pin: str | None = None, entry: Entry = "swipe") -> TxnResult:
        the_card = self._card(card)
        await self._flush_reversals()
        card_input = self._card_input(the_card, pin, entry)
        request = cup.balance_inquiry(self.ident, self._stan(), self.batch, **card_input)
        result = await self._financial("balance", request, the_card, entry, reversible=False)
        return replace(result, balance=_balance_of(result.fields.get("54")))

    async def reversal(self, original: TxnResult, reason: str = REASON_TERMINAL_FAULT) -> TxnResult:
        """0400 for a purchase or void (same STAN and 60 as the original). On 00 the original leaves
        the batch totals; without a valid answer the reversal is kept and retried later."""
        request = cup.reversal(original.request, reason, auth_code=original.auth_code)
        result = await self._run("reversal", request, mac=True, card=original.card, entry=original.entry)
        if result.rc in ("00", "12", "25") and not result.problems and result.mac_ok is not False:
            # 00 reversed; 12/25: the host has nothing to reverse. Either way the terminal is done.
            self._drop_from_batch(original)
        else:
            self.pending_reversals.append(result)
        return result

    # --- settlement --------------------------------------------------------------------------------

    def totals(self) -> SettlementTotals:
        """The batch totals from the terminal's own approved, unreversed transactions."""
        domestic, foreign = CardTotals(), CardTotals()
        for entry in self._batch:
            if entry.reversed or entry.result.amount is None:
                continue
            amount = entry.result.amount
            is_domestic = _is_domestic(entry.result)
            group = domestic if is_domestic else foreign
            group = group.add_debit(amount) if entry.debit else group.add_credit(amount)
            if is_domestic:
                domestic = group
            else:
                foreign = group
        return SettlementTotals(domestic, foreign)

    async def settle(self) -> SettlementResult:
        """0500 with the terminal's totals; then the batch upload (all details when the host says the
        totals do not balance, none when they do) and its closing 0320; then the next batch."""
        await self._flush_reversals()
        totals = self.totals()
        closed = self.batch
        exchanges: list[TxnResult] = []
        request = cup.settlement(self.ident, self._stan(), closed, totals, self.operator)
        result = await self._run("settlement", request)
        exchanges.append(result)
        host_totals: SettlementTotals | None = None
        if result.rc == "00" and "48" in result.fields:
            try:
                host_totals = SettlementTotals.from_field48(result.fields["48"])
            except IsoError:
                host_totals = None
        if result.rc != "00" or result.problems:
            return SettlementResult(
                result.rc, False, totals, host_totals, 0, closed, self.batch, tuple(exchanges)
            )
        balanced = host_totals is not None and host_totals.balanced
        items = [] if balanced else self._batch_items()
        for i in range(0, len(items), MAX_BATCH_ITEMS):
            chunk = items[i : i + MAX_BATCH_ITEMS]
            upload_request = cup.batch_upload(self.ident, self._stan(), closed, chunk)
            upload = await self._run("batch_upload", upload_request)
            exchanges.append(upload)
        end = await self._run(
            "batch_upload_end", cup.batch_upload_end(self.ident, self._stan(), closed, len(items), balanced)
        )
        exchanges.append(end)
        self._batch.clear()
        self.batch = f"{int(closed) % 999999 + 1:06d}"
        return SettlementResult(result.rc, balanced, totals, host_totals, len(items), closed, self.batch,
                                tuple(exchanges))

    def _batch_items(self) -> list[BatchItem]:
        items = []
        for entry in self._batch:
            r = entry.result
            if entry.reversed or r.card is None or r.amount is None:
                continue
            org = CARD_ORG_DOMESTIC if _is_domestic(r) else CARD_ORG_FOREIGN
            items.append(BatchItem(org, r.stan, r.card.pan, r.amount))
        return items

    # --- building blocks ---------------------------------------------------------------------------

    def _stan(self) -> str:
        return self.stans.format(self.stans.next())

    def _card(self, card: Card | str) -> Card:
        if isinstance(card, Card):
            return card
        return self.cards.get(card) or Card(card, pin=self._pins.get(card))

    def _card_input(self, card: Card, pin: str | None, entry: Entry) -> dict[str, Any]:
        """Card fields for the builders: track 2 (TDK-encrypted in key mode 004) or keyed PAN, and the
        PIN block under the PIK when a PIN is entered."""
        self._require_keys()
        the_pin = pin if pin is not None else (card.pin or self._pins.get(card.pan))
        with_pin = bool(the_pin)
        data: dict[str, Any] = {}
        track_encrypted = False
        if entry == "manual":
            data["pan"] = card.pan
            data["expiry"] = card.expiry
            data["entry_mode"] = "011" if with_pin else "012"
        else:
            tdk = self._keys.get(KeyUsage.TDK)
            track = card.track2
            if tdk is not None:
                track = encrypt_track(tdk, track)
                track_encrypted = True
            data["track2"] = track
            data["entry_mode"] = "021" if with_pin else "022"
        if with_pin:
            assert the_pin
            data["pin_block"] = encrypt_pin_block(self._keys[KeyUsage.PIK], the_pin, card.pan).hex().upper()
        if with_pin or track_encrypted:
            data["security_control"] = security_control(track_encrypted=track_encrypted)
        return data

    def _require_keys(self) -> None:
        if not self.signed_in:
            raise NotSignedIn(f"terminal {self.ident.terminal_id} has not signed in")

    async def _financial(
        self, kind: TxnKind, request: Message, card: Card, entry: Entry, *, reversible: bool
    ) -> TxnResult:
        result = await self._run(kind, request, mac=True, card=card, entry=entry)
        if not reversible or not self.auto_reverse:
            return result
        reason = None
        if result.timed_out:
            reason = REASON_TIMEOUT
        elif result.rc == "00" and result.mac_ok is False:
            reason = REASON_MAC_FAILURE
        elif result.problems:
            reason = REASON_OTHER
        if reason is None:
            return result
        log.info("terminal %s reverses %s stan %s (reason %s)", self.ident.terminal_id, kind, result.stan,
                 reason)
        reversal = await self.reversal(result, reason)
        return replace(result, reversal=reversal)

    async def _flush_reversals(self) -> None:
        """Resend reversals that got no valid answer (LY sends the pending 0400 before the next
        online transaction). One attempt each per call; the ones still unanswered stay queued."""
        queued, self.pending_reversals = self.pending_reversals, []
        for previous in queued:
            result = await self._run("reversal", previous.request, mac=True, card=previous.card)
            if result.rc in ("00", "12", "25") and not result.problems and result.mac_ok is not False:
                for entry in self._batch:
                    if entry.result.stan == previous.stan and match_class(entry.result.request.mti) == "020":
                        entry.reversed = True
            else:
                self.pending_reversals.append(previous)

    def _journal(self, result: TxnResult, *, debit: bool) -> None:
        if result.approved:
            self._batch.append(_BatchEntry(result, debit))

    def _drop_from_batch(self, original: TxnResult) -> None:
        for entry in self._batch:
            if entry.result.stan == original.stan and entry.result.batch == original.batch:
                entry.reversed = True

    async def _run(
        self,
        kind: TxnKind,
        request: Message,
        *,
        mac: bool = False,
        card: Card | None = None,
        entry: Entry = "swipe",
    ) -> TxnResult:
        """Send one request (MAC'd when `mac`; `mac=False` with a request that already carries its
        MAC resends it as is) and check its answer."""
        body = self.codec.encode(request)
        if mac:
            mak = self._keys.get(KeyUsage.MAK)
            if mak is None:
                raise NotSignedIn(f"terminal {self.ident.terminal_id} has no MAK")
            mab = body[:-8]
            value = terminal_mac(mak, mab, self.mac_algorithm)
            body = mab + value
            request = Message(request.mti, {**request.fields, "64": value.hex().upper()})  # 8 bytes
        stan = request.fields.get("11", "")
        amount_text = request.fields.get("4")
        base = TxnResult(
            kind=kind,
            rc=None,
            stan=stan,
            request=request,
            amount=int(amount_text) if amount_text else None,
            batch=self.batch,
            date=datetime.now().strftime("%m%d"),
            card=card,
            entry=entry,
        )
        answer = await self._exchange(request, body)
        if answer is None:
            return replace(base, timed_out=True)
        response = answer.message
        self.last_processing_requirement = answer.processing_requirement
        problems = tuple(f"{e.field}: {e.reason}" for e in echo_mismatches(DIALECT, request, response))
        rc = response.fields.get("39")
        mac_ok: bool | None = None
        if mac and rc == "00":
            mac_ok = self._response_mac_ok(answer)
        return replace(
            base,
            rc=rc,
            response=response,
            rrn=response.fields.get("37"),
            auth_code=(response.fields.get("38") or "").strip() or None,
            date=response.fields.get("13") or base.date,
            mac_ok=mac_ok,
            problems=problems,
            processing_requirement=answer.processing_requirement,
        )

    def _response_mac_ok(self, answer: _Answer) -> bool:
        mak = self._keys.get(KeyUsage.MAK)
        if "64" not in answer.message.fields or mak is None:
            return False
        try:
            expected = terminal_mac(mak, answer.body[:-8], self.mac_algorithm)
        except SecurityError:
            return False
        # field 64 is 8 bytes on the wire, normally ASCII hex characters (either case)
        return macs_equal(expected, answer.body[-8:].upper())

    # --- wire: send, and read as the leader while waiting ------------------------------------------

    async def _exchange(self, request: Message, body: bytes) -> _Answer | None:
        """Send and wait for the matching answer; None when none comes within the timeout."""
        stream = self._stream
        if stream is None:
            raise TerminalConnectionError("not connected")
        key = (match_class(request.mti), request.fields.get("11", ""))
        if key in self._pending:
            raise TerminalError(f"a {request.mti} with STAN {key[1]} is already in flight")
        slot = _Pending()
        self._pending[key] = slot
        try:
            with anyio.fail_after(self.timeout):
                frame = self.framer.encode(body)
                try:
                    async with self._send_lock:
                        await stream.send(frame)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                    raise TerminalConnectionError(f"send failed: {type(exc).__name__}") from None
                await self._wait(slot)
        except TimeoutError:
            return None
        finally:
            self._pending.pop(key, None)
        if slot.lost or slot.message is None or slot.frame is None:
            raise TerminalConnectionError("connection lost while waiting for the answer")
        expected = response_mti(request.mti)
        if slot.message.mti != expected:
            log.warning("terminal %s: answer %s to a %s", self.ident.terminal_id, slot.message.mti,
                        request.mti)
        envelope = slot.frame.envelope
        requirement = envelope.processing_requirement if envelope is not None else None
        return _Answer(slot.message, slot.frame.body, requirement)

    async def _wait(self, slot: _Pending) -> None:
        while slot.message is None and not slot.lost:
            if not self._reading:
                await self._lead(slot)
            else:
                await slot.wake.wait()
                slot.wake = anyio.Event()

    async def _lead(self, slot: _Pending) -> None:
        """Read frames for everyone until this slot's answer is in; then let a waiter take over."""
        self._reading = True
        try:
            while slot.message is None and not slot.lost:
                stream = self._stream
                if stream is None:
                    self._fail_pending()
                    return
                try:
                    chunk = await stream.receive()
                    frames = self._decoder.feed(chunk)
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    await self._lose_connection("host closed the connection")
                    return
                except IsoError as exc:
                    await self._lose_connection(f"bad frame from the host ({exc})")
                    return
                for frame in frames:
                    self._dispatch(frame)
        finally:
            self._reading = False
            for other in self._pending.values():
                other.wake.set()  # someone else must read now

    def _dispatch(self, frame: Frame) -> None:
        try:
            message = self.codec.decode(frame.body)
        except IsoError as exc:
            log.warning("terminal %s: undecodable answer (%s)", self.ident.terminal_id, exc)
            return
        key = (match_class(message.mti), message.fields.get("11", ""))
        slot = self._pending.get(key)
        if slot is None or slot.message is not None:
            self.late_answers.append(message)
            log.info("terminal %s: unmatched answer %s stan=%s rc=%s", self.ident.terminal_id, message.mti,
                     message.fields.get("11"), message.fields.get("39"))
            return
        slot.frame = frame
        slot.message = message
        slot.wake.set()

    async def _lose_connection(self, why: str) -> None:
        log.info("terminal %s: %s", self.ident.terminal_id, why)
        stream, self._stream = self._stream, None
        if stream is not None:
            await anyio.aclose_forcefully(stream)
        self._fail_pending()

    def _fail_pending(self) -> None:
        for slot in self._pending.values():
            slot.lost = True
            slot.wake.set()


def _is_domestic(result: TxnResult) -> bool:
    """内卡 when the host says CUP in 63.1, or, without 63, when the card has a CUP BIN."""
    org = (result.fields.get("63") or "")[:3].strip()
    if org:
        return org == "CUP"
    return result.card is None or result.card.domestic


def _balance_of(field_54: str | None) -> int | None:
    """The available balance (amount type 02) of field 54, else its first amount."""
    if not field_54 or len(field_54) % 20:
        return None
    found: int | None = None
    for i in range(0, len(field_54), 20):
        entry = field_54[i : i + 20]
        amount = entry[8:20]
        if not amount.isdigit():
            return None
        value = int(amount) * (-1 if entry[7] == "D" else 1)
        if entry[2:4] == "02":
            return value
        if found is None:
            found = value
    return found
