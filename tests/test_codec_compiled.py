"""The compiled codec's packaging: selection at import (GATEWAY_CODEC), refusing a stale build,
falling back per dialect, no reference leaks on any path, and the pure codec still passing the whole
codec suite on its own."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
from codec_support import codec_pair, exercise

from gateway.iso import _compiled
from gateway.iso.codec import Codec, codec_implementation
from gateway.iso.spec import load_dialect

REPO = Path(__file__).resolve().parents[1]
COMPILED_BUILT = _compiled.COMPILED is not None


def _implementation_in_subprocess(env_value: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != _compiled.ENV}
    if env_value is not None:
        env[_compiled.ENV] = env_value
    code = (
        "from gateway.iso.codec import Codec, codec_implementation\n"
        "from gateway.iso.spec import load_dialect\n"
        "print(codec_implementation()); print(Codec(load_dialect('cup-pos')).implementation)\n"
    )
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_gateway_codec_pure_forces_the_pure_path() -> None:
    proc = _implementation_in_subprocess("pure")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["pure-python (pyiso8583; GATEWAY_CODEC=pure)", "pure"]


@pytest.mark.skipif(not COMPILED_BUILT, reason=f"compiled codec not available here: {_compiled.WHY_NOT}")
@pytest.mark.parametrize("value", [None, "", "auto", "compiled", "COMPILED"])
def test_compiled_is_the_default_where_built(value: str | None) -> None:
    proc = _implementation_in_subprocess(value)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["compiled (C extension gateway.iso._ccodec)", "compiled"]


def test_an_unknown_setting_stops_the_import() -> None:
    proc = _implementation_in_subprocess("fast")
    assert proc.returncode != 0
    assert "GATEWAY_CODEC must be auto, pure or compiled, not 'fast'" in proc.stderr


def test_codec_implementation_names_what_codec_uses() -> None:
    codec = Codec(load_dialect("cup-pos"))
    assert codec_implementation().startswith(
        "compiled" if codec.implementation == "compiled" else "pure-python (pyiso8583"
    )
    assert repr(codec) == f"Codec('cup-pos', {codec.implementation})"
    lenient = Codec(load_dialect("cup-pos"), lenient=True, implementation="pure")
    assert repr(lenient) == "Codec('cup-pos', pure, lenient)"


def test_a_stale_build_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An extension built from another _ccodec.c than the checkout's must not run (the differential
    tests would be testing yesterday's C)."""
    if not COMPILED_BUILT:
        pytest.skip(f"compiled codec not available here: {_compiled.WHY_NOT}")
    edited = tmp_path / "_ccodec.c"
    edited.write_text(_compiled.SOURCE.read_text() + "\n/* edited since the build */\n")
    monkeypatch.setattr(_compiled, "SOURCE", edited)
    monkeypatch.delenv(_compiled.ENV, raising=False)
    compiled, why = _compiled._load()
    assert compiled is None and "stale" in why
    monkeypatch.setenv(_compiled.ENV, "compiled")
    with pytest.raises(ImportError, match="stale"):
        _compiled._load()


def test_unsupported_dialect_falls_back_to_pure(tmp_path: Path) -> None:
    """A hex-text bitmap in an encoding that is not ASCII for hex digits (EBCDIC here): the pure
    codec's raw-byte check and pyiso8583's decoding disagree, so the compiled codec declines."""
    text = (REPO / "specs" / "iso87-ascii.toml").read_text()
    text = text.replace('name = "iso87-ascii"', 'name = "iso87-ebcdic-bitmap"')
    text = text.replace('p = { fmt = "b", data_enc = "ascii"', 'p = { fmt = "b", data_enc = "cp500"')
    text = text.replace('1 = { fmt = "b", data_enc = "ascii"', '1 = { fmt = "b", data_enc = "cp500"')
    path = tmp_path / "iso87-ebcdic-bitmap.toml"
    path.write_text(text)
    dialect = load_dialect(str(path))
    assert Codec(dialect).implementation == "pure"
    if COMPILED_BUILT:
        with pytest.raises(RuntimeError, match="not ASCII for hex digits"):
            Codec(dialect, implementation="compiled")


def test_bad_implementation_name() -> None:
    with pytest.raises(ValueError, match="implementation must be"):
        Codec(load_dialect("cup-pos"), implementation="fast")


def test_pure_codec_passes_the_codec_suite_alone() -> None:
    """tests/test_codec.py runs on whatever Codec picks (the compiled codec here); run it once more on
    the pure codec so the fallback stays a working codec, not only an oracle."""
    env = {**os.environ, _compiled.ENV: "pure"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:randomly", "tests/test_codec.py"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


# --- reference counting ----------------------------------------------------------------------------


def test_no_reference_leaks_on_any_path() -> None:
    """A missing Py_DECREF leaks an object per call; sys.getallocatedblocks() counts live objects.
    2,000 rounds of the whole workload (about half a million calls) must not grow it: a leak on any
    one path would add at least 2,000 blocks."""
    if not COMPILED_BUILT:
        pytest.skip(f"compiled codec not available here: {_compiled.WHY_NOT}")
    codecs = [codec_pair(load_dialect(n), lenient=lenient)[1] for n in ("cup-pos", "iso87-ascii") for lenient in (0, 1)]
    exercise(codecs, 200)  # warm-up: the pure codec's plan caches, interned strings, free lists
    gc.collect()
    before = sys.getallocatedblocks()
    calls = exercise(codecs, 2_000)
    gc.collect()
    grown = sys.getallocatedblocks() - before
    assert grown < 500, f"{grown} blocks more after {calls:,} calls"
