"""CloudWatch publishing: statistic sets per period, against moto's CloudWatch server on loopback."""

from __future__ import annotations

import http.client
import http.server
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from metrics.cloudwatch import CloudWatchTarget, batches, classify, datums
from metrics.statistics import Period, PeriodStatistics, StatisticSet
from tests.conftest import ROOT, Proxy, Running, free_port, start_moto

IRIS = {"instances": [[5.1, 3.5, 1.4, 0.2]]}


# -- unit: statistic sets and PutMetricData shaping ------------------------------------------------


def test_period_statistics_roll_over_on_the_wall_clock() -> None:
    now = [1000.5]
    stats = PeriodStatistics(60, wallclock=lambda: now[0])
    for value in (3, 1, 2):
        stats.add(stats.current(), "ModelLatency", value)
    assert stats.take_closed() == []
    now[0] = 1020.0  # the period started at 960 runs until 1020
    stats.add(stats.current(), "ModelLatency", 10)
    closed = stats.take_closed()
    assert [p.start for p in closed] == [960]
    assert closed[0].sets["ModelLatency"] == StatisticSet(count=3, total=6, minimum=1, maximum=3)
    rest = stats.take_all()
    assert [p.start for p in rest] == [1020]
    assert rest[0].sets["ModelLatency"] == StatisticSet(count=1, total=10, minimum=10, maximum=10)
    assert stats.take_all() == []


def test_datums_are_statistic_sets_with_units_and_no_nan() -> None:
    target = CloudWatchTarget("NS", (("EndpointName", "ep"), ("VariantName", "v")), storage_resolution=1)
    period = Period(1200, {"ModelLatency": StatisticSet(2, 30.0, 10.0, 20.0), "Broken": StatisticSet(1, float("nan"), 1, 1)})
    [datum] = datums(period, target, {"ModelLatency": "Microseconds"})
    assert datum == {
        "MetricName": "ModelLatency",
        "Dimensions": [{"Name": "EndpointName", "Value": "ep"}, {"Name": "VariantName", "Value": "v"}],
        "Timestamp": 1200,
        "StatisticValues": {"SampleCount": 2.0, "Sum": 30.0, "Minimum": 10.0, "Maximum": 20.0},
        "Unit": "Microseconds",
        "StorageResolution": 1,
    }


def test_batches_respect_the_put_metric_data_limits() -> None:
    items = [{"MetricName": str(i)} for i in range(2500)]
    sizes = [len(b) for b in batches(items)]
    assert sum(sizes) == 2500
    assert max(sizes) <= 1000
    assert max(sizes) * 600 <= 1_000_000


def test_errors_are_classified() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutMetricData")

    assert classify(client_error("Throttling", 400))[0] == "throttled"
    assert classify(client_error("InternalFailure", 500))[0] == "server_error"
    assert classify(client_error("AccessDenied", 403))[0] == "credentials"
    assert classify(client_error("InvalidParameterValue", 400))[0] == "rejected"
    assert classify(NoCredentialsError())[0] == "credentials"
    assert classify(EndpointConnectionError(endpoint_url="http://x"))[0] == "network"


# -- end to end: the real proxy, moto's server, boto3 reading back ---------------------------------





def statistics(endpoint_url: str, namespace: str, metric: str, variant: str = "AllTraffic") -> dict[str, float]:
    """SampleCount, Sum, Minimum and Maximum of one metric over the last minutes, as CloudWatch aggregates them."""
    client = boto3.client("cloudwatch", endpoint_url=endpoint_url, region_name="us-east-1")
    now = datetime.now(UTC)
    response = client.get_metric_statistics(
        Namespace=namespace,
        MetricName=metric,
        Dimensions=[{"Name": "EndpointName", "Value": "test-endpoint"}, {"Name": "VariantName", "Value": variant}],
        StartTime=now - timedelta(minutes=10),
        EndTime=now + timedelta(minutes=5),
        Period=3600,
        Statistics=["SampleCount", "Sum", "Minimum", "Maximum"],
    )
    points = response["Datapoints"]
    if not points:
        return {}
    assert len(points) == 1, points
    return {k: points[0][k] for k in ("SampleCount", "Sum", "Minimum", "Maximum")} | {"Unit": points[0].get("Unit")}


