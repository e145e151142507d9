"""What the state several instances share costs, in-process (one instance) against PostgreSQL, side by
side in one run:

    python bench/shared_state.py [--url postgresql://postgres@127.0.0.1:5432/postgres] [--n 2000]
                                 [--concurrency 16] [--backend asyncio|trio]

- host STANs: `StanAllocator.next()` against `BlockStanAllocator.next()` (blocks of 1,000 fetched ahead);
- daily-limit reservations: `LocalLimits.reserve` against `SharedLimits.reserve` (one conditional upsert
  on the server, a round trip each), one at a time (latency) and `--concurrency` at once (rate);
- sessions: `get` is the same dict lookup in both, so it is not measured; what the shared one adds is a
  read at a terminal's first request on an instance, timed here as `refresh`.

Wall time and this process's CPU time per operation (the server's CPU is not in it). Work happens in a
schema of its own, dropped at the end. On a shared machine the figures are noisy: compare the columns of
one run, not runs.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import anyio
import psycopg

from gateway.config import LimitsConfig
from gateway.core.state import LocalLimits
from gateway.iso.stan import StanAllocator
from gateway.security.algorithms import generate_key
from gateway.security.keys import KeyUsage
from gateway.security.keystore import LocalMasterKey
from gateway.security.module import SoftwareSecurityModule
from gateway.store.pg_migrations import migrate
from gateway.store.shared_state import BlockStanAllocator, SharedDatabase, SharedLimits, SharedSessions

DAY = "20260101"
TID = "10000001"


def per_op(fn: Callable[[], object], n: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n


async def per_op_async(fn: Callable[[], Awaitable[object]], n: int, concurrency: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()

    async def worker(count: int) -> None:
        for _ in range(count):
            await fn()

    async with anyio.create_task_group() as tg:
        for i in range(concurrency):
            tg.start_soon(worker, n // concurrency + (1 if i < n % concurrency else 0))
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n


def row(what: str, local: tuple[float, float], shared: tuple[float, float]) -> None:
    figures = " ".join(f"{x * 1e6:>10.2f}" for x in (*local, *shared))
    print(f"{what:<34} {figures}")


async def main(args: argparse.Namespace) -> None:
    schema = f"bench_shared_{secrets.token_hex(4)}"
    with psycopg.connect(args.url, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    url = f"{args.url}{'&' if '?' in args.url else '?'}options={quote(f'-csearch_path={schema}', safe='')}"
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            migrate(conn)
        db = SharedDatabase(url, pool_size=args.concurrency)
        await db.open()
        try:
            async with anyio.create_task_group() as tg:
                print(f"{'per operation (us)':<34} {'local wall':>10} {'local cpu':>10} {'pg wall':>10} {'pg cpu':>10}")
                local_stans, block_stans = StanAllocator(), BlockStanAllocator(db)
                await block_stans.prime()
                await tg.start(block_stans.run)
                n_stans = args.n * 50
                local = per_op(local_stans.next, n_stans)
                blocks_before = block_stans.blocks
                shared = await _stans_with_turns(block_stans, n_stans)
                row(f"host STAN ({n_stans} each)", local, shared)
                print(f"{'':<34} blocks fetched: {block_stans.blocks - blocks_before}, on the hot path:"
                      f" {block_stans.blocking_fetches}")

                config = LimitsConfig(per_transaction=10, per_day=10 * args.n * 4)
                local_limits, shared_limits = LocalLimits(config), SharedLimits(db, config)
                await tg.start(shared_limits.run)
                for concurrency in (1, args.concurrency):
                    local = await per_op_async(lambda: local_limits.reserve(TID, 1, DAY), args.n, concurrency)
                    shared = await per_op_async(lambda: shared_limits.reserve(TID, 1, DAY), args.n, concurrency)
                    row(f"limit reservation, {concurrency} at once", local, shared)
                    # one terminal's row is one lock: many terminals at once is the gateway's load
                    terminals = iter(range(10**6))

                    def many(ids: Any = terminals) -> Awaitable[str | None]:
                        return shared_limits.reserve(f"T{next(ids):07d}", 1, DAY)

                    calls = db.calls
                    shared = await per_op_async(many, args.n, concurrency)
                    row("  ... over many terminals", local, shared)
                    print(f"{'':<34} round trips per reservation: {(db.calls - calls) / args.n:.2f}")

                tmk, lmk = generate_key(16), LocalMasterKey.generate()
                a, b = SoftwareSecurityModule(), SoftwareSecurityModule()
                for m in (a, b):
                    m.import_clear_key(KeyUsage.TMK, tmk, TID)
                signer, reader = SharedSessions(db, a, lmk, "a"), SharedSessions(db, b, lmk, "b")
                a.issue_working_keys(TID)
                await signer.sign_in(TID, "898100000000001", "000001", "004")
                n_reads = max(args.n // 10, 10)

                async def first_request() -> None:
                    reader.forget_all()
                    await reader.refresh(TID)

                shared = await per_op_async(first_request, n_reads, 1)
                row("session read (first request)", (0.0, 0.0), shared)
                print(f"\nround trips: STANs 1 per 1,000; a reservation 1; a session read 1, only at a terminal's first"
                      f" request on an instance (calls made: {db.calls})")
                tg.cancel_scope.cancel()
        finally:
            await db.close()
    finally:
        with psycopg.connect(args.url, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


async def _stans_with_turns(stans: BlockStanAllocator, n: int) -> tuple[float, float]:
    """`next()` n times at about 100,000 a second (100 every millisecond: several times what one
    instance reaches), the event loop running between, as in a gateway. The sleeps are not counted."""
    wall = cpu = 0.0
    nxt = stans.next
    for _ in range(n // 100):
        w, c = time.perf_counter(), time.process_time()
        for _ in range(100):
            nxt()
        wall, cpu = wall + time.perf_counter() - w, cpu + time.process_time() - c
        await anyio.sleep(0.001)
    return wall / n, cpu / n


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--n", type=int, default=2000, help="reservations per measurement")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse()
    anyio.run(main, arguments, backend=arguments.backend)

