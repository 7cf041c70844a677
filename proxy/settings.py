"""The one settings object: built from flags and environment once, validated before anything listens.

No other module reads the environment. Each flag ``--some-flag`` can also be set as
``SAGEMAKER_PROXY_SOME_FLAG``; a flag given on the command line wins.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from metrics.definitions import DEFAULT_MODEL_LATENCY_BUCKETS, DEFAULT_OVERHEAD_LATENCY_BUCKETS
from proxy.errors import ConfigError
from proxy.invocation import routes

ENV_PREFIX = "SAGEMAKER_PROXY_"
# SageMaker's own rule for endpoint and variant names.
NAME_PATTERN = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
HTTP_SERVERS = ("builtin", "uvicorn")
INSTANCE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,254}$")
# Where SageMaker describes a training job's hosts to each of its containers.
RESOURCE_CONFIG = Path("/opt/ml/input/config/resourceconfig.json")


@dataclass(frozen=True)
class VariantConfig:
    """A production variant as configured: its model instances and its share of the traffic."""

    name: str
    upstreams: tuple[str, ...]
    weight: float = 1.0
    count_from: CountSource | None = None  # None: --instance-count-from
    instance_count: int | None = None  # n for a static count; None: --instance-count


@dataclass(frozen=True)
class EndpointConfig:
    """An endpoint and its production variants, as --config declares them (or the one-endpoint flags)."""

    name: str
    variants: tuple[VariantConfig, ...]
    # Inference components: (the variant each runs on, the component: its name, instances and copy count).
    components: tuple[tuple[str, VariantConfig], ...] = ()


@dataclass(frozen=True)
class CountSource:
    """Where n of InvocationsPerInstance comes from: ``kind`` static, upstreams, sagemaker, file or dns;
    ``arg`` the path or name of the last two."""

    kind: str
    arg: str = ""

    def __str__(self) -> str:
        return f"{self.kind}:{self.arg}" if self.arg else self.kind


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
    if parts.scheme == "https":
        raise ValueError(
            f"TLS to the model is not supported: the proxy speaks plain HTTP to it, as a sidecar on loopback or a private network; give http://host:port, got {raw!r}"
        )
    if parts.scheme != "http":
        raise ValueError(f"must be an http:// URL of the model server, got {raw!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"has a bad port: {raw!r}") from None
    if port is None:
        raise ValueError(f"must name its port, http://host:port, got {raw!r}")
    if not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise ValueError(f"must be http://host:port with no path, got {raw!r}")
    return f"http://{parts.netloc}"


def _upstreams(raw: str) -> list[str]:
    return [_upstream(part.strip()) for part in raw.split(",") if part.strip()] or [_upstream(raw)]


def _variant(raw: str) -> VariantConfig:
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
    # Every URL names its port, so "http://host:8081" can never be read as host on port 80, weight 8081.
    if any(u.count(":") < 2 or urlsplit(u).port is None for u in (p.strip() for p in urls.split(","))):
        raise ValueError(f"must be NAME=URL[,URL...]:WEIGHT with each URL as http://host:port, got {raw!r}")
    upstreams = tuple(_upstreams(urls))
    return VariantConfig(_name(name), upstreams, share)


def _count_source(raw: str) -> CountSource:
    kind, _, arg = raw.partition(":")
    if raw in ("static", "upstreams", "sagemaker") or (kind in ("file", "dns") and arg):
        return CountSource(kind, arg)
    raise ValueError(f"must be static, upstreams, sagemaker, file:PATH or dns:NAME, got {raw!r}")


def _name(raw: str) -> str:
    if len(raw) > 63 or not NAME_PATTERN.fullmatch(raw):
        raise ValueError(f"must be 1-63 letters, digits and hyphens, starting with a letter or digit, got {raw!r}")
    return raw


def _route(raw: str) -> tuple[str, str]:
    return routes.parse(raw)


def _genai_provider(raw: str) -> str:
    raw = raw.strip()
    if not re.fullmatch(r"[a-z][a-z0-9_.-]{0,63}", raw):
        raise ValueError(f"must be a lower-case name such as `openai` or `aws.bedrock` (letters, digits, `_`, `.`, `-`), got {raw!r}")
    return raw


def _model_server(raw: str) -> str:
    name = raw.strip().lower()
    if name not in routes.MODEL_SERVERS:
        raise ValueError(f"must be one of {', '.join(routes.MODEL_SERVERS)}, got {raw!r}")
    return name


def _buckets(raw: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in raw.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"must be a comma-separated list of seconds, got {raw!r}") from None
    if not values or any(not math.isfinite(v) or v <= 0 for v in values) or list(values) != sorted(set(values)):
        raise ValueError(f"must be increasing positive seconds, got {raw!r}")
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


def _auth(raw: str) -> str:
    if raw not in ("none", "sigv4"):
        raise ValueError(f"must be none or sigv4, got {raw!r}")
    return raw


def _credentials_file(raw: str) -> Path:
    from proxy.runtime.sigv4 import CredentialsFile

    path = Path(raw)
    try:
        CredentialsFile(path)
    except OSError as e:
        raise ValueError(f"cannot read {raw}: {e.strerror or e}") from None
    return path


class _File:
    """Checks of one configuration file, each failure one line that names the file and the key."""

    def __init__(self, path: str) -> None:
        self.path = path

    def check(self, ok: bool, where: str, what: str) -> None:
        if not ok:
            raise ValueError(f"{self.path}: {where} {what}")

    def known(self, table: dict[str, Any], keys: set[str], where: str) -> None:
        unknown = sorted(set(table) - keys)
        self.check(not unknown, f"{where}.{unknown[0] if unknown else ''}", f"is not a key here (known: {', '.join(sorted(keys))})")

    def name(self, value: object, where: str) -> None:
        try:
            _name(value if isinstance(value, str) else "")
        except ValueError as e:
            self.check(False, where, str(e))


def _config(raw: str) -> tuple[EndpointConfig, ...]:
    """Endpoints from a TOML file in the shape of SageMaker's CreateEndpointConfig::

        [[Endpoints]]
        EndpointName = "iris"
        [[Endpoints.ProductionVariants]]
        VariantName = "Blue"
        InitialVariantWeight = 3
        Instances = ["http://127.0.0.1:8081"]
        InstanceCountFrom = "static"  # optional, as --instance-count-from
        InitialInstanceCount = 1      # optional, n for a static count (default: the number of Instances)
    """
    import tomllib

    try:
        with open(raw, "rb") as f:
            document = tomllib.load(f)
    except OSError as e:
        raise ValueError(f"cannot read {raw}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{raw} is not TOML: {e}") from None
    file = _File(raw)
    file.known(document, {"Endpoints"}, "the file")
    endpoints = document.get("Endpoints")
    file.check(isinstance(endpoints, list) and bool(endpoints), "Endpoints", "must be one or more [[Endpoints]] tables")
    assert isinstance(endpoints, list)
    out = []
    for i, endpoint in enumerate(endpoints):
        where = f"Endpoints[{i}]"
        file.check(isinstance(endpoint, dict), where, "must be a table")
        file.known(endpoint, {"EndpointName", "ProductionVariants", "InferenceComponents"}, where)
        name = endpoint.get("EndpointName")
        file.name(name, f"{where}.EndpointName")
        variants_raw = endpoint.get("ProductionVariants")
        file.check(isinstance(variants_raw, list) and bool(variants_raw), f"{where}.ProductionVariants", "must be one or more [[Endpoints.ProductionVariants]] tables")
        assert isinstance(variants_raw, list)
        variants = [_config_variant(file, variant, f"{where}.ProductionVariants[{j}]") for j, variant in enumerate(variants_raw)]
        names = [v.name for v in variants]
        file.check(len(set(names)) == len(names), f"{where}.ProductionVariants", f"need distinct VariantNames, got {', '.join(names)}")
        components_raw = endpoint.get("InferenceComponents", [])
        file.check(isinstance(components_raw, list), f"{where}.InferenceComponents", "must be [[Endpoints.InferenceComponents]] tables")
        components = tuple(_config_component(file, c, f"{where}.InferenceComponents[{j}]", names) for j, c in enumerate(components_raw))
        cnames = [c.name for _, c in components]
        file.check(len(set(cnames)) == len(cnames), f"{where}.InferenceComponents", f"need distinct InferenceComponentNames, got {', '.join(cnames)}")
        out.append(EndpointConfig(name, tuple(variants), components))
    names = [e.name for e in out]
    file.check(len(set(names)) == len(names), "Endpoints", f"need distinct EndpointNames, got {', '.join(names)}")
    return tuple(out)


def _config_component(file: _File, component: object, at: str, variants: list[str]) -> tuple[str, VariantConfig]:
    """One [[Endpoints.InferenceComponents]] table: a model with its own instances and copy count, on a variant."""
    file.check(isinstance(component, dict), at, "must be a table")
    assert isinstance(component, dict)
    file.known(component, {"InferenceComponentName", "VariantName", "Instances", "CopyCountFrom", "CopyCount"}, at)
    name = component.get("InferenceComponentName")
    file.name(name, f"{at}.InferenceComponentName")
    variant = component.get("VariantName", variants[0])
    file.check(variant in variants, f"{at}.VariantName", f"must name a variant of the endpoint ({', '.join(variants)}), got {variant!r}")
    as_variant = {"VariantName": name, "Instances": component.get("Instances")}
    if "CopyCountFrom" in component:
        as_variant["InstanceCountFrom"] = component["CopyCountFrom"]
    if "CopyCount" in component:
        as_variant["InitialInstanceCount"] = component["CopyCount"]
    try:
        return str(variant), _config_variant(file, as_variant, at)
    except ValueError as e:  # the variant's keys, named as a component's
        raise ValueError(str(e).replace("InstanceCountFrom", "CopyCountFrom").replace("InitialInstanceCount", "CopyCount")) from None


def _config_variant(file: _File, variant: object, at: str) -> VariantConfig:
    """One [[Endpoints.ProductionVariants]] table."""
    file.check(isinstance(variant, dict), at, "must be a table")
    assert isinstance(variant, dict)
    file.known(variant, {"VariantName", "InitialVariantWeight", "Instances", "InstanceCountFrom", "InitialInstanceCount"}, at)
    vname = variant.get("VariantName")
    file.name(vname, f"{at}.VariantName")
    weight = variant.get("InitialVariantWeight", 1.0)
    file.check(isinstance(weight, int | float) and not isinstance(weight, bool) and math.isfinite(weight) and weight > 0,
               f"{at}.InitialVariantWeight", f"must be a positive number, got {weight!r}")
    instances = variant.get("Instances")
    file.check(isinstance(instances, list) and bool(instances) and all(isinstance(u, str) for u in instances),
               f"{at}.Instances", "must be a list of http://host:port URLs")
    assert isinstance(instances, list)
    try:
        urls = tuple(_upstream(u) for u in instances)
    except ValueError as e:
        file.check(False, f"{at}.Instances", str(e))
    count_from = None
    if "InstanceCountFrom" in variant:
        try:
            count_from = _count_source(str(variant["InstanceCountFrom"]))
        except ValueError as e:
            file.check(False, f"{at}.InstanceCountFrom", str(e))
    count = variant.get("InitialInstanceCount", len(urls))
    file.check(isinstance(count, int) and not isinstance(count, bool) and 1 <= count <= 100_000, f"{at}.InitialInstanceCount", f"must be 1 to 100000, got {count!r}")
    return VariantConfig(str(vname), urls, float(weight), count_from, count)


def _region(raw: str) -> str:
    if not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d", raw):
        raise ValueError(f"must be an AWS region such as us-east-1, got {raw!r}")
    return raw


def _nonnegative_float(raw: str) -> float:
    try:
        if float(raw) == 0:
            return 0.0
    except ValueError:
        pass  # said by _positive_float
    return _positive_float(raw)


def _command(raw: str) -> str:
    if not raw.strip():
        raise ValueError("must be a command line, got an empty one")
    return raw.strip()


def _host_index(raw: str) -> int:
    return _int_between(1, 10_000)(raw.removeprefix("algo-"))


# -- options: each declared once, on its settings field ------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """A flag, its environment variable and its parser: the metadata of one settings field."""

    flag: str
    parse: Callable[[str], Any]
    help: str
    default: str | None = None  # as --help and the README show it; None: ``absent`` says what no value means
    absent: str = ""
    required: bool = False
    repeatable: bool = False
    env_separator: str = ","  # how a repeatable flag's values are separated in its environment variable
    switch: bool = False  # takes no value on the command line: present means true
    collect: Callable[[list[Any]], Any] = tuple  # a repeatable flag's parsed values into the field's value
    field: str = ""  # the field's path in the settings, such as cloudwatch.period (set by ``options``)
    # Options of a group shared by commands: the only command that takes it ("": every one), and its help
    # there when it says more than ``help`` (such as a value that only that command accepts).
    only: str = ""
    help_for: tuple[tuple[str, str], ...] = ()

    def applies_to(self, command: str) -> bool:
        return not self.only or self.only == command

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()

    @property
    def shown_default(self) -> str:
        """The default column of the README's flag table."""
        if self.default is not None:
            return f"`{self.default}`"
        return "required" if self.required else self.absent


