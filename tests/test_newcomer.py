"""What a newcomer meets first: the README's commands as written, the messages of a wrong start, and the log."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import time
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import ROOT, Proxy, free_port, start, wait_for_port
from tests.test_settings import run_cli

README = ROOT / "README.md"


def test_no_command_shows_the_usage_and_the_commands() -> None:
    result = run_cli()
    assert result.returncode == 2
    usage, error = result.stderr.splitlines()
    assert usage.startswith("usage: sagemaker-metrics-proxy")
    assert error == "sagemaker-metrics-proxy: error: give a command: serve, monitor or demo (see sagemaker-metrics-proxy --help)"


def test_every_missing_flag_in_one_line_with_a_pointer_to_help() -> None:
    result = run_cli("serve")
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert "--endpoint-name is required" in line and "--upstream is required" in line
    assert line.endswith("(see sagemaker-metrics-proxy serve --help)")


def test_an_upstream_without_a_port_is_refused() -> None:
    result = run_cli("serve", "--upstream", "http://127.0.0.1", "--endpoint-name", "e")
    assert result.returncode == 2
    assert result.stderr.strip() == "sagemaker-metrics-proxy: error: --upstream: must name its port, http://host:port, got 'http://127.0.0.1'"


@pytest.mark.parametrize(
    "flags",
    [
        ["--upstream", "https://127.0.0.1:8443"],
        ["--variant", "Blue=https://127.0.0.1:8443:1"],
    ],
)
def test_an_https_upstream_is_refused_saying_that_tls_to_the_model_is_not_supported(flags: list[str]) -> None:
    result = run_cli("serve", "--endpoint-name", "e", *flags)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line == (
        f"sagemaker-metrics-proxy: error: {flags[0]}: TLS to the model is not supported: the proxy speaks plain HTTP to it, "
        f"as a sidecar on loopback or a private network; give http://host:port, got 'https://127.0.0.1:8443'"
    ), line


def test_an_https_instance_in_the_config_file_says_the_same(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "endpoints.toml"
    config.write_text('[[Endpoints]]\nEndpointName = "e"\n[[Endpoints.ProductionVariants]]\nVariantName = "v"\nInstances = ["https://model:8443"]\n')
    result = run_cli("serve", "--config", str(config))
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert "Endpoints[0].ProductionVariants[0].Instances TLS to the model is not supported" in line, line


def run_without_a_region(*args: str, **environ: str) -> subprocess.CompletedProcess[str]:
    """The CLI with no AWS region anywhere: no AWS_* variable from the caller's shell, no AWS config file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGEMAKER_PROXY_", "AWS_"))}
    env.update(AWS_CONFIG_FILE="/nonexistent/aws-config", AWS_SHARED_CREDENTIALS_FILE="/nonexistent/aws-credentials", **environ)
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("args", "environ", "needed_by"),
    [
        (["serve", "--cloudwatch"], {}, "--cloudwatch"),
        (["serve", "--cloudwatch"], {"AWS_REGION": "us-east-1"}, "--cloudwatch"),  # botocore reads no AWS_REGION
        (["serve", "--instance-count-from", "sagemaker"], {}, "--instance-count-from sagemaker"),
        (["monitor", "--training-job", "j", "--cloudwatch"], {}, "--cloudwatch"),
    ],
)
def test_cloudwatch_without_a_region_exits_2_at_start_naming_the_flag_and_the_variable(
    args: list[str], environ: dict[str, str], needed_by: str
) -> None:
    port, metrics_port = free_port(), free_port()
    ports = ["--port", str(port)] if args[0] == "serve" else []
    serve = ["--upstream", "http://127.0.0.1:1", "--endpoint-name", "e"] if args[0] == "serve" else []
    result = run_without_a_region(*args, *serve, "--host", "127.0.0.1", *ports, "--metrics-port", str(metrics_port), **environ)
    assert result.returncode == 2, (result.returncode, result.stderr)
    [line] = result.stderr.splitlines()
    assert line == (
        f"sagemaker-metrics-proxy: error: {needed_by} needs an AWS region: give --cloudwatch-region (such as us-east-1), "
        "or set AWS_DEFAULT_REGION or region in the AWS config file (boto3 does not read AWS_REGION)"
    ), line


