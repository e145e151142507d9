"""The load tool's "cup" driver: every load session is one simulated CUP terminal.

`connect()` opens a `TerminalSimulator` with the next terminal id, `prepare()` signs it in (working
keys installed and checked), and `request(kind)` runs one transaction with a fixed test card:

    purchase · refund · balance · void (a purchase, then its void: the void's code) · echo · settle

Options (`gateway load --driver cup --target HOST:PORT [--keys FILE] -o KEY=VALUE ...`):
    --keys FILE   the TEST KEYS file of `gateway init`: sessions are its terminals (id, merchant id,
                  TMK), split between worker processes; tmk / terminal_id / merchant_id are then unused.
                  More sessions than terminals is refused (two sessions of one terminal would undo
                  each other's sign-in).
    tmk           terminal master key, hex (default: the demo key 0123456789ABCDEFFEDCBA9876543210)
    terminal_id   the first terminal id (8 characters); session n uses the id with its digits + n
                  (default LT000001). A `worker_index` option offsets the numbering by 10000 per worker
                  process, so terminals of different processes never share an id.
    merchant_id   15 characters (default 123456789012345)
    pan / pin     the test card (default 6222020000000015 / no PIN); entry = swipe | manual
    amount        minor units (default 100)
    key_mode      001 / 003 / 004 (default 004)
    timeout       seconds a terminal waits for an answer (default 10)
    batch         the batch (1..999999) every terminal starts in; default: the next batch recorded in the
                  state file (`gateway load --state PATH`, see gateway.sim.terminal_state), so a rerun is
                  never refused as a duplicate (94); `--state none`: a random batch, nothing recorded

Result codes: the host's 39, or "timeout" (no answer: the terminal has reversed on its own),
"bad_mac" (approval with a MAC that does not verify) or "bad_answer" (echoed fields differ).
A header processing requirement of 3 (or 39 = 77 / A0 / 99) makes the session sign in again before
its next request.

Importing this module registers the driver.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final

from gateway.load.driver import LoadError, parse_target, register_driver
from gateway.security.algorithms import parse_hex_key
from gateway.security.errors import SecurityError
from gateway.sim.keyfile import KeyFileError, LabTerminal, read_test_keys
from gateway.sim.terminal import Card, Entry, SignInError, TerminalSimulator, TxnResult
from gateway.sim.terminal_state import (
    BATCH_MAX,
    BATCH_MIN,
    TerminalStateError,
    TerminalStateFile,
    default_state_path,
    format_batch,
    random_batch,
)

log = logging.getLogger("gateway.load")

DEMO_TMK: Final = "0123456789ABCDEFFEDCBA9876543210"
DEFAULT_TERMINAL: Final = "LT000001"
DEFAULT_MERCHANT: Final = "123456789012345"
DEFAULT_PAN: Final = "6222020000000015"
KINDS: Final = frozenset({"purchase", "refund", "balance", "void", "echo", "settle"})
#: answers after which a terminal must sign in again
RESIGN_CODES: Final = frozenset({"77", "A0", "99"})
WORKER_STRIDE: Final = 10_000
#: `--state none`: keep no state file, start from a random batch
NO_STATE: Final = "none"


def terminal_ids(first: str, offset: int = 0) -> Iterator[str]:
    """first, first+1, ... keeping the id's letters and width: LT000001 → LT000002 → ..."""
    digits = len(first) - len(first.rstrip("0123456789"))
    if digits == 0:
        raise LoadError(f"terminal_id {first!r} must end in digits so sessions can be numbered")
    prefix, start = first[:-digits], int(first[-digits:]) + offset
    for n in itertools.count(start):
        text = f"{n:0{digits}d}"
        if len(text) > digits:
            raise LoadError(f"ran out of terminal ids after {first!r}")
        yield prefix + text


