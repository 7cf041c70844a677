"""Lock-free metric families, exported by a collector at scrape time.

prometheus-client's children take a lock on every update: about 10 us for the seven updates of an
invocation, a tenth of the proxy's CPU per request. The request path runs on one event-loop thread
and so does the scrape, so plain attributes are enough here.

With several workers (``SharedFiles``), each value is also written, still without a lock, to this
worker's file in prometheus-client's multiprocess format: one writer per file, the worker's event
loop, and an 8-byte slice assignment that a reader never sees half-done. The supervisor merges the
files at every scrape with prometheus-client's ``MultiProcessCollector``; a worker that dies leaves its
counters and histograms behind (nothing counted is lost), and ``mark_process_dead`` drops its live gauges.
"""

from __future__ import annotations

import bisect
import os
import struct
import time
from collections.abc import Iterable, Sequence
from typing import TypeVar

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from metrics.definitions import Kind, MetricDefinition

_pack_double = struct.Struct("d").pack


class SharedFiles:
    """One worker's multiprocess files (``counter_<pid>.db``, ``histogram_<pid>.db``, ``gauge_livesum_<pid>.db``...)
    in ``directory``, named as prometheus-client names them so that its collector and ``mark_process_dead`` apply."""

    def __init__(self, directory: str, pid: int | None = None) -> None:
        self._directory = directory
        self._pid = os.getpid() if pid is None else pid
        self._files: dict[str, MmapedDict] = {}

    def slot(self, prefix: str, metric_name: str, name: str, labelnames: Sequence[str], labelvalues: Sequence[str], help: str) -> Slot:
        file = self._files.get(prefix)
        if file is None:
            file = self._files[prefix] = MmapedDict(os.path.join(self._directory, f"{prefix}_{self._pid}.db"))
        key = mmap_key(metric_name, name, list(labelnames), list(labelvalues), help)
        file.write_value(key, 0.0, 0.0)
        return Slot(file, file._positions[key])

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()


class Slot:
    """Where one value lives in a worker's file. The file's mapping may be replaced when it grows, so it is looked up per write."""

    __slots__ = ("file", "pos")

    def __init__(self, file: MmapedDict, pos: int) -> None:
        self.file = file
        self.pos = pos

    def write(self, value: float) -> None:
        self.file._m[self.pos:self.pos + 8] = _pack_double(value)


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


class SharedCounterChild(CounterChild):
    __slots__ = ("slot",)

    def __init__(self, slot: Slot) -> None:
        super().__init__()
        self.slot = slot

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount
        self.slot.write(self.value)


class SharedGaugeChild(GaugeChild):
    # One base, not SharedCounterChild too: a compiled (mypyc) class has a single base class.
    __slots__ = ("slot",)

    def __init__(self, slot: Slot) -> None:
        super().__init__()
        self.slot = slot

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount
        self.slot.write(self.value)

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount
        self.slot.write(self.value)

    def set(self, value: float) -> None:
        self.value = value
        self.slot.write(value)


