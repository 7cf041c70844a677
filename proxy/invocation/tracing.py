"""OpenTelemetry traces: the proxy as a hop, with its model/overhead split on the span.

On only when an OTLP endpoint is configured, the standard way (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, or ``--otel URL``) and ``OTEL_SDK_DISABLED`` is not true; the SDK then
reads the rest of the standard variables itself (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER`` and its argument, ``OTEL_BSP_*``, ``OTEL_EXPORTER_OTLP_*HEADERS``...). Needs the
optional extra: ``pip install '.[otel]'`` in a clone of the proxy. Off, nothing here is imported.

Per invocation: a SERVER span continuing the client's W3C trace context, and a CLIENT span for the model
call whose context goes to the model in ``traceparent``. Spans leave in the background (a batch processor):
a collector that is down or slow never delays a request; what is dropped is counted on /metrics.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter

from proxy.invocation.genai import span_attributes
from proxy.types import Headers, Scope

if TYPE_CHECKING:
    from proxy.invocation.record import Invocation
    from proxy.upstream.variants import Variant

log = logging.getLogger("proxy.tracing")

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
TIMEOUT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT")
# Seconds one export may take, its retries included, unless a variable above says otherwise. The SDK's 10 s
# go to retries with backoff (1, 2, 4 s) when the collector is down, and a batch counts as dropped only when
# the export gives up: with this bound, after about a second.
EXPORT_TIMEOUT_S = 2.0
PROPAGATED = (b"traceparent", b"tracestate", b"baggage")


def wanted(otel: str | None, environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether tracing is asked for: an OTLP endpoint given, and the SDK not disabled."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(otel) or any(environ.get(v) for v in ENDPOINT_VARIABLES)


class Tracing:
    """The tracer of one process and its exporter's health on /metrics."""

    def __init__(self, registry: CollectorRegistry, otel: str | None = None, service_name: str = "sagemaker-metrics-proxy") -> None:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.propagate import extract, inject
            from opentelemetry.sdk.resources import SERVICE_NAME, Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult
            from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
        except ImportError as e:
            from proxy.errors import ConfigError

            raise ConfigError(f"tracing needs the otel extra: pip install '.[otel]' in a clone of the proxy ({e})") from None
        self._extract, self._inject = extract, inject
        self._server_kind, self._client_kind = SpanKind.SERVER, SpanKind.CLIENT
        self._status, self._error = Status, StatusCode.ERROR
        self._in_context = set_span_in_context
        self.dropped = Counter(
            "sagemaker_proxy_trace_spans_dropped", "Spans not delivered to the OTLP collector (export failed, or the queue was full).",
            registry=registry,
        )
        self.exported = Counter("sagemaker_proxy_trace_spans_exported", "Spans delivered to the OTLP collector.", registry=registry)
        dropped, exported = self.dropped, self.exported
        endpoint = otel.rstrip("/") + "/v1/traces" if otel else None

        class CountingExporter(OTLPSpanExporter):
            def export(self, spans: Any) -> Any:
                try:
                    result = super().export(spans)
                except Exception:
                    result = SpanExportResult.FAILURE
                (exported if result == SpanExportResult.SUCCESS else dropped).inc(len(spans))
                return result

        resource = Resource.create({SERVICE_NAME: service_name} if not os.environ.get("OTEL_SERVICE_NAME") else {})
        self.provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER, as the SDK reads it
        timeout = None if any(os.environ.get(v) for v in TIMEOUT_VARIABLES) else EXPORT_TIMEOUT_S
        processor = BatchSpanProcessor(CountingExporter(endpoint=endpoint, timeout=timeout))

        class CountingProcessor(type(processor)):  # type: ignore[misc]
            """The batch processor, counting what its full queue pushes out (it drops the oldest, silently)."""

            def on_end(self, span: Any) -> None:
                inner = getattr(self, "_batch_processor", None)
                queue = getattr(inner, "_queue", None)
                if queue is not None and queue.maxlen is not None and len(queue) >= queue.maxlen:
                    dropped.inc()
                super().on_end(span)

        processor.__class__ = CountingProcessor
        self._processor = processor
        self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer("sagemaker-metrics-proxy")
        log.info("tracing: exporting spans over OTLP/HTTP to %s", endpoint or "the OTEL_EXPORTER_OTLP_* endpoint")

    def shutdown(self, timeout_s: float) -> None:
        """At exit: the queued spans go to the collector for at most ``timeout_s``; what is left then is dropped,
        counted and said (a collector that is down must not hold a stop past the orchestrator's grace)."""
        worker = threading.Thread(target=self.provider.shutdown, name="otel-shutdown", daemon=True)
        worker.start()
        worker.join(timeout_s)
        if worker.is_alive():
            left = _queued(self._processor)
            self.dropped.inc(left)
            log.warning("tracing: the collector did not take the last spans within %g s (--otel-shutdown-timeout); %d queued spans dropped", timeout_s, left)

    # -- the request path ---------------------------------------------------------------------------------

    def begin(self, scope: Scope, record: Invocation, variant: Variant, headers: Headers, now_ns: int) -> tuple[Any, Any, int]:
        """The SERVER span (from the request's arrival, ``record.t_in``) and the CLIENT span for the model call,
        with what turns the clock's readings (``now_ns`` is one) into Unix time; ``headers`` (the model's) get the
        CLIENT span's context instead of the client's. The record gets the trace and the SERVER span's ids."""
        offset = self.wall_offset(now_ns)
        wall_ns = record.t_in + offset
        carrier = {n.decode("latin-1"): v.decode("latin-1") for n, v in scope["headers"] if n in PROPAGATED}
        parent = self._extract(carrier)
        method = scope["method"]
        path = scope["path"]
        client = scope.get("client")
        server = self.tracer.start_span(
            f"{method} {path}", context=parent, kind=self._server_kind, start_time=wall_ns,
            attributes={
                "http.request.method": method, "url.path": path, "url.scheme": scope.get("scheme", "http"),
                "network.protocol.version": scope.get("http_version", "1.1"),
                "client.address": client[0] if client else "",
                "sagemaker.endpoint_name": "", "sagemaker.variant_name": variant.name,
            },
        )
        authority = variant.client.authority.decode("latin-1")
        host, _, port = authority.rpartition(":")
        client_span = self.tracer.start_span(
            method, context=self._in_context(server), kind=self._client_kind,
            attributes={"http.request.method": method, "server.address": host, "server.port": int(port or 80), "sagemaker.instance": authority},
        )
        outgoing: dict[str, str] = {}
        self._inject(outgoing, context=self._in_context(client_span))
        headers[:] = [(n, v) for n, v in headers if n not in PROPAGATED]
        headers.extend((n.encode(), v.encode()) for n, v in outgoing.items())
        if "baggage" not in outgoing and "baggage" in carrier:
            headers.append((b"baggage", carrier["baggage"].encode("latin-1")))
        context = server.get_span_context()
        record.trace_id, record.span_id = format(context.trace_id, "032x"), format(context.span_id, "016x")
        return server, client_span, offset

    def end(self, spans: tuple[Any, Any, int], record: Invocation) -> None:
        """Both spans, with the invocation's outcome, ended at the clock points the record holds."""
        server, client_span, wall_offset_ns = spans
        endpoint = record.endpoint
        fault = record.fault
        model_error = (fault.invocation and fault.status is not None) if fault is not None else not 200 <= record.status < 300
        status = (fault.status or 499) if fault is not None else record.status
        if record.t_first_out:
            server.add_event("first_chunk", timestamp=record.t_first_out + wall_offset_ns)
        client_span.set_attribute("http.response.status_code", record.status or 0)
        if fault is not None:
            client_span.set_attribute("error.type", fault.reason)
        if model_error:
            client_span.set_status(self._status(self._error, fault.message if fault is not None else f"model status {record.status}"))
        client_span.end(end_time=(record.t_done or record.t_out) + wall_offset_ns)
        server.set_attributes({
            "http.response.status_code": status,
            "sagemaker.endpoint_name": endpoint,
            "sagemaker.model_latency_us": record.model_us if record.t_done else 0,
            "sagemaker.overhead_latency_us": record.overhead_us if record.t_done else 0,
            "http.request.body.size": record.request_bytes,
            "http.response.body.size": record.response_bytes,
        })
        if fault is not None:
            server.set_attribute("error.type", fault.reason)
        server.set_attributes(span_attributes(record))
        if model_error:
            server.set_status(self._status(self._error, fault.message if fault is not None else f"model status {record.status}"))
        server.end(end_time=record.t_out + wall_offset_ns)

    @staticmethod
    def wall_offset(clock_ns: int) -> int:
        """What to add to a monotonic reading to get Unix nanoseconds."""
        return time.time_ns() - clock_ns


def _queued(processor: Any) -> int:
    """Spans waiting in a batch processor's queue (its internals: 0 where they are not found)."""
    queue = getattr(getattr(processor, "_batch_processor", None), "_queue", None)
    return len(queue) if queue is not None else 0
