"""Every metric the product exports: names, units, kinds and labels, in one place.

The Prometheus exporter and the CloudWatch publisher both read these definitions;
nothing else spells a metric name.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal


class Kind(enum.Enum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True)
class MetricDefinition:
    """One metric.

    ``prometheus_name`` is the exposed sample name (counters end in ``_total``);
    ``cloudwatch_name`` and ``unit`` are what CloudWatch gets (``None``: Prometheus only);
    ``labels`` are the Prometheus label names beyond ``endpoint_name`` and ``variant_name``;
    ``multiprocess_mode`` is how a gauge's values from several workers merge: added (``livesum``) or the
    largest kept (``livemax``), live workers only.
    """

    prometheus_name: str
    kind: Kind
    help: str
    cloudwatch_name: str | None = None
    unit: str = "Count"
    labels: tuple[str, ...] = ()
    multiprocess_mode: Literal["livesum", "livemax"] = "livesum"


# Labels every invocation metric carries; CloudWatch dimensions EndpointName and VariantName.
VARIANT_LABELS = ("endpoint_name", "variant_name")

INVOCATIONS = MetricDefinition(
    "sagemaker_invocations_total", Kind.COUNTER,
    "Requests sent to the model (invocation routes only).", "Invocations",
)
INVOCATION_4XX_ERRORS = MetricDefinition(
    "sagemaker_invocation_4xx_errors_total", Kind.COUNTER,
    "Invocations where the model returned a 4xx status.", "Invocation4XXErrors",
)
INVOCATION_5XX_ERRORS = MetricDefinition(
    "sagemaker_invocation_5xx_errors_total", Kind.COUNTER,
    "Invocations where the model returned a 5xx status.", "Invocation5XXErrors",
)
INVOCATION_MODEL_ERRORS = MetricDefinition(
    "sagemaker_invocation_model_errors_total", Kind.COUNTER,
    "Invocations with any non-2xx outcome, including refused, reset, timed-out and malformed model calls.",
    "InvocationModelErrors",
)
INVOCATIONS_PER_INSTANCE = MetricDefinition(
    "sagemaker_invocations_per_instance_total", Kind.COUNTER,
    "Sum of 1/n per invocation, n being the live instance count of the variant at that moment.",
    "InvocationsPerInstance",
)
MODEL_LATENCY = MetricDefinition(
    "sagemaker_model_latency_microseconds", Kind.HISTOGRAM,
    "Time spent waiting on the model, in microseconds.", "ModelLatency", "Microseconds",
)
OVERHEAD_LATENCY = MetricDefinition(
    "sagemaker_overhead_latency_microseconds", Kind.HISTOGRAM,
    "Time the proxy added to an invocation (total minus ModelLatency), in microseconds.",
    "OverheadLatency", "Microseconds",
)
MODEL_FIRST_BYTE_LATENCY = MetricDefinition(
    "sagemaker_model_first_byte_latency_microseconds", Kind.HISTOGRAM,
    "For streamed responses: time from sending the request to the first body byte from the model, in microseconds.",
    "ModelFirstByteLatency", "Microseconds",
)
CONCURRENT_REQUESTS_PER_MODEL = MetricDefinition(
    "sagemaker_concurrent_requests_per_model", Kind.GAUGE,
    "Invocations in flight.", "ConcurrentRequestsPerModel",
)
LIVE_INSTANCES = MetricDefinition(
    "sagemaker_live_instances", Kind.GAUGE,
    "Live model instances of the variant, the n of InvocationsPerInstance.", multiprocess_mode="livemax",
)
REJECTED_REQUESTS = MetricDefinition(
    "sagemaker_proxy_rejected_requests_total", Kind.COUNTER,
    "Requests the proxy refused before calling the model, by reason.", labels=("reason",),
)
UPSTREAM_ERRORS = MetricDefinition(
    "sagemaker_proxy_upstream_errors_total", Kind.COUNTER,
    "Invocations that failed in the proxy's call to the model, by reason (the client got 502 or 504).",
    labels=("reason",),
)
INSTANCE_COUNT_ERRORS = MetricDefinition(
    "sagemaker_proxy_instance_count_errors_total", Kind.COUNTER,
    "Failed polls of the live instance count source (the last good count is kept).",
)
CLIENT_DISCONNECTS = MetricDefinition(
    "sagemaker_proxy_client_disconnects_total", Kind.COUNTER,
    "Invocations abandoned because the client disconnected while the model was working.",
)

CLOUDWATCH_LAST_SUCCESS = MetricDefinition(
    "sagemaker_proxy_cloudwatch_last_success_timestamp_seconds", Kind.GAUGE,
    "Unix time of the last successful PutMetricData.", multiprocess_mode="livemax",
)
CLOUDWATCH_FAILURES = MetricDefinition(
    "sagemaker_proxy_cloudwatch_publish_failures_total", Kind.COUNTER,
    "Failed PutMetricData attempts, by reason (throttled, server_error, network, credentials, rejected, internal).",
    labels=("reason",),
)
CLOUDWATCH_BUFFERED_PERIODS = MetricDefinition(
    "sagemaker_proxy_cloudwatch_buffered_periods", Kind.GAUGE,
    "Ended periods waiting to be published to CloudWatch.",
)
CLOUDWATCH_DROPPED = MetricDefinition(
    "sagemaker_proxy_cloudwatch_dropped_datapoints_total", Kind.COUNTER,
    "Datapoints dropped because the buffer was full while CloudWatch was unreachable.",
)
CLOUDWATCH_PUBLISHED = MetricDefinition(
    "sagemaker_proxy_cloudwatch_published_datapoints_total", Kind.COUNTER,
    "Datapoints (statistic sets) accepted by CloudWatch.",
)

# Instance metrics: percent, sampled in the background. CPU and GPU are 0-100 per unit (4 CPUs: 0-400).
# Prometheus labels endpoint_name, variant_name, host; CloudWatch dimension Host, and EndpointName, VariantName.
HOST_LABELS = ("host",)
CPU_UTILIZATION = MetricDefinition(
    "sagemaker_cpu_utilization_percent", Kind.GAUGE,
    "CPU used by the watched containers over the last interval, percent of one CPU (0-100 x CPUs).",
    "CPUUtilization", "Percent", HOST_LABELS,
)
MEMORY_UTILIZATION = MetricDefinition(
    "sagemaker_memory_utilization_percent", Kind.GAUGE,
    "Memory in use by the watched containers (without reclaimable page cache), percent of their limit or of the host.",
    "MemoryUtilization", "Percent", HOST_LABELS,
)
GPU_UTILIZATION = MetricDefinition(
    "sagemaker_gpu_utilization_percent", Kind.GAUGE,
    "GPU utilization summed over the host's GPUs (0-100 x GPUs); absent without a GPU.",
    "GPUUtilization", "Percent", HOST_LABELS,
)
GPU_MEMORY_UTILIZATION = MetricDefinition(
    "sagemaker_gpu_memory_utilization_percent", Kind.GAUGE,
    "GPU memory in use summed over the host's GPUs (0-100 x GPUs); absent without a GPU.",
    "GPUMemoryUtilization", "Percent", HOST_LABELS,
)
DISK_UTILIZATION = MetricDefinition(
    "sagemaker_disk_utilization_percent", Kind.GAUGE,
    "Used space of the file system that holds the model directory, percent.",
    "DiskUtilization", "Percent", HOST_LABELS,
)
HOST_METRICS = (CPU_UTILIZATION, MEMORY_UTILIZATION, GPU_UTILIZATION, GPU_MEMORY_UTILIZATION, DISK_UTILIZATION)

INVOCATION_METRICS = (
    INVOCATIONS,
    INVOCATION_4XX_ERRORS,
    INVOCATION_5XX_ERRORS,
    INVOCATION_MODEL_ERRORS,
    INVOCATIONS_PER_INSTANCE,
    MODEL_LATENCY,
    OVERHEAD_LATENCY,
    CONCURRENT_REQUESTS_PER_MODEL,
)
ALL_METRICS = (
    *INVOCATION_METRICS,
    MODEL_FIRST_BYTE_LATENCY,
    LIVE_INSTANCES,
    REJECTED_REQUESTS,
    UPSTREAM_ERRORS,
    CLIENT_DISCONNECTS,
    INSTANCE_COUNT_ERRORS,
    CLOUDWATCH_LAST_SUCCESS,
    CLOUDWATCH_FAILURES,
    CLOUDWATCH_BUFFERED_PERIODS,
    CLOUDWATCH_DROPPED,
    CLOUDWATCH_PUBLISHED,
    *HOST_METRICS,
)

# Histogram buckets in microseconds: 100 us to 120 s for the model, 10 us to 1 s for the overhead.
DEFAULT_MODEL_LATENCY_BUCKETS_US: tuple[float, ...] = (
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000, 60_000_000, 120_000_000,
)
DEFAULT_OVERHEAD_LATENCY_BUCKETS_US: tuple[float, ...] = (
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
)
