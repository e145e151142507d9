"""Loading a run's rules: the shipped defaults (specs/trace-rules.toml), then the run's own file with
its ``[[rules]]``, ``[[case]]`` templates and ``[settings]``.

    [settings]
    pin = "123456"          # the lab PIN the player puts in PIN blocks for surrogate cards
    defaults = true         # false: ignore specs/trace-rules.toml entirely
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from gateway.iso.subfields import spec_path
from gateway.trace.rules import RuleEntry, RulesError, RuleSet, parse_entries
from gateway.trace.templates import Template, parse_templates

DEFAULTS_FILE: Final = "trace-rules.toml"
SUFFIX: Final = ".rules.toml"
_SETTINGS: Final = {"pin": str, "defaults": bool}


@dataclass(frozen=True, slots=True)
class RulesFile:
    rules: RuleSet
    templates: list[Template] = field(default_factory=list)
    pin: str | None = None
    source: str = "defaults"


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RulesError(f"{path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"{path}: {exc}") from None


def beside(trace: Path) -> Path:
    """The rules file that goes with a trace: run.jsonl → run.rules.toml."""
    name = trace.name
    stem = name.split(".", 1)[0] if "." in name else name
    return trace.with_name(stem + SUFFIX)


def load_rules(path: Path | None, *, trace: Path | None = None) -> RulesFile:
    """Defaults plus `path` (or, without one, the file beside `trace` when there is one)."""
    if path is None and trace is not None and beside(trace).is_file():
        path = beside(trace)
    doc = _read(path) if path is not None else {}
    source = str(path) if path is not None else "defaults"
    unknown = set(doc) - {"rules", "case", "settings", "version"}
    if unknown:
        raise RulesError(f"{source}: unknown top-level keys {sorted(unknown)} (rules, case, settings)")
    settings = doc.get("settings", {})
    if not isinstance(settings, dict):
        raise RulesError(f"{source}: settings must be a table")
    for key, value in settings.items():
        kind = _SETTINGS.get(key)
        if kind is None or not isinstance(value, kind):
            raise RulesError(f"{source}: settings.{key}: unknown setting or wrong type")
    entries: list[RuleEntry] = []
    if settings.get("defaults", True):
        entries += parse_entries(_read(spec_path(DEFAULTS_FILE)).get("rules"), DEFAULTS_FILE, file_rank=0)
    entries += parse_entries(doc.get("rules"), source, file_rank=1, first_order=len(entries))
    rules = RuleSet(entries)
    captures, refs = rules.names()
    orphan = sorted(refs - captures)
    if orphan:
        raise RulesError(f"{source}: ref {orphan[0]} names nothing a capture records")
    return RulesFile(rules, parse_templates(doc.get("case"), source), settings.get("pin"), source)