class HistogramChild:
    __slots__ = ("bounds", "counts", "exemplars", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last one is +Inf
        self.total = 0.0
        self.exemplars: list[Exemplar | None] | None = None  # per bucket, the latest traced observation

    def observe(self, value: float) -> None:
        self.total += value
        self.counts[bisect.bisect_left(self.bounds, value)] += 1

    def observe_traced(self, value: float, trace_id: str) -> None:
        """An observation with the trace it belongs to: the bucket's exemplar in the OpenMetrics exposition."""
        self.observe(value)
        if self.exemplars is None:
            self.exemplars = [None] * len(self.counts)
        self.exemplars[bisect.bisect_left(self.bounds, value)] = Exemplar({"trace_id": trace_id}, value, time.time())


class SharedHistogramChild(HistogramChild):
    __slots__ = ("bucket_slots", "sum_slot")

    def __init__(self, bounds: tuple[float, ...], bucket_slots: list[Slot], sum_slot: Slot) -> None:
        super().__init__(bounds)
        self.bucket_slots = bucket_slots
        self.sum_slot = sum_slot

    def observe(self, value: float) -> None:
        self.total += value
        i = bisect.bisect_left(self.bounds, value)
        self.counts[i] += 1
        self.bucket_slots[i].write(self.counts[i])
        self.sum_slot.write(self.total)

    def observe_traced(self, value: float, trace_id: str) -> None:
        self.observe(value)  # prometheus-client's multiprocess files hold no exemplars


class _Family:
    def __init__(self, definition: MetricDefinition, labelnames: Sequence[str], shared: SharedFiles | None) -> None:
        self.name = definition.prometheus_name
        self.help = definition.help
        self.labelnames = tuple(labelnames)
        self.shared = shared
        self.children: dict[tuple[str, ...], object] = {}


class Counter(_Family):
    def labels(self, *values: str) -> CounterChild:
        child = self.children.get(values)
        if child is None:
            if self.shared is None:
                child = CounterChild()
            else:
                base = self.name.removesuffix("_total")
                child = SharedCounterChild(self.shared.slot("counter", base, base + "_total", self.labelnames, values, self.help))
            self.children[values] = child
        assert isinstance(child, CounterChild)
        return child

    def collect(self) -> Metric:
        family = CounterMetricFamily(self.name, self.help, labels=self.labelnames)
        for values, child in self.children.items():
            assert isinstance(child, CounterChild)
            family.add_metric(values, child.value)
        return family


class Gauge(_Family):
    def __init__(self, definition: MetricDefinition, labelnames: Sequence[str], shared: SharedFiles | None) -> None:
        super().__init__(definition, labelnames, shared)
        self.prefix = f"gauge_{definition.multiprocess_mode}"

    def labels(self, *values: str) -> GaugeChild:
        child = self.children.get(values)
        if child is None:
            if self.shared is None:
                child = GaugeChild()
            else:
                child = SharedGaugeChild(self.shared.slot(self.prefix, self.name, self.name, self.labelnames, values, self.help))
            self.children[values] = child
        assert isinstance(child, GaugeChild)
        return child

    def collect(self) -> Metric:
        family = GaugeMetricFamily(self.name, self.help, labels=self.labelnames)
        for values, child in self.children.items():
            assert isinstance(child, GaugeChild)
            family.add_metric(values, child.value)
        return family


class Histogram(_Family):
    def __init__(self, definition: MetricDefinition, labelnames: Sequence[str], shared: SharedFiles | None, buckets: Sequence[float]) -> None:
        super().__init__(definition, labelnames, shared)
        self.bounds = tuple(float(b) for b in buckets if b != float("inf"))
        self.edges = [*(_le(b) for b in self.bounds), "+Inf"]

    def labels(self, *values: str) -> HistogramChild:
        child = self.children.get(values)
        if child is None:
            shared = self.shared
            if shared is None:
                child = HistogramChild(self.bounds)
            else:
                name, names = self.name, (*self.labelnames, "le")
                buckets = [shared.slot("histogram", name, name + "_bucket", names, (*values, le), self.help) for le in self.edges]
                total = shared.slot("histogram", name, name + "_sum", self.labelnames, values, self.help)
                child = SharedHistogramChild(self.bounds, buckets, total)
            self.children[values] = child
        assert isinstance(child, HistogramChild)
        return child

    def collect(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.help, labels=self.labelnames)
        for values, child in self.children.items():
            assert isinstance(child, HistogramChild)
            cumulative, buckets = 0, []
            exemplars = child.exemplars
            for i, (edge, count) in enumerate(zip(self.edges, child.counts, strict=True)):
                cumulative += count
                exemplar = exemplars[i] if exemplars is not None else None
                buckets.append((edge, float(cumulative)) if exemplar is None else (edge, float(cumulative), exemplar))
            family.add_metric(values, buckets, child.total)
        return family


def _le(bound: float) -> str:
    """The ``le`` label as prometheus-client writes it (``1000.0``, ``1e+06``), so both backends match."""
    return floatToGoString(bound)


F = TypeVar("F", "Counter", "Gauge", "Histogram")


class Families(Collector):
    """Builds each family from its definition and yields them all at each scrape.

    ``shared``: this worker's multiprocess files, which every value is also written to."""

    def __init__(self, registry: CollectorRegistry, shared: SharedFiles | None = None) -> None:
        self._families: list[Counter | Gauge | Histogram] = []
        self._shared = shared
        registry.register(self)

    def family(self, definition: MetricDefinition, labelnames: Sequence[str], buckets: Sequence[float] = ()) -> Counter | Gauge | Histogram:
        """The family of the definition's kind."""
        if definition.kind is Kind.COUNTER:
            return self.counter(definition, labelnames)
        if definition.kind is Kind.GAUGE:
            return self.gauge(definition, labelnames)
        return self.histogram(definition, labelnames, buckets or definition.buckets)

    def counter(self, definition: MetricDefinition, labelnames: Sequence[str]) -> Counter:
        assert definition.kind is Kind.COUNTER, definition
        return self._add(Counter(definition, labelnames, self._shared))

    def gauge(self, definition: MetricDefinition, labelnames: Sequence[str]) -> Gauge:
        assert definition.kind is Kind.GAUGE, definition
        return self._add(Gauge(definition, labelnames, self._shared))

    def histogram(self, definition: MetricDefinition, labelnames: Sequence[str], buckets: Sequence[float]) -> Histogram:
        assert definition.kind is Kind.HISTOGRAM, definition
        return self._add(Histogram(definition, labelnames, self._shared, buckets))

    def _add(self, family: F) -> F:
        self._families.append(family)
        return family

    def collect(self) -> Iterable[Metric]:
        return [family.collect() for family in self._families]
