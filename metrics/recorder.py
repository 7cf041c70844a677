"""The in-memory side of the metrics: the request path records here in O(1); exporters read on their own schedule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry

from metrics import definitions as d
from metrics import inmemory
from metrics.inflight import InFlight
from metrics.statistics import PeriodStatistics

# CloudWatch metric names, looked up once.
INVOCATIONS = d.INVOCATIONS.cloudwatch_name or ""
ERRORS_4XX = d.INVOCATION_4XX_ERRORS.cloudwatch_name or ""
ERRORS_5XX = d.INVOCATION_5XX_ERRORS.cloudwatch_name or ""
MODEL_ERRORS = d.INVOCATION_MODEL_ERRORS.cloudwatch_name or ""
PER_INSTANCE = d.INVOCATIONS_PER_INSTANCE.cloudwatch_name or ""
MODEL_LATENCY = d.MODEL_LATENCY.cloudwatch_name or ""
OVERHEAD_LATENCY = d.OVERHEAD_LATENCY.cloudwatch_name or ""
FIRST_BYTE = d.MODEL_FIRST_BYTE_LATENCY.cloudwatch_name or ""
CONCURRENT = d.CONCURRENT_REQUESTS_PER_MODEL.cloudwatch_name or ""


class Outcome(Protocol):
    """What the recorder reads of one ended invocation (the request path's record, ``proxy.app.Invocation``)."""

    @property
    def instances(self) -> int: ...
    @property
    def abandoned(self) -> bool: ...
    @property
    def status(self) -> int: ...
    @property
    def upstream_error(self) -> str | None: ...
    @property
    def model_us(self) -> int: ...
    @property
    def overhead_us(self) -> int: ...
    @property
    def first_byte_us(self) -> int | None: ...


class InvocationMetrics:
    """The invocation metric families of one registry, registered once; each variant records through its own labels.

    Lock-free (``metrics.inmemory``); with several workers, ``shared`` is this worker's multiprocess files,
    which the supervisor merges at scrape time.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        model_latency_buckets: Sequence[float] = d.DEFAULT_MODEL_LATENCY_BUCKETS_US,
        overhead_latency_buckets: Sequence[float] = d.DEFAULT_OVERHEAD_LATENCY_BUCKETS_US,
        shared: inmemory.SharedFiles | None = None,
    ) -> None:
        f = inmemory.Families(registry, shared)
        labels = d.VARIANT_LABELS
        self.invocations = f.counter(d.INVOCATIONS, labels)
        self.errors_4xx = f.counter(d.INVOCATION_4XX_ERRORS, labels)
        self.errors_5xx = f.counter(d.INVOCATION_5XX_ERRORS, labels)
        self.model_errors = f.counter(d.INVOCATION_MODEL_ERRORS, labels)
        self.per_instance = f.counter(d.INVOCATIONS_PER_INSTANCE, labels)
        self.model_latency = f.histogram(d.MODEL_LATENCY, labels, model_latency_buckets)
        self.overhead_latency = f.histogram(d.OVERHEAD_LATENCY, labels, overhead_latency_buckets)
        self.first_byte = f.histogram(d.MODEL_FIRST_BYTE_LATENCY, labels, model_latency_buckets)
        self.concurrent = f.gauge(d.CONCURRENT_REQUESTS_PER_MODEL, labels)
        self.live_instances = f.gauge(d.LIVE_INSTANCES, labels)
        self.client_disconnects = f.counter(d.CLIENT_DISCONNECTS, labels)
        self.instance_count_errors = f.counter(d.INSTANCE_COUNT_ERRORS, labels)
        self.rejected = f.counter(d.REJECTED_REQUESTS, labels + d.REJECTED_REQUESTS.labels)
        self.upstream_errors = f.counter(d.UPSTREAM_ERRORS, labels + d.UPSTREAM_ERRORS.labels)


class InvocationRecorder:
    """Records invocation outcomes for one variant.

    Label children are resolved once here, so recording is a handful of additions.
    """

    def __init__(
        self,
        metrics: InvocationMetrics,
        *,
        endpoint_name: str,
        variant_name: str,
        reject_reasons: Sequence[str],
        upstream_error_reasons: Sequence[str],
        statistics: PeriodStatistics | None = None,
        in_flight: InFlight | None = None,
    ) -> None:
        self._statistics = statistics
        # ConcurrentRequestsPerModel for CloudWatch: this process's count, or with workers all of theirs.
        self._in_flight = in_flight if in_flight is not None else InFlight()
        e, v = endpoint_name, variant_name
        m = metrics
        self._invocations = m.invocations.labels(e, v)
        self._errors_4xx = m.errors_4xx.labels(e, v)
        self._errors_5xx = m.errors_5xx.labels(e, v)
        self._model_errors = m.model_errors.labels(e, v)
        self._per_instance = m.per_instance.labels(e, v)
        self._model_latency = m.model_latency.labels(e, v)
        self._overhead_latency = m.overhead_latency.labels(e, v)
        self._first_byte = m.first_byte.labels(e, v)
        self._concurrent = m.concurrent.labels(e, v)
        self._live_instances = m.live_instances.labels(e, v)
        self._client_disconnects = m.client_disconnects.labels(e, v)
        self._instance_count_errors = m.instance_count_errors.labels(e, v)
        rejected = m.rejected
        upstream_errors = m.upstream_errors
        # Children created up front so every reason is exported as 0 before it first happens.
        self._rejected = {r: rejected.labels(e, v, r) for r in reject_reasons}
        self._upstream_errors = {r: upstream_errors.labels(e, v, r) for r in upstream_error_reasons}

    def invocation_started(self) -> None:
        self._concurrent.inc()
        now = self._in_flight.add(1)
        stats = self._statistics
        if stats is not None:
            stats.add(stats.current(), CONCURRENT, now)

    def invocation_finished(
        self,
        *,
        status: int,
        upstream_error: str | None,
        model_us: int,
        overhead_us: int,
        instances: int,
        first_byte_us: int | None = None,
    ) -> None:
        """One completed invocation: ``status`` is what the model returned, or the proxy's 502/504 when
        ``upstream_error`` names the reason the model call failed."""
        self._concurrent.dec()
        self._in_flight.add(-1)
        self._invocations.inc()
        self._per_instance.inc(1.0 / instances)
        is_4xx = is_5xx = False
        if upstream_error is not None:
            self._upstream_errors[upstream_error].inc()
            self._model_errors.inc()
        elif not 200 <= status < 300:
            self._model_errors.inc()
            if 400 <= status < 500:
                is_4xx = True
                self._errors_4xx.inc()
            elif status >= 500:
                is_5xx = True
                self._errors_5xx.inc()
        self._model_latency.observe(model_us)
        self._overhead_latency.observe(overhead_us)
        if first_byte_us is not None:
            self._first_byte.observe(first_byte_us)
        stats = self._statistics
        if stats is not None:
            # 0/1 per invocation, so a period's Average is the error rate.
            sets = stats.current()
            add = stats.add
            add(sets, INVOCATIONS, 1)
            add(sets, ERRORS_4XX, is_4xx)
            add(sets, ERRORS_5XX, is_5xx)
            add(sets, MODEL_ERRORS, upstream_error is not None or not 200 <= status < 300)
            add(sets, PER_INSTANCE, 1.0 / instances)
            add(sets, MODEL_LATENCY, model_us)
            add(sets, OVERHEAD_LATENCY, overhead_us)
            if first_byte_us is not None:
                add(sets, FIRST_BYTE, first_byte_us)

    def invocation_ended(self, outcome: Outcome) -> None:
        """Exactly once per invocation that ``invocation_started``."""
        if outcome.abandoned:
            self.invocation_abandoned(instances=outcome.instances)
        else:
            self.invocation_finished(
                status=outcome.status,
                upstream_error=outcome.upstream_error,
                model_us=outcome.model_us,
                overhead_us=outcome.overhead_us,
                instances=outcome.instances,
                first_byte_us=outcome.first_byte_us,
            )

    def invocation_abandoned(self, *, instances: int) -> None:
        """The client went away while the model worked: an invocation, with no error class and no latency."""
        self._concurrent.dec()
        self._in_flight.add(-1)
        self._invocations.inc()
        self._per_instance.inc(1.0 / instances)
        self._client_disconnects.inc()
        stats = self._statistics
        if stats is not None:
            sets = stats.current()
            for name, value in ((INVOCATIONS, 1), (ERRORS_4XX, 0), (ERRORS_5XX, 0), (MODEL_ERRORS, 0), (PER_INSTANCE, 1.0 / instances)):
                stats.add(sets, name, value)

    def rejected(self, reason: str) -> None:
        self._rejected[reason].inc()

    def instance_count_error(self) -> None:
        self._instance_count_errors.inc()

    def live_instances(self, n: int) -> None:
        self._live_instances.set(n)