_MISSING: Any = object()


def _seconds(values: Sequence[float]) -> str:
    return ",".join(f"{v:.6f}".rstrip("0").rstrip(".") for v in values)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def option(
    flag: str,
    parse: Callable[[str], Any],
    help: str,
    default: Any = _MISSING,
    *,
    shown: str | None = None,
    absent: str = "",
    repeatable: bool = False,
    env_separator: str = ",",
    switch: bool = False,
    collect: Callable[[list[Any]], Any] = tuple,
    only: str = "",
    help_for: Mapping[str, str] | None = None,
) -> Any:
    """A settings field with its flag: ``default`` is the field's value when neither flag nor environment
    gives one (none: the option is required). In a group shared by commands, ``only`` names the one command
    that takes it, and ``help_for`` a command's own help where it differs."""
    required = default is _MISSING
    if shown is None and not required and default is not None and not absent:
        shown = _show(default)
    meta = Option(
        flag, parse, help, shown, absent, required, repeatable, env_separator, switch, collect, only=only, help_for=tuple((help_for or {}).items())
    )
    if required:
        return field(metadata={"option": meta})
    return field(default=default, metadata={"option": meta})


def group(cls: type) -> Any:
    """A field holding a group of options shared by several commands, such as ``CloudWatchOptions``."""
    return field(default_factory=cls, metadata={"group": cls})