@pytest.mark.e2e
@pytest.mark.parametrize("region", [["--cloudwatch-region", "us-east-1"], []])
def test_cloudwatch_with_a_region_from_the_flag_or_aws_default_region_starts(region: list[str]) -> None:
    port, metrics_port = free_port(), free_port()
    environ = {} if region else {"AWS_DEFAULT_REGION": "us-east-1"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGEMAKER_PROXY_", "AWS_"))}
    env.update(AWS_CONFIG_FILE="/nonexistent/aws-config", AWS_ACCESS_KEY_ID="any", AWS_SECRET_ACCESS_KEY="any", **environ)
    command = [
        sys.executable, "-m", "proxy", "serve", "--upstream", "http://127.0.0.1:1", "--endpoint-name", "e", "--host", "127.0.0.1",
        "--port", str(port), "--metrics-port", str(metrics_port), "--cloudwatch", "--cloudwatch-endpoint-url", "http://127.0.0.1:1",
        "--cloudwatch-flush-timeout", "1", "--admin-linger", "0", *region,
    ]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(metrics_port, proc)
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert "needs an AWS region" not in stderr


@pytest.mark.e2e
def test_an_unreachable_model_is_one_warning_and_its_return_one_more(start_proxy: Callable[..., Proxy], tmp_path: os.PathLike[str]) -> None:
    port = free_port()
    proxy = start_proxy(f"http://127.0.0.1:{port}")
    for _ in range(100):
        assert httpx.post(f"{proxy.url}/invocations", content=b"{}").status_code == 502
    model = start(["-m", "example_model", "--host", "127.0.0.1", "--port", str(port)], port, proxy.log.parent / "model.log")
    try:
        assert httpx.post(f"{proxy.url}/invocations", json={"instances": [[5.1, 3.5, 1.4, 0.2]]}).status_code == 200
        for _ in range(10):
            assert httpx.post(f"{proxy.url}/invocations", json={"instances": [[5.1, 3.5, 1.4, 0.2]]}).status_code == 200
    finally:
        model.stop()
    log = proxy.log.read_text()
    assert log.count("is unreachable") == 1, log
    assert log.count("answers again") == 1, log
    assert proxy.value("sagemaker_proxy_upstream_errors_total", reason="connect_failed") == 100


@pytest.mark.e2e
@pytest.mark.parametrize("workers", [[], ["--workers", "2"]])
def test_a_model_down_at_start_is_one_warning_at_start_naming_it(start_proxy: Callable[..., Proxy], workers: list[str]) -> None:
    down = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    # Two instances, health-checked every 0.2 s: the checks go on failing, the warning is said once.
    proxy = start_proxy(",".join(down), "--instance-count-from", "upstreams", "--health-check-interval", "0.2", *workers)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proxy.log.read_text().count(" is out (") < 2:  # each failed its checks
        time.sleep(0.2)
    time.sleep(1)  # five more failed checks of each
    log = proxy.log.read_text()
    for url in down:
        said = [line for line in log.splitlines() if f"listens at {url} " in line]
        assert len(said) == 1, log
        assert said[0].endswith(
            f"WARNING proxy[{proxy.proc.pid}]: the model does not answer GET /ping at start (could not connect to the model at {url}: "
            f"Connection refused; 2 checks 0.2 s apart): check that it runs and listens at {url} (--upstream), and that /ping is its health check "
            "(--ping-path, --model-server); said once"
        ), said[0]


@pytest.mark.e2e
def test_access_log_and_one_line_per_port(model: object, start_proxy: Callable[..., Proxy]) -> None:
    url = model.url  # type: ignore[attr-defined]
    quiet = start_proxy(url, "--log-level", "info")
    assert httpx.post(f"{quiet.url}/invocations", json={"instances": [[5.1, 3.5, 1.4, 0.2]]}).status_code == 200
    time.sleep(0.2)
    log = quiet.log.read_text()
    assert log.count("proxy port: serving on 127.0.0.1:") == 1 and log.count("admin port: serving on 127.0.0.1:") == 1, log
    assert "proxy.access" not in log  # off by default
    logged = start_proxy(url, "--access-log")  # at --log-level warning, the access log still writes
    assert httpx.post(f"{logged.url}/invocations?x=1", json={"instances": [[5.1, 3.5, 1.4, 0.2]]}, headers={"X-Test-Delay-Ms": "20"}).status_code == 200
    assert httpx.post(f"{logged.url}/invocations", json={"instances": [[5.1, 3.5, 1.4, 0.2]]}, headers={"X-Test-Status": "503"}).status_code == 503
    time.sleep(0.2)
    lines = [line for line in logged.log.read_text().splitlines() if "proxy.access" in line]
    assert len(lines) == 2, lines
    fields = re.search(r'proxy\.access\[\d+\]: 127\.0\.0\.1 "POST /invocations" 200 (\d+) model_ms=([\d.]+) overhead_ms=([\d.]+) variant=AllTraffic$', lines[0])
    assert fields is not None, lines[0]
    assert int(fields[1]) > 0 and float(fields[2]) >= 20 and 0 <= float(fields[3]) < 20
    assert ' "POST /invocations" 503 ' in lines[1]
