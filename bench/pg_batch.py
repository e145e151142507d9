"""How a group-commit batch best reaches PostgreSQL: the PostgreSQL store's way (one transaction in
pipeline mode, one Sync: one round trip), one multi-statement simple query (values bound client-side,
one round trip), or one statement at a time (a round trip each).

    python bench/pg_batch.py [--url postgresql://postgres@127.0.0.1:5432/postgres] [--sizes 1,16,64,256]
                             [--rounds 30]

Each batch is the money path's writes: N journal INSERTs, then N conditional UPDATEs (the outcome), as
the store sends them (same SQL, same table). `synchronous_commit` is off for this session so the disk's
sync does not hide the protocol's cost (a real commit adds one WAL sync per batch, whatever the shape).
Shapes take turns round by round (the machine's speed drifts). Round trips are counted from libpq's
protocol trace (Sync and Query messages). Work happens in a schema of its own, dropped at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg

from gateway.store import TxnState, pan_fingerprint
from gateway.store.pg_migrations import migrate
from gateway.store.postgres import _INSERT_TXN, _RECORD_OUTCOME
from gateway.store.records import REQUEST_COLUMNS

PAN = "6222021234567894321"
KEY = b"bench-fingerprint-key-0123456789"

Conn = psycopg.Connection[Any]


def request_values(seq: int) -> tuple[object, ...]:
    fields: dict[str, object] = dict.fromkeys(REQUEST_COLUMNS)
    fields.update(terminal_id="T0000001", merchant_id="M00000000000001", batch="000001",
                  terminal_stan=f"{seq % 1_000_000:06d}", terminal_mti="0200", processing_code="000000",
                  kind="purchase", amount=1000, currency="156", pan_masked="622202*********4321",
                  pan_fingerprint=pan_fingerprint(KEY, PAN), card_org="CUP", host_mti="0200",
                  host_stan=f"{seq % 1_000_000:06d}", transmission_datetime="1202101500")
    # a fresh batch number per run keeps the unique (terminal, batch, STAN) free
    fields["batch"] = f"{seq // 1_000_000:06d}"
    now = time.time()
    return (*fields.values(), TxnState.PENDING, now, now, "bench")


def pipelined(conn: Conn, first: int, n: int) -> None:
    with conn.pipeline():
        conn.execute("BEGIN")
        inserts = [conn.execute(_INSERT_TXN, request_values(first + i)) for i in range(n)]  # type: ignore[call-overload]
        conn.execute("COMMIT")
    ids = [int(c.fetchone()[0]) for c in inserts]
    with conn.pipeline():
        conn.execute("BEGIN")
        updates = [conn.execute(_RECORD_OUTCOME[TxnState.COMPLETED],  # type: ignore[call-overload]
                                (TxnState.COMPLETED, "00", None, None, time.time(), t, t)) for t in ids]
        conn.execute("COMMIT")
    assert all(c.fetchone()[0] == 1 for c in updates)


def multi_statement(conn: Conn, first: int, n: int) -> None:
    cur = psycopg.ClientCursor(conn)
    text = "BEGIN;" + ";".join(cur.mogrify(_INSERT_TXN, request_values(first + i)) for i in range(n)) + ";COMMIT"
    cur.execute(text)  # type: ignore[call-overload]
    ids = []
    while cur.nextset():
        row = cur.fetchone() if cur.description else None
        if row is not None:
            ids.append(int(row[0]))
    text = "BEGIN;" + ";".join(
        cur.mogrify(_RECORD_OUTCOME[TxnState.COMPLETED], (TxnState.COMPLETED, "00", None, None, time.time(), t, t))
        for t in ids) + ";COMMIT"
    cur.execute(text)  # type: ignore[call-overload]
    assert len(ids) == n


def one_at_a_time(conn: Conn, first: int, n: int) -> None:
    conn.execute("BEGIN")
    ids = [int(conn.execute(_INSERT_TXN, request_values(first + i)).fetchone()[0]) for i in range(n)]  # type: ignore[call-overload, index]
    conn.execute("COMMIT")
    conn.execute("BEGIN")
    for t in ids:
        conn.execute(_RECORD_OUTCOME[TxnState.COMPLETED],  # type: ignore[call-overload]
                     (TxnState.COMPLETED, "00", None, None, time.time(), t, t)).fetchone()
    conn.execute("COMMIT")


def round_trips(conn: Conn, fn: Callable[[], None]) -> int:
    with tempfile.TemporaryFile() as trace:
        conn.pgconn.trace(trace.fileno())
        conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            fn()
        finally:
            conn.pgconn.untrace()
        trace.seek(0)
        lines = [line.split("\t") for line in trace.read().decode(errors="replace").splitlines()]
    return sum(1 for p in lines if len(p) > 2 and p[0] == "F" and p[2] in ("Sync", "Query"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64, 256])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    schema = f"bench_batch_{os.getpid()}"
    with psycopg.connect(args.url, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    try:
        with psycopg.connect(args.url, autocommit=True, options=f"-csearch_path={schema}") as conn:
            migrate(conn)
            conn.execute("SET synchronous_commit = off")
            shapes = {"pipeline (the store)": pipelined, "multi-statement": multi_statement,
                      "one at a time": one_at_a_time}
            seq = 1_000_000
            print(f"{'shape':<22} {'N':>4} {'round trips':>12} {'µs per batch':>13} {'µs per write':>13}")
            for n in args.sizes:
                bases: dict[str, int] = {}
                trips: dict[str, float] = {}
                times: dict[str, list[float]] = {name: [] for name in shapes}
                for name, shape in shapes.items():
                    seq += 1_000_000
                    bases[name] = seq
                    trips[name] = round_trips(conn, lambda b=seq, f=shape, k=n: f(conn, b, k)) / 2
                for r in range(args.rounds):  # interleaved: the machine's drift hits every shape alike
                    for name, shape in shapes.items():
                        started = time.perf_counter()
                        shape(conn, bases[name] + (r + 1) * n, n)
                        times[name].append(time.perf_counter() - started)
                for name in shapes:
                    per_batch = statistics.median(times[name]) / 2 * 1e6  # two batches: requests, outcomes
                    print(f"{name:<22} {n:>4} {trips[name]:>12.0f} {per_batch:>13.0f} {per_batch / n:>13.1f}")
    finally:
        with psycopg.connect(args.url, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


if __name__ == "__main__":
    main()
