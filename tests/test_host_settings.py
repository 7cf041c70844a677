"""The instance-metric flags of ``serve``, and the settings of ``monitor`` with SageMaker's training environment."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest

from proxy.cli import build_parser
from proxy.settings import MONITOR_OPTIONS, ConfigError, MonitorSettings, SamplingOptions, resolve, resolve_monitor

SERVE = ["serve", "--upstream", "http://127.0.0.1:8081", "--endpoint-name", "my-endpoint"]


def monitor(*flags: str, environ: Mapping[str, str] | None = None, resource_config: Path = Path("/nonexistent")) -> MonitorSettings:
    return resolve_monitor(build_parser().parse_args(["monitor", *flags]), environ or {}, resource_config)


def monitor_error(*flags: str, environ: Mapping[str, str] | None = None, resource_config: Path = Path("/nonexistent")) -> str:
    with pytest.raises(ConfigError) as info:
        monitor(*flags, environ=environ, resource_config=resource_config)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_serve_defaults_sample_every_10_s_and_watch_only_its_own_cgroup() -> None:
    s = resolve(build_parser().parse_args(SERVE), {})
    assert (s.sampling.interval, s.sampling.watch_cgroups, s.sampling.model_dir, s.instance_id) == (10.0, (), "/opt/ml/model", None)


def test_serve_flags_and_environment() -> None:
    s = resolve(
        build_parser().parse_args([*SERVE, "--sample-interval", "2.5", "--watch-cgroup", "/docker/abc", "--watch-cgroup", "/docker/def/",
                                   "--model-dir", "/models", "--instance-id", "i-0123456789abcdef0"]),
        {},
    )
    assert (s.sampling.interval, s.sampling.watch_cgroups, s.sampling.model_dir, s.instance_id) == (2.5, ("/docker/abc", "/docker/def"), "/models", "i-0123456789abcdef0")
    environ = {
        "SAGEMAKER_PROXY_SAMPLE_INTERVAL": "0",
        "SAGEMAKER_PROXY_WATCH_CGROUP": "/a,/b",
        "SAGEMAKER_PROXY_MODEL_DIR": "/m",
        "SAGEMAKER_PROXY_INSTANCE_ID": "pod-7",
    }
    s = resolve(build_parser().parse_args(SERVE), environ)
    assert (s.sampling.interval, s.sampling.watch_cgroups, s.sampling.model_dir, s.instance_id) == (0.0, ("/a", "/b"), "/m", "pod-7")


@pytest.mark.parametrize(
    ("flags", "flag"),
    [
        (["--sample-interval", "0.01"], "--sample-interval"),
        (["--sample-interval", "-1"], "--sample-interval"),
        (["--sample-interval", "often"], "--sample-interval"),
        (["--sample-interval", "7200"], "--sample-interval"),
        (["--watch-cgroup", "docker/abc"], "--watch-cgroup"),
        (["--watch-cgroup", "/docker/../etc"], "--watch-cgroup"),
        (["--model-dir", "models"], "--model-dir"),
        (["--instance-id", "has space"], "--instance-id"),
        (["--instance-id=-leading"], "--instance-id"),
    ],
)
def test_bad_serve_values_name_the_flag(flags: list[str], flag: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve(build_parser().parse_args([*SERVE, *flags]), {})
    assert str(info.value).startswith(f"{flag}: ")


def test_monitor_from_flags() -> None:
    s = monitor("--training-job", "my-job", "--host-index", "3", "--metrics-port", "9100", "--sample-interval", "1")
    assert s == MonitorSettings(training_job="my-job", host_index=3, metrics_port=9100, sampling=SamplingOptions(interval=1.0))


def test_monitor_defaults_come_from_the_sagemaker_training_environment(tmp_path: Path) -> None:
    config = tmp_path / "resourceconfig.json"
    config.write_text(json.dumps({"current_host": "algo-2", "hosts": ["algo-1", "algo-2"], "network_interface_name": "eth0"}))
    s = monitor(environ={"TRAINING_JOB_NAME": "xgboost-2024-01-01"}, resource_config=config)
    assert (s.training_job, s.host_index) == ("xgboost-2024-01-01", 2)
    # Flags and our own variables still win.
    s = monitor("--host-index", "1", environ={"TRAINING_JOB_NAME": "a", "SAGEMAKER_PROXY_TRAINING_JOB": "b"}, resource_config=config)
    assert (s.training_job, s.host_index) == ("b", 1)


def test_monitor_outside_sagemaker_is_host_1() -> None:
    assert monitor("--training-job", "local-job").host_index == 1


def test_monitor_needs_a_training_job() -> None:
    assert monitor_error() == "--training-job is required (or set SAGEMAKER_PROXY_TRAINING_JOB, or TRAINING_JOB_NAME as SageMaker does)"


def test_monitor_refuses_bad_values() -> None:
    assert monitor_error("--training-job", "bad_name!").startswith("--training-job: ")
    assert monitor_error("--training-job", "j", "--host-index", "0").startswith("--host-index: ")
    assert monitor_error("--training-job", "j", "--sample-interval", "0").startswith("--sample-interval: ")


def test_a_bad_resource_config_is_named(tmp_path: Path) -> None:
    config = tmp_path / "resourceconfig.json"
    config.write_text(json.dumps({"current_host": "worker-a"}))
    assert monitor_error("--training-job", "j", resource_config=config).startswith(f"current_host of {config}: ")
    config.write_text("{not json")
    assert monitor_error("--training-job", "j", resource_config=config).startswith(f"{config} is not readable JSON")


def test_every_monitor_option_has_its_env_var() -> None:
    assert all(o.env == "SAGEMAKER_PROXY_" + o.flag.removeprefix("--").replace("-", "_").upper() for o in MONITOR_OPTIONS)
