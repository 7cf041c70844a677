"""The Prometheus rules and the Grafana dashboard ask only for metrics the proxy exports, and promtool accepts them.

Every PromQL expression in deploy/ is tokenized and its selectors are checked against
``metrics.definitions.ALL_METRICS``, so a renamed metric breaks this test instead of a dashboard.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from metrics.definitions import (
    ALL_METRICS,
    COMPONENT_LABEL,
    FIRST_CHUNK_LATENCY,
    FIRST_CHUNK_MODEL_LATENCY,
    FIRST_CHUNK_OVERHEAD_LATENCY,
    MODEL_LABEL,
    REQUEST_SIZE,
    RESPONSE_SIZE,
    TIME_PER_OUTPUT_TOKEN,
    TIME_TO_FIRST_TOKEN,
    TOKEN_METRICS,
    VARIANT_LABELS,
    Kind,
    MetricDefinition,
)
from tests.conftest import ROOT, Proxy, Running
from tests.test_prometheus import running_prometheus, wait_for_value

DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
RULES = PROMETHEUS / "rules.yml"
RULES_TEST = PROMETHEUS / "rules_test.yml"
PROMETHEUS_CONFIG = PROMETHEUS / "prometheus.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "sagemaker-metrics-proxy.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
JOB = "sagemaker-metrics-proxy"
# Labels Prometheus adds to every series of a scrape target.
TARGET_LABELS = frozenset({"instance", "job"})


def exported_names() -> frozenset[str]:
    """Every sample name the proxy exposes on /metrics, plus ``up``, which Prometheus adds per target."""
    names = {"up"}
    for metric in ALL_METRICS:
        if metric.kind is Kind.HISTOGRAM:
            names.update(metric.prometheus_name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(metric.prometheus_name)
    return frozenset(names)


def carried_labels() -> dict[str, frozenset[str]]:
    """The labels each exported sample name can carry: the variant's, the optional component and model, its own,
    ``le`` on buckets, and the scrape target's."""
    carried = {"up": TARGET_LABELS}
    for metric in ALL_METRICS:
        labels = frozenset(VARIANT_LABELS + COMPONENT_LABEL + MODEL_LABEL + metric.labels) | TARGET_LABELS
        if metric.kind is Kind.HISTOGRAM:
            carried[metric.prometheus_name + "_bucket"] = labels | {"le"}
            carried[metric.prometheus_name + "_sum"] = carried[metric.prometheus_name + "_count"] = labels
        else:
            carried[metric.prometheus_name] = labels
    return carried


# --- a small PromQL tokenizer: enough to find every series selector, and to refuse what it cannot read ---

_TOKEN = re.compile(
    r"""
      (?P<space>\s+|\#[^\n]*)
    | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<variable>\$\{[^}]*\}|\$\w+|\[\[\w+\]\])
    | (?P<duration>(?:\d+(?:ms|[smhdwy]))+(?![\w.]))
    | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<ident>[A-Za-z_][A-Za-z0-9_:]*)
    | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=@,:(){}\[\]])
    """,
    re.VERBOSE,
)
# Words that are never series names; the grouping ones take a parenthesized list of label names.
_GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_KEYWORDS = _GROUPING | {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}
_MATCH_OPS = frozenset({"=", "!=", "=~", "!~"})


@dataclass(frozen=True)
class Token:
    kind: str
    text: str


@dataclass(frozen=True)
class Selector:
    """One series selector: ``name{label op "value", ...}``."""

    name: str
    matchers: tuple[tuple[str, str, str], ...] = ()

    def matcher(self, label: str) -> tuple[str, str] | None:
        return next(((op, value) for name, op, value in self.matchers if name == label), None)


def tokenize(expr: str) -> list[Token]:
    tokens: list[Token] = []
    pos = 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"cannot tokenize {expr[pos:pos + 20]!r} in {expr!r}")
        kind = m.lastgroup or ""
        if kind != "space":
            tokens.append(Token(kind, m.group()))
        pos = m.end()
    return tokens


