"""The trace recorder's own promises, in process (mutation testing, issue 16): connection labels,
frame numbers and causal links, the bounded buffer that drops (counted, logged) instead of waiting,
a dead or stuck writer process, the settings the writer process gets, and the rotating trace file
(bounded disk, every part a trace with its own header). The recordings are read back from disk and
scanned for the clear card data they were fed: a trace never holds a clear PAN, track or PIN block.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import pytest

from gateway.config import load_config
from gateway.iso.build import TerminalIdent, cup
from gateway.iso.codec import Codec
from gateway.iso.framing import CupEnvelope
from gateway.iso.message import Message
from gateway.iso.spec import load_dialect
from gateway.lab import CARD_CUP, MERCHANT_ID
from gateway.metrics import Metrics
from gateway.trace.format import (
    Direction,
    EventKind,
    EventRecord,
    FrameRecord,
    Leg,
    Record,
    SecretKind,
    TraceHeader,
    read_trace,
    write_records,
)
from gateway.trace.pipe import HEAD, pack_event
from gateway.trace.recorder import Recorder, RecorderSettings, open_recorder
from gateway.trace.tracefile import RotatingTraceWriter, rotated, shift_parts

CUP = Codec(load_dialect("cup-pos"))
ISO87 = Codec(load_dialect("iso87-ascii"))
IDENT = TerminalIdent("10000001", MERCHANT_ID)
ENV = CupEnvelope.from_hex("6000010000", "603100310000")
PIN_BLOCK = "0123456789ABCDEF"


def _purchase(stan: str = "000001") -> bytes:
    """A terminal's purchase request carrying a PAN, track 2 and a PIN block."""
    msg = cup.purchase(IDENT, stan, "000001", 1_000, track2=CARD_CUP.track2)
    return CUP.encode(msg.with_fields(field_52=PIN_BLOCK, field_2=CARD_CUP.pan))


def _upstream(stan: str) -> bytes:
    """The host-leg request the gateway sends for it (ISO 8583:1987, '=' in the track)."""
    return ISO87.encode(Message("0200", {"2": CARD_CUP.pan, "3": "000000", "4": "000000001000", "11": stan,
                                         "35": CARD_CUP.track2.replace("D", "="), "52": PIN_BLOCK}))


def _settings(path: Path, **kw: object) -> RecorderSettings:
    return RecorderSettings(path, {"terminal": "cup-pos"}, {"terminal": "cup"}, **kw)  # type: ignore[arg-type]


def _records(path: Path) -> tuple[TraceHeader, list[Record]]:
    header, records = read_trace(path)
    return header, list(records)


def _assert_no_clear_card_data(path: Path) -> None:
    text = path.read_text(encoding="utf-8").upper()
    clear = {CARD_CUP.pan, CARD_CUP.pan[6:-4], CARD_CUP.track2, CARD_CUP.track2.replace("D", "="), PIN_BLOCK}
    clear |= {s.encode().hex().upper() for s in set(clear)}
    assert not [s[:4] for s in clear if s.upper() in text]


# --- the recorder, through its writer process, read back from disk ----------------------------------


