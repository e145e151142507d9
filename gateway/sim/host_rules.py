"""The host simulator's brain, without sockets: card ranges, balances, approve/decline rules, the
ledger of approved and reversed transactions, and the scripted fault plan.

Everything here is synchronous and deterministic for a given seed, so each decision code can be unit
tested without a network. `gateway.sim.host` feeds it decoded requests (plus the clear PIN it
recovered with the zone PIN key) and turns its `Decision` into a response on the wire.

Matching of reversals and voids follows ISO 8583:1987 practice: field 90 carries the original MTI,
STAN, transmission date-time and acquirer id, which together name one original (`TxnKey`). Requests
without field 90 (a CUP-dialect host) fall back to terminal id + STAN.
"""

from __future__ import annotations

import random
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple

from gateway.iso.message import Message, mask_pan

RC_APPROVED: Final = "00"
RC_INVALID_TXN: Final = "12"  #: related transaction not in a state that allows this
RC_INVALID_AMOUNT: Final = "13"
RC_UNKNOWN_CARD: Final = "14"
RC_ORIGINAL_NOT_FOUND: Final = "25"
RC_NOT_SUPPORTED: Final = "40"
RC_INSUFFICIENT_FUNDS: Final = "51"
RC_WRONG_PIN: Final = "55"
RC_LIMIT_EXCEEDED: Final = "61"
RC_AMOUNT_MISMATCH: Final = "64"
RC_DUPLICATE: Final = "94"
RC_SYSTEM_ERROR: Final = "96"
RC_PIN_FORMAT: Final = "99"

TxnKind = Literal["purchase", "refund", "void", "balance"]

#: processing-code transaction type (first two digits of field 3) → what the simulator does with it
PROCESSING_KINDS: Final[Mapping[str, TxnKind]] = {
    "00": "purchase",
    "20": "refund",
    "02": "void",
    "31": "balance",
}

FaultKind = Literal[
    "delay", "late", "booked_late", "drop", "disconnect", "garbage", "wrong_mac", "reject_reversal", "close_after",
    "approve_as",
]
FAULT_KINDS: Final = frozenset(
    {"delay", "late", "booked_late", "drop", "disconnect", "garbage", "wrong_mac", "reject_reversal",
     "close_after", "approve_as"}
)


class SimConfigError(Exception):
    """A simulator configuration value that is missing, of the wrong type or out of range."""


# --- keys and PANs ---------------------------------------------------------------------------------


class TxnKey(NamedTuple):
    """Names one original transaction the way field 90 does (ISO 8583:1987)."""

    mti: str
    stan: str
    transmitted: str  #: field 7, MMDDhhmmss
    acquirer: str  #: field 32, right-justified and zero-filled to 11 digits

    def __str__(self) -> str:
        return f"{self.mti}{self.stan}{self.transmitted}{self.acquirer}"

    @classmethod
    def of_request(cls, msg: Message) -> TxnKey:
        fields = msg.fields
        return cls(msg.mti, fields.get("11", ""), fields.get("7", ""), _acquirer(fields.get("32")))

    @classmethod
    def from_field_90(cls, value: str) -> TxnKey:
        """Original MTI n4 · STAN n6 · transmission date-time n10 · acquirer id n11 (· forwarder n11)."""
        if len(value) < 31 or not value[:31].isdigit():
            raise ValueError("field 90 must start with 31 digits (MTI, STAN, date-time, acquirer)")
        return cls(value[0:4], value[4:10], value[10:20], value[20:31])


def _acquirer(value: str | None) -> str:
    return (value or "").zfill(11)


def pan_of(msg: Message) -> str | None:
    """The PAN from field 2, else from track 2 (field 35, separator '=' or 'D')."""
    pan = msg.fields.get("2")
    if pan:
        return pan
    track = msg.fields.get("35")
    if not track:
        return None
    for sep in ("=", "D", "d"):
        if sep in track:
            head = track.split(sep, 1)[0]
            return head if head.isdigit() else None
    return None


# --- configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Account:
    """An issuer account and the card ranges (PAN prefixes) that draw on it."""

    id: str
    balance: int
    prefixes: tuple[str, ...]
    pin: str | None = None  #: PIN of every card in these ranges unless `pins` names the PAN
    limit: int | None = None  #: single-purchase limit; None: the global limit
    rc: str | None = None  #: force this decline for every card of the account (e.g. "41" lost card)