def _check_balanced(tokens: list[Token]) -> None:
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for token in tokens:
        if token.text in pairs.values():
            stack.append(token.text)
        elif token.text in pairs and (not stack or stack.pop() != pairs[token.text]):
            raise ValueError(f"unbalanced {token.text!r}: {' '.join(t.text for t in tokens)}")
    if stack:
        raise ValueError(f"unclosed {stack[-1]!r}: {' '.join(t.text for t in tokens)}")


def _closing(tokens: list[Token], start: int, open_: str, close: str) -> int:
    """Index of the token that closes the bracket at ``start``."""
    depth = 0
    for i in range(start, len(tokens)):
        if tokens[i].text == open_:
            depth += 1
        elif tokens[i].text == close:
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced {open_!r}: {' '.join(t.text for t in tokens)}")


def _matchers(tokens: list[Token], start: int) -> tuple[tuple[tuple[str, str, str], ...], int]:
    """Parse ``{label op "value", ...}`` from the ``{`` at ``start``; return the matchers and the index after ``}``."""
    end = _closing(tokens, start, "{", "}")
    inner = [t for t in tokens[start + 1 : end] if t.text != ","]
    if len(inner) % 3:
        raise ValueError(f"malformed label matchers: {' '.join(t.text for t in tokens[start : end + 1])}")
    matchers = []
    for label, op, value in zip(inner[::3], inner[1::3], inner[2::3], strict=True):
        if label.kind != "ident" or op.text not in _MATCH_OPS or value.kind != "string":
            raise ValueError(f"malformed label matcher: {label.text} {op.text} {value.text}")
        matchers.append((label.text, op.text, value.text[1:-1]))
    return tuple(matchers), end + 1


def selectors(expr: str) -> list[Selector]:
    """Every series selector in a PromQL expression, with its label matchers.

    Skipped: function and aggregation names (an identifier followed by ``(``, ``by`` or ``without``),
    keywords, label lists after by/without/on/ignoring/group_left/group_right, label names inside
    ``{...}``, string literals, numbers, durations and Grafana variables inside ``[...]``.
    """
    tokens = tokenize(expr)
    _check_balanced(tokens)
    found: list[Selector] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        following = tokens[i + 1].text.lower() if i + 1 < len(tokens) else ""
        if token.kind == "ident":
            word = token.text.lower()
            if word in _GROUPING:
                i = _closing(tokens, i + 1, "(", ")") + 1 if following == "(" else i + 1
            elif word in _KEYWORDS or following in {"(", "by", "without"}:
                i += 1
            else:
                matchers: tuple[tuple[str, str, str], ...] = ()
                i += 1
                if following == "{":
                    matchers, i = _matchers(tokens, i)
                found.append(Selector(token.text, matchers))
        elif token.text == "{":  # {__name__="..."} with no name in front
            matchers, i = _matchers(tokens, i)
            names = [value for label, op, value in matchers if label == "__name__" and op == "="]
            if not names:
                raise ValueError(f"a selector without an exact metric name cannot be checked: {expr!r}")
            found.append(Selector(names[0], matchers))
        elif token.text == "[":  # a range or subquery: durations, numbers and variables only
            i = _closing(tokens, i, "[", "]") + 1
        else:
            i += 1
    return found


def metric_names(expr: str) -> set[str]:
    return {s.name for s in selectors(expr)}


def grouping_labels(expr: str) -> set[str]:
    """The label names in every by, without, on, ignoring, group_left and group_right list of an expression."""
    tokens = tokenize(expr)
    _check_balanced(tokens)
    labels: set[str] = set()
    for i, token in enumerate(tokens[:-1]):
        if token.kind == "ident" and token.text.lower() in _GROUPING and tokens[i + 1].text == "(":
            end = _closing(tokens, i + 1, "(", ")")
            labels |= {t.text for t in tokens[i + 2 : end] if t.kind == "ident"}
    return labels