def test_connections_are_named_per_leg_by_first_sight_and_anew_after_a_close(tmp_path: Path) -> None:
    path = tmp_path / "labels.jsonl"
    recorder = Recorder(RecorderSettings(path, {"terminal": "cup-pos", "host": "iso87-ascii"},
                                         {"terminal": "cup", "host": "len2"}))
    recorder.start()
    a, b, h = object(), object(), object()
    recorder.opened(Leg.TERMINAL, a, "127.0.0.1:1001")
    recorder.opened(Leg.TERMINAL, b, "127.0.0.1:1002")
    recorder.opened(Leg.HOST, h, "127.0.0.1:2001")
    recorder.event(Leg.TERMINAL, b, EventKind.TIMEOUT, "host did not answer")
    recorder.event(Leg.HOST, h, EventKind.UNDECODABLE)  # no detail given: none recorded
    recorder.closed(Leg.TERMINAL, a, "peer closed")
    recorder.opened(Leg.TERMINAL, a, "127.0.0.1:1003")  # the same object again: a new connection
    recorder.closed(Leg.HOST, object())  # never seen: named once, for its close
    recorder.closed(Leg.HOST, h)
    recorder.close()
    _header, records = _records(path)
    seen = [(r.leg, r.conn, r.event, r.detail) for r in records if isinstance(r, EventRecord)]
    assert seen == [
        (Leg.TERMINAL, "T1", EventKind.CONNECT, "127.0.0.1:1001"),
        (Leg.TERMINAL, "T2", EventKind.CONNECT, "127.0.0.1:1002"),
        (Leg.HOST, "H1", EventKind.CONNECT, "127.0.0.1:2001"),
        (Leg.TERMINAL, "T2", EventKind.TIMEOUT, "host did not answer"),
        (Leg.HOST, "H1", EventKind.UNDECODABLE, ""),
        (Leg.TERMINAL, "T1", EventKind.CLOSE, "peer closed"),
        (Leg.TERMINAL, "T3", EventKind.CONNECT, "127.0.0.1:1003"),
        (Leg.HOST, "H2", EventKind.CLOSE, ""),
        (Leg.HOST, "H1", EventKind.CLOSE, ""),
    ]
    assert recorder.written == len(seen) and recorder.dropped == 0


def test_frames_are_numbered_and_carry_their_cause_with_no_clear_card_data(tmp_path: Path) -> None:
    path = tmp_path / "frames.jsonl"
    recorder = Recorder(RecorderSettings(path, {"terminal": "cup-pos", "host": "iso87-ascii"},
                                         {"terminal": "cup", "host": "len2"}))
    recorder.start()
    terminal, host = object(), object()
    recorder.opened(Leg.TERMINAL, terminal, "127.0.0.1:1001")  # events are not numbered as frames
    recorder.opened(Leg.HOST, host, "127.0.0.1:2001")  # H1, named before its first frame
    first = recorder.frame(Leg.TERMINAL, Direction.IN, terminal, _purchase("000001"), ENV)
    upstream = recorder.frame(Leg.HOST, Direction.OUT, host, _upstream("000002"), cause=first)
    third = recorder.frame(Leg.TERMINAL, Direction.IN, terminal, _purchase("000003"), ENV)
    assert (first, upstream, third) == (1, 2, 3)
    recorder.close()
    _header, records = _records(path)
    frames = [r for r in records if isinstance(r, FrameRecord)]
    assert [(f.leg, f.dir, f.fields["11"], f.conn) for f in frames] == [
        (Leg.TERMINAL, Direction.IN, "000001", "T1"), (Leg.HOST, Direction.OUT, "000002", "H1"),
        (Leg.TERMINAL, Direction.IN, "000003", "T1")]
    assert [f.cause for f in frames] == [None, frames[0].seq, None]
    assert frames[0].envelope == {"tpdu": "6000010000", "header": "603100310000"}
    assert frames[1].envelope is None and frames[2].envelope == frames[0].envelope
    for f in frames:
        assert f.secrets["2"] is SecretKind.PAN and f.secrets["35"] is SecretKind.TRACK
        assert f.secrets["52"] is SecretKind.PIN
        assert f.fields["2"][:6] == CARD_CUP.pan[:6] and f.fields["2"][-4:] == CARD_CUP.pan[-4:]
    _assert_no_clear_card_data(path)


