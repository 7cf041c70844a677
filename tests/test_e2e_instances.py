"""Live instance counts and production variants through the real proxy process."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import httpx
import pytest

from tests.conftest import ROOT, Proxy, Running, free_port, start

pytestmark = pytest.mark.e2e

IRIS = {"instances": [[5.1, 3.5, 1.4, 0.2]]}


def start_faulty(port: int, log: Path) -> Running:
    return start([str(ROOT / "tests" / "faulty_model.py"), "--port", str(port)], port, log)


@pytest.fixture
def three_models(tmp_path: Path) -> Iterator[list[Running]]:
    models = [start_faulty(free_port(), tmp_path / f"model-{i}.log") for i in range(3)]
    yield models
    for model in models:
        model.stop()


def served(model: Running) -> int:
    return int(httpx.get(f"{model.url}/stats").json()["requests"])


def wait_for(proxy: Proxy, name: str, want: float, timeout: float = 10, **labels: str) -> float:
    deadline = time.monotonic() + timeout
    value = proxy.value(name, **labels)
    while value != want and time.monotonic() < deadline:
        time.sleep(0.05)
        value = proxy.value(name, **labels)
    return value


def test_instances_share_the_load_and_n_follows_their_health(three_models: list[Running], tmp_path: Path,
                                                             start_proxy: Callable[..., Proxy]) -> None:
    first, *others = three_models
    proxy = start_proxy(
        first.url, *[arg for m in others for arg in ("--upstream", m.url)],
        "--instance-count-from", "upstreams", "--health-check-interval", "0.1",
        "--health-check-timeout", "0.5", "--unhealthy-threshold", "1",
    )
    assert wait_for(proxy, "sagemaker_live_instances", 3) == 3
    before = [served(m) for m in three_models]
    for _ in range(30):
        assert httpx.post(f"{proxy.url}/invocations", json=IRIS).status_code == 200
    shares = [served(m) - b for m, b in zip(three_models, before, strict=True)]
    assert sum(shares) == 30 and min(shares) >= 8, shares  # sequential calls rotate over idle instances
    assert proxy.value("sagemaker_invocations_per_instance_total") == pytest.approx(30 / 3)

    # Kill one while requests are in flight: each request is answered once, and counted once.
    statuses: list[int] = []

    def load() -> None:
        with httpx.Client() as client:
            for _ in range(40):
                statuses.append(client.post(f"{proxy.url}/invocations", json=IRIS).status_code)

    loader = threading.Thread(target=load)
    loader.start()
    time.sleep(0.05)
    three_models[1].stop()
    loader.join()
    assert wait_for(proxy, "sagemaker_live_instances", 2) == 2
    assert set(statuses) <= {200, 502} and len(statuses) == 40
    assert proxy.value("sagemaker_invocations_total") == 70
    assert proxy.value("sagemaker_invocation_model_errors_total") == statuses.count(502)

    per_instance = proxy.value("sagemaker_invocations_per_instance_total")
    for _ in range(10):
        assert httpx.post(f"{proxy.url}/invocations", json=IRIS).status_code == 200
    assert proxy.value("sagemaker_invocations_per_instance_total") == pytest.approx(per_instance + 10 / 2)

    three_models[1] = start_faulty(three_models[1].port, tmp_path / "model-1-again.log")
    assert wait_for(proxy, "sagemaker_live_instances", 3) == 3
    assert proxy.value("sagemaker_invocations_total") == 80

    for model in three_models:
        model.stop()
    deadline = time.monotonic() + 10
    while httpx.post(f"{proxy.url}/invocations", json=IRIS).status_code != 503 and time.monotonic() < deadline:
        time.sleep(0.05)
    r = httpx.post(f"{proxy.url}/invocations", json=IRIS)
    assert r.status_code == 503 and r.json() == {"error": "no live model instance"}
    assert proxy.value("sagemaker_proxy_rejected_requests_total", reason="no_live_instance") >= 1
    assert proxy.value("sagemaker_live_instances") == 1  # n never drops below 1
    assert httpx.get(f"{proxy.metrics_url}/readyz").status_code == 503


def test_variants_split_by_weight_and_the_target_header_picks_one(three_models: list[Running], start_proxy: Callable[..., Proxy]) -> None:
    blue, green = three_models[0], three_models[1]
    proxy = start_proxy(None, f"--variant=Blue={blue.url}:3", f"--variant=Green={green.url}:1")
    seen = {"Blue": 0, "Green": 0}
    with httpx.Client() as client:
        for _ in range(400):
            r = client.post(f"{proxy.url}/invocations", json=IRIS)
            assert r.status_code == 200
            seen[r.headers["x-amzn-invoked-production-variant"]] += 1
        assert abs(seen["Blue"] - 300) <= 35, seen  # four standard deviations of a 3:1 split of 400
        for _ in range(20):
            r = client.post(f"{proxy.url}/invocations", json=IRIS, headers={"X-Amzn-SageMaker-Target-Variant": "Green"})
            assert r.headers["x-amzn-invoked-production-variant"] == "Green"
        unknown = client.post(f"{proxy.url}/invocations", json=IRIS, headers={"X-Amzn-SageMaker-Target-Variant": "Red"})
    assert unknown.status_code == 400
    assert unknown.json() == {"error": "no production variant 'Red'; this endpoint has Blue, Green"}
    assert proxy.value("sagemaker_invocations_total", variant_name="Blue") == seen["Blue"]
    assert proxy.value("sagemaker_invocations_total", variant_name="Green") == seen["Green"] + 20
    assert served(green) >= seen["Green"] + 20


def test_file_source_follows_an_orchestrator(model: Running, tmp_path: Path, start_proxy: Callable[..., Proxy]) -> None:
    count = tmp_path / "instances"
    count.write_text("4\n")
    proxy = start_proxy(model.url, "--instance-count-from", f"file:{count}")
    assert wait_for(proxy, "sagemaker_live_instances", 4) == 4
    for _ in range(8):
        httpx.post(f"{proxy.url}/invocations", json=IRIS)
    assert proxy.value("sagemaker_invocations_per_instance_total") == 2
    count.write_text("2\n")
    os.utime(count, ns=(1, time.time_ns() + 10**9))
    assert wait_for(proxy, "sagemaker_live_instances", 2) == 2
    count.write_text("not a number\n")
    os.utime(count, ns=(1, time.time_ns() + 2 * 10**9))
    assert wait_for(proxy, "sagemaker_proxy_instance_count_errors_total", 1, timeout=5) >= 1
    assert proxy.value("sagemaker_live_instances") == 2


def test_sagemaker_source_through_the_proxy(model: Running, moto: Running, aws_env: None, start_proxy: Callable[..., Proxy]) -> None:
    try:
        client = boto3.client("sagemaker", endpoint_url=moto.url, region_name="us-east-1")
        client.create_model(ModelName="m", ExecutionRoleArn="arn:aws:iam::123456789012:role/r", PrimaryContainer={"Image": "i"})
        client.create_endpoint_config(
            EndpointConfigName="c",
            ProductionVariants=[{"VariantName": "AllTraffic", "ModelName": "m", "InitialInstanceCount": 3, "InstanceType": "ml.m5.large"}],
        )
        client.create_endpoint(EndpointName="test-endpoint", EndpointConfigName="c")
        proxy = start_proxy(
            model.url, "--instance-count-from", "sagemaker", "--sagemaker-endpoint-url", moto.url,
            "--instance-count-interval", "0.2",
        )
        assert wait_for(proxy, "sagemaker_live_instances", 3) == 3
        client.update_endpoint_weights_and_capacities(
            EndpointName="test-endpoint", DesiredWeightsAndCapacities=[{"VariantName": "AllTraffic", "DesiredInstanceCount": 6}]
        )
        assert wait_for(proxy, "sagemaker_live_instances", 6) == 6
        moto.stop()  # the API goes away: the last good value stays, and the failures are counted
        assert wait_for(proxy, "sagemaker_proxy_instance_count_errors_total", 1, timeout=10) >= 1
        assert proxy.value("sagemaker_live_instances") == 6
        assert json.loads(httpx.get(f"{proxy.metrics_url}/readyz").text) == {"status": "ready"}
    finally:
        moto.stop()
