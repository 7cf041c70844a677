"""Lock-free metric families for a single process, exported by a collector at scrape time.

prometheus-client's children take a lock on every update: about 10 us for the seven updates of an
invocation, a tenth of the proxy's CPU per request. The request path runs on one event-loop thread
and so does the scrape, so plain attributes are enough here. With several workers the proxy uses
prometheus-client's own (multiprocess) metrics instead; both offer ``labels(...)`` and the child
methods the recorder calls (``inc``, ``dec``, ``set``, ``observe``).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from typing import TypeVar

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString


class CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class GaugeChild(CounterChild):
    __slots__ = ()

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


class HistogramChild:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.total += value
        self.counts[bisect.bisect_left(self.bounds, value)] += 1


class _Family:
    def __init__(self, name: str, help: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self.children: dict[tuple[str, ...], object] = {}


class Counter(_Family):
    def labels(self, *values: str) -> CounterChild:
        child = self.children.setdefault(tuple(values), CounterChild())
        assert isinstance(child, CounterChild)
        return child

    def collect(self) -> Metric:
        family = CounterMetricFamily(self.name, self.help, labels=self.labelnames)
        for values, child in self.children.items():
            assert isinstance(child, CounterChild)
            family.add_metric(values, child.value)
        return family


class Gauge(_Family):
    def labels(self, *values: str) -> GaugeChild:
        child = self.children.setdefault(tuple(values), GaugeChild())
        assert isinstance(child, GaugeChild)
        return child

    def collect(self) -> Metric:
        family = GaugeMetricFamily(self.name, self.help, labels=self.labelnames)
        for values, child in self.children.items():
            assert isinstance(child, GaugeChild)
            family.add_metric(values, child.value)
        return family


class Histogram(_Family):
    def __init__(self, name: str, help: str, labelnames: Sequence[str], buckets: Sequence[float]) -> None:
        super().__init__(name, help, labelnames)
        self.bounds = tuple(float(b) for b in buckets if b != float("inf"))

    def labels(self, *values: str) -> HistogramChild:
        child = self.children.setdefault(tuple(values), HistogramChild(self.bounds))
        assert isinstance(child, HistogramChild)
        return child

    def collect(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.help, labels=self.labelnames)
        edges = [*(_le(b) for b in self.bounds), "+Inf"]
        for values, child in self.children.items():
            assert isinstance(child, HistogramChild)
            cumulative, buckets = 0, []
            for edge, count in zip(edges, child.counts, strict=True):
                cumulative += count
                buckets.append((edge, float(cumulative)))
            family.add_metric(values, buckets, child.total)
        return family


def _le(bound: float) -> str:
    """The ``le`` label as prometheus-client writes it (``1000.0``, ``1e+06``), so both backends match."""
    return floatToGoString(bound)


F = TypeVar("F", "Counter", "Gauge", "Histogram")


class Families(Collector):
    """Registers with a registry once and yields every family created through it at each scrape."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._families: list[Counter | Gauge | Histogram] = []
        registry.register(self)

    def counter(self, name: str, help: str, labelnames: Sequence[str]) -> Counter:
        return self._add(Counter(name, help, labelnames))

    def gauge(self, name: str, help: str, labelnames: Sequence[str]) -> Gauge:
        return self._add(Gauge(name, help, labelnames))

    def histogram(self, name: str, help: str, labelnames: Sequence[str], buckets: Sequence[float]) -> Histogram:
        return self._add(Histogram(name, help, labelnames, buckets))

    def _add(self, family: F) -> F:
        self._families.append(family)
        return family

    def collect(self) -> Iterable[Metric]:
        return [family.collect() for family in self._families]