def test_the_writer_process_gets_every_setting(tmp_path: Path) -> None:
    settings = RecorderSettings(tmp_path / "s.jsonl", {"terminal": "cup-pos"}, {"terminal": "cup"},
                                source="trace proxy", max_bytes=4_000, max_files=3, max_pending=1 << 20, lenient=True)
    assert json.loads(settings.to_json()) == {  # max_pending is the recorder's own, not the writer's
        "path": str(tmp_path / "s.jsonl"), "dialects": {"terminal": "cup-pos"}, "framings": {"terminal": "cup"},
        "source": "trace proxy", "max_bytes": 4_000, "max_files": 3, "lenient": True}
    defaults = RecorderSettings(tmp_path / "d.jsonl", {}, {})
    assert (defaults.source, defaults.max_bytes, defaults.max_files, defaults.max_pending, defaults.lenient) == (
        "gateway serve", 64 * 1024 * 1024, 8, 8 * 1024 * 1024, False)
    # and the writer uses them: source in the header, rotation at max_bytes over max_files parts
    recorder = Recorder(settings)
    recorder.start()
    conn = object()
    for n in range(12):
        recorder.frame(Leg.TERMINAL, Direction.IN, conn, _purchase(f"{n + 1:06d}"), ENV)
    recorder.close()
    parts = sorted(tmp_path.glob("s.jsonl*"))
    assert [p.name for p in parts] == ["s.jsonl", "s.jsonl.1", "s.jsonl.2"]
    for part in parts:
        header, _ = _records(part)
        assert header.source == "trace proxy"
        assert part.stat().st_size <= 4_000 + 2_000
        _assert_no_clear_card_data(part)


# --- the bounded buffer: drops, counted and logged, never a wait ------------------------------------


def test_the_buffer_takes_exactly_max_pending_bytes_then_drops(caplog: pytest.LogCaptureFixture) -> None:
    """No writer is started: the records stay in the buffer, so what fits is exact."""
    event = len(pack_event(0.0, 0, 1, EventKind.CONNECT, "x" * 72))  # bytes of one such record
    drops: list[int] = []
    recorder = Recorder(_settings(Path("unused.jsonl"), max_pending=2 * event), on_drop=drops.append)
    conn = object()
    with caplog.at_level(logging.WARNING, logger="gateway.trace"):
        recorder.opened(Leg.TERMINAL, conn, "x" * 72)
        recorder.opened(Leg.TERMINAL, conn, "x" * 72)
        assert recorder._pending_bytes == 2 * event and recorder.dropped == 0  # full, to the byte
        recorder.opened(Leg.TERMINAL, conn, "")
        assert recorder.frame(Leg.TERMINAL, Direction.IN, conn, b"\x02\x00") is None
        recorder.event(Leg.TERMINAL, conn, EventKind.TIMEOUT)
    assert recorder.dropped == 3 and drops == [1, 1, 1]
    # one warning for the first drop, then quiet for the next 10 s
    warnings = [r.getMessage() for r in caplog.records if r.name == "gateway.trace"]
    assert warnings == ["trace recorder is behind (or its writer died): 1 records dropped so far"]


