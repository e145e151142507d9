#!/usr/bin/env python3
"""Mutation testing of the money path (issue 16): one command, a score per module.

    python tools/mutate.py                         # every target in tests/mutation/targets.toml
    python tools/mutate.py core security.mac       # some targets (names, or a file they mutate)
    python tools/mutate.py --changed-since main    # only mutants in functions changed since main
    python tools/mutate.py --sample 40             # a fixed, seeded sample of 40 mutants per target
    python tools/mutate.py core --recheck          # re-run the survivors (after adding tests)
    python tools/mutate.py core --survivors        # run nothing: each survivor's diff (and a stub to list it)
    python tools/mutate.py --report                # run nothing: the table of the results kept so far

Uses mutmut (3.x): it runs, for each mutant, only the tests that call the mutated function, in
processes forked from a warm one, which is what makes a module's run take minutes, not hours. Each
target runs in a working directory of its own under .mutation/<target>/ (kept out of git), with only
its modules mutated and only the test files that cover it selected, so results are cached per target
and a second run only tests what changed.

A mutant that no test can tell from the original is listed in tests/mutation/equivalent/<target>.toml with the
line it produces and a reason; a listed mutant whose line no longer matches counts as a survivor again.
score = killed / (mutants - equivalent); a timeout is shown apart and not counted as a kill.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ROOT / "tests" / "mutation" / "targets.toml"
#: one file per target, so that work on two modules never edits the same list
EQUIVALENT = ROOT / "tests" / "mutation" / "equivalent"
#: where the targets' working directories go (a test points it at a temporary directory)
WORK = Path(os.environ.get("GATEWAY_MUTATION_DIR", ROOT / ".mutation"))
#: mutmut's exit codes, as its stats module reads them
KILLED, SURVIVED, TIMEOUT, NO_TESTS = {1, 3, 37}, {0}, {36, 24, -24, 152, 255}, {5, 33}


@dataclass
class Target:
    name: str
    paths: list[str]
    tests: list[str]
    sample: int | None = None
    deselect: list[str] = field(default_factory=list)


@dataclass
class Tally:
    killed: int = 0
    survived: int = 0
    equivalent: int = 0
    timeout: int = 0
    no_tests: int = 0
    unchecked: int = 0
    other: int = 0
    survivors: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)

    @property
    def counted(self) -> int:
        return self.killed + self.survived + self.timeout + self.no_tests + self.other

    @property
    def score(self) -> float | None:
        return self.killed / self.counted if self.counted else None


def load_targets() -> tuple[dict[str, object], list[Target]]:
    data = tomllib.loads(TARGETS.read_text())
    targets = [Target(t["name"], list(t["paths"]), list(t["tests"]), t.get("sample"), list(t.get("deselect", [])))
               for t in data["target"]]
    return data.get("settings", {}), targets


def load_equivalents() -> dict[str, dict[str, str]]:
    listed: dict[str, dict[str, str]] = {}
    for path in sorted(EQUIVALENT.glob("*.toml")):
        for entry in tomllib.loads(path.read_text()).get("equivalent", []):
            listed[entry["mutant"]] = entry
    return listed


def mutated_files(target: Target) -> list[str]:
    """The .py files a target mutates (its paths are files, or directories taken whole)."""
    files: list[str] = []
    for p in target.paths:
        path = ROOT / p
        found = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        files += [str(f.relative_to(ROOT)) for f in found if f.name != "__init__.py"]
    return files


def prepare(target: Target, settings: dict[str, object]) -> Path:
    """The target's working directory: links to the sources and the tests, and mutmut's configuration."""
    work = WORK / target.name
    work.mkdir(parents=True, exist_ok=True)
    also_copy = [str(p) for p in settings.get("also_copy", [])]  # type: ignore[attr-defined]
    for entry in ["gateway", "tests", *also_copy]:
        link = work / entry
        if not link.is_symlink():
            link.symlink_to(ROOT / entry)
    pytest_ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    config = {
        "source_paths": ["gateway"],
        "only_mutate": mutated_files(target),
        "also_copy": also_copy,
        "pytest_add_cli_args_test_selection": target.tests,
        "pytest_add_cli_args": ["-p", "no:randomly", *(a for d in target.deselect for a in ("--deselect", d))],
        "timeout_multiplier": float(settings.get("timeout_multiplier", 15.0)),  # type: ignore[arg-type]
    }
    text = "[tool.mutmut]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items())
    text += "\n[tool.pytest.ini_options]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in pytest_ini.items())
    pyproject = work / "pyproject.toml"
    if not pyproject.exists() or pyproject.read_text() != text:
        pyproject.write_text(text)
    return work


def mutmut_python(work: Path, code: str) -> str:
    """Runs `code` with mutmut's own modules, in the target's directory (mutmut reads its config from cwd)."""
    done = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"mutmut failed in {work}:\n{done.stdout}\n{done.stderr}")
    return done.stdout


GENERATE = """
import os
from mutmut.__main__ import copy_also_copy_files, copy_src_dir, create_mutants
from mutmut.mutation.trampoline import set_mutant_under_test
os.makedirs("mutants", exist_ok=True)
set_mutant_under_test("mutant_generation")
copy_src_dir(); copy_also_copy_files(); create_mutants(1)
"""

DIFFS = """
import json, sys
from mutmut.mutation.diff_apply import get_diff_for_mutant
print(json.dumps({n: get_diff_for_mutant(n) for n in json.loads(sys.argv[1] if len(sys.argv) > 1 else "[]")}))
"""


def results(work: Path, target: Target) -> dict[str, int | None]:
    """mutant name -> mutmut's exit code (None: not checked yet), for the target's files."""
    out: dict[str, int | None] = {}
    for f in mutated_files(target):
        meta = work / "mutants" / (f + ".meta")
        if meta.exists():
            out.update(json.loads(meta.read_text())["exit_code_by_key"])
    return out


def diffs(work: Path, names: list[str]) -> dict[str, str]:
    if not names:
        return {}
    code = DIFFS.replace('sys.argv[1] if len(sys.argv) > 1 else "[]"', repr(json.dumps(names)))
    return json.loads(mutmut_python(work, code))


def added_line(diff: str) -> str:
    """The mutant's changed line(s) as the equivalent list records them: the diff's + lines, stripped."""
    return " / ".join(ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++"))


def changed_functions(ref: str, files: list[str]) -> set[str]:
    """mutmut's names (module.x_func / module.xǁClassǁmethod) of the functions with lines changed since ref."""
    names: set[str] = set()
    for f in files:
        diff = subprocess.run(["git", "diff", "-U0", ref, "--", f], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout
        lines: set[int] = set()
        for m in re.finditer(r"^@@ -\d+(?:,\d+)? \+(\d+)(?:,(\d+))? @@", diff, re.M):
            start, count = int(m.group(1)), int(m.group(2) or 1)
            lines.update(range(start, start + max(count, 1)))
        if not lines:
            continue
        module = f.removesuffix(".py").replace("/", ".")
        tree = ast.parse((ROOT / f).read_text())
        for node in tree.body:
            funcs = [(node, f"x_{getattr(node, 'name', '')}")]
            if isinstance(node, ast.ClassDef):
                funcs = [(n, f"xǁ{node.name}ǁ{n.name}") for n in node.body
                         if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
            for fn, mangled in funcs:
                if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) and \
                        lines & set(range(fn.lineno, (fn.end_lineno or fn.lineno) + 1)):
                    names.add(f"{module}.{mangled}")
    return names


def function_of(mutant: str) -> str:
    return mutant.rsplit("__mutmut_", 1)[0]


def run_target(target: Target, settings: dict[str, object], args: argparse.Namespace) -> Tally:
    work = prepare(target, settings)
    # --survivors only reports, as --report does: re-running changed mutants first took a helper an hour
    report_only = args.report or args.survivors
    if not report_only:
        mutmut_python(work, GENERATE)
    state = results(work, target)
    chosen = sorted(state)
    if args.changed_since:
        changed = changed_functions(args.changed_since, mutated_files(target))
        chosen = [n for n in chosen if function_of(n) in changed]
    sample = args.sample or target.sample
    if sample and len(chosen) > sample:
        chosen = sorted(random.Random(f"mutate:{target.name}").sample(chosen, sample))
    # --recheck: everything not killed, also a forked child that crashed (-11: seen under load, killed
    # when run again), which is neither a kill nor a survivor
    todo = [] if report_only else [n for n in chosen if state[n] is None or (args.recheck and state[n] not in KILLED)]
    if report_only and not state:
        print(f"   no results kept for {target.name}: run `tools/mutate.py {target.name}` first", flush=True)
    elif report_only and (unknown := sum(1 for n in chosen if state[n] is None)):
        print(f"   {unknown} mutants have no result yet: run without --survivors/--report to test them", flush=True)
    print(f"== {target.name}: {len(state)} mutants, {len(chosen)} chosen, {len(todo)} to run", flush=True)
    # two passes: a changed test list or function makes mutmut drop the earlier results it can no
    # longer trust, which the second pass then re-checks
    for _ in range(2):
        if not todo:
            break
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        # mutmut's own CLI, with its timeout signal kept off processes it did not start (see the file)
        cmd = [sys.executable, str(ROOT / "tools" / "mutmut_guarded.py"), "run", "--max-children", str(args.jobs),
               *todo]
        log = work / "run.log"
        with log.open("w") as out:
            subprocess.run(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
        state = results(work, target)
        todo = [n for n in chosen if state.get(n) is None]
        if todo:
            print(f"   {len(todo)} mutants to (re)check", flush=True)
    return tally(work, {n: state[n] for n in chosen}, args)


def tally(work: Path, state: dict[str, int | None], args: argparse.Namespace) -> Tally:
    t = Tally()
    equivalents = load_equivalents()
    listed = [n for n in state if n in equivalents and state[n] not in KILLED]
    listed_diffs = diffs(work, listed)
    for name, code in sorted(state.items()):
        if code in KILLED:
            t.killed += 1
        elif name in equivalents:
            if added_line(listed_diffs[name]) == equivalents[name].get("change", "").strip():
                t.equivalent += 1
            else:
                t.stale.append(name)
                t.survived += 1
                t.survivors.append(name)
        elif code is None:
            t.unchecked += 1
        elif code in SURVIVED:
            t.survived += 1
            t.survivors.append(name)
        elif code in TIMEOUT:
            t.timeout += 1
        elif code in NO_TESTS:
            t.no_tests += 1
            t.survivors.append(name)
        else:
            t.other += 1
            t.survivors.append(name)
    report = work / "survivors.txt"
    survivor_diffs = diffs(work, t.survivors)
    report.write_text("".join(f"# {n}\n{survivor_diffs[n]}\n\n" for n in t.survivors))
    if args.survivors:
        for n in t.survivors:
            print(f"\n# {n}{' (listed as equivalent, but its line changed)' if n in t.stale else ''}")
            print(survivor_diffs[n])
            print(f'[[equivalent]]\nmutant = "{n}"\nchange = {json.dumps(added_line(survivor_diffs[n]))}\n'
                  'reason = ""')
    return t


def table(rows: list[tuple[str, Tally]]) -> str:
    head = f"| {'module':<22} | killed | survived | no tests | equivalent | timeout | score |"
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for name, t in rows:
        score = "-" if t.score is None else f"{100 * t.score:.0f} %"
        lines.append(f"| {name:<22} | {t.killed:>6} | {t.survived:>8} | {t.no_tests:>8} | {t.equivalent:>10} | "
                     f"{t.timeout:>7} | {score:>5} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help="target names or files (default: every target)")
    parser.add_argument("--changed-since", metavar="REF", help="only mutants in functions changed since REF")
    parser.add_argument("--sample", type=int, metavar="N", help="a fixed, seeded sample of N mutants per target")
    parser.add_argument("--recheck", action="store_true", help="re-run all not killed (survivors, timeouts, crashes)")
    parser.add_argument("--report", action="store_true", help="run nothing: tally the results kept so far")
    parser.add_argument("--survivors", action="store_true", help="run nothing: each survivor's diff")
    parser.add_argument("--jobs", type=int, default=1, help="mutmut's worker processes (default 1: shared CPUs)")
    parser.add_argument("--fail-under", type=float, metavar="PCT", help="exit 1 when a target scores below PCT")
    args = parser.parse_args(argv)
    settings, targets = load_targets()
    if args.modules:
        wanted = []
        for m in args.modules:
            hits = [t for t in targets if m == t.name or m.removesuffix("/") in t.paths
                    or any(f == m for f in mutated_files(t))]
            if not hits:
                parser.error(f"{m}: no such target in {TARGETS.relative_to(ROOT)}")
            wanted += [t for t in hits if t not in wanted]
        targets = wanted
    rows = [(t.name, run_target(t, settings, args)) for t in targets]
    print(table(rows))
    for name, t in rows:
        if t.stale:
            print(f"{name}: listed as equivalent but changed since: {', '.join(t.stale)}")
        if t.unchecked:
            print(f"{name}: {t.unchecked} chosen mutants not checked (interrupted?)")
    if args.fail_under is not None:
        low = [n for n, t in rows if t.score is not None and 100 * t.score < args.fail_under]
        if low:
            print(f"below {args.fail_under} %: {', '.join(low)}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
