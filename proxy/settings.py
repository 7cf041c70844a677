"""The one settings object: built from flags and environment once, validated before anything listens.

No other module reads the environment. Each flag ``--some-flag`` can also be set as
``SAGEMAKER_PROXY_SOME_FLAG``; a flag given on the command line wins.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from metrics.definitions import DEFAULT_MODEL_LATENCY_BUCKETS_US, DEFAULT_OVERHEAD_LATENCY_BUCKETS_US

ENV_PREFIX = "SAGEMAKER_PROXY_"
# SageMaker's own rule for endpoint and variant names.
NAME_PATTERN = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
HTTP_SERVERS = ("builtin", "uvicorn")
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
INSTANCE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,254}$")
# Where SageMaker describes a training job's hosts to each of its containers.
RESOURCE_CONFIG = Path("/opt/ml/input/config/resourceconfig.json")


class ConfigError(ValueError):
    """A bad configuration value; the message is one line that names the flag."""


@dataclass(frozen=True)
class VariantSpec:
    """A production variant: its model instances and its share of the traffic."""

    name: str
    upstreams: tuple[str, ...]
    weight: float = 1.0


@dataclass(frozen=True)
class Settings:
    upstream: str  # the first model instance of the first variant
    endpoint_name: str
    host: str = "0.0.0.0"
    port: int = 8080
    metrics_port: int = 9090
    variant_name: str = "AllTraffic"
    instance_count: int = 1
    invocation_routes: frozenset[tuple[str, str]] = frozenset({("POST", "/invocations")})
    max_payload_bytes: int = 6 * 1024 * 1024
    invocation_timeout: float = 60.0
    client_write_timeout: float = 60.0
    upstream_idle_timeout: float = 4.0
    max_concurrency: int = 0  # requests forwarded at once per process; 0: no limit
    ping_path: str = "/ping"
    model_latency_buckets: tuple[float, ...] = DEFAULT_MODEL_LATENCY_BUCKETS_US
    overhead_latency_buckets: tuple[float, ...] = DEFAULT_OVERHEAD_LATENCY_BUCKETS_US
    log_level: str = "info"
    workers: int = 1
    cloudwatch: bool = False
    cloudwatch_namespace: str = "SageMakerProxy"
    cloudwatch_period: int = 60
    cloudwatch_region: str | None = None
    cloudwatch_endpoint_url: str | None = None
    cloudwatch_buffer_periods: int = 120
    cloudwatch_flush_timeout: float = 10.0
    sample_interval: float = 10.0  # seconds between host samples; 0: no instance metrics
    watch_cgroups: tuple[str, ...] = ()
    model_dir: str = "/opt/ml/model"
    instance_id: str | None = None  # None: the hostname
    # Several instances and variants; resolve() always fills variants, one per --variant or else
    # one named --variant-name over the --upstream instances.
    variants: tuple[VariantSpec, ...] = ()
    instance_count_from: str = "static"  # static, upstreams, sagemaker, file:PATH or dns:NAME
    instance_count_interval: float = 10.0
    health_check_interval: float = 2.0
    health_check_timeout: float = 2.0
    unhealthy_threshold: int = 2
    healthy_threshold: int = 1
    sagemaker_endpoint_url: str | None = None
    http_server: str = "builtin"  # the proxy port's server: builtin (proxy/http/server.py) or uvicorn
    request_head_timeout: float = 10.0
    keep_alive_timeout: float = 75.0
    request_body_timeout: float = 60.0
    max_request_head_bytes: int = 64 * 1024
    max_request_headers: int = 100
    max_connections: int = 10_000
    # Benchmark-only: forward without recording metrics, to measure what recording costs.
    record_metrics: bool = field(default=True)


# -- value parsers: each takes the raw string and returns the value or raises ValueError(reason) ----------


def _int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"must be an integer, got {raw!r}") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def _positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"must be a number of seconds, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a positive number of seconds, got {raw!r}")
    return value


def _upstream(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme != "http":
        raise ValueError(f"must be an http:// URL of the model server, got {raw!r}")
    try:
        parts.port  # noqa: B018  # raises on a bad port
    except ValueError:
        raise ValueError(f"has a bad port: {raw!r}") from None
    if not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise ValueError(f"must be http://host:port with no path, got {raw!r}")
    return f"http://{parts.netloc}"


def _upstreams(raw: str) -> list[str]:
    return [_upstream(part.strip()) for part in raw.split(",") if part.strip()] or [_upstream(raw)]


def _variant(raw: str) -> VariantSpec:
    name, eq, rest = raw.partition("=")
    urls, colon, weight = rest.rpartition(":")
    if not eq or not colon:
        raise ValueError(f"must be NAME=URL[,URL...]:WEIGHT, such as Blue=http://127.0.0.1:8081:3, got {raw!r}")
    try:
        share = float(weight)
    except ValueError:
        raise ValueError(f"must end in :WEIGHT, a number, got {raw!r}") from None
    if not math.isfinite(share) or share <= 0:
        raise ValueError(f"needs a positive weight, got {raw!r}")
    upstreams = tuple(_upstreams(urls))
    # Every URL names its port, so "http://host:8081" can never be read as host on port 80, weight 8081.
    if any(urlsplit(u).port is None or u.count(":") < 2 for u in (p.strip() for p in urls.split(","))):
        raise ValueError(f"must be NAME=URL[,URL...]:WEIGHT with each URL as http://host:port, got {raw!r}")
    return VariantSpec(_name(name), upstreams, share)


def _count_source(raw: str) -> str:
    kind, _, arg = raw.partition(":")
    if raw in ("static", "upstreams", "sagemaker") or (kind in ("file", "dns") and arg):
        return raw
    raise ValueError(f"must be static, upstreams, sagemaker, file:PATH or dns:NAME, got {raw!r}")


def _name(raw: str) -> str:
    if len(raw) > 63 or not NAME_PATTERN.fullmatch(raw):
        raise ValueError(f"must be 1-63 letters, digits and hyphens, starting with a letter or digit, got {raw!r}")
    return raw


def _route(raw: str) -> tuple[str, str]:
    method, _, path = raw.strip().partition(" ")
    method, path = method.upper(), path.strip()
    if method not in METHODS or not path.startswith("/") or " " in path:
        raise ValueError(f"must be 'METHOD /path' such as 'POST /invocations', got {raw!r}")
    return method, path


def _buckets(raw: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in raw.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"must be a comma-separated list of microseconds, got {raw!r}") from None
    if not values or any(not math.isfinite(v) or v <= 0 for v in values) or list(values) != sorted(set(values)):
        raise ValueError(f"must be increasing positive microseconds, got {raw!r}")
    return values


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"must be true or false, got {raw!r}")


def _namespace(raw: str) -> str:
    if raw.startswith("AWS/"):
        raise ValueError(f"CloudWatch reserves namespaces starting with 'AWS/' for AWS services, got {raw!r}; use your own, such as SageMakerProxy")
    if not 1 <= len(raw) <= 255 or not re.fullmatch(r"[A-Za-z0-9.\-_/#: ]+", raw) or raw.startswith(":"):
        raise ValueError(f"must be 1-255 letters, digits and . - _ / # : or space, got {raw!r}")
    return raw


def _period(raw: str) -> int:
    if raw.strip() not in ("1", "5", "10", "30", "60"):
        raise ValueError(f"must be 60 (standard resolution) or 1, 5, 10 or 30 (high resolution), got {raw!r}")
    return int(raw)


def _http_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"must be an http:// or https:// URL, got {raw!r}")
    return raw


def _http_server(raw: str) -> str:
    if raw not in HTTP_SERVERS:
        raise ValueError(f"must be one of {', '.join(HTTP_SERVERS)}, got {raw!r}")
    return raw


def _log_level(raw: str) -> str:
    if raw.lower() not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, got {raw!r}")
    return raw.lower()


def _path(raw: str) -> str:
    if not raw.startswith("/"):
        raise ValueError(f"must start with '/', got {raw!r}")
    return raw


def _interval(allow_off: bool) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"must be a number of seconds, got {raw!r}") from None
        if allow_off and value == 0:
            return 0.0
        if not 0.1 <= value <= 3600:
            off = " (0 turns the instance metrics off)" if allow_off else ""
            raise ValueError(f"must be between 0.1 and 3600 seconds{off}, got {raw!r}")
        return value

    return parse


def _cgroup(raw: str) -> str:
    parts = raw.split("/")
    if not raw.startswith("/") or ".." in parts or any(c in raw for c in "\0\n\r"):
        raise ValueError(f"must be a cgroup path as /proc/PID/cgroup shows it, such as /docker/abc, got {raw!r}")
    return raw.rstrip("/") or "/"


def _instance_id(raw: str) -> str:
    if not INSTANCE_ID_PATTERN.fullmatch(raw):
        raise ValueError(f"must be 1-255 letters, digits and . _ : -, starting with a letter or digit, got {raw!r}")
    return raw


def _host_index(raw: str) -> int:
    return _int_between(1, 10_000)(raw.removeprefix("algo-"))


@dataclass(frozen=True)
class Option:
    flag: str
    parse: Callable[[str], Any]
    help: str
    default: str | None = None
    repeatable: bool = False
    env_separator: str = ","  # how a repeatable flag's values are separated in its environment variable
    switch: bool = False  # takes no value on the command line: present means true

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


SERVE_OPTIONS: tuple[Option, ...] = (
    Option("--upstream", _upstreams, "model server to forward to, http://host:port; repeatable or a comma list for several instances (required, unless --variant)", repeatable=True),
    Option("--endpoint-name", _name, "endpoint name for the EndpointName label and dimension (required)"),
    Option("--variant-name", _name, "production variant name", "AllTraffic"),
    Option("--host", str, "address to listen on, for both ports", "0.0.0.0"),
    Option("--port", _int_between(1, 65535), "proxy port, where clients send requests", "8080"),
    Option("--metrics-port", _int_between(1, 65535), "admin port: /metrics, /healthz, /readyz", "9090"),
    Option("--instance-count", _int_between(1, 100_000), "live instances of the variant, the n of InvocationsPerInstance", "1"),
    Option("--invocation-route", _route, "'METHOD /path' that counts as an invocation; repeatable, or a comma list in the environment", "POST /invocations", repeatable=True),
    Option("--max-payload-bytes", _int_between(1, 1 << 40), "largest request body; larger ones get 413", str(6 * 1024 * 1024)),
    Option("--invocation-timeout", _positive_float, "seconds to wait for the model's response head, and between body chunks; then 504", "60"),
    Option("--client-write-timeout", _positive_float, "seconds a response may wait on a client that does not read, without progress; then the connection is closed and the invocation counts as a client disconnect", "60"),
    Option("--upstream-idle-timeout", _positive_float, "seconds a pooled model connection may stay idle and still be reused; below the 5 s keep-alive of uvicorn, gunicorn and most model servers, so the model never closes one as it is reused", "4"),
    Option("--max-concurrency", _int_between(0, 1_000_000), "requests forwarded at once per process before the rest get 503 at once; 0: no limit", "0"),
    Option("--ping-path", _path, "the model's health check path, used by /readyz", "/ping"),
    Option("--model-latency-buckets", _buckets, "ModelLatency histogram buckets, comma-separated microseconds", ",".join(f"{b:.0f}" for b in DEFAULT_MODEL_LATENCY_BUCKETS_US)),
    Option("--overhead-latency-buckets", _buckets, "OverheadLatency histogram buckets, comma-separated microseconds", ",".join(f"{b:.0f}" for b in DEFAULT_OVERHEAD_LATENCY_BUCKETS_US)),
    Option("--variant", _variant, "a production variant NAME=URL[,URL...]:WEIGHT; repeatable, space-separated in the environment; replaces --upstream and --variant-name", repeatable=True, env_separator=" "),
    Option("--instance-count-from", _count_source, "where n of InvocationsPerInstance comes from: static (--instance-count), upstreams (healthy instances), sagemaker (DescribeEndpoint), file:PATH, dns:NAME", "static"),
    Option("--instance-count-interval", _positive_float, "seconds between polls of the sagemaker and dns sources (a file is checked every second)", "10"),
    Option("--health-check-interval", _positive_float, "seconds between pings of each model instance, with several instances or --instance-count-from upstreams", "2"),
    Option("--health-check-timeout", _positive_float, "seconds a ping may take", "2"),
    Option("--unhealthy-threshold", _int_between(1, 100), "failed pings that take an instance out", "2"),
    Option("--healthy-threshold", _int_between(1, 100), "good pings that bring it back", "1"),
    Option("--sagemaker-endpoint-url", _http_url, "SageMaker API endpoint for --instance-count-from sagemaker, for compatible services and tests"),
    Option("--http-server", _http_server, "the proxy port's HTTP/1.1 server: builtin (bounded, faster) or uvicorn (the reference); the limits below are the builtin server's, but for --keep-alive-timeout", "builtin"),
    Option("--request-head-timeout", _positive_float, "seconds for a request head to arrive, from its first byte (for a new connection, from accept); then 408, or a silent close if nothing came", "10"),
    Option("--keep-alive-timeout", _positive_float, "seconds an idle keep-alive connection stays open between requests", "75"),
    Option("--request-body-timeout", _positive_float, "seconds a request body may go without progress; then 408", "60"),
    Option("--max-request-head-bytes", _int_between(1024, 1 << 24), "largest request line and headers together; larger heads get 431", str(64 * 1024)),
    Option("--max-request-headers", _int_between(1, 10_000), "most request headers; more get 431", "100"),
    Option("--max-connections", _int_between(1, 1_000_000), "open client connections per process; new ones past it are closed at once", "10000"),
    Option("--workers", _int_between(1, 64), "worker processes sharing the proxy port; metrics are merged into one set", "1"),
    Option("--cloudwatch", _bool, "publish the metrics to CloudWatch with PutMetricData", "false", switch=True),
    Option("--cloudwatch-namespace", _namespace, "CloudWatch namespace for the invocation metrics; not AWS/...", "SageMakerProxy"),
    Option("--cloudwatch-period", _period, "seconds per statistic set: 60, or 1, 5, 10, 30 for high resolution", "60"),
    Option("--cloudwatch-region", str, "AWS region (default: boto3's chain, e.g. AWS_REGION)"),
    Option("--cloudwatch-endpoint-url", _http_url, "CloudWatch endpoint, for compatible services and tests"),
    Option("--cloudwatch-buffer-periods", _int_between(1, 100_000), "ended periods kept while CloudWatch is unreachable; the oldest are dropped beyond", "120"),
    Option("--cloudwatch-flush-timeout", _positive_float, "seconds allowed at shutdown to publish the last partial period", "10"),
    Option("--sample-interval", _interval(allow_off=True), "seconds between samples of the instance metrics (CPU, memory, GPU, disk); 0: off", "10"),
    Option("--watch-cgroup", _cgroup, "another container's cgroup, as /proc/PID/cgroup shows it, whose CPU and memory add to the instance metrics; repeatable, or a comma list in the environment", repeatable=True),
    Option("--model-dir", _path, "the model's directory: DiskUtilization is of the file system that holds it (or of / while it does not exist)", "/opt/ml/model"),
    Option("--instance-id", _instance_id, "this instance in the Host dimension, [endpoint]/[variant]/[instance-id] (default: the hostname)"),
    Option("--log-level", _log_level, "log level: " + ", ".join(LOG_LEVELS), "info"),
)
REQUIRED = ("endpoint_name", "training_job")
_SHARED = {option.flag: option for option in SERVE_OPTIONS}
MONITOR_OPTIONS: tuple[Option, ...] = (
    Option("--training-job", _name, "the training job's name, for the Host dimension [training-job]/algo-[n] (default: $TRAINING_JOB_NAME)"),
    Option("--host-index", _host_index, "n of algo-n, this host of the job (default: current_host of SageMaker's resourceconfig.json, else 1)"),
    _SHARED["--host"],
    _SHARED["--metrics-port"],
    Option("--sample-interval", _interval(allow_off=False), "seconds between samples of the instance metrics", "10"),
    _SHARED["--watch-cgroup"],
    _SHARED["--model-dir"],
    _SHARED["--cloudwatch"],
    _SHARED["--cloudwatch-period"],
    _SHARED["--cloudwatch-region"],
    _SHARED["--cloudwatch-endpoint-url"],
    _SHARED["--cloudwatch-buffer-periods"],
    _SHARED["--cloudwatch-flush-timeout"],
    _SHARED["--log-level"],
)


@dataclass(frozen=True)
class MonitorSettings:
    """The ``monitor`` command: instance metrics of one host of a training job, with no proxy."""

    training_job: str
    host_index: int = 1
    host: str = "0.0.0.0"
    metrics_port: int = 9090
    sample_interval: float = 10.0
    watch_cgroups: tuple[str, ...] = ()
    model_dir: str = "/opt/ml/model"
    cloudwatch: bool = False
    cloudwatch_period: int = 60
    cloudwatch_region: str | None = None
    cloudwatch_endpoint_url: str | None = None
    cloudwatch_buffer_periods: int = 120
    cloudwatch_flush_timeout: float = 10.0
    log_level: str = "info"


def add_options(parser: argparse.ArgumentParser, options: Sequence[Option], *, benchmark_switch: bool = True) -> None:
    """Declare the flags; values stay raw strings here and are parsed once in ``resolve``."""
    for option in options:
        default_text = f" (default {option.default})" if option.default is not None else ""
        help_text = f"{option.help}{default_text} [env {option.env}]"
        if option.repeatable:
            parser.add_argument(option.flag, dest=option.dest, action="append", help=help_text)
        elif option.switch:
            parser.add_argument(option.flag, dest=option.dest, action="store_const", const="true", help=help_text)
        else:
            parser.add_argument(option.flag, dest=option.dest, help=help_text)
    if benchmark_switch:  # benchmark-only; not part of the user-facing flags
        parser.add_argument("--no-record-metrics", dest="record_metrics", action="store_false", help=argparse.SUPPRESS)


def _values(
    args: argparse.Namespace, environ: Mapping[str, str], options: Sequence[Option], fallbacks: Mapping[str, tuple[str, str]] | None = None
) -> dict[str, Any]:
    """Flags, then environment, then ``fallbacks`` (dest: (source, raw value)), then defaults; every value
    parsed and checked. Raises ConfigError."""
    values: dict[str, Any] = {}
    for option in options:
        given = getattr(args, option.dest, None)
        source = option.flag
        if given is None and option.env in environ:
            env_value = environ[option.env]
            given = env_value.split(option.env_separator) if option.repeatable else env_value
            source = option.env
        if given is None and fallbacks and option.dest in fallbacks:
            source, given = fallbacks[option.dest]
        if given is None:
            if option.dest in REQUIRED:
                also = ", or TRAINING_JOB_NAME as SageMaker does" if option.dest == "training_job" else ""
                raise ConfigError(f"{option.flag} is required (or set {option.env}{also})")
            if option.default is None:
                continue
            given = [option.default] if option.repeatable else option.default
            source = f"default of {option.flag}"
        try:
            if isinstance(given, list):
                values[option.dest] = [option.parse(v) for v in given]
            else:
                values[option.dest] = option.parse(given)
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None
    return values


def resolve(args: argparse.Namespace, environ: Mapping[str, str], options: Sequence[Option] = SERVE_OPTIONS) -> Settings:
    """The ``serve`` settings: flags, then environment, then defaults. Raises ConfigError."""
    values = _values(args, environ, options)
    if values["port"] == values["metrics_port"]:
        raise ConfigError(f"--port and --metrics-port must differ, both are {values['port']}")
    upstreams = tuple(url for urls in values.get("upstream", ()) for url in urls)
    variants: tuple[VariantSpec, ...] = tuple(values.get("variant", ()))
    if variants and upstreams:
        raise ConfigError("--upstream and --variant exclude each other: give the instances of each variant in --variant NAME=URL[,URL...]:WEIGHT")
    if not variants and not upstreams:
        raise ConfigError("--upstream is required (or set SAGEMAKER_PROXY_UPSTREAM), or give --variant")
    if not variants:
        variants = (VariantSpec(values["variant_name"], upstreams),)
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"--variant: each variant needs its own name, got {', '.join(names)}")
    return Settings(
        upstream=variants[0].upstreams[0],
        variants=variants,
        instance_count_from=values["instance_count_from"],
        instance_count_interval=values["instance_count_interval"],
        health_check_interval=values["health_check_interval"],
        health_check_timeout=values["health_check_timeout"],
        unhealthy_threshold=values["unhealthy_threshold"],
        healthy_threshold=values["healthy_threshold"],
        sagemaker_endpoint_url=values.get("sagemaker_endpoint_url"),
        endpoint_name=values["endpoint_name"],
        host=values["host"],
        port=values["port"],
        metrics_port=values["metrics_port"],
        variant_name=variants[0].name,
        instance_count=values["instance_count"],
        invocation_routes=frozenset(values["invocation_route"]),
        max_payload_bytes=values["max_payload_bytes"],
        invocation_timeout=values["invocation_timeout"],
        client_write_timeout=values["client_write_timeout"],
        upstream_idle_timeout=values["upstream_idle_timeout"],
        max_concurrency=values["max_concurrency"],
        ping_path=values["ping_path"],
        model_latency_buckets=values["model_latency_buckets"],
        overhead_latency_buckets=values["overhead_latency_buckets"],
        log_level=values["log_level"],
        workers=values["workers"],
        cloudwatch=values["cloudwatch"],
        cloudwatch_namespace=values["cloudwatch_namespace"],
        cloudwatch_period=values["cloudwatch_period"],
        cloudwatch_region=values.get("cloudwatch_region"),
        cloudwatch_endpoint_url=values.get("cloudwatch_endpoint_url"),
        cloudwatch_buffer_periods=values["cloudwatch_buffer_periods"],
        cloudwatch_flush_timeout=values["cloudwatch_flush_timeout"],
        sample_interval=values["sample_interval"],
        watch_cgroups=tuple(values.get("watch_cgroup", ())),
        model_dir=values["model_dir"],
        instance_id=values.get("instance_id"),
        http_server=values["http_server"],
        request_head_timeout=values["request_head_timeout"],
        keep_alive_timeout=values["keep_alive_timeout"],
        request_body_timeout=values["request_body_timeout"],
        max_request_head_bytes=values["max_request_head_bytes"],
        max_request_headers=values["max_request_headers"],
        max_connections=values["max_connections"],
        record_metrics=getattr(args, "record_metrics", True),
    )


def training_environment(environ: Mapping[str, str], resource_config: Path = RESOURCE_CONFIG) -> dict[str, tuple[str, str]]:
    """Defaults that SageMaker's training environment gives, where present: the job's name from
    ``TRAINING_JOB_NAME`` and this host from ``current_host`` (``algo-1``) in resourceconfig.json."""
    out = {}
    if environ.get("TRAINING_JOB_NAME"):
        out["training_job"] = ("TRAINING_JOB_NAME", environ["TRAINING_JOB_NAME"])
    try:
        current_host = json.loads(resource_config.read_text()).get("current_host")
    except FileNotFoundError:
        current_host = None
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"{resource_config} is not readable JSON: {e}") from None
    if isinstance(current_host, str):
        out["host_index"] = (f"current_host of {resource_config}", current_host)
    return out


def resolve_monitor(args: argparse.Namespace, environ: Mapping[str, str], resource_config: Path = RESOURCE_CONFIG) -> MonitorSettings:
    """The ``monitor`` settings: flags, then environment, then SageMaker's training environment, then defaults."""
    values = _values(args, environ, MONITOR_OPTIONS, training_environment(environ, resource_config))
    return MonitorSettings(
        training_job=values["training_job"],
        host_index=values.get("host_index", 1),
        host=values["host"],
        metrics_port=values["metrics_port"],
        sample_interval=values["sample_interval"],
        watch_cgroups=tuple(values.get("watch_cgroup", ())),
        model_dir=values["model_dir"],
        cloudwatch=values["cloudwatch"],
        cloudwatch_period=values["cloudwatch_period"],
        cloudwatch_region=values.get("cloudwatch_region"),
        cloudwatch_endpoint_url=values.get("cloudwatch_endpoint_url"),
        cloudwatch_buffer_periods=values["cloudwatch_buffer_periods"],
        cloudwatch_flush_timeout=values["cloudwatch_flush_timeout"],
        log_level=values["log_level"],
    )