def test_drops_are_logged_again_after_ten_seconds(caplog: pytest.LogCaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1_000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    recorder = Recorder(_settings(Path("unused.jsonl"), max_pending=0))
    conn = object()
    with caplog.at_level(logging.WARNING, logger="gateway.trace"):
        for step in (0.0, 9.5, 0.5, 5.0):  # drops at 1000, 1009.5, 1010 and 1015
            clock[0] += step
            recorder.opened(Leg.TERMINAL, conn, "")
    counts = [r.getMessage().split(": ")[1] for r in caplog.records if r.name == "gateway.trace"]
    assert counts == ["1 records dropped so far", "3 records dropped so far"]


def test_frames_are_numbered_only_when_buffered() -> None:
    """A frame takes its header and its bytes of the buffer, no more (plus the envelope where there is
    one): one that fills it exactly is still taken."""
    body = b"\x08\x00" + bytes(20)
    recorder = Recorder(_settings(Path("unused.jsonl"), max_pending=HEAD.size + len(body)))
    conn = object()
    assert recorder.frame(Leg.TERMINAL, Direction.IN, conn, body) == 1
    assert recorder.frame(Leg.TERMINAL, Direction.IN, conn, b"\x08\x00") is None  # full: dropped
    recorder._pending, recorder._pending_bytes = [], 0  # what the writer thread does with a batch
    assert recorder.frame(Leg.TERMINAL, Direction.IN, conn, b"\x08\x00", cause=1) == 2
    assert recorder.dropped == 1


def test_nothing_is_buffered_or_counted_once_closing(tmp_path: Path) -> None:
    path = tmp_path / "closing.jsonl"
    recorder = Recorder(_settings(path))
    recorder.start()
    conn = object()
    recorder.opened(Leg.TERMINAL, conn, "127.0.0.1:1")
    recorder.close(timeout=5.0)
    # the writer thread and process are done: close() did not just give up waiting for them
    assert recorder._thread is not None and not recorder._thread.is_alive()
    assert recorder._process is not None and recorder._process.returncode == 0
    assert recorder.frame(Leg.TERMINAL, Direction.IN, conn, _purchase()) is None
    recorder.closed(Leg.TERMINAL, conn)
    assert recorder.dropped == 0 and recorder._pending == []
    _header, records = _records(path)
    assert [type(r) for r in records] == [EventRecord]


def test_a_dead_writer_drops_every_record_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    drops: list[int] = []
    recorder = Recorder(_settings(tmp_path / "dead.jsonl"), on_drop=drops.append)
    recorder.start()
    assert recorder._process is not None
    recorder._process.kill()
    recorder._process.wait()
    conn = object()
    with caplog.at_level(logging.WARNING, logger="gateway.trace"):
        recorder.opened(Leg.TERMINAL, conn, "127.0.0.1:1")
        recorder.opened(Leg.TERMINAL, conn, "127.0.0.1:2")
        deadline = time.monotonic() + 10
        while recorder.dropped < 2 and time.monotonic() < deadline:  # the writer thread finds the pipe gone
            time.sleep(0.01)
        assert recorder.dropped == 2 and recorder.written == 0
        # from now on a record is refused at once, no pipe write attempted
        assert recorder.frame(Leg.TERMINAL, Direction.IN, conn, _purchase()) is None
        assert recorder.dropped == 3 and drops == [1, 1, 1]
        recorder.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "gateway.trace"]
    assert any(m.startswith("trace writer process is gone (") for m in messages)
    assert messages[-1] == f"trace {tmp_path / 'dead.jsonl'}: 3 records dropped"


def test_close_kills_a_writer_that_does_not_finish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A writer process that stops reading (stuck on a full disk, say) with the pipe full and the
    writer thread blocked in a write: close() still returns after its timeout, kills the process and
    counts what could not be written as dropped, before it reports the count. The gateway's stop
    never hangs on its trace."""
    real_popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda _args, **kw: real_popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], **kw))
    # a slow drop counter (the metrics callback): the count takes the writer thread a while
    recorder = Recorder(_settings(tmp_path / "stuck.jsonl"), on_drop=lambda _n: time.sleep(0.05))
    recorder.start()
    stuck = recorder._process
    assert stuck is not None
    conn = object()
    for _ in range(5):  # 300 kB: far more than a pipe holds
        recorder.event(Leg.TERMINAL, conn, EventKind.TIMEOUT, "x" * 60_000)
    time.sleep(0.3)  # the writer thread takes the batch and blocks on the full pipe
    closer = threading.Thread(target=recorder.close, kwargs={"timeout": 0.5}, daemon=True)
    with caplog.at_level(logging.WARNING, logger="gateway.trace"):
        closer.start()
        closer.join(15)
        hung = closer.is_alive()
        if hung:  # unblock it, so that the failure below is a failure and not a hang
            stuck.kill()
            closer.join(15)
    assert not hung, "close() waited for a stuck writer"
    assert stuck.returncode is not None and stuck.returncode < 0  # killed, and reaped
    assert recorder._thread is not None and not recorder._thread.is_alive()
    assert recorder.written == 0 and recorder.dropped == 5
    messages = [r.getMessage() for r in caplog.records if r.name == "gateway.trace"]
    assert messages[0] == f"trace writer process {stuck.pid} did not finish in 0s: killing it"
    assert messages[-1] == f"trace {tmp_path / 'stuck.jsonl'}: 5 records dropped"


def test_records_buffered_when_the_writer_dies_are_counted_too(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Records that wait in the buffer while the writer thread is blocked on a stuck writer, which then
    dies: they can no longer be written, so they are dropped, and counted as such. Every record handed
    to the recorder is either written or counted in `dropped` (the gateway's trace_records_dropped)."""
    real_popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda _args, **kw: real_popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], **kw))
    recorder = Recorder(_settings(tmp_path / "dies.jsonl"))
    recorder.start()
    stuck = recorder._process
    assert stuck is not None
    conn = object()
    for _ in range(5):  # 300 kB: the writer thread takes them and blocks on the full pipe
        recorder.event(Leg.TERMINAL, conn, EventKind.TIMEOUT, "x" * 60_000)
    deadline = time.monotonic() + 10
    while recorder._pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not recorder._pending
    for _ in range(3):  # these wait in the buffer behind the blocked write
        recorder.event(Leg.TERMINAL, conn, EventKind.TIMEOUT, "later")
    stuck.kill()  # the writer dies: the blocked write fails
    stuck.wait()
    deadline = time.monotonic() + 10
    while recorder.dropped < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    recorder.close(timeout=5.0)
    assert recorder.written == 0
    assert recorder.dropped == 8


