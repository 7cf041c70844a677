"""A real Prometheus server scrapes the real proxy: the numbers it stores are the ones that were sent."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import Proxy, Running, free_port, wait_for_port

pytestmark = pytest.mark.e2e

DELAY_MS = 30


@contextmanager
def running_prometheus(binary: str, target: str, tmp_path: Path, rules: Path | None = None) -> Iterator[str]:
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        + (f"rule_files: ['{rules}']\n" if rules else "")
        + "scrape_configs:\n"
        f"  - job_name: sagemaker-metrics-proxy\n    static_configs: [{{targets: ['{target}']}}]\n"
    )
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, proc, timeout=30)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/-/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(15)


def query(prometheus: str, promql: str) -> float | None:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}).json()
    assert response["status"] == "success", response
    result = response["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def wait_for_value(prometheus: str, promql: str, want: float, timeout: float = 30) -> float | None:
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = query(prometheus, promql)
        if value == want:
            return value
        time.sleep(0.5)
    return value


def test_prometheus_sees_exactly_what_was_sent(
    prometheus_binary: str, model: Running, start_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    # Fine buckets around the model's known time, so the quantile can be read to within a bucket.
    buckets = ",".join(str(b) for b in (0.010, 0.020, 0.025, 0.030, 0.032, 0.034, 0.036, 0.040, 0.050, 0.100))
    proxy = start_proxy(model.url, "--model-latency-buckets", buckets)
    with running_prometheus(prometheus_binary, f"127.0.0.1:{proxy.metrics_port}", tmp_path) as prometheus:
        check_what_prometheus_stores(prometheus, proxy)


def check_what_prometheus_stores(prometheus: str, proxy: Proxy) -> None:
    sent = 25
    for _ in range(sent):
        r = httpx.post(f"{proxy.url}/invocations", json={"instances": [[5.1, 3.5, 1.4, 0.2]]}, headers={"X-Test-Delay-Ms": str(DELAY_MS)})
        assert r.status_code == 200
    for _ in range(3):
        assert httpx.post(f"{proxy.url}/invocations", json={"instances": [[1]]}).status_code == 400
    selector = '{job="sagemaker-metrics-proxy", endpoint_name="test-endpoint", variant_name="AllTraffic"}'
    assert wait_for_value(prometheus, f"sagemaker_invocations_total{selector}", sent + 3) == sent + 3
    assert query(prometheus, f"sagemaker_invocation_4xx_errors_total{selector}") == 3
    assert query(prometheus, f"sagemaker_invocations_per_instance_total{selector}") == sent + 3
    # The 25 slow calls dominate the median: it must sit at the model's time, within the bucket that holds it.
    p50 = query(prometheus, f"histogram_quantile(0.5, sum by (le) (sagemaker_model_latency_seconds_bucket{selector}))")
    assert p50 is not None
    assert DELAY_MS / 1000 <= p50 <= DELAY_MS / 1000 + 0.004, p50
    assert query(prometheus, 'up{job="sagemaker-metrics-proxy"}') == 1
