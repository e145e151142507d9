"""The compiled codec under sanitizers, on builds of `_ccodec.c` made here with clang:

* coverage-guided fuzzing: atheris (libFuzzer) on a build instrumented for coverage and
  AddressSanitizer, every input also checked against the pure codec (tests/fuzz_codec.py). About 30 s
  in CI; `GATEWAY_FUZZ_SECONDS=3600` for a long run (add `-s` to see libFuzzer's progress and the
  final figures), `GATEWAY_FUZZ_CORPUS=DIR` to keep and grow a corpus between runs;
* LeakSanitizer (Debian's clang runtime) over every path of the codec (tests/lsan_codec.py), a few
  seconds.

Needs clang with its runtime (Debian: `apt-get install clang-14 libclang-rt-14-dev`) and, for the
fuzzing, atheris (a dev dependency on Linux x86-64); without them a test is skipped and says why.
Python runs with PYTHONMALLOC=malloc so that the sanitizers see every object's own allocation.
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


def build_instrumented(
    clang: str, out_dir: Path, sanitize: str = "address,fuzzer-no-link", source: Path = _compiled.SOURCE
) -> Path:
    """The extension built with clang for the sanitizers; it carries the checkout's source hash, so
    gateway.iso._compiled accepts it (also when `source` is a deliberately broken copy)."""
    target = out_dir / f"_ccodec{sysconfig.get_config_var('EXT_SUFFIX')}"
    command = [
        clang,
        f"-fsanitize={sanitize}",
        "-fno-omit-frame-pointer",
        "-g",
        "-O1",
        "-fPIC",
        "-shared",
        f"-I{sysconfig.get_paths()['include']}",
        f'-DGATEWAY_CCODEC_SOURCE_HASH="{_compiled.source_hash()}"',
        str(source),
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
        # leaks are the LSan test's job: libFuzzer's per-input leak check trips on CPython's caches
        "ASAN_OPTIONS": "detect_leaks=0:allocator_may_return_null=1:quarantine_size_mb=64",
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


def _asan_runtime(clang: str) -> Path | None:
    """The shared ASan runtime (with LeakSanitizer) of this clang, e.g. Debian's libclang-rt-14-dev."""
    proc = subprocess.run([clang, "-print-file-name=libclang_rt.asan-x86_64.so"], capture_output=True, text=True)
    path = Path(proc.stdout.strip())
    return path if path.is_absolute() and path.is_file() else None


def test_leak_sanitizer(tmp_path: Path) -> None:
    """No allocation made on any path of the codec is left without a reference (LeakSanitizer at exit).
    The check itself is checked: the same run on a build with one Py_DECREF removed reports a leak."""
    clang = _clang()
    if clang is None:
        pytest.skip("no clang to build the sanitized extension (apt-get install clang-14 libclang-rt-14-dev)")
    runtime = _asan_runtime(clang)
    if runtime is None:
        pytest.skip("no shared ASan runtime for this clang (apt-get install libclang-rt-14-dev)")
    env = {
        **os.environ,
        "LD_PRELOAD": str(runtime),
        "PYTHONMALLOC": "malloc",
        "ASAN_OPTIONS": "detect_leaks=1",
        "GATEWAY_CODEC": "compiled",
    }
    rounds = os.environ.get("GATEWAY_LSAN_ROUNDS", "300")

    def run(extension: Path) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, str(HERE / "lsan_codec.py"), "--extension", str(extension), rounds]
        for _ in range(3):
            done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            # LeakSanitizer's own stop-the-world tracer sometimes dies (SIGSEGV) on a machine busy with
            # other processes: "encountered a fatal error" is the tool failing, not a verdict on our
            # code, so that run is repeated; a leak report or any other failure is taken as it is
            if "LeakSanitizer has encountered a fatal error" not in done.stderr:
                break
        return done

    clean = run(build_instrumented(clang, tmp_path, "address"))
    assert clean.returncode == 0 and "workload done" in clean.stdout, clean.stderr[-6000:]
    assert "LeakSanitizer" not in clean.stderr, clean.stderr[-6000:]

    leaky_dir = tmp_path / "leaky"
    leaky_dir.mkdir()
    source = _compiled.SOURCE.read_text()
    assert source.count("done:\n    Py_DECREF(reason);") == 1
    (leaky_dir / "_ccodec.c").write_text(source.replace("done:\n    Py_DECREF(reason);", "done:\n    (void)reason;"))
    leaky = run(build_instrumented(clang, leaky_dir, "address", leaky_dir / "_ccodec.c"))
    assert "LeakSanitizer: detected memory leaks" in leaky.stderr, leaky.stderr[-3000:]

