"""`gateway saf …` and `gateway journal …`: operator commands on the journal and the reversal queue.

    gateway saf list     [--state pending|done|parked|dropped] [--limit N]
    gateway saf retry    SAF_ID                 parked → pending, attempts reset (next send is a 0400)
    gateway saf drop     SAF_ID --note TEXT     close a reversal by hand, with the reason why
    gateway journal show [--terminal TID] [--batch N] [--state S] [--limit N]
    gateway journal find [--rrn R] [--stan S] [--auth A] [--amount N] [--terminal TID] [--batch N]
                         [--since ISO] [--until ISO] [--date DAY] [--card]
    gateway journal refusals [--terminal TID] [--card] [--rc RC] [--since ISO] [--until ISO]

`journal find` shows each match with its receipt data (card masked), what its code meant, its
reversal history (attempts, errors, the host's answer) and late host answers; `--card` reads the
card number from a hidden prompt (or one line of stdin), compares fingerprints and never stores,
prints or logs it. Times are ISO 8601 in local time with their offset, as input and output.

Every command takes `--config FILE` (the journal and fingerprint key the gateway's config names),
`--db PATH` (default $GATEWAY_STORE__PATH, else var/journal.db) or `--url postgresql://...` (a
PostgreSQL journal; default $GATEWAY_STORE__URL when neither of the others is given), and `--json`
for machine-readable output. PANs appear masked (6+4) only; the journal holds nothing else. The commands are safe while
the gateway runs: SQLite's WAL lets them read, and their few writes wait for the gateway's commit
(busy timeout) instead of failing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import anyio

from gateway.config import ConfigError, GatewayConfig, StoreConfig, load_config
from gateway.store.errors import StoreError
from gateway.store.lookup import (
    Findings,
    PanInputError,
    find,
    findings_json,
    iso,
    parse_time,
    read_pan,
    record_json,
    render_findings,
    render_refusal,
)
from gateway.store.records import (
    Refusal,
    SafEntry,
    SafState,
    TxnKind,
    TxnQuery,
    TxnRecord,
    TxnState,
    pan_fingerprint,
)
from gateway.store.sqlite import SqliteStore

DB_ENV = "GATEWAY_STORE__PATH"
URL_ENV = "GATEWAY_STORE__URL"
DEFAULT_DB = Path("var/journal.db")

Command = Callable[[argparse.Namespace], int]


def register(subparsers: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_mutually_exclusive_group()
    where.add_argument("--config", type=Path, help="the gateway's TOML file: its journal (store.path) and keys")
    where.add_argument("--db", type=Path, help=f"journal database (default ${DB_ENV}, else {DEFAULT_DB})")
    where.add_argument("--url", help=f"a PostgreSQL journal (postgresql://..., default ${URL_ENV})")
    common.add_argument("--json", action="store_true", help="JSON output for machines")

    saf = subparsers.add_parser("saf", help="store-and-forward reversal queue: list, retry, drop",
                                description="Inspect and resolve queued reversals.")
    actions = saf.add_subparsers(dest="saf_action", metavar="ACTION", required=True)
    p = actions.add_parser("list", parents=[common], help="queued reversals, oldest first")
    p.add_argument("--state", choices=[s.value for s in SafState], help="only entries in this state")
    p.add_argument("--limit", type=_positive, default=1000, help="at most this many (default 1000)")
    p.set_defaults(func=_guard(cmd_saf_list))
    p = actions.add_parser("retry", parents=[common], help="send a parked reversal again (attempts reset)")
    p.add_argument("saf_id", type=int, metavar="ID")
    p.set_defaults(func=_guard(cmd_saf_retry))
    p = actions.add_parser("drop", parents=[common], help="close a reversal by hand, with a note")
    p.add_argument("saf_id", type=int, metavar="ID")
    p.add_argument("--note", required=True, help="why (e.g. 'reversed by phone, ticket 123')")
    p.set_defaults(func=_guard(cmd_saf_drop))

    journal = subparsers.add_parser("journal", help="transaction journal: show recent entries",
                                    description="Read the transaction journal (masked PANs only).")
    actions = journal.add_subparsers(dest="journal_action", metavar="ACTION", required=True)
    p = actions.add_parser("show", parents=[common], help="recent transactions, newest first")
    p.add_argument("--terminal", help="only this terminal id (field 41)")
    p.add_argument("--batch", help="only this batch number (6 digits)")
    p.add_argument("--state", choices=[s.value for s in TxnState], help="only transactions in this state")
    p.add_argument("--limit", type=_positive, default=20, help="at most this many (default 20)")
    p.set_defaults(func=_guard(cmd_journal_show))

    p = actions.add_parser("find", parents=[common], help="look transactions up: RRN, STAN, amount, card, time",
                           description="Each match with its receipt data (card masked), answer, reversal "
                                       "history and late host answers. Filters combine (all must match).")
    p.add_argument("--rrn", help="field 37, the RRN on the receipt")
    p.add_argument("--stan", help="the terminal's trace number (field 11, 6 digits) on the receipt")
    p.add_argument("--host-stan", help="the STAN the gateway sent upstream")
    p.add_argument("--auth", help="authorisation code (field 38)")
    p.add_argument("--amount", type=_amount, help="amount in minor units (1500 for 15.00)")
    p.add_argument("--terminal", help="terminal id (field 41)")
    p.add_argument("--batch", help="batch number (6 digits)")
    p.add_argument("--kind", choices=[k.value for k in TxnKind], help="only this kind")
    p.add_argument("--state", choices=[s.value for s in TxnState], help="only this state")
    _time_range(p)
    p.add_argument("--card", action="store_true",
                   help="ask for the card number (hidden prompt, or one line on stdin) and match it by "
                        "fingerprint; the number is never stored or printed")
    p.add_argument("--limit", type=_positive, default=20, help="at most this many (default 20)")
    p.set_defaults(func=_guard(cmd_journal_find))

    p = actions.add_parser("refusals", parents=[common], help="requests the gateway refused itself, and why",
                           description="Refusals before any money moved (unknown terminal, bad MAC, not "
                                       "signed in, limits, duplicates, format errors), newest first.")
    p.add_argument("--terminal", help="terminal id (field 41)")
    p.add_argument("--rc", help="only this response code")
    _time_range(p)
    p.add_argument("--card", action="store_true", help="ask for the card number, as `journal find --card`")
    p.add_argument("--limit", type=_positive, default=50, help="at most this many (default 50)")
    p.set_defaults(func=_guard(cmd_journal_refusals))


def _time_range(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", type=_time, help="from this ISO 8601 date or time (local unless an offset is given)")
    p.add_argument("--until", type=_end_time, help="before this ISO 8601 time; a bare date includes that day")
    p.add_argument("--date", type=_day, help="only this day (ISO 8601 date), same as --since D --until D")


# --- commands --------------------------------------------------------------------------------------


def cmd_saf_list(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    entries = _with_store(args, lambda store: store.list_saf(args.state, limit=args.limit))
    if args.json:
        _print_json([_saf_json(e) for e in entries], out)
    else:
        _print_table(SAF_TABLE, [_saf_row(e) for e in entries], out)
    return 0


def cmd_saf_retry(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    entry = _with_store(args, lambda store: store.retry_saf(args.saf_id))
    text = f"SAF {entry.saf_id} (txn {entry.txn_id}) is pending again; the next send is a 0400"
    _print_one(entry, text, args, out)
    return 0


def cmd_saf_drop(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    entry = _with_store(args, lambda store: store.drop_saf(args.saf_id, args.note))
    _print_one(entry, f"SAF {entry.saf_id} (txn {entry.txn_id}) dropped: {entry.operator_note}", args, out)
    return 0


def cmd_journal_show(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    records = _with_store(args, lambda store: store.list_transactions(
        terminal_id=args.terminal, batch=args.batch, state=args.state, limit=args.limit))
    if args.json:
        _print_json([_txn_json(r) for r in records], out)
    else:
        _print_table(TXN_TABLE, [_txn_row(r) for r in records], out)
    return 0


def cmd_journal_find(args: argparse.Namespace, out: TextIO | None = None, pan_input: TextIO | None = None) -> int:
    out = out or sys.stdout
    since, until = _range(args)
    db, card = _journal_and_card(args, pan_input)

    async def look(store: SqliteStore) -> Findings:
        query = TxnQuery(terminal_id=args.terminal, batch=args.batch, terminal_stan=args.stan,
                         host_stan=args.host_stan, rrn=args.rrn, auth_code=args.auth, amount=args.amount,
                         kind=TxnKind(args.kind) if args.kind else None,
                         state=TxnState(args.state) if args.state else None,
                         pan_fingerprint=card, since=since, until=until)
        return await find(store, query, limit=args.limit, refusals=bool(card or args.terminal))

    findings = _with_store(db, look)
    if args.json:
        _print_json(findings_json(findings), out)
    else:
        print(render_findings(findings), file=out)
    return 0


def cmd_journal_refusals(args: argparse.Namespace, out: TextIO | None = None,
                         pan_input: TextIO | None = None) -> int:
    out = out or sys.stdout
    since, until = _range(args)
    db, card = _journal_and_card(args, pan_input)

    async def look(store: SqliteStore) -> list[Refusal]:
        return await store.refusals(terminal_id=args.terminal, rc=args.rc, since=since, until=until,
                                    pan_fingerprint=card, limit=args.limit)

    refusals = _with_store(db, look)
    if args.json:
        _print_json(findings_json(Findings((), tuple(refusals)))["refusals"], out)
    else:
        print("\n".join(render_refusal(r) for r in refusals) or "(none)", file=out)
    return 0


# --- plumbing --------------------------------------------------------------------------------------


class CliError(Exception):
    """An expected failure with a message for the operator (exit code 1)."""


def _guard(command: Command) -> Command:
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (CliError, StoreError, ConfigError, PanInputError) as exc:
            print(f"gateway: {exc}", file=sys.stderr)
            return 1

    return run


#: where a journal is: a SQLite file, or a PostgreSQL URL
Location = Path | str


def _db_path(args: argparse.Namespace) -> Location:
    if getattr(args, "url", None) is not None:
        return str(args.url)
    if getattr(args, "config", None) is not None:
        store = load_config(args.config).store
        return store.url if store.url is not None else store.path
    if getattr(args, "db", None) is not None:
        return Path(args.db)
    return os.environ.get(URL_ENV) or Path(os.environ.get(DB_ENV) or DEFAULT_DB)


def _journal(args: argparse.Namespace, *, needs_pan_key: bool) -> tuple[Location, bytes | None]:
    """The journal's path and, for a card lookup, the gateway's PAN fingerprint key (the config's, the
    environment's, or the key file next to the journal; never a new one)."""
    where = _db_path(args)
    if args.config is not None:
        config = load_config(args.config)
    elif isinstance(where, str):
        config = GatewayConfig(store=StoreConfig(url=where))
    else:
        config = GatewayConfig(store=StoreConfig(path=where))
    if not needs_pan_key:
        return where, None
    from gateway.serve import pan_hash_key

    return where, pan_hash_key(config, create=False)


def _journal_and_card(args: argparse.Namespace, pan_input: TextIO | None) -> tuple[Location, str | None]:
    """The journal, and for `--card` the fingerprint of the card number the operator types: the PAN
    itself lives only inside this call."""
    db, pan_key = _journal(args, needs_pan_key=args.card)
    if not args.card or pan_key is None:
        return db, None
    return db, pan_fingerprint(pan_key, read_pan(pan_input))


def _with_store(db: Location | argparse.Namespace, action: Callable[[Any], Awaitable[Any]]) -> Any:
    where = _db_path(db) if isinstance(db, argparse.Namespace) else db
    if isinstance(where, Path) and not where.exists():  # opening would create an empty journal
        raise CliError(f"no journal at {where} (use --config, --db, --url or ${DB_ENV})")

    async def go() -> Any:
        if isinstance(where, str):
            from gateway.store.postgres import PostgresStore  # psycopg: the `postgres` extra

            async with PostgresStore.open(where, operator=True) as pg:
                return await action(pg)
        async with SqliteStore.open(where) as store:
            return await action(store)

    return anyio.run(go)


def _amount(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError("minor units, digits only (1500 for 15.00)")
    return int(text)


def _time(text: str) -> float:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _end_time(text: str) -> float:
    try:
        return parse_time(text, end_of_day=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _day(text: str) -> tuple[float, float]:
    if len(text.strip()) != 10:
        raise argparse.ArgumentTypeError("a date such as 2026-12-01")
    return _time(text), _end_time(text)


def _range(args: argparse.Namespace) -> tuple[float | None, float | None]:
    since, until = args.since, args.until
    if args.date is not None:
        if since is not None or until is not None:
            raise CliError("--date or --since/--until, not both")
        since, until = args.date
    if since is not None and until is not None and until <= since:
        raise CliError("--until must be after --since")
    return since, until


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _when(ts: float | None) -> str:
    return iso(ts) or ""


SAF_TABLE = ("ID", "TXN", "STATE", "REASON", "BY", "TRIES", "NEXT", "TERMINAL", "STAN", "AMOUNT", "PAN",
             "LAST ERROR / NOTE")
TXN_TABLE = ("ID", "CREATED", "TERMINAL", "BATCH", "STAN", "KIND", "AMOUNT", "CUR", "PAN", "RC", "AUTH",
             "RRN", "STATE")


def _saf_row(e: SafEntry) -> tuple[str, ...]:
    note = e.operator_note or e.parked_reason or e.last_error or ""
    nxt = _when(e.next_attempt_at) if e.state == SafState.PENDING else ""
    return (str(e.saf_id), str(e.txn_id), e.state, e.reason, e.initiator, str(e.attempts), nxt,
            e.txn.terminal_id, e.txn.terminal_stan, str(e.txn.amount), e.txn.pan_masked, note)


def _txn_row(r: TxnRecord) -> tuple[str, ...]:
    return (str(r.txn_id), _when(r.created_at), r.terminal_id, r.batch, r.terminal_stan, r.kind,
            str(r.amount), r.currency, r.pan_masked, r.rc or "", r.auth_code or "", r.rrn or "", r.state)


def _txn_json(r: TxnRecord) -> dict[str, Any]:
    return record_json(r)


def _saf_json(e: SafEntry) -> dict[str, Any]:
    return record_json(e)


def _print_json(data: object, out: TextIO) -> None:
    json.dump(data, out, indent=2, ensure_ascii=False)
    out.write("\n")


def _print_one(entry: SafEntry, text: str, args: argparse.Namespace, out: TextIO) -> None:
    if args.json:
        _print_json(_saf_json(entry), out)
    else:
        print(text, file=out)


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO) -> None:
    if not rows:
        print("(none)", file=out)
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    for line in (headers, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip(), file=out)