def test_a_recorder_without_a_writer_closes_quietly(caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder(_settings(Path("unused.jsonl")))
    with caplog.at_level(logging.WARNING, logger="gateway.trace"):
        recorder.close()
    assert recorder.dropped == 0 and not caplog.records


def test_the_writer_thread_and_process_hold_nothing_of_the_gateway(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The writer thread is a daemon (a gateway that dies without close() still exits) named in thread
    dumps; the writer process inherits none of the gateway's descriptors (a socket handed over by
    systemd is inheritable, say); the log says where the trace goes."""
    keep_read, keep_write = os.pipe()
    os.set_inheritable(keep_write, True)
    recorder = Recorder(_settings(tmp_path / "hygiene.jsonl"))
    try:
        with caplog.at_level(logging.INFO, logger="gateway.trace"):
            recorder.start()
        assert recorder._process is not None and recorder._thread is not None
        assert recorder._thread.daemon and recorder._thread.name == "trace-writer"
        assert recorder._thread in threading.enumerate()
        held = Path(f"/proc/{recorder._process.pid}/fd")
        if held.is_dir():
            targets = {os.readlink(fd) for fd in held.iterdir() if fd.is_symlink()}
            assert os.readlink(f"/proc/self/fd/{keep_write}") not in targets
        assert [r.getMessage() for r in caplog.records if r.name == "gateway.trace"] == [
            f"recording a trace to {tmp_path / 'hygiene.jsonl'} (writer process {recorder._process.pid})"]
    finally:
        recorder.close()
        os.close(keep_read)
        os.close(keep_write)


def test_the_trace_is_utf8_whatever_the_locale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A gateway started without a UTF-8 locale (systemd with LANG unset on a minimal image): the
    writer still writes its trace as UTF-8, the same bytes as a writer in a UTF-8 process."""
    header = TraceHeader("gateway serve", {"terminal": "cup-pos"}, {"terminal": "cup"}, "2026-01-01T00:00:00+00:00",
                         notes={"site": "收单中心"})
    reference = tmp_path / "reference.jsonl"
    writer = RotatingTraceWriter(reference, header, max_bytes=1 << 20, max_files=2)
    writer.write(_event(1, "交易成功"))
    writer.close()
    assert "交易成功" in reference.read_text(encoding="utf-8")
    # in this process: the default text encoding as a C locale makes it (io.text_encoding decides
    # what a text file opened without an encoding gets)
    text_encoding = io.text_encoding
    monkeypatch.setattr(io, "text_encoding", lambda encoding, *a: "ascii" if encoding is None else
                        text_encoding(encoding, *a))
    here = tmp_path / "ascii-default.jsonl"
    writer = RotatingTraceWriter(here, header, max_bytes=1 << 20, max_files=2)
    writer.write(_event(1, "交易成功"))
    writer.close()
    assert here.read_bytes() == reference.read_bytes()
    monkeypatch.undo()
    # and in a real process under the C locale (no UTF-8 coercion, no UTF-8 mode)
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from gateway.trace.format import EventKind, EventRecord, Leg, TraceHeader\n"
        "from gateway.trace.tracefile import RotatingTraceWriter\n"
        "header = TraceHeader('gateway serve', {'terminal': 'cup-pos'}, {'terminal': 'cup'}, "
        "'2026-01-01T00:00:00+00:00', notes={'site': '\\u6536\\u5355\\u4e2d\\u5fc3'})\n"
        "w = RotatingTraceWriter(Path(sys.argv[1]), header, max_bytes=1 << 20, max_files=2)\n"
        "w.write(EventRecord(1, 2.0, Leg.TERMINAL, 'T1', EventKind.CONNECT, '\\u4ea4\\u6613\\u6210\\u529f'))\n"
        "w.close()\n"
    )
    out = tmp_path / "c-locale.jsonl"
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0",
           "PYTHONIOENCODING": "ascii"}
    done = subprocess.run([sys.executable, "-c", script, str(out)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.read_bytes() == reference.read_bytes()


# --- open_recorder: what `gateway serve` starts from [trace] ------------------------------------------


@pytest.mark.anyio
async def test_open_recorder_follows_the_config_and_closes_with_the_gateway(tmp_path: Path) -> None:
    metrics = Metrics(process_metrics=False)
    async with anyio.create_task_group() as tg:
        assert await open_recorder(load_config(None, {}), metrics, tg) is None  # no [trace] path: off
    path = tmp_path / "serve.jsonl"
    config = load_config(None, {"GATEWAY_TRACE__PATH": str(path), "GATEWAY_TRACE__MAX_BYTES": "5000",
                                "GATEWAY_TRACE__MAX_FILES": "2", "GATEWAY_TRACE__MAX_PENDING": "150"})
    recorder: Recorder | None = None
    async with anyio.create_task_group() as tg:
        recorder = await open_recorder(config, metrics, tg)
        assert recorder is not None
        assert recorder.settings == RecorderSettings(
            path, {"terminal": config.terminal_side.dialect, "host": config.host.dialect},
            {"terminal": config.terminal_side.framing, "host": config.host.framing},
            max_bytes=5000, max_files=2, max_pending=150)
        conn = object()
        recorder.opened(Leg.TERMINAL, conn, "127.0.0.1:1")
        recorder.opened(Leg.TERMINAL, conn, "x" * 200)  # more than max_pending: dropped, and counted
        await anyio.sleep(0.1)  # the gateway runs a while, then stops
        tg.cancel_scope.cancel()
    assert recorder is not None and recorder.dropped == 1
    assert metrics.registry.get_sample_value("gateway_trace_records_dropped_total") == 1.0
    assert recorder._process is not None and recorder._process.returncode == 0  # finished, not killed
    _header, records = _records(path)
    assert [(r.conn, r.event) for r in records if isinstance(r, EventRecord)] == [("T1", EventKind.CONNECT)]


# --- the trace file: rotation by size, bounded disk, every part a trace -------------------------------

HEADER = TraceHeader("test", {"terminal": "cup-pos"}, {"terminal": "cup"}, "2026-01-01T00:00:00+00:00",
                     notes={"origin": "unit"})


def _event(seq: int, detail: str = "") -> EventRecord:
    return EventRecord(seq, 1.0 + seq, Leg.TERMINAL, "T1", EventKind.CONNECT, detail)


def test_parts_are_named_with_a_number_suffix(tmp_path: Path) -> None:
    assert rotated(tmp_path / "t.jsonl", 3) == tmp_path / "t.jsonl.3"


@pytest.mark.parametrize(("max_files", "left"), [
    (1, {}),
    (2, {"t.jsonl.1": "live"}),
    (3, {"t.jsonl.1": "live", "t.jsonl.2": "one"}),
    (4, {"t.jsonl.1": "live", "t.jsonl.2": "one", "t.jsonl.3": "two"}),
])
def test_shifting_parts_keeps_at_most_max_files_minus_one_old_parts(tmp_path: Path, max_files: int,
                                                                     left: dict[str, str]) -> None:
    """A full set of parts (as many as max_files allows, at most three here) shifts by one; the oldest
    goes."""
    base = tmp_path / "t.jsonl"
    for name, text in (("t.jsonl", "live"), ("t.jsonl.1", "one"), ("t.jsonl.2", "two"))[:max_files]:
        (tmp_path / name).write_text(text)
    shift_parts(base, max_files)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == left


def test_shifting_skips_missing_parts(tmp_path: Path) -> None:
    base = tmp_path / "t.jsonl"
    base.write_text("live")
    (tmp_path / "t.jsonl.2").write_text("two")
    shift_parts(base, 4)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"t.jsonl.1": "live", "t.jsonl.3": "two"}
    for max_files in (1, 2, 3):  # nothing there: nothing to do, no error
        shift_parts(tmp_path / "none.jsonl", max_files)
    assert not list(tmp_path.glob("none.jsonl*"))


def test_the_part_pushed_past_max_files_goes_even_after_a_gap(tmp_path: Path) -> None:
    """Every part moves up one place; the one that would land at max_files is deleted, also when the
    part below it is missing (deleted by hand, say)."""
    base = tmp_path / "t.jsonl"
    base.write_text("live")
    (tmp_path / "t.jsonl.2").write_text("two")
    shift_parts(base, 3)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"t.jsonl.1": "live"}


