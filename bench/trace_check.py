"""`gateway trace check` speed and memory on a large trace: frames per second on one core, and peak
RSS after 100,000 and after 1,000,000 frames (constant memory: the check streams).

    python bench/trace_check.py [--frames 1000000] [--small 100000] [--keep]

The trace is generated here: 1,000 distinct purchase flows (terminal 0200 → host 0200 → host 0210 →
terminal 0210, every secret surrogated by the real `TraceEncoder`), repeated with fresh sequence
numbers and times over 50 terminal connections until the frame count is reached. Each check runs
as `python -m gateway.cli trace check` in a child process pinned to one CPU; its CPU time and
VmHWM come from /proc and `resource`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.iso.build import TerminalIdent, cup, iso87
from gateway.iso.build.response import response
from gateway.iso.codec import Codec
from gateway.iso.framing import CupEnvelope
from gateway.iso.spec import load_dialect
from gateway.trace.encoder import TraceEncoder
from gateway.trace.format import Direction, Leg

DISTINCT = 1000
ENV = CupEnvelope.from_hex("6000010000", "603100310000")


def templates() -> tuple[str, list[tuple[str, str]]]:
    """The header line, and (kind, rest-of-line after the time) of every record of the distinct flows."""
    enc = TraceEncoder({"terminal": "cup-pos", "host": "iso87-ascii"}, {"terminal": "cup", "host": "len2"},
                       lenient=False)
    cup_codec, iso_codec = Codec(load_dialect("cup-pos")), Codec(load_dialect("iso87-ascii"))
    out: list[tuple[str, str]] = []
    for i in range(DISTINCT):
        ident = TerminalIdent(f"{10000001 + i % 50:08d}", "898100012340001")
        pan = f"62220212{i:010d}3"
        track = f"{pan}D30121010000000000"
        stan = f"{i % 999999 + 1:06d}"
        t_req = cup.purchase(ident, stan, "000001", 1_000 + i, track2=track, pin_block="0123456789ABCDEF")
        h_req = iso87.purchase(ident, f"{(i + 500) % 999999 + 1:06d}", "1202060657", "1234", 1_000 + i,
                               track2=track.replace("D", "="), pin_block="FEDCBA9876543210")
        h_ans = response(h_req, "00", "iso87-ascii", field_37=f"{i:012d}", field_38="123456")
        t_ans = response(t_req, "00", "cup-pos", field_37=f"{i:012d}", field_38="123456")
        conn = f"T{i % 50 + 1}"
        for leg, direction, c, body, env in (
            (Leg.TERMINAL, Direction.IN, conn, cup_codec.encode(t_req), ENV),
            (Leg.HOST, Direction.OUT, "H1", iso_codec.encode(h_req), None),
            (Leg.HOST, Direction.IN, "H1", iso_codec.encode(h_ans), None),
            (Leg.TERMINAL, Direction.OUT, conn, cup_codec.encode(t_ans), ENV.reply()),
        ):
            line = json.dumps(enc.frame(0.0, leg, direction, c, body, env).to_json(), separators=(",", ":"))
            rest = line.split(',"t":', 1)[1].split(",", 1)[1]
            out.append(("frame", rest))
    header = json.dumps(enc.header("bench", "").to_json(), separators=(",", ":"))
    return header, out


def write_trace(path: Path, frames: int) -> None:
    header, records = templates()
    t0 = 1_796_000_000.0
    with path.open("w", encoding="utf-8") as f:
        f.write(header + "\n")
        for seq in range(1, frames + 1):
            kind, rest = records[(seq - 1) % len(records)]
            f.write(f'{{"kind":"{kind}","seq":{seq},"t":{t0 + seq * 0.001:.6f},{rest}\n')


def run_check(path: Path) -> dict[str, float]:
    argv = [sys.executable, "-c", (
        "import resource, sys, time; from gateway.cli import main; t = time.process_time(); rc = main(sys.argv[1:]); "
        "print('CPU', time.process_time() - t, 'HWM', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); "
        "sys.exit(rc)"), "trace", "check", str(path)]
    cpus = os.sched_getaffinity(0)
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True,
                          preexec_fn=(lambda: os.sched_setaffinity(0, {min(cpus)})) if cpus else None)
    wall = time.perf_counter() - started
    summary = proc.stdout.splitlines()
    tail = next(line for line in summary if line.startswith("CPU"))
    _, cpu, _, hwm = tail.split()
    print("   ", summary[0])
    return {"wall": wall, "cpu": float(cpu), "hwm_mib": int(hwm) / 1024, "rc": proc.returncode}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--keep", action="store_true", help="keep the generated traces")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="trace-check-"))
    results = {}
    for n in (args.small, args.frames):
        path = workdir / f"{n}.jsonl"
        t = time.perf_counter()
        write_trace(path, n)
        print(f"{n:,} frames: {path.stat().st_size / 1e6:.0f} MB written in {time.perf_counter() - t:.0f} s")
        r = results[n] = run_check(path)
        print(f"    {n / r['cpu']:,.0f} frames/s (CPU), {n / r['wall']:,.0f} frames/s (wall), "
              f"peak RSS {r['hwm_mib']:.1f} MiB, exit {r['rc']}")
        if not args.keep:
            path.unlink()
    small, big = results[args.small], results[args.frames]
    print(f"\npeak RSS {small['hwm_mib']:.1f} MiB at {args.small:,} frames, {big['hwm_mib']:.1f} MiB at "
          f"{args.frames:,}: memory does not grow with the trace" if big["hwm_mib"] < small["hwm_mib"] * 1.25 else
          "\npeak RSS grows with the trace")
    return 0


if __name__ == "__main__":
    sys.exit(main())
