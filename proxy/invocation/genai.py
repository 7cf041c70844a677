"""OpenTelemetry's GenAI conventions: the metrics of a model server that serves LLMs, exported over OTLP/HTTP,
and what the invocation span says of the answer.

Pinned to semantic-conventions v1.41.0 (GenAI: status development): names, units, bucket boundaries and
attributes are that release's. On only where asked for (``--otel-metrics URL``, or
``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``) and ``OTEL_SDK_DISABLED`` is not true; the SDK reads the rest of the
standard variables itself (``OTEL_METRIC_EXPORT_INTERVAL``, ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_EXPORTER_OTLP_*HEADERS``...). Needs the otel extra. Off, nothing here is imported but the names.

Which invocations: those on a GenAI route (chat, text_completion, embeddings, by the path), and any other whose
answer carried token counts (``generate_content``). Each gets, at its end:

- ``gen_ai.server.request.duration``: from the request's arrival to its last byte out (s), errors included
  (``error.type``: the proxy's fault reason, or the model's status code);
- ``gen_ai.server.time_to_first_token``: to the first chunk with generated content, successful streams (s);
- ``gen_ai.server.time_per_output_token``: from the first token to the last over the tokens minus one (s);
- ``gen_ai.client.token.usage``: input and output tokens (``gen_ai.token.type``), where they were counted.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import uuid
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter

from proxy.invocation.headers import named_model
from proxy.types import Body, Scope

if TYPE_CHECKING:
    from proxy.invocation.record import Invocation

log = logging.getLogger("proxy.genai")

SEMCONV_VERSION = "1.41.0"
SCHEMA_URL = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",)
# The boundaries the conventions advise (ExplicitBucketBoundaries), per metric.
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TIME_TO_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TIME_PER_OUTPUT_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)



GENERIC = "generate_content"  # another route whose answer carried tokens

_MODEL = re.compile(rb'"model"[ \t]*:[ \t]*"([^"\\]{1,256})"')
_STREAM = re.compile(rb'"stream"[ \t]*:[ \t]*true')


def wanted(otel_metrics: str | None, environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether GenAI metrics are asked for: an OTLP metrics endpoint given, and the SDK not disabled."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(otel_metrics) or any(environ.get(v) for v in ENDPOINT_VARIABLES)


def operation(path: str) -> str | None:
    """The GenAI operation a route is, by its path (OpenAI's, TGI's, Ollama's, Triton's); None for another."""
    if path.endswith("/chat/completions") or path == "/api/chat":
        return "chat"
    if path.endswith(("/completions", "/generate", "/generate_stream")):
        return "text_completion"
    if path.endswith(("/embeddings", "/embed")):
        return "embeddings"
    return None


def describe(scope: Scope, record: Invocation, body: Body) -> None:
    """What OTel says of the request, read before it goes on (only with traces or GenAI metrics on): its
    operation, the model it names, whether it asked for a stream."""
    record.operation = operation(scope["path"])
    if record.model is None:
        record.model = named_model(scope["headers"], body)
    head = body if isinstance(body, bytes) else (body[0] if body else b"")
    record.stream_asked = _STREAM.search(head, 0, 4096) is not None


def response_model(record: Invocation) -> str | None:
    """The model the answer names (an OpenAI-compatible answer's ``model``), if any."""
    answer = record.answer
    if not answer:
        return None
    found = _MODEL.search(answer)
    return found.group(1).decode("utf-8", "replace") if found is not None else None


def error_type(record: Invocation) -> str | None:
    """``error.type``: the fault's reason, else the model's status when it is an error; None for a success."""
    fault = record.fault
    if fault is not None:
        return fault.reason
    return str(record.status) if not 200 <= record.status < 400 else None


def span_attributes(record: Invocation) -> dict[str, Any]:
    """What the invocation span says of a GenAI answer (``gen_ai.*``)."""
    out: dict[str, Any] = {"gen_ai.request.stream": record.stream_asked}
    if record.operation is not None:
        out["gen_ai.operation.name"] = record.operation
    if record.model:
        out["gen_ai.request.model"] = record.model
    model = response_model(record)
    if model:
        out["gen_ai.response.model"] = model
    if record.input_tokens or record.output_tokens:
        out["gen_ai.usage.input_tokens"] = record.input_tokens
        out["gen_ai.usage.output_tokens"] = record.output_tokens
    if record.finish_reason is not None:
        out["gen_ai.response.finish_reasons"] = (record.finish_reason,)
    return out


class GenAIMetrics:
    """The GenAI metrics of one process, exported every ``OTEL_METRIC_EXPORT_INTERVAL`` (the SDK's reader),
    and the exporter's health on /metrics."""

    def __init__(self, registry: CollectorRegistry, otel_metrics: str | None, provider: str, service_name: str = "sagemaker-metrics-proxy") -> None:
        try:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import MetricExportResult, PeriodicExportingMetricReader
            from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
        except ImportError as e:
            from proxy.errors import ConfigError

            raise ConfigError(f"--otel-metrics needs the otel extra: pip install 'sagemaker-metrics-proxy[otel]' ({e})") from None
        self.provider_name = provider
        self.failed = Counter("sagemaker_proxy_otel_metric_export_failures", "Exports of the GenAI metrics the OTLP collector did not take.", registry=registry)
        self.exported = Counter("sagemaker_proxy_otel_metric_exports", "Exports of the GenAI metrics the OTLP collector took.", registry=registry)
        failed, exported = self.failed, self.exported

        class CountingExporter(OTLPMetricExporter):
            def export(self, metrics_data: Any, timeout_millis: float | None = None, **kwargs: Any) -> Any:
                try:
                    result = super().export(metrics_data, timeout_millis=timeout_millis, **kwargs)
                except Exception:
                    result = MetricExportResult.FAILURE
                (exported if result == MetricExportResult.SUCCESS else failed).inc()
                return result

        endpoint = otel_metrics.rstrip("/") + "/v1/metrics" if otel_metrics else None
        # Each process (a worker) is an instance of its own: the collector adds them up, none overwrites another.
        attributes = {SERVICE_INSTANCE_ID: f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}"}
        if not os.environ.get("OTEL_SERVICE_NAME"):
            attributes[SERVICE_NAME] = service_name
        reader = PeriodicExportingMetricReader(CountingExporter(endpoint=endpoint) if endpoint else CountingExporter())
        self.provider = MeterProvider(resource=Resource.create(attributes), metric_readers=[reader])
        meter = self.provider.get_meter("sagemaker-metrics-proxy", schema_url=SCHEMA_URL)
        self._duration = meter.create_histogram(
            "gen_ai.server.request.duration", "s", "Generative AI server request duration such as time-to-last byte or last output token.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self._first_token = meter.create_histogram(
            "gen_ai.server.time_to_first_token", "s", "Time to generate first token for successful responses.",
            explicit_bucket_boundaries_advisory=TIME_TO_FIRST_TOKEN_BUCKETS,
        )
        self._per_token = meter.create_histogram(
            "gen_ai.server.time_per_output_token", "s", "Time per output token generated after the first token for successful responses.",
            explicit_bucket_boundaries_advisory=TIME_PER_OUTPUT_TOKEN_BUCKETS,
        )
        self._tokens = meter.create_histogram(
            "gen_ai.client.token.usage", "{token}", "Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        )
        log.info("GenAI metrics: exporting over OTLP/HTTP to %s", endpoint or "the OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")

    def ended(self, record: Invocation) -> None:
        """One invocation ended (counted, and on a GenAI route or with tokens): its metrics."""
        name = record.operation
        if name is None:
            if not (record.input_tokens or record.output_tokens):
                return
            name = GENERIC
        attributes = self._attributes(record, name)
        error = error_type(record)
        if error is not None:
            self._duration.record((record.t_out - record.t_in) / 1e9, {**attributes, "error.type": error})
            return
        self._duration.record((record.t_out - record.t_in) / 1e9, attributes)
        first_token_us = record.time_to_first_token_us
        if first_token_us is not None:
            self._first_token.record(first_token_us / 1e6, attributes)
        per_token_ns = record.time_per_output_token_ns
        if per_token_ns is not None:
            self._per_token.record(per_token_ns / 1e9, attributes)
        if record.input_tokens:
            self._tokens.record(record.input_tokens, {**attributes, "gen_ai.token.type": "input"})
        if record.output_tokens:
            self._tokens.record(record.output_tokens, {**attributes, "gen_ai.token.type": "output"})

    def _attributes(self, record: Invocation, name: str) -> dict[str, Any]:
        out: dict[str, Any] = {"gen_ai.operation.name": name, "gen_ai.provider.name": self.provider_name}
        if record.model:
            out["gen_ai.request.model"] = record.model
        model = response_model(record)
        if model:
            out["gen_ai.response.model"] = model
        variant = record.variant
        if variant is not None:
            host, _, port = variant.client.authority.decode("latin-1").rpartition(":")
            out["server.address"] = host
            out["server.port"] = int(port or 80)
        return out

    def shutdown(self, timeout_s: float) -> None:
        """At exit: the last export, for at most ``timeout_s`` (a collector that is down must not hold a stop)."""
        worker = threading.Thread(target=self.provider.shutdown, kwargs={"timeout_millis": timeout_s * 1000}, name="otel-metrics-shutdown", daemon=True)
        worker.start()
        worker.join(timeout_s)
        if worker.is_alive():
            log.warning("GenAI metrics: the collector did not take the last export within %g s (--otel-shutdown-timeout)", timeout_s)
