"""End to end: the real proxy process in front of real model processes, counted by scraping /metrics."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import Proxy, Running, free_port

pytestmark = pytest.mark.e2e

IRIS = {"instances": [[5.1, 3.5, 1.4, 0.2]]}


def invoke(proxy: Proxy, headers: dict[str, str] | None = None, timeout: float = 10.0, **kwargs: object) -> httpx.Response:
    return httpx.post(f"{proxy.url}/invocations", json=IRIS, headers=headers or {}, timeout=timeout, **kwargs)  # type: ignore[arg-type]


def wait_in_flight(proxy: Proxy, n: int, timeout: float = 5.0) -> None:
    """Until n invocations are at the model (ConcurrentRequestsPerModel), or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while proxy.value("sagemaker_concurrent_requests_per_model") < n:
        assert time.monotonic() < deadline, f"{n} invocations never in flight"
        time.sleep(0.01)


def test_known_mix_is_counted_exactly(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(model.url, "--instance-count", "4", "--invocation-timeout", "0.3")
    ok = [invoke(proxy) for _ in range(7)]
    client_errors = [invoke(proxy, {"X-Test-Status": "404"}) for _ in range(3)]
    server_errors = [invoke(proxy, {"X-Test-Status": "500"}) for _ in range(2)]
    timeouts = [invoke(proxy, {"X-Test-Delay-Ms": "1000"}) for _ in range(2)]
    # Not invocations: the health check, other paths, GET on the invocation path.
    for _ in range(5):
        assert httpx.get(f"{proxy.url}/ping").status_code == 200
    assert httpx.get(f"{proxy.url}/not-a-route").status_code == 404
    assert httpx.get(f"{proxy.url}/invocations").status_code == 405

    assert [r.status_code for r in ok] == [200] * 7
    assert ok[0].json()["predictions"][0]["label"] == "setosa"
    assert [r.status_code for r in client_errors] == [404] * 3
    assert [r.status_code for r in server_errors] == [500] * 2
    assert [r.status_code for r in timeouts] == [504] * 2
    n = 7 + 3 + 2 + 2
    assert proxy.value("sagemaker_invocations_total") == n
    assert proxy.value("sagemaker_invocation_4xx_errors_total") == 3
    assert proxy.value("sagemaker_invocation_5xx_errors_total") == 2
    assert proxy.value("sagemaker_invocation_model_errors_total") == 3 + 2 + 2
    assert proxy.value("sagemaker_proxy_upstream_errors_total", reason="timeout") == 2
    assert proxy.value("sagemaker_invocations_per_instance_total") == pytest.approx(n / 4)
    assert proxy.value("sagemaker_model_latency_seconds_count") == n
    assert proxy.value("sagemaker_overhead_latency_seconds_count") == n
    assert proxy.value("sagemaker_request_size_bytes_count") == n
    assert proxy.value("sagemaker_concurrent_requests_per_model") == 0
    assert proxy.value("sagemaker_live_instances") == 4


def test_refused_connection_is_a_502_and_a_model_error(start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    responses = [invoke(proxy) for _ in range(3)]
    assert [r.status_code for r in responses] == [502] * 3
    assert "could not connect" in responses[0].json()["error"]
    assert proxy.value("sagemaker_invocations_total") == 3
    assert proxy.value("sagemaker_invocation_model_errors_total") == 3
    assert proxy.value("sagemaker_invocation_5xx_errors_total") == 0
    assert proxy.value("sagemaker_proxy_upstream_errors_total", reason="connect_failed") == 3
    ready = httpx.get(f"{proxy.metrics_url}/readyz")
    assert ready.status_code == 503
    assert httpx.get(f"{proxy.metrics_url}/healthz").status_code == 200


@pytest.mark.parametrize(
    ("fault", "reason"),
    [("reset", "connection_reset"), ("malformed", "malformed_response")],
)
def test_reset_and_malformed_responses_are_502(faulty_model: Running, start_proxy: Callable[..., Proxy], fault: str, reason: str) -> None:
    proxy = start_proxy(faulty_model.url)
    responses = [invoke(proxy, {"X-Fault": fault}) for _ in range(3)]
    assert [r.status_code for r in responses] == [502] * 3
    # The proxy stays healthy and the next good call works on a fresh connection.
    assert invoke(proxy).status_code == 200
    assert proxy.value("sagemaker_invocations_total") == 4
    assert proxy.value("sagemaker_invocation_model_errors_total") == 3
    assert proxy.value("sagemaker_proxy_upstream_errors_total", reason=reason) == 3


def test_truncated_body_after_the_head_aborts_the_client_and_counts_once(faulty_model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(faulty_model.url)
    with pytest.raises(httpx.RemoteProtocolError):
        invoke(proxy, {"X-Fault": "truncate"})
    assert proxy.value("sagemaker_invocations_total") == 1
    assert proxy.value("sagemaker_invocation_model_errors_total") == 1
    assert proxy.value("sagemaker_proxy_upstream_errors_total", reason="connection_reset") == 1


def test_ping_readyz_and_metrics_negotiation(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(model.url)
    assert httpx.get(f"{proxy.metrics_url}/readyz").json() == {"status": "ready"}
    text = httpx.get(f"{proxy.metrics_url}/metrics")
    assert text.headers["content-type"].startswith("text/plain")
    om = httpx.get(f"{proxy.metrics_url}/metrics", headers={"Accept": "application/openmetrics-text"})
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.rstrip().endswith("# EOF")
    # The proxy port forwards everything, so /metrics there is the model's business (404), not ours.
    assert httpx.get(f"{proxy.url}/metrics").status_code == 404


def test_forwarded_response_headers(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(model.url, "--variant-name", "Blue")
    r = invoke(proxy)
    timing = dict(part.strip().split(";dur=") for part in r.headers["server-timing"].split(","))
    assert set(timing) == {"model", "overhead"}
    assert float(timing["model"]) > 0 and float(timing["overhead"]) > 0
    assert r.headers["x-amzn-invoked-production-variant"] == "Blue"
    assert "server" not in r.headers  # no proxy banner added
    samples = proxy.samples()
    assert samples[("sagemaker_invocations_total", frozenset({"endpoint_name": "test-endpoint", "variant_name": "Blue"}.items()))] == 1


def test_model_latency_matches_a_known_model_time(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(model.url)
    invoke(proxy)  # warm the upstream connection (and the model's first call, which can be slow on a busy machine)
    model_before = proxy.value("sagemaker_model_latency_seconds_sum")
    overhead_before = proxy.value("sagemaker_overhead_latency_seconds_sum")
    delay_ms = 50
    n = 20
    for _ in range(n):
        assert invoke(proxy, {"X-Test-Delay-Ms": str(delay_ms)}).status_code == 200
    count = proxy.value("sagemaker_model_latency_seconds_count") - 1
    model_mean_us = (proxy.value("sagemaker_model_latency_seconds_sum") - model_before) * 1e6 / n
    overhead_mean_us = (proxy.value("sagemaker_overhead_latency_seconds_sum") - overhead_before) * 1e6 / n
    assert count == n
    # The model sleeps 50 ms (libuv's millisecond timer may wake up to 1 ms early), then parses and predicts.
    assert delay_ms * 1000 - 1000 <= model_mean_us < delay_ms * 1000 + 4000, model_mean_us
    assert 0 < overhead_mean_us < 2000, overhead_mean_us


def test_slow_upload_costs_overhead_not_model_time(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(model.url)
    body = json.dumps(IRIS).encode()
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(
            b"POST /invocations HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
        )
        pieces = [body[i : i + 4] for i in range(0, len(body), 4)]
        for piece in pieces:  # the body trickles in, 50 ms a piece
            time.sleep(0.05)
            sock.sendall(piece)
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200")
    model_us = proxy.value("sagemaker_model_latency_seconds_sum") * 1e6
    overhead_us = proxy.value("sagemaker_overhead_latency_seconds_sum") * 1e6
    assert overhead_us > len(pieces) * 50_000 * 0.9, overhead_us
    assert model_us < 50_000, model_us


def test_streamed_response_arrives_chunk_by_chunk(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(model.url)
    headers = {"X-Test-Stream-Chunks": "5", "X-Test-Stream-Interval-Ms": "200"}
    arrivals: list[tuple[float, bytes]] = []
    start = time.monotonic()
    with httpx.stream("POST", f"{proxy.url}/invocations", json=IRIS, headers=headers, timeout=10) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for chunk in r.iter_raw():
            arrivals.append((time.monotonic() - start, chunk))
    events = b"".join(c for _, c in arrivals).split(b"\n\n")
    assert [e for e in events if e] == [b"data: %d" % i for i in range(5)]
    # The first event reaches the client long before the model finishes (~0.8 s).
    assert arrivals[0][0] < 0.4
    assert arrivals[-1][0] > 0.7
    assert proxy.value("sagemaker_first_chunk_model_latency_seconds_count") == 1
    assert proxy.value("sagemaker_first_chunk_model_latency_seconds_sum") < 0.3
    # Model time covers the whole stream; overhead stays small.
    assert proxy.value("sagemaker_model_latency_seconds_sum") > 0.75
    assert proxy.value("sagemaker_overhead_latency_seconds_sum") < 0.05


def test_payload_over_the_limit_is_refused_and_never_reaches_the_model(faulty_model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(faulty_model.url, "--max-payload-bytes", "1000")
    before = httpx.get(f"{faulty_model.url}/stats").json()["requests"]
    r = httpx.post(f"{proxy.url}/invocations", content=b"x" * 1001)
    assert r.status_code == 413
    # A chunked upload has no Content-Length: refused once the running total passes the limit.
    r2 = httpx.post(f"{proxy.url}/invocations", content=iter([b"x" * 600, b"x" * 600]))
    assert r2.status_code == 413
    assert httpx.post(f"{proxy.url}/invocations", content=b"x" * 1000).status_code == 200
    assert httpx.get(f"{faulty_model.url}/stats").json()["requests"] == before + 1
    assert proxy.value("sagemaker_proxy_rejected_requests_total", reason="payload_too_large") == 2
    assert proxy.value("sagemaker_invocations_total") == 1


def raw_exchange(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_connect_is_refused_and_absolute_targets_never_leave_the_configured_model(
    faulty_model: Running, start_proxy: Callable[..., Proxy]
) -> None:
    proxy = start_proxy(faulty_model.url)
    # A listener standing in for "another host": it must never be contacted.
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        other.settimeout(0.5)
        other_port = other.getsockname()[1]
        reply = raw_exchange(proxy.port, b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nhost: 127.0.0.1:%d\r\n\r\n" % (other_port, other_port))
        assert reply.split(b"\r\n")[0] == b"HTTP/1.1 405 Method Not Allowed"
        before = httpx.get(f"{faulty_model.url}/stats").json()["requests"]
        reply = raw_exchange(
            proxy.port,
            b"POST http://127.0.0.1:%d/invocations HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-length: 2\r\n\r\n{}" % (other_port, other_port),
        )
        assert reply.startswith(b"HTTP/1.1 200")
        with pytest.raises(TimeoutError):
            other.accept()
    assert httpx.get(f"{faulty_model.url}/stats").json()["requests"] == before + 1
    assert proxy.value("sagemaker_proxy_rejected_requests_total", reason="method_not_allowed") == 1


def test_client_disconnect_cancels_the_model_call(faulty_model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(faulty_model.url)
    before = httpx.get(f"{faulty_model.url}/stats").json()
    with pytest.raises(httpx.ReadTimeout):
        invoke(proxy, {"X-Fault": "hang"}, timeout=0.5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        stats = httpx.get(f"{faulty_model.url}/stats").json()
        if stats["hung_closed_by_peer"] > before["hung_closed_by_peer"]:
            break
        time.sleep(0.05)
    assert stats["hung_closed_by_peer"] == before["hung_closed_by_peer"] + 1
    assert proxy.value("sagemaker_invocations_total") == 1
    assert proxy.value("sagemaker_proxy_client_disconnects_total") == 1
    assert proxy.value("sagemaker_invocation_model_errors_total") == 0
    assert proxy.value("sagemaker_model_latency_seconds_count") == 0
    assert proxy.value("sagemaker_concurrent_requests_per_model") == 0
    # The upstream connection was closed, not reused: the next call gets a clean answer.
    assert invoke(proxy).status_code == 200


def test_client_disconnect_before_forwarding_never_reaches_the_model(faulty_model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(faulty_model.url)
    before = httpx.get(f"{faulty_model.url}/stats").json()["requests"]
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(b"POST /invocations HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"partial\":")
        time.sleep(0.2)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and proxy.value("sagemaker_proxy_rejected_requests_total", reason="client_disconnect") < 1:
        time.sleep(0.05)
    assert proxy.value("sagemaker_proxy_rejected_requests_total", reason="client_disconnect") == 1
    assert proxy.value("sagemaker_invocations_total") == 0
    assert httpx.get(f"{faulty_model.url}/stats").json()["requests"] == before


def test_custom_invocation_routes(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(model.url, "--invocation-route", "POST /predict", "--invocation-route", "POST /invocations")
    assert httpx.post(f"{proxy.url}/predict", json=IRIS).status_code == 404  # the model has no /predict
    assert invoke(proxy).status_code == 200
    assert proxy.value("sagemaker_invocations_total") == 2
    assert proxy.value("sagemaker_invocation_4xx_errors_total") == 1


def test_keep_alive_connections_to_the_model_are_reused(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(model.url)
    with httpx.Client() as client:
        for _ in range(20):
            assert client.post(f"{proxy.url}/invocations", json=IRIS).status_code == 200
    # One client connection in series needs one model connection: count the proxy's sockets to the model.
    conns = [c for c in psutil.Process(proxy.proc.pid).net_connections() if c.raddr and c.raddr.port == model.port]
    assert len(conns) == 1


def test_request_headers_are_forwarded_without_hop_by_hop(faulty_model: Running, start_proxy: Callable[..., Proxy]) -> None:
    """Checks what the model receives, through a server that echoes the raw request head."""
    echo_port = free_port()
    listener = socket.socket()
    listener.bind(("127.0.0.1", echo_port))
    listener.listen()
    proxy = start_proxy(f"http://127.0.0.1:{echo_port}")
    with socket.create_connection(("127.0.0.1", proxy.port)) as client:
        client.sendall(
            b"POST /invocations?x=1 HTTP/1.1\r\nhost: public.example\r\nconnection: keep-alive, x-secret\r\n"
            b"x-secret: drop-me\r\nkeep-alive: timeout=5\r\nx-forwarded-for: 10.0.0.1\r\ncontent-length: 2\r\n\r\n{}"
        )
        while True:  # the proxy's health check at start may come first, on a connection of its own
            upstream, _ = listener.accept()
            with upstream:
                head = b""
                while b"\r\n\r\n" not in head and (data := upstream.recv(65536)):
                    head += data
                if head.startswith(b"GET /ping "):
                    upstream.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    continue
                upstream.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: keep-alive\r\nkeep-alive: timeout=5\r\n\r\nok")
                reply = client.recv(65536)
                break
    listener.close()
    lines = head.split(b"\r\n\r\n")[0].decode().split("\r\n")
    assert lines[0] == "POST /invocations?x=1 HTTP/1.1"
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if line)}
    assert headers["host"] == f"127.0.0.1:{echo_port}"
    assert headers["x-forwarded-host"] == "public.example"
    assert headers["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["content-length"] == "2"
    assert "x-secret" not in headers and "keep-alive" not in headers and "connection" not in headers
    assert reply.startswith(b"HTTP/1.1 200")
    assert b"keep-alive: timeout" not in reply.lower()


def test_without_a_queue_requests_over_the_concurrency_limit_get_503_at_once(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    import concurrent.futures

    proxy = start_proxy(model.url, "--max-concurrency", "2", "--queue-depth", "0")

    def slow() -> int:
        return invoke(proxy, {"X-Test-Delay-Ms": "500"}).status_code

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        busy = [pool.submit(slow) for _ in range(2)]
        wait_in_flight(proxy, 2)
        started = time.monotonic()
        refused = invoke(proxy)
        assert time.monotonic() - started < 0.4  # refused at once, not queued behind the slow calls
        assert [f.result() for f in busy] == [200, 200]
    assert refused.status_code == 503 and refused.json() == {"error": "too many requests in flight"}
    assert invoke(proxy).status_code == 200  # room again
    assert proxy.value("sagemaker_invocations_total") == 3
    assert proxy.value("sagemaker_proxy_rejected_requests_total", reason="over_capacity") == 1


@pytest.mark.parametrize("server", ["builtin", "uvicorn"])
def test_sigterm_drains_in_flight_requests_while_metrics_stay_up(
    model: Running, start_proxy: Callable[..., Proxy], server: str
) -> None:
    import concurrent.futures
    import signal

    proxy = start_proxy(model.url, "--http-server", server)
    idle = socket.create_connection(("127.0.0.1", proxy.port))  # an idle keep-alive client: closed at shutdown
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(invoke, proxy, {"X-Test-Delay-Ms": "1500"})
        time.sleep(0.5)
        proxy.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # Draining: the admin port still answers, the in-flight invocation is not recorded yet.
        assert proxy.value("sagemaker_concurrent_requests_per_model") == 1
        assert proxy.value("sagemaker_invocations_total") == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
        assert slow.result(10).status_code == 200
    idle.settimeout(5)
    assert idle.recv(1) == b""
    assert proxy.proc.wait(10) == 0


def test_two_proxies_pointing_at_each_other_stop_at_the_first_loop(model: Running, tmp_path: Path) -> None:
    """A start-time check cannot see every loop (here A -> B -> A): the hop mark each proxy adds can."""
    from tests.conftest import start

    ports = {name: (free_port(), free_port()) for name in "ab"}
    proxies = {}
    for name, other in (("a", "b"), ("b", "a")):
        port, metrics_port = ports[name]
        args = [
            "-m", "proxy", "serve", "--upstream", f"http://127.0.0.1:{ports[other][0]}", "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", str(metrics_port), "--endpoint-name", "test-endpoint", "--admin-linger", "0", "--unhealthy-threshold", "1",
        ]
        running = start(args, metrics_port, tmp_path / f"{name}.log")
        proxies[name] = Proxy(running.proc, port, running.log, metrics_port)
    try:
        a, b = proxies["a"], proxies["b"]
        # The health check at start: A's finds B not there yet; B's goes round the loop (B -> A -> B -> A), and A refuses it.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not all("at start" in p.log.read_text() for p in (a, b)):
            time.sleep(0.1)
        assert "does not answer GET /ping at start (the model's /ping answered 508;" in b.log.read_text(), b.log.read_text()
        assert a.value("sagemaker_proxy_rejected_requests_total", reason="loop_detected") == 1
        r = httpx.post(f"{a.url}/invocations", json={"instances": [[5.1, 3.5, 1.4, 0.2]]}, timeout=10)
        assert r.status_code == 508 and "through this proxy already" in r.text
        # A's first pass and B's call are invocations that got the 508; A's second pass is refused, not forwarded.
        assert a.value("sagemaker_proxy_rejected_requests_total", reason="loop_detected") == 2
        assert a.value("sagemaker_invocations_total") == 1 and b.value("sagemaker_invocations_total") == 1
        assert b.value("sagemaker_proxy_rejected_requests_total", reason="loop_detected") == 0
    finally:
        for proxy in proxies.values():
            proxy.stop()


def test_over_the_concurrency_limit_requests_wait_in_line_and_the_overflow_is_refused(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    """Concurrency 2, a queue of 8: 10 calls of 1 s at once are all served, 2 at a time, 8 waiting at the peak;
    the 11th finds the line full. Queue time is shown alone and is part of OverheadLatency."""
    import concurrent.futures

    proxy = start_proxy(model.url, "--max-concurrency", "2", "--queue-depth", "8")
    peak_waiting = peak_concurrent = 0.0
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        # Each call takes 1 s, so the line stays full long after the peak is seen: the 11th finds it full.
        calls = [pool.submit(lambda: invoke(proxy, {"X-Test-Delay-Ms": "1000"}).status_code) for _ in range(10)]
        deadline = time.monotonic() + 5
        while peak_waiting < 8 and time.monotonic() < deadline:
            samples = proxy.samples()
            labels = frozenset({"endpoint_name": "test-endpoint", "variant_name": "AllTraffic"}.items())
            peak_waiting = max(peak_waiting, samples[("sagemaker_requests_waiting", labels)])
            peak_concurrent = max(peak_concurrent, samples[("sagemaker_concurrent_requests_per_model", labels)])
            time.sleep(0.01)
        overflow = invoke(proxy)
        assert [c.result() for c in calls] == [200] * 10
    assert peak_waiting == 8 and peak_concurrent == 10  # ConcurrentRequestsPerModel counts the queued, as SageMaker's does
    assert overflow.status_code == 503 and overflow.json() == {"error": "too many requests waiting for the model"}
    assert proxy.value("sagemaker_proxy_rejected_requests_total", reason="queue_full") == 1
    assert proxy.value("sagemaker_invocations_total") == 10
    assert proxy.value("sagemaker_queue_time_seconds_count") == 10
    waited = proxy.value("sagemaker_queue_time_seconds_sum")
    assert 4 * 1.0 * 0.9 < waited < 40 * 1.0  # 2 at once: 0, 0, 1, 1, ... 4, 4 s, about 20 s in all
    assert proxy.value("sagemaker_overhead_latency_seconds_sum") >= waited * 0.95
    assert proxy.value("sagemaker_requests_waiting") == 0 and proxy.value("sagemaker_concurrent_requests_per_model") == 0


def test_a_request_that_waits_past_the_queue_timeout_is_refused(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    import concurrent.futures

    proxy = start_proxy(model.url, "--max-concurrency", "1", "--queue-timeout", "0.3")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        busy = pool.submit(lambda: invoke(proxy, {"X-Test-Delay-Ms": "1000"}).status_code)
        wait_in_flight(proxy, 1)
        started = time.monotonic()
        late = invoke(proxy)
        assert 0.25 < time.monotonic() - started < 2.0  # refused at its timeout, not served after the busy call (below)
        assert busy.result() == 200
    assert late.status_code == 503 and late.json() == {"error": "waited too long for the model"}
    assert proxy.value("sagemaker_proxy_rejected_requests_total", reason="queue_timeout") == 1
    assert proxy.value("sagemaker_invocations_total") == 1
    assert proxy.value("sagemaker_requests_waiting") == 0


def test_a_client_that_leaves_the_queue_frees_its_place(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    import concurrent.futures

    proxy = start_proxy(model.url, "--max-concurrency", "1")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        busy = pool.submit(lambda: invoke(proxy, {"X-Test-Delay-Ms": "800"}).status_code)
        wait_in_flight(proxy, 1)
        leaving = socket.create_connection(("127.0.0.1", proxy.port))
        leaving.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        deadline = time.monotonic() + 5
        while proxy.value("sagemaker_requests_waiting") < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        leaving.close()
        while proxy.value("sagemaker_requests_waiting") > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proxy.value("sagemaker_requests_waiting") == 0
        assert busy.result() == 200
    assert invoke(proxy).status_code == 200
    assert proxy.value("sagemaker_invocations_total") == 2  # the one that left was never sent to the model
    assert proxy.value("sagemaker_proxy_rejected_requests_total", reason="client_disconnect") == 1


def test_a_health_check_never_waits_behind_the_invocations(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    """Only invocations take a slot at the model: with the one slot busy, /ping on the proxy port answers at once."""
    import concurrent.futures

    proxy = start_proxy(model.url, "--max-concurrency", "1", "--queue-depth", "0")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        busy = pool.submit(lambda: invoke(proxy, {"X-Test-Delay-Ms": "800"}).status_code)
        wait_in_flight(proxy, 1)
        started = time.monotonic()
        assert httpx.get(f"{proxy.url}/ping").status_code == 200
        assert time.monotonic() - started < 0.7  # behind the busy call it would take 0.8 s
        assert invoke(proxy).status_code == 503  # an invocation does wait (here: no queue, refused)
        assert busy.result() == 200
    assert proxy.value("sagemaker_proxy_rejected_requests_total", reason="over_capacity") == 1
