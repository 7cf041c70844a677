"""OpenTelemetry's GenAI conventions (semantic conventions v1.41.0) end to end: a real proxy in front of the
example chat model exports the four GenAI metrics over OTLP/HTTP to a real receiver, which decodes them with the
OTLP protobuf classes; the invocation span carries the answer's gen_ai.* attributes.

The chat model sends its role chunk at once and the first token 200 ms later, so time to first token is the
200 ms and not the first body byte."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from proxy.invocation import genai
from tests.conftest import Proxy, Running
from tests.test_tracing import Collector as TraceCollector
from tests.test_tracing import attributes as span_attributes

CHAT = {"model": "example-7b", "messages": [{"role": "user", "content": "a b c"}], "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}


class MetricsCollector:
    """An OTLP/HTTP metrics receiver: the latest data point of each (metric, attributes), decoded."""

    def __init__(self, answer: int = 200) -> None:
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
            ExportMetricsServiceRequest,
            ExportMetricsServiceResponse,
        )

        self.metrics: dict[str, Any] = {}  # name: the Metric (unit, description)
        self.points: dict[tuple[str, frozenset[tuple[str, Any]]], Any] = {}
        self.resources: list[dict[str, Any]] = []
        self.schema_urls: set[str] = set()
        self.exports = 0
        collector = self
        answer_status = answer

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportMetricsServiceRequest()
                request.ParseFromString(body)
                collector.received(request)
                answer = ExportMetricsServiceResponse().SerializeToString()
                self.send_response(answer_status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def received(self, request: Any) -> None:
        self.exports += 1
        for resource in request.resource_metrics:
            self.resources.append(decode(resource.resource.attributes))
            for scope in resource.scope_metrics:
                self.schema_urls.add(scope.schema_url)
                for metric in scope.metrics:
                    self.metrics[metric.name] = metric
                    for point in metric.histogram.data_points:
                        self.points[(metric.name, frozenset(decode(point.attributes).items()))] = point

    def wait(self, check: Callable[[], bool], timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not check() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert check(), f"not exported in {timeout} s: {sorted(self.points)}"

    def find(self, name: str, **want: Any) -> list[tuple[dict[str, Any], Any]]:
        """The points of ``name`` whose attributes include ``want``."""
        out = []
        for (metric, attrs), point in self.points.items():
            a = dict(attrs)
            if metric == name and all(a.get(k) == v for k, v in want.items()):
                out.append((a, point))
        return out


def decode(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        v = kv.value
        kind = v.WhichOneof("value")
        out[kv.key] = tuple(x.string_value for x in v.array_value.values) if kind == "array_value" else getattr(v, kind)
    return out


@pytest.fixture
def metrics_collector() -> Iterator[MetricsCollector]:
    c = MetricsCollector()
    yield c
    c.server.shutdown()


@pytest.fixture
def fast_export(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")


def stream_chat(url: str, body: dict[str, Any], headers: dict[str, str]) -> bytes:
    with httpx.stream("POST", url, json=body, headers=headers, timeout=10) as r:
        assert r.status_code == 200
        return r.read()


@pytest.mark.e2e
def test_the_four_genai_metrics_reach_an_otlp_receiver_with_the_conventions_names_units_buckets_and_attributes(
    model: Running, metrics_collector: MetricsCollector, fast_export: None, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy(model.url, "--model-server", "openai", "--otel-metrics", metrics_collector.url)
    model_port = int(model.url.rsplit(":", 1)[1])
    raw = stream_chat(f"{proxy.url}/v1/chat/completions", CHAT, {"X-Test-First-Token-Ms": "200", "X-Test-Stream-Interval-Ms": "10"})
    assert raw.count(b'"role":"assistant"') == 1
    r = httpx.post(f"{proxy.url}/v1/completions", json={"model": "example-7b", "prompt": "one two", "max_tokens": 2})
    assert r.status_code == 200
    bad = httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": "example-7b", "messages": "not a list"})
    assert bad.status_code == 400
    httpx.post(f"{proxy.url}/invocations", json={"instances": [[5.1, 3.5, 1.4, 0.2]]})  # no GenAI route, no tokens: not counted here

    def ready() -> bool:
        chat = metrics_collector.find("gen_ai.server.request.duration", **{"gen_ai.operation.name": "chat"})
        return sum(p.count for _, p in chat) >= 2 and bool(metrics_collector.find("gen_ai.client.token.usage", **{"gen_ai.operation.name": "text_completion"}))

    metrics_collector.wait(ready)
    expect = {
        "gen_ai.server.request.duration": ("s", genai.DURATION_BUCKETS),
        "gen_ai.server.time_to_first_token": ("s", genai.TIME_TO_FIRST_TOKEN_BUCKETS),
        "gen_ai.server.time_per_output_token": ("s", genai.TIME_PER_OUTPUT_TOKEN_BUCKETS),
        "gen_ai.client.token.usage": ("{token}", genai.TOKEN_BUCKETS),
    }
    for name, (unit, bounds) in expect.items():
        assert metrics_collector.metrics[name].unit == unit, name
        for _, point in metrics_collector.find(name):
            assert tuple(point.explicit_bounds) == tuple(float(b) for b in bounds), name
    # The spec's advised boundaries, copied from semantic-conventions v1.41.0 docs/gen-ai/gen-ai-metrics.md.
    assert genai.TIME_TO_FIRST_TOKEN_BUCKETS[:3] == (0.001, 0.005, 0.01) and genai.TOKEN_BUCKETS[-1] == 4**13
    assert metrics_collector.schema_urls == {"https://opentelemetry.io/schemas/1.41.0"}
    base = {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "example-7b",
        "gen_ai.response.model": "example", "server.address": "127.0.0.1", "server.port": model_port,
    }
    [(attrs, first_token)] = metrics_collector.find("gen_ai.server.time_to_first_token")
    assert attrs == base
    assert first_token.count == 1 and 0.198 <= first_token.sum < 0.26, first_token.sum  # the first content, not the role chunk
    [(_, per_token)] = metrics_collector.find("gen_ai.server.time_per_output_token")
    assert per_token.count == 1 and 0.008 <= per_token.sum < 0.1
    tokens = {(a["gen_ai.operation.name"], a["gen_ai.token.type"]): p.sum for a, p in metrics_collector.find("gen_ai.client.token.usage")}
    assert tokens == {("chat", "input"): 3, ("chat", "output"): 5, ("text_completion", "input"): 2, ("text_completion", "output"): 2}
    [(ok_attrs, ok)] = metrics_collector.find("gen_ai.server.request.duration", **{"gen_ai.operation.name": "chat", "gen_ai.response.model": "example"})
    assert ok.count == 1 and ok.sum >= 0.2 and "error.type" not in ok_attrs
    [(error_attrs, error)] = metrics_collector.find("gen_ai.server.request.duration", **{"error.type": "400"})
    assert error.count == 1 and error_attrs["gen_ai.operation.name"] == "chat"
    assert not metrics_collector.find("gen_ai.server.request.duration", **{"gen_ai.operation.name": "generate_content"})
    resource = metrics_collector.resources[-1]
    assert resource["service.name"] == "sagemaker-metrics-proxy" and resource["service.instance.id"]
    assert proxy.samples()[("sagemaker_proxy_otel_metric_exports_total", frozenset())] >= 1


@pytest.mark.e2e
def test_the_invocation_span_says_what_the_conventions_ask_of_the_answer(
    model: Running, fast_export: None, start_proxy: Callable[..., Proxy]
) -> None:
    collector = TraceCollector()
    try:
        proxy = start_proxy(model.url, "--model-server", "openai", "--otel", collector.url)
        stream_chat(f"{proxy.url}/v1/chat/completions", CHAT, {})
        [span] = [s for s in collector.wait(2) if s.kind == 2]  # SPAN_KIND_SERVER
    finally:
        collector.server.shutdown()
    got = span_attributes(span)
    assert got["gen_ai.operation.name"] == "chat" and got["gen_ai.request.model"] == "example-7b"
    assert got["gen_ai.response.model"] == "example" and got["gen_ai.request.stream"] is True
    assert got["gen_ai.usage.input_tokens"] == 3 and got["gen_ai.usage.output_tokens"] == 5
    reasons = next(kv.value.array_value.values for kv in span.attributes if kv.key == "gen_ai.response.finish_reasons")
    assert [v.string_value for v in reasons] == ["length"]


@pytest.mark.e2e
def test_a_metrics_collector_that_refuses_is_counted_and_delays_nothing(model: Running, fast_export: None, start_proxy: Callable[..., Proxy]) -> None:
    refusing = MetricsCollector(answer=400)  # a permanent error: the SDK does not retry it
    try:
        proxy = start_proxy(model.url, "--model-server", "openai", "--otel-metrics", refusing.url, "--genai-provider", "vllm")
        started = time.monotonic()
        stream_chat(f"{proxy.url}/v1/chat/completions", CHAT, {})
        assert time.monotonic() - started < 5  # the export runs in the background; a hang guard, not a timing check
        deadline = time.monotonic() + 20
        while proxy.samples().get(("sagemaker_proxy_otel_metric_export_failures_total", frozenset()), 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proxy.samples()[("sagemaker_proxy_otel_metric_export_failures_total", frozenset())] >= 1
        assert refusing.find("gen_ai.server.request.duration", **{"gen_ai.provider.name": "vllm"})  # it was sent, and refused
    finally:
        refusing.server.shutdown()


def test_operations_come_from_the_route() -> None:
    assert genai.operation("/v1/chat/completions") == "chat"
    assert genai.operation("/api/chat") == "chat"
    assert genai.operation("/v1/completions") == "text_completion"
    assert genai.operation("/generate_stream") == "text_completion"
    assert genai.operation("/v2/models/llama/generate") == "text_completion"
    assert genai.operation("/v1/embeddings") == "embeddings"
    assert genai.operation("/api/embed") == "embeddings"
    assert genai.operation("/invocations") is None


def test_genai_metrics_are_asked_for_by_flag_or_the_standard_variable() -> None:
    assert genai.wanted("http://127.0.0.1:4318", {})
    assert genai.wanted(None, {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://127.0.0.1:4318/v1/metrics"})
    assert not genai.wanted(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})  # traces' endpoint alone: no metrics
    assert not genai.wanted("http://127.0.0.1:4318", {"OTEL_SDK_DISABLED": "true"})


def test_a_bad_provider_name_is_refused_with_exit_2() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--upstream", "http://127.0.0.1:9", "--genai-provider", "Open AI"],
        capture_output=True, text=True, timeout=30,
    )
    assert run.returncode == 2
    assert "--genai-provider" in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