def grafana_variable_promql(query: str) -> str | None:
    """The PromQL inside a Grafana Prometheus variable query; None when it names no series."""
    if m := re.fullmatch(r"\s*label_values\((.*),\s*[A-Za-z_]\w*\s*\)\s*", query, re.S):
        return m.group(1)
    if m := re.fullmatch(r"\s*query_result\((.*)\)\s*", query, re.S):
        return m.group(1)
    if re.fullmatch(r"\s*(label_names\(\)|label_values\(\s*\w+\s*\)|metrics\(.*\))\s*", query, re.S):
        return None
    raise ValueError(f"unknown Grafana variable query: {query!r}")


# --- the files under test ---


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]]


def recorded_names() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def dashboard_panels(panels: list[dict[str, Any]] | None = None) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    for panel in dashboard()["panels"] if panels is None else panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def row_panels(title: str) -> list[dict[str, Any]]:
    """The panels under a row: those after it, up to the next row."""
    top = dashboard()["panels"]
    start = next(i for i, p in enumerate(top) if p["type"] == "row" and p["title"] == title)
    end = next((i for i in range(start + 1, len(top)) if top[i]["type"] == "row"), len(top))
    return top[start + 1 : end]


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in dashboard_panels() for target in panel.get("targets", [])]


def variables() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard()["templating"]["list"]}


def variable_query(variable: dict[str, Any]) -> str:
    query = variable["query"]
    return str(query["query"] if isinstance(query, dict) else query)