def wait_for_statistics(endpoint_url: str, namespace: str, metric: str, count: int, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline:
        seen = statistics(endpoint_url, namespace, metric)
        if seen.get("SampleCount") == count:
            return seen
        time.sleep(0.25)
    raise AssertionError(f"{metric}: expected SampleCount {count}, CloudWatch has {seen}")


def cloudwatch_flags(endpoint_url: str, namespace: str, period: str = "1") -> list[str]:
    return ["--cloudwatch", "--cloudwatch-endpoint-url", endpoint_url, "--cloudwatch-namespace", namespace, "--cloudwatch-period", period]


def send_mix(proxy: Proxy) -> None:
    """6 good invocations taking at least 20 ms, 2 of the model's 404s, 1 of its 500s."""
    for _ in range(6):
        assert httpx.post(f"{proxy.url}/invocations", json=IRIS, headers={"X-Test-Delay-Ms": "20"}).status_code == 200
    for _ in range(2):
        assert httpx.post(f"{proxy.url}/invocations", json=IRIS, headers={"X-Test-Status": "404"}).status_code == 404
    assert httpx.post(f"{proxy.url}/invocations", json=IRIS, headers={"X-Test-Status": "500"}).status_code == 500


@pytest.mark.e2e
def test_statistic_sets_arrive_in_cloudwatch(model: Running, moto: Running, aws_env: None, start_proxy: Callable[..., Proxy]) -> None:
    namespace = f"Test{uuid.uuid4().hex[:8]}"
    proxy = start_proxy(model.url, *cloudwatch_flags(moto.url, namespace))
    send_mix(proxy)
    invocations = wait_for_statistics(moto.url, namespace, "Invocations", 9)
    assert invocations["Sum"] == 9 and invocations["Minimum"] == 1 and invocations["Maximum"] == 1
    errors_4xx = statistics(moto.url, namespace, "Invocation4XXErrors")
    assert (errors_4xx["SampleCount"], errors_4xx["Sum"], errors_4xx["Maximum"]) == (9, 2, 1)
    assert statistics(moto.url, namespace, "Invocation5XXErrors")["Sum"] == 1
    assert statistics(moto.url, namespace, "InvocationModelErrors")["Sum"] == 3
    assert statistics(moto.url, namespace, "InvocationsPerInstance")["Sum"] == 9
    latency = statistics(moto.url, namespace, "ModelLatency")
    assert latency["SampleCount"] == 9
    assert latency["Unit"] == "Microseconds"
    assert 20_000 <= latency["Maximum"] < 1_000_000
    # The same figures as the Prometheus histogram, which sees the same invocations.
    assert latency["Sum"] == pytest.approx(proxy.value("sagemaker_model_latency_seconds_sum") * 1e6)
    overhead = statistics(moto.url, namespace, "OverheadLatency")
    assert overhead["SampleCount"] == 9 and 0 < overhead["Minimum"] <= overhead["Maximum"] < 100_000
    concurrency = statistics(moto.url, namespace, "ConcurrentRequestsPerModel")
    assert concurrency["Minimum"] == 1 and concurrency["Maximum"] == 1  # one request at a time
    assert proxy.value("sagemaker_proxy_cloudwatch_last_success_timestamp_seconds") > time.time() - 60


@pytest.mark.e2e
def test_cloudwatch_down_at_start_then_up_loses_nothing(model: Running, aws_env: None, tmp_path: Path,
                                                        start_proxy: Callable[..., Proxy]) -> None:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    namespace = f"Test{uuid.uuid4().hex[:8]}"
    proxy = start_proxy(model.url, *cloudwatch_flags(endpoint, namespace))
    send_mix(proxy)
    time.sleep(2.5)  # at least one period ends and its publish fails
    assert proxy.value("sagemaker_proxy_cloudwatch_publish_failures_total", reason="network") >= 1
    assert proxy.value("sagemaker_proxy_cloudwatch_buffered_periods") >= 1
    send_mix(proxy)
    moto = start_moto(port, tmp_path / "moto.log")
    try:
        invocations = wait_for_statistics(endpoint, namespace, "Invocations", 18, timeout=40)
        assert invocations["Sum"] == 18
        assert proxy.value("sagemaker_proxy_cloudwatch_dropped_datapoints_total") == 0
    finally:
        moto.stop()


class ThrottlingFront(http.server.ThreadingHTTPServer):
    """Answers the first ``throttle`` PutMetricData calls with CloudWatch's Throttling error, then forwards to moto."""

    def __init__(self, port: int, upstream_port: int, throttle: int) -> None:
        self.upstream_port = upstream_port
        self.throttle = throttle
        self.throttled = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _ThrottlingHandler)


