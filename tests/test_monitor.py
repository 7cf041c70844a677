"""``sagemaker-metrics-proxy monitor`` as a real process: a training job's host metrics on /metrics."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, Running, free_port, start

pytestmark = pytest.mark.e2e

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics_url: str) -> Samples:
    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{metrics_url}/metrics").text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"{key} twice"
            out[key] = s.value
    return out


def wait_for_samples(metrics_url: str, names: list[str], labels: dict[str, str], timeout: float = 15) -> Samples:
    """Scrape until every one of ``names`` has a sample with exactly ``labels``."""
    deadline = time.monotonic() + timeout
    samples: Samples = {}
    while time.monotonic() < deadline:
        samples = scrape(metrics_url)
        if all((n, frozenset(labels.items())) in samples for n in names):
            return samples
        time.sleep(0.1)
    raise AssertionError(f"no {names} with {labels} in {sorted(samples)}")


HOST_GAUGES = ["sagemaker_cpu_utilization_percent", "sagemaker_memory_utilization_percent", "sagemaker_disk_utilization_percent"]


@pytest.fixture
def start_monitor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Running]]:
    """Start ``monitor`` as a process: ``start_monitor("--flag", "value", ...)``, in this process's environment."""
    monkeypatch.delenv("TRAINING_JOB_NAME", raising=False)
    started: list[Running] = []

    def _start(*flags: str) -> Running:
        port = free_port()
        args = ["-m", "proxy", "monitor", "--host", "127.0.0.1", "--metrics-port", str(port), *flags]
        running = start(args, port, tmp_path / f"monitor-{len(started)}.log")
        started.append(running)
        return running

    yield _start
    for running in started:
        running.stop()


def test_monitor_serves_the_host_metrics_in_the_training_format(start_monitor: Callable[..., Running]) -> None:
    monitor = start_monitor("--training-job", "my-training-job", "--host-index", "2", "--sample-interval", "0.2")
    samples = wait_for_samples(monitor.url, HOST_GAUGES, {"host": "my-training-job/algo-2"})
    cpu = samples[("sagemaker_cpu_utilization_percent", frozenset({("host", "my-training-job/algo-2")}))]
    assert 0 <= cpu <= 100 * (os.cpu_count() or 1) * 1.05
    assert 0 < samples[("sagemaker_memory_utilization_percent", frozenset({("host", "my-training-job/algo-2")}))] <= 100
    assert not any(name.startswith("sagemaker_gpu") for name, _ in samples)  # no GPU here: absent, not 0
    assert httpx.get(f"{monitor.url}/healthz").json() == {"status": "ok"}
    monitor.proc.send_signal(signal.SIGTERM)
    assert monitor.proc.wait(10) == 0
    log = monitor.log.read_text()
    assert log.count("no GPU metrics") == 1, log


def test_monitor_takes_the_job_name_from_sagemakers_environment(start_monitor: Callable[..., Running], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINING_JOB_NAME", "from-sagemaker")
    monitor = start_monitor("--sample-interval", "0.2")
    wait_for_samples(monitor.url, HOST_GAUGES, {"host": "from-sagemaker/algo-1"})


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRAINING_JOB_NAME" and not k.startswith("SAGEMAKER_PROXY_")}
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, env=env)


@pytest.mark.parametrize(
    ("args", "line"),
    [
        ([], "--training-job is required"),
        (["--training-job", "j", "--sample-interval", "0"], "--sample-interval: must be between 0.1 and 3600 seconds"),
        (["--training-job", "j", "--watch-cgroup", "/no-such-cgroup-here"], "--watch-cgroup: cgroup /no-such-cgroup-here not found"),
    ],
)
def test_bad_monitor_configuration_exits_2_with_one_line(args: list[str], line: str) -> None:
    result = run_cli("monitor", "--metrics-port", str(free_port()), *args)
    assert result.returncode == 2, result.stderr
    [error] = result.stderr.strip().splitlines()
    assert error.startswith(f"sagemaker-metrics-proxy: error: {line}"), error


def test_monitor_help_shows_only_what_monitor_takes() -> None:
    result = run_cli("monitor", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines
    assert "monitor" not in text.replace("sagemaker-metrics-proxy monitor", ""), text  # no "(not for monitor)"
    assert "serve" not in text, text
    assert "--cloudwatch-concurrency-period" not in text  # ConcurrentRequestsPerModel is the proxy's
    assert "seconds between samples of the instance metrics, 0.1 to 3600 (default 10)" in text
    serve = " ".join(run_cli("serve", "--help").stdout.split())
    assert "0.1 to 3600; 0 turns them off (default 10)" in serve and "--cloudwatch-concurrency-period" in serve


def test_monitor_takes_no_flag_of_the_proxy() -> None:
    result = run_cli("monitor", "--training-job", "j", "--cloudwatch-concurrency-period", "10")
    assert result.returncode == 2
    [error] = result.stderr.strip().splitlines()
    assert error == "sagemaker-metrics-proxy: error: unrecognized arguments: --cloudwatch-concurrency-period 10", error


def test_a_taken_metrics_port_names_the_flag() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        busy = blocker.getsockname()[1]
        result = run_cli("monitor", "--training-job", "j", "--host", "127.0.0.1", "--metrics-port", str(busy))
    assert result.returncode == 2
    [error] = result.stderr.strip().splitlines()
    assert error == (
        f"sagemaker-metrics-proxy: error: --metrics-port: cannot listen on 127.0.0.1:{busy}: Address already in use; "
        "another process has that port: stop it or give another --metrics-port"
    ), error
