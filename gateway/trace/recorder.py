"""The recorder: a `Tap` that costs the money path a few microseconds per frame and never waits.

Inside the gateway's event loop a frame costs: the time, a `struct.pack` and an append to a buffer
under a lock that is only ever held for a list swap. A writer thread hands the buffer, every
`FLUSH_INTERVAL`, to a separate writer process (`gateway.trace.writer_process`) through a pipe; that
process decodes, replaces secrets with surrogates, re-encodes and writes the JSON lines with rotation.
So decoding, JSON and disk I/O run outside the gateway process and outside its GIL: the loop never
waits for them, and the gateway's own CPU cost stays a few percent (bench/trace_cost.py).

When the writer falls behind (the buffer holds `max_pending` bytes) or has died, records are dropped:
counted in `gateway_trace_records_dropped` and logged (first drop, then at most every 10 s). The money
path never waits on the trace. The pipe holds clear frames in memory only, like the gateway itself;
nothing leaves the writer process unmasked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import anyio
import anyio.abc

from gateway.iso.framing import CupEnvelope
from gateway.trace.format import Direction, EventKind, Leg
from gateway.trace.pipe import DIR_CODE, FRAME, HEAD, LEG_CODE, pack_event, pack_frame

if TYPE_CHECKING:
    from gateway.config import GatewayConfig
    from gateway.metrics import Metrics

log = logging.getLogger("gateway.trace")

FLUSH_INTERVAL: Final = 0.05
_DROP_LOG_INTERVAL: Final = 10.0


@dataclass(frozen=True, slots=True)
class RecorderSettings:
    path: Path
    dialects: Mapping[str, str]  #: leg → dialect
    framings: Mapping[str, str]  #: leg → framing
    source: str = "gateway serve"
    max_bytes: int = 64 * 1024 * 1024
    max_files: int = 8
    max_pending: int = 8 * 1024 * 1024  #: bytes waiting for the writer before records are dropped
    lenient: bool = False

    def to_json(self) -> str:
        return json.dumps({"path": str(self.path), "dialects": dict(self.dialects), "framings": dict(self.framings),
                           "source": self.source, "max_bytes": self.max_bytes, "max_files": self.max_files,
                           "lenient": self.lenient})


class Recorder:
    """Implements `gateway.trace.tap.Tap`. `start()` before the first frame, `close()` at the end."""

    def __init__(self, settings: RecorderSettings, on_drop: Callable[[int], None] | None = None) -> None:
        self.settings = settings
        self._on_drop = on_drop
        self._lock = threading.Lock()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._labels: dict[object, int] = {}
        self._next_label = [0, 0]
        self.dropped = 0
        self.written = 0
        self._frames = 0  #: frames put in the buffer: the writer numbers them the same way
        self._last_drop_log = 0.0
        self._broken = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process: subprocess.Popen[bytes] | None = None

    # --- life cycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "gateway.trace.writer_process", self.settings.to_json()],
            # a session of its own: a signal to the gateway's process group (Ctrl-C, `kill %job`) is
            # the gateway's to handle; the writer ends when the gateway closes the pipe
            stdin=subprocess.PIPE, close_fds=True, start_new_session=True)
        self._thread = threading.Thread(target=self._run, name="trace-writer", daemon=True)
        self._thread.start()
        log.info("recording a trace to %s (writer process %s)", self.settings.path, self._process.pid)

    def close(self, timeout: float = 10.0) -> None:
        """Flush what is buffered, let the writer process finish the file, and wait for it (blocking:
        call it from a worker thread in async code)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        process = self._process
        if process is not None:
            if process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.error("trace writer process %s did not finish in %.0fs: killing it", process.pid, timeout)
                process.kill()
                process.wait()
                if self._thread is not None:
                    # a write blocked on the stuck process fails now: let the thread count those
                    # records as dropped before the count is reported
                    self._thread.join(timeout)
        if self.dropped:
            log.warning("trace %s: %d records dropped", self.settings.path, self.dropped)

    # --- the tap (event loop side: cheap, never blocks) --------------------------------------------

    def _label(self, leg: Leg, conn: object) -> int:
        label = self._labels.get(conn)
        if label is None:
            code = LEG_CODE[leg]
            self._next_label[code] += 1
            label = self._labels[conn] = self._next_label[code]
        return label

    def _put(self, record: bytes, frame: bool = False) -> int | None:
        """Buffer a record; for a frame, its number in the writer's stream (None: dropped)."""
        if self._stop.is_set():  # closing: the gateway is stopping, nothing more is written
            return None
        with self._lock:
            if self._pending_bytes + len(record) > self.settings.max_pending or self._broken:
                self._dropped_one()
                return None
            self._pending.append(record)
            self._pending_bytes += len(record)
            if frame:
                self._frames += 1
                return self._frames
        return None

    def _dropped_one(self) -> None:
        self.dropped += 1
        if self._on_drop is not None:
            self._on_drop(1)
        now = time.monotonic()
        if now - self._last_drop_log >= _DROP_LOG_INTERVAL:
            self._last_drop_log = now
            log.warning("trace recorder is behind (or its writer died): %d records dropped so far", self.dropped)

    def opened(self, leg: Leg, conn: object, peer: str) -> None:
        self._put(pack_event(time.time(), LEG_CODE[leg], self._label(leg, conn), EventKind.CONNECT, peer))

    def closed(self, leg: Leg, conn: object, detail: str = "") -> None:
        label = self._labels.pop(conn, None)
        if label is None:
            label = self._label(leg, conn)
            del self._labels[conn]
        self._put(pack_event(time.time(), LEG_CODE[leg], label, EventKind.CLOSE, detail))

    def frame(self, leg: Leg, direction: Direction, conn: object, body: bytes,
              envelope: CupEnvelope | None = None, cause: int | None = None) -> int | None:
        if cause is not None:
            return self._put(pack_frame(time.time(), LEG_CODE[leg], DIR_CODE[direction], self._label(leg, conn),
                                        body, envelope, cause), frame=True)
        env = b"" if envelope is None else envelope.tpdu + envelope.header
        return self._put(HEAD.pack(FRAME, time.time(), LEG_CODE[leg], DIR_CODE[direction], self._label(leg, conn),
                                   len(env), len(body)) + env + body, frame=True)

    def event(self, leg: Leg, conn: object, kind: EventKind, detail: str = "") -> None:
        self._put(pack_event(time.time(), LEG_CODE[leg], self._label(leg, conn), kind, detail))

    # --- the writer thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(FLUSH_INTERVAL)
            with self._lock:
                batch, self._pending = self._pending, []
                self._pending_bytes = 0
            if batch:
                self._write(b"".join(batch), len(batch))
            if stopping:
                return

    def _write(self, data: bytes, count: int) -> None:
        process = self._process
        if process is None or process.stdin is None:
            return
        if self._broken:
            # buffered before the writer was found dead (while this thread was blocked writing the
            # batch that failed): they cannot be written now, so they count as dropped like the rest
            with self._lock:
                for _ in range(count):
                    self._dropped_one()
            return
        try:
            fd = process.stdin.fileno()
            view = memoryview(data)
            while view:
                n = os.write(fd, view)  # releases the GIL; blocks only this thread when the pipe is full
                view = view[n:]
            self.written += count
        except OSError as exc:
            self._broken = True
            with self._lock:
                for _ in range(count):
                    self._dropped_one()
            log.error("trace writer process is gone (%s): recording stops, records are dropped", exc)


async def open_recorder(config: GatewayConfig, metrics: Metrics, tg: anyio.abc.TaskGroup) -> Recorder | None:
    """The recorder `[trace]` asks for (None when `path` is unset), started, and closed when `tg` is
    cancelled (the gateway stops): its last records are flushed and the writer process finishes."""
    trace = config.trace
    if trace.path is None:
        return None
    settings = RecorderSettings(
        path=trace.path,
        dialects={Leg.TERMINAL.value: config.terminal_side.dialect, Leg.HOST.value: config.host.dialect},
        framings={Leg.TERMINAL.value: config.terminal_side.framing, Leg.HOST.value: config.host.framing},
        max_bytes=trace.max_bytes, max_files=trace.max_files, max_pending=trace.max_pending)
    counter = metrics.trace_dropped
    recorder = Recorder(settings, on_drop=lambda n: counter.inc(n))
    await anyio.to_thread.run_sync(recorder.start)
    tg.start_soon(_close_at_exit, recorder)
    return recorder


async def _close_at_exit(recorder: Recorder) -> None:
    try:
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(recorder.close)
