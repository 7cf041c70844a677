"""The model as the proxy's child (--model-command): readiness, setup time, the drain and the model's end.

Real processes on loopback: the proxy starts the example model itself; the tests look at the ports, /metrics,
the exit status and the model's process."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import Proxy, free_port, start, wait_for_port

IRIS = {"instances": [[6.7, 3.0, 5.2, 2.3]]}


def model_command(port: int, delay_s: float = 0.0) -> str:
    model = f"{sys.executable} -m example_model --host 127.0.0.1 --port {port} --test-knobs --log-level info"
    return f"sleep {delay_s}; exec {model}" if delay_s else model


@pytest.fixture
def proxy_with_model(tmp_path: Path) -> Iterator[Callable[..., tuple[Proxy, int]]]:
    started: list[Proxy] = []

    def _start(*flags: str, delay_s: float = 0.0) -> tuple[Proxy, int]:
        model_port, port, metrics_port = free_port(), free_port(), free_port()
        args = [
            "-m", "proxy", "serve", "--upstream", f"http://127.0.0.1:{model_port}", "--host", "127.0.0.1",
            "--port", str(port), "--metrics-port", str(metrics_port), "--endpoint-name", "test-endpoint",
            "--log-level", "info", "--model-command", model_command(model_port, delay_s), *flags,
        ]
        running = start(args, port, tmp_path / f"proxy-{len(started)}.log", wait_port=metrics_port)
        wait_for_port(port, running.proc)
        proxy = Proxy(running.proc, port, running.log, metrics_port)
        started.append(proxy)
        return proxy, model_port

    yield _start
    for proxy in started:
        proxy.stop()


def model_of(proxy: Proxy) -> psutil.Process:
    """The model server: the proxy's child process (the shell execs it)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = psutil.Process(proxy.proc.pid).children(recursive=True)
        for child in children:
            if "example_model" in " ".join(child.cmdline()):
                return child
        time.sleep(0.05)
    raise AssertionError(f"no model process under the proxy:\n{proxy.log.read_text()}")


