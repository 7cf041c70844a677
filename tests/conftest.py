"""Shared helpers: free ports, real processes on loopback, and reading /metrics."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent


def pytest_report_header() -> str:
    """Which build the suite runs on: compiled (mypyc) or pure Python (``make compiled``, ``make pure``)."""
    from proxy.process.build import describe

    return describe()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port} after {timeout} s")


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(args: list[str], port: int, log: Path, wait_port: int | None = None) -> Running:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    running = Running(proc, port, log)
    try:
        wait_for_port(wait_port or port, proc)
    except Exception:
        running.stop()
        raise RuntimeError(f"{args} failed to start:\n{log.read_text()}") from None
    return running


@dataclass
class Proxy(Running):
    metrics_port: int = 0

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def samples(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        text = httpx.get(f"{self.metrics_url}/metrics").text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out

    def value(self, name: str, **labels: str) -> float:
        """One sample of this proxy's variant; 0 when absent would hide bugs, so absent raises."""
        want = {"endpoint_name": "test-endpoint", "variant_name": "AllTraffic", **labels}
        return self.samples()[(name, frozenset(want.items()))]


@pytest.fixture
def prometheus_binary() -> str:
    """Debian's prometheus server: skipped with the reason where it is missing, a failure under CI=true."""
    path = shutil.which("prometheus")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("prometheus is missing; .ci/run installs Debian's prometheus package")
        pytest.skip("prometheus is not installed (Debian: apt-get install prometheus)")
    return path


AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def start_moto(port: int, log: Path) -> Running:
    """moto's server mode: the CloudWatch and SageMaker APIs over real HTTP on loopback."""
    return start(["-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port, log)


@pytest.fixture
def moto(tmp_path: Path) -> Iterator[Running]:
    running = start_moto(free_port(), tmp_path / "moto.log")
    yield running
    running.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials and a region for boto3 here and in the processes the test starts."""
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)


def _model_process(tmp_path_factory: pytest.TempPathFactory, name: str, args: list[str]) -> Iterator[Running]:
    """A model server started with ``args`` on a free port (given as ``--port``), its log in a temporary directory."""
    port = free_port()
    log = tmp_path_factory.mktemp(name) / f"{name}.log"
    running = start([*args, "--port", str(port)], port, log)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """The example model with its test knobs switched on."""
    yield from _model_process(tmp_path_factory, "model", ["-m", "example_model", "--host", "127.0.0.1", "--test-knobs"])


@pytest.fixture(scope="session")
def faulty_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    yield from _model_process(tmp_path_factory, "faulty", [str(ROOT / "tests" / "faulty_model.py")])


@pytest.fixture(scope="module")
def recording_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """tests/recording_model.py: a model that records every request it receives (``GET /__received``)."""
    yield from _model_process(tmp_path_factory, "recording_model", [str(ROOT / "tests" / "recording_model.py")])


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    """Start the real proxy as a process: ``start_proxy(upstream_url or None, "--flag", "value", ...)``."""
    started: list[Proxy] = []

    def _start(upstream: str | None, *flags: str) -> Proxy:
        port, metrics_port = free_port(), free_port()
        log = tmp_path / f"proxy-{len(started)}.log"
        args = [
            "-m", "proxy", "serve", *(("--upstream", upstream) if upstream else ()), "--host", "127.0.0.1",
            "--port", str(port), "--metrics-port", str(metrics_port), *(() if "--config" in flags else ("--endpoint-name", "test-endpoint")),
            "--log-level", "warning", "--admin-linger", "0", *flags,  # a stop need not wait for a last scrape here
        ]
        running = start(args, port, log, wait_port=metrics_port)
        wait_for_port(port, running.proc)
        proxy = Proxy(running.proc, port, log, metrics_port)
        started.append(proxy)
        return proxy

    yield _start
    for proxy in started:
        proxy.stop()