# --- the extractor itself ---


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('rate(sagemaker_invocations_total{endpoint_name="a", variant_name=~"$variant_name"}[5m])', {"sagemaker_invocations_total"}),
        (
            "histogram_quantile(0.99, sum by (le, endpoint_name) (rate(sagemaker_model_latency_seconds_bucket[$__rate_interval])))",
            {"sagemaker_model_latency_seconds_bucket"},
        ),
        ("sum(rate(a_total[5m])) without (instance) / ignoring(reason) group_left(host) b > bool 0.5", {"a_total", "b"}),
        ("sum without (job) (x) * on(instance) group_left up", {"x", "up"}),
        ('up{job="sagemaker-metrics-proxy"} == 0 or absent(up{job="rate(bogus[5m])"})', {"up"}),
        ("max_over_time(g[1h:5m] offset 1d) unless g @ start() and h @ 1609746000", {"g", "h"}),
        ('label_replace(m, "dst", "$1", "src", "(.*)") / 1e6 > 2.5e+06', {"m"}),
        ('{__name__="by_name", on="x"}', {"by_name"}),
        ("level:metric:rate5m{quantile=\"0.99\"} / 1e6 > 2", {"level:metric:rate5m"}),
        ("time() - max by (instance) (ts > 0) > 600", {"ts"}),
        ("count(count by (instance) (up)) > 0 # a comment naming not_a_metric", {"up"}),
        ("vector(1) + scalar(sum(m2)) - Inf + NaN", {"m2"}),
    ],
)
def test_extractor_finds_the_selected_metrics_and_nothing_else(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_extractor_keeps_label_matchers() -> None:
    (selector,) = selectors('rate(x_total{endpoint_name=~"$endpoint_name", reason!="timeout"}[5m])')
    assert selector.matcher("endpoint_name") == ("=~", "$endpoint_name")
    assert selector.matcher("reason") == ("!=", "timeout")
    assert selector.matcher("variant_name") is None


def test_extractor_catches_a_misspelled_metric_and_a_histogram_without_its_suffix() -> None:
    exported = exported_names()
    sample = (
        "sum by (endpoint_name) (rate(sagemaker_invocation_total[5m]))"  # missing the s of invocations
        " / histogram_quantile(0.99, rate(sagemaker_model_latency_seconds[5m]))"  # a histogram has no bare series
        " + sum(rate(sagemaker_invocations_total[5m]))"
    )
    assert metric_names(sample) - exported == {"sagemaker_invocation_total", "sagemaker_model_latency_seconds"}


@pytest.mark.parametrize(
    ("expr", "labels"),
    [
        ("sum by (le, endpoint_name) (rate(x_bucket[5m]))", {"le", "endpoint_name"}),
        ("sum(rate(a_total{on=\"x\"}[5m])) without (instance) / ignoring(reason) group_left(host) b", {"instance", "reason", "host"}),
        ("max by(finish_reason)(x) * on (instance) group_left up", {"finish_reason", "instance"}),
        ("rate(x[5m]) / rate(y[5m])", set()),
    ],
)
def test_grouping_labels_finds_every_grouping_list(expr: str, labels: set[str]) -> None:
    assert grouping_labels(expr) == labels


@pytest.mark.parametrize("expr", ["rate(x{a=}[5m])", "sum(rate(x[5m])", "sum(x))", 'x{a="b"', "rate(x[5m)]", "{job=~\"a.*\"}", "x ? y"])
def test_extractor_refuses_what_it_cannot_read(expr: str) -> None:
    with pytest.raises(ValueError):
        selectors(expr)


def test_exported_names_follow_the_prometheus_conventions() -> None:
    exported = exported_names()
    for metric in ALL_METRICS:
        if metric.kind is Kind.COUNTER:
            assert metric.prometheus_name.endswith("_total"), metric.prometheus_name
        if metric.kind is Kind.HISTOGRAM:
            assert metric.prometheus_name not in exported
    assert "sagemaker_model_latency_seconds_bucket" in exported and "sagemaker_invocations_total" in exported


# --- the dashboard ---


def test_dashboard_queries_only_metrics_the_proxy_exports() -> None:
    exprs = dashboard_exprs()
    for variable in variables().values():
        if variable["type"] == "query":
            promql = grafana_variable_promql(variable_query(variable))
            if promql is not None:
                exprs.append(promql)
    used: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert not names - exported_names(), f"{sorted(names - exported_names())} are not exported (in {expr!r})"
        used |= names
    assert len(used) > 15, sorted(used)


def test_every_dashboard_query_filters_by_endpoint_and_variant() -> None:
    exprs = dashboard_exprs()
    assert len(exprs) > 20
    for expr in exprs:
        for selector in selectors(expr):
            for label in ("endpoint_name", "variant_name"):
                assert selector.matcher(label) == ("=~", f"${label}"), f"{selector.name} in {expr!r} is not filtered by ${label}"


def test_dashboard_variables_and_data_source() -> None:
    data = dashboard()
    assert data["uid"] == "sagemaker-metrics-proxy" and data["schemaVersion"] >= 36
    found = variables()
    assert found["datasource"]["type"] == "datasource" and found["datasource"]["query"] == "prometheus"
    provisioned = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yaml")["datasources"]
    assert found["datasource"]["current"]["value"] in {d["uid"] for d in provisioned}
    for name in ("endpoint_name", "variant_name"):
        variable = found[name]
        assert variable["type"] == "query" and variable["datasource"] == DATASOURCE
        assert re.fullmatch(rf"label_values\(.*, {name}\)", variable_query(variable))
    # The variant list follows the chosen endpoints.
    assert '"$endpoint_name"' in variable_query(found["variant_name"])

    panels = [p for p in dashboard_panels() if p["type"] != "row"]
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"] for p in panels)
    for wanted in ("Invocations per second", "ModelLatency", "OverheadLatency", "InvocationsPerInstance", "Concurrent",
                   "Live instances", "CPU", "Memory", "GPU", "Disk", "Rejected", "Upstream errors", "Client disconnects",
                   "publish", "First chunk", "Mid-stream errors", "Tokens per second", "Time to first token",
                   "Time per output token", "Finish reasons", "Tokens per request", "Request and response size"):
        assert wanted in titles, wanted
    for panel in panels:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]


def test_dashboard_panels_tile_the_grid_in_order_without_overlap() -> None:
    """Grafana lays panels on a 24-column grid by gridPos and puts each under the row above it; two panels on one cell
    hide each other."""
    taken: dict[tuple[int, int], str] = {}
    top = dashboard()["panels"]
    for panel in top:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            assert (grid["x"], grid["w"], grid["h"]) == (0, 24, 1) and not panel.get("collapsed"), panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']!r} overlaps {taken[x, y]!r}"
                taken[x, y] = panel["title"]
    positions = [(p["gridPos"]["y"], p["gridPos"]["x"]) for p in top]
    assert positions == sorted(positions), "the panels are listed in the order they are laid out"


