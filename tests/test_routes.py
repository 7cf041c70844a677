"""Invocation routes: literal and templated, the model-server presets, and the warning for what is not counted."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from proxy.invocation.routes import MODEL_SERVERS, Routes, parse, shape, suggestion
from tests.conftest import Proxy, Running
from tests.test_settings import config_error, settings


def test_a_template_matches_one_segment_per_placeholder_and_names_the_model() -> None:
    routes = Routes([parse("POST /v2/models/{model}/infer"), parse("POST /v2/models/{model}/versions/{version}/infer"), parse("POST /invocations")])
    assert routes.match("POST", "/invocations") == (True, None)
    assert routes.match("POST", "/v2/models/iris/infer") == (True, "iris")
    assert routes.match("POST", "/v2/models/iris/versions/3/infer") == (True, "iris")
    assert routes.match("POST", "/v2/models/a/b/infer") == (False, None)  # a placeholder is one segment
    assert routes.match("POST", "/v2/models//infer") == (False, None)
    assert routes.match("GET", "/v2/models/iris/infer") == (False, None)
    assert routes.match("POST", "/v2/models/iris/infer/") == (False, None)
    assert routes.model_path == "/invocations"


def test_a_placeholder_inside_a_segment_and_regex_characters_matched_literally() -> None:
    routes = Routes([parse("POST /v1/models/{model}:predict"), parse("POST /a.b")])
    assert routes.match("POST", "/v1/models/iris:predict") == (True, "iris")
    assert routes.match("POST", "/axb") == (False, None)  # the dot is a dot


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("POST /v2/models/*/infer", "'*' has no meaning"),
        ("POST /v2/models/{name}/infer", "{name} is no placeholder"),
        ("POST /v2/{model}/{model}", "once"),
        ("POST /v2/models/[a-z]+/infer", "has no meaning"),
        ("POST /v2/models/{model/infer", "has no meaning"),
        ("FETCH /x", "METHOD /path"),
        ("/invocations", "METHOD /path"),
    ],
)
def test_a_pattern_the_router_does_not_have_is_refused_at_start(raw: str, says: str) -> None:
    message = config_error("--invocation-route", raw)
    assert "--invocation-route" in message and says in message


def test_a_preset_sets_routes_and_health_check_and_flags_override_it() -> None:
    s = settings("--model-server", "kserve-v2")
    assert s.invocation_routes == MODEL_SERVERS["kserve-v2"].routes and s.ping_path == "/v2/health/ready"
    s = settings("--model-server", "torchserve", "--invocation-route", "POST /predictions/{model}", "--ping-path", "/healthz")
    assert s.invocation_routes == frozenset({("POST", "/predictions/{model}")}) and s.ping_path == "/healthz"
    assert "--model-server" in config_error("--model-server", "flask")


@pytest.mark.parametrize(
    ("server", "method", "path"),
    [
        ("kserve-v2", "POST", "/v2/models/iris/infer"),
        ("triton", "POST", "/v2/models/llama/generate_stream"),
        ("torchserve", "POST", "/predictions/resnet/2.0"),
        ("openai", "POST", "/v1/chat/completions"),
        ("tgi", "POST", "/generate_stream"),
        ("ollama", "POST", "/api/chat"),
        ("sagemaker", "POST", "/invocations"),
    ],
)
def test_each_preset_counts_its_servers_inference_routes(server: str, method: str, path: str) -> None:
    assert Routes(MODEL_SERVERS[server].routes).match(method, path)[0]


def test_the_suggestion_names_a_preset_or_a_route_and_shapes_hide_names() -> None:
    assert suggestion("POST", "/v2/models/iris/infer") == "--model-server kserve-v2"
    assert suggestion("POST", "/score") == "--invocation-route 'POST /score'"
    assert shape("POST", "/v2/models/iris/infer") == shape("POST", "/v2/models/wine/infer") == "POST /v2/*/*/*"


@pytest.mark.e2e
def test_kserve_v2_traffic_is_counted_and_an_uncounted_route_is_said_once(recording_model: Running, start_proxy: Callable[..., Proxy]) -> None:
    assert httpx.post(f"{recording_model.url}/__reset").status_code == 200
    proxy = start_proxy(recording_model.url, "--model-server", "kserve-v2")
    for name in ("iris", "iris", "wine", "iris", "wine"):
        assert httpx.post(f"{proxy.url}/v2/models/{name}/infer", json={"inputs": []}).status_code == 200
    assert httpx.post(f"{proxy.url}/v2/models/iris/versions/2/infer", json={"inputs": []}).status_code == 200
    assert proxy.value("sagemaker_invocations_total") == 6
    # Not an inference route of the preset: forwarded, not counted, and said once for its shape.
    for name in ("a", "b", "c"):
        assert httpx.post(f"{proxy.url}/score/{name}", json={}).status_code == 200
    assert proxy.value("sagemaker_invocations_total") == 6
    log = proxy.log.read_text()
    assert log.count("is not counted as an invocation") == 1
    assert "--invocation-route 'POST /score/a'" in log


@pytest.mark.e2e
def test_the_start_line_names_the_counted_routes(recording_model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(recording_model.url, "--model-server", "torchserve", "--log-level", "info")
    assert "invocations: POST /predictions/{model}, POST /predictions/{model}/{version}" in proxy.log.read_text()


def invocations_by_model(proxy: Proxy) -> dict[str, float]:
    return {
        dict(labels).get("model", "<none>"): value
        for (name, labels), value in proxy.samples().items()
        if name == "sagemaker_invocations_total"
    }


@pytest.mark.e2e
def test_model_label_counts_per_model_from_the_route_the_target_model_and_an_openai_body(
    recording_model: Running, start_proxy: Callable[..., Proxy]
) -> None:
    import boto3
    from botocore.config import Config

    proxy = start_proxy(
        recording_model.url, "--model-label", "--invocation-route", "POST /v2/models/{model}/infer",
        "--invocation-route", "POST /v1/chat/completions", "--invocation-route", "POST /invocations",
    )
    for name in ("iris", "iris", "wine"):
        assert httpx.post(f"{proxy.url}/v2/models/{name}/infer", json={"inputs": []}).status_code == 200
    assert httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": "llama-3-8b", "messages": []}).status_code == 200
    runtime = boto3.client("sagemaker-runtime", endpoint_url=proxy.url, config=Config(retries={"max_attempts": 1}),
                           aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1")
    runtime.invoke_endpoint(EndpointName="test-endpoint", Body=b"{}", TargetModel="model-a.tar.gz")
    assert httpx.post(f"{proxy.url}/invocations", json={}).status_code == 200  # names no model
    assert invocations_by_model(proxy) == {"iris": 2, "wine": 1, "llama-3-8b": 1, "model-a.tar.gz": 1, "": 1}
    # The variant's own state stays per variant.
    assert proxy.value("sagemaker_concurrent_requests_per_model") == 0
    assert proxy.value("sagemaker_model_latency_seconds_count", model="iris") == 2


@pytest.mark.e2e
def test_ten_thousand_model_names_make_at_most_max_models_plus_one_series(recording_model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(recording_model.url, "--model-label", "--model-server", "kserve-v2")
    with httpx.Client(base_url=proxy.url) as client:
        for i in range(10_000):
            assert client.post(f"/v2/models/m{i}/infer", content=b"{}").status_code == 200
    by_model = invocations_by_model(proxy)
    assert len(by_model) <= 101 and "__other__" in by_model, sorted(by_model)[:5]
    assert sum(by_model.values()) == 10_000
    assert httpx.post(f"{recording_model.url}/__reset").status_code == 200


@pytest.mark.e2e
def test_without_model_label_the_series_stay_as_they_were(recording_model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(recording_model.url, "--model-server", "kserve-v2")
    assert httpx.post(f"{proxy.url}/v2/models/iris/infer", content=b"{}").status_code == 200
    assert invocations_by_model(proxy) == {"<none>": 1}
