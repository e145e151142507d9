"""Codec overhead benchmark: our `Codec` against bare pyiso8583 on the same spec dict, same run.

    python bench/codec.py [--rounds 101] [--number 100] [--check]

For each dialect it builds a realistic 0200 (21 fields, 120 bytes of ICC data in field 55), then
times, in interleaved rounds (ours/bare, then bare/ours, ...), `Codec.decode` against
`iso8583.decode(body, dialect.spec)` and `Codec.encode` against `iso8583.encode(doc, dialect.spec)`
(the bare encode even reuses one prebuilt dict, so our fresh `{"t": mti, **fields}` counts as
overhead), and prints the median µs per operation and the median of the per-round ratios.
Absolute times are noisy on shared VMs (reference limits.md: ±30 %); the ratio measured side by
side is the figure that matters.
`--check` exits 1 when any ratio exceeds the budget (default 1.15, i.e. 15 % overhead).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import iso8583

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.iso.codec import Codec
from gateway.iso.message import Message
from gateway.iso.spec import load_dialect

#: 120 bytes of EMV TLV-looking data (ARQC request tags); content does not matter to the codec
ICC_DATA = (
    "9F2608A1B2C3D4E5F607189F2701809F100807010103A0A802009F3704DEADBEEF9F3602001C950500800400009A03"
    "2409309C01009F02060000000012345F2A02015682027C009F1A0201569F03060000000000009F3303E0F8C89F3403"
    "4203009F3501229F1E0831323334353637388407A00000033301019F090200209F4104000000"
)[:240]


def cup_purchase() -> Message:
    return Message(
        "0200",
        {
            "2": "6225881234567890123",
            "3": "000000",
            "4": "000000012345",
            "11": "000123",
            "14": "2912",
            "22": "051",
            "23": "001",
            "25": "00",
            "26": "12",
            "35": "6225881234567890123D29122011234567890",
            "36": "996225881234567890123D1561560000000000000003000000114000029120D000000000000D000000000000D000000",
            "41": "12345678",
            "42": "123456789012345",
            "49": "156",
            "52": "0123456789ABCDEF",
            "53": "2600000000000000",
            "55": ICC_DATA,
            "60": "22000001000500",
            "62": "0011223344556677",
            "63": "CUP",
            "64": "3834353642314344",  # field 64 is binary: the bytes "8456B1CD"
        },
    )


def iso87_purchase() -> Message:
    return Message(
        "0200",
        {
            "2": "6225881234567890123",
            "3": "000000",
            "4": "000000012345",
            "7": "0930123456",
            "11": "000123",
            "12": "123456",
            "13": "0930",
            "14": "2912",
            "18": "5999",
            "22": "051",
            "25": "00",
            "32": "00000001234",
            "35": "6225881234567890123=29122011234567890",
            "37": "123456789012",
            "41": "12345678",
            "42": "123456789012345",
            "43": "ACME STORE               SHANGHAI     CN",
            "49": "156",
            "52": "0123456789ABCDEF",
            "55": ICC_DATA,
            "64": "A1C72E74EA3FA9B6",
        },
    )


def per_op_us(fn: Callable[[], object], number: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(number):
        fn()
    return (time.perf_counter_ns() - start) / number / 1000


def compare(
    ours: Callable[[], object], bare: Callable[[], object], rounds: int, number: int
) -> tuple[float, float, float]:
    """(median µs/op ours, median µs/op bare, median of the per-round ratios ours/bare).

    Each round times `number` operations of one side right after the other (the order alternates
    between rounds), so a burst of load from other processes mostly hits both sides of one pair; the
    median of those paired ratios shrugs off the rounds where it did not."""
    ours_t: list[float] = []
    bare_t: list[float] = []
    for _ in range(max(3, number // 10)):  # warm-up (plan caches, branch predictors)
        ours()
        bare()
    for i in range(rounds):
        if i % 2:
            bare_t.append(per_op_us(bare, number))
            ours_t.append(per_op_us(ours, number))
        else:
            ours_t.append(per_op_us(ours, number))
            bare_t.append(per_op_us(bare, number))
    ratios = [o / b for o, b in zip(ours_t, bare_t, strict=True)]
    return statistics.median(ours_t), statistics.median(bare_t), statistics.median(ratios)


def bench_dialect(name: str, msg: Message, rounds: int, number: int) -> list[tuple[str, str, int, float, float, float]]:
    dialect = load_dialect(name)
    codec = Codec(dialect)
    spec = dialect.spec
    body = codec.encode(msg)
    doc = {"t": msg.mti, **msg.fields}
    bare_body, _ = iso8583.encode(dict(doc), spec)
    if bytes(bare_body) != body:
        raise SystemExit(f"{name}: Codec and bare pyiso8583 encode differently")
    if codec.decode(body).mti != msg.mti:
        raise SystemExit(f"{name}: decode does not round-trip")
    dec = compare(lambda: codec.decode(body), lambda: iso8583.decode(body, spec), rounds, number)
    enc = compare(lambda: codec.encode(msg), lambda: iso8583.encode(doc, spec), rounds, number)
    return [(name, "decode", len(body), *dec), (name, "encode", len(body), *enc)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=101)
    parser.add_argument("--number", type=int, default=100, help="operations per side per round")
    parser.add_argument("--budget", type=float, default=1.15, help="max ratio ours/bare for --check")
    parser.add_argument("--check", action="store_true", help="exit 1 if any ratio exceeds the budget")
    args = parser.parse_args(argv)

    rows: list[tuple[str, str, int, float, float, float]] = []
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection landing in one side's round would skew that round only
    try:
        for name, build in (("cup-pos", cup_purchase), ("iso87-ascii", iso87_purchase)):
            rows.extend(bench_dialect(name, build(), args.rounds, args.number))
    finally:
        if gc_was_enabled:
            gc.enable()

    print(f"{'dialect':<12} {'op':<7} {'bytes':>5} {'ours µs':>9} {'bare µs':>9} {'ratio':>7}")
    worst = 0.0
    for name, op, size, ours, bare, ratio in rows:
        worst = max(worst, ratio)
        print(f"{name:<12} {op:<7} {size:>5} {ours:>9.1f} {bare:>9.1f} {ratio:>7.3f}")
    print(f"worst ratio {worst:.3f} (budget {args.budget:.2f})")
    if args.check and worst > args.budget:
        print("FAIL: codec overhead over budget", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