def test_dashboard_groups_and_legends_by_labels_the_series_carry() -> None:
    """A ``by (finish_reason)`` or a ``{{finish_reason}}`` legend names a label the queried metrics have; a wrong name
    merges every series into one, or leaves its part of the legend blank."""
    carried = carried_labels()
    legends = 0
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            expr = target["expr"]
            available = frozenset().union(*(carried[name] for name in metric_names(expr)))
            grouped = grouping_labels(expr)
            assert grouped <= available, f"{panel['title']!r} groups by {sorted(grouped - available)}, which its metrics lack"
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            assert legend <= grouped, f"{panel['title']!r} shows {sorted(legend - grouped)} in its legend, which its query drops"
            legends += len(legend)
    assert legends > 40


# What a panel queries -> the Grafana unit it shows ("count:" is Grafana's custom unit: 1.2K tokens/s).
PANEL_UNITS = {
    r"_seconds_(bucket|sum|count)\b": "s",
    r"_bytes_(bucket|sum|count)\b": "bytes",
    r"\brate\(sagemaker_(input|output)_tokens_total\b": "count:tokens/s",
    r"\bsagemaker_request_(input|output)_tokens_bucket\b": "count:tokens",
}


@pytest.mark.parametrize(("pattern", "unit"), PANEL_UNITS.items())
def test_panels_show_the_unit_of_what_they_query(pattern: str, unit: str) -> None:
    """Durations are exported in seconds and sizes in bytes: their panels say so, and no query converts them."""
    panels = [p for p in dashboard_panels() if p["type"] != "row"]
    matching = [p for p in panels if any(re.search(pattern, t["expr"]) for t in p["targets"])]
    assert matching, pattern
    for panel in matching:
        assert panel["fieldConfig"]["defaults"]["unit"] == unit, panel["title"]


def test_no_query_converts_seconds() -> None:
    for expr in dashboard_exprs() + [rule["expr"] for rule in rules()]:
        assert not re.search(r"\b1e[36]\b|_microseconds", expr), expr


def test_latency_panels_take_quantiles_of_bucket_rates_by_le() -> None:
    quantile_exprs = [e for e in dashboard_exprs() if "histogram_quantile" in e]
    assert len(quantile_exprs) >= 8
    for expr in quantile_exprs:
        assert re.search(r"sum by \(le\b[^)]*\) \(rate\(\w+_bucket\{", expr), expr


def quantiles(panel: dict[str, Any]) -> dict[str, set[str]]:
    """The quantiles a panel takes of each histogram: ``{"sagemaker_x_seconds": {"0.5", "0.9"}}``."""
    found: dict[str, set[str]] = {}
    for target in panel["targets"]:
        for q, name in re.findall(r"histogram_quantile\(([\d.]+), sum by \(le\b[^)]*\) \(rate\((\w+)_bucket\{", target["expr"]):
            found.setdefault(name, set()).add(q)
    return found


def sample_name(metric: MetricDefinition) -> str:
    return metric.prometheus_name + ("_bucket" if metric.kind is Kind.HISTOGRAM else "")


def test_llm_serving_row_shows_every_token_metric_and_the_sizes() -> None:
    """Each token metric and the request and response sizes are on the LLM serving row; the first-token times as
    p50, p90 and p99, the per-request histograms at least as p50 and p90."""
    panels = row_panels("LLM serving")
    queried = {name for p in panels for t in p["targets"] for name in metric_names(t["expr"])}
    for metric in (*TOKEN_METRICS, REQUEST_SIZE, RESPONSE_SIZE):
        assert sample_name(metric) in queried, metric.prometheus_name
    taken: dict[str, set[str]] = {}
    for panel in panels:
        for name, qs in quantiles(panel).items():
            taken.setdefault(name, set()).update(qs)
    for metric in (TIME_TO_FIRST_TOKEN, TIME_PER_OUTPUT_TOKEN):
        assert taken[metric.prometheus_name] == {"0.5", "0.9", "0.99"}, metric.prometheus_name
    for metric in (*TOKEN_METRICS, REQUEST_SIZE, RESPONSE_SIZE):
        if metric.kind is Kind.HISTOGRAM:
            assert {"0.5", "0.9"} <= taken.get(metric.prometheus_name, set()), metric.prometheus_name
    (finish,) = [t["expr"] for p in panels for t in p["targets"] if "sagemaker_requests_finished_total" in t["expr"]]
    assert "finish_reason" in grouping_labels(finish), finish


