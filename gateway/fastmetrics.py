"""Histograms, counters and gauges for the money path that cost a tenth of prometheus-client's children.

prometheus-client's `Histogram.observe` takes two locks (sum and bucket) and walks the bucket list in
Python: 0.6–1.0 µs per call on this machine, and a transaction makes about ten such calls. Every call
here happens on the gateway's event-loop thread, so no lock is needed: `observe` is one C `bisect`,
a list increment and a float addition (~0.13 µs, `bench/metrics_cost.py`). prometheus-client still
does everything else: these are registered as custom collectors on its registry and rendered by its
exposition code (text format and OpenMetrics alike).

Thread-safety: observe from one thread only (the event loop). A scrape reads the counts on the same
loop, so it always sees a consistent snapshot.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class HistogramChild:
    """One labelled series: `observe(seconds)`."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        #: per bucket (not cumulative), the last slot is +Inf
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        # bisect_left: the first bound >= amount, i.e. Prometheus's "le" (less than or equal)
        self.counts[bisect_left(self._bounds, amount)] += 1
        self.sum += amount


class CounterChild:
    """One labelled series: `inc(amount=1)`."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class GaugeChild:
    """One labelled series: `inc`, `dec`, `set`, or `set_function` (read at scrape time)."""

    __slots__ = ("function", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.function: Callable[[], float] | None = None

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)

    def set_function(self, f: Callable[[], float]) -> None:
        self.function = f

    def read(self) -> float:
        return float(self.function()) if self.function is not None else self.value


class _Family(Collector):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: CollectorRegistry | None = None) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], object] = {}
        if registry is not None:
            registry.register(self)

    def _check(self, values: tuple[str, ...]) -> None:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")

    def describe(self) -> Iterator[Metric]:
        # lets the registry refuse a second metric of the same name, as it does for its own types
        yield self._family()

    def _family(self) -> Metric:
        raise NotImplementedError


class FastHistogram(_Family):
    """A histogram family; `labels(*values)` binds a child once (keep it, do not call per event)."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], *,
                 labelnames: Sequence[str] = (), registry: CollectorRegistry | None = None) -> None:
        bounds = tuple(float(b) for b in buckets)
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError("buckets must be distinct and increasing")
        self.bounds = bounds
        self._le = [floatToGoString(b) for b in bounds] + ["+Inf"]
        super().__init__(name, documentation, labelnames, registry)

    def labels(self, *values: str) -> HistogramChild:
        self._check(values)
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = HistogramChild(self.bounds)
        return child  # type: ignore[return-value]

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, child in list(self._children.items()):
            assert isinstance(child, HistogramChild)
            cumulative, buckets = 0, []
            for le, n in zip(self._le, list(child.counts), strict=True):
                cumulative += n
                buckets.append((le, cumulative))
            family.add_metric(list(values), buckets, child.sum)
        yield family


class FastCounter(_Family):
    """A counter family (exposed as NAME_total); `labels(*values)` binds a child once."""

    def labels(self, *values: str) -> CounterChild:
        self._check(values)
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = CounterChild()
        return child  # type: ignore[return-value]

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, child in list(self._children.items()):
            assert isinstance(child, CounterChild)
            family.add_metric(list(values), child.value)
        yield family


class FastGauge(_Family):
    """A gauge family; `labels(*values)` binds a child once."""

    def labels(self, *values: str) -> GaugeChild:
        self._check(values)
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = GaugeChild()
        return child  # type: ignore[return-value]

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, child in list(self._children.items()):
            assert isinstance(child, GaugeChild)
            family.add_metric(list(values), child.read())
        yield family
