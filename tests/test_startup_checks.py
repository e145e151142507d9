"""`gateway serve` as a real process refuses to start, with one line that says what to do, when the
keys its configuration needs are missing: no ZMK while host key exchange is on, or no key store at
the configured path. It must not say "gateway up" and then fail every sign-on."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from gateway.security.des import generate_key

REPO = Path(__file__).resolve().parents[1]
#: a refusal comes within a second or two; a gateway that came up instead is stopped after this
RUN_LIMIT = 20.0


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return env


def _gateway(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=cwd, env=_env(), text=True,
                          capture_output=True, timeout=60, check=False)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(tmp: Path, keystore: Path) -> Path:
    path = tmp / "gateway.toml"
    path.write_text(f"""
[terminal_side]
listen = "127.0.0.1:0"
[host]
address = "127.0.0.1:{_closed_port()}"
key_exchange = true
[security]
keystore = "{keystore}"
lmk_file = "{tmp / 'lmk'}"
[store]
path = "{tmp / 'journal.db'}"
pan_hash_key_hex = "{'11' * 32}"
[admin]
listen = ""
[[terminals]]
terminal_id = "10000001"
merchant_id = "898100012340001"
""")
    return path


def _serve(config: Path, cwd: Path) -> tuple[int | None, list[str], float]:
    """Run `gateway serve` until it exits (or RUN_LIMIT, then SIGTERM to its pid): exit status (None when
    it had to be stopped), its output lines, seconds it ran."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)], cwd=cwd,
                            env=_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=RUN_LIMIT)
        status: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        status = None
    return status, [line for line in out.splitlines() if line.strip()], time.monotonic() - started


def test_no_zmk_with_key_exchange_on_refuses_to_start_with_the_import_command(tmp_path: Path) -> None:
    store = tmp_path / "keys.bin"
    made = _gateway("keys", "init", "--store", str(store), "--lmk-file", str(tmp_path / "lmk"), "--generate-lmk",
                    cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    config = _config(tmp_path, store)
    status, lines, seconds = _serve(config, tmp_path)
    assert status == 1, f"not refused (ran {seconds:.1f}s): {lines[-5:]}"
    assert not any("gateway up" in line for line in lines)
    refusal = [line for line in lines if line.startswith("gateway: cannot start")]
    assert len(refusal) == 1 and "no ZMK" in refusal[0], lines
    assert f"gateway keys zmk-import --store {store} --lmk-file {tmp_path / 'lmk'}" in refusal[0]
    assert not any("Traceback" in line for line in lines)

    # with the ZMK imported as the line says, the same configuration starts
    components = (generate_key(16).hex(), generate_key(16).hex())
    imported = _gateway("keys", "zmk-import", "--store", str(store), "--lmk-file", str(tmp_path / "lmk"),
                        "--component", components[0], "--component", components[1], cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    status, lines, _ = _serve_until_up(config, tmp_path)
    assert any("gateway up" in line for line in lines), lines


def _serve_until_up(config: Path, cwd: Path) -> tuple[int | None, list[str], float]:
    """Start `gateway serve`, wait for "gateway up" (bounded), then SIGTERM it by pid."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)], cwd=cwd,
                            env=_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []
    assert proc.stdout is not None
    try:
        while time.monotonic() - started < RUN_LIMIT:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip())
            if "gateway up" in line:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rest, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            rest, _ = proc.communicate()
    lines += [line for line in rest.splitlines() if line.strip()]
    return proc.returncode, lines, time.monotonic() - started


def test_a_missing_key_store_says_so(tmp_path: Path) -> None:
    (tmp_path / "lmk").write_text("ab" * 32)
    os.chmod(tmp_path / "lmk", 0o600)
    for store in (tmp_path / "keys.bin", tmp_path / "no-such-dir" / "keys.bin"):
        status, lines, seconds = _serve(_config(tmp_path, store), tmp_path)
        assert status == 1, f"not refused (ran {seconds:.1f}s): {lines[-5:]}"
        assert lines == [f"gateway: cannot start: KeyStoreError: key store {store} does not exist: "
                         f"create it with `gateway keys init --store {store}`"], lines
        assert not store.exists()  # and nothing was made up in its place