def test_first_chunk_latency_and_its_split_share_a_panel() -> None:
    """FirstChunkLatency next to its model and overhead parts, so the split reads against the total."""
    wanted = {sample_name(m) for m in (FIRST_CHUNK_LATENCY, FIRST_CHUNK_MODEL_LATENCY, FIRST_CHUNK_OVERHEAD_LATENCY)}
    panels = [p for p in dashboard_panels() if p["type"] != "row"]
    assert any(wanted <= {n for t in p["targets"] for n in metric_names(t["expr"])} for p in panels), sorted(wanted)


# --- the rules ---


def test_rules_query_only_metrics_the_proxy_exports() -> None:
    recorded = recorded_names()
    assert all(name.count(":") == 2 for name in recorded), recorded  # level:metric:operations, never a product name
    used: set[str] = set()
    for rule in rules():
        names = metric_names(rule["expr"])
        assert names, rule
        unknown = names - exported_names() - recorded
        assert not unknown, f"{sorted(unknown)} are not exported (in {rule.get('record') or rule.get('alert')})"
        used |= names - recorded
    assert len(used) >= 10, sorted(used)


def test_alerts_have_a_severity_a_summary_and_a_description() -> None:
    alerts = [rule for rule in rules() if "alert" in rule]
    assert len(alerts) >= 7
    for alert in alerts:
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}, alert["alert"]
        assert alert["annotations"]["summary"] and alert["annotations"]["description"], alert["alert"]


def test_every_alert_fires_in_the_rule_tests_and_recorded_values_are_checked() -> None:
    tests = load_yaml(RULES_TEST)["tests"]
    fired = {case["alertname"] for t in tests for case in t.get("alert_rule_test", []) if case["exp_alerts"]}
    assert fired == {rule["alert"] for rule in rules() if "alert" in rule}
    checked = {name for t in tests for case in t.get("promql_expr_test", []) for name in metric_names(case["expr"])}
    assert len(checked & recorded_names()) >= 2


def test_prometheus_scrapes_the_proxy_and_loads_the_rules_compose_mounts() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == JOB]
    assert job["scrape_interval"] == "5s"
    assert [t for sc in job["static_configs"] for t in sc["targets"]] == ["proxy:9090"]
    assert config["rule_files"] == ["/etc/prometheus/rules.yml"]
    # The compose stack mounts this rules file where the config looks for it, and the dashboards where Grafana does.
    services = load_yaml(DEPLOY / "compose.yaml")["services"]
    mounts = {v.split(":")[1]: (DEPLOY / v.split(":")[0]).resolve() for v in services["prometheus"]["volumes"]}
    assert mounts["/etc/prometheus/rules.yml"] == RULES.resolve()
    grafana_mounts = {v.split(":")[1]: (DEPLOY / v.split(":")[0]).resolve() for v in services["grafana"]["volumes"]}
    providers = load_yaml(GRAFANA / "provisioning" / "dashboards" / "dashboards.yaml")["providers"]
    assert grafana_mounts[providers[0]["options"]["path"]] == DASHBOARD.parent.resolve()
    (datasource,) = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yaml")["datasources"]
    assert datasource["url"] == "http://prometheus:9090" and datasource["uid"] == "prometheus" and "prometheus" in services


# --- promtool ---


@pytest.fixture
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing; .ci/run installs Debian's prometheus package")
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return path


