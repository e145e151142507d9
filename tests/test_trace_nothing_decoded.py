"""A conformance run over a trace in which no frame decodes (the wrong dialect or framing at import)
or that holds no frame at all compared nothing, and must not report a pass: `trace check` and
`trace diff` fail it with a decode finding that says why, `trace replay` refuses it (exit 2) before
anything listens. A trace with good frames next to a stray undecodable line still compares."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.trace.format import FrameTally, read_trace
from tests.trace_support import free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "replay"


def gateway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", "trace", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


@pytest.fixture
def undecodable(tmp_path: Path) -> Path:
    """A hex dump imported with the wrong framing: every line becomes an `undecodable` event."""
    dump = tmp_path / "frames.txt"
    dump.write_text("zz not hex\n0011223344\n")
    out = tmp_path / "undecodable.jsonl"
    done = gateway("import", "--format", "hex", "--dialect", "cup-pos", "--framing", "cup", str(dump), "-o", str(out))
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture
def header_only(tmp_path: Path) -> Path:
    path = tmp_path / "empty.jsonl"
    path.write_text((EXAMPLE / "session.jsonl").read_text().splitlines(keepends=True)[0])
    return path


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return Path(shutil.copy(EXAMPLE / "session.jsonl", tmp_path / "good.jsonl"))


def test_the_tally_says_why_a_trace_stands_for_nothing(undecodable: Path, header_only: Path, good: Path) -> None:
    reasons = {}
    for path in (undecodable, header_only, good):
        tally = FrameTally()
        for _ in tally.count(read_trace(path)[1]):
            pass
        reasons[path.stem] = tally.nothing_to_compare()
    assert reasons["undecodable"] is not None and reasons["undecodable"].startswith(
        "no frame of the trace decodes (2 undecodable, the last: in: MTI")
    assert reasons["empty"] == "the trace holds no frames"
    assert reasons["good"] is None


def test_check_fails_a_trace_without_frames(header_only: Path) -> None:
    done = gateway("check", str(header_only))
    assert done.returncode == 1 and "FAIL" in done.stdout and "the trace holds no frames" in done.stdout, done.stdout


@pytest.mark.parametrize("pair", ["both", "a", "b"])
def test_diff_fails_when_a_side_decodes_nothing(pair: str, undecodable: Path, good: Path) -> None:
    a, b = {"both": (undecodable, undecodable), "a": (undecodable, good), "b": (good, undecodable)}[pair]
    done = gateway("diff", str(a), str(b))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "trace diff: FAIL" in done.stdout
    for side, path in (("A", a), ("B", b)):
        # the failing decode case names exactly the side(s) that decoded nothing
        assert (f"FAIL decode: {side} ({path.name})" in done.stdout) is (path == undecodable), done.stdout
    assert "no frame of the trace decodes (2 undecodable" in done.stdout


def test_diff_of_two_empty_traces_is_not_a_pass(header_only: Path) -> None:
    done = gateway("diff", str(header_only), str(header_only))
    assert done.returncode == 1 and "the trace holds no frames" in done.stdout, done.stdout


def test_diff_of_a_good_trace_with_itself_still_passes(good: Path) -> None:
    done = gateway("diff", str(good), str(good))
    assert done.returncode == 0 and "trace diff: PASS" in done.stdout and "decode:" not in done.stdout, done.stdout


@pytest.mark.parametrize("which", ["undecodable", "header_only"])
def test_replay_refuses_a_trace_that_decodes_nothing(which: str, request: pytest.FixtureRequest) -> None:
    trace: Path = request.getfixturevalue(which)
    done = gateway("replay", str(trace), "--target", f"127.0.0.1:{free_port()}", "--host-listen",
                   f"127.0.0.1:{free_port()}", "--keys", str(EXAMPLE / "lab-keys.toml"), "--ready-timeout", "30")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "nothing to replay" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert "waiting for the SUT" not in done.stderr  # refused before it waited for (or listened for) anything
