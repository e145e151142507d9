"""Load run configuration: open loop (`rate`) or closed loop (`concurrency`), for a duration or a count."""

from __future__ import annotations

import bisect
import dataclasses
import math
import random
from dataclasses import dataclass, field

from gateway.load.driver import LoadError

#: open-loop connections when none are given: enough to keep a fixed schedule against a ~1 ms service
DEFAULT_OPEN_LOOP_SESSIONS = 64


@dataclass(frozen=True, slots=True)
class LoadConfig:
    #: open loop: requests per second on a fixed schedule (latency measured from the intended start)
    rate: float | None = None
    #: closed loop: requests kept in flight (each on its own session)
    concurrency: int | None = None
    #: measured seconds, after the warm-up
    duration: float | None = None
    #: measured requests, after the warm-up
    count: int | None = None
    #: seconds of load before measurement starts (excluded from every statistic)
    warmup: float = 0.0
    #: weighted request kinds, e.g. (("purchase", 8), ("refund", 1))
    mix: tuple[tuple[str, float], ...] = (("purchase", 1.0),)
    #: open loop: sessions (connections) requests are spread over; closed loop: always `concurrency`
    sessions: int | None = None
    #: a request without an answer after this long counts as error "timeout" and its session is replaced
    request_timeout: float = 10.0
    #: seeds the kind mix, so runs are repeatable
    seed: int | None = None
    #: result codes counted as success
    ok_codes: frozenset[str] = field(default_factory=lambda: frozenset({"00"}))
    #: open loop: offset of this schedule (seconds), so several worker processes interleave
    phase: float = 0.0

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            raise LoadError("give exactly one of rate (open loop) or concurrency (closed loop)")
        if self.rate is not None and not (math.isfinite(self.rate) and self.rate > 0):
            raise LoadError(f"rate must be a positive number, not {self.rate}")
        if self.concurrency is not None and self.concurrency < 1:
            raise LoadError(f"concurrency must be at least 1, not {self.concurrency}")
        if (self.duration is None) == (self.count is None):
            raise LoadError("give exactly one of duration or count")
        if self.duration is not None and not (math.isfinite(self.duration) and self.duration > 0):
            raise LoadError(f"duration must be a positive number of seconds, not {self.duration}")
        if self.count is not None and self.count < 1:
            raise LoadError(f"count must be at least 1, not {self.count}")
        if not (math.isfinite(self.warmup) and self.warmup >= 0):
            raise LoadError(f"warm-up must be zero or more seconds, not {self.warmup}")
        if self.sessions is not None and self.sessions < 1:
            raise LoadError(f"sessions must be at least 1, not {self.sessions}")
        if not self.mix or any(w < 0 or not math.isfinite(w) for _, w in self.mix) or not any(
            w > 0 for _, w in self.mix
        ):
            raise LoadError("the mix needs at least one kind with a positive weight")
        if not (self.request_timeout > 0):
            raise LoadError("request timeout must be positive")

    @property
    def open_loop(self) -> bool:
        return self.rate is not None

    @property
    def mode(self) -> str:
        return "open" if self.open_loop else "closed"

    @property
    def session_count(self) -> int:
        """How many sessions (= concurrent workers) this run uses."""
        if self.concurrency is not None:
            return self.concurrency
        return self.sessions or DEFAULT_OPEN_LOOP_SESSIONS

    def replace(self, **changes: object) -> LoadConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def parse_mix(text: str) -> tuple[tuple[str, float], ...]:
    """"purchase=8,refund=1,balance=1" → (("purchase", 8.0), ...). A bare name has weight 1."""
    items: list[tuple[str, float]] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, weight_text = part.partition("=")
        name = name.strip()
        if not name:
            raise LoadError(f"mix entry {part!r} has no kind name")
        try:
            weight = float(weight_text) if sep else 1.0
        except ValueError:
            raise LoadError(f"mix weight of {name!r} is not a number: {weight_text!r}") from None
        if weight < 0 or not math.isfinite(weight):
            raise LoadError(f"mix weight of {name!r} must be a non-negative number")
        items.append((name, weight))
    if not items or not any(w > 0 for _, w in items):
        raise LoadError(f"mix {text!r} has no kind with a positive weight")
    return tuple(items)


class KindPicker:
    """Draws request kinds in the mix's proportions (seeded: the same seed gives the same sequence)."""

    __slots__ = ("_cumulative", "_kinds", "_random", "_total")

    def __init__(self, mix: tuple[tuple[str, float], ...], seed: int | None) -> None:
        kinds = [k for k, w in mix if w > 0]
        weights = [w for _, w in mix if w > 0]
        self._kinds = kinds
        self._cumulative = [sum(weights[: i + 1]) for i in range(len(weights))]
        self._total = self._cumulative[-1]
        self._random = random.Random(seed).random

    def pick(self) -> str:
        if len(self._kinds) == 1:
            return self._kinds[0]
        return self._kinds[bisect.bisect_right(self._cumulative, self._random() * self._total)]
