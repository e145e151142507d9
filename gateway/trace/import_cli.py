"""`gateway trace import --format pcap|jpos-xml|hex INPUT -o TRACE`: turn captures and logs a team
already has into a trace (masked like every trace; decoded leniently)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from gateway.iso.errors import IsoError
from gateway.trace.encoder import TraceEncoder
from gateway.trace.format import Leg, Record, write_records
from gateway.trace.importers import hex_records, jpos_records, pcap_records

FORMATS = ("pcap", "jpos-xml", "hex")


def _records(args: argparse.Namespace, encoder: TraceEncoder, leg: Leg) -> Iterator[Record]:
    path = Path(args.input)
    if args.format == "hex":
        with path.open(encoding="utf-8") as f:
            yield from hex_records(f, encoder, leg)
    elif args.format == "jpos-xml":
        with path.open("rb") as fb:
            yield from jpos_records(fb, encoder, leg)
    else:
        with path.open("rb") as fb:
            yield from pcap_records(fb, encoder, leg, args.port)


def _import_command(args: argparse.Namespace) -> int:
    leg = Leg(args.leg)
    if args.format == "pcap" and args.port is None:
        print("gateway trace import: --port is needed for pcap (the server's TCP port)", file=sys.stderr)
        return 2
    try:
        encoder = TraceEncoder({leg.value: args.dialect}, {leg.value: args.framing}, lenient=True)
    except (IsoError, ValueError) as exc:
        print(f"gateway trace import: {exc}", file=sys.stderr)
        return 2
    header = encoder.header(f"import:{args.format}", datetime.now(UTC).isoformat(timespec="seconds"),
                            lenient=True, imported_from=Path(args.input).name)
    out = Path(args.output)
    if out.exists() and Path(args.input).exists() and out.samefile(args.input):
        print(f"gateway trace import: the output {out} is the input: writing it would destroy what it reads",
              file=sys.stderr)
        return 2
    # written beside the output and renamed over it when whole: a failed import leaves no half trace
    # behind, and an earlier trace of that name as it was
    part = out.with_name(f".{out.name}.{os.getpid()}.part")
    try:
        f = part.open("w", encoding="utf-8")
    except OSError as exc:
        print(f"gateway trace import: cannot write {out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    try:
        with f:
            n = write_records(f, header, _records(args, encoder, leg))
        os.replace(part, out)
    except (OSError, ValueError, EOFError) as exc:  # ImportFormatError is a ValueError
        part.unlink(missing_ok=True)
        print(f"gateway trace import: cannot read {args.input}: {exc}", file=sys.stderr)
        return 1
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    print(f"imported {n} records from {args.input} into {out}")
    return 0


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="import a pcap/pcapng capture, a jPOS XML log or a hex dump as a trace")
    p.add_argument("input", metavar="INPUT")
    p.add_argument("--format", choices=FORMATS, required=True)
    p.add_argument("-o", "--output", required=True, metavar="TRACE")
    p.add_argument("--dialect", default="cup-pos", help="dialect of the messages (default %(default)s)")
    p.add_argument("--framing", default="cup", choices=("cup", "len2", "ascii4"),
                   help="framing of the bytes (pcap, hex; default %(default)s)")
    p.add_argument("--leg", default="terminal", choices=("terminal", "host"),
                   help="which leg of the system under test this is (default %(default)s)")
    p.add_argument("--port", type=int, help="pcap: the server's TCP port (the SUT's, or the host's for --leg host)")
    p.set_defaults(func=_import_command)
