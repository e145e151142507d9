"""`gateway init DIR`: the files it writes, and the commands it prints run as a newcomer would run them
(real processes on loopback: host simulator, gateway, terminal simulator, load tool)."""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from ports import free_port

from gateway.config import load_config
from gateway.initdir import init_lab
from gateway.security.des import DesKey
from gateway.security.keys import KeyUsage
from gateway.security.keystore import KeyStore, read_lmk_file
from gateway.sim.keyfile import KeyFileError, read_test_keys

GATEWAY = str(Path(sys.executable).with_name("gateway"))


def test_init_writes_a_loopback_lab_whose_keys_agree(tmp_path: Path) -> None:
    files = init_lab(tmp_path / "lab", terminals=3)
    config = load_config(files.config, environ={})
    for endpoint in (config.terminal_side.listen, config.host.address, config.admin.listen):
        assert endpoint is not None and ipaddress.ip_address(endpoint.host).is_loopback
    assert [t.terminal_id for t in config.terminals] == ["10000001", "10000002", "10000003"]
    assert config.security.keystore == files.keystore and config.store.path == files.journal

    for secret in (files.lmk, files.keystore, files.test_keys):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    assert stat.S_IMODE(files.directory.stat().st_mode) == 0o700
    assert (files.directory / ".gitignore").read_text().splitlines()[-1] == "*"

    text = files.test_keys.read_text()
    header = text.split("\n\n")[0]
    assert "TEST KEYS" in header and "simulators only" in header and "never use them for real cards" in header
    doc = tomllib.loads(text)
    assert set(doc) == {"zmk", "terminals"} and len(doc["zmk"]) == 32
    assert [set(t) for t in doc["terminals"]] == [{"terminal_id", "merchant_id", "tmk"}] * 3

    # the gateway's encrypted copies are the simulators' clear ones: same check values
    keys = read_test_keys(files.test_keys)
    store = KeyStore.open(files.keystore, read_lmk_file(files.lmk))
    assert store.get(KeyUsage.ZMK, "").kcv == DesKey(keys.zmk).kcv
    for lab_terminal, entry in zip(keys.terminals, config.terminals, strict=True):
        assert (lab_terminal.terminal_id, lab_terminal.merchant_id) == (entry.terminal_id, entry.merchant_id)
        assert store.get(KeyUsage.TMK, entry.terminal_id).kcv == DesKey(lab_terminal.tmk).kcv
        assert entry.tmk is None  # no clear key in the gateway's config
    assert keys.zmk.hex().upper() not in files.config.read_text()
    assert "tmk=<hidden>" in repr(keys.terminals[0]) and keys.zmk.hex() not in repr(keys).lower()


def test_init_never_overwrites(tmp_path: Path) -> None:
    init_lab(tmp_path / "lab", terminals=1)
    before = (tmp_path / "lab" / "lmk").read_text()
    with pytest.raises(FileExistsError, match="not empty"):
        init_lab(tmp_path / "lab", terminals=1)
    assert (tmp_path / "lab" / "lmk").read_text() == before
    code = subprocess.run([GATEWAY, "init", str(tmp_path / "lab")], capture_output=True, text=True)
    assert code.returncode == 1 and "not empty" in code.stderr


def test_a_bad_test_keys_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "k.toml"
    bad.write_text('zmk = "00"\n')
    with pytest.raises(KeyFileError, match=r"k\.toml: zmk"):
        read_test_keys(bad)
    bad.write_text('zmk = "0123456789ABCDEFFEDCBA9876543210"\n[[terminals]]\nterminal_id = "1"\n')
    with pytest.raises(KeyFileError, match=r"terminals\[0\]\.terminal_id"):
        read_test_keys(bad)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:  # only what this test started, by its own handle
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _argv(line: str) -> list[str]:
    argv = shlex.split(line)
    assert argv[0] == "gateway"
    return [GATEWAY, *argv[1:]]


def test_the_printed_commands_run_a_lab(tmp_path: Path, processes: list[subprocess.Popen[str]]) -> None:
    ports = [free_port(), free_port(), free_port()]
    init = subprocess.run(
        [GATEWAY, "init", "lab", "--terminals", "4", "--program", "gateway", "--terminal-port", str(ports[0]),
         "--host-port", str(ports[1]), "--admin-port", str(ports[2])],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    commands = [line.strip() for line in init.stdout.splitlines() if line.startswith("  gateway ")]
    host, serve, terminal, load, journal, saf = commands
    assert re.match(r"gateway sim-host --keys lab/test-keys.toml --listen 127\.0\.0\.1:\d+$", host)
    assert serve == "gateway serve --config lab/gateway.toml"

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    logs = []
    for name, line in (("host", host), ("gateway", serve)):
        log = tmp_path / f"{name}.log"
        logs.append(log)
        with log.open("w") as out:  # the child keeps its own copy of the descriptor
            processes.append(subprocess.Popen(_argv(line), cwd=tmp_path, env=env, stdout=out,
                                              stderr=subprocess.STDOUT, text=True))
    ready = subprocess.run([GATEWAY, "health", "--config", "lab/gateway.toml", "--ready", "--wait", "60"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=90)
    assert ready.returncode == 0, ready.stderr + "".join(log.read_text() for log in logs)

    run = subprocess.run([*_argv(terminal), "--count", "2"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("signed in 10000001 batch ")
    assert run.stdout.count(" rc 00 ") == 2

    # the load tool drives the four registered terminals (not the unregistered LT... of its default)
    small = _argv(load.replace("--rate 100 --duration 10", "--rate 50 --count 40"))
    loaded = subprocess.run(small, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert "40 requests" in loaded.stdout and "errors 0" in loaded.stdout

    shown = subprocess.run([*_argv(journal), "--limit", "100", "--json"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    import json

    records = json.loads(shown.stdout)
    assert len(records) == 42 and {r["rc"] for r in records} == {"00"}
    assert {r["terminal_id"] for r in records} == {"10000001", "10000002", "10000003", "10000004"}
    queued = subprocess.run(_argv(saf), cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert queued.returncode == 0 and queued.stdout.strip() == "(none)"
