"""The recorder's writer process: reads raw frames from the gateway on stdin (`gateway.trace.pipe`),
masks them (`TraceEncoder`) and writes the trace with rotation (`RotatingTraceWriter`). Ends at EOF,
which is also what happens when the gateway dies: the file is always whole lines, flushed after each
read. The surrogate key is drawn here and dies with the process.

    python -m gateway.trace.writer_process '<settings JSON>'   (started by `Recorder`)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections import OrderedDict
from datetime import UTC, datetime
from pathlib import Path

from gateway.trace.encoder import TraceEncoder
from gateway.trace.format import FrameRecord
from gateway.trace.pipe import RawFrame, RecordReader
from gateway.trace.tracefile import RotatingTraceWriter

#: frame numbers remembered for `cause` links (a cause is a recent frame: the request of an answer
#: in flight, the request a reversal undoes)
CAUSE_WINDOW = 1 << 16


def run(settings: dict[str, object], stream: object) -> int:
    encoder = TraceEncoder(settings["dialects"], settings["framings"],  # type: ignore[arg-type]
                           lenient=bool(settings.get("lenient", False)))
    header = encoder.header(str(settings.get("source", "gateway serve")),
                            datetime.now(UTC).isoformat(timespec="seconds"))
    writer = RotatingTraceWriter(Path(str(settings["path"])), header, max_bytes=int(settings["max_bytes"]),  # type: ignore[call-overload]
                                 max_files=int(settings["max_files"]))  # type: ignore[call-overload]
    reader = RecordReader()
    read = stream.read1  # type: ignore[attr-defined]
    frames = 0
    seqs: OrderedDict[int, int] = OrderedDict()  #: frame number in the stream -> its record's seq
    try:
        while chunk := read(1 << 16):
            for raw in reader.feed(chunk):
                if isinstance(raw, RawFrame):
                    frames += 1
                    cause = seqs.get(raw.cause) if raw.cause is not None else None
                    rec = encoder.frame(raw.t, raw.leg, raw.direction, raw.conn, raw.body, raw.envelope, cause)
                    if isinstance(rec, FrameRecord):
                        seqs[frames] = rec.seq
                        if len(seqs) > CAUSE_WINDOW:
                            seqs.popitem(last=False)
                    writer.write(rec)
                else:
                    writer.write(encoder.event(raw.t, raw.leg, raw.conn, raw.kind, raw.detail))
            writer.flush()
    finally:
        writer.close()
    return 0


def main() -> int:
    # the gateway ends this process by closing the pipe once it has written its last record: a SIGTERM
    # or Ctrl-C meant for the gateway (systemd's stop, `kill %job`, a terminal's process group) must not
    # end it first, or the records of the gateway's drain are lost (the gateway kills it if it hangs)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    # below the gateway's priority: on a busy machine the money path goes first, this process falls
    # behind and the recorder drops (counted) rather than the other way round
    with contextlib.suppress(OSError):
        os.nice(10)
    return run(json.loads(sys.argv[1]), sys.stdin.buffer)


if __name__ == "__main__":
    sys.exit(main())
