"""Publishes the per-period statistic sets to CloudWatch with PutMetricData, in the background.

Requests never wait on CloudWatch: the request path only adds to ``PeriodStatistics``. This task
takes ended periods into a bounded buffer, sends them oldest first, retries throttling, server and
network errors with jittered exponential backoff, and drops the oldest periods (counted) when the
buffer is full. boto3 is imported here only, and its blocking calls run in a thread.

One publisher can serve several streams, each a ``PeriodStatistics`` with its own target (namespace
and dimension sets): the invocation metrics, and the instance metrics of the host sampler.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from metrics import definitions as d
from metrics.statistics import Period, PeriodStatistics

log = logging.getLogger("proxy.cloudwatch")

MAX_DATUMS_PER_CALL = 1000
MAX_PAYLOAD_BYTES = 1_000_000
# A datum's share of the request body, generously; keeps each call well under 1 MB.
DATUM_BYTES_ESTIMATE = 600
MAX_DIMENSIONS = 30
MAX_AGE_S = 14 * 24 * 3600  # CloudWatch refuses older timestamps
RETRYABLE_CODES = frozenset({
    "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException",
    "ServiceUnavailable", "InternalFailure", "InternalServiceError", "RequestTimeout",
})
FAILURE_REASONS = ("throttled", "server_error", "network", "credentials", "rejected", "internal")
CREDENTIAL_CODES = frozenset({
    "AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "InvalidClientTokenId",
    "UnrecognizedClientException", "SignatureDoesNotMatch", "ExpiredToken", "ExpiredTokenException", "AuthFailure",
})


@dataclass(frozen=True)
class CloudWatchTarget:
    namespace: str
    dimensions: tuple[tuple[str, str], ...]
    storage_resolution: int  # 1 for high resolution, else 60
    region: str | None = None
    endpoint_url: str | None = None
    # Further dimension sets for the same values: CloudWatch does not aggregate across dimension sets.
    also_dimensions: tuple[tuple[tuple[str, str], ...], ...] = ()

    @property
    def dimension_sets(self) -> tuple[tuple[tuple[str, str], ...], ...]:
        return (self.dimensions, *self.also_dimensions)


def datums(period: Period, target: CloudWatchTarget, units: dict[str, str]) -> list[dict[str, Any]]:
    """One PutMetricData datum per metric of the period and dimension set: a statistic set, never a NaN or infinity."""
    out = []
    for name, s in period.sets.items():
        if s.count == 0 or not all(math.isfinite(v) for v in (s.total, s.minimum, s.maximum)):
            continue
        for dimensions in target.dimension_sets:
            datum: dict[str, Any] = {
                "MetricName": name,
                "Dimensions": [{"Name": k, "Value": v} for k, v in dimensions[:MAX_DIMENSIONS]],
                "Timestamp": period.start,
                "StatisticValues": {"SampleCount": float(s.count), "Sum": s.total, "Minimum": s.minimum, "Maximum": s.maximum},
                "Unit": units.get(name, "None"),
            }
            if target.storage_resolution == 1:
                datum["StorageResolution"] = 1
            out.append(datum)
    return out


def batches(items: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Split datums so each PutMetricData call stays under 1000 datums and 1 MB."""
    per_call = min(MAX_DATUMS_PER_CALL, MAX_PAYLOAD_BYTES // DATUM_BYTES_ESTIMATE)
    return [list(items[i : i + per_call]) for i in range(0, len(items), per_call)]


class PublisherHealth:
    """The publisher's state, as Prometheus metrics on the admin port, labelled with the variant, or with
    ``labels`` where there is none (a training job's host)."""

    def __init__(
        self, registry: CollectorRegistry, *, endpoint_name: str = "", variant_name: str = "", labels: Mapping[str, str] | None = None
    ) -> None:
        if labels is None:
            labels = dict(zip(d.VARIANT_LABELS, (endpoint_name, variant_name), strict=True))
        names, values = list(labels), list(labels.values())
        self.last_success = Gauge(
            d.CLOUDWATCH_LAST_SUCCESS.prometheus_name, d.CLOUDWATCH_LAST_SUCCESS.help, names, registry=registry,
            multiprocess_mode=d.CLOUDWATCH_LAST_SUCCESS.multiprocess_mode,
        ).labels(*values)
        failures = Counter(d.CLOUDWATCH_FAILURES.prometheus_name, d.CLOUDWATCH_FAILURES.help, [*names, "reason"], registry=registry)
        self.failures = {r: failures.labels(*values, r) for r in FAILURE_REASONS}
        self.buffered = Gauge(
            d.CLOUDWATCH_BUFFERED_PERIODS.prometheus_name, d.CLOUDWATCH_BUFFERED_PERIODS.help, names, registry=registry,
            multiprocess_mode=d.CLOUDWATCH_BUFFERED_PERIODS.multiprocess_mode,
        ).labels(*values)
        self.dropped = Counter(d.CLOUDWATCH_DROPPED.prometheus_name, d.CLOUDWATCH_DROPPED.help, names, registry=registry).labels(*values)
        self.published = Counter(d.CLOUDWATCH_PUBLISHED.prometheus_name, d.CLOUDWATCH_PUBLISHED.help, names, registry=registry).labels(*values)


class CloudWatchPublisher:
    def __init__(
        self,
        statistics: PeriodStatistics,
        target: CloudWatchTarget,
        health: PublisherHealth,
        *,
        buffer_periods: int,
        client_factory: Callable[[], Any] | None = None,
        backoff_s: tuple[float, float] = (0.5, 30.0),
        wallclock: Callable[[], float] = time.time,
        also: Sequence[tuple[PeriodStatistics, CloudWatchTarget]] = (),
    ) -> None:
        """``also``: further streams, published by the same task, which wakes at the end of the shortest period."""
        self._streams = [(statistics, target), *also]
        self._period_s = min(s.period_s for s, _ in self._streams)
        self._statistics = statistics
        self._target = target
        self._health = health
        self._buffer: deque[tuple[CloudWatchTarget, Period]] = deque()
        self._buffer_periods = buffer_periods
        self._client_factory = client_factory or self._boto3_client
        self._client: Any = None
        self._backoff = backoff_s
        self._wallclock = wallclock
        self._credentials_reported = False
        self._units = {m.cloudwatch_name: m.unit for m in d.ALL_METRICS if m.cloudwatch_name} | {
            m.component_cloudwatch_name: m.unit for m in d.ALL_METRICS if m.component_cloudwatch_name
        }

    def _boto3_client(self) -> Any:
        import boto3
        from botocore.config import Config

        # Retries are ours (jittered, buffered, counted); botocore's would hide them.
        config = Config(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=5, read_timeout=10)
        return boto3.client("cloudwatch", region_name=self._target.region, endpoint_url=self._target.endpoint_url, config=config)

    def _take(self, take: Callable[[PeriodStatistics], list[Period]]) -> None:
        now = self._wallclock()
        for statistics, target in self._streams:
            for period in take(statistics):
                if period.start < now - MAX_AGE_S:
                    self._drop(target, period, "too old for CloudWatch")
                    continue
                self._buffer.append((target, period))
        while len(self._buffer) > self._buffer_periods:
            self._drop(*self._buffer.popleft(), "the buffer is full")
        self._health.buffered.set(len(self._buffer))

    def _drop(self, target: CloudWatchTarget, period: Period, why: str) -> None:
        n = len(period.sets) * len(target.dimension_sets)
        self._health.dropped.inc(n)
        log.warning("dropped %d CloudWatch datapoints of the period at %d: %s", n, period.start, why)

    async def run(self) -> None:
        """Forever: at each period's end, publish what has ended; on failure back off and keep it buffered."""
        period = self._period_s
        delay = self._backoff[0]
        while True:
            now = self._wallclock()
            # A little after the boundary, so the request path has rolled the period over.
            await asyncio.sleep(period - now % period + 0.05)
            self._take(PeriodStatistics.take_closed)
            while self._buffer:
                if await self._publish_oldest():
                    delay = self._backoff[0]
                    continue
                # Full jitter: retries from many proxies do not arrive together.
                await asyncio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, self._backoff[1])
                self._take(PeriodStatistics.take_closed)

    async def flush(self, timeout_s: float) -> bool:
        """Publish everything, the partial period included, within ``timeout_s``. True if nothing is left."""
        self._take(PeriodStatistics.take_all)
        deadline = time.monotonic() + timeout_s
        delay = self._backoff[0]
        while self._buffer and time.monotonic() < deadline:
            if not await self._publish_oldest():
                await asyncio.sleep(min(random.uniform(0, delay), max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, self._backoff[1])
        if self._buffer:
            log.warning("shutting down with %d CloudWatch period(s) unpublished", len(self._buffer))
        return not self._buffer

    async def _publish_oldest(self) -> bool:
        target, period = self._buffer[0]
        data = datums(period, target, self._units)
        try:
            for batch in batches(data):
                await asyncio.to_thread(self._put, target.namespace, batch)
        except Exception as e:  # every failure is classified and counted; none may stop the publisher
            self._failed(e)
            return False
        self._buffer.popleft()
        self._health.buffered.set(len(self._buffer))
        self._health.published.inc(len(data))
        self._health.last_success.set(self._wallclock())
        return True

    def _put(self, namespace: str, batch: list[dict[str, Any]]) -> None:
        if self._client is None:
            self._client = self._client_factory()
        self._client.put_metric_data(Namespace=namespace, MetricData=batch)

    def _failed(self, error: Exception) -> None:
        reason, message = classify(error)
        self._health.failures[reason].inc()
        if reason == "credentials":
            if not self._credentials_reported:
                self._credentials_reported = True
                log.error(
                    "CloudWatch refused our credentials or permissions (%s); metrics stay buffered. "
                    "The proxy needs cloudwatch:PutMetricData.", message,
                )
        else:
            log.warning("CloudWatch publish failed (%s): %s; will retry", reason, message)


def default_region() -> str | None:
    """The region boto3 takes when none is given: ``AWS_DEFAULT_REGION``, else the AWS config file's profile.
    botocore reads no ``AWS_REGION`` for it, and without a region every call fails before it is sent."""
    import botocore.session

    region = botocore.session.get_session().get_config_variable("region")
    return str(region) if region else None


def classify(error: Exception) -> tuple[str, str]:
    """(reason label, one-line message) for a failed PutMetricData."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in CREDENTIAL_CODES or status in (401, 403):
            return "credentials", f"{code}: {error}"
        if code in RETRYABLE_CODES or "Throttl" in code:
            return "throttled" if "Throttl" in code or "TooMany" in code or "Limit" in code else "server_error", code
        if status >= 500:
            return "server_error", f"{code or status}"
        return "rejected", f"{code}: {error}"
    if isinstance(error, NoCredentialsError | PartialCredentialsError):
        return "credentials", str(error)
    if isinstance(error, BotoCoreError | OSError):
        return "network", str(error)
    return "internal", f"{type(error).__name__}: {error}"
