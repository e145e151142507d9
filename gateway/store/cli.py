"""`gateway saf …` and `gateway journal …`: operator commands on the journal and the reversal queue.

    gateway saf list     [--state pending|done|parked|dropped] [--limit N]
    gateway saf retry    SAF_ID                 parked → pending, attempts reset (next send is a 0400)
    gateway saf drop     SAF_ID --note TEXT     close a reversal by hand, with the reason why
    gateway journal show [--terminal TID] [--batch N] [--state S] [--limit N]

Every command takes `--db PATH` (default $GATEWAY_STORE__PATH, else var/journal.db), or `--url
postgresql://...` (default $GATEWAY_STORE__URL) for a PostgreSQL journal, and `--json` for
machine-readable output. PANs appear masked (6+4) only; the journal holds nothing else. The
commands are safe while the gateway runs: SQLite's WAL lets them read, and their few writes wait for
the gateway's commit (busy timeout) instead of failing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import anyio

from gateway.store.errors import StoreError
from gateway.store.records import SafEntry, SafState, TxnRecord, TxnState
from gateway.store.sqlite import SqliteStore

DB_ENV = "GATEWAY_STORE__PATH"
URL_ENV = "GATEWAY_STORE__URL"
DEFAULT_DB = Path("var/journal.db")

Command = Callable[[argparse.Namespace], int]


def register(subparsers: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", type=Path, default=Path(os.environ.get(DB_ENV) or DEFAULT_DB),
                        help=f"journal database (default ${DB_ENV}, else {DEFAULT_DB})")
    common.add_argument("--url", default=os.environ.get(URL_ENV) or None,
                        help=f"a PostgreSQL journal instead (postgresql://..., default ${URL_ENV})")
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


# --- plumbing --------------------------------------------------------------------------------------


class CliError(Exception):
    """An expected failure with a message for the operator (exit code 1)."""


def _guard(command: Command) -> Command:
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (CliError, StoreError) as exc:
            print(f"gateway: {exc}", file=sys.stderr)
            return 1

    return run


def _with_store(args: argparse.Namespace, action: Callable[[Any], Awaitable[Any]]) -> Any:
    url: str | None = getattr(args, "url", None)
    db: Path = args.db
    if url is None and not db.exists():  # opening would create an empty journal, which helps nobody
        raise CliError(f"no journal at {db} (use --db or ${DB_ENV}, or --url)")

    async def go() -> Any:
        if url is not None:
            from gateway.store.postgres import PostgresStore  # psycopg: the `postgres` extra

            async with PostgresStore.open(url, operator=True) as pg:
                return await action(pg)
        async with SqliteStore.open(db) as store:
            return await action(store)

    return anyio.run(go)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _when(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


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
    return {k: (str(v) if isinstance(v, str) else v) for k, v in asdict(r).items()}


def _saf_json(e: SafEntry) -> dict[str, Any]:
    data = {k: (str(v) if isinstance(v, str) else v) for k, v in asdict(e).items() if k != "txn"}
    data["txn"] = _txn_json(e.txn)
    return data


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
