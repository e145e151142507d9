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
