"""OpenTelemetry: the proxy as a hop in the trace, against a real OTLP/HTTP receiver decoding the protobuf.

The receiver here is a plain HTTP server that parses each export with the OTLP protobuf classes; the model
is tests/recording_model.py, which shows the traceparent it was sent.
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import Proxy, Running, free_port

pytestmark = pytest.mark.e2e

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


class Collector:
    """An OTLP/HTTP traces receiver: every span it was sent, decoded."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse

        self.spans: list[Any] = []
        spans = self.spans

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        spans.extend((resource.resource, span) for span in scope.spans)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, n: int, timeout: float = 10) -> list[Any]:
        deadline = time.monotonic() + timeout
        while len(self.spans) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.spans) >= n, f"{len(self.spans)} spans of {n}"
        return [span for _, span in self.spans]


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.server.shutdown()


@pytest.fixture
def fast_export(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "proxy-under-test")


def attributes(span: Any) -> dict[str, Any]:
    out = {}
    for kv in span.attributes:
        value = kv.value
        out[kv.key] = value.string_value or value.int_value or value.double_value or value.bool_value
    return out


def test_the_proxy_is_a_hop_between_the_client_and_the_model(
    recording_model: Running, collector: Collector, fast_export: None, start_proxy: Callable[..., Proxy]
) -> None:
    httpx.post(f"{recording_model.url}/__reset")
    proxy = start_proxy(recording_model.url, "--otel", collector.url, "--access-log")
    traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    r = httpx.post(f"{proxy.url}/invocations", content=b'{"x": 1}', headers={"traceparent": traceparent, "tracestate": "vendor=1", "baggage": "user=7"})
    assert r.status_code == 200
    # Exemplars: the latency buckets carry the trace id, in the OpenMetrics exposition. Read before the next
    # call, whose own trace may take the same buckets' exemplars.
    text = httpx.get(f"{proxy.metrics_url}/metrics", headers={"Accept": "application/openmetrics-text"}).text
    assert f'# {{trace_id="{CLIENT_TRACE}"}}' in text
    failed = httpx.post(f"{proxy.url}/invocations", content=b'{"x": 2}', headers={"X-Respond": "status=500"})
    assert failed.status_code == 500
    spans = collector.wait(4)
    by_kind = {(s.kind, bytes(s.trace_id).hex()): s for s in spans}
    server = by_kind[(2, CLIENT_TRACE)]  # SPAN_KIND_SERVER
    client = by_kind[(3, CLIENT_TRACE)]  # SPAN_KIND_CLIENT
    assert bytes(server.parent_span_id).hex() == CLIENT_SPAN  # continues the client's trace
    assert bytes(client.parent_span_id) == bytes(server.span_id)
    assert server.name == "POST /invocations" and client.name == "POST"
    got = attributes(server)
    assert got["http.request.method"] == "POST" and got["url.path"] == "/invocations" and got["http.response.status_code"] == 200
    assert got["sagemaker.endpoint_name"] == "test-endpoint" and got["sagemaker.variant_name"] == "AllTraffic"
    assert got["sagemaker.model_latency_us"] > 0 and "sagemaker.overhead_latency_us" in got
    assert got["http.request.body.size"] == 8
    assert attributes(client)["server.port"] == int(recording_model.url.rsplit(":", 1)[1])
    # The model got the CLIENT span's context, not the client's, and the client's tracestate and baggage.
    seen = {n.lower(): v for n, v in httpx.get(f"{recording_model.url}/__received").json()[0]["headers"]}
    assert seen["traceparent"] == f"00-{CLIENT_TRACE}-{bytes(client.span_id).hex()}-01"
    assert seen["tracestate"] == "vendor=1" and seen["baggage"] == "user=7"
    # A model error is an error on both spans; a new trace where the client sent none.
    errors = [s for s in spans if bytes(s.trace_id).hex() != CLIENT_TRACE]
    assert {s.kind for s in errors} == {2, 3} and all(s.status.code == 2 for s in errors)  # STATUS_CODE_ERROR
    resource = {kv.key: kv.value.string_value for kv in collector.spans[0][0].attributes}
    assert resource["service.name"] == "proxy-under-test"
    assert proxy.samples()[("sagemaker_proxy_trace_spans_exported_total", frozenset())] >= 4
    # The access log line of the traced call names its trace and the SERVER span.
    assert f"trace_id={CLIENT_TRACE} span_id={bytes(server.span_id).hex()}" in proxy.log.read_text()


def test_a_collector_that_is_down_delays_nothing_and_its_drops_are_counted_within_seconds(
    recording_model: Running, fast_export: None, monkeypatch: pytest.MonkeyPatch, start_proxy: Callable[..., Proxy]
) -> None:
    """A closed port as the collector, the export timeout left to the proxy: the SDK retries each batch with
    backoff within it, and the batch counts as dropped only when the export gives up. Within the SDK's own
    10 s, each batch took over 7 s; within the proxy's, about one, so 20 calls' spans are counted in a few."""
    for variable in ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"):
        monkeypatch.delenv(variable, raising=False)
    dead = f"http://127.0.0.1:{free_port()}"
    proxy = start_proxy(recording_model.url, "--otel", dead, "--log-level", "warning")
    for _ in range(20):  # over more than one 50 ms batch
        assert httpx.post(f"{proxy.url}/invocations", content=b"{}", timeout=5).status_code == 200
    deadline = time.monotonic() + 10
    dropped = 0.0
    while time.monotonic() < deadline:
        dropped = proxy.samples().get(("sagemaker_proxy_trace_spans_dropped_total", frozenset()), 0.0)
        if dropped >= 40:
            break
        time.sleep(0.2)
    assert dropped == 40, (dropped, proxy.log.read_text())  # a SERVER and a CLIENT span per call
    assert "Failed to export spans batch" in proxy.log.read_text()  # what the SDK says, now with the count
    assert proxy.value("sagemaker_invocations_total") == 20


def test_without_an_endpoint_there_is_no_tracing(recording_model: Running, monkeypatch: pytest.MonkeyPatch, start_proxy: Callable[..., Proxy]) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    proxy = start_proxy(recording_model.url)
    assert httpx.post(f"{proxy.url}/invocations", content=b"{}").status_code == 200
    text = httpx.get(f"{proxy.metrics_url}/metrics").text
    assert "trace_spans" not in text and "trace_id" not in text
    # OTEL_SDK_DISABLED wins over an endpoint.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    off = start_proxy(recording_model.url)
    assert "trace_spans" not in httpx.get(f"{off.metrics_url}/metrics").text


def test_a_collector_that_never_answers_holds_a_stop_no_longer_than_the_shutdown_timeout(
    recording_model: Running, monkeypatch: pytest.MonkeyPatch, start_proxy: Callable[..., Proxy]
) -> None:
    import socket
    import subprocess

    blackhole = socket.socket()  # takes connections into its backlog and never answers
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(64)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")  # the spans are still queued at the stop
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "30")
    try:
        proxy = start_proxy(recording_model.url, "--otel", f"http://127.0.0.1:{blackhole.getsockname()[1]}", "--otel-shutdown-timeout", "1", "--log-level", "info")
        for _ in range(5):
            assert httpx.post(f"{proxy.url}/invocations", content=b"{}", timeout=5).status_code == 200
        stopped = time.monotonic()
        proxy.proc.terminate()
        try:
            assert proxy.proc.wait(10) == 0
        except subprocess.TimeoutExpired:
            raise AssertionError("the stop waited on the collector") from None
        assert time.monotonic() - stopped < 5
        assert "queued spans dropped" in proxy.log.read_text()
    finally:
        blackhole.close()