class CupSession:
    """One terminal. Used by one request at a time (the load tool's contract)."""

    def __init__(self, terminal: TerminalSimulator, card: Card, amount: int, entry: Entry) -> None:
        self.terminal = terminal
        self.card = card
        self.amount = amount
        self.entry = entry
        self._resign = False
        self._last_purchase: TxnResult | None = None

    async def prepare(self) -> None:
        await self.terminal.sign_in()

    async def aclose(self) -> None:
        await self.terminal.aclose()

    async def request(self, kind: str) -> str:
        if kind not in KINDS:
            raise LoadError(f"the cup driver knows {', '.join(sorted(KINDS))}, not {kind!r}")
        term = self.terminal
        if self._resign or not term.signed_in:
            await term.sign_in()
            self._resign = False
        if kind == "echo":
            return self._code(await term.echo())
        if kind == "settle":
            settled = await term.settle()
            return settled.rc or "timeout"
        if kind == "balance":
            return self._code(await term.balance(self.card, entry=self.entry))
        if kind == "refund":
            original = self._last_purchase
            rrn = original.rrn if original is not None and original.rrn else "000000000000"
            return self._code(await term.refund(self.amount, self.card, orig_rrn=rrn, entry=self.entry))
        purchase = await term.purchase(self.amount, self.card, entry=self.entry)
        if kind == "purchase" or not purchase.approved:
            if purchase.approved:
                self._last_purchase = purchase
            return self._code(purchase)
        return self._code(await term.void(purchase))

    def _code(self, result: TxnResult) -> str:
        if result.needs_sign_in or result.rc in RESIGN_CODES:
            self._resign = True
        if result.timed_out or result.rc is None:
            return "timeout"
        if result.problems:
            return "bad_answer"
        if result.mac_ok is False:
            return "bad_mac"
        return result.rc


class CupDriver:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        tmk: bytes,
        first_terminal: str = DEFAULT_TERMINAL,
        merchant_id: str = DEFAULT_MERCHANT,
        card: Card | None = None,
        amount: int = 100,
        entry: Entry = "swipe",
        key_mode: str = "004",
        timeout: float = 10.0,
        worker_index: int = 0,
        terminals: Sequence[LabTerminal] = (),
        batch: Callable[[str], int] = lambda _key: random_batch(),
    ) -> None:
        """`batch(key)` opens the batch the terminals start in, once, at the first connect (so building
        a driver to check its options costs no batch); `key` names this group of terminals."""
        self.host = host
        self.port = port
        self._tmk = tmk
        first_id = next(terminal_ids(first_terminal, worker_index * WORKER_STRIDE))
        self._ids = terminal_ids(first_terminal, worker_index * WORKER_STRIDE)
        #: registered terminals (from a test-keys file), taken in turn; a replaced session reuses one
        self._registered = itertools.cycle(terminals) if terminals else None
        if terminals:
            first_id = terminals[0].terminal_id
        #: names this group of terminals in the state file: the target and its first terminal id
        self.state_key = f"{host}:{port} {first_id}"
        self._open_batch = batch
        self.batch: str | None = None
        self.merchant_id = merchant_id
        self.card = card or Card(DEFAULT_PAN)
        self.amount = amount
        self.entry = entry
        self.key_mode = key_mode
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"CupDriver({self.host}:{self.port}, card={self.card!r}, amount={self.amount})"

    async def connect(self) -> CupSession:
        if self.batch is None:  # no await before this is set: sessions connect concurrently
            self.batch = format_batch(self._open_batch(self.state_key))
            log.info("cup driver: terminals %s... in batch %s", self.state_key.split()[-1], self.batch)
        if self._registered is not None:
            entry = next(self._registered)
            terminal_id, merchant_id, tmk = entry.terminal_id, entry.merchant_id, entry.tmk
        else:
            terminal_id, merchant_id, tmk = next(self._ids), self.merchant_id, self._tmk
        terminal = TerminalSimulator(
            self.host,
            self.port,
            terminal_id,
            merchant_id,
            tmk,
            timeout=self.timeout,
            key_mode=self.key_mode,
            batch=self.batch,
        )
        await terminal.connect()
        return CupSession(terminal, self.card, self.amount, self.entry)


