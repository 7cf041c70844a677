"""The in-memory side of the metrics: the request path records here in O(1); exporters read on their own schedule."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

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
FIRST_CHUNK = d.FIRST_CHUNK_LATENCY.cloudwatch_name or ""
FIRST_CHUNK_MODEL = d.FIRST_CHUNK_MODEL_LATENCY.cloudwatch_name or ""
FIRST_CHUNK_OVERHEAD = d.FIRST_CHUNK_OVERHEAD_LATENCY.cloudwatch_name or ""
MID_STREAM_ERRORS = d.MID_STREAM_ERRORS.cloudwatch_name or ""
CONCURRENT = d.CONCURRENT_REQUESTS_PER_MODEL.cloudwatch_name or ""
PER_COPY = d.INVOCATIONS_PER_INSTANCE.component_cloudwatch_name or ""
CONCURRENT_PER_COPY = d.CONCURRENT_REQUESTS_PER_MODEL.component_cloudwatch_name or ""
INPUT_TOKENS = d.INPUT_TOKENS.cloudwatch_name or ""
OUTPUT_TOKENS = d.OUTPUT_TOKENS.cloudwatch_name or ""
TIME_TO_FIRST_TOKEN = d.TIME_TO_FIRST_TOKEN.cloudwatch_name or ""
TIME_PER_OUTPUT_TOKEN = d.TIME_PER_OUTPUT_TOKEN.cloudwatch_name or ""

US = 1e-6  # microseconds to Prometheus's seconds

# Every family an InvocationRecorder records into, labelled endpoint_name, variant_name and the definition's own labels.
VARIANT_FAMILIES = (
    d.INVOCATIONS, d.INVOCATION_4XX_ERRORS, d.INVOCATION_5XX_ERRORS, d.INVOCATION_MODEL_ERRORS, d.INVOCATIONS_PER_INSTANCE,
    d.MODEL_LATENCY, d.OVERHEAD_LATENCY, d.CONCURRENT_REQUESTS_PER_MODEL, d.LIVE_INSTANCES,
    *d.STREAM_METRICS, *d.TOKEN_METRICS, d.REQUEST_SIZE, d.RESPONSE_SIZE,
    d.CLIENT_DISCONNECTS, d.INSTANCE_COUNT_ERRORS, d.REJECTED_REQUESTS, d.UPSTREAM_ERRORS, d.QUEUE_TIME, d.REQUESTS_WAITING,
)
# With --model-label, the families of what happened to each invocation get the `model` label too; the variant's
# state (concurrency, live instances, the queue) and its refusals stay per variant.
MODEL_FAMILIES = frozenset(VARIANT_FAMILIES) - {
    d.CONCURRENT_REQUESTS_PER_MODEL, d.LIVE_INSTANCES, d.INSTANCE_COUNT_ERRORS, d.REJECTED_REQUESTS, d.REQUESTS_WAITING,
}


class Outcome(Protocol):
    """What the recorder reads of one ended invocation (the request path's record, ``proxy.invocation.app.Invocation``)."""

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
    def request_bytes(self) -> int: ...
    @property
    def response_bytes(self) -> int: ...
    @property
    def first_chunk_us(self) -> int | None:
        """A streamed response: the request's arrival to its first body chunk handed to the client."""
    @property
    def first_chunk_model_us(self) -> int | None:
        """A streamed response: the request sent to the model to the model's first body byte."""
    @property
    def mid_stream_error(self) -> bool: ...
    @property
    def input_tokens(self) -> int: ...
    @property
    def output_tokens(self) -> int: ...
    @property
    def time_per_output_token_us(self) -> float | None: ...
    @property
    def time_to_first_token_us(self) -> int | None: ...
    @property
    def finish_reason(self) -> str | None: ...
    @property
    def trace_id(self) -> str | None:
        """With tracing on: the invocation's trace, the exemplar of its latency buckets."""


class InvocationMetrics:
    """The invocation metric families of one registry, made from their definitions; each variant records
    through its own labels.

    Lock-free (``metrics.inmemory``); with several workers, ``shared`` is this worker's multiprocess files,
    which the supervisor merges at scrape time. ``model_latency_buckets`` (seconds) also bound the first-chunk
    latencies, ``overhead_latency_buckets`` the first chunk's overhead.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        model_latency_buckets: Sequence[float] = d.DEFAULT_MODEL_LATENCY_BUCKETS,
        overhead_latency_buckets: Sequence[float] = d.DEFAULT_OVERHEAD_LATENCY_BUCKETS,
        shared: inmemory.SharedFiles | None = None,
        model_label: bool = False,
        component_label: bool = False,
    ) -> None:
        buckets = {
            d.MODEL_LATENCY: model_latency_buckets, d.FIRST_CHUNK_LATENCY: model_latency_buckets,
            d.FIRST_CHUNK_MODEL_LATENCY: model_latency_buckets,
            d.OVERHEAD_LATENCY: overhead_latency_buckets, d.FIRST_CHUNK_OVERHEAD_LATENCY: overhead_latency_buckets,
        }
        f = inmemory.Families(registry, shared)
        self.model_label = model_label
        self.component_label = component_label
        self.families: dict[d.MetricDefinition, Any] = {
            definition: f.family(definition, self.labelnames(definition), buckets.get(definition, definition.buckets))
            for definition in VARIANT_FAMILIES
        }

    def labelnames(self, definition: d.MetricDefinition) -> tuple[str, ...]:
        return d.VARIANT_LABELS + (d.COMPONENT_LABEL if self.component_label else ()) + (
            d.MODEL_LABEL if self.model_label and definition in MODEL_FAMILIES else ()
        ) + definition.labels

    def values(self, definition: d.MetricDefinition, endpoint_name: str, variant_name: str, component: str, model: str) -> tuple[str, ...]:
        """The label values of one family's child, in the order of ``labelnames`` (its own labels left out)."""
        return (endpoint_name, variant_name) + ((component,) if self.component_label else ()) + (
            (model,) if self.model_label and definition in MODEL_FAMILIES else ()
        )

    def children(self, endpoint_name: str, variant_name: str, model: str = "", component: str = "") -> dict[d.MetricDefinition, Any]:
        """Each family's child for one variant (or inference component, or model), the reason-labelled ones left out."""
        return {
            defn: family.labels(*self.values(defn, endpoint_name, variant_name, component, model))
            for defn, family in self.families.items() if not defn.labels
        }


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
        model: str = "",
        concurrency_statistics: PeriodStatistics | None = None,
        component: str = "",
        token_statistics: bool = False,
    ) -> None:
        self._statistics = statistics
        # The token metrics in the CloudWatch statistic sets too (--cloudwatch-token-metrics).
        self._token_statistics = statistics if token_statistics else None
        # ConcurrentRequestsPerModel's samples: on a period of their own when one is given.
        self._concurrency_statistics = concurrency_statistics or statistics
        # ConcurrentRequestsPerModel for CloudWatch: this process's count, or with workers all of theirs.
        self._in_flight = in_flight if in_flight is not None else InFlight()
        e, v = endpoint_name, variant_name
        c = metrics.children(e, v, model, component)
        # An inference component's CloudWatch names are per copy, as SageMaker's.
        self._per_instance_name, self._concurrent_name = (PER_COPY, CONCURRENT_PER_COPY) if component else (PER_INSTANCE, CONCURRENT)
        self._per_copy = bool(component)
        self._copies = 1  # an inference component's live copies, for ConcurrentRequestsPerCopy
        self._invocations = c[d.INVOCATIONS]
        self._errors_4xx = c[d.INVOCATION_4XX_ERRORS]
        self._errors_5xx = c[d.INVOCATION_5XX_ERRORS]
        self._model_errors = c[d.INVOCATION_MODEL_ERRORS]
        self._per_instance = c[d.INVOCATIONS_PER_INSTANCE]
        self._model_latency = c[d.MODEL_LATENCY]
        self._overhead_latency = c[d.OVERHEAD_LATENCY]
        self._concurrent = c[d.CONCURRENT_REQUESTS_PER_MODEL]
        self._live_instances = c[d.LIVE_INSTANCES]
        self._first_chunk = c[d.FIRST_CHUNK_LATENCY]
        self._first_chunk_model = c[d.FIRST_CHUNK_MODEL_LATENCY]
        self._first_chunk_overhead = c[d.FIRST_CHUNK_OVERHEAD_LATENCY]
        self._inter_chunk = c[d.INTER_CHUNK_LATENCY]
        self._mid_stream_errors = c[d.MID_STREAM_ERRORS]
        self._input_tokens = c[d.INPUT_TOKENS]
        self._output_tokens = c[d.OUTPUT_TOKENS]
        self._time_per_output_token = c[d.TIME_PER_OUTPUT_TOKEN]
        self._time_to_first_token = c[d.TIME_TO_FIRST_TOKEN]
        self._request_input_tokens = c[d.REQUEST_INPUT_TOKENS]
        self._request_output_tokens = c[d.REQUEST_OUTPUT_TOKENS]
        self._request_size = c[d.REQUEST_SIZE]
        self._response_size = c[d.RESPONSE_SIZE]
        self._client_disconnects = c[d.CLIENT_DISCONNECTS]
        self._instance_count_errors = c[d.INSTANCE_COUNT_ERRORS]
        self._queue_time = c[d.QUEUE_TIME]
        self._waiting = c[d.REQUESTS_WAITING]
        # Children created up front so every reason is exported as 0 before it first happens.
        rejected, upstream = metrics.families[d.REJECTED_REQUESTS], metrics.families[d.UPSTREAM_ERRORS]
        self._rejected = {r: rejected.labels(*metrics.values(d.REJECTED_REQUESTS, e, v, component, model), r) for r in reject_reasons}
        self._upstream_errors = {r: upstream.labels(*metrics.values(d.UPSTREAM_ERRORS, e, v, component, model), r) for r in upstream_error_reasons}
        finished = metrics.families[d.REQUESTS_FINISHED]
        self._finished = {r: finished.labels(*metrics.values(d.REQUESTS_FINISHED, e, v, component, model), r) for r in d.FINISH_REASONS}

    def invocation_started(self) -> None:
        self._concurrent.inc()
        now = self._in_flight.add(1)
        stats = self._concurrency_statistics
        if stats is not None:
            stats.add(stats.current(), self._concurrent_name, now / self._copies if self._per_copy else now)

    def waiting(self, delta: int) -> None:
        """A request joins (1) or leaves (-1) the queue for a slot at the model. It is in flight as SageMaker
        counts ConcurrentRequestsPerModel, which takes in queued requests."""
        self._waiting.inc(delta)
        self._concurrent.inc(delta)
        now = self._in_flight.add(delta)
        stats = self._concurrency_statistics
        if stats is not None and delta > 0:
            stats.add(stats.current(), self._concurrent_name, now / self._copies if self._per_copy else now)

    def queued(self, waited_us: int) -> None:
        """An invocation got its slot at the model after ``waited_us`` (0 if it did not wait)."""
        self._queue_time.observe(waited_us * US)

    def inter_chunk(self, gap_us: int) -> None:
        """A gap between two of the model's body chunks of a streamed response."""
        self._inter_chunk.observe(gap_us * US)

    def invocation_finished(self, outcome: Outcome) -> None:
        """One completed invocation: ``outcome.status`` is what the model returned, or the proxy's 502/504 when
        ``outcome.upstream_error`` names the reason the model call failed."""
        self._concurrent.dec()
        self._in_flight.add(-1)
        self._invocations.inc()
        instances = outcome.instances
        self._per_instance.inc(1.0 / instances)
        upstream_error = outcome.upstream_error
        status = outcome.status
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
        model_us = outcome.model_us
        overhead_us = outcome.overhead_us
        trace_id = outcome.trace_id
        if trace_id is None:
            self._model_latency.observe(model_us * US)
            self._overhead_latency.observe(overhead_us * US)
        else:
            self._model_latency.observe_traced(model_us * US, trace_id)
            self._overhead_latency.observe_traced(overhead_us * US, trace_id)
        self._request_size.observe(outcome.request_bytes)
        self._response_size.observe(outcome.response_bytes)
        first_chunk_us = outcome.first_chunk_us
        first_chunk_model_us = outcome.first_chunk_model_us
        mid_stream_error = outcome.mid_stream_error
        self._stream_finished(outcome, first_chunk_us, first_chunk_model_us, mid_stream_error)
        stats = self._statistics
        if stats is not None:
            # 0/1 per invocation, so a period's Average is the error rate.
            sets = stats.current()
            add = stats.add
            add(sets, INVOCATIONS, 1)
            add(sets, ERRORS_4XX, is_4xx)
            add(sets, ERRORS_5XX, is_5xx)
            add(sets, MODEL_ERRORS, upstream_error is not None or not 200 <= status < 300)
            add(sets, self._per_instance_name, 1.0 / instances)
            add(sets, MODEL_LATENCY, model_us)
            add(sets, OVERHEAD_LATENCY, overhead_us)
            add(sets, MID_STREAM_ERRORS, mid_stream_error)
            if first_chunk_us is not None and first_chunk_model_us is not None:
                add(sets, FIRST_CHUNK, first_chunk_us)
                add(sets, FIRST_CHUNK_MODEL, first_chunk_model_us)
                add(sets, FIRST_CHUNK_OVERHEAD, first_chunk_us - first_chunk_model_us)

    def _stream_finished(self, outcome: Outcome, first_chunk_us: int | None, first_chunk_model_us: int | None, mid_stream_error: bool) -> None:
        """What a streamed or token-counted invocation adds: first chunk, mid-stream errors, tokens."""
        if first_chunk_us is not None and first_chunk_model_us is not None:
            self._first_chunk.observe(first_chunk_us * US)
            self._first_chunk_model.observe(first_chunk_model_us * US)
            self._first_chunk_overhead.observe((first_chunk_us - first_chunk_model_us) * US)
        if mid_stream_error:
            self._mid_stream_errors.inc()
        if outcome.output_tokens:
            self._output_tokens.inc(outcome.output_tokens)
        if outcome.input_tokens:
            self._input_tokens.inc(outcome.input_tokens)
        per_token = outcome.time_per_output_token_us
        if per_token is not None:
            self._time_per_output_token.observe(per_token * US)
        first_token = outcome.time_to_first_token_us
        if first_token is not None:
            self._time_to_first_token.observe(first_token * US)
        if outcome.output_tokens or outcome.input_tokens:
            self._request_output_tokens.observe(outcome.output_tokens)
            if outcome.input_tokens:
                self._request_input_tokens.observe(outcome.input_tokens)
        reason = outcome.finish_reason
        if reason is not None:
            self._finished.get(reason, self._finished["other"]).inc()
        stats = self._token_statistics
        if stats is not None and (outcome.output_tokens or outcome.input_tokens):
            _token_statistics(stats, outcome, first_token, per_token)

    def invocation_ended(self, outcome: Outcome) -> None:
        """Exactly once per invocation that ``invocation_started``."""
        if outcome.abandoned:
            self.invocation_abandoned(outcome)
        else:
            self.invocation_finished(outcome)

    def invocation_abandoned(self, outcome: Outcome) -> None:
        """The client went away while the model worked: an invocation, with no error class and no latency."""
        self._concurrent.dec()
        self._in_flight.add(-1)
        self._invocations.inc()
        instances = outcome.instances
        self._per_instance.inc(1.0 / instances)
        self._client_disconnects.inc()
        self._request_size.observe(outcome.request_bytes)
        self._response_size.observe(outcome.response_bytes)
        stats = self._statistics
        if stats is not None:
            sets = stats.current()
            for name, value in ((INVOCATIONS, 1), (ERRORS_4XX, 0), (ERRORS_5XX, 0), (MODEL_ERRORS, 0), (self._per_instance_name, 1.0 / instances)):
                stats.add(sets, name, value)

    def rejected(self, reason: str) -> None:
        self._rejected[reason].inc()

    def instance_count_error(self) -> None:
        self._instance_count_errors.inc()

    def live_instances(self, n: int) -> None:
        self._live_instances.set(n)
        self._copies = max(1, n)