def options(cls: type, command: str, prefix: str = "") -> tuple[Option, ...]:
    """The options that ``command`` takes from its settings class, groups included, in declaration order,
    each with its help for that command."""
    out: list[Option] = []
    for f in dataclasses.fields(cls):
        if "group" in f.metadata:
            out.extend(options(f.metadata["group"], command, f"{prefix}{f.name}."))
        elif "option" in f.metadata and f.metadata["option"].applies_to(command):
            opt: Option = f.metadata["option"]
            out.append(dataclasses.replace(opt, field=prefix + f.name, help=dict(opt.help_for).get(command, opt.help)))
    return tuple(out)


def _log_level_option() -> Any:
    return option("--log-level", _log_level, "log level: " + ", ".join(f"`{level}`" for level in LOG_LEVELS), "info")


@dataclass(frozen=True)
class CloudWatchOptions:
    """Publishing to CloudWatch: the same flags for ``serve`` and ``monitor``."""

    enabled: bool = option("--cloudwatch", _bool, "publish the metrics to CloudWatch with PutMetricData (`true`/`false` in the environment)", False, absent="off", switch=True)
    period: int = option("--cloudwatch-period", _period, "seconds per statistic set: 60, or 1, 5, 10, 30 for high-resolution metrics", 60)
    concurrency_period: int | None = option(
        "--cloudwatch-concurrency-period", _period,
        "seconds per statistic set of ConcurrentRequestsPerModel alone, e.g. `10` for a high-resolution metric as SageMaker emits it for fast autoscaling",
        None, absent="`--cloudwatch-period`", only="serve",
    )
    region: str | None = option(
        "--cloudwatch-region", str, "AWS region of CloudWatch, such as `us-east-1` (and of SageMaker, for `--instance-count-from sagemaker`); none at all is refused at start",
        None, absent="`AWS_DEFAULT_REGION` (boto3 reads no `AWS_REGION`), or the AWS config file's",
        help_for={"monitor": "AWS region of CloudWatch, such as `us-east-1`; none at all is refused at start"},
    )
    endpoint_url: str | None = option("--cloudwatch-endpoint-url", _http_url, "CloudWatch endpoint, for compatible services and tests", None, absent="AWS")
    buffer_periods: int = option("--cloudwatch-buffer-periods", _int_between(1, 100_000), "ended periods kept while CloudWatch is unreachable; the oldest are dropped beyond", 120)
    token_metrics: bool = option(
        "--cloudwatch-token-metrics", _bool,
        "publish InputTokens, OutputTokens, TimeToFirstToken and TimePerOutputToken too, for OpenAI-compatible answers (4 custom metrics more per variant: see the README for the cost)",
        False, absent="off", switch=True, only="serve",
    )
    flush_timeout: float = option("--cloudwatch-flush-timeout", _positive_float, "seconds allowed at shutdown to publish the last partial period", 10.0)


