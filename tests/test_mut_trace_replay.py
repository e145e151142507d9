"""Promises of `gateway trace replay` that mutation testing found unchecked (issue 16). A malformed
trace is refused before anything listens or waits for the SUT: the run used to sit out the whole
--ready-timeout (30 s) before it read the bad line, then end in an exception group."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from gateway.sim.keyfile import read_test_keys
from gateway.trace.pace import Pace
from gateway.trace.replay import ReplayError, ReplayOptions, replay, template_header
from gateway.trace.report import CaseSink
from gateway.trace.rulesfile import load_rules
from tests.trace_support import endpoint, free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "replay"


def malformed(tmp: Path, bad_line: str = '{"kind":"frame", broken\n') -> Path:
    lines = (EXAMPLE / "session.jsonl").read_text().splitlines(keepends=True)
    path = tmp / "bad.jsonl"
    path.write_text("".join(lines[:-3]) + bad_line + "".join(lines[-3:]))  # near the end, after many good lines
    return path


@pytest.mark.anyio
async def test_a_malformed_trace_is_refused_before_the_trace_host_listens(tmp_path: Path) -> None:
    trace = malformed(tmp_path)
    port = free_port()
    options = ReplayOptions(target=endpoint(free_port()), host_listen=endpoint(port),
                            keys=read_test_keys(EXAMPLE / "lab-keys.toml"), rules=load_rules(None, trace=trace),
                            pace=Pace.parse("asap"), ready_timeout=30.0, progress=0)
    sink = CaseSink("replay")
    started = anyio.current_time()
    with anyio.fail_after(10), pytest.raises(ReplayError, match=r"bad\.jsonl: not a valid trace: line \d+"):
        await replay(trace, options, sink)
    assert anyio.current_time() - started < 5  # not the ready timeout
    with socket.socket() as s:  # nothing was left listening on the trace host's port
        s.bind(("127.0.0.1", port))
    assert sink.failed == 0 and sink.passed == 0


def test_the_command_says_which_line_and_exits_2(tmp_path: Path) -> None:
    trace = malformed(tmp_path, '{"kind":"frame","seq":3,"t":"soon"}\n')
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "trace", "replay", str(trace), "--target",
                           f"127.0.0.1:{free_port()}", "--host-listen", f"127.0.0.1:{free_port()}", "--keys",
                           str(EXAMPLE / "lab-keys.toml")], capture_output=True, text=True, timeout=25, cwd=ROOT)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "not a valid trace: line" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert "waiting for the SUT" not in done.stderr


@pytest.mark.anyio
async def test_a_trace_of_another_terminal_dialect_is_refused_before_anything_listens(tmp_path: Path) -> None:
    lines = (EXAMPLE / "session.jsonl").read_text().splitlines(keepends=True)
    header = json.loads(lines[0])
    header["dialects"]["terminal"] = "iso87-ascii"
    trace = tmp_path / "other.jsonl"
    trace.write_text(json.dumps(header) + "\n" + "".join(lines[1:]))
    port = free_port()
    options = ReplayOptions(target=endpoint(free_port()), host_listen=endpoint(port),
                            keys=read_test_keys(EXAMPLE / "lab-keys.toml"), rules=load_rules(None),
                            pace=Pace.parse("asap"), ready_timeout=30.0, progress=0)
    sink = CaseSink("replay")
    with anyio.fail_after(10), pytest.raises(ReplayError, match=r"CUP POS terminal dialect only .*iso87-ascii"):
        await replay(trace, options, sink)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    assert sink.total == 0


def test_a_replay_without_a_trace_assumes_the_gateways_two_dialects() -> None:
    header = template_header()
    assert header.dialects == {"terminal": "cup-pos", "host": "iso87-ascii"}
    assert header.framings == {"terminal": "cup", "host": "len2"}