def cup_driver_factory(options: Mapping[str, Any]) -> CupDriver:
    target = options.get("target")
    if not target:
        raise LoadError("the cup driver needs --target HOST:PORT (the gateway's terminal port)")
    host, port = parse_target(str(target))
    extra: Mapping[str, Any] = options.get("options") or {}
    try:
        tmk = parse_hex_key(str(extra.get("tmk", DEMO_TMK)), "TMK")
    except SecurityError as exc:
        raise LoadError(f"cup driver option tmk: {exc}") from None
    amount = _int_option(extra, "amount", 100)
    timeout_text = str(extra.get("timeout", "10"))
    try:
        timeout = float(timeout_text)
    except ValueError:
        raise LoadError(f"cup driver option timeout must be seconds, not {timeout_text!r}") from None
    entry = str(extra.get("entry", "swipe"))
    if entry not in ("swipe", "manual"):
        raise LoadError("cup driver option entry must be swipe or manual")
    key_mode = str(extra.get("key_mode", "004"))
    if key_mode not in ("001", "003", "004"):
        raise LoadError("cup driver option key_mode must be 001, 003 or 004")
    pan = str(extra.get("pan", DEFAULT_PAN))
    if not pan.isdigit() or not 12 <= len(pan) <= 19:
        raise LoadError("cup driver option pan must be 12 to 19 digits")
    pin = extra.get("pin")
    return CupDriver(
        host,
        port,
        tmk=tmk,
        first_terminal=str(extra.get("terminal_id", DEFAULT_TERMINAL)),
        merchant_id=str(extra.get("merchant_id", DEFAULT_MERCHANT)),
        card=Card(pan, pin=str(pin) if pin else None),
        amount=amount,
        entry=entry,  # type: ignore[arg-type]
        key_mode=key_mode,
        timeout=timeout,
        worker_index=_int_option(options, "worker_index", 0),
        terminals=_registered_terminals(options),
        batch=_batch_source(options, extra),
    )


def _batch_source(options: Mapping[str, Any], extra: Mapping[str, Any]) -> Callable[[str], int]:
    """-o batch=N (fixed), else the state file of `--state` (default path when not given), else, with
    `--state none`, a random batch."""
    if "batch" in extra:
        fixed = _int_option(extra, "batch", 1)
        if not BATCH_MIN <= fixed <= BATCH_MAX:
            raise LoadError(f"cup driver option batch must be {BATCH_MIN}..{BATCH_MAX}")
        return lambda _key: fixed
    where = options.get("state")
    if where == NO_STATE:
        return lambda _key: random_batch()
    state = TerminalStateFile(where or default_state_path())

    def from_state(key: str) -> int:
        try:
            return state.next_batch(key)
        except TerminalStateError as exc:
            raise LoadError(str(exc)) from None

    return from_state


def _registered_terminals(options: Mapping[str, Any]) -> tuple[LabTerminal, ...]:
    """This worker's share of the test-keys file's terminals (worker k of K takes every K-th)."""
    path = options.get("keys")
    if not path:
        return ()
    try:
        terminals = read_test_keys(str(path)).terminals
    except KeyFileError as exc:
        raise LoadError(str(exc)) from None
    # unset: `gateway load` has defaulted the sessions to the file's terminals
    sessions = options.get("concurrency") or options.get("sessions") or 0
    if int(sessions) > len(terminals):
        raise LoadError(f"{sessions} sessions but {path} has {len(terminals)} terminals: use --sessions "
                        f"{len(terminals)} or fewer, or `gateway init --terminals N`")
    index, count = _int_option(options, "worker_index", 0), _int_option(options, "worker_count", 1)
    return terminals[index::count]


def _int_option(options: Mapping[str, Any], key: str, default: int) -> int:
    text = str(options.get(key, default))
    if not text.isdigit():
        raise LoadError(f"cup driver option {key} must be a whole number, not {text!r}")
    return int(text)


__all__ = ["CupDriver", "CupSession", "SignInError", "cup_driver_factory", "terminal_ids"]

register_driver("cup", "gateway.sim.cup_driver:cup_driver_factory")
