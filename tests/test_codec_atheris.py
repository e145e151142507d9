"""Coverage-guided fuzzing of the compiled codec in C: atheris (libFuzzer) on a build of `_ccodec.c`
instrumented for coverage and AddressSanitizer, with every input also checked against the pure codec
(tests/fuzz_codec.py). About 30 s in CI; `GATEWAY_FUZZ_SECONDS=3600` for a long run (add `-s` to see
libFuzzer's progress), `GATEWAY_FUZZ_CORPUS=DIR` to keep and grow a corpus between runs.

Needs atheris (a dev dependency on Linux x86-64) and clang with its runtime (Debian:
`apt-get install clang-14 libclang-rt-14-dev`); without them the test is skipped and says why.
Python runs with PYTHONMALLOC=malloc so that ASan sees every object's buffer; leak detection is off
here (CPython keeps its start-up allocations to the end) and done by tests/test_codec_compiled.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from gateway.iso import _compiled

pytestmark = pytest.mark.slow

SECONDS = int(os.environ.get("GATEWAY_FUZZ_SECONDS", "25"))
HERE = Path(__file__).resolve().parent


def _clang() -> str | None:
    for name in ("clang", "clang-14", "clang-15", "clang-16"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _atheris_dir() -> Path | None:
    try:
        import atheris
    except ImportError:
        return None
    return Path(atheris.path())


def build_instrumented(clang: str, out_dir: Path) -> Path:
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    target = out_dir / f"_ccodec{suffix}"
    command = [
        clang,
        "-fsanitize=address,fuzzer-no-link",
        "-fno-omit-frame-pointer",
        "-g",
        "-O1",
        "-fPIC",
        "-shared",
        f"-I{sysconfig.get_paths()['include']}",
        f'-DGATEWAY_CCODEC_SOURCE_HASH="{_compiled.source_hash()}"',
        str(_compiled.SOURCE),
        "-o",
        str(target),
    ]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
    return target


def test_fuzz_compiled_codec(tmp_path: Path) -> None:
    atheris_dir = _atheris_dir()
    if atheris_dir is None:
        pytest.skip("atheris is not installed (pip install atheris; wheels exist for Linux x86-64)")
    clang = _clang()
    if clang is None:
        pytest.skip("no clang to build the instrumented extension (apt-get install clang-14 libclang-rt-14-dev)")
    preload = atheris_dir / "asan_with_fuzzer.so"
    if not preload.is_file():
        pytest.skip(f"atheris has no {preload.name} (an atheris build without sanitizer runtimes)")
    extension = build_instrumented(clang, tmp_path)
    corpus = Path(os.environ.get("GATEWAY_FUZZ_CORPUS", tmp_path / "corpus"))
    env = {
        **os.environ,
        "LD_PRELOAD": str(preload),
        "PYTHONMALLOC": "malloc",
        "ASAN_OPTIONS": "detect_leaks=0:allocator_may_return_null=1",
        "GATEWAY_CODEC": "compiled",
    }
    command = [
        sys.executable,
        str(HERE / "fuzz_codec.py"),
        "--extension",
        str(extension),
        str(corpus),
        f"-max_total_time={SECONDS}",
        "-timeout=10",
        "-rss_limit_mb=3072",
        "-max_len=1024",
        "-print_final_stats=1",
        f"-artifact_prefix={tmp_path}/",
    ]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=SECONDS + 240)
    log = proc.stdout + proc.stderr
    (tmp_path / "fuzz.log").write_text(log)
    if proc.returncode != 0:
        artifacts = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-")))
        pytest.fail(f"fuzzer failed (exit {proc.returncode}, artifacts {artifacts}):\n{log[-6000:]}")
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", log)
    coverage = re.findall(r"cov: (\d+) ft: (\d+)", log)
    assert runs is not None and int(runs.group(1)) > 1000, log[-3000:]
    assert coverage, log[-3000:]
    print(f"\nfuzz: {runs.group(1)} executions in {SECONDS} s, cov {coverage[-1][0]} ft {coverage[-1][1]}")
