"""The host sampler, its background ticker, the Prometheus gauges and the CloudWatch statistic sets (unit)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from metrics.cgroups import Cgroups
from metrics.cloudwatch import CloudWatchTarget, datums
from metrics.gpu import Gpus
from metrics.host import HostCollector, HostMonitor, HostSample, HostSampler, disk_percent, open_sampler
from metrics.statistics import PeriodStatistics, StatisticSet
from tests.test_host_cgroups import GIB, V1_MOUNTS, Clock, proc, v1_cgroup
from tests.test_host_gpu import Device, FakeNvml, Memory


def statvfs_result(blocks: int, bfree: int, bavail: int) -> os.statvfs_result:
    return os.statvfs_result((4096, 4096, blocks, bfree, bavail, 100, 50, 50, 0, 255))


def test_disk_is_used_over_used_plus_available_as_df_shows() -> None:
    # 300 free blocks, of which 100 are kept for root: df shows 700 / (700 + 200).
    assert disk_percent("/opt/ml/model", lambda path: statvfs_result(1000, 300, 200)) == pytest.approx(700 / 900 * 100)


def test_disk_falls_back_to_the_root_while_the_model_dir_is_missing() -> None:
    asked: list[str] = []

    def statvfs(path: str) -> os.statvfs_result:
        asked.append(path)
        if path != "/":
            raise FileNotFoundError(path)
        return statvfs_result(100, 75, 75)

    assert disk_percent("/opt/ml/model", statvfs) == 25.0
    assert asked == ["/opt/ml/model", "/"]


def test_a_sample_has_every_metric(tmp_path: Path) -> None:
    proc(tmp_path, V1_MOUNTS, "4:memory:/ctr\n2:cpu,cpuacct:/ctr\n")
    v1_cgroup(tmp_path, "/ctr", usage_ns=0, memory=GIB, limit=4 * GIB)
    clock = Clock()
    nvml = FakeNvml([Device(30, Memory(8 * GIB, 2 * GIB)), Device(60, Memory(8 * GIB, 4 * GIB))])
    sampler = HostSampler(Cgroups.discover(tmp_path, [], clock=clock), Gpus.open(nvml), "/opt/ml/model", lambda path: statvfs_result(1000, 500, 500))
    v1_cgroup(tmp_path, "/ctr", usage_ns=2_000_000_000, memory=GIB, limit=4 * GIB)
    clock.now += 10
    assert sampler.sample() == HostSample(cpu=20.0, memory=25.0, gpu=90.0, gpu_memory=75.0, disk=50.0)
    sampler.close()
    assert not nvml.initialised


def test_without_cgroups_cpu_and_memory_are_absent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    proc(tmp_path, "22 27 0:21 / /proc rw,relatime - proc proc rw\n", "0::/\n")
    with caplog.at_level("WARNING", logger="proxy.host"):
        sampler = open_sampler(watch_cgroups=(), model_dir="/", root=tmp_path, nvml=FakeNvml([]))
    sample = sampler.sample()
    assert (sample.cpu, sample.memory, sample.gpu, sample.gpu_memory) == (None, None, None, None)
    assert sample.disk is not None
    assert any("no CPU or memory utilization" in r.getMessage() for r in caplog.records)


class Samples:
    """A sampler that hands out the given samples, then repeats the last."""

    def __init__(self, *samples: HostSample) -> None:
        self.samples = list(samples)
        self.taken = 0
        self.closed = False

    def sample(self) -> HostSample:
        self.taken += 1
        return self.samples.pop(0) if len(self.samples) > 1 else self.samples[0]

    def close(self) -> None:
        self.closed = True


def test_statistic_sets_give_average_and_maximum_of_the_samples() -> None:
    now = [6000.0]
    stats = PeriodStatistics(60, wallclock=lambda: now[0])
    monitor = HostMonitor(Samples(), 10, stats)  # type: ignore[arg-type]
    for cpu in (10.0, 30.0, 20.0):
        monitor.record(HostSample(cpu=cpu, memory=50.0, disk=5.0))
    now[0] += 60
    [period] = stats.take_closed()
    assert period.sets["CPUUtilization"] == StatisticSet(count=3, total=60.0, minimum=10.0, maximum=30.0)
    assert period.sets["MemoryUtilization"] == StatisticSet(count=3, total=150.0, minimum=50.0, maximum=50.0)
    assert "GPUUtilization" not in period.sets  # absent, not zero
    target = CloudWatchTarget(
        "/aws/sagemaker/Endpoints", (("Host", "e/v/i-1"),), 60, also_dimensions=((("EndpointName", "e"), ("VariantName", "v")),)
    )
    units = {"CPUUtilization": "Percent", "MemoryUtilization": "Percent", "DiskUtilization": "Percent"}
    cpu = [x for x in datums(period, target, units) if x["MetricName"] == "CPUUtilization"]
    assert [x["Dimensions"] for x in cpu] == [
        [{"Name": "Host", "Value": "e/v/i-1"}],
        [{"Name": "EndpointName", "Value": "e"}, {"Name": "VariantName", "Value": "v"}],
    ]
    assert cpu[0]["StatisticValues"] == {"SampleCount": 3.0, "Sum": 60.0, "Minimum": 10.0, "Maximum": 30.0}
    assert cpu[0]["Unit"] == "Percent"


def test_the_gauges_show_the_latest_sample_and_leave_out_what_is_absent() -> None:
    monitor = HostMonitor(Samples(), 10)  # type: ignore[arg-type]
    registry = CollectorRegistry()
    labels = {"endpoint_name": "e", "variant_name": "v", "host": "e/v/i-1"}
    registry.register(HostCollector(lambda: monitor.latest, labels))
    assert registry.get_sample_value("sagemaker_cpu_utilization_percent", labels) is None
    monitor.record(HostSample(cpu=12.5, memory=40.0, disk=3.0))
    assert registry.get_sample_value("sagemaker_cpu_utilization_percent", labels) == 12.5
    assert registry.get_sample_value("sagemaker_memory_utilization_percent", labels) == 40.0
    assert registry.get_sample_value("sagemaker_disk_utilization_percent", labels) == 3.0
    assert b"sagemaker_gpu" not in generate_latest(registry)


def test_the_ticker_samples_on_schedule_and_closes_the_sampler() -> None:
    sampler = Samples(HostSample(cpu=1.0), HostSample(cpu=2.0), HostSample(cpu=3.0))

    async def run_for(seconds: float) -> HostMonitor:
        monitor = HostMonitor(sampler, 0.1)  # type: ignore[arg-type]
        task = asyncio.create_task(monitor.run())
        await asyncio.sleep(seconds)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return monitor

    monitor = asyncio.run(run_for(0.35))
    assert sampler.taken in (3, 4)  # at 0, 0.1, 0.2 and 0.3 s, the last one late on a loaded machine
    assert monitor.latest == HostSample(cpu=3.0)
    assert sampler.closed


def test_a_failing_sample_does_not_stop_the_ticker(caplog: pytest.LogCaptureFixture) -> None:
    class Flaky(Samples):
        def sample(self) -> HostSample:
            self.taken += 1
            if self.taken == 1:
                raise RuntimeError("boom")
            return HostSample(cpu=5.0)

    sampler = Flaky()

    async def run() -> HostMonitor:
        monitor = HostMonitor(sampler, 0.05)  # type: ignore[arg-type]
        task = asyncio.create_task(monitor.run())
        await asyncio.sleep(0.12)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return monitor

    assert asyncio.run(run()).latest == HostSample(cpu=5.0)
    assert any("host sampling failed" in r.getMessage() for r in caplog.records)


def test_the_sampler_costs_well_under_one_percent_of_a_cpu() -> None:
    """1000 samples of this machine's real cgroups, disk and (absent) GPU; the figure is in the README."""
    sampler: HostSampler = open_sampler(watch_cgroups=(), model_dir="/opt/ml/model")
    sampler.sample()
    start = time.process_time()
    for _ in range(1000):
        sampler.sample()
    per_sample_s = (time.process_time() - start) / 1000
    sampler.close()
    share_at_default_interval = per_sample_s / 10
    print(f"host sampler: {per_sample_s * 1e6:.0f} us of CPU per sample, {share_at_default_interval * 100:.4f}% of one CPU at 10 s")
    assert share_at_default_interval < 0.001  # under 0.1% of one CPU