def run_promtool(promtool: str, *args: str | Path) -> str:
    result = subprocess.run([promtool, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def test_promtool_checks_the_rules(promtool: str) -> None:
    assert "SUCCESS" in run_promtool(promtool, "check", "rules", RULES)


def test_promtool_checks_the_config_with_its_rules(promtool: str, tmp_path: Path) -> None:
    # The config names the rules by their path in the container; point it at this checkout's file.
    config = load_yaml(PROMETHEUS_CONFIG)
    config["rule_files"] = [str(RULES) if f == "/etc/prometheus/rules.yml" else f for f in config["rule_files"]]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config))
    output = run_promtool(promtool, "check", "config", local)
    assert "SUCCESS" in output and str(RULES) in output


def test_promtool_runs_the_rule_unit_tests(promtool: str) -> None:
    assert "SUCCESS" in run_promtool(promtool, "test", "rules", RULES_TEST)


# --- a real Prometheus, with the rules, scraping the proxy after real chat streams ---


def query_all(prometheus: str, promql: str) -> list[tuple[dict[str, str], float]]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}).json()
    assert response["status"] == "success", response
    return [(r["metric"], float(r["value"][1])) for r in response["data"]["result"]]


def wait_for_series(prometheus: str, promql: str, timeout: float = 15) -> list[tuple[dict[str, str], float]]:
    deadline = time.monotonic() + timeout
    while not (results := query_all(prometheus, promql)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return results


@pytest.mark.e2e
def test_llm_serving_panels_and_first_token_rules_answer_from_a_real_prometheus(
    prometheus_binary: str, model: Running, start_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    """Names that exist are not enough: each query of the LLM serving row returns numbers for the variant once chat
    streams went through, and the recorded time to first token sits in the bucket that holds the model's first token."""
    proxy = start_proxy(model.url, "--invocation-route", "POST /v1/chat/completions")
    with running_prometheus(prometheus_binary, f"127.0.0.1:{proxy.metrics_port}", tmp_path, rules=RULES) as prometheus:
        # A scrape before the streams, so the rates over the window see them arrive.
        assert wait_for_value(prometheus, f'up{{job="{JOB}"}}', 1) == 1
        sent = 8
        body = {"messages": [{"role": "user", "content": "three words here"}], "max_tokens": 5, "stream": True,
                "stream_options": {"include_usage": True}}
        for _ in range(sent):
            r = httpx.post(f"{proxy.url}/v1/chat/completions", json=body, headers={"X-Test-First-Token-Ms": "200"}, timeout=10)
            assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]"), r.text
        finished = 'sum(sagemaker_requests_finished_total{finish_reason="length"})'
        assert wait_for_value(prometheus, finished, sent) == sent

        variables = {"$endpoint_name": "test-endpoint", "$variant_name": "AllTraffic", "$__rate_interval": "1m"}
        for panel in row_panels("LLM serving"):
            for target in panel["targets"]:
                expr = target["expr"]
                for variable, text in variables.items():
                    expr = expr.replace(variable, text)
                results = query_all(prometheus, expr)
                assert results, f"{panel['title']!r}: no series for {expr}"
                for labels, value in results:
                    assert math.isfinite(value) and value >= 0, (panel["title"], labels, value)
                    assert (labels["endpoint_name"], labels["variant_name"]) == ("test-endpoint", "AllTraffic"), labels
                if "finish_reason" in grouping_labels(expr):
                    reasons = {labels["finish_reason"]: value for labels, value in results}
                    assert reasons["length"] > 0 and reasons["stop"] == 0, reasons

        # The model sends its role chunk at once and its first token 200 ms later: (0.1, 0.25] s. The rule's evaluations
        # before the streams recorded NaN; ">= 0" waits for one after them.
        recorded = "endpoint_name_variant_name:sagemaker_time_to_first_token_seconds:histogram_quantile_rate5m"
        ((_, p90),) = wait_for_series(prometheus, f'{recorded}{{quantile="0.9", endpoint_name="test-endpoint"}} >= 0')
        assert 0.1 < p90 <= 0.25, p90