def wait_ready(proxy: Proxy, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{proxy.metrics_url}/readyz").status_code != 200:
        assert time.monotonic() < deadline, proxy.log.read_text()
        time.sleep(0.05)


def port_closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True


@pytest.mark.e2e
def test_not_ready_and_no_invocation_until_the_model_answers_its_ping_then_its_setup_time(proxy_with_model: Callable[..., tuple[Proxy, int]]) -> None:
    proxy, _ = proxy_with_model(delay_s=1.5)
    t0 = time.monotonic()
    # The model sleeps 1.5 s before it listens: the proxy says so on both ports and calls nothing.
    assert httpx.get(f"{proxy.url}/ping").status_code == 503
    assert httpx.get(f"{proxy.metrics_url}/readyz").status_code == 503
    refused = httpx.post(f"{proxy.url}/invocations", json=IRIS)
    assert refused.status_code == 503 and "no live model instance" in refused.text
    assert time.monotonic() - t0 < 1.5, "the checks above must run while the model sleeps"
    wait_ready(proxy)
    r = httpx.post(f"{proxy.url}/invocations", json=IRIS)
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "virginica"
    assert httpx.get(f"{proxy.url}/ping").status_code == 200
    assert proxy.value("sagemaker_invocations_total") == 1
    assert proxy.value("sagemaker_proxy_rejected_requests_total", reason="no_live_instance") == 2  # the /ping and the call
    setup = proxy.value("sagemaker_model_setup_seconds")
    assert 1.5 <= setup < 15, setup
    assert proxy.value("sagemaker_model_restarts_total") == 0


@pytest.mark.e2e
def test_sigterm_answers_every_call_in_flight_then_stops_the_model_and_exits_0(proxy_with_model: Callable[..., tuple[Proxy, int]]) -> None:
    proxy, model_port = proxy_with_model()
    wait_ready(proxy)
    model = model_of(proxy)
    answers: list[int] = []

    def call() -> None:
        r = httpx.post(f"{proxy.url}/invocations", json=IRIS, headers={"X-Test-Delay-Ms": "800"}, timeout=10)
        answers.append(r.status_code)

    threads = [threading.Thread(target=call) for _ in range(10)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while proxy.value("sagemaker_concurrent_requests_per_model") < 10:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proxy.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(10)
    assert answers == [200] * 10
    assert proxy.proc.wait(15) == 0, proxy.log.read_text()
    assert not model.is_running() or model.status() == psutil.STATUS_ZOMBIE
    assert port_closed(model_port) and port_closed(proxy.port)
    log = proxy.log.read_text()
    assert "model: stopped" in log and "exited on its own" not in log
    assert f"Finished server process [{model.pid}]" in log  # the model's own clean exit, its output passed through


@pytest.mark.e2e
def test_a_killed_model_stops_the_proxy_with_a_non_zero_status(proxy_with_model: Callable[..., tuple[Proxy, int]]) -> None:
    proxy, _ = proxy_with_model()
    wait_ready(proxy)
    model_of(proxy).kill()
    status = proxy.proc.wait(15)
    assert status == 128 + signal.SIGKILL, proxy.log.read_text()
    log = proxy.log.read_text()
    assert "model: exited on its own (exit code 137)" in log or "model: exited on its own (signal SIGKILL)" in log, log
    assert port_closed(proxy.port)


@pytest.mark.e2e
def test_with_model_restart_a_killed_model_is_started_again_and_counted(proxy_with_model: Callable[..., tuple[Proxy, int]]) -> None:
    proxy, _ = proxy_with_model("--model-restart")
    wait_ready(proxy)
    first = model_of(proxy)
    first.kill()
    first.wait(5)
    codes = set()
    deadline = time.monotonic() + 20
    while True:  # while it is down, calls are refused (503), never sent to a model that is not there (502)
        r = httpx.post(f"{proxy.url}/invocations", json=IRIS)
        codes.add(r.status_code)
        if r.status_code == 200:
            break
        assert time.monotonic() < deadline and proxy.proc.poll() is None, proxy.log.read_text()
        time.sleep(0.05)
    assert codes <= {200, 503}, (codes, proxy.log.read_text())
    assert model_of(proxy).pid != first.pid
    assert proxy.value("sagemaker_model_restarts_total") == 1


@pytest.mark.e2e
def test_a_model_that_never_listens_is_stopped_after_the_setup_timeout(proxy_with_model: Callable[..., tuple[Proxy, int]]) -> None:
    proxy, _ = proxy_with_model("--model-setup-timeout", "1", delay_s=30)
    assert proxy.proc.wait(15) == 1, proxy.log.read_text()
    assert "not answering its ping after 1 s (--model-setup-timeout)" in proxy.log.read_text()


@pytest.mark.e2e
def test_with_workers_the_supervisor_runs_the_model_and_each_worker_waits_for_it(tmp_path: Path) -> None:
    model_port, port, metrics_port = free_port(), free_port(), free_port()
    args = [
        "-m", "proxy", "serve", "--upstream", f"http://127.0.0.1:{model_port}", "--host", "127.0.0.1", "--port", str(port),
        "--metrics-port", str(metrics_port), "--endpoint-name", "test-endpoint", "--workers", "2",
        "--model-command", model_command(model_port, 1.0),
    ]
    running = start(args, metrics_port, tmp_path / "proxy.log")
    proxy = Proxy(running.proc, port, running.log, metrics_port)
    try:
        wait_for_port(port, proxy.proc)
        assert httpx.post(f"{proxy.url}/invocations", json=IRIS).status_code == 503
        wait_ready(proxy)
        deadline = time.monotonic() + 10
        codes: list[int] = []
        while time.monotonic() < deadline:  # each worker opens on its own ping
            codes = [httpx.post(f"{proxy.url}/invocations", json=IRIS, headers={"Connection": "close"}).status_code for _ in range(10)]
            if codes == [200] * 10:
                break
            time.sleep(0.1)
        assert codes == [200] * 10
        assert proxy.value("sagemaker_model_setup_seconds") >= 1.0
        model_of(proxy).kill()
        assert proxy.proc.wait(20) == 128 + signal.SIGKILL, proxy.log.read_text()
    finally:
        proxy.stop()
        if proxy.proc.poll() is None:
            proxy.proc.kill()


def test_a_blank_model_command_is_refused_at_start() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--upstream", "http://127.0.0.1:9", "--endpoint-name", "e", "--model-command", " "],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "--model-command" in result.stderr and "empty" in result.stderr


@pytest.mark.e2e
def test_a_command_with_quoted_variables_is_still_the_model_itself(proxy_with_model: Callable[..., tuple[Proxy, int]], tmp_path: Path) -> None:
    """`NAME="a b" serve ...` runs as `NAME="a b" exec serve ...`: the child is the model, which stops cleanly."""
    port, metrics_port, model_port = free_port(), free_port(), free_port()
    command = f'GREETING="hello there" {sys.executable} -m example_model --host 127.0.0.1 --port {model_port} --log-level info'
    args = [
        "-m", "proxy", "serve", "--upstream", f"http://127.0.0.1:{model_port}", "--host", "127.0.0.1", "--port", str(port),
        "--metrics-port", str(metrics_port), "--endpoint-name", "test-endpoint", "--admin-linger", "0", "--model-command", command,
    ]
    running = start(args, metrics_port, tmp_path / "quoted.log")
    proxy = Proxy(running.proc, port, running.log, metrics_port)
    try:
        wait_ready(proxy)
        model = model_of(proxy)
        assert model.pid in {c.pid for c in psutil.Process(proxy.proc.pid).children()}  # exec'd: no shell between
        assert model.environ().get("GREETING") == "hello there"
        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.proc.wait(15) == 0
        assert f"Finished server process [{model.pid}]" in proxy.log.read_text()
    finally:
        proxy.stop()


@pytest.mark.e2e
def test_a_model_that_crashes_while_starting_gives_its_own_exit_status(proxy_with_model: Callable[..., tuple[Proxy, int]], tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    args = [
        "-m", "proxy", "serve", "--upstream", f"http://127.0.0.1:{free_port()}", "--host", "127.0.0.1", "--port", str(port),
        "--metrics-port", str(metrics_port), "--endpoint-name", "test-endpoint", "--admin-linger", "0",
        "--model-command", f"{sys.executable} -c 'import sys; sys.exit(3)'",
    ]
    running = start(args, metrics_port, tmp_path / "crash.log")
    assert running.proc.wait(15) == 3, running.log.read_text()
    assert "exited while starting (exit code 3)" in running.log.read_text()