class _ThrottlingHandler(http.server.BaseHTTPRequestHandler):
    server: ThrottlingFront

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        with self.server.lock:
            # botocore speaks JSON to CloudWatch (the operation in X-Amz-Target), or the query protocol (in the body).
            put = self.headers.get("x-amz-target", "").endswith(".PutMetricData") or b"Action=PutMetricData" in body
            throttle = put and self.server.throttled < self.server.throttle
            if throttle:
                self.server.throttled += 1
        if throttle:
            self.send_response(400)
            if self.headers.get("x-amz-target"):
                error = b'{"__type": "Throttling", "message": "Rate exceeded"}'
                self.send_header("content-type", "application/x-amz-json-1.0")
                self.send_header("x-amzn-query-error", "Throttling;Sender")
            else:
                error = (
                    b'<ErrorResponse xmlns="http://monitoring.amazonaws.com/doc/2010-08-01/"><Error><Type>Sender</Type>'
                    b"<Code>Throttling</Code><Message>Rate exceeded</Message></Error><RequestId>1</RequestId></ErrorResponse>"
                )
                self.send_header("content-type", "text/xml")
            self.send_header("content-length", str(len(error)))
            self.end_headers()
            self.wfile.write(error)
            return
        conn = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=10)
        conn.request("POST", self.path, body, {k: v for k, v in self.headers.items() if k.lower() != "host"})
        response = conn.getresponse()
        data = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                self.send_header(key, value)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        conn.close()


@pytest.mark.e2e
def test_throttling_is_retried(model: Running, moto: Running, aws_env: None, start_proxy: Callable[..., Proxy]) -> None:
    front = ThrottlingFront(free_port(), moto.port, throttle=3)
    threading.Thread(target=front.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{front.server_address[1]}"
        namespace = f"Test{uuid.uuid4().hex[:8]}"
        proxy = start_proxy(model.url, *cloudwatch_flags(endpoint, namespace))
        send_mix(proxy)
        invocations = wait_for_statistics(moto.url, namespace, "Invocations", 9, timeout=40)
        assert invocations["Sum"] == 9
        assert front.throttled == 3
        assert proxy.value("sagemaker_proxy_cloudwatch_publish_failures_total", reason="throttled") == 3
    finally:
        front.shutdown()
        front.server_close()


@pytest.mark.e2e
def test_shutdown_flushes_the_partial_period(model: Running, moto: Running, aws_env: None, start_proxy: Callable[..., Proxy]) -> None:
    namespace = f"Test{uuid.uuid4().hex[:8]}"
    # A 60 s period: nothing would be published before it ends, unless the shutdown flushes it.
    proxy = start_proxy(model.url, *cloudwatch_flags(moto.url, namespace, period="60"))
    send_mix(proxy)
    assert statistics(moto.url, namespace, "Invocations") == {}
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(20) == 0
    invocations = statistics(moto.url, namespace, "Invocations")
    assert (invocations["SampleCount"], invocations["Sum"]) == (9, 9)


def test_an_aws_namespace_is_refused_at_start() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--upstream", "http://127.0.0.1:1", "--endpoint-name", "e",
         "--cloudwatch", "--cloudwatch-namespace", "AWS/SageMaker", "--port", str(free_port()), "--metrics-port", str(free_port())],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("sagemaker-metrics-proxy: error: --cloudwatch-namespace: CloudWatch reserves namespaces starting with 'AWS/'")


# -- the publisher's failure handling, with a fake client that implements put_metric_data ----------