@dataclass(frozen=True)
class SamplingOptions:
    """Sampling the instance metrics (CPU, memory, GPU, disk): the same flags for ``serve`` and ``monitor``."""

    interval: float = option(
        "--sample-interval", _interval(allow_off=True), "seconds between samples of the instance metrics, 0.1 to 3600", 10.0,
        help_for={"serve": "seconds between samples of the instance metrics, 0.1 to 3600; `0` turns them off"},
    )
    watch_cgroups: tuple[str, ...] = option(
        "--watch-cgroup", _cgroup,
        "another container's cgroup, as `/proc/PID/cgroup` shows it, whose CPU and memory add to the instance metrics; repeatable, a comma list in the environment",
        (), absent="none", repeatable=True,
    )
    model_dir: str = option("--model-dir", _path, "the model's directory: DiskUtilization is of the file system that holds it (or of `/` while it does not exist)", "/opt/ml/model")


def _flatten(values: list[list[str]]) -> tuple[str, ...]:
    return tuple(url for urls in values for url in urls)


@dataclass(frozen=True)
class Settings:
    """The ``serve`` command."""

    endpoint_name: str = option("--endpoint-name", _name, "the `endpoint_name` label and EndpointName dimension")
    config: tuple[EndpointConfig, ...] = option(
        "--config", _config,
        "a TOML file of endpoints, each with production variants in the shape of SageMaker's CreateEndpointConfig (see the README); replaces `--endpoint-name`, `--upstream`, `--variant-name` and `--variant`",
        (), absent="none",
    )
    # The model instances: --upstream with --variant-name (one variant), or --variant (several); read ``variants``.
    upstream: tuple[str, ...] = option(
        "--upstream", _upstreams, "the model server, `http://host:port`; repeatable or a comma list for several instances",
        (), absent="required, unless `--variant`", repeatable=True, collect=_flatten,
    )
    variant_name: str = option("--variant-name", _name, "the `variant_name` label and `x-Amzn-Invoked-Production-Variant`", "AllTraffic")
    variant: tuple[VariantConfig, ...] = option(
        "--variant", _variant,
        "a production variant `NAME=URL[,URL...]:WEIGHT`, each URL with its port; repeatable, space-separated in the environment; replaces `--upstream` and `--variant-name`",
        (), absent="none", repeatable=True, env_separator=" ",
    )
    host: str = option("--host", str, "address both ports listen on", "0.0.0.0")
    port: int = option("--port", _int_between(1, 65535), "proxy port, where clients send requests", 8080)
    metrics_port: int = option("--metrics-port", _int_between(1, 65535), "admin port: `/metrics`, `/healthz`, `/readyz`", 9090)
    instance_count: int = option("--instance-count", _int_between(1, 100_000), "n of InvocationsPerInstance, with `--instance-count-from static`", 1)
    instance_count_from: CountSource = option(
        "--instance-count-from", _count_source,
        "where n of InvocationsPerInstance comes from: `static`, `upstreams` (healthy instances), `sagemaker` (DescribeEndpoint), `file:PATH` or `dns:NAME`",
        CountSource("static"),
    )
    instance_count_interval: float = option("--instance-count-interval", _positive_float, "seconds between polls of `sagemaker` and `dns` (a file is checked every second)", 10.0)
    health_check_interval: float = option("--health-check-interval", _positive_float, "seconds between pings of each instance (several instances, or `upstreams`)", 2.0)
    health_check_timeout: float = option("--health-check-timeout", _positive_float, "seconds a ping may take", 2.0)
    unhealthy_threshold: int = option("--unhealthy-threshold", _int_between(1, 100), "failed pings that take an instance out", 2)
    healthy_threshold: int = option("--healthy-threshold", _int_between(1, 100), "good pings that bring it back", 1)
    sagemaker_endpoint_url: str | None = option("--sagemaker-endpoint-url", _http_url, "SageMaker API for `--instance-count-from sagemaker`, for compatible services and tests", None, absent="AWS")
    model_server: str | None = option(
        "--model-server", _model_server,
        "the model server behind the proxy, for its invocation routes and health check: " + ", ".join(f"`{n}`" for n in routes.MODEL_SERVERS)
        + " (see the README); `--invocation-route` and `--ping-path` override it",
        None, absent="`sagemaker`'s routes",
    )
    invocation_routes: frozenset[tuple[str, str]] = option(
        "--invocation-route", _route,
        "'METHOD /path' that counts as an invocation, `{model}` and `{version}` matching one path segment (`POST /v2/models/{model}/infer`); repeatable, a comma list in the environment",
        frozenset({("POST", "/invocations")}), shown="POST /invocations", repeatable=True, collect=frozenset,
    )
    model_label: bool = option(
        "--model-label", _bool,
        "label the invocation metrics with the model each request names: a route's `{model}`, `X-Amzn-SageMaker-Target-Model`, or the `model` of an OpenAI-style JSON body; CloudWatch keeps its dimensions",
        False, absent="off", switch=True,
    )
    max_models: int = option("--max-models", _int_between(1, 100_000), "with `--model-label`: distinct model values per variant; requests for more are `__other__`", 100)
    max_payload_bytes: int = option("--max-payload-bytes", _int_between(1, 1 << 40), "larger request bodies get 413", 6 * 1024 * 1024)
    max_buffered_bytes: int = option(
        "--max-buffered-bytes", _int_between(1, 1 << 44),
        "request body bytes held at once per process (bodies are read whole before forwarding); a body past it gets 503 before it is read", 256 << 20,
    )
    invocation_timeout: float = option("--invocation-timeout", _positive_float, "seconds waiting on the model: to the response head, and between body chunks (time blocked on a slow client does not count); then 504", 60.0)
    client_write_timeout: float = option(
        "--client-write-timeout", _positive_float,
        "seconds a response may wait on a client that does not read, without progress; then the connection is closed and the invocation is a client disconnect",
        60.0,
    )
    upstream_idle_timeout: float = option(
        "--upstream-idle-timeout", _positive_float,
        "seconds a pooled model connection may stay idle and be reused; below the 5 s keep-alive of uvicorn, gunicorn and most model servers",
        4.0,
    )
    max_concurrency: int = option(
        "--max-concurrency", _int_between(0, 1_000_000),
        "requests at the model at once per process (per worker), as Knative's containerConcurrency; the rest wait in a FIFO queue; `0`: no limit", 0,
    )
    queue_depth: int | None = option(
        "--queue-depth", _int_between(0, 10_000_000),
        "with `--max-concurrency`: requests that may wait for a slot; past it, 503 at once (`0`: no queue)", None, absent="10 x `--max-concurrency`",
    )
    queue_timeout: float = option("--queue-timeout", _positive_float, "with `--max-concurrency`: seconds a request may wait for a slot; then 503", 30.0)
    ping_path: str = option("--ping-path", _path, "the model's health check, used by `/readyz`", "/ping")
    model_command: str | None = option(
        "--model-command", _command,
        "the model server to start and watch, as a shell command line (e.g. `python -m example_model --port 8081`): its own process group, its output passed through; `/ping` and `/readyz` answer 503 until its ping answers 200; stopped after the drain",
        None, absent="none: the model runs on its own",
    )
    model_setup_timeout: float = option("--model-setup-timeout", _positive_float, "seconds the model may take to answer its first ping (SageMaker allows 8 minutes); then it is stopped and counts as exited", 480.0)
    model_stop_timeout: float = option("--model-stop-timeout", _positive_float, "seconds the model gets after SIGTERM before SIGKILL", 10.0)
    model_restart: bool = option(
        "--model-restart", _bool,
        "start the model again, with backoff, when it exits on its own (counted in `sagemaker_model_restarts_total`); off: the proxy drains and exits non-zero, so the orchestrator restarts the container",
        False, absent="off", switch=True,
    )
    model_latency_buckets: tuple[float, ...] = option(
        "--model-latency-buckets", _buckets, "ModelLatency and first-chunk latency histogram buckets, comma-separated seconds",
        DEFAULT_MODEL_LATENCY_BUCKETS, shown=_seconds(DEFAULT_MODEL_LATENCY_BUCKETS),
    )
    overhead_latency_buckets: tuple[float, ...] = option(
        "--overhead-latency-buckets", _buckets, "OverheadLatency (and the first chunk's) histogram buckets, comma-separated seconds",
        DEFAULT_OVERHEAD_LATENCY_BUCKETS, shown=_seconds(DEFAULT_OVERHEAD_LATENCY_BUCKETS),
    )
    http_server: str = option("--http-server", _http_server, "the proxy port's server: `builtin` (see the front door) or `uvicorn`, the reference, without the limits below but `--keep-alive-timeout`", "builtin")
    request_head_timeout: float = option(
        "--request-head-timeout", _positive_float,
        "seconds for a request head to arrive, from its first byte (for a new connection, from accept); then 408, or a silent close if nothing came",
        10.0,
    )
    keep_alive_timeout: float = option("--keep-alive-timeout", _positive_float, "seconds an idle keep-alive connection stays open; above the 60 s of common load balancers, so they close first", 75.0)
    request_body_timeout: float = option("--request-body-timeout", _positive_float, "seconds a request body may go without progress; then 408", 60.0)
    max_request_head_bytes: int = option("--max-request-head-bytes", _int_between(1024, 1 << 24), "the request line and headers together (and a chunked body's trailers); larger heads get 431", 64 * 1024)
    max_request_headers: int = option("--max-request-headers", _int_between(1, 10_000), "most request headers (and trailers); more get 431", 100)
    max_connections: int = option("--max-connections", _int_between(1, 1_000_000), "open client connections per process (per worker); new ones past it are closed at once", 10_000)
    admin_linger: float = option(
        "--admin-linger", _nonnegative_float, "seconds the admin port keeps answering after the proxy port has drained at a stop, so that a last scrape sees every invocation", 2.0,
    )
    admin_max_connections: int = option(
        "--admin-max-connections", _int_between(1, 100_000), "open connections to the admin port per process; its own limit, so a flood on the proxy port leaves `/metrics` and the probes answering", 64,
    )
    workers: int = option("--workers", _int_between(1, 64), "worker processes sharing the proxy port; metrics are merged into one set", 1)
    cloudwatch_namespace: str = option("--cloudwatch-namespace", _namespace, "CloudWatch namespace for the invocation metrics; refused if it starts with `AWS/`", "SageMakerProxy")
    cloudwatch: CloudWatchOptions = group(CloudWatchOptions)
    sampling: SamplingOptions = group(SamplingOptions)
    auth: str = option("--auth", _auth, "authentication on the SageMaker Runtime API routes: `none`, or `sigv4` (AWS Signature Version 4, service `sagemaker`, as SageMaker checks it)", "none")
    auth_credentials: Path | None = option(
        "--auth-credentials", _credentials_file, "with `--auth sigv4`: a file of `ACCESS_KEY_ID SECRET_ACCESS_KEY` lines, re-read when it changes", None, absent="none",
    )
    auth_region: str | None = option(
        "--auth-region", _region, "with `--auth sigv4`: the region signatures must be scoped to (as an endpoint's region is)", None, absent="any region",
    )
    native_routes: bool = option(
        "--native-routes", _bool,
        "serve the model's own routes beside the Runtime API (`false`: only `/endpoints/...`); with `--auth sigv4` they need a SageMaker signature too",
        True,
    )
    access_log: bool = option(
        "--access-log", _bool,
        "log one line per forwarded request (client, request line, status, bytes, ModelLatency and OverheadLatency in ms, variant) to the `proxy.access` logger (`true`/`false` in the environment)",
        False, absent="off", switch=True,
    )
    otel: str | None = option(
        "--otel", _http_url,
        "an OTLP/HTTP collector, such as http://127.0.0.1:4318, to send traces to (needs the otel extra); tracing is also on where OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set, and off under OTEL_SDK_DISABLED=true",
        None, absent="off",
    )
    otel_metrics: str | None = option(
        "--otel-metrics", _http_url,
        "an OTLP/HTTP collector, such as http://127.0.0.1:4318, to send the GenAI metrics to (OpenTelemetry's `gen_ai.*`, semantic conventions v1.41.0; needs the otel extra), every OTEL_METRIC_EXPORT_INTERVAL ms (60000); also on where OTEL_EXPORTER_OTLP_METRICS_ENDPOINT is set, off under OTEL_SDK_DISABLED=true",
        None, absent="off",
    )
    genai_provider: str | None = option(
        "--genai-provider", _genai_provider, "`gen_ai.provider.name` of the GenAI metrics and spans, such as `openai` or `aws.bedrock`", None, absent="the `--model-server` preset's name",
    )
    otel_shutdown_timeout: float = option(
        "--otel-shutdown-timeout", _positive_float, "seconds at exit for the last spans and GenAI metrics to reach the OTLP collector; spans left then are dropped and counted", 5.0,
    )
    instance_id: str | None = option("--instance-id", _instance_id, "this instance in the Host dimension, `[endpoint]/[variant]/[instance-id]`", None, absent="the hostname")
    log_level: str = _log_level_option()
    # Benchmark-only (--no-record-metrics, not shown): forward without recording metrics, to measure what recording costs.
    record_metrics: bool = True
    # Benchmark-only (--no-count-tokens, not shown): forward event streams without counting their tokens.
    count_tokens: bool = True

    @property
    def endpoints(self) -> tuple[EndpointConfig, ...]:
        """Every endpoint: those of --config, or the one of --endpoint-name."""
        return self.config or (EndpointConfig(self.endpoint_name, self.variant or (VariantConfig(self.variant_name, self.upstream),)),)

    @property
    def variants(self) -> tuple[VariantConfig, ...]:
        """The first endpoint's production variants (the native routes'): each --variant, or one named
        --variant-name over the --upstream instances."""
        return self.endpoints[0].variants

    def check(self) -> None:
        """The rules between fields. Raises ConfigError."""
        if self.port == self.metrics_port:
            raise ConfigError(f"--port and --metrics-port must differ, both are {self.port}")
        if self.variant and self.upstream:
            raise ConfigError("--upstream and --variant exclude each other: give the instances of each variant in --variant NAME=URL[,URL...]:WEIGHT")
        if self.max_buffered_bytes < self.max_payload_bytes:
            raise ConfigError(f"--max-buffered-bytes ({self.max_buffered_bytes}) must be at least --max-payload-bytes ({self.max_payload_bytes}), or no body of the largest size is ever read")
        if self.auth == "sigv4" and self.auth_credentials is None:
            raise ConfigError("--auth sigv4 needs --auth-credentials FILE")
        names = [v.name for v in self.variant]
        if len(set(names)) != len(names):
            raise ConfigError(f"--variant: each variant needs its own name, got {', '.join(names)}")
        for url in (u for endpoint in self.endpoints for v in endpoint.variants for u in v.upstreams):
            if _is_own_address(url, self.host, (self.port, self.metrics_port)):
                raise ConfigError(f"upstream {url} is this proxy's own port: each request would call the proxy again; give the model's address")


LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0", "::"})


def _is_own_address(url: str, host: str, ports: tuple[int, ...]) -> bool:
    """Whether ``url`` names a port this proxy listens on (the same address, or loopback while it listens on all)."""
    parts = urlsplit(url)
    if parts.port not in ports:
        return False
    target = (parts.hostname or "").lower()
    return target == host or (host in ("0.0.0.0", "::") and _is_local(target)) or (_is_local(host) and _is_local(target))


def _is_local(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback or host in LOCAL_HOSTS
    except ValueError:
        return host in LOCAL_HOSTS


@dataclass(frozen=True)
class MonitorSettings:
    """The ``monitor`` command: instance metrics of one host of a training job, with no proxy."""

    training_job: str = option("--training-job", _name, "the training job's name, for the Host dimension `[training-job]/algo-[n]`; else `TRAINING_JOB_NAME`")
    host_index: int = option("--host-index", _host_index, "n of algo-n, this host of the job; else `current_host` of SageMaker's `resourceconfig.json`", 1)
    host: str = option("--host", str, "address the metrics port listens on", "0.0.0.0")
    metrics_port: int = option("--metrics-port", _int_between(1, 65535), "`/metrics`, `/healthz`", 9090)
    cloudwatch: CloudWatchOptions = group(CloudWatchOptions)
    sampling: SamplingOptions = group(SamplingOptions)
    log_level: str = _log_level_option()

    def check(self) -> None:
        if self.sampling.interval == 0:
            raise ConfigError("--sample-interval: must be between 0.1 and 3600 seconds for monitor, got 0")


SERVE_OPTIONS = options(Settings, "serve")
MONITOR_OPTIONS = options(MonitorSettings, "monitor")


def add_options(parser: argparse.ArgumentParser, options: Sequence[Option], *, benchmark_switch: bool = True) -> None:
    """Declare the flags; values stay raw strings here and are parsed once in ``resolve``."""
    for opt in options:
        default_text = f" (default {opt.default})" if opt.default is not None else (f" (default: {opt.absent})" if opt.absent else "")
        help_text = f"{opt.help}{default_text} [env {opt.env}]".replace("%", "%%").replace("`", "")
        if opt.required:
            help_text += " (required)"
        if opt.repeatable:
            parser.add_argument(opt.flag, dest=opt.dest, action="append", help=help_text)
        elif opt.switch:
            parser.add_argument(opt.flag, dest=opt.dest, action="store_const", const="true", help=help_text)
        else:
            parser.add_argument(opt.flag, dest=opt.dest, help=help_text)
    if benchmark_switch:  # benchmark-only; not part of the user-facing flags
        parser.add_argument("--no-record-metrics", dest="record_metrics", action="store_false", help=argparse.SUPPRESS)
        parser.add_argument("--no-count-tokens", dest="count_tokens", action="store_false", help=argparse.SUPPRESS)


def _values(
    cls: type, command: str, args: argparse.Namespace, environ: Mapping[str, str], fallbacks: Mapping[str, tuple[str, str]], missing: list[str]
) -> dict[str, Any]:
    """The given values of ``cls``'s options that ``command`` takes (a dict per group): each from its flag, else its environment
    variable, else ``fallbacks`` (dest: (source, raw value)); those given nowhere keep the field's default.
    Raises ConfigError for a bad value; names the required options given nowhere in ``missing``."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if "group" in f.metadata:
            values[f.name] = _values(f.metadata["group"], command, args, environ, fallbacks, missing)
            continue
        opt: Option | None = f.metadata.get("option")
        if opt is None or not opt.applies_to(command):
            continue
        given = getattr(args, opt.dest, None)
        source = opt.flag
        if given is None and opt.env in environ:
            given = environ[opt.env].split(opt.env_separator) if opt.repeatable else environ[opt.env]
            source = opt.env
        if given is None and opt.dest in fallbacks:
            source, given = fallbacks[opt.dest]
        if given is None:
            if opt.required:
                also = ", or TRAINING_JOB_NAME as SageMaker does" if opt.dest == "training_job" else ""
                missing.append(f"{opt.flag} is required (or set {opt.env}{also})")
            continue
        try:
            values[f.name] = opt.collect([opt.parse(v) for v in given]) if opt.repeatable else opt.parse(given)
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None
    return values


def _make(cls: type, values: dict[str, Any]) -> Any:
    groups = {f.name: _make(f.metadata["group"], values[f.name]) for f in dataclasses.fields(cls) if "group" in f.metadata}
    return cls(**{**values, **groups})


def resolve(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """The ``serve`` settings: flags, then environment, then defaults; every missing required flag named at
    once. Raises ConfigError."""
    missing: list[str] = []
    values = _values(Settings, "serve", args, environ, {}, missing)
    if values.get("config"):
        given = [flag for flag, key in (("--endpoint-name", "endpoint_name"), ("--upstream", "upstream"), ("--variant", "variant")) if key in values]
        if given:
            raise ConfigError(f"--config replaces {' and '.join(given)}: declare the endpoints in the file")
        missing = [m for m in missing if not m.startswith("--endpoint-name")]
        values["endpoint_name"] = values["config"][0].name
    elif not values.get("upstream") and not values.get("variant"):
        missing.append("--upstream is required (or set SAGEMAKER_PROXY_UPSTREAM), or give --variant")
    if missing:
        raise ConfigError("; ".join(missing))
    server = values.get("model_server")
    if server is not None:  # the preset's routes and health check, unless given
        values.setdefault("invocation_routes", routes.MODEL_SERVERS[server].routes)
        values.setdefault("ping_path", routes.MODEL_SERVERS[server].ping_path)
    benchmark = {"record_metrics": getattr(args, "record_metrics", True), "count_tokens": getattr(args, "count_tokens", True)}
    settings: Settings = _make(Settings, {**values, **benchmark})
    settings.check()
    return settings


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
    missing: list[str] = []
    values = _values(MonitorSettings, "monitor", args, environ, training_environment(environ, resource_config), missing)
    if missing:
        raise ConfigError("; ".join(missing))
    settings: MonitorSettings = _make(MonitorSettings, values)
    settings.check()
    return settings


def flag_table(opts: Sequence[Option]) -> str:
    """The README's table of flags, made from the options themselves (tests/test_settings.py checks it)."""
    rows = ["| flag | environment variable | default | |", "|---|---|---|---|"]
    rows += [f"| `{o.flag}` | `{o.env}` | {o.shown_default} | {o.help} |" for o in opts]
    return "\n".join(rows)


def update_readme(path: Path) -> None:
    """Rewrite the flag tables between their markers in ``path``: ``python -m proxy.settings README.md``."""
    text = path.read_text()
    for name, opts in (("serve", SERVE_OPTIONS), ("monitor", MONITOR_OPTIONS)):
        pattern = re.compile(rf"(<!-- flags: {name} -->\n).*?(<!-- /flags: {name} -->)", re.DOTALL)
        replacement = f"<!-- flags: {name} -->\n{flag_table(opts)}\n<!-- /flags: {name} -->".replace("\\", "\\\\")
        text, found = pattern.subn(replacement, text)
        if found != 1:
            raise SystemExit(f"{path}: no <!-- flags: {name} --> ... <!-- /flags: {name} --> block")
    path.write_text(text)


if __name__ == "__main__":
    import sys

    update_readme(Path(sys.argv[1]))
