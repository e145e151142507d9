"""Codec benchmark: the compiled codec, the pure codec and bare pyiso8583 side by side, same run.

    python bench/codec.py [--rounds 61] [--turn-ms 15] [--check] [--target 10]
    python bench/codec.py --rss 1000000        # reference-count check: RSS over 1e6 decode+encode

The work measured is one **decode + encode per message**, as a relay or an echo does it: the body is
decoded, and the decoded message encoded again (`Codec.decode` then `Codec.encode`; for bare
pyiso8583 `iso8583.decode(body, spec)` then `iso8583.encode(doc, spec)` of the dict it returned).

The messages are a **hold-out set**: bodies our encoder did not make. Per dialect, the reference's
worked CUP vectors as hex and a handful of realistic messages (purchase with ICC data, response,
reversal, sign-in, settlement; ISO 8583:1987 with a secondary bitmap) written as pyiso8583 dicts and
encoded by bare pyiso8583. Figures are µs per message averaged over the set.

The three codecs take turns in every round (the order rotates between rounds; each turn lasts about
`--turn-ms`), so a burst of load from other processes on this shared machine hits all of them alike;
the medians over the rounds are printed, and the ratios are medians of the per-round ratios.
`--check` exits 1 unless the compiled codec is at least `--target` times faster than bare pyiso8583
for every dialect (the issue 13 target is 10).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import iso8583

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.iso.codec import Codec, codec_implementation
from gateway.iso.spec import Dialect, load_dialect

#: 120 bytes of EMV TLV-looking data (ARQC request tags); content does not matter to the codec
ICC_DATA = (
    "9F2608A1B2C3D4E5F607189F2701809F100807010103A0A802009F3704DEADBEEF9F3602001C950500800400009A03"
    "2409309C01009F02060000000012345F2A02015682027C009F1A0201569F03060000000000009F3303E0F8C89F3403"
    "4203009F3501229F1E0831323334353637388407A00000033301019F090200209F4104000000"
)[:240]


def _asc(text: str) -> str:
    return text.encode("ascii").hex()


#: reference cup-pos-dialect.md §1.5: a sign-in and a balance inquiry, as hex from the document
CUP_VECTORS = [
    "0800" "0020000000C00012" "000456" + _asc("12345678") + _asc("123456789012345") + "0011" "001234560030"
    "0002" + _asc("03"),
    "0200" "202004C020C09811" "310000" "000789" "0210" "00" "06" "37" "6225885916163289D1703201" + "0" * 13 + "0"
    + _asc("12345678") + _asc("123456789012345") + _asc("156") + "A1B2C3D4E5F60718" "2600000000000000" "0013"
    "01000001000500" + _asc("8456B1CD"),
]

CUP_DOCS: list[dict[str, str]] = [
    {  # purchase with chip data and a PIN block
        "t": "0200", "2": "6225881234567890123", "3": "000000", "4": "000000012345", "11": "000123",
        "14": "2912", "22": "051", "23": "001", "25": "00", "26": "12",
        "35": "6225881234567890123D29122011234567890",
        "36": "996225881234567890123D1561560000000000000003000000114000029120D000000000000D000000000000D000000",
        "41": "12345678", "42": "123456789012345", "49": "156", "52": "0123456789ABCDEF", "53": "2600000000000000",
        "55": ICC_DATA, "60": "22000001000500", "62": "0011223344556677", "63": "CUP",
        "64": "3834353642314344",  # field 64 is binary: the bytes "8456B1CD"
    },
    {  # its answer
        "t": "0210", "2": "6225881234567890123", "3": "000000", "4": "000000012345", "11": "000123", "12": "103015",
        "13": "0930", "15": "0930", "25": "00", "32": "00012345", "37": "123456789012", "38": "A1B2C3", "39": "00",
        "41": "12345678", "42": "123456789012345", "44": "0123456789012345678901", "49": "156",
        "55": ICC_DATA[:60], "60": "22000001000500", "63": "CUP", "64": "3834353642314344",
    },
    {  # reversal
        "t": "0400", "2": "6225881234567890123", "3": "000000", "4": "000000012345", "11": "000124", "22": "051",
        "25": "00", "39": "98", "41": "12345678", "42": "123456789012345", "49": "156",
        "60": "22000001000500", "61": "00000100012309301", "64": "3041314232433344",
    },
    {  # settlement
        "t": "0500", "11": "000125", "41": "12345678", "42": "123456789012345",
        "48": "00000000100000000000123450000000000000000000000000000000000000", "49": "156",
        "60": "00000001201", "63": "001",
    },
]

ISO87_DOCS: list[dict[str, str]] = [
    {  # purchase with chip data (jPOS ISO87APackager layout)
        "t": "0200", "2": "6225881234567890123", "3": "000000", "4": "000000012345", "7": "0930123456",
        "11": "000123", "12": "123456", "13": "0930", "14": "2912", "18": "5999", "22": "051", "25": "00",
        "28": "C00000100", "32": "00000001234", "35": "6225881234567890123=29122011234567890",
        "37": "123456789012", "41": "12345678", "42": "123456789012345",
        "43": "ACME STORE               SHANGHAI     CN", "49": "156", "52": "0123456789ABCDEF", "55": ICC_DATA,
        "64": "A1C72E74EA3FA9B6",
    },
    {  # its answer
        "t": "0210", "2": "6225881234567890123", "3": "000000", "4": "000000012345", "7": "0930123456",
        "11": "000123", "12": "123456", "13": "0930", "32": "00000001234", "37": "123456789012", "38": "A1B2C3",
        "39": "00", "41": "12345678", "42": "123456789012345", "49": "156", "55": ICC_DATA[:40],
        "64": "A1C72E74EA3FA9B6",
    },
    {  # reversal advice with the secondary bitmap
        "t": "0420", "2": "6225881234567890123", "3": "000000", "4": "000000012345", "7": "0930123501",
        "11": "000124", "32": "00000001234", "37": "123456789012", "39": "68", "41": "12345678",
        "42": "123456789012345", "49": "156", "90": "020000012309301234560000000123400000000000",
        "97": "D0000000000012345", "128": "0011223344556677",
    },
    {  # network management echo
        "t": "0800", "7": "0930123600", "11": "000125", "70": "301",
    },
]


def holdout(name: str, dialect: Dialect) -> list[bytes]:
    """Bodies made without our encoder: hex from the reference, or bare pyiso8583 from dicts."""
    docs = CUP_DOCS if name == "cup-pos" else ISO87_DOCS
    bodies = [bytes(iso8583.encode(dict(doc), dialect.spec)[0]) for doc in docs]
    if name == "cup-pos":
        bodies += [bytes.fromhex(h) for h in CUP_VECTORS]
    return bodies


def per_message_us(fn: Callable[[bytes], object], bodies: list[bytes], number: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(number):
        for body in bodies:
            fn(body)
    return (time.perf_counter_ns() - start) / (number * len(bodies)) / 1000


def bench_dialect(name: str, rounds: int, turn_ms: float) -> dict[str, Any]:
    dialect = load_dialect(name)
    compiled = Codec(dialect, implementation="compiled")
    pure = Codec(dialect, implementation="pure")
    spec = dialect.spec
    bodies = holdout(name, dialect)
    for body in bodies:  # all three agree on every message (decode, and the re-encoded bytes)
        msg = pure.decode(body)
        assert compiled.decode(body) == msg, name
        again = pure.encode(msg)
        assert compiled.encode(msg) == again, name
        assert bytes(iso8583.encode(iso8583.decode(body, spec)[0], spec)[0]) == again, name

    def ours(codec: Codec) -> Callable[[bytes], object]:
        decode, encode = codec.decode, codec.encode
        return lambda body: encode(decode(body))

    def bare(body: bytes) -> object:
        return iso8583.encode(iso8583.decode(body, spec)[0], spec)

    sides: dict[str, Callable[[bytes], object]] = {"compiled": ours(compiled), "pure": ours(pure), "bare": bare}
    # every side's turn lasts about `turn_ms` (a preemption by another process then costs each side
    # alike): passes over the set per turn from a warm-up measurement
    counts = {}
    for side, fn in sides.items():
        per_message_us(fn, bodies, 3)
        us = per_message_us(fn, bodies, 5)
        counts[side] = max(1, round(turn_ms * 1000 / (us * len(bodies))))
    times: dict[str, list[float]] = {side: [] for side in sides}
    order = list(sides)
    for i in range(rounds):
        for side in order[i % 3 :] + order[: i % 3]:
            times[side].append(per_message_us(sides[side], bodies, counts[side]))
    ratio = {
        "bare/compiled": [b / c for b, c in zip(times["bare"], times["compiled"], strict=True)],
        "pure/compiled": [p / c for p, c in zip(times["pure"], times["compiled"], strict=True)],
        "bare/pure": [b / p for b, p in zip(times["bare"], times["pure"], strict=True)],
    }
    return {
        "dialect": name,
        "messages": len(bodies),
        "bytes": round(statistics.mean(len(b) for b in bodies)),
        **{side: statistics.median(t) for side, t in times.items()},
        **{k: statistics.median(v) for k, v in ratio.items()},
    }


def rss_check(count: int) -> int:
    """Decode+encode `count` messages with the compiled codec; RSS must stay flat (no reference leak)."""
    rows = []
    codecs = [(Codec(load_dialect(n), implementation="compiled"), holdout(n, load_dialect(n))) for n in
              ("cup-pos", "iso87-ascii")]
    done = 0
    step = max(1, count // 10)
    print(f"RSS over {count:,} decode+encode with the compiled codec (both dialects, hold-out set):")
    while done < count:
        for _ in range(step // 10):
            for codec, bodies in codecs:
                for body in bodies[:5]:
                    codec.encode(codec.decode(body))
        done += (step // 10) * 10
        rows.append(_rss_kib())
        print(f"  {done:>10,}  RSS {rows[-1] / 1024:7.1f} MiB", flush=True)
    growth = rows[-1] - rows[0]
    print(f"growth after the first step: {growth} KiB")
    return 0 if growth < 1024 else 1


def _rss_kib() -> int:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * 4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=61)
    parser.add_argument("--turn-ms", type=float, default=15.0, help="length of one side's turn in a round")
    parser.add_argument("--target", type=float, default=10.0, help="min speed-up over bare pyiso8583 for --check")
    parser.add_argument("--check", action="store_true", help="exit 1 if the compiled codec misses the target")
    parser.add_argument("--rss", type=int, metavar="N", help="instead: RSS over N decode+encode (leak check)")
    args = parser.parse_args(argv)
    if args.rss:
        return rss_check(args.rss)
    print(f"codec in use by default: {codec_implementation()}")

    rows = []
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection landing in one side's turn would skew that turn only
    try:
        for name in ("cup-pos", "iso87-ascii"):
            rows.append(bench_dialect(name, args.rounds, args.turn_ms))
    finally:
        if gc_was_enabled:
            gc.enable()

    print("µs per message (decode + encode), median of rounds; ratios: median of per-round ratios")
    print(f"{'dialect':<12} {'msgs':>4} {'bytes':>5} {'compiled':>9} {'pure':>8} {'bare':>8} "
          f"{'bare/compiled':>13} {'pure/compiled':>13} {'bare/pure':>9}")
    worst = float("inf")
    for r in rows:
        worst = min(worst, r["bare/compiled"])
        print(f"{r['dialect']:<12} {r['messages']:>4} {r['bytes']:>5} {r['compiled']:>9.2f} {r['pure']:>8.1f} "
              f"{r['bare']:>8.1f} {r['bare/compiled']:>12.1f}x {r['pure/compiled']:>12.1f}x {r['bare/pure']:>8.2f}x")
    print(f"compiled vs bare pyiso8583: at least {worst:.1f}x faster (target {args.target:g}x)")
    if args.check and worst < args.target:
        print("FAIL: compiled codec under target", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