class RefusingClient:
    """A CloudWatch client whose every PutMetricData fails with ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.calls = 0

    def put_metric_data(self, **kwargs: Any) -> None:
        self.calls += 1
        raise self.error


def make_publisher(client: Any, buffer_periods: int, now: list[float]) -> tuple[Any, Any, Any]:
    from prometheus_client import CollectorRegistry

    from metrics.cloudwatch import CloudWatchPublisher, PublisherHealth

    registry = CollectorRegistry()
    stats = PeriodStatistics(60, wallclock=lambda: now[0])
    target = CloudWatchTarget("NS", (("EndpointName", "e"), ("VariantName", "v")), storage_resolution=60)
    health = PublisherHealth(registry, endpoint_name="e", variant_name="v")
    publisher = CloudWatchPublisher(
        stats, target, health, buffer_periods=buffer_periods, client_factory=lambda: client, backoff_s=(0.001, 0.002),
        wallclock=lambda: now[0],
    )
    return publisher, stats, registry


def test_a_full_buffer_drops_the_oldest_periods_and_counts_them() -> None:
    import asyncio

    from botocore.exceptions import EndpointConnectionError

    now = [6000.0]
    publisher, stats, registry = make_publisher(RefusingClient(EndpointConnectionError(endpoint_url="http://x")), 2, now)
    for _ in range(4):  # four periods of two metrics each, while CloudWatch is unreachable
        sets = stats.current()
        stats.add(sets, "Invocations", 1)
        stats.add(sets, "ModelLatency", 100)
        now[0] += 60
    assert asyncio.run(publisher.flush(0.05)) is False
    labels = {"endpoint_name": "e", "variant_name": "v"}
    assert registry.get_sample_value("sagemaker_proxy_cloudwatch_dropped_datapoints_total", labels) == 4
    assert registry.get_sample_value("sagemaker_proxy_cloudwatch_buffered_periods", labels) == 2
    assert registry.get_sample_value("sagemaker_proxy_cloudwatch_publish_failures_total", {**labels, "reason": "network"}) >= 1


def test_a_credential_error_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    from botocore.exceptions import ClientError

    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "PutMetricData")
    client = RefusingClient(denied)
    now = [6000.0]
    publisher, stats, registry = make_publisher(client, 10, now)
    stats.add(stats.current(), "Invocations", 1)
    with caplog.at_level("WARNING", logger="proxy.cloudwatch"):
        assert asyncio.run(publisher.flush(0.1)) is False
    assert client.calls > 1
    refused = [r for r in caplog.records if "refused our credentials" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelname == "ERROR"
    labels = {"endpoint_name": "e", "variant_name": "v", "reason": "credentials"}
    assert registry.get_sample_value("sagemaker_proxy_cloudwatch_publish_failures_total", labels) == client.calls


@pytest.mark.e2e
def test_concurrency_with_workers_is_the_count_across_workers(
    model: Running, moto: Running, aws_env: None, start_proxy: Callable[..., Proxy]
) -> None:
    """20 invocations held at once by a slow model, spread over 2 workers: ConcurrentRequestsPerModel's Maximum
    in CloudWatch is 20 (each worker's sample counts every worker's requests in flight), not each worker's share."""
    namespace = f"Test{uuid.uuid4().hex[:8]}"
    proxy = start_proxy(model.url, *cloudwatch_flags(moto.url, namespace), "--workers", "2")

    def call() -> int:
        return httpx.post(f"{proxy.url}/invocations", json=IRIS, headers={"X-Test-Delay-Ms": "1500"}, timeout=10).status_code

    with ThreadPoolExecutor(20) as pool:
        assert list(pool.map(lambda _: call(), range(20))) == [200] * 20
    concurrency = wait_for_statistics(moto.url, namespace, "ConcurrentRequestsPerModel", 20)
    assert 19 <= concurrency["Maximum"] <= 20, concurrency
    assert concurrency["Minimum"] >= 1, concurrency
    assert wait_for_statistics(moto.url, namespace, "Invocations", 20)["Sum"] == 20


@pytest.mark.e2e
def test_stream_metrics_arrive_in_cloudwatch(model: Running, moto: Running, aws_env: None, start_proxy: Callable[..., Proxy]) -> None:
    """Two streams (the model waits 100 ms, then 3 events) and one sized answer: the first-chunk statistic sets
    hold the two streams, in Microseconds, and MidStreamErrors counts none of the three."""
    namespace = f"Test{uuid.uuid4().hex[:8]}"
    proxy = start_proxy(model.url, *cloudwatch_flags(moto.url, namespace))
    for _ in range(2):
        r = httpx.post(f"{proxy.url}/invocations", json=IRIS, headers={"X-Test-Delay-Ms": "100", "X-Test-Stream-Chunks": "3"})
        assert r.status_code == 200 and r.content.count(b"data:") == 3
    assert httpx.post(f"{proxy.url}/invocations", json=IRIS).status_code == 200
    assert wait_for_statistics(moto.url, namespace, "Invocations", 3)["Sum"] == 3
    model_first = wait_for_statistics(moto.url, namespace, "FirstChunkModelLatency", 2)
    # The model sleeps 100 ms on libuv's millisecond timer, which may wake a little early.
    assert model_first["Unit"] == "Microseconds" and 98_000 <= model_first["Minimum"] <= model_first["Maximum"] < 200_000
    first = statistics(moto.url, namespace, "FirstChunkLatency")
    overhead = statistics(moto.url, namespace, "FirstChunkOverheadLatency")
    assert first["SampleCount"] == overhead["SampleCount"] == 2
    assert first["Sum"] == pytest.approx(model_first["Sum"] + overhead["Sum"], abs=4)
    assert first["Sum"] == pytest.approx(proxy.value("sagemaker_first_chunk_latency_seconds_sum") * 1e6, abs=4)
    mid_stream = statistics(moto.url, namespace, "MidStreamErrors")
    assert (mid_stream["SampleCount"], mid_stream["Sum"], mid_stream["Unit"]) == (3, 0, "Count")


