"""The request path in process, with a fake clock and a fake model client: the timing arithmetic, exactly."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry

from metrics.recorder import InvocationMetrics, InvocationRecorder
from proxy.errors import REJECT_REASONS, UPSTREAM_ERROR_REASONS, Fault, UpstreamError
from proxy.invocation.app import ProxyApp
from proxy.types import Headers, Message
from proxy.upstream.instances import StaticInstanceCount
from proxy.upstream.variants import Variant

MS = 1_000_000  # nanoseconds


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000 * MS

    def __call__(self) -> int:
        return self.now


class FakeResponse:
    """Implements what the request path uses of ModelResponse; each read() takes ``chunk_ns`` of model time."""

    def __init__(self, clock: FakeClock, status: int, chunks: list[bytes], streamed: bool, chunk_ns: int) -> None:
        self.clock = clock
        self.status = status
        self.headers: Headers = [(b"content-type", b"text/plain"), (b"connection", b"keep-alive")]
        self.streamed = streamed
        self.complete = not chunks or not streamed
        self._buffered = b"".join(chunks) if self.complete else b""
        self._chunks = deque(chunks if streamed else [])
        self.chunk_ns = chunk_ns
        self.closed = False

    def take_buffered(self) -> bytes:
        data, self._buffered = self._buffered, b""
        return data

    async def read(self) -> bytes:
        self.clock.now += self.chunk_ns
        return self._chunks.popleft() if self._chunks else b""

    def close(self) -> None:
        self.closed = True


class FakeUpstream:
    authority = b"model:8080"

    def __init__(self, clock: FakeClock, response: FakeResponse | UpstreamError, head_ns: int) -> None:
        self.clock = clock
        self.response = response
        self.head_ns = head_ns
        self.calls: list[tuple[bytes, bytes, Headers, bytes]] = []

    async def request(self, method: bytes, target: bytes, headers: Headers, body: bytes) -> FakeResponse:
        self.calls.append((method, target, headers, body))
        self.clock.now += self.head_ns
        if isinstance(self.response, UpstreamError):
            raise self.response
        return self.response

    def ready(self) -> bool:
        return True

    async def close(self) -> None:
        pass


def make_app(clock: FakeClock, upstream: FakeUpstream, record: bool = True, instances: int = 2,
             timeout: float = 60) -> tuple[ProxyApp, CollectorRegistry]:
    registry = CollectorRegistry()
    recorder = InvocationRecorder(
        InvocationMetrics(registry), endpoint_name="ep", variant_name="v1", reject_reasons=REJECT_REASONS,
        upstream_error_reasons=UPSTREAM_ERROR_REASONS,
    )
    app = ProxyApp(
        variants=[Variant("v1", upstream, recorder, StaticInstanceCount(instances))],  # type: ignore[arg-type]
        invocation_routes=frozenset({("POST", "/invocations")}),
        max_payload_bytes=100,
        invocation_timeout=timeout,
        record=record,
        clock=clock,
    )
    return app, registry


def call(app: ProxyApp, clock: FakeClock, *, send_ns: int = 0, body: bytes = b"{}", path: str = "/invocations",
         headers: Headers | None = None) -> list[Message]:
    """Run one request through the app; each send() to the client takes ``send_ns``."""
    sent: list[Message] = []
    scope = {
        "type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
        "headers": headers if headers is not None else [(b"host", b"proxy"), (b"content-length", b"%d" % len(body))],
        "client": ("10.0.0.9", 5000), "scheme": "http",
    }
    received = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> Message:
        if received:
            return received.pop(0)
        await asyncio.Event().wait()  # the client stays connected
        raise AssertionError

    async def send(message: Message) -> None:
        clock.now += send_ns
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, {"endpoint_name": "ep", "variant_name": "v1", **labels})


def test_sized_response_model_and_overhead_latency_are_exact() -> None:
    clock = FakeClock()
    upstream = FakeUpstream(clock, FakeResponse(clock, 200, [b"ok"], streamed=False, chunk_ns=0), head_ns=5 * MS)
    app, registry = make_app(clock, upstream)
    sent = call(app, clock, send_ns=1 * MS)
    assert sent[0]["status"] == 200
    headers = dict(sent[0]["headers"])
    assert headers[b"server-timing"] == b"model;dur=5.000, overhead;dur=0.000"
    assert headers[b"x-amzn-invoked-production-variant"] == b"v1"
    assert b"connection" not in headers
    assert sent[1]["body"] == b"ok"
    # The model took 5 ms; the two sends to the client took 1 ms each, which is overhead.
    assert value(registry, "sagemaker_model_latency_seconds_sum") == pytest.approx(0.005)
    assert value(registry, "sagemaker_overhead_latency_seconds_sum") == pytest.approx(0.002)
    assert value(registry, "sagemaker_invocations_total") == 1
    assert value(registry, "sagemaker_invocations_per_instance_total") == 0.5
    assert value(registry, "sagemaker_first_chunk_model_latency_seconds_count") == 0  # not a stream
    assert value(registry, "sagemaker_response_size_bytes_sum") == 2
    assert value(registry, "sagemaker_concurrent_requests_per_model") == 0


def test_streamed_response_time_blocked_on_the_client_is_overhead() -> None:
    clock = FakeClock()
    response = FakeResponse(clock, 200, [b"a", b"b", b"c"], streamed=True, chunk_ns=10 * MS)
    upstream = FakeUpstream(clock, response, head_ns=10 * MS)
    app, registry = make_app(clock, upstream)
    sent = call(app, clock, send_ns=2 * MS)
    assert [m.get("body") for m in sent[1:]] == [b"a", b"b", b"c", b""]
    # Model: 10 ms to the head + 3 chunks of 10 ms + 10 ms to the end = 50 ms.
    # Client: start + 3 chunks blocked 2 ms each while the model was still answering, + the final send.
    assert value(registry, "sagemaker_model_latency_seconds_sum") == pytest.approx(0.050)
    assert value(registry, "sagemaker_overhead_latency_seconds_sum") == pytest.approx(5 * 0.002)
    # The model's first body byte: head (10) + first read (10); the head waits for it, then goes out with it.
    assert value(registry, "sagemaker_first_chunk_model_latency_seconds_sum") == pytest.approx(0.020)
    # Handed to the client after the head's send (2 ms blocked on the client): that is the first chunk's overhead.
    assert value(registry, "sagemaker_first_chunk_latency_seconds_sum") == pytest.approx(0.022)
    assert value(registry, "sagemaker_first_chunk_overhead_latency_seconds_sum") == pytest.approx(0.002)
    # Gaps between chunks: 10 ms each, the 2 ms blocked on the client left out.
    assert value(registry, "sagemaker_inter_chunk_latency_seconds_count") == 2
    assert value(registry, "sagemaker_inter_chunk_latency_seconds_sum") == pytest.approx(0.020)
    assert value(registry, "sagemaker_mid_stream_errors_total") == 0
    assert response.closed


def test_model_status_classes() -> None:
    for status, errors_4xx, errors_5xx, model_errors in ((200, 0, 0, 0), (404, 1, 0, 1), (503, 0, 1, 1), (302, 0, 0, 1)):
        clock = FakeClock()
        upstream = FakeUpstream(clock, FakeResponse(clock, status, [b"x"], streamed=False, chunk_ns=0), head_ns=MS)
        app, registry = make_app(clock, upstream)
        assert call(app, clock)[0]["status"] == status
        assert value(registry, "sagemaker_invocation_4xx_errors_total") == errors_4xx
        assert value(registry, "sagemaker_invocation_5xx_errors_total") == errors_5xx
        assert value(registry, "sagemaker_invocation_model_errors_total") == model_errors


def test_failed_model_call_is_a_502_an_invocation_and_a_model_error() -> None:
    clock = FakeClock()
    upstream = FakeUpstream(clock, UpstreamError(Fault.UPSTREAM_CONNECT, "refused"), head_ns=3 * MS)
    app, registry = make_app(clock, upstream)
    sent = call(app, clock)
    assert sent[0]["status"] == 502
    assert sent[1]["body"] == b'{"error": "could not connect to the model"}'
    assert value(registry, "sagemaker_invocations_total") == 1
    assert value(registry, "sagemaker_invocation_model_errors_total") == 1
    assert value(registry, "sagemaker_invocation_5xx_errors_total") == 0
    assert value(registry, "sagemaker_proxy_upstream_errors_total", reason="connect_failed") == 1
    assert value(registry, "sagemaker_model_latency_seconds_sum") == pytest.approx(0.003)


def test_oversized_body_is_refused_before_the_model() -> None:
    clock = FakeClock()
    upstream = FakeUpstream(clock, FakeResponse(clock, 200, [b"x"], streamed=False, chunk_ns=0), head_ns=MS)
    app, registry = make_app(clock, upstream)
    sent = call(app, clock, body=b"x" * 101)
    assert sent[0]["status"] == 413
    assert upstream.calls == []
    assert value(registry, "sagemaker_proxy_rejected_requests_total", reason="payload_too_large") == 1
    assert value(registry, "sagemaker_invocations_total") == 0


def test_non_invocation_paths_are_forwarded_but_not_counted() -> None:
    clock = FakeClock()
    upstream = FakeUpstream(clock, FakeResponse(clock, 200, [b"x"], streamed=False, chunk_ns=0), head_ns=MS)
    app, registry = make_app(clock, upstream)
    assert call(app, clock, path="/ping")[0]["status"] == 200
    assert len(upstream.calls) == 1
    assert value(registry, "sagemaker_invocations_total") == 0


def test_metrics_recording_can_be_switched_off_for_benchmarks() -> None:
    clock = FakeClock()
    upstream = FakeUpstream(clock, FakeResponse(clock, 200, [b"x"], streamed=False, chunk_ns=0), head_ns=MS)
    app, registry = make_app(clock, upstream, record=False)
    assert call(app, clock)[0]["status"] == 200
    assert value(registry, "sagemaker_invocations_total") == 0


def test_forwarded_request_headers() -> None:
    clock = FakeClock()
    upstream = FakeUpstream(clock, FakeResponse(clock, 200, [b"x"], streamed=False, chunk_ns=0), head_ns=MS)
    app, _ = make_app(clock, upstream)
    call(app, clock, headers=[
        (b"host", b"public"), (b"connection", b"x-drop"), (b"x-drop", b"1"), (b"transfer-encoding", b"chunked"),
        (b"x-keep", b"2"), (b"te", b"trailers"),
    ])
    _, _, headers, body = upstream.calls[0]
    *forwarded, (mark, value) = headers
    assert forwarded == [
        (b"host", b"model:8080"), (b"x-keep", b"2"), (b"x-forwarded-for", b"10.0.0.9"),
        (b"x-forwarded-proto", b"http"), (b"x-forwarded-host", b"public"),
    ]
    assert mark == b"x-sagemaker-metrics-proxy-hop" and len(value) == 16  # this proxy's own mark: a loop is seen
    assert body == b"{}"


class HangingUpstream(FakeUpstream):
    """A model that never answers, so only a disconnect or the timeout can end the call."""

    async def request(self, method: bytes, target: bytes, headers: Headers, body: bytes) -> FakeResponse:
        self.calls.append((method, target, headers, body))
        await asyncio.Event().wait()
        raise AssertionError


def test_client_disconnect_seen_through_receive_cancels_the_model_call() -> None:
    """Servers other than ours only say so through receive(): the request path must still notice."""
    clock = FakeClock()
    upstream = HangingUpstream(clock, UpstreamError(Fault.UPSTREAM_RESET), head_ns=0)
    app, registry = make_app(clock, upstream)
    received: list[Message] = [{"type": "http.request", "body": b"{}", "more_body": False}]
    sent: list[Message] = []

    async def receive() -> Message:
        if received:
            return received.pop(0)
        await asyncio.sleep(0.01)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/invocations", "raw_path": b"/invocations", "query_string": b"", "headers": []}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 5))
    assert sent == []
    assert len(upstream.calls) == 1
    assert value(registry, "sagemaker_invocations_total") == 1
    assert value(registry, "sagemaker_proxy_client_disconnects_total") == 1
    assert value(registry, "sagemaker_invocation_model_errors_total") == 0
    assert value(registry, "sagemaker_concurrent_requests_per_model") == 0


def test_timeout_before_the_head_is_a_504() -> None:
    clock = FakeClock()
    upstream = HangingUpstream(clock, UpstreamError(Fault.UPSTREAM_RESET), head_ns=0)
    app, registry = make_app(clock, upstream, timeout=0.05)
    sent = call(app, clock)
    assert sent[0]["status"] == 504
    assert value(registry, "sagemaker_proxy_upstream_errors_total", reason="timeout") == 1
    assert value(registry, "sagemaker_invocation_model_errors_total") == 1


def two_variants(clock: FakeClock, weights: tuple[float, float], rng: Callable[[], float]) -> tuple[ProxyApp, dict[str, FakeUpstream], CollectorRegistry]:
    registry = CollectorRegistry()
    metrics = InvocationMetrics(registry)
    upstreams = {}
    variants = []
    for name, weight in zip(("blue", "green"), weights, strict=True):
        upstreams[name] = FakeUpstream(clock, FakeResponse(clock, 200, [b"x"], streamed=False, chunk_ns=0), head_ns=MS)
        recorder = InvocationRecorder(
            metrics, endpoint_name="ep", variant_name=name, reject_reasons=REJECT_REASONS, upstream_error_reasons=UPSTREAM_ERROR_REASONS
        )
        variants.append(Variant(name, upstreams[name], recorder, StaticInstanceCount(1), weight))  # type: ignore[arg-type]
    app = ProxyApp(variants=variants, invocation_routes=frozenset({("POST", "/invocations")}), max_payload_bytes=100,
                   invocation_timeout=60, clock=clock, random=rng)
    return app, upstreams, registry


def test_weights_split_the_traffic_and_the_target_header_overrides() -> None:
    import random

    clock = FakeClock()
    app, upstreams, registry = two_variants(clock, (3, 1), random.Random(7).random)
    for _ in range(4000):
        sent = call(app, clock)
        assert sent[0]["status"] == 200
    blue, green = len(upstreams["blue"].calls), len(upstreams["green"].calls)
    assert blue + green == 4000
    assert abs(blue / 4000 - 0.75) < 0.03, blue  # 0.75 within about four standard deviations
    for _ in range(10):
        sent = call(app, clock, headers=[(b"x-amzn-sagemaker-target-variant", b"green")])
        assert dict(sent[0]["headers"])[b"x-amzn-invoked-production-variant"] == b"green"
    assert len(upstreams["green"].calls) == green + 10
    # The target header is for the proxy, not the model.
    assert all(name != b"x-amzn-sagemaker-target-variant" for name, _ in upstreams["green"].calls[-1][2])
    labels = {"endpoint_name": "ep"}
    assert registry.get_sample_value("sagemaker_invocations_total", {**labels, "variant_name": "blue"}) == blue
    assert registry.get_sample_value("sagemaker_invocations_total", {**labels, "variant_name": "green"}) == green + 10


def test_an_unknown_target_variant_is_a_400() -> None:
    import random

    clock = FakeClock()
    app, upstreams, registry = two_variants(clock, (1, 1), random.Random(1).random)
    sent = call(app, clock, headers=[(b"x-amzn-sagemaker-target-variant", b"red\"")])
    assert sent[0]["status"] == 400
    assert json.loads(sent[1]["body"]) == {"error": "no production variant 'red\"'; this endpoint has blue, green"}
    assert not upstreams["blue"].calls and not upstreams["green"].calls
    assert registry.get_sample_value("sagemaker_proxy_rejected_requests_total", {"endpoint_name": "ep", "variant_name": "blue", "reason": "unknown_variant"}) == 1
