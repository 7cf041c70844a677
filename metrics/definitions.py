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
    largest kept (``livemax``), live workers only;
    ``buckets`` are a histogram's default bucket bounds, in Prometheus's unit (seconds, bytes).

    Durations are measured in whole microseconds: Prometheus gets seconds (its base unit), CloudWatch
    Microseconds, as SageMaker publishes them.
    """

    prometheus_name: str
    kind: Kind
    help: str
    cloudwatch_name: str | None = None
    unit: str = "Count"
    labels: tuple[str, ...] = ()
    multiprocess_mode: Literal["livesum", "livemax"] = "livesum"
    buckets: tuple[float, ...] = ()
    component_cloudwatch_name: str | None = None  # its name for an inference component, where SageMaker names it apart


# Histogram buckets, in seconds: ModelLatency up to 10 minutes (LLM calls), the overhead 10 us to 1 s.
DEFAULT_MODEL_LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)
DEFAULT_OVERHEAD_LATENCY_BUCKETS: tuple[float, ...] = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)
# Between a stream's chunks, and per output token (vLLM's buckets for the latter).
INTER_CHUNK_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TIME_PER_OUTPUT_TOKEN_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)
SIZE_BUCKETS: tuple[float, ...] = tuple(float(4**i * 64) for i in range(11))  # 64 B to 64 MiB
# Time to first token, as vLLM buckets it; tokens per request, 1, 4, 16 ... 4^n, as OTel's GenAI conventions advise.
TIME_TO_FIRST_TOKEN_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)
TOKENS_PER_REQUEST_BUCKETS: tuple[float, ...] = tuple(float(4**i) for i in range(14))  # 1 to 67,108,864
# OpenAI's finish reasons; any other is "other", so the label stays bounded.
FINISH_REASONS = ("stop", "length", "tool_calls", "content_filter", "function_call", "other")

# Labels every invocation metric carries; CloudWatch dimensions EndpointName and VariantName.
VARIANT_LABELS = ("endpoint_name", "variant_name")
# With --model-label: the model a request names, bounded by --max-models (the rest are "__other__").
MODEL_LABEL = ("model",)
# With inference components in --config: the component that served ("" for a variant's own traffic).
COMPONENT_LABEL = ("inference_component",)

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
    "Sum of 1/n per invocation, n being the live instance count of the variant (or the copies of the inference component) at that moment.",
    "InvocationsPerInstance", component_cloudwatch_name="InvocationsPerCopy",
)
MODEL_LATENCY = MetricDefinition(
    "sagemaker_model_latency_seconds", Kind.HISTOGRAM,
    "Time spent waiting on the model.", "ModelLatency", "Microseconds", buckets=DEFAULT_MODEL_LATENCY_BUCKETS,
)
OVERHEAD_LATENCY = MetricDefinition(
    "sagemaker_overhead_latency_seconds", Kind.HISTOGRAM,
    "Time the proxy added to an invocation (total minus ModelLatency).",
    "OverheadLatency", "Microseconds", buckets=DEFAULT_OVERHEAD_LATENCY_BUCKETS,
)
# Streamed responses (chunked, or read to the close): SageMaker's stream metrics.
FIRST_CHUNK_LATENCY = MetricDefinition(
    "sagemaker_first_chunk_latency_seconds", Kind.HISTOGRAM,
    "Streamed responses: from the request's arrival to the first body chunk handed to the client.",
    "FirstChunkLatency", "Microseconds", buckets=DEFAULT_MODEL_LATENCY_BUCKETS,
)
FIRST_CHUNK_MODEL_LATENCY = MetricDefinition(
    "sagemaker_first_chunk_model_latency_seconds", Kind.HISTOGRAM,
    "Streamed responses: from the request sent to the model to the model's first body byte.",
    "FirstChunkModelLatency", "Microseconds", buckets=DEFAULT_MODEL_LATENCY_BUCKETS,
)
FIRST_CHUNK_OVERHEAD_LATENCY = MetricDefinition(
    "sagemaker_first_chunk_overhead_latency_seconds", Kind.HISTOGRAM,
    "Streamed responses: FirstChunkLatency minus FirstChunkModelLatency, the proxy's part of the wait for the first chunk.",
    "FirstChunkOverheadLatency", "Microseconds", buckets=DEFAULT_OVERHEAD_LATENCY_BUCKETS,
)
INTER_CHUNK_LATENCY = MetricDefinition(
    "sagemaker_inter_chunk_latency_seconds", Kind.HISTOGRAM,
    "Streamed responses: the gaps between the model's body chunks (time blocked on the client left out).",
    buckets=INTER_CHUNK_BUCKETS,
)
MID_STREAM_ERRORS = MetricDefinition(
    "sagemaker_mid_stream_errors_total", Kind.COUNTER,
    "Responses that broke after their head went to the client: the model reset or stalled, or sent a malformed chunk.",
    "MidStreamErrors",
)
# OpenAI-compatible responses (server-sent events, or JSON with usage): tokens, as vLLM and TGI count them.
INPUT_TOKENS = MetricDefinition(
    "sagemaker_input_tokens_total", Kind.COUNTER,
    "Prompt tokens, from the usage object of OpenAI-compatible responses.", "InputTokens",
)
OUTPUT_TOKENS = MetricDefinition(
    "sagemaker_output_tokens_total", Kind.COUNTER,
    "Generated tokens: the usage object's completion_tokens, else the content events of the stream.", "OutputTokens",
)
TIME_PER_OUTPUT_TOKEN = MetricDefinition(
    "sagemaker_time_per_output_token_seconds", Kind.HISTOGRAM,
    "Per OpenAI-compatible stream: from the first token to the last, over the output tokens minus one.",
    "TimePerOutputToken", "Microseconds", buckets=TIME_PER_OUTPUT_TOKEN_BUCKETS,
)
REQUEST_SIZE = MetricDefinition(
    "sagemaker_request_size_bytes", Kind.HISTOGRAM, "Request body bytes per invocation.", buckets=SIZE_BUCKETS,
)
RESPONSE_SIZE = MetricDefinition(
    "sagemaker_response_size_bytes", Kind.HISTOGRAM, "Response body bytes per invocation.", buckets=SIZE_BUCKETS,
)
CONCURRENT_REQUESTS_PER_MODEL = MetricDefinition(
    "sagemaker_concurrent_requests_per_model", Kind.GAUGE,
    "Invocations in flight.", "ConcurrentRequestsPerModel", component_cloudwatch_name="ConcurrentRequestsPerCopy",
)
QUEUE_TIME = MetricDefinition(
    "sagemaker_queue_time_seconds", Kind.HISTOGRAM,
    "With --max-concurrency: time an invocation waited for a slot at the model (0 when one was free); part of OverheadLatency.",
    buckets=DEFAULT_MODEL_LATENCY_BUCKETS,
)
REQUESTS_WAITING = MetricDefinition(
    "sagemaker_requests_waiting", Kind.GAUGE,
    "With --max-concurrency: requests waiting for a slot at the model.",
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
MODEL_SETUP_TIME = MetricDefinition(
    "sagemaker_model_setup_seconds", Kind.GAUGE,
    "With --model-command: from starting the model to its first healthy ping, the latest start.", "ModelSetupTime", "Microseconds",
    multiprocess_mode="livemax",
)
MODEL_RESTARTS = MetricDefinition(
    "sagemaker_model_restarts_total", Kind.COUNTER,
    "With --model-command and --model-restart: times the model was started again after it exited or never became healthy.",
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
STREAM_METRICS = (FIRST_CHUNK_LATENCY, FIRST_CHUNK_MODEL_LATENCY, FIRST_CHUNK_OVERHEAD_LATENCY, INTER_CHUNK_LATENCY, MID_STREAM_ERRORS)
TIME_TO_FIRST_TOKEN = MetricDefinition(
    "sagemaker_time_to_first_token_seconds", Kind.HISTOGRAM,
    "Per OpenAI-compatible stream: from the request's arrival to the first chunk with generated content (not the role chunk), as the client sees it.",
    "TimeToFirstToken", "Microseconds", buckets=TIME_TO_FIRST_TOKEN_BUCKETS,
)
REQUEST_INPUT_TOKENS = MetricDefinition(
    "sagemaker_request_input_tokens", Kind.HISTOGRAM,
    "Prompt tokens per request that reported them (the usage object).", buckets=TOKENS_PER_REQUEST_BUCKETS,
)
REQUEST_OUTPUT_TOKENS = MetricDefinition(
    "sagemaker_request_output_tokens", Kind.HISTOGRAM,
    "Generated tokens per request whose tokens were counted.", buckets=TOKENS_PER_REQUEST_BUCKETS,
)
REQUESTS_FINISHED = MetricDefinition(
    "sagemaker_requests_finished_total", Kind.COUNTER,
    "OpenAI-compatible answers by the finish reason of their first choice: " + ", ".join(FINISH_REASONS) + ".",
    labels=("finish_reason",),
)
# Published to CloudWatch only with --cloudwatch-token-metrics (each is a custom metric more per variant).
CLOUDWATCH_TOKEN_METRICS = (INPUT_TOKENS, OUTPUT_TOKENS, TIME_TO_FIRST_TOKEN, TIME_PER_OUTPUT_TOKEN)
TOKEN_METRICS = (INPUT_TOKENS, OUTPUT_TOKENS, TIME_PER_OUTPUT_TOKEN, TIME_TO_FIRST_TOKEN, REQUEST_INPUT_TOKENS, REQUEST_OUTPUT_TOKENS, REQUESTS_FINISHED)
ALL_METRICS = (
    *INVOCATION_METRICS,
    *STREAM_METRICS,
    *TOKEN_METRICS,
    REQUEST_SIZE,
    RESPONSE_SIZE,
    QUEUE_TIME,
    REQUESTS_WAITING,
    LIVE_INSTANCES,
    REJECTED_REQUESTS,
    UPSTREAM_ERRORS,
    CLIENT_DISCONNECTS,
    INSTANCE_COUNT_ERRORS,
    MODEL_SETUP_TIME,
    MODEL_RESTARTS,
    CLOUDWATCH_LAST_SUCCESS,
    CLOUDWATCH_FAILURES,
    CLOUDWATCH_BUFFERED_PERIODS,
    CLOUDWATCH_DROPPED,
    CLOUDWATCH_PUBLISHED,
    *HOST_METRICS,
)