@pytest.mark.e2e
def test_concurrency_alone_on_a_high_resolution_period(model: Running, moto: Running, aws_env: None, start_proxy: Callable[..., Proxy]) -> None:
    """--cloudwatch-concurrency-period 1 beside a 60 s period: ConcurrentRequestsPerModel arrives within seconds,
    as SageMaker's high-resolution one does for fast autoscaling; the rest waits for its minute (here, the stop)."""
    namespace = f"Test{uuid.uuid4().hex[:8]}"
    proxy = start_proxy(model.url, *cloudwatch_flags(moto.url, namespace, period="60"), "--cloudwatch-concurrency-period", "1", "--instance-count", "4")
    minute = time.time() // 60
    for _ in range(3):
        assert httpx.post(f"{proxy.url}/invocations", json=IRIS).status_code == 200
    concurrency = wait_for_statistics(moto.url, namespace, "ConcurrentRequestsPerModel", 3, timeout=10)
    assert concurrency["Maximum"] == 1  # per model, not divided by the 4 instances (that is per copy, for components)
    invocations = statistics(moto.url, namespace, "Invocations")
    if time.time() // 60 == minute:  # else the 60 s period ended meanwhile, and went out as it should
        assert invocations == {}  # its 60 s period has not ended
    proxy.stop()  # the last partial periods are flushed at the stop
    assert wait_for_statistics(moto.url, namespace, "Invocations", 3)["Sum"] == 3
    assert statistics(moto.url, namespace, "ConcurrentRequestsPerModel")["SampleCount"] == 3  # in one stream only


@pytest.mark.e2e
def test_token_metrics_arrive_in_cloudwatch_only_when_switched_on(model: Running, moto: Running, aws_env: None, start_proxy: Callable[..., Proxy]) -> None:
    """Two chat streams of 5 tokens (the first token 100 ms after the role chunk) and one of 2 words' prompt: with
    --cloudwatch-token-metrics, InputTokens and OutputTokens are per-request statistic sets in Count, time to first
    token and per token in Microseconds; without it, none of them is published."""
    chat = {"messages": [{"role": "user", "content": "a b c"}], "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    on, off = f"Test{uuid.uuid4().hex[:8]}", f"Test{uuid.uuid4().hex[:8]}"
    with_tokens = start_proxy(model.url, "--model-server", "openai", "--cloudwatch-token-metrics", *cloudwatch_flags(moto.url, on))
    without = start_proxy(model.url, "--model-server", "openai", *cloudwatch_flags(moto.url, off))
    for proxy in (with_tokens, without):
        for _ in range(2):
            r = httpx.post(f"{proxy.url}/v1/chat/completions", json=chat, headers={"X-Test-First-Token-Ms": "100", "X-Test-Stream-Interval-Ms": "5"})
            assert r.status_code == 200
        assert httpx.post(f"{proxy.url}/v1/completions", json={"prompt": "one two", "max_tokens": 1}).status_code == 200
    output = wait_for_statistics(moto.url, on, "OutputTokens", 3)
    assert (output["Sum"], output["Minimum"], output["Maximum"], output["Unit"]) == (11, 1, 5, "Count")
    inputs = statistics(moto.url, on, "InputTokens")
    assert (inputs["SampleCount"], inputs["Sum"], inputs["Unit"]) == (3, 8, "Count")
    first = statistics(moto.url, on, "TimeToFirstToken")
    assert first["SampleCount"] == 2 and first["Unit"] == "Microseconds" and 98_000 <= first["Minimum"] <= first["Maximum"] < 1_000_000
    per_token = statistics(moto.url, on, "TimePerOutputToken")
    assert per_token["SampleCount"] == 2 and per_token["Unit"] == "Microseconds" and 3_000 <= per_token["Minimum"]
    assert wait_for_statistics(moto.url, off, "Invocations", 3)["Sum"] == 3
    assert all(statistics(moto.url, off, m) == {} for m in ("InputTokens", "OutputTokens", "TimeToFirstToken", "TimePerOutputToken"))