def test_writer_rotates_by_size_and_every_part_starts_with_its_header(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "t.jsonl"  # parent directories are made
    writer = RotatingTraceWriter(path, HEADER, max_bytes=600, max_files=3)
    for seq in range(1, 31):
        writer.write(_event(seq, "d" * 40))
    writer.close()
    assert writer.records == 30
    parts = [rotated(path, 2), rotated(path, 1), path]
    assert sorted(path.parent.iterdir()) == sorted(parts)
    seqs: list[int] = []
    numbers = []
    for part in parts:
        size = part.stat().st_size
        assert size <= 600, size
        lines = part.read_text(encoding="utf-8").splitlines()
        header = json.loads(lines[0])
        assert header["kind"] == "trace" and header["source"] == "test" and header["created"] == HEADER.created
        assert header["dialects"] == HEADER.dialects and header["framings"] == HEADER.framings
        assert header["notes"]["origin"] == "unit"
        numbers.append(header["notes"]["part"])
        seqs += [json.loads(line)["seq"] for line in lines[1:]]
    # the parts left hold the newest records, in order, with no gap and no repeat
    assert seqs == list(range(seqs[0], 31)) and numbers == sorted(numbers) and numbers[-1] == writer.part
    assert numbers[1] - numbers[0] == 1 == numbers[2] - numbers[1] and numbers[0] > 1
    # a part is filled as far as the limit allows: the next record would not have fitted
    line = len(json.dumps(_event(30, "d" * 40).to_json(), separators=(",", ":"))) + 1
    for part in parts[:2]:
        assert part.stat().st_size + line > 600


def test_every_line_is_compact_json_as_write_records_writes_it(tmp_path: Path) -> None:
    """A recorded trace has the same layout as an imported one (format.write_records): one compact JSON
    object a line, header first."""
    path = tmp_path / "t.jsonl"
    writer = RotatingTraceWriter(path, HEADER, max_bytes=1 << 20, max_files=2)
    events = [_event(seq, "peer") for seq in (1, 2)]
    for event in events:
        writer.write(event)
    writer.close()
    expected = io.StringIO()
    write_records(expected, TraceHeader(HEADER.source, HEADER.dialects, HEADER.framings, HEADER.created,
                                        HEADER.version, {**HEADER.notes, "part": 1}), events)
    assert path.read_text(encoding="utf-8") == expected.getvalue()


def test_writer_counts_bytes_not_characters(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    writer = RotatingTraceWriter(path, HEADER, max_bytes=700, max_files=5)
    for seq in range(1, 9):
        writer.write(_event(seq, "交" * 40))  # 3 bytes each in UTF-8
    writer.close()
    for part in [path, *path.parent.glob("t.jsonl.*")]:
        assert part.stat().st_size <= 700
        assert "交" * 40 in part.read_text(encoding="utf-8")  # written as text, not \\u escapes


def test_a_record_bigger_than_max_bytes_still_gets_written(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    writer = RotatingTraceWriter(path, HEADER, max_bytes=100, max_files=2)
    writer.write(_event(1, "x" * 300))  # alone in its part: rotating first would leave a part with no record
    writer.write(_event(2, "y" * 300))
    writer.close()
    assert writer.records == 2 and writer.part == 2
    for part, seq in ((rotated(path, 1), 1), (path, 2)):
        lines = part.read_text().splitlines()
        assert len(lines) == 2 and json.loads(lines[1])["seq"] == seq


def test_an_earlier_recording_is_rotated_away_first(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("an earlier recording\n")
    writer = RotatingTraceWriter(path, HEADER, max_bytes=10_000, max_files=2)
    writer.write(_event(1))
    writer.flush()
    assert rotated(path, 1).read_text() == "an earlier recording\n"
    lines = path.read_text().splitlines()  # flushed: readable while the writer is still open
    assert json.loads(lines[0])["notes"]["part"] == 1 and json.loads(lines[1])["seq"] == 1
    writer.close()
    writer.close()  # twice is fine
    writer.flush()


def test_max_files_must_be_at_least_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_files must be at least 1"):
        RotatingTraceWriter(tmp_path / "t.jsonl", HEADER, max_bytes=100, max_files=0)
    writer = RotatingTraceWriter(tmp_path / "t.jsonl", HEADER, max_bytes=200, max_files=1)
    for seq in range(1, 6):
        writer.write(_event(seq, "z" * 60))
    writer.close()
    assert [p.name for p in tmp_path.iterdir()] == ["t.jsonl"]  # one file only: the live one


def test_a_signal_meant_for_the_gateway_does_not_end_the_writer_before_the_drain(tmp_path: Path) -> None:
    """SIGTERM / SIGINT to the gateway's whole process group (systemd's stop, `kill %job`, Ctrl-C) reached
    the writer too, which died before the gateway wrote the records of its drain ("1 records dropped" at
    every `kill %2` of the README's recording walk). The writer ignores both and ends at EOF."""
    path = tmp_path / "signalled.jsonl"
    recorder = Recorder(_settings(path))
    recorder.start()
    assert recorder._process is not None
    conn = object()
    recorder.opened(Leg.TERMINAL, conn, "127.0.0.1:1")
    deadline = time.monotonic() + 20
    # the writer is up (its signal handling in place) once the first record is in the file
    while not (path.exists() and '"connect"' in path.read_text()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert '"connect"' in path.read_text()
    assert os.getpgid(recorder._process.pid) != os.getpgid(0)  # not in the gateway's process group
    for signum in (signal.SIGTERM, signal.SIGINT):
        os.kill(recorder._process.pid, signum)
    time.sleep(0.2)
    assert recorder._process.poll() is None  # still running
    recorder.frame(Leg.TERMINAL, Direction.IN, conn, _purchase())
    recorder.closed(Leg.TERMINAL, conn, "the terminal closed")
    recorder.close()
    assert recorder.dropped == 0 and recorder._process.returncode == 0
    kinds = [getattr(r, "event", "frame") for r in read_trace(path)[1]]
    # every record after the signals reached the file (the frame without its envelope is recorded as
    # undecodable: what matters here is that it is there)
    assert len(kinds) == 3 and (kinds[0], kinds[-1]) == (EventKind.CONNECT, EventKind.CLOSE), kinds
