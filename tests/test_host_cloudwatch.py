"""Instance metrics in CloudWatch: moto's server on loopback, read back with boto3's get_metric_statistics."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from prometheus_client import CollectorRegistry

from metrics.cloudwatch import CloudWatchPublisher, CloudWatchTarget, PublisherHealth
from metrics.host import HostMonitor, HostSample
from metrics.statistics import PeriodStatistics
from tests.conftest import Proxy, Running, free_port
from tests.test_cloudwatch import cloudwatch_flags
from tests.test_monitor import HOST_GAUGES, scrape, wait_for_samples

ENDPOINTS = "/aws/sagemaker/Endpoints"
TRAINING_JOBS = "/aws/sagemaker/TrainingJobs"
VARIANT = {"EndpointName": "test-endpoint", "VariantName": "AllTraffic"}
IRIS = {"instances": [[5.1, 3.5, 1.4, 0.2]]}




def statistics(endpoint_url: str, namespace: str, metric: str, dimensions: dict[str, str]) -> dict[str, Any]:
    """SampleCount, Sum, Minimum, Maximum, Average and Unit of one metric and dimension set over the last minutes."""
    client = boto3.client("cloudwatch", endpoint_url=endpoint_url, region_name="us-east-1")
    now = datetime.now(UTC)
    response = client.get_metric_statistics(
        Namespace=namespace,
        MetricName=metric,
        Dimensions=[{"Name": k, "Value": v} for k, v in dimensions.items()],
        StartTime=now - timedelta(minutes=10),
        EndTime=now + timedelta(minutes=5),
        Period=3600,
        Statistics=["SampleCount", "Sum", "Minimum", "Maximum", "Average"],
    )
    points = response["Datapoints"]
    if not points:
        return {}
    assert len(points) == 1, points
    return {k: points[0].get(k) for k in ("SampleCount", "Sum", "Minimum", "Maximum", "Average", "Unit")}


def wait_for(endpoint_url: str, namespace: str, metric: str, dimensions: dict[str, str], samples: int, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline:
        seen = statistics(endpoint_url, namespace, metric, dimensions)
        if seen.get("SampleCount", 0) >= samples:
            return seen
        time.sleep(0.25)
    raise AssertionError(f"{namespace} {metric} {dimensions}: wanted {samples} samples, CloudWatch has {seen}")


def test_average_and_maximum_are_those_of_the_samples(moto: Running, aws_env: None) -> None:
    """Known samples through the real publisher and boto3 into moto: exact statistics under both dimension sets."""
    host = f"e/v/i-{uuid.uuid4().hex[:6]}"
    now = [time.time()]
    stats = PeriodStatistics(60, wallclock=lambda: now[0])
    monitor = HostMonitor(None, 10, stats)  # type: ignore[arg-type]  # fed by hand below
    for cpu, memory in ((10.0, 40.0), (30.0, 40.0), (20.0, 43.0)):
        monitor.record(HostSample(cpu=cpu, memory=memory))
    target = CloudWatchTarget(
        ENDPOINTS, (("Host", host),), 60, region="us-east-1", endpoint_url=moto.url,
        also_dimensions=((("EndpointName", "e"), ("VariantName", "v")),),
    )
    health = PublisherHealth(CollectorRegistry(), labels={"host": host})
    publisher = CloudWatchPublisher(stats, target, health, buffer_periods=10)
    assert asyncio.run(publisher.flush(10)) is True
    for dimensions in ({"Host": host}, {"EndpointName": "e", "VariantName": "v"}):
        cpu = statistics(moto.url, ENDPOINTS, "CPUUtilization", dimensions)
        assert cpu == {"SampleCount": 3, "Sum": 60, "Minimum": 10, "Maximum": 30, "Average": 20, "Unit": "Percent"}
        memory = statistics(moto.url, ENDPOINTS, "MemoryUtilization", dimensions)
        assert (memory["Average"], memory["Maximum"]) == (pytest.approx(41.0), 43.0)
        assert statistics(moto.url, ENDPOINTS, "GPUUtilization", dimensions) == {}  # absent, never published as 0


@pytest.mark.e2e
def test_the_proxy_publishes_instance_metrics_by_host_and_by_variant(
    model: Running, moto: Running, aws_env: None, start_proxy: Callable[..., Proxy]
) -> None:
    namespace = f"Test{uuid.uuid4().hex[:8]}"
    instance = f"i-{uuid.uuid4().hex[:8]}"
    proxy = start_proxy(model.url, *cloudwatch_flags(moto.url, namespace), "--sample-interval", "0.2", "--instance-id", instance)
    assert httpx.post(f"{proxy.url}/invocations", json=IRIS).status_code == 200
    by_host = {"Host": f"test-endpoint/AllTraffic/{instance}"}
    for metric in ("CPUUtilization", "MemoryUtilization", "DiskUtilization"):
        seen = wait_for(moto.url, ENDPOINTS, metric, by_host, samples=5)
        assert seen["Unit"] == "Percent"
        assert 0 <= seen["Minimum"] <= seen["Maximum"]
        assert seen["Minimum"] - 1e-9 <= seen["Average"] <= seen["Maximum"] + 1e-9  # Sum / SampleCount, in floating point
        assert wait_for(moto.url, ENDPOINTS, metric, VARIANT, samples=5)["Unit"] == "Percent"
    disk = statistics(moto.url, ENDPOINTS, "DiskUtilization", by_host)
    labels = {"endpoint_name": "test-endpoint", "variant_name": "AllTraffic", "host": by_host["Host"]}
    assert disk["Average"] == pytest.approx(proxy.value("sagemaker_disk_utilization_percent", host=labels["host"]), abs=0.5)
    assert statistics(moto.url, ENDPOINTS, "GPUUtilization", by_host) == {}
    # The invocation metrics stay in their own namespace, and the instance metrics out of it.
    assert wait_for(moto.url, namespace, "Invocations", VARIANT, samples=1)["Sum"] == 1
    assert statistics(moto.url, namespace, "CPUUtilization", VARIANT) == {}


@pytest.mark.e2e
def test_with_workers_the_supervisor_publishes_the_instance_metrics(
    model: Running, moto: Running, aws_env: None, start_proxy: Callable[..., Proxy]
) -> None:
    namespace = f"Test{uuid.uuid4().hex[:8]}"
    instance = f"i-{uuid.uuid4().hex[:8]}"
    proxy = start_proxy(
        model.url, *cloudwatch_flags(moto.url, namespace), "--workers", "2", "--sample-interval", "0.2", "--instance-id", instance
    )
    for _ in range(4):
        assert httpx.post(f"{proxy.url}/invocations", json=IRIS).status_code == 200
    wait_for(moto.url, ENDPOINTS, "CPUUtilization", {"Host": f"test-endpoint/AllTraffic/{instance}"}, samples=5)
    assert wait_for(moto.url, namespace, "Invocations", VARIANT, samples=4)["Sum"] == 4
    time.sleep(1.2)  # a period for the workers' and the supervisor's publishers alike
    # The publishers' health is one set: the workers' and the supervisor's datapoints added up, each sample once.
    samples = scrape(proxy.metrics_url)
    published = [v for (name, _), v in samples.items() if name == "sagemaker_proxy_cloudwatch_published_datapoints_total"]
    assert len(published) == 1 and published[0] >= 2 * 5  # at least one period of instance metrics, by host and by variant


@pytest.mark.e2e
def test_monitor_publishes_to_training_jobs_by_host(moto: Running, aws_env: None, tmp_path: Path) -> None:
    from tests.conftest import start

    port = free_port()
    job = f"job-{uuid.uuid4().hex[:8]}"
    monitor = start(
        ["-m", "proxy", "monitor", "--host", "127.0.0.1", "--metrics-port", str(port), "--training-job", job, "--host-index", "1",
         "--sample-interval", "0.2", "--cloudwatch", "--cloudwatch-endpoint-url", moto.url, "--cloudwatch-period", "1"],
        port, tmp_path / "monitor.log",
    )
    try:
        wait_for_samples(monitor.url, HOST_GAUGES, {"host": f"{job}/algo-1"})
        for metric in ("CPUUtilization", "MemoryUtilization", "DiskUtilization"):
            assert wait_for(moto.url, TRAINING_JOBS, metric, {"Host": f"{job}/algo-1"}, samples=3)["Unit"] == "Percent"
        assert statistics(moto.url, ENDPOINTS, "CPUUtilization", {"Host": f"{job}/algo-1"}) == {}
        labels = frozenset({("host", f"{job}/algo-1")})
        assert scrape(monitor.url)[("sagemaker_proxy_cloudwatch_published_datapoints_total", labels)] >= 3
    finally:
        monitor.stop()