def _token_statistics(stats: PeriodStatistics, outcome: Outcome, first_token_us: int | None, per_token_us: float | None) -> None:
    """A token-counted invocation in CloudWatch's statistic sets: its tokens, time to first token, time per token."""
    sets = stats.current()
    if outcome.input_tokens:
        stats.add(sets, INPUT_TOKENS, outcome.input_tokens)
    stats.add(sets, OUTPUT_TOKENS, outcome.output_tokens)
    if first_token_us is not None:
        stats.add(sets, TIME_TO_FIRST_TOKEN, first_token_us)
    if per_token_us is not None:
        stats.add(sets, TIME_PER_OUTPUT_TOKEN, per_token_us)


class ModelLifecycleMetrics:
    """The model's start-up time and restarts, when the proxy runs the model (``--model-command``): on
    /metrics, and ModelSetupTime in the variant's CloudWatch statistic sets (``statistics``)."""

    def __init__(self, registry: CollectorRegistry, endpoint_name: str, variant_name: str, statistics: PeriodStatistics | None = None) -> None:
        f = inmemory.Families(registry, None)
        self._setup: Any = f.family(d.MODEL_SETUP_TIME, d.VARIANT_LABELS).labels(endpoint_name, variant_name)
        self._restarts: Any = f.family(d.MODEL_RESTARTS, d.VARIANT_LABELS).labels(endpoint_name, variant_name)
        self._statistics = statistics

    def set_up(self, elapsed_us: int) -> None:
        self._setup.set(elapsed_us * US)
        stats = self._statistics
        if stats is not None:
            assert d.MODEL_SETUP_TIME.cloudwatch_name is not None
            stats.add(stats.current(), d.MODEL_SETUP_TIME.cloudwatch_name, elapsed_us)

    def restarted(self) -> None:
        self._restarts.inc()


OTHER_MODELS = "__other__"


class ModelRecorders:
    """A variant's recorders, one per model the requests name (``--model-label``), at most ``max_models``
    of them: requests for any further model are recorded as ``__other__``, so a client cannot make series
    without end. The recorders share the variant's CloudWatch statistics: CloudWatch keeps its dimensions."""

    __slots__ = ("_by_model", "_make", "_max")

    def __init__(self, make: Callable[[str], InvocationRecorder], max_models: int) -> None:
        self._make = make
        self._max = max_models
        self._by_model: dict[str, InvocationRecorder] = {"": make("")}

    def get(self, model: str | None) -> InvocationRecorder:
        """The recorder of ``model`` ("" when the request names none)."""
        key = model or ""
        recorder = self._by_model.get(key)
        if recorder is None:
            if len(self._by_model) >= self._max:  # "" counts among them: with __other__, max_models + 1 values at most
                key = OTHER_MODELS
                recorder = self._by_model.get(key)
            if recorder is None:
                recorder = self._by_model[key] = self._make(key)
        return recorder

    @property
    def default(self) -> InvocationRecorder:
        return self._by_model[""]
