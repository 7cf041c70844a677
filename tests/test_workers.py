"""Several workers behind one port give one correct set of metrics (prometheus-client multiprocess mode)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import Proxy, Running, free_port, start

pytestmark = pytest.mark.e2e

IRIS = {"instances": [[5.1, 3.5, 1.4, 0.2]]}


def workers_of(proxy: Proxy) -> list[psutil.Process]:
    """Live worker processes: children of the supervisor that are not multiprocessing's helper."""
    workers = []
    for child in psutil.Process(proxy.proc.pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(child.cmdline()):
                workers.append(child)
        except psutil.NoSuchProcess:
            pass
    return workers


def wait_for_workers(proxy: Proxy, n: int) -> list[psutil.Process]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        workers = workers_of(proxy)
        if len(workers) == n:
            return workers
        time.sleep(0.1)
    raise AssertionError(f"expected {n} workers, found {workers_of(proxy)}")


def test_requests_spread_over_workers_are_counted_once(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(model.url, "--workers", "2")
    wait_for_workers(proxy, 2)
    m = 60
    for _ in range(m):  # a new connection per request, so the kernel hands them to either worker
        r = httpx.post(f"{proxy.url}/invocations", json=IRIS, headers={"Connection": "close"})
        assert r.status_code == 200
    assert proxy.value("sagemaker_invocations_total") == m
    assert proxy.value("sagemaker_invocations_per_instance_total") == pytest.approx(m)
    assert proxy.value("sagemaker_model_latency_seconds_count") == m
    assert proxy.value("sagemaker_concurrent_requests_per_model") == 0
    assert proxy.value("sagemaker_live_instances") == 1


def test_a_dead_worker_is_replaced_and_its_counts_are_kept(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(model.url, "--workers", "2")
    first = wait_for_workers(proxy, 2)
    for _ in range(20):
        assert httpx.post(f"{proxy.url}/invocations", json=IRIS, headers={"Connection": "close"}).status_code == 200
    os.kill(first[0].pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        pids = {w.pid for w in workers_of(proxy)}
        if len(pids) == 2 and first[0].pid not in pids:
            break
        time.sleep(0.1)
    assert len(pids) == 2 and first[0].pid not in pids
    for _ in range(10):
        assert httpx.post(f"{proxy.url}/invocations", json=IRIS, headers={"Connection": "close"}, timeout=10).status_code == 200
    assert proxy.value("sagemaker_invocations_total") == 30
    assert proxy.value("sagemaker_concurrent_requests_per_model") == 0


def test_stopping_the_supervisor_stops_the_workers(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(model.url, "--workers", "2")
    workers = wait_for_workers(proxy, 2)
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(20) == 0
    for worker in workers:
        assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE


def test_readyz_with_workers_turns_ready_once_a_late_model_answers(tmp_path: Path, start_proxy: Callable[..., Proxy]) -> None:
    port = free_port()
    proxy = start_proxy(
        f"http://127.0.0.1:{port}", "--workers", "2", "--instance-count-from", "upstreams",
        "--health-check-interval", "0.5", "--unhealthy-threshold", "1",
    )
    wait_for_workers(proxy, 2)
    assert httpx.get(f"{proxy.metrics_url}/readyz").status_code == 503  # the model is not listening yet
    time.sleep(1.5)  # several failed health checks: the instance is out
    model = start(["-m", "example_model", "--host", "127.0.0.1", "--port", str(port)], port, tmp_path / "late-model.log")
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and httpx.get(f"{proxy.metrics_url}/readyz").status_code != 200:
            time.sleep(0.2)
        assert httpx.get(f"{proxy.metrics_url}/readyz").status_code == 200
    finally:
        model.stop()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_after_sigterm_the_last_scrape_sees_every_invocation_in_flight(model: Running, start_proxy: Callable[..., Proxy], workers: str) -> None:
    import concurrent.futures

    proxy = start_proxy(model.url, "--workers", workers, "--admin-linger", "1.5")
    if workers == "2":
        wait_for_workers(proxy, 2)
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        calls = [
            pool.submit(httpx.post, f"{proxy.url}/invocations", json=IRIS, headers={"X-Test-Delay-Ms": "800", "Connection": "close"}, timeout=10)
            for _ in range(20)
        ]
        deadline = time.monotonic() + 5
        while proxy.value("sagemaker_concurrent_requests_per_model") < 20:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proxy.proc.send_signal(signal.SIGTERM)
        assert [c.result().status_code for c in calls] == [200] * 20
    deadline = time.monotonic() + 5
    while proxy.value("sagemaker_invocations_total") < 20:  # the admin port is still up after the drain
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert proxy.value("sagemaker_invocations_total") == 20
    assert proxy.proc.wait(15) == 0
