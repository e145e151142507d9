"""How fast a replay goes: as recorded, scaled (``xN``: N times faster), or as fast as causality allows
(``asap``). Host answers keep their recorded delay when the SUT had given up on them (late answers),
so a recorded timeout stays a timeout at any pace."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

_PACE_RE: Final = re.compile(r"x(\d+(\.\d+)?)")


@dataclass(frozen=True, slots=True)
class Pace:
    kind: Literal["recorded", "asap", "scaled"] = "asap"
    factor: float = 1.0

    @classmethod
    def parse(cls, text: str) -> Pace:
        if text == "recorded":
            return cls("recorded")
        if text == "asap":
            return cls("asap")
        m = _PACE_RE.fullmatch(text)
        if m is None or float(m.group(1)) <= 0:
            raise ValueError(f"pace must be recorded, asap or xN (e.g. x10), got {text!r}")
        return cls("scaled", float(m.group(1)))

    def offset(self, recorded: float) -> float | None:
        """When (seconds after the start) something recorded `recorded` seconds in happens; None: now."""
        if self.kind == "asap":
            return None
        return recorded / self.factor

    def host_delay(self, delay: float | None, late: bool) -> float:
        """How long the trace host waits before an answer recorded `delay` after its request. A late
        answer (the SUT had given up) keeps its recorded delay, so a timeout stays a timeout."""
        if delay is None:
            return 0.0
        if late or self.kind == "recorded":
            return delay
        return 0.0 if self.kind == "asap" else delay / self.factor

    def __str__(self) -> str:
        return self.kind if self.kind != "scaled" else f"x{self.factor:g}"
