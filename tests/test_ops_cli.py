"""The operator's small commands: `config check|show`, `health`, `--version`, and decode's field names,
`--text` and `--file` (encode too)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import MASK
from gateway.iso.codec import codec_implementation

GATEWAY = str(Path(sys.executable).with_name("gateway"))
ROOT = Path(__file__).resolve().parents[1]
PURCHASE = (
    "0063600003000060310031073002003020048020C08011000000000000012345000123021000376222021234567890123D3012101"
    "0000000000031303030303030313839383130303031323334303030313135360013220000010005003030303030303030"
)
SECRET_ZMK = "0123456789ABCDEFFEDCBA9876543210"


def gateway(*argv: str, env: dict[str, str] | None = None,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GATEWAY, *argv], capture_output=True, text=True, timeout=60, env=env, input=stdin)


def test_config_check_lists_every_problem(tmp_path: Path) -> None:
    good = gateway("config", "check", str(ROOT / "examples" / "gateway.toml"))
    assert good.returncode == 0, good.stderr
    assert "ok: terminals on 127.0.0.1:5000, host 127.0.0.1:6000" in good.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text('[host]\ntimeout = "soon"\ntimout = 1\n[security]\nkey_mode = "002"\n'
                   '[[terminals]]\nterminal_id = "10000001"\nmerchant_id = "898100012340001"\n'
                   '[[terminals]]\nterminal_id = "10000001"\nmerchant_id = "898100012340001"\n')
    import os

    result = gateway("config", "check", str(bad), env={**os.environ, "GATEWAY_LIMITS__PER_DAY": "lots"})
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == f"{bad}: 5 problems"
    assert sorted(line.strip().split(":")[0] for line in lines[1:]) == [
        "host.timeout", "host.timout", "limits.per_day", "security.key_mode", "terminals"]
    assert "  limits.per_day: Input should be a valid integer [got 'lots'] (from GATEWAY_LIMITS__PER_DAY)" in lines


def test_config_show_is_the_effective_config_with_secrets_masked(tmp_path: Path) -> None:
    import os

    path = tmp_path / "gw.toml"
    path.write_text(f'[security]\nzmk = "{SECRET_ZMK}"\n[store]\npath = "x.db"\n'
                    f'[[terminals]]\nterminal_id = "10000001"\nmerchant_id = "898100012340001"\ntmk = "{SECRET_ZMK}"\n')
    result = gateway("config", "show", str(path), env={**os.environ, "GATEWAY_HOST__TIMEOUT": "3.5",
                                                       "GATEWAY_PAN_HASH_KEY": "", "GATEWAY_STORE__PAN_HASH_KEY_HEX":
                                                       "22" * 32})
    assert result.returncode == 0, result.stderr
    assert SECRET_ZMK not in result.stdout and "22" * 32 not in result.stdout
    shown = tomllib.loads(result.stdout)
    assert shown["host"]["timeout"] == 3.5  # from the environment
    assert shown["host"]["address"] == "127.0.0.1:6000"  # a default
    assert shown["store"]["path"] == "x.db"  # from the file
    assert shown["security"]["zmk"] == MASK and shown["store"]["pan_hash_key_hex"] == MASK
    assert shown["terminals"] == [{"terminal_id": "10000001", "merchant_id": "898100012340001", "tmk": MASK}]
    assert "[[terminals]]" in result.stdout


def test_health_says_no_when_nothing_answers() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connection refused
        result = gateway("health", "--admin", f"127.0.0.1:{port}", "--timeout", "1")
    assert result.returncode == 1 and "no answer" in result.stderr


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("gateway 0.")
    assert lines[1].startswith(f"python CPython {sys.version_info.major}.{sys.version_info.minor}")
    assert "asyncio (uvloop" in lines[2] and "trio" in lines[2]
    assert lines[3] == f"codec {codec_implementation()}"


def test_decode_names_fields_and_breaks_out_subfields(tmp_path: Path) -> None:
    result = gateway("decode", "--dialect", "cup-pos", "--framing", "cup", PURCHASE)
    doc = json.loads(result.stdout)
    assert doc["names"]["3"] == "Processing code"
    assert doc["names"]["41"] == "Card acceptor terminal id"
    assert set(doc["names"]) == set(doc["fields"])
    assert doc["subfields"]["60"]["batch"] == "000001"

    capture = tmp_path / "purchase.hex"
    capture.write_text(PURCHASE[:60] + "\n" + PURCHASE[60:] + "\n")  # as pasted from a log: lines break
    text = gateway("decode", "--dialect", "cup-pos", "--framing", "cup", "--text", "--file", str(capture))
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == "cup-pos 0200"
    assert any(line.split() == ["3", "000000", "Processing", "code"] for line in lines)
    assert any(line.split()[:2] == ["batch", "000001"] for line in lines)  # 60.2, indented under field 60
    assert "6222021234567890123" not in text.stdout  # track 2 stays redacted


def test_encode_reads_a_file(tmp_path: Path) -> None:
    message = tmp_path / "echo.json"
    message.write_text(json.dumps({"mti": "0800", "fields": {"7": "1201120000", "11": "000001", "70": "301"},
                                   "names": {"7": "ignored"}}))
    from_file = gateway("encode", "--dialect", "iso87-ascii", "--file", str(message))
    from_stdin = gateway("encode", "--dialect", "iso87-ascii", "-", stdin=message.read_text())
    assert from_file.returncode == 0, from_file.stderr
    assert from_file.stdout == from_stdin.stdout and from_file.stdout.startswith("30383030")  # "0800"
    missing = gateway("encode", "--dialect", "iso87-ascii", "--file", str(tmp_path / "none.json"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
