"""Settings from flags and environment (unit), and the command line as a real process (e2e)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping

import pytest

from metrics.definitions import DEFAULT_MODEL_LATENCY_BUCKETS, DEFAULT_OVERHEAD_LATENCY_BUCKETS
from proxy.cli import PROG, build_parser
from proxy.settings import MONITOR_OPTIONS, SERVE_OPTIONS, ConfigError, Option, Settings, flag_table, resolve
from tests.conftest import ROOT, free_port

REQUIRED_FLAGS = ["--upstream", "http://127.0.0.1:8081", "--endpoint-name", "my-endpoint"]
ERROR_PREFIX = f"{PROG}: error:"


def settings(*flags: str, environ: Mapping[str, str] | None = None, required: bool = True) -> Settings:
    argv = ["serve", *(REQUIRED_FLAGS if required else []), *flags]
    return resolve(build_parser().parse_args(argv), environ or {})


def config_error(*flags: str, environ: Mapping[str, str] | None = None, required: bool = True) -> str:
    with pytest.raises(ConfigError) as info:
        settings(*flags, environ=environ, required=required)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message, repr(message)
    return message


# -- resolve: defaults, flags, environment ------------------------------------------------------------------


def test_defaults() -> None:
    s = settings()
    assert s.variants[0].upstreams[0] == "http://127.0.0.1:8081"
    assert s.endpoint_name == "my-endpoint"
    assert s.host == "0.0.0.0"
    assert s.port == 8080
    assert s.metrics_port == 9090
    assert s.variant_name == "AllTraffic"
    assert s.instance_count == 1
    assert s.invocation_routes == frozenset({("POST", "/invocations")})
    assert s.max_payload_bytes == 6291456
    assert s.invocation_timeout == 60.0
    assert s.ping_path == "/ping"
    assert s.log_level == "info"
    assert s.model_latency_buckets == DEFAULT_MODEL_LATENCY_BUCKETS
    assert s.model_latency_buckets[-1] >= 600  # LLM calls: up to 10 minutes
    assert s.overhead_latency_buckets == DEFAULT_OVERHEAD_LATENCY_BUCKETS
    assert s.record_metrics is True


def test_every_flag() -> None:
    s = settings(
        "--variant-name", "Blue-2",
        "--host", "127.0.0.1",
        "--port", "18080",
        "--metrics-port", "19090",
        "--instance-count", "4",
        "--invocation-route", "POST /predict",
        "--invocation-route", "post /v1/chat/completions",
        "--max-payload-bytes", "1024",
        "--invocation-timeout", "2.5",
        "--ping-path", "/health",
        "--model-latency-buckets", "10,100,1000",
        "--overhead-latency-buckets", "1, 2.5 ,5",
        "--log-level", "DEBUG",
        "--no-record-metrics",
    )
    assert s == Settings(
        upstream=("http://127.0.0.1:8081",),
        endpoint_name="my-endpoint",
        variant_name="Blue-2",
        host="127.0.0.1",
        port=18080,
        metrics_port=19090,
        instance_count=4,
        invocation_routes=frozenset({("POST", "/predict"), ("POST", "/v1/chat/completions")}),
        max_payload_bytes=1024,
        invocation_timeout=2.5,
        ping_path="/health",
        model_latency_buckets=(10.0, 100.0, 1000.0),
        overhead_latency_buckets=(1.0, 2.5, 5.0),
        log_level="debug",
        record_metrics=False,
    )


def test_upstream_trailing_slash_is_dropped() -> None:
    assert settings("--upstream", "http://model:8080/", required=False, environ={"SAGEMAKER_PROXY_ENDPOINT_NAME": "e"}).variants[0].upstreams[0] == (
        "http://model:8080"
    )


def test_environment_used_when_flag_absent() -> None:
    environ = {
        "SAGEMAKER_PROXY_UPSTREAM": "http://model:9000",
        "SAGEMAKER_PROXY_ENDPOINT_NAME": "env-endpoint",
        "SAGEMAKER_PROXY_VARIANT_NAME": "Canary",
        "SAGEMAKER_PROXY_HOST": "127.0.0.2",
        "SAGEMAKER_PROXY_PORT": "7000",
        "SAGEMAKER_PROXY_METRICS_PORT": "7001",
        "SAGEMAKER_PROXY_INSTANCE_COUNT": "3",
        "SAGEMAKER_PROXY_MAX_PAYLOAD_BYTES": "2048",
        "SAGEMAKER_PROXY_INVOCATION_TIMEOUT": "0.5",
        "SAGEMAKER_PROXY_PING_PATH": "/healthz",
        "SAGEMAKER_PROXY_MODEL_LATENCY_BUCKETS": "5,50",
        "SAGEMAKER_PROXY_OVERHEAD_LATENCY_BUCKETS": "1,2",
        "SAGEMAKER_PROXY_LOG_LEVEL": "warning",
    }
    s = settings(environ=environ, required=False)
    assert s.variants[0].upstreams[0] == "http://model:9000"
    assert s.endpoint_name == "env-endpoint"
    assert s.variant_name == "Canary"
    assert s.host == "127.0.0.2"
    assert (s.port, s.metrics_port) == (7000, 7001)
    assert s.instance_count == 3
    assert s.max_payload_bytes == 2048
    assert s.invocation_timeout == 0.5
    assert s.ping_path == "/healthz"
    assert s.model_latency_buckets == (5.0, 50.0)
    assert s.overhead_latency_buckets == (1.0, 2.0)
    assert s.log_level == "warning"


def test_every_option_has_its_env_var() -> None:
    assert {o.env for o in SERVE_OPTIONS} == {
        "SAGEMAKER_PROXY_" + o.flag.removeprefix("--").replace("-", "_").upper() for o in SERVE_OPTIONS
    }


def test_flag_wins_over_environment() -> None:
    environ = {
        "SAGEMAKER_PROXY_UPSTREAM": "http://env-model:1",
        "SAGEMAKER_PROXY_PORT": "7000",
        "SAGEMAKER_PROXY_INVOCATION_ROUTE": "POST /from-env",
        "SAGEMAKER_PROXY_LOG_LEVEL": "not-a-level",  # never parsed: the flag wins
    }
    s = settings("--port", "7100", "--invocation-route", "PUT /from-flag", "--log-level", "error", environ=environ)
    assert s.variants[0].upstreams[0] == "http://127.0.0.1:8081"
    assert s.port == 7100
    assert s.invocation_routes == frozenset({("PUT", "/from-flag")})
    assert s.log_level == "error"


def test_env_routes_are_a_comma_list() -> None:
    s = settings(environ={"SAGEMAKER_PROXY_INVOCATION_ROUTE": "POST /predict,POST /v1/chat/completions"})
    assert s.invocation_routes == frozenset({("POST", "/predict"), ("POST", "/v1/chat/completions")})


# -- resolve: bad values ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "names"),
    [
        (["--port", "0"], "--port"),
        (["--port", "70000"], "--port"),
        (["--port", "abc"], "--port"),
        (["--metrics-port", "0"], "--metrics-port"),
        (["--metrics-port", "70000"], "--metrics-port"),
        (["--metrics-port", "abc"], "--metrics-port"),
        (["--upstream", "https://127.0.0.1:8081"], "--upstream"),
        (["--upstream", "ftp://127.0.0.1:8081"], "--upstream"),
        (["--upstream", "http://127.0.0.1:8081/model"], "--upstream"),
        (["--upstream", "http://127.0.0.1:99999"], "--upstream"),
        (["--upstream", "127.0.0.1:8081"], "--upstream"),
        (["--endpoint-name", "bad_name!"], "--endpoint-name"),
        (["--endpoint-name", "a" * 64], "--endpoint-name"),
        (["--endpoint-name=-leading-hyphen"], "--endpoint-name"),
        (["--variant-name", "bad_name!"], "--variant-name"),
        (["--instance-count", "0"], "--instance-count"),
        (["--instance-count", "two"], "--instance-count"),
        (["--invocation-route", "/invocations"], "--invocation-route"),
        (["--invocation-route", "FETCH /x"], "--invocation-route"),
        (["--invocation-route", "POST invocations"], "--invocation-route"),
        (["--invocation-timeout=-1"], "--invocation-timeout"),
        (["--invocation-timeout", "0"], "--invocation-timeout"),
        (["--invocation-timeout", "nan"], "--invocation-timeout"),
        (["--invocation-timeout", "inf"], "--invocation-timeout"),
        (["--invocation-timeout", "soon"], "--invocation-timeout"),
        (["--max-payload-bytes", "0"], "--max-payload-bytes"),
        (["--ping-path", "ping"], "--ping-path"),
        (["--model-latency-buckets", "100,50"], "--model-latency-buckets"),
        (["--model-latency-buckets", "100,100"], "--model-latency-buckets"),
        (["--model-latency-buckets=-1,5"], "--model-latency-buckets"),
        (["--model-latency-buckets", "0,5"], "--model-latency-buckets"),
        (["--model-latency-buckets", "a,b"], "--model-latency-buckets"),
        (["--overhead-latency-buckets", "10,5"], "--overhead-latency-buckets"),
        (["--overhead-latency-buckets=-10,5"], "--overhead-latency-buckets"),
        (["--log-level", "verbose"], "--log-level"),
    ],
)
def test_bad_flag_names_the_flag(flags: list[str], names: str) -> None:
    message = config_error(*flags)
    assert message.startswith(f"{names}: "), message


@pytest.mark.parametrize(
    "name",
    [
        "a" + "-" * 62 + "b",  # 64 characters: SageMaker's limit is 63, hyphens included
        "abc\n",  # a trailing newline is not part of a name
    ],
)
def test_endpoint_name_limits_hold_for_every_character(name: str) -> None:
    message = config_error("--endpoint-name", name)
    assert message.startswith("--endpoint-name: "), message


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("SAGEMAKER_PROXY_PORT", "abc"),
        ("SAGEMAKER_PROXY_METRICS_PORT", "70000"),
        ("SAGEMAKER_PROXY_INSTANCE_COUNT", "0"),
        ("SAGEMAKER_PROXY_INVOCATION_ROUTE", "POST /predict,/v1/chat/completions"),
        ("SAGEMAKER_PROXY_INVOCATION_TIMEOUT", "nan"),
        ("SAGEMAKER_PROXY_MODEL_LATENCY_BUCKETS", "5,1"),
        ("SAGEMAKER_PROXY_LOG_LEVEL", "loud"),
        ("SAGEMAKER_PROXY_VARIANT_NAME", "bad_name!"),
    ],
)
def test_bad_env_value_names_the_env_var(env: str, value: str) -> None:
    message = config_error(environ={env: value})
    assert message.startswith(f"{env}: "), message


def test_bad_env_upstream_names_the_env_var() -> None:
    message = config_error("--endpoint-name", "e", environ={"SAGEMAKER_PROXY_UPSTREAM": "https://model:1"}, required=False)
    assert message.startswith("SAGEMAKER_PROXY_UPSTREAM: "), message


def test_same_port_twice() -> None:
    message = config_error("--port", "9000", "--metrics-port", "9000")
    assert "--port" in message and "--metrics-port" in message and "9000" in message


def test_same_port_as_the_default_metrics_port() -> None:
    message = config_error("--port", "9090")
    assert "--port" in message and "--metrics-port" in message


@pytest.mark.parametrize(
    ("flags", "missing"),
    [
        (["--endpoint-name", "e"], "--upstream"),
        (["--upstream", "http://127.0.0.1:8081"], "--endpoint-name"),
    ],
)
def test_missing_required(flags: list[str], missing: str) -> None:
    message = config_error(*flags, required=False)
    assert message.startswith(f"{missing} is required"), message
    env = "SAGEMAKER_PROXY_" + missing.removeprefix("--").replace("-", "_").upper()
    assert env in message


def test_every_missing_required_flag_is_named_at_once() -> None:
    assert config_error(required=False) == (
        "--endpoint-name is required (or set SAGEMAKER_PROXY_ENDPOINT_NAME); "
        "--upstream is required (or set SAGEMAKER_PROXY_UPSTREAM), or give --variant"
    )


@pytest.mark.parametrize(("command", "options"), [("serve", SERVE_OPTIONS), ("monitor", MONITOR_OPTIONS)])
def test_readme_flag_tables_are_the_options(command: str, options: tuple[Option, ...]) -> None:
    """The README's tables of flags are made from the settings fields' declarations (flag, environment
    variable, default, help): ``python -m proxy.settings README.md`` rewrites them after a change."""
    readme = (ROOT / "README.md").read_text()
    begin, end = f"<!-- flags: {command} -->\n", f"\n<!-- /flags: {command} -->"  # as update_readme writes them
    assert begin in readme and end in readme, f"README.md has no {command} flag table"
    table = readme.split(begin, 1)[1].split(end, 1)[0]
    assert table == flag_table(options), "README.md's flag table is out of date: run python -m proxy.settings README.md"
    # And --help says the same: every flag, its environment variable and its default.
    help_text = "".join(run_cli(command, "--help").stdout.split())  # argparse wraps lines, and long words too
    for o in options:
        assert o.flag in help_text and o.env in help_text, o.flag
        if o.default is not None:
            assert "(default" + "".join(o.default.split()) + ")" in help_text, o.flag


# -- the command line as a real process ---------------------------------------------------------------------


def run_cli(*args: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    # COLUMNS fixed so --help wraps the same everywhere; no SAGEMAKER_PROXY_* from the caller's shell.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGEMAKER_PROXY_")}
    env.update(COLUMNS="80", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def assert_one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(ERROR_PREFIX), lines[0]
    assert result.stdout == ""
    return lines[0]


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--upstream", "https://127.0.0.1:1"], "--upstream"),
        (["--upstream", "http://127.0.0.1:1/model"], "--upstream"),
        (["--endpoint-name", "bad_name!"], "--endpoint-name"),
        (["--instance-count", "0"], "--instance-count"),
        (["--invocation-route", "FETCH /x"], "--invocation-route"),
        (["--invocation-timeout", "nan"], "--invocation-timeout"),
        (["--model-latency-buckets", "5,1"], "--model-latency-buckets"),
        (["--log-level", "loud"], "--log-level"),
        (["--unknown-flag", "1"], "--unknown-flag"),
    ],
)
def test_cli_bad_value_exits_2_with_one_line_before_listening(flags: list[str], named: str) -> None:
    port, metrics_port = free_port(), free_port()
    base = ["--upstream", "http://127.0.0.1:1", "--endpoint-name", "e", "--host", "127.0.0.1"]
    result = run_cli("serve", *base, "--port", str(port), "--metrics-port", str(metrics_port), *flags)
    line = assert_one_error_line(result)
    assert named in line
    assert port_is_free(port) and port_is_free(metrics_port)


@pytest.mark.e2e
def test_cli_bad_port_exits_2() -> None:
    line = assert_one_error_line(run_cli("serve", "--upstream", "http://127.0.0.1:1", "--endpoint-name", "e", "--port", "70000"))
    assert "--port" in line


@pytest.mark.e2e
def test_cli_same_port_twice_exits_2() -> None:
    port = free_port()
    result = run_cli(
        "serve", "--upstream", "http://127.0.0.1:1", "--endpoint-name", "e", "--host", "127.0.0.1",
        "--port", str(port), "--metrics-port", str(port),
    )
    line = assert_one_error_line(result)
    assert "--metrics-port" in line
    assert port_is_free(port)


@pytest.mark.e2e
def test_cli_missing_upstream_exits_2() -> None:
    line = assert_one_error_line(run_cli("serve", "--endpoint-name", "e"))
    assert "--upstream" in line and "SAGEMAKER_PROXY_UPSTREAM" in line


@pytest.mark.e2e
@pytest.mark.parametrize("server", ["builtin", "uvicorn"])
@pytest.mark.parametrize("taken", ["--port", "--metrics-port"])
def test_cli_port_already_taken_exits_2_naming_the_flag(taken: str, server: str) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        busy = blocker.getsockname()[1]
        other = free_port()
        port, metrics_port = (busy, other) if taken == "--port" else (other, busy)
        result = run_cli(
            "serve", "--upstream", "http://127.0.0.1:1", "--endpoint-name", "e", "--host", "127.0.0.1",
            "--port", str(port), "--metrics-port", str(metrics_port), "--http-server", server,
        )
        line = assert_one_error_line(result)
        assert line == (
            f"{ERROR_PREFIX} {taken}: cannot listen on 127.0.0.1:{busy}: Address already in use; "
            f"another process has that port: stop it or give another {taken}"
        ), line
        assert port_is_free(other)


@pytest.mark.e2e
def test_cli_without_a_command_exits_2_with_the_usage() -> None:
    result = run_cli()
    assert result.returncode == 2 and result.stdout == ""
    usage, error = result.stderr.splitlines()  # the usage, then one error line (tests/test_newcomer.py reads them)
    assert usage.startswith("usage: ") and error.startswith(ERROR_PREFIX)


@pytest.mark.e2e
def test_cli_serve_help_lists_env_vars() -> None:
    result = run_cli("serve", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    for option in SERVE_OPTIONS:
        assert option.flag in result.stdout
        assert option.env in result.stdout, option.env
    assert "--no-record-metrics" not in result.stdout


@pytest.mark.parametrize(
    ("host", "upstream"),
    [
        ("0.0.0.0", "http://127.0.0.1:8080"),
        ("0.0.0.0", "http://localhost:8080"),
        ("127.0.0.1", "http://127.0.0.1:8080"),
        ("0.0.0.0", "http://127.0.0.1:9090"),  # the admin port is no model either
        ("10.1.2.3", "http://10.1.2.3:8080"),
        ("0.0.0.0", "http://127.0.0.2:8080"),  # all of 127.0.0.0/8 is this host
    ],
)
def test_an_upstream_that_is_the_proxy_itself_is_refused(host: str, upstream: str) -> None:
    message = config_error("--host", host, "--port", "8080", "--metrics-port", "9090", "--upstream", upstream, "--endpoint-name", "e", required=False)
    assert upstream in message and "own port" in message


def test_the_same_port_on_another_host_is_a_model() -> None:
    s = settings("--host", "127.0.0.1", "--port", "8080", "--upstream", "http://10.1.2.3:8080", "--endpoint-name", "e", required=False)
    assert s.upstream == ("http://10.1.2.3:8080",)


@pytest.mark.e2e
def test_cli_refuses_its_own_port_as_upstream_before_listening() -> None:
    port, metrics_port = free_port(), free_port()
    result = run_cli("serve", "--upstream", f"http://127.0.0.1:{port}", "--endpoint-name", "e", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port))
    assert "own port" in assert_one_error_line(result)
    assert port_is_free(port) and port_is_free(metrics_port)
