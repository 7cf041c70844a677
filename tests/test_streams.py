"""Streams and tokens, end to end: SageMaker's stream metrics, OpenAI-compatible token counts, Prometheus's units.

A real proxy in front of the example model (event streams with known timing, and its OpenAI-compatible
completions) and the faulty model (a stream that dies): each number is checked against the timing or the
tokens the model was told to produce, and against what the client itself saw.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import Proxy, Running

pytestmark = pytest.mark.e2e

IRIS = {"instances": [[5.1, 3.5, 1.4, 0.2]]}
CHAT = ("--invocation-route", "POST /v1/chat/completions", "--invocation-route", "POST /v1/completions", "--invocation-route", "POST /invocations")


def stream(url: str, body: object, headers: dict[str, str]) -> tuple[float, float, bytes]:
    """(seconds to the first body chunk, seconds to the end, the body) as the client saw them."""
    started = time.monotonic()
    first = 0.0
    chunks = []
    with httpx.stream("POST", url, json=body, headers=headers, timeout=10) as r:
        assert r.status_code == 200
        for chunk in r.iter_raw():
            if not first:
                first = time.monotonic() - started
            chunks.append(chunk)
    return first, time.monotonic() - started, b"".join(chunks)


def test_first_chunk_and_inter_chunk_latency_follow_the_model(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    """The model waits 300 ms, then sends 5 events 100 ms apart."""
    proxy = start_proxy(model.url)
    headers = {"X-Test-Delay-Ms": "300", "X-Test-Stream-Chunks": "5", "X-Test-Stream-Interval-Ms": "100"}
    first_seen, _, body = stream(f"{proxy.url}/invocations", IRIS, headers)
    assert body == b"".join(b"data: %d\n\n" % i for i in range(5))
    assert proxy.value("sagemaker_first_chunk_model_latency_seconds_count") == 1
    model_s = proxy.value("sagemaker_first_chunk_model_latency_seconds_sum")
    overhead_s = proxy.value("sagemaker_first_chunk_overhead_latency_seconds_sum")
    first_s = proxy.value("sagemaker_first_chunk_latency_seconds_sum")
    assert 0.298 <= model_s < 0.330, model_s  # the model sleeps on libuv's millisecond timer: it may wake a little early
    assert first_s == pytest.approx(model_s + overhead_s, abs=2e-6)  # whole microseconds each
    assert 0 <= overhead_s < 0.010, overhead_s
    assert first_s <= first_seen, (first_s, first_seen)  # never more than the client waited
    gaps = proxy.value("sagemaker_inter_chunk_latency_seconds_count")
    assert gaps == 4
    assert proxy.value("sagemaker_inter_chunk_latency_seconds_sum") / gaps == pytest.approx(0.100, abs=0.015)
    assert proxy.value("sagemaker_mid_stream_errors_total") == 0
    assert proxy.value("sagemaker_output_tokens_total") == 0  # events, but not OpenAI's: no tokens
    # A sized answer is no stream: no first-chunk figures.
    assert httpx.post(f"{proxy.url}/invocations", json=IRIS).status_code == 200
    assert proxy.value("sagemaker_first_chunk_latency_seconds_count") == 1
    assert proxy.value("sagemaker_invocations_total") == 2


@pytest.mark.parametrize("include_usage", [True, False])
def test_openai_stream_tokens_and_time_per_token(model: Running, start_proxy: Callable[..., Proxy], include_usage: bool) -> None:
    """12 tokens, 50 ms apart, for a prompt of 7 words; the usage chunk, when asked for, says the same."""
    proxy = start_proxy(model.url, *CHAT)
    body: dict[str, object] = {"messages": [{"role": "user", "content": "say something about the proxy please"}], "max_tokens": 12, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    _, _, raw = stream(f"{proxy.url}/v1/chat/completions", body, {"X-Test-Stream-Interval-Ms": "50"})
    events = [line for line in raw.split(b"\n") if line.startswith(b"data: ")]
    assert events[-1] == b"data: [DONE]"
    contents = [json.loads(e[6:])["choices"][0]["delta"].get("content") for e in events[:-1] if json.loads(e[6:])["choices"]]
    assert sum(1 for c in contents if c) == 12  # what the client got, unchanged
    assert proxy.value("sagemaker_output_tokens_total") == 12
    assert proxy.value("sagemaker_input_tokens_total") == (6 if include_usage else 0)
    assert proxy.value("sagemaker_time_per_output_token_seconds_count") == 1
    assert proxy.value("sagemaker_time_per_output_token_seconds_sum") == pytest.approx(0.050, abs=0.010)


def test_a_long_stream_is_counted_in_batches_with_the_same_result(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    """100 tokens 5 ms apart: more chunks than one batch of the token counter holds (proxy.invocation.tokens.TOKEN_BATCH_CHUNKS)."""
    proxy = start_proxy(model.url, *CHAT)
    body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 100, "stream": True, "stream_options": {"include_usage": True}}
    _, _, raw = stream(f"{proxy.url}/v1/chat/completions", body, {"X-Test-Stream-Interval-Ms": "5"})
    assert raw.count(b'"content":') >= 100 and raw.endswith(b"data: [DONE]\n\n")
    assert proxy.value("sagemaker_output_tokens_total") == 100
    assert proxy.value("sagemaker_input_tokens_total") == 1
    assert proxy.value("sagemaker_inter_chunk_latency_seconds_count") > 64  # the chunks came apart, not in one read
    assert proxy.value("sagemaker_time_per_output_token_seconds_sum") == pytest.approx(0.005, abs=0.002)


def test_tokens_of_non_streamed_completions_and_of_both_apis(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(model.url, *CHAT)
    r = httpx.post(f"{proxy.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "one two three"}], "max_tokens": 5})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    r = httpx.post(f"{proxy.url}/v1/completions", json={"prompt": "a b", "max_tokens": 4})
    assert r.status_code == 200
    _, _, _ = stream(f"{proxy.url}/v1/completions", {"prompt": "a b c d", "max_tokens": 3, "stream": True}, {})
    assert proxy.value("sagemaker_output_tokens_total") == 5 + 4 + 3
    assert proxy.value("sagemaker_input_tokens_total") == 3 + 2  # the stream had no usage chunk
    assert proxy.value("sagemaker_time_per_output_token_seconds_count") == 1  # per stream only
    assert proxy.value("sagemaker_invocations_total") == 3


def test_a_stream_that_dies_is_one_mid_stream_error_and_one_model_error(faulty_model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(faulty_model.url)
    with pytest.raises(httpx.HTTPError), httpx.stream("POST", f"{proxy.url}/invocations", content=b"{}", headers={"X-Fault": "chunked-die"}) as r:
        for _ in r.iter_raw():
            pass
    deadline = time.monotonic() + 2
    while proxy.value("sagemaker_invocations_total") < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proxy.value("sagemaker_invocations_total") == 1
    assert proxy.value("sagemaker_mid_stream_errors_total") == 1
    assert proxy.value("sagemaker_invocation_model_errors_total") == 1
    assert proxy.value("sagemaker_first_chunk_model_latency_seconds_count") == 1
    # A stream that ends well is no error.
    with httpx.stream("POST", f"{proxy.url}/invocations", content=b"{}", headers={"X-Fault": "slow-body"}) as r:
        assert r.read() == b"01234"
    assert proxy.value("sagemaker_mid_stream_errors_total") == 1
    assert proxy.value("sagemaker_inter_chunk_latency_seconds_count") >= 4


def test_request_and_response_sizes(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(model.url)
    r = httpx.post(f"{proxy.url}/invocations", content=json.dumps(IRIS).encode(), headers={"content-type": "application/json"})
    assert r.status_code == 200
    assert proxy.value("sagemaker_request_size_bytes_sum") == len(json.dumps(IRIS))
    assert proxy.value("sagemaker_response_size_bytes_sum") == len(r.content)
    assert proxy.value("sagemaker_request_size_bytes_bucket", le="256.0") == 1


def test_promtool_accepts_the_whole_exposition_after_every_kind_of_traffic(
    model: Running, faulty_model: Running, start_proxy: Callable[..., Proxy]
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing; .ci/run installs Debian's prometheus package")
    proxy = start_proxy(model.url, *CHAT, "--sample-interval", "0.2")
    broken = start_proxy(faulty_model.url, "--sample-interval", "0")
    httpx.post(f"{proxy.url}/invocations", json=IRIS)
    httpx.post(f"{proxy.url}/invocations", json=IRIS, headers={"X-Test-Status": "404"})
    httpx.post(f"{proxy.url}/invocations", content=b"x" * 7_000_000)  # refused: too large
    stream(f"{proxy.url}/invocations", IRIS, {"X-Test-Stream-Chunks": "3"})
    stream(f"{proxy.url}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True}, {})
    with pytest.raises(httpx.HTTPError), httpx.stream("POST", f"{broken.url}/invocations", content=b"{}", headers={"X-Fault": "chunked-die"}) as r:
        r.read()
    time.sleep(0.5)  # a host sample
    for p in (proxy, broken):
        text = httpx.get(f"{p.metrics_url}/metrics").text  # what `curl :9090/metrics | promtool check metrics` reads
        assert "sagemaker_first_chunk_latency_seconds_bucket" in text
        lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
        assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), (lint.stdout, lint.stderr)


def test_time_to_first_token_is_the_first_content_not_the_role_chunk(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    """The role chunk at once, the first token 200 ms later: time to first token 200 ms, FirstChunkLatency ~0 (it is
    the first body byte); tokens per request and the finish reason counted."""
    proxy = start_proxy(model.url, *CHAT)
    body = {"messages": [{"role": "user", "content": "a b c"}], "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    first_byte, _, raw = stream(f"{proxy.url}/v1/chat/completions", body, {"X-Test-First-Token-Ms": "200", "X-Test-Stream-Interval-Ms": "10"})
    assert raw.count(b'"role":"assistant"') == 1 and first_byte < 0.15
    assert proxy.value("sagemaker_time_to_first_token_seconds_count") == 1
    assert 0.198 <= proxy.value("sagemaker_time_to_first_token_seconds_sum") < 0.260  # the model's 200 ms, plus a busy machine's delays
    assert proxy.value("sagemaker_first_chunk_latency_seconds_sum") < 0.1
    assert proxy.value("sagemaker_request_output_tokens_count") == 1 and proxy.value("sagemaker_request_output_tokens_sum") == 5
    assert proxy.value("sagemaker_request_input_tokens_sum") == 3
    assert proxy.value("sagemaker_requests_finished_total", finish_reason="length") == 1
    assert proxy.value("sagemaker_requests_finished_total", finish_reason="stop") == 0
    # A non-streamed answer: its tokens and finish reason, no time to first token.
    r = httpx.post(f"{proxy.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
    assert r.status_code == 200
    assert proxy.value("sagemaker_requests_finished_total", finish_reason="length") == 2
    assert proxy.value("sagemaker_request_output_tokens_count") == 2
    assert proxy.value("sagemaker_time_to_first_token_seconds_count") == 1
