"""The cheap CI subset of mutation testing (issue 16; the full run is `python tools/mutate.py`).

A fixed, seeded sample of 20 mutants of the MAC code (gateway/security/mac.py, the check every
terminal request passes) must be killed by its tests: a test weakened so that a corrupted MAC would
pass fails here. The run uses a working directory of its own, never the repository's .mutation/.
The reviewed list of equivalent mutants is checked for what a reviewer needs: a reason for each.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MUTATION = ROOT / "tests" / "mutation"


def test_every_equivalent_mutant_is_listed_once_with_its_line_and_a_reason():
    listed = [entry for path in sorted((MUTATION / "equivalent").glob("*.toml"))
              for entry in tomllib.loads(path.read_text()).get("equivalent", [])]
    assert listed, "no equivalent list found"
    names = [e["mutant"] for e in listed]
    assert len(names) == len(set(names))
    modules = {f.removesuffix(".py").replace("/", ".") for t in tomllib.loads((MUTATION / "targets.toml").read_text())
               ["target"] for p in t["paths"] for f in ([p] if p.endswith(".py") else
                                                        [str(x.relative_to(ROOT)) for x in (ROOT / p).rglob("*.py")])}
    for e in listed:
        assert e["mutant"].rsplit(".", 1)[0] in modules, e["mutant"]
        assert e["change"].strip() and len(e["reason"].strip()) > 10, e["mutant"]


@pytest.mark.slow
def test_a_fixed_sample_of_mac_mutants_is_killed(tmp_path):
    pytest.importorskip("mutmut")
    env = dict(os.environ, GATEWAY_MUTATION_DIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "tools/mutate.py", "security.mac", "--sample", "20", "--fail-under", "90"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith("| security.mac"))
    killed, survived, no_tests, equivalent, timeout = (int(c) for c in row.split("|")[2:7])
    assert killed + survived + no_tests + equivalent + timeout == 20
