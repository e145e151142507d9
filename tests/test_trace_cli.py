"""The README's conformance-run commands, verbatim but for ports and paths: a real `gateway serve`
process with examples/replay/gateway.toml, `gateway trace replay` of the example trace against it
(exit 0, JSON and JUnit written), `gateway trace diff` of the two example recordings (exit 0) and of
an edited one (exit 1, the field named), and a run that cannot start (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from xml.etree import ElementTree as ET

from tests.trace_support import free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "replay"
GATEWAY = [sys.executable, "-m", "gateway.cli"]


def run_cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GATEWAY, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_replay_of_the_example_trace_against_a_served_gateway_passes(tmp_path: Path) -> None:
    terminal_port, host_port = free_port(), free_port()
    env = {**os.environ, "GATEWAY_TERMINAL_SIDE__LISTEN": f"127.0.0.1:{terminal_port}",
           "GATEWAY_HOST__ADDRESS": f"127.0.0.1:{host_port}", "GATEWAY_STORE__PATH": str(tmp_path / "journal.db")}
    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen([*GATEWAY, "serve", "--config", str(EXAMPLE / "gateway.toml")], cwd=ROOT, env=env,
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        done = run_cli("trace", "replay", str(EXAMPLE / "session.jsonl"), "--target", f"127.0.0.1:{terminal_port}",
                       "--host-listen", f"127.0.0.1:{host_port}", "--keys", str(EXAMPLE / "lab-keys.toml"),
                       "--json", str(tmp_path / "replay.json"), "--junit", str(tmp_path / "replay.xml"))
    finally:
        serve.terminate()
        try:
            serve.wait(timeout=15)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait(timeout=5)
        log.close()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "trace replay: PASS — 18 passed, 0 failed" in done.stdout  # 15 recorded + 3 template cases
    report = json.loads((tmp_path / "replay.json").read_text())
    assert report["passed"] is True and len(report["cases"]) == 18
    names = [c["name"] for c in report["cases"]]
    assert "cert 03: refund of cert 02 by its RRN" in names
    suite = ET.parse(tmp_path / "replay.xml").getroot().find("testsuite")
    assert suite is not None and (suite.get("tests"), suite.get("failures")) == ("18", "0")


def test_diff_exit_codes_and_findings(tmp_path: Path) -> None:
    same = run_cli("trace", "diff", str(EXAMPLE / "session.jsonl"), str(EXAMPLE / "session-rerun.jsonl"))
    assert same.returncode == 0, same.stdout + same.stderr
    assert "trace diff: PASS — 15 passed" in same.stdout
    edited = tmp_path / "edited.jsonl"
    lines = (EXAMPLE / "session-rerun.jsonl").read_text().splitlines()
    for i, line in enumerate(lines):
        rec = json.loads(line)
        if rec.get("kind") == "frame" and rec["leg"] == "terminal" and rec["mti"] == "0210" \
                and rec["fields"].get("39") == "51":
            rec["fields"]["39"] = "05"
            lines[i] = json.dumps(rec)
            break
    edited.write_text("\n".join(lines) + "\n")
    changed = run_cli("trace", "diff", str(EXAMPLE / "session.jsonl"), str(edited), "--junit",
                      str(tmp_path / "diff.xml"))
    assert changed.returncode == 1
    assert "field 39: expected '51', got '05' (rule same)" in changed.stdout
    assert "trace diff: FAIL — 14 passed, 1 failed" in changed.stdout


def test_a_run_that_cannot_start_exits_2(tmp_path: Path) -> None:
    bad_keys = tmp_path / "keys.toml"
    bad_keys.write_text('zmk = "not hex"\n')
    started = time.monotonic()
    done = run_cli("trace", "replay", str(EXAMPLE / "session.jsonl"), "--target", "127.0.0.1:9",
                   "--host-listen", "127.0.0.1:0", "--keys", str(bad_keys))
    assert done.returncode == 2
    assert "zmk" in done.stderr and "not hex" not in done.stderr  # names the key, never its value
    nobody = run_cli("trace", "replay", str(EXAMPLE / "session.jsonl"), "--target", "127.0.0.1:9",
                     "--host-listen", "127.0.0.1:0", "--keys", str(EXAMPLE / "lab-keys.toml"), "--ready-timeout", "1")
    assert nobody.returncode == 2
    assert "did not connect to the trace host" in nobody.stderr
    assert time.monotonic() - started < 60