@dataclass(frozen=True, slots=True)
class Fault:
    """One scripted misbehaviour.

    Selectors (all that are set must match): `pan` (the request's PAN), `mti` (request MTIs),
    `nth` (only the n-th message that passes the other selectors, 1-based), `every` (each n-th),
    `rate` (probability, drawn from the plan's seeded RNG). `limit` caps how often it fires.

    Kinds: `delay`/`late` answer after `seconds` (late: longer than the gateway waits); `booked_late`
    decides the request only after `seconds`, then answers (a reversal arriving meanwhile finds no
    original and gets 25, and the original is booked afterwards: a slow issuer path; if the connection
    goes down first, it is never booked); `drop` never
    answers; `disconnect` closes the connection instead of answering; `garbage` sends a valid length
    prefix with a random body (`garbage="body"`) or an invalid length prefix (`garbage="length"`);
    `wrong_mac` corrupts the response MAC; `reject_reversal` answers 96 to the first `count` reversal
    attempts for a transaction; `close_after` closes a connection once it has carried `count` requests;
    `approve_as` books an approval as usual but answers it with `code` instead of 00 (e.g. 11 VIP
    approval, 10 partial approval, A2 "defective success": codes after which the customer is charged).
    With `process=False` the request is lost before the host acts on it (no ledger change).
    """

    kind: FaultKind
    seconds: float = 0.0
    count: int = 1
    pan: str | None = None
    mti: tuple[str, ...] = ()
    rate: float | None = None
    nth: int | None = None
    every: int | None = None
    limit: int | None = None
    garbage: Literal["body", "length"] = "body"
    process: bool = True
    code: str = "00"  #: `approve_as`: the response code of the approval

    def __repr__(self) -> str:  # the PAN selector is card data: mask it like everywhere else
        pan = mask_pan(self.pan) if self.pan else None
        return f"Fault({self.kind}, seconds={self.seconds}, count={self.count}, pan={pan}, mti={self.mti})"


DEFAULT_LIMIT: Final = 9_999_999

#: opening balance of the default accounts: 1,000,000,000.00, a billion purchases of the load tool's 1.00
#: (the old 10,000.00 ran dry after 10,000 and answered 51 from then on), and still inside field 54's
#: 12 digits. A configuration that wants declines for lack of funds gives an account a small balance.
DEFAULT_BALANCE: Final = 100_000_000_000

DEFAULT_ACCOUNTS: Final[tuple[Account, ...]] = (
    Account("cup-debit", DEFAULT_BALANCE, ("622202", "621700"), pin="123456"),
    Account("visa-credit", DEFAULT_BALANCE, ("4",), pin="1234"),
)


