"""Results of a conformance run (`trace check`, `trace replay`, `trace diff`) and their reports: a
summary line, JSON, and JUnit XML for CI. A run passes only when every case passes.

A *case* is one unit a QA engineer would name in a test plan: usually one terminal request and
everything it caused (its answer, the SUT's upstream request and answer, a reversal), or one
hand-written template case. A `Finding` is one thing that differs from what was expected.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET


class FindingKind(StrEnum):
    FIELD = "field"  #: a field's value broke its rule
    MISSING_FRAME = "missing_frame"  #: an expected message never came (a real timeout)
    UNEXPECTED_FRAME = "unexpected_frame"  #: a message the recording does not have
    MATCH_KEY = "match_key"  #: an answer came, but it does not pair with its request (STAN, MTI class, ...)
    DECODE = "decode"  #: a frame does not decode, or does not re-encode to the same bytes
    INVARIANT = "invariant"  #: a cross-message rule failed (echoed fields, reversal names an original, ...)


@dataclass(frozen=True, slots=True)
class Finding:
    kind: FindingKind
    message: str  #: one line a person can act on; never a secret in clear
    leg: str = ""  #: "terminal" / "host"
    mti: str = ""
    terminal: str = ""
    stan: str = ""
    field: str = ""
    expected: str = ""
    got: str = ""
    rule: str = ""  #: the rule that failed, as written in the rules file (e.g. "same", "echo", "format")
    seq: int | None = None  #: the recorded frame's position in the trace, when there is one


def finding_order(f: Finding) -> int:
    """Most telling first (the JUnit failure message is a case's first finding): the response code and
    the MTI, then frames that did not pair, came or went missing, then the other fields."""
    if f.kind is FindingKind.FIELD and f.field in ("39", "mti"):
        return 0
    return 2 if f.kind is FindingKind.FIELD else 1


@dataclass(slots=True)
class CaseResult:
    name: str  #: e.g. "T3 10000001 stan 000123 purchase" or a template case's name
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0
    skipped: str = ""  #: non-empty: why the case was not run

    @property
    def passed(self) -> bool:
        return not self.findings and not self.skipped


def summary_line(title: str, cases: Sequence[CaseResult], seconds: float) -> str:
    failed = sum(1 for c in cases if c.findings)
    skipped = sum(1 for c in cases if c.skipped)
    passed = len(cases) - failed - skipped
    verdict = "PASS" if failed == 0 else "FAIL"
    return (f"{title}: {verdict} — {passed} passed, {failed} failed, {skipped} skipped "
            f"of {len(cases)} cases in {seconds:.1f}s")


def to_json(title: str, cases: Iterable[CaseResult], seconds: float) -> dict[str, Any]:
    items = list(cases)
    return {"title": title, "passed": all(not c.findings for c in items), "seconds": round(seconds, 3),
            "cases": [{"name": c.name, "passed": c.passed, "seconds": round(c.seconds, 3), "skipped": c.skipped,
                       "findings": [{k: v for k, v in asdict(f).items() if v not in ("", None)}
                                    for f in c.findings]} for c in items]}


def write_json(path: Path, title: str, cases: Iterable[CaseResult], seconds: float) -> None:
    path.write_text(json.dumps(to_json(title, cases, seconds), indent=2) + "\n", encoding="utf-8")


def write_junit(path: Path, title: str, cases: Sequence[CaseResult], seconds: float) -> None:
    """JUnit XML as CI servers read it: one <testcase> per case, a <failure> listing its findings."""
    suite = ET.Element("testsuite", name=title, tests=str(len(cases)),
                       failures=str(sum(1 for c in cases if c.findings)),
                       skipped=str(sum(1 for c in cases if c.skipped)), time=f"{seconds:.3f}")
    for case in cases:
        tc = ET.SubElement(suite, "testcase", classname=title, name=case.name, time=f"{case.seconds:.3f}")
        if case.skipped:
            ET.SubElement(tc, "skipped", message=case.skipped)
        elif case.findings:
            first = case.findings[0]
            failure = ET.SubElement(tc, "failure", message=first.message, type=first.kind.value)
            failure.text = "\n".join(f.message for f in case.findings)
    root = ET.Element("testsuites")
    root.append(suite)
    tree = ET.ElementTree(root)
    ET.indent(tree)
    tree.write(path, encoding="utf-8", xml_declaration=True)


class CaseSink:
    """Collects a run's results in constant memory: counts every case, keeps at most `keep_failed`
    failed cases for the terminal summary, and streams each case to the JSON and JUnit files as it
    finishes (through temporary files next to them; the totals each format needs up front are
    written at `close`). The files are what `write_json` / `write_junit` write for the same cases."""

    def __init__(self, title: str, *, json_path: Path | None = None, junit_path: Path | None = None,
                 keep_failed: int = 1000) -> None:
        self.title = title
        self.json_path = json_path
        self.junit_path = junit_path
        self.keep_failed = keep_failed
        self.total = self.failed = self.skipped = 0
        self.failures: list[CaseResult] = []  #: the first `keep_failed` failed cases
        self._json_tmp = self._open(json_path)
        self._junit_tmp = self._open(junit_path)
        self._first_json = True

    @staticmethod
    def _open(path: Path | None) -> Any:
        if path is None:
            return None
        return path.with_name(path.name + ".part").open("w", encoding="utf-8")

    @property
    def passed(self) -> int:
        return self.total - self.failed - self.skipped

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def add(self, case: CaseResult) -> None:
        self.total += 1
        if case.findings:
            self.failed += 1
            if len(self.failures) < self.keep_failed:
                self.failures.append(case)
        elif case.skipped:
            self.skipped += 1
        if self._json_tmp is not None:
            item = to_json(self.title, [case], case.seconds)["cases"][0]
            self._json_tmp.write(("" if self._first_json else ",\n") + json.dumps(item, indent=2))
            self._first_json = False
        if self._junit_tmp is not None:
            tc = ET.Element("testcase", classname=self.title, name=case.name, time=f"{case.seconds:.3f}")
            if case.skipped:
                ET.SubElement(tc, "skipped", message=case.skipped)
            elif case.findings:
                first = case.findings[0]
                failure = ET.SubElement(tc, "failure", message=first.message, type=first.kind.value)
                failure.text = "\n".join(f.message for f in case.findings)
            ET.indent(tc, space="  ", level=2)
            self._junit_tmp.write("    " + ET.tostring(tc, encoding="unicode").rstrip() + "\n")

    def summary(self, seconds: float) -> str:
        verdict = "PASS" if self.failed == 0 else "FAIL"
        return (f"{self.title}: {verdict} — {self.passed} passed, {self.failed} failed, {self.skipped} skipped "
                f"of {self.total} cases in {seconds:.1f}s")

    def close(self, seconds: float) -> None:
        if self._json_tmp is not None and self.json_path is not None:
            self._json_tmp.close()
            part = self.json_path.with_name(self.json_path.name + ".part")
            with self.json_path.open("w", encoding="utf-8") as out, part.open(encoding="utf-8") as cases:
                head = {"title": self.title, "passed": self.failed == 0, "seconds": round(seconds, 3)}
                out.write(json.dumps(head, indent=2)[:-2] + ',\n  "cases": [\n')
                for line in cases:
                    out.write("    " + line if line.strip() else line)
                out.write("\n  ]\n}\n")
            part.unlink()
            self._json_tmp = None
        if self._junit_tmp is not None and self.junit_path is not None:
            self._junit_tmp.close()
            part = self.junit_path.with_name(self.junit_path.name + ".part")
            attrs = {"name": self.title, "tests": str(self.total), "failures": str(self.failed),
                     "skipped": str(self.skipped), "time": f"{seconds:.3f}"}
            opening = ET.tostring(ET.Element("testsuite", attrs), encoding="unicode").replace(" />", ">")
            with self.junit_path.open("w", encoding="utf-8") as out, part.open(encoding="utf-8") as cases:
                out.write("<?xml version='1.0' encoding='utf-8'?>\n<testsuites>\n  " + opening + "\n")
                for line in cases:
                    out.write(line)
                out.write("  </testsuite>\n</testsuites>\n")
            part.unlink()
            self._junit_tmp = None
