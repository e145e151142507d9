#!/usr/bin/env python3
"""Writes (or with --check, verifies) constraints.txt: the exact version of every package the gateway
needs at run time (its dependencies and theirs, not the dev extras), as installed in this environment.

The Dockerfile installs with `pip install --constraint constraints.txt .`, and so does the README's
install outside a container, so an image built today and one built next year run the same code.
After changing a dependency in pyproject.toml: re-install (`source .ci/bootstrap`), then run
`.venv/bin/python deploy/constraints.py` and commit constraints.txt.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement

PROJECT = "iso8583-gateway"
ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "constraints.txt"
HEADER = """\
# Exact run-time dependency versions of the gateway (not the dev tools). Used by the Dockerfile and by
# `pip install --constraint constraints.txt .` (README). Regenerate: .venv/bin/python deploy/constraints.py
"""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_closure() -> dict[str, str]:
    """canonical name → installed version, for the project's run-time requirements, transitively."""
    pinned: dict[str, str] = {}
    todo = list(md.requires(PROJECT) or [])
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra (dev, plot) or another platform
        name = _canonical(req.name)
        if name in pinned:
            continue
        dist = md.distribution(req.name)
        pinned[name] = dist.version
        todo.extend(dist.requires or [])
    return dict(sorted(pinned.items()))


def read_constraints() -> dict[str, str]:
    listed = {}
    for line in OUT.read_text(encoding="utf-8").splitlines() if OUT.exists() else []:
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            if not sep:
                raise SystemExit(f"{OUT.name}: {line!r} is not pinned with ==")
            listed[_canonical(name)] = version
    return listed


def render(pins: dict[str, str]) -> str:
    return HEADER + "".join(f"{name}=={version}\n" for name, version in pins.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 unless constraints.txt is up to date")
    args = parser.parse_args(argv)
    pins = runtime_closure()
    if args.check:
        # the names must match (a new dependency must be pinned); versions may differ from this
        # environment's, which pip resolved on its own (the constraints are what the image installs)
        listed = read_constraints()
        missing, extra = sorted(pins.keys() - listed.keys()), sorted(listed.keys() - pins.keys())
        for name in missing:
            print(f"{OUT.name}: {name} is a run-time dependency but not pinned", file=sys.stderr)
        for name in extra:
            print(f"{OUT.name}: {name} is pinned but no longer a run-time dependency", file=sys.stderr)
        if missing or extra:
            print("re-run: .venv/bin/python deploy/constraints.py", file=sys.stderr)
            return 1
        return 0
    text = render(pins)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.name}: {text.count(chr(10)) - HEADER.count(chr(10))} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
