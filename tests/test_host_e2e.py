"""The proxy as a real process exports the instance metrics on its admin port, sampled once per container."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import ROOT, Proxy, Running, free_port
from tests.test_monitor import HOST_GAUGES, scrape, wait_for_samples

pytestmark = pytest.mark.e2e

LABELS = {"endpoint_name": "test-endpoint", "variant_name": "AllTraffic"}
IRIS = {"instances": [[5.1, 3.5, 1.4, 0.2]]}


def test_the_admin_port_shows_the_instance_metrics_with_the_host_label(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(model.url, "--sample-interval", "0.2", "--instance-id", "i-0abc")
    labels = {**LABELS, "host": "test-endpoint/AllTraffic/i-0abc"}
    samples = wait_for_samples(proxy.metrics_url, HOST_GAUGES, labels)
    assert 0 < samples[("sagemaker_memory_utilization_percent", frozenset(labels.items()))] <= 100
    assert 0 < samples[("sagemaker_disk_utilization_percent", frozenset(labels.items()))] <= 100
    assert not any(name.startswith("sagemaker_gpu") for name, _ in samples)
    # The request path is unchanged: invocations still work and count.
    assert httpx.post(f"{proxy.url}/invocations", json=IRIS).status_code == 200
    assert proxy.value("sagemaker_invocations_total") == 1


def test_the_instance_id_defaults_to_the_hostname(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(model.url, "--sample-interval", "0.2")
    wait_for_samples(proxy.metrics_url, HOST_GAUGES, {**LABELS, "host": f"test-endpoint/AllTraffic/{socket.gethostname()}"})


def test_an_interval_of_0_turns_the_instance_metrics_off(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(model.url, "--sample-interval", "0")
    assert httpx.post(f"{proxy.url}/invocations", json=IRIS).status_code == 200
    time.sleep(0.3)
    assert not any(name.startswith(("sagemaker_cpu", "sagemaker_memory", "sagemaker_disk")) for name, _ in scrape(proxy.metrics_url))


def test_with_workers_the_supervisor_samples_once(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(model.url, "--workers", "2", "--sample-interval", "0.2", "--instance-id", "i-1", "--log-level", "info")
    labels = {**LABELS, "host": "test-endpoint/AllTraffic/i-1"}
    for _ in range(4):
        assert httpx.post(f"{proxy.url}/invocations", json=IRIS).status_code == 200
    samples = wait_for_samples(proxy.metrics_url, HOST_GAUGES, labels)  # scrape() refuses a sample seen twice
    assert samples[("sagemaker_invocations_total", frozenset(LABELS.items()))] == 4
    cpu = [key for key in samples if key[0] == "sagemaker_cpu_utilization_percent"]
    assert cpu == [("sagemaker_cpu_utilization_percent", frozenset(labels.items()))]
    # One sampler, in the supervisor: it alone looked for GPUs.
    sampled_by = re.findall(r"\[(\d+)\]: no GPU metrics", proxy.log.read_text())
    assert sampled_by == [str(proxy.proc.pid)], proxy.log.read_text()


def test_a_missing_watched_cgroup_exits_2_before_listening() -> None:
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--upstream", "http://127.0.0.1:1", "--endpoint-name", "e",
         "--port", str(port), "--metrics-port", str(free_port()), "--watch-cgroup", "/no-such-cgroup-here"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("sagemaker-metrics-proxy: error: --watch-cgroup: cgroup /no-such-cgroup-here not found"), line
