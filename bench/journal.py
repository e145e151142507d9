"""Journal throughput: durable SQLite (WAL, group commit) against the in-memory store, same run; and
PostgreSQL (pipelined group commit) with `--postgres URL`.

    python bench/journal.py [--txns 4000] [--writers 1,16,64] [--backend asyncio|trio]
                            [--sync FULL|NORMAL|OFF] [--normal] [--dir DIR]
                            [--postgres postgresql://postgres@127.0.0.1:5432/postgres]

Each of N concurrent writers loops `record_request` (durable before return) then
`record_outcome(completed)`: the two journal writes of one switched transaction. Reported per store
and per N: transactions/s, the ratio to the memory store, commits and writes per commit (how much the
group commit shares each fsync), the latency of `record_request` (p50/p99), which is what a
terminal's transaction waits for before it may go upstream, and the process CPU per transaction
(user + system, every thread's: the commit thread's too). `--sync OFF` takes the disk's syncs out of
the picture and leaves the CPU cost of the write path. With `--postgres` the store works in a schema
of its own, dropped afterwards; its CPU column is the gateway process's only (the server's backends
work too, in their own processes), and the server's own `synchronous_commit` decides its durability.

The database lives in a fresh directory (default: under the system temp dir; pass --dir to put it on
the disk the gateway will use: a tmpfs has no real fsync and flatters SQLite).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import anyio
from hdrh.histogram import HdrHistogram

from gateway.iso.message import mask_pan
from gateway.store import MemoryStore, SqliteStore, TxnKind, TxnRequest, pan_fingerprint

PAN = "6222021234567894321"
KEY = b"bench-fingerprint-key-0123456789"


class CommitCounter:
    def __init__(self) -> None:
        self.commits = 0
        self.writes = 0

    def commit(self, batch_size: int, seconds: float) -> None:
        self.commits += 1
        self.writes += batch_size

    def saf_depth(self, n: int) -> None:
        pass


@dataclass
class Result:
    store: str
    writers: int
    txns: int
    seconds: float
    commits: int
    writes: int
    p50_us: float
    p99_us: float
    cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.txns / self.seconds

    @property
    def cpu_us_per_txn(self) -> float:
        return self.cpu_seconds / self.txns * 1e6


def make_request(writer: int, seq: int, fingerprint: str) -> TxnRequest:
    return TxnRequest(
        terminal_id=f"T{writer:07d}",
        merchant_id="M00000000000001",
        batch=f"{seq // 1_000_000 + 1:06d}",
        terminal_stan=f"{seq % 1_000_000:06d}",
        terminal_mti="0200",
        processing_code="000000",
        kind=TxnKind.PURCHASE,
        amount=100 + seq % 900,
        currency="156",
        pan_masked=mask_pan(PAN),
        pan_fingerprint=fingerprint,
        host_mti="0200",
        host_stan=f"{seq % 1_000_000:06d}",
        transmission_datetime="1123101500",
        pos_entry_mode="021",
        pos_condition_code="00",
    )


StoreFactory = Callable[[CommitCounter], Any]


def stores(directory: Path, synchronous: str, postgres: str | None = None) -> dict[str, StoreFactory]:
    counter = iter(range(1_000_000))

    @asynccontextmanager
    async def sqlite(observer: CommitCounter) -> AsyncIterator[Any]:
        path = directory / f"journal-{next(counter)}.db"
        async with SqliteStore.open(path, synchronous=synchronous, observer=observer) as store:
            yield store

    @asynccontextmanager
    async def memory(observer: CommitCounter) -> AsyncIterator[Any]:
        async with MemoryStore.open(observer=observer) as store:
            yield store

    @asynccontextmanager
    async def pg(observer: CommitCounter) -> AsyncIterator[Any]:
        import psycopg

        from gateway.store.postgres import PostgresStore

        assert postgres is not None
        schema = f"bench_{os.getpid()}_{next(counter)}"
        with psycopg.connect(postgres, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        try:
            sep = "&" if "?" in postgres else "?"
            async with PostgresStore.open(f"{postgres}{sep}options=-csearch_path%3D{schema}", observer=observer,
                                          instance_id="bench") as store:
                yield store
        finally:
            with psycopg.connect(postgres, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")

    found: dict[str, StoreFactory] = {"memory": memory, f"sqlite {synchronous}": sqlite}
    if postgres:
        found["postgres"] = pg
    return found


async def run_one(name: str, factory: StoreFactory, writers: int, txns: int) -> Result:
    observer = CommitCounter()
    latency = HdrHistogram(1, 60_000_000, 3)
    fingerprint = pan_fingerprint(KEY, PAN)
    per_writer = max(1, txns // writers)
    async with factory(observer) as store:

        async def writer(w: int) -> None:
            for seq in range(per_writer):
                rec = make_request(w, seq, fingerprint)
                t0 = time.perf_counter()
                txn_id = await store.record_request(rec)
                latency.record_value(max(1, int((time.perf_counter() - t0) * 1e6)))
                await store.record_outcome(
                    txn_id, "completed", rc="00", auth_code="123456", rrn="000000000001"
                )

        started, cpu_started = time.perf_counter(), time.process_time()
        async with anyio.create_task_group() as tg:
            for w in range(writers):
                tg.start_soon(writer, w)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return Result(
        name,
        writers,
        per_writer * writers,
        elapsed,
        observer.commits,
        observer.writes,
        latency.get_value_at_percentile(50),
        latency.get_value_at_percentile(99),
        cpu,
    )


async def main_async(args: argparse.Namespace, directory: Path) -> list[Result]:
    results = []
    factories = stores(directory, "NORMAL" if args.normal else args.sync, args.postgres)
    for writers in args.writers:
        for name, factory in factories.items():
            results.append(await run_one(name, factory, writers, args.txns))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--txns", type=int, default=4000, help="transactions per (store, N) run")
    parser.add_argument("--writers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--sync", choices=["FULL", "NORMAL", "OFF"], default="FULL",
                        help="SQLite synchronous mode (OFF: no fsync, shows the CPU cost alone)")
    parser.add_argument("--normal", action="store_true", help="same as --sync NORMAL")
    parser.add_argument("--dir", type=Path, help="directory for the database files")
    parser.add_argument("--postgres", metavar="URL", help="also a PostgreSQL store on this server (psycopg)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="journal-bench-") as tmp:
        directory = Path(tmp)
        fs_info = os.statvfs(directory)
        options = {"use_uvloop": True} if args.backend == "asyncio" else {}
        results = anyio.run(main_async, args, directory, backend=args.backend, backend_options=options)

    print(
        f"journal benchmark: {args.txns} txns per run (record_request + record_outcome), "
        f"backend {args.backend}{' + uvloop' if args.backend == 'asyncio' else ''}, dir {directory.parent} "
        f"(block size {fs_info.f_bsize})"
    )
    print(
        f"{'store':<14} {'N':>4} {'txn/s':>9} {'vs memory':>10} {'commits':>8} {'writes/commit':>14} "
        f"{'req p50 µs':>11} {'req p99 µs':>11} {'CPU µs/txn':>11}"
    )
    memory = {r.writers: r.rate for r in results if r.store == "memory"}
    for r in results:
        ratio = r.rate / memory[r.writers] if r.writers in memory else float("nan")
        per_commit = f"{r.writes / r.commits:.1f}" if r.commits else "-"
        commits = str(r.commits) if r.commits else "-"
        print(
            f"{r.store:<14} {r.writers:>4} {r.rate:>9.0f} {ratio:>10.3f} {commits:>8} {per_commit:>14} "
            f"{r.p50_us:>11.0f} {r.p99_us:>11.0f} {r.cpu_us_per_txn:>11.0f}"
        )
    durable = [r for r in results if r.store != "memory"]
    if len(durable) > 1:
        base = durable[0]
        for r in durable[1:]:
            print(f"{r.store} N={r.writers}: {r.rate / base.rate:.1f}x the throughput of N={base.writers}")


if __name__ == "__main__":
    main()
