"""What runs beside the request path: the host sampler and the CloudWatch publisher.

Each process runs the parts it owns: a single-process proxy both; with ``--workers N`` each worker
publishes its own invocation metrics and the supervisor samples the host, once; the ``monitor``
command samples the host of a training job. boto3 and NVML load only inside the pieces that use them.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from metrics.cgroups import CgroupError
from metrics.host import HostCollector, HostMonitor, HostSampler, open_sampler
from metrics.statistics import PeriodStatistics
from proxy.settings import CloudWatchOptions, ConfigError, MonitorSettings, SamplingOptions, Settings

if TYPE_CHECKING:
    from metrics.cloudwatch import CloudWatchPublisher, CloudWatchTarget

log = logging.getLogger("proxy")

ENDPOINTS_NAMESPACE = "/aws/sagemaker/Endpoints"
TRAINING_JOBS_NAMESPACE = "/aws/sagemaker/TrainingJobs"

Dimensions = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Stream:
    """Where one set of metrics goes in CloudWatch: a namespace and its dimension sets."""

    namespace: str
    dimension_sets: tuple[Dimensions, ...]


@dataclass(frozen=True)
class Host:
    """The instance metrics of this host: how to sample them, their Prometheus labels, their CloudWatch stream."""

    sampler: HostSampler
    interval_s: float
    labels: Mapping[str, str]
    stream: Stream


def open_host_sampler(sampling: SamplingOptions) -> HostSampler:
    """Raises ConfigError when a ``--watch-cgroup`` does not exist."""
    try:
        return open_sampler(watch_cgroups=sampling.watch_cgroups, model_dir=sampling.model_dir)
    except CgroupError as e:
        raise ConfigError(f"--watch-cgroup: {e}") from None


def check_region(cloudwatch: CloudWatchOptions, needed_by: str) -> None:
    """Raises ConfigError when ``needed_by`` (a flag) needs an AWS region and none is given or configured:
    botocore would fail every call, and each failure would be retried as a network error."""
    from metrics.cloudwatch import default_region

    if cloudwatch.region is None and default_region() is None:
        raise ConfigError(
            f"{needed_by} needs an AWS region: give --cloudwatch-region (such as us-east-1), or set AWS_DEFAULT_REGION "
            "or region in the AWS config file (boto3 does not read AWS_REGION)"
        )


def check_regions(settings: Settings) -> None:
    """The AWS region of what ``serve`` calls in AWS: CloudWatch, and SageMaker for live instance counts."""
    if settings.cloudwatch.enabled:
        check_region(settings.cloudwatch, "--cloudwatch")
    sources = [v.count_from or settings.instance_count_from for e in settings.endpoints for v in e.variants]
    sources += [c.count_from or settings.instance_count_from for e in settings.endpoints for _, c in e.components]
    if any(source.kind == "sagemaker" for source in sources):
        check_region(settings.cloudwatch, "--instance-count-from sagemaker")


def endpoint_host(settings: Settings) -> Host | None:
    """Host ``[endpoint-name]/[variant-name]/[instance-id]``, also published by EndpointName and VariantName."""
    if settings.sampling.interval == 0:
        return None
    e, v = settings.endpoint_name, settings.variants[0].name
    host = f"{e}/{v}/{settings.instance_id or socket.gethostname()}"
    return Host(
        open_host_sampler(settings.sampling),
        settings.sampling.interval,
        {"endpoint_name": e, "variant_name": v, "host": host},
        Stream(ENDPOINTS_NAMESPACE, ((("Host", host),), (("EndpointName", e), ("VariantName", v)))),
    )


def training_host(settings: MonitorSettings) -> Host:
    """Host ``[training-job-name]/algo-[n]``, as SageMaker names a training job's instances."""
    host = f"{settings.training_job}/algo-{settings.host_index}"
    return Host(
        open_host_sampler(settings.sampling),
        settings.sampling.interval,
        {"host": host},
        Stream(TRAINING_JOBS_NAMESPACE, ((("Host", host),),)),
    )


class Background:
    """The host sampler (given ``host``) and the CloudWatch publisher (when enabled) of one process.

    ``invocations`` maps each (endpoint, variant) whose invocation metrics this process records to its stream;
    their statistic sets are ``statistics[(endpoint, variant)]``, for the recorders. The publisher's health is
    labelled ``health_labels``.
    """

    def __init__(
        self,
        cloudwatch: CloudWatchOptions,
        registry: CollectorRegistry,
        *,
        health_labels: Mapping[str, str],
        invocations: Mapping[tuple[str, str], Stream] | None = None,
        host: Host | None = None,
    ) -> None:
        self._cloudwatch = settings = cloudwatch
        self.statistics: dict[tuple[str, str], PeriodStatistics] = {}  # by (endpoint, variant)
        self.monitor: HostMonitor | None = None
        self._publisher: CloudWatchPublisher | None = None
        self._tasks: list[asyncio.Task[None]] = []
        streams: list[tuple[PeriodStatistics, CloudWatchTarget]] = []
        # ConcurrentRequestsPerModel on a period of its own, when asked: high resolution for fast autoscaling.
        self.concurrency: dict[tuple[str, str], PeriodStatistics] = {}
        if settings.enabled and invocations:
            for variant, stream in invocations.items():
                self.statistics[variant] = PeriodStatistics(settings.period)
                streams.append((self.statistics[variant], self._target(stream)))
                if settings.concurrency_period is not None:
                    self.concurrency[variant] = PeriodStatistics(settings.concurrency_period)
                    streams.append((self.concurrency[variant], self._target(stream, settings.concurrency_period)))
        if host is not None:
            host_statistics = PeriodStatistics(settings.period) if settings.enabled else None
            monitor = self.monitor = HostMonitor(host.sampler, host.interval_s, host_statistics)
            registry.register(HostCollector(lambda: monitor.latest, host.labels))
            if host_statistics is not None:
                streams.append((host_statistics, self._target(host.stream)))
        if streams:
            from metrics.cloudwatch import CloudWatchPublisher, PublisherHealth

            (statistics, target), *also = streams
            self._publisher = CloudWatchPublisher(
                statistics, target, PublisherHealth(registry, labels=health_labels),
                buffer_periods=settings.buffer_periods, also=also,
            )

    def _target(self, stream: Stream, period: int | None = None) -> CloudWatchTarget:
        from metrics.cloudwatch import CloudWatchTarget

        first, *more = stream.dimension_sets
        s = self._cloudwatch
        return CloudWatchTarget(
            namespace=stream.namespace,
            dimensions=first,
            storage_resolution=1 if (period or s.period) < 60 else 60,
            region=s.region,
            endpoint_url=s.endpoint_url,
            also_dimensions=tuple(more),
        )

    async def __aenter__(self) -> Background:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start(self) -> None:
        if self.monitor is not None:
            self._tasks.append(asyncio.create_task(self.monitor.run()))
        if self._publisher is not None:
            self._tasks.append(asyncio.create_task(self._publisher.run()))

    async def stop(self) -> None:
        """After the server has drained its requests: flush the last partial period, within the bound."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._publisher is not None:
            await self._publisher.flush(self._cloudwatch.flush_timeout)