@dataclass(frozen=True, slots=True)
class HostRulesConfig:
    accounts: tuple[Account, ...] = DEFAULT_ACCOUNTS
    pins: Mapping[str, str] = field(default_factory=dict)  #: PAN → PIN, overrides the account's PIN
    limit: int = DEFAULT_LIMIT  #: single-purchase limit in minor units: above it → 61
    unknown_original_rc: str = RC_ORIGINAL_NOT_FOUND
    declined_original_rc: str = RC_APPROVED  #: reversal of a declined original: nothing to undo
    seed: int = 0
    faults: tuple[Fault, ...] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HostRulesConfig:
        known = {"accounts", "pins", "limit", "unknown_original_rc", "declined_original_rc", "seed", "faults"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SimConfigError(f"unknown key(s): {', '.join(unknown)}")
        accounts = DEFAULT_ACCOUNTS
        if "accounts" in data:
            raw = data["accounts"]
            if not isinstance(raw, list):
                raise SimConfigError("accounts: expected an array of tables")
            accounts = tuple(_account(item, f"accounts[{i}]") for i, item in enumerate(raw))
        pins_raw = data.get("pins", {})
        if not isinstance(pins_raw, Mapping):
            raise SimConfigError("pins: expected a table of PAN = PIN")
        pins = {str(pan): _pin(pin, f"pins.{mask_pan(str(pan))}") for pan, pin in pins_raw.items()}
        faults_raw = data.get("faults", [])
        if not isinstance(faults_raw, list):
            raise SimConfigError("faults: expected an array of tables")
        return cls(
            accounts=accounts,
            pins=pins,
            limit=_int(data, "limit", "", DEFAULT_LIMIT),
            unknown_original_rc=_rc(data, "unknown_original_rc", RC_ORIGINAL_NOT_FOUND),
            declined_original_rc=_rc(data, "declined_original_rc", RC_APPROVED),
            seed=_int(data, "seed", "", 0),
            faults=tuple(fault_from_dict(item, f"faults[{i}]") for i, item in enumerate(faults_raw)),
        )

    @classmethod
    def from_toml(cls, path: str | Path) -> HostRulesConfig:
        return cls.from_dict(read_toml(path))


def read_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise SimConfigError(f"{path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SimConfigError(f"{path}: {exc}") from None


def _int(data: Mapping[str, Any], key: str, path: str, default: int) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SimConfigError(f"{path}{key}: expected a non-negative integer")
    return value


def _rc(data: Mapping[str, Any], key: str, default: str) -> str:
    value = data.get(key, default)
    if not isinstance(value, str) or len(value) != 2:
        raise SimConfigError(f"{key}: expected a 2-character response code")
    return value


def _pin(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.isdigit() or not 4 <= len(value) <= 12:
        raise SimConfigError(f"{where}: expected a PIN of 4 to 12 digits")
    return value


def _account(item: object, where: str) -> Account:
    if not isinstance(item, Mapping):
        raise SimConfigError(f"{where}: expected a table")
    known = {"id", "balance", "prefixes", "prefix", "pin", "limit", "rc"}
    unknown = sorted(set(item) - known)
    if unknown:
        raise SimConfigError(f"{where}: unknown key(s): {', '.join(unknown)}")
    account_id = item.get("id")
    if not isinstance(account_id, str) or not account_id:
        raise SimConfigError(f"{where}.id: expected a non-empty string")
    prefixes = item.get("prefixes", [item["prefix"]] if "prefix" in item else None)
    if not isinstance(prefixes, list) or not prefixes or not all(
        isinstance(p, str) and p.isdigit() for p in prefixes
    ):
        raise SimConfigError(f"{where}.prefixes: expected a non-empty list of digit strings")
    limit = item.get("limit")
    if limit is not None:
        limit = _int(item, "limit", f"{where}.", 0)
    rc = item.get("rc")
    if rc is not None and (not isinstance(rc, str) or len(rc) != 2):
        raise SimConfigError(f"{where}.rc: expected a 2-character response code")
    pin = item.get("pin")
    return Account(
        id=account_id,
        balance=_int(item, "balance", f"{where}.", 0),
        prefixes=tuple(prefixes),
        pin=_pin(pin, f"{where}.pin") if pin is not None else None,
        limit=limit,
        rc=rc,
    )


def fault_from_dict(item: object, where: str = "fault") -> Fault:
    """A `Fault` from a TOML table / dict, with every value checked."""
    if not isinstance(item, Mapping):
        raise SimConfigError(f"{where}: expected a table")
    known = {"kind", "seconds", "count", "pan", "mti", "rate", "nth", "every", "limit", "garbage", "process",
             "code"}
    unknown = sorted(set(item) - known)
    if unknown:
        raise SimConfigError(f"{where}: unknown key(s): {', '.join(unknown)}")
    kind = item.get("kind")
    if kind not in FAULT_KINDS:
        raise SimConfigError(f"{where}.kind: expected one of {', '.join(sorted(FAULT_KINDS))}")
    seconds = item.get("seconds", 0.0)
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
        raise SimConfigError(f"{where}.seconds: expected a non-negative number")
    rate = item.get("rate")
    if rate is not None and (
        isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1
    ):
        raise SimConfigError(f"{where}.rate: expected a probability between 0 and 1")
    mti = item.get("mti", [])
    if isinstance(mti, str):
        mti = [mti]
    if not isinstance(mti, list) or not all(isinstance(m, str) and len(m) == 4 and m.isdigit() for m in mti):
        raise SimConfigError(f"{where}.mti: expected an MTI or a list of MTIs")
    pan = item.get("pan")
    if pan is not None and (not isinstance(pan, str) or not pan.isdigit()):
        raise SimConfigError(f"{where}.pan: expected a digit string")
    garbage = item.get("garbage", "body")
    if garbage not in ("body", "length"):
        raise SimConfigError(f"{where}.garbage: expected 'body' or 'length'")
    process = item.get("process", True)
    if not isinstance(process, bool):
        raise SimConfigError(f"{where}.process: expected true or false")
    code = item.get("code", "00")
    if not isinstance(code, str) or len(code) != 2:
        raise SimConfigError(f"{where}.code: expected a 2-character response code")
    optional: dict[str, int | None] = {}
    for key in ("nth", "every", "limit"):
        optional[key] = _int(item, key, f"{where}.", 0) if key in item else None
    count = _int(item, "count", f"{where}.", 1)
    if optional["nth"] == 0 or optional["every"] == 0:
        raise SimConfigError(f"{where}: nth/every count from 1")
    return Fault(
        kind=kind,
        seconds=float(seconds),
        count=count,
        pan=pan,
        mti=tuple(mti),
        rate=None if rate is None else float(rate),
        nth=optional["nth"],
        every=optional["every"],
        limit=optional["limit"],
        garbage=garbage,
        process=process,
        code=code,
    )


# --- the fault plan --------------------------------------------------------------------------------


@dataclass(slots=True)
class _FaultState:
    fault: Fault
    seen: int = 0  #: messages that passed the fault's selectors
    fired: int = 0


class FaultPlan:
    """The active faults and their counters. Replaceable at run time: tests script faults between
    steps with `set`, `add` and `clear`. Rate draws come from one seeded RNG, so a run is repeatable
    when the message order is."""

    def __init__(self, faults: Iterable[Fault] = (), seed: int = 0) -> None:
        self._rng = random.Random(seed)
        self._states = [_FaultState(f) for f in faults]

    def set(self, faults: Iterable[Fault]) -> None:
        self._states = [_FaultState(f) for f in faults]

    def add(self, fault: Fault) -> None:
        self._states.append(_FaultState(fault))

    def clear(self) -> None:
        self._states = []

    @property
    def faults(self) -> tuple[Fault, ...]:
        return tuple(s.fault for s in self._states)

    def fired(self, kind: str) -> int:
        """How many times faults of this kind fired (tests assert the fault was really exercised)."""
        return sum(s.fired for s in self._states if s.fault.kind == kind)

    def close_after(self) -> int | None:
        """The smallest per-connection message budget among `close_after` faults, if any."""
        budgets = [s.fault.count for s in self._states if s.fault.kind == "close_after"]
        return min(budgets) if budgets else None

    def note_close(self) -> None:
        for state in self._states:
            if state.fault.kind == "close_after":
                state.fired += 1

    def select(self, mti: str, pan: str | None) -> list[Fault]:
        """The faults that fire for this request (advancing their counters)."""
        chosen = []
        for state in self._states:
            fault = state.fault
            if fault.kind == "close_after":
                continue  # connection-level, see close_after()
            if fault.kind == "reject_reversal" and mti[1] != "4":
                continue  # only reversals can be rejected
            if fault.mti and mti not in fault.mti:
                continue
            if fault.pan is not None and fault.pan != pan:
                continue
            state.seen += 1
            if fault.nth is not None and state.seen != fault.nth:
                continue
            if fault.every is not None and state.seen % fault.every:
                continue
            if fault.limit is not None and state.fired >= fault.limit:
                continue
            if fault.rate is not None and self._rng.random() >= fault.rate:
                continue
            state.fired += 1
            chosen.append(fault)
        return chosen


# --- the ledger ------------------------------------------------------------------------------------


@dataclass(slots=True)
class LedgerEntry:
    key: TxnKey
    kind: TxnKind
    masked_pan: str
    account: str | None
    amount: int
    delta: int  #: what the transaction did to the account balance (negative: debit)
    rc: str
    rrn: str
    auth_code: str | None
    terminal_id: str
    stan: str
    original: TxnKey | None = None  #: for a void: the purchase it cancels
    voided: bool = False
    reversed: bool = False

    @property
    def approved(self) -> bool:
        return self.rc == RC_APPROVED


@dataclass(frozen=True, slots=True)
class Decision:
    rc: str
    rrn: str
    auth_code: str | None = None  #: only on approvals
    balance: int | None = None  #: balance inquiries (field 54)
    entry: LedgerEntry | None = None  #: the ledger entry this request created or touched


class PinInput(NamedTuple):
    """What the host recovered from field 52: `present` False when no PIN block was sent; `pin` None
    when a block was sent but could not be decrypted (no zone PIN key, bad format)."""

    present: bool
    pin: str | None = None


NO_PIN: Final = PinInput(False)


class HostRules:
    def __init__(self, config: HostRulesConfig | None = None) -> None:
        self.config = config or HostRulesConfig()
        self._rng = random.Random(self.config.seed)
        self._rrn_prefix = f"{self._rng.randrange(100_000):05d}"
        self._rrn_seq = 0
        self.balances: dict[str, int] = {a.id: a.balance for a in self.config.accounts}
        # longest prefix first, so a specific range wins over a broad one
        self._ranges = sorted(
            ((p, a) for a in self.config.accounts for p in a.prefixes), key=lambda pa: -len(pa[0])
        )
        self.ledger: dict[TxnKey, LedgerEntry] = {}
        self._by_rrn: dict[str, TxnKey] = {}
        self._by_terminal_stan: dict[tuple[str, str], TxnKey] = {}
        self._reversal_attempts: dict[TxnKey, int] = {}

    # --- queries for tests -------------------------------------------------------------------------

    def account_for(self, pan: str) -> Account | None:
        for prefix, account in self._ranges:
            if pan.startswith(prefix):
                return account
        return None

    def balance(self, account_or_pan: str) -> int:
        if account_or_pan in self.balances:
            return self.balances[account_or_pan]
        account = self.account_for(account_or_pan)
        if account is None:
            raise KeyError(f"no account for {mask_pan(account_or_pan)}")
        return self.balances[account.id]

    def reversal_count(self, key: TxnKey | str | Message) -> int:
        """How many reversal messages (0400 and repeats 0401, rejected ones included) named `key`:
        a TxnKey, a field-90 string or the original request."""
        if isinstance(key, Message):
            key = TxnKey.of_request(key)
        elif isinstance(key, str):
            key = TxnKey.from_field_90(key)
        return self._reversal_attempts.get(key, 0)

    def approved(self) -> list[LedgerEntry]:
        return [e for e in self.ledger.values() if e.approved]

    def reversed(self) -> list[LedgerEntry]:
        return [e for e in self.ledger.values() if e.reversed]

    # --- decisions ---------------------------------------------------------------------------------

    def next_rrn(self) -> str:
        self._rrn_seq = (self._rrn_seq + 1) % 10_000_000
        return f"{self._rrn_prefix}{self._rrn_seq:07d}"

    def _auth_code(self) -> str:
        return f"{self._rng.randrange(1_000_000):06d}"

    def expected_pin(self, pan: str) -> str | None:
        if pan in self.config.pins:
            return self.config.pins[pan]
        account = self.account_for(pan)
        return account.pin if account else None

    def financial(self, request: Message, pin: PinInput = NO_PIN, kind: TxnKind | None = None) -> Decision:
        """Decide a 0200/0220 (purchase, refund, void, balance inquiry) and update the ledger.

        `kind` comes from the dialect's flow table when the caller knows it (a CUP void and refund
        share processing code 200000); otherwise the processing code decides (ISO 8583:1987)."""
        rrn = self.next_rrn()
        key = TxnKey.of_request(request)
        if key in self.ledger:
            return Decision(RC_DUPLICATE, rrn, entry=self.ledger[key])
        if kind is None:
            kind = PROCESSING_KINDS.get(request.fields.get("3", "")[:2])
        if kind is None:
            return Decision(RC_NOT_SUPPORTED, rrn)
        pan = pan_of(request)
        account = self.account_for(pan) if pan else None
        amount_text = request.fields.get("4", "")
        amount = int(amount_text) if amount_text.isdigit() else -1

        rc = self._screen(kind, pan, account, amount, pin)
        original: LedgerEntry | None = None
        if rc == RC_APPROVED and kind == "void":
            original, rc = self._void_target(request, amount)
        delta = 0
        if rc == RC_APPROVED:
            assert account is not None  # _screen approved only a known card
            if kind == "purchase":
                delta = -amount
            elif kind == "refund":
                delta = amount
            elif kind == "void" and original is not None:
                delta = original.amount
                original.voided = True
            self.balances[account.id] += delta
        entry = LedgerEntry(
            key=key,
            kind=kind,
            masked_pan=mask_pan(pan or ""),
            account=account.id if account else None,
            amount=max(amount, 0),
            delta=delta,
            rc=rc,
            rrn=rrn,
            auth_code=self._auth_code() if rc == RC_APPROVED else None,
            terminal_id=request.fields.get("41", ""),
            stan=request.fields.get("11", ""),
            original=original.key if original else None,
        )
        self._record(entry)
        balance = self.balances[account.id] if (kind == "balance" and rc == RC_APPROVED and account) else None
        return Decision(rc, rrn, entry.auth_code, balance, entry)

    def _screen(
        self, kind: TxnKind, pan: str | None, account: Account | None, amount: int, pin: PinInput
    ) -> str:
        """Card range, forced decline, PIN, amount, limit, funds: the first failing rule decides."""
        if pan is None or account is None:
            return RC_UNKNOWN_CARD
        if account.rc is not None:
            return account.rc
        if pin.present:
            if pin.pin is None:
                return RC_PIN_FORMAT
            expected = self.expected_pin(pan)
            if expected is not None and pin.pin != expected:
                return RC_WRONG_PIN
        if kind == "balance":
            return RC_APPROVED
        if amount <= 0:
            return RC_INVALID_AMOUNT
        if kind == "purchase":
            limit = account.limit if account.limit is not None else self.config.limit
            if amount > limit:
                return RC_LIMIT_EXCEEDED
            if amount > self.balances[account.id]:
                return RC_INSUFFICIENT_FUNDS
        return RC_APPROVED

    def _void_target(self, request: Message, amount: int) -> tuple[LedgerEntry | None, str]:
        original = self._find_original(request, by_rrn=True)
        if original is None:
            return None, RC_ORIGINAL_NOT_FOUND
        if original.kind != "purchase" or not original.approved or original.voided or original.reversed:
            return original, RC_INVALID_TXN
        if amount != original.amount:
            return original, RC_AMOUNT_MISMATCH
        return original, RC_APPROVED

    def _find_original(self, request: Message, *, by_rrn: bool) -> LedgerEntry | None:
        f90 = request.fields.get("90")
        if f90:
            try:
                return self.ledger.get(TxnKey.from_field_90(f90))
            except ValueError:
                return None
        if by_rrn and request.fields.get("37") in self._by_rrn:
            return self.ledger.get(self._by_rrn[request.fields["37"]])
        # a CUP-dialect reversal carries the original's STAN and terminal id instead of field 90
        alt = self._by_terminal_stan.get((request.fields.get("41", ""), request.fields.get("11", "")))
        return self.ledger.get(alt) if alt else None

    def _record(self, entry: LedgerEntry) -> None:
        self.ledger[entry.key] = entry
        self._by_rrn[entry.rrn] = entry.key
        self._by_terminal_stan[(entry.terminal_id, entry.stan)] = entry.key

    def reversal(self, request: Message, reject_first: int = 0) -> Decision:
        """Decide a 0400/0401 (or 0420/0421). Idempotent: a repeat for an already reversed original
        answers 00 and changes nothing. `reject_first` K: the first K attempts for an original answer
        96 (a host that is not ready yet), later ones are processed."""
        rrn = self.next_rrn()
        original = self._find_original(request, by_rrn=False)
        if original is None:
            key = self._reversal_key(request)
            if key is not None:
                self._reversal_attempts[key] = self._reversal_attempts.get(key, 0) + 1
            return Decision(self.config.unknown_original_rc, rrn)
        attempts = self._reversal_attempts.get(original.key, 0) + 1
        self._reversal_attempts[original.key] = attempts
        if attempts <= reject_first:
            return Decision(RC_SYSTEM_ERROR, rrn, entry=original)
        if original.reversed:
            return Decision(RC_APPROVED, rrn, entry=original)
        if not original.approved:
            return Decision(self.config.declined_original_rc, rrn, entry=original)
        if original.account is not None:
            self.balances[original.account] -= original.delta
        if original.kind == "void" and original.original is not None:
            voided = self.ledger.get(original.original)
            if voided is not None:
                voided.voided = False
        original.reversed = True
        return Decision(RC_APPROVED, rrn, original.auth_code, entry=original)

    def _reversal_key(self, request: Message) -> TxnKey | None:
        f90 = request.fields.get("90")
        if f90:
            try:
                return TxnKey.from_field_90(f90)
            except ValueError:
                return None
        return None
