"""The instance metrics: a sampler that measures the watched containers, a background ticker, and the
Prometheus collector that shows the latest sample.

The ticker samples every interval in a thread (statvfs and NVML may block), keeps the latest sample
for /metrics and adds each value to the CloudWatch statistic sets, so a period's Average and Maximum
are those of its samples.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from metrics import definitions as d
from metrics.cgroups import CgroupError, Cgroups
from metrics.gpu import Gpus, load_nvml
from metrics.statistics import PeriodStatistics

log = logging.getLogger("proxy.host")


@dataclass(frozen=True)
class HostSample:
    """Percentages; None where there is nothing to report (no GPU, or the first CPU interval)."""

    cpu: float | None = None
    memory: float | None = None
    gpu: float | None = None
    gpu_memory: float | None = None
    disk: float | None = None


# Each HostSample field and the metric it is.
SAMPLE_METRICS: tuple[tuple[str, d.MetricDefinition], ...] = (
    ("cpu", d.CPU_UTILIZATION),
    ("memory", d.MEMORY_UTILIZATION),
    ("gpu", d.GPU_UTILIZATION),
    ("gpu_memory", d.GPU_MEMORY_UTILIZATION),
    ("disk", d.DISK_UTILIZATION),
)


def disk_percent(path: str, statvfs: Callable[[str], os.statvfs_result] = os.statvfs) -> float:
    """Used space of the file system holding ``path`` (or ``/`` while it does not exist), as ``df`` shows it:
    used over used plus what is available to users, so the blocks reserved for root do not count as free."""
    try:
        st = statvfs(path)
    except FileNotFoundError:
        st = statvfs("/")
    used = st.f_blocks - st.f_bfree
    usable = used + st.f_bavail
    return used / usable * 100.0 if usable else 0.0


class HostSampler:
    """Measures the watched cgroups, the GPUs (if any) and the model's disk. ``sample`` blocks briefly."""

    def __init__(
        self,
        cgroups: Cgroups | None,
        gpus: Gpus | None,
        model_dir: str,
        statvfs: Callable[[str], os.statvfs_result] = os.statvfs,
    ) -> None:
        self._cgroups = cgroups
        self._gpus = gpus
        self._model_dir = model_dir
        self._statvfs = statvfs

    def sample(self) -> HostSample:
        gpu = self._gpus.read() if self._gpus is not None else None
        try:
            disk: float | None = disk_percent(self._model_dir, self._statvfs)
        except OSError as e:
            log.debug("no disk utilization: %s", e)
            disk = None
        cgroups = self._cgroups
        return HostSample(
            cpu=cgroups.cpu.percent() if cgroups else None,
            memory=cgroups.memory.percent() if cgroups else None,
            gpu=gpu.utilization if gpu else None,
            gpu_memory=gpu.memory if gpu else None,
            disk=disk,
        )

    def close(self) -> None:
        if self._gpus is not None:
            self._gpus.close()


class HostMonitor:
    """Samples every ``interval_s`` in the background; the latest sample is ``latest``."""

    def __init__(
        self,
        sampler: HostSampler,
        interval_s: float,
        statistics: PeriodStatistics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sampler = sampler
        self.interval_s = interval_s
        self._statistics = statistics
        self._clock = clock
        self.latest = HostSample()

    def record(self, sample: HostSample) -> None:
        self.latest = sample
        stats = self._statistics
        if stats is None:
            return
        sets = stats.current()
        for name, metric in SAMPLE_METRICS:
            value = getattr(sample, name)
            if value is not None:
                stats.add(sets, metric.cloudwatch_name or "", value)

    async def run(self) -> None:
        """Forever, on a fixed schedule: a slow sample delays the next one, never shifts them all."""
        next_at = self._clock()
        try:
            while True:
                try:
                    self.record(await asyncio.to_thread(self._sampler.sample))
                except Exception:  # a sampling bug must not end the ticker: log it, try again next time
                    log.exception("host sampling failed")
                next_at += self.interval_s
                now = self._clock()
                if next_at < now:  # fell behind (a suspended process): start afresh rather than catch up
                    next_at = now
                await asyncio.sleep(next_at - now)
        finally:
            self._sampler.close()


class HostCollector(Collector):
    """The latest sample as Prometheus gauges with ``labels`` (endpoint_name, variant_name and host, or host);
    a metric with no value, such as GPUUtilization without a GPU, is left out."""

    def __init__(self, latest: Callable[[], HostSample], labels: Mapping[str, str]) -> None:
        self._latest = latest
        self._names = list(labels)
        self._values = list(labels.values())

    def describe(self) -> Iterator[GaugeMetricFamily]:
        for _, metric in SAMPLE_METRICS:
            yield GaugeMetricFamily(metric.prometheus_name, metric.help, labels=self._names)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        sample = self._latest()
        for name, metric in SAMPLE_METRICS:
            value = getattr(sample, name)
            if value is not None:
                family = GaugeMetricFamily(metric.prometheus_name, metric.help, labels=self._names)
                family.add_metric(self._values, value)
                yield family


def open_sampler(
    *,
    watch_cgroups: tuple[str, ...],
    model_dir: str,
    root: Path = Path("/"),
    nvml: object | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> HostSampler:
    """The sampler for this process's cgroup and ``watch_cgroups``; raises CgroupError if one of those is
    missing. Without readable cgroups of its own and none named, it samples no CPU and memory and says so.
    ``nvml`` is the NVML module, by default the real one when installed."""
    try:
        cgroups: Cgroups | None = Cgroups.discover(root, watch_cgroups, clock=clock)
    except CgroupError as e:
        if watch_cgroups:
            raise
        log.warning("no CPU or memory utilization: %s", e)
        cgroups = None
    gpus = Gpus.open(nvml if nvml is not None else load_nvml())
    return HostSampler(cgroups, gpus, model_dir)
