"""Settings for several model instances, live counts and production variants."""

from __future__ import annotations

import pytest

from proxy.cli import build_parser
from proxy.settings import ConfigError, CountSource, Settings, VariantConfig, resolve


def settings(*flags: str, environ: dict[str, str] | None = None) -> Settings:
    return resolve(build_parser().parse_args(["serve", "--endpoint-name", "ep", *flags]), environ or {})


def test_several_upstreams_by_repeating_or_a_comma_list() -> None:
    repeated = settings("--upstream", "http://a:1", "--upstream", "http://b:2")
    listed = settings("--upstream", "http://a:1,http://b:2")
    from_env = settings(environ={"SAGEMAKER_PROXY_UPSTREAM": "http://a:1,http://b:2"})
    for s in (repeated, listed, from_env):
        assert s.variants == (VariantConfig("AllTraffic", ("http://a:1", "http://b:2")),)
        assert s.variants[0].upstreams[0] == "http://a:1"


def test_variants_with_weights_from_flags_and_environment() -> None:
    expected = (VariantConfig("Blue", ("http://a:1", "http://b:2"), 3.0), VariantConfig("Green", ("http://c:3",), 1.0))
    s = settings("--variant", "Blue=http://a:1,http://b:2:3", "--variant", "Green=http://c:3:1")
    assert s.variants == expected and s.variants[0].name == "Blue"
    s = settings(environ={"SAGEMAKER_PROXY_VARIANT": "Blue=http://a:1,http://b:2:3 Green=http://c:3:1"})
    assert s.variants == expected


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--variant", "Blue=http://a:1"], "--variant: must be NAME=URL[,URL...]:WEIGHT with each URL as http://host:port"),
        (["--variant", "Blue=http://a:1:x"], "--variant: must end in :WEIGHT"),
        (["--variant", "Blue"], "--variant: must be NAME=URL[,URL...]:WEIGHT"),
        (["--variant", "Blue=http://a:1:0"], "--variant: needs a positive weight"),
        (["--variant", "bad_name=http://a:1:1"], "--variant: must be 1-63 letters"),
        (["--variant", "Blue=ftp://a:1:1"], "--variant: must be an http:// URL"),
        (["--variant", "Blue=http://a:1:1", "--variant", "Blue=http://b:1:1"], "--variant: each variant needs its own name"),
        (["--variant", "Blue=http://a:1:1", "--upstream", "http://b:1"], "--upstream and --variant exclude each other"),
        ([], "--upstream is required (or set SAGEMAKER_PROXY_UPSTREAM), or give --variant"),
        (["--upstream", "http://a:1", "--instance-count-from", "zookeeper"], "--instance-count-from: must be static, upstreams"),
        (["--upstream", "http://a:1", "--instance-count-from", "file:"], "--instance-count-from: must be static, upstreams"),
        (["--upstream", "http://a:1", "--unhealthy-threshold", "0"], "--unhealthy-threshold: must be between 1 and 100"),
        (["--upstream", "http://a:1", "--health-check-interval", "-1"], "--health-check-interval: must be a positive number"),
    ],
)
def test_bad_values_name_the_flag(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        settings(*flags)
    assert str(raised.value).startswith(message), raised.value
    assert "\n" not in str(raised.value)


def test_count_sources_and_health_check_defaults() -> None:
    s = settings("--upstream", "http://a:1", "--instance-count-from", "dns:model.default.svc")
    assert s.instance_count_from == CountSource("dns", "model.default.svc")
    assert (s.health_check_interval, s.health_check_timeout, s.unhealthy_threshold, s.healthy_threshold) == (2.0, 2.0, 2, 1)
    assert s.instance_count_interval == 10.0
