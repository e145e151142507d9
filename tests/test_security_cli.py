"""`gateway keys ...`: called in-process through the parser `register()` builds, and once as a
subprocess."""

from __future__ import annotations

import argparse
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.security import algorithms as alg
from gateway.security.cli import register
from gateway.security.keys import KeyUsage
from gateway.security.keystore import LMK_ENV, KeyStore, LocalMasterKey, read_lmk_file, write_lmk_file

REPO = Path(__file__).resolve().parents[1]


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="gateway")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["keys", *argv])
    return args.func(args)


@pytest.fixture
def paths(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    monkeypatch.delenv(LMK_ENV, raising=False)
    monkeypatch.delenv("GATEWAY_SECURITY__KEYSTORE", raising=False)
    monkeypatch.delenv("GATEWAY_SECURITY__LMK_FILE", raising=False)
    return tmp_path / "keys.store", tmp_path / "lmk.hex"


def _store_args(paths: tuple[Path, Path]) -> list[str]:
    return ["--store", str(paths[0]), "--lmk-file", str(paths[1])]


def test_init_with_a_generated_lmk(paths, capsys):
    store, lmk_file = paths
    assert run("init", *_store_args(paths), "--generate-lmk") == 0
    assert stat.S_IMODE(lmk_file.stat().st_mode) == 0o600
    lmk = read_lmk_file(lmk_file)
    out = capsys.readouterr().out
    assert lmk.check.hex().upper() in out and lmk.to_hex() not in out
    assert len(KeyStore.open(store, lmk)) == 0
    # a second init refuses to clobber
    assert run("init", *_store_args(paths)) == 1
    assert "already exists" in capsys.readouterr().err


def test_init_with_the_lmk_from_the_environment(paths, monkeypatch, capsys):
    store, _ = paths
    lmk = LocalMasterKey.generate()
    monkeypatch.setenv(LMK_ENV, lmk.to_hex())
    assert run("init", "--store", str(store)) == 0
    assert len(KeyStore.open(store, lmk)) == 0


def test_group_readable_lmk_file_is_refused(paths, capsys):
    store, lmk_file = paths
    write_lmk_file(lmk_file)
    lmk_file.chmod(0o644)
    assert run("init", *_store_args(paths)) == 1
    err = capsys.readouterr().err
    assert "group/others" in err and "chmod 600" in err
    assert not store.exists()


def test_tmk_import_from_components_prints_kcvs(paths, capsys):
    store, lmk_file = paths
    run("init", *_store_args(paths), "--generate-lmk")
    c1, c2 = alg.generate_key(16), alg.generate_key(16)
    expected = alg.combine_components([c1, c2])
    capsys.readouterr()
    assert run("tmk-import", "12345678", *_store_args(paths), "--component", c1.hex(),
               "--component", c2.hex().upper(), "--kcv", alg.kcv(expected).hex()) == 0
    out = capsys.readouterr().out
    assert f"component 1 KCV {alg.kcv(c1).hex().upper()}" in out
    assert f"component 2 KCV {alg.kcv(c2).hex().upper()}" in out
    assert f"TMK/12345678 stored (16 bytes), KCV {alg.kcv(expected).hex().upper()}" in out
    for secret in (c1, c2, expected):
        assert secret.hex().upper() not in out and secret.hex() not in out
    stored = KeyStore.open(store, read_lmk_file(lmk_file)).get(KeyUsage.TMK, "12345678")
    assert stored.cipher.same_key(alg.DesKey(expected))
    # importing again needs --replace
    again = ["--component", c1.hex(), "--component", c2.hex()]
    assert run("tmk-import", "12345678", *_store_args(paths), *again) == 1
    assert "--replace" in capsys.readouterr().err


def test_import_refusals(paths, capsys):
    run("init", *_store_args(paths), "--generate-lmk")
    c1, c2 = alg.generate_key(16), alg.generate_key(16)
    cases = [
        (["--component", c1.hex()], "at least two components"),
        (["--component", c1.hex(), "--component", bytes(16).hex()], "component 2 does not have odd DES"),
        (["--component", c1.hex(), "--component", "XYZ"], "component 2 is not valid hex"),
        (["--component", c1.hex(), "--component", c2.hex(), "--kcv", "000000"], "the key form says 000000"),
        (["--component", c1.hex(), "--component", c2.hex(), "--kcv", "0"], "--kcv must be"),
    ]
    for extra, message in cases:
        assert run("zmk-import", *_store_args(paths), *extra) == 1
        assert message in capsys.readouterr().err
    assert run("list", *_store_args(paths)) == 0
    assert "0 keys" in capsys.readouterr().out


def test_zmk_import_three_components(paths, capsys):
    store, lmk_file = paths
    run("init", *_store_args(paths), "--generate-lmk")
    comps = [alg.generate_key(16) for _ in range(3)]
    args = [a for c in comps for a in ("--component", c.hex())]
    assert run("zmk-import", *_store_args(paths), *args) == 0
    zmk = KeyStore.open(store, read_lmk_file(lmk_file)).get(KeyUsage.ZMK)
    assert zmk.cipher.same_key(alg.DesKey(alg.combine_components(comps)))


def test_tmk_generate_with_components_for_injection(paths, capsys):
    store, lmk_file = paths
    run("init", *_store_args(paths), "--generate-lmk")
    capsys.readouterr()
    assert run("tmk-generate", "00000001", *_store_args(paths), "--components", "3") == 0
    out = capsys.readouterr().out
    parts = [bytes.fromhex(line.split()[2]) for line in out.splitlines() if line.startswith("component")]
    assert len(parts) == 3
    stored = KeyStore.open(store, read_lmk_file(lmk_file)).get(KeyUsage.TMK, "00000001")
    assert stored.cipher.same_key(alg.DesKey(alg.combine_components(parts)))
    assert stored.cipher.material.hex().upper() not in out  # only the shares are shown
    assert run("tmk-generate", "00000002", *_store_args(paths), "--length", "8") == 0
    out = capsys.readouterr().out
    assert "TMK/00000002 generated (8 bytes), KCV" in out and "component" not in out


def test_list_shows_kcvs_never_keys(paths, capsys):
    store, lmk_file = paths
    run("init", *_store_args(paths), "--generate-lmk")
    run("tmk-generate", "00000001", *_store_args(paths))
    capsys.readouterr()
    assert run("list", *_store_args(paths)) == 0
    out = capsys.readouterr().out
    tmk = KeyStore.open(store, read_lmk_file(lmk_file)).get(KeyUsage.TMK, "00000001")
    assert "TMK/00000001" in out and tmk.kcv.hex().upper() in out
    assert tmk.cipher.material.hex().upper() not in out


def test_rotate_lmk(paths, tmp_path, capsys):
    store = paths[0]
    run("init", *_store_args(paths), "--generate-lmk")
    run("tmk-generate", "00000001", *_store_args(paths))
    new_file = tmp_path / "lmk2.hex"
    assert run("rotate-lmk", *_store_args(paths), "--new-lmk-file", str(new_file), "--generate") == 0
    assert stat.S_IMODE(new_file.stat().st_mode) == 0o600
    assert "re-encrypted" in capsys.readouterr().out
    assert len(KeyStore.open(store, read_lmk_file(new_file))) == 1
    assert run("list", *_store_args(paths)) == 1  # the old LMK no longer opens it
    assert "another LMK" in capsys.readouterr().err
    # rotating onto the same LMK is refused
    same = ["--lmk-file", str(new_file), "--new-lmk-file", str(new_file)]
    assert run("rotate-lmk", "--store", str(store), *same) == 1
    assert "already under" in capsys.readouterr().err


def test_missing_store_option(paths, capsys):
    assert run("list") == 1
    assert "--store" in capsys.readouterr().err


def test_subprocess_end_to_end(paths):
    store, lmk_file = paths
    write_lmk_file(lmk_file)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_SECURITY__KEYSTORE"] = str(store)
    env["PYTHONPATH"] = str(REPO)

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-W", "error", "-m", "gateway.security.cli", "keys", *argv,
                   "--lmk-file", str(lmk_file)]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)

    assert cli("init").returncode == 0
    c1, c2 = alg.generate_key(16), alg.generate_key(16)
    done = cli("tmk-import", "12345678", "--component", c1.hex(), "--component", c2.hex())
    assert done.returncode == 0, done.stderr
    kcv = alg.kcv(alg.combine_components([c1, c2])).hex().upper()
    assert kcv in done.stdout
    listing = cli("list")
    assert listing.returncode == 0 and "TMK/12345678" in listing.stdout and kcv in listing.stdout
    bad = cli("tmk-import", "12345678", "--component", c1.hex(), "--component", c2.hex())
    assert bad.returncode == 1 and "already exists" in bad.stderr and "Traceback" not in bad.stderr
