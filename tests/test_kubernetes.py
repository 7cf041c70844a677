"""The Kubernetes files in deploy/kubernetes/: valid against the schemas, consistent with each other and with the
proxy, and their autoscaling queries give the right numbers from a real Prometheus scraping two real proxies."""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml

from tests.conftest import ROOT, Proxy, Running, free_port, start, wait_for_port

K8S = ROOT / "deploy" / "kubernetes"
CRD_SCHEMAS = ROOT / "tests" / "data" / "crd-schemas.yaml"
CORE_API_GROUPS = ("v1", "apps/v1", "policy/v1", "autoscaling/v2")
# The oldest Kubernetes schema that kubernetes-validate ships, and its default (the newest).
KUBERNETES_VERSIONS = ("1.25.0", None)


def documents() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def one(kind: str, api_version: str | None = None) -> dict[str, Any]:
    found = [doc for _, doc in documents() if doc["kind"] == kind and api_version in (None, doc["apiVersion"])]
    assert len(found) == 1, f"{len(found)} {kind} in {K8S}"
    return found[0]


def pod_spec() -> dict[str, Any]:
    return one("Deployment")["spec"]["template"]["spec"]


def container(name: str) -> dict[str, Any]:
    return next(c for c in pod_spec()["containers"] if c["name"] == name)


def env(container_spec: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container_spec.get("env", []) if "value" in e}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector's matchLabels (the only form these files use) against a set of labels."""
    assert set(selector) <= {"matchLabels"}, selector
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


@cache
def serve_options() -> dict[str, str | None]:
    """Each environment variable of `serve` and its default, as `serve --help` shows them (help is on one line per
    option at this width)."""
    text = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--help"], capture_output=True, text=True, check=True, cwd=ROOT,
        env={**os.environ, "COLUMNS": "100000"},
    ).stdout
    out: dict[str, str | None] = {}
    for line in text.splitlines():
        found = re.search(r"\[env (SAGEMAKER_PROXY_[A-Z_]+)\]", line)
        if found:
            default = re.search(r"\(default ([^)]+)\)", line)
            out[found.group(1)] = default.group(1) if default else None
    assert "SAGEMAKER_PROXY_INSTANCE_COUNT_FROM" in out, text
    return out


# -- schemas ---------------------------------------------------------------------------------------------


def tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is missing; .ci/run installs it")
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return found


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS, ids=lambda v: v or "newest")
def test_core_kinds_validate_strictly_against_the_kubernetes_schemas(version: str | None) -> None:
    files = sorted(str(p) for p in K8S.glob("*.yaml"))
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", *(("-k", version) if version else ()), *files], capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    passed = set(re.findall(r"passed for resource (\S+) against", result.stdout))
    core = {f"{d['kind'].lower()}/{d['metadata']['name']}" for _, d in documents() if d["apiVersion"] in CORE_API_GROUPS}
    assert passed == core, (passed, core)
    # The only kinds without a Kubernetes schema are the custom resources, checked below against theirs.
    unknown = set(re.findall(r"Couldn't find schema for kind (\w+) with api version (\S+)", result.stdout))
    assert unknown == {("ServiceMonitor", "monitoring.coreos.com/v1"), ("PodMonitor", "monitoring.coreos.com/v1"), ("ScaledObject", "keda.sh/v1alpha1")}


def crd_validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    data = yaml.safe_load(CRD_SCHEMAS.read_text())
    schema = {"$defs": data["$defs"], **data["kinds"][f"{api_version}/{kind}"]}
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_custom_resources_validate_against_the_crd_schemas() -> None:
    custom = [(p, d) for p, d in documents() if d["apiVersion"] not in CORE_API_GROUPS]
    assert {d["kind"] for _, d in custom} == {"ServiceMonitor", "PodMonitor", "ScaledObject"}
    for path, doc in custom:
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validator(doc["apiVersion"], doc["kind"]).iter_errors(doc)]
        assert not errors, f"{path.name} {doc['kind']}: {errors}"


def test_the_crd_schemas_catch_what_the_api_server_would_refuse() -> None:
    """The shipped schemas are not vacuous: a misspelt field and a numeric KEDA threshold both fail."""
    scaled = one("ScaledObject")
    validator = crd_validator(scaled["apiVersion"], scaled["kind"])
    assert validator.is_valid(scaled)
    bad_threshold = yaml.safe_load(yaml.safe_dump(scaled))
    bad_threshold["spec"]["triggers"][0]["metadata"]["threshold"] = 10
    assert not validator.is_valid(bad_threshold)
    misspelt = yaml.safe_load(yaml.safe_dump(scaled))
    misspelt["spec"]["scaleTargetRef"]["nmae"] = misspelt["spec"]["scaleTargetRef"].pop("name")
    assert not validator.is_valid(misspelt)
    monitor = one("ServiceMonitor")
    bad_interval = yaml.safe_load(yaml.safe_dump(monitor))
    bad_interval["spec"]["endpoints"][0]["interval"] = "15 seconds"
    assert not crd_validator(monitor["apiVersion"], monitor["kind"]).is_valid(bad_interval)


# -- cross-checks ----------------------------------------------------------------------------------------


def test_selectors_match_the_pods() -> None:
    deployment = one("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"], pod_labels)
    for service in (d for _, d in documents() if d["kind"] == "Service"):
        assert all(pod_labels.get(k) == v for k, v in service["spec"]["selector"].items()), service["metadata"]["name"]
    assert selects(one("PodDisruptionBudget")["spec"]["selector"], pod_labels)
    assert selects(one("PodMonitor")["spec"]["selector"], pod_labels)


def test_the_service_monitor_selects_the_client_service_only() -> None:
    """Both Services front the same pods: a monitor that selected both would scrape each pod twice."""
    services = [d for _, d in documents() if d["kind"] == "Service"]
    selector = one("ServiceMonitor")["spec"]["selector"]
    selected = [s["metadata"]["name"] for s in services if selects(selector, s["metadata"]["labels"])]
    assert selected == ["iris-model"]


def test_ports_referenced_by_name_exist() -> None:
    proxy = container("proxy")
    container_ports = {p["name"]: p["containerPort"] for c in pod_spec()["containers"] for p in c.get("ports", [])}
    assert container_ports == {"http": 8080, "metrics": 9090}
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    services = {d["metadata"]["name"]: d for _, d in documents() if d["kind"] == "Service"}
    for service in services.values():
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports, (service["metadata"]["name"], port)
    client = services["iris-model"]
    for endpoint in one("ServiceMonitor")["spec"]["endpoints"]:
        assert endpoint["port"] in {p["name"] for p in client["spec"]["ports"]}
        assert endpoint["path"] == "/metrics"
    for endpoint in one("PodMonitor")["spec"]["podMetricsEndpoints"]:
        assert endpoint["port"] in container_ports and endpoint["path"] == "/metrics"
    # The model listens where the proxy forwards, and the image is used as built locally.
    assert env(proxy)["SAGEMAKER_PROXY_UPSTREAM"] == "http://127.0.0.1:8081"
    assert container("model")["command"][-2:] == ["--port", "8081"]
    for c in pod_spec()["containers"]:
        assert c["imagePullPolicy"] == "IfNotPresent" and not c["image"].endswith(":latest")


def test_the_instance_count_follows_the_ready_pods_of_the_headless_service() -> None:
    proxy_env = env(container("proxy"))
    assert "SAGEMAKER_PROXY_INSTANCE_COUNT" not in proxy_env, "a static count is wrong as soon as the Deployment scales"
    source = proxy_env["SAGEMAKER_PROXY_INSTANCE_COUNT_FROM"]
    assert source.startswith("dns:")
    name = source.removeprefix("dns:")
    headless = [d for _, d in documents() if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"]
    assert len(headless) == 1
    service = headless[0]
    # The short name, or the name qualified with a namespace and the cluster domain.
    assert name.split(".")[0] == service["metadata"]["name"], (name, service["metadata"]["name"])
    assert service["spec"]["publishNotReadyAddresses"] is False
    assert service["spec"]["ipFamilyPolicy"] == "SingleStack"  # a dual-stack pod would have two addresses
    assert float(proxy_env["SAGEMAKER_PROXY_INSTANCE_COUNT_INTERVAL"]) <= 10


def test_the_proxy_environment_names_real_settings() -> None:
    options = serve_options()
    for c in pod_spec()["containers"]:
        for name in env(c):
            assert name in options, f"{c['name']}: {name} is not a setting of serve"


def test_termination_grace_covers_the_drain() -> None:
    """preStop sleep + the longest in-flight invocation + the last CloudWatch flush fit in the grace period."""
    spec = pod_spec()
    proxy = container("proxy")
    command = proxy["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    options = serve_options()
    invocation_timeout = float(env(proxy).get("SAGEMAKER_PROXY_INVOCATION_TIMEOUT") or options["SAGEMAKER_PROXY_INVOCATION_TIMEOUT"] or 0)
    flush = float(env(proxy).get("SAGEMAKER_PROXY_CLOUDWATCH_FLUSH_TIMEOUT") or options["SAGEMAKER_PROXY_CLOUDWATCH_FLUSH_TIMEOUT"] or 0)
    linger = float(env(proxy).get("SAGEMAKER_PROXY_ADMIN_LINGER") or options["SAGEMAKER_PROXY_ADMIN_LINGER"] or 0)
    spans = float(env(proxy).get("SAGEMAKER_PROXY_OTEL_SHUTDOWN_TIMEOUT") or options["SAGEMAKER_PROXY_OTEL_SHUTDOWN_TIMEOUT"] or 0)
    assert invocation_timeout > 0 and flush > 0 and linger > 0 and spans > 0
    needed = pre_stop + invocation_timeout + linger + flush + spans
    assert spec["terminationGracePeriodSeconds"] >= needed, (spec["terminationGracePeriodSeconds"], pre_stop, invocation_timeout, linger, flush, spans)
    # The comment that states the arithmetic states this grace period.
    text = (K8S / "model-with-proxy.yaml").read_text()
    assert f"= {spec['terminationGracePeriodSeconds']} s" in text
    pdb = one("PodDisruptionBudget")["spec"]
    assert pdb.get("maxUnavailable") == 1 or pdb.get("minAvailable") == 1


def test_autoscalers_target_the_deployment() -> None:
    deployment = one("Deployment")
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    scaled, hpa = one("ScaledObject"), one("HorizontalPodAutoscaler")
    assert scaled["spec"]["scaleTargetRef"] == target
    assert hpa["spec"]["scaleTargetRef"] == target
    # At least two, the PodDisruptionBudget's one at a time leaves one serving.
    assert scaled["spec"]["minReplicaCount"] >= 2 and hpa["spec"]["minReplicas"] >= 2
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    proxy_env = env(container("proxy"))
    labels = f'endpoint_name="{proxy_env["SAGEMAKER_PROXY_ENDPOINT_NAME"]}",variant_name="{proxy_env["SAGEMAKER_PROXY_VARIANT_NAME"]}"'
    assert labels in trigger["metadata"]["query"]


def adapter_rule() -> dict[str, Any]:
    config = yaml.safe_load(one("ConfigMap")["data"]["config.yaml"])
    rules = config["rules"]
    assert len(rules) == 1
    return rules[0]


def test_the_hpa_metric_is_the_one_the_adapter_rule_serves() -> None:
    rule = adapter_rule()
    series = re.fullmatch(r"(\w+)\{(.*)\}", rule["seriesQuery"])
    assert series, rule["seriesQuery"]
    assert {"namespace", "pod"} <= set(re.findall(r'(\w+)!=""', series.group(2)))
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    # The adapter's naming: `matches` against the series name, `as` with $1/${1} for its groups.
    exposed = re.sub(rule["name"]["matches"], re.sub(r"\$\{?(\d+)\}?", r"\\\1", rule["name"]["as"]), series.group(1))
    metric = one("HorizontalPodAutoscaler")["spec"]["metrics"]
    assert len(metric) == 1 and metric[0]["type"] == "Pods"
    assert metric[0]["pods"]["metric"]["name"] == exposed
    assert metric[0]["pods"]["target"]["type"] == "AverageValue"
    assert "rate(<<.Series>>{<<.LabelMatchers>>}" in rule["metricsQuery"] and "by (<<.GroupBy>>)" in rule["metricsQuery"]


# -- the model container outlives the proxy's drain ------------------------------------------------------------


@pytest.mark.e2e
def test_the_model_pre_stop_hook_waits_for_the_proxy_to_drain(start_proxy: Callable[..., Proxy], tmp_path: Path) -> None:
    """The model's preStop hook, run as the kubelet would (with the proxy's admin port of this test), then the model
    killed the moment it returns: the proxy, stopped with an invocation in flight, still answers it with 200."""
    hook = container("model")["lifecycle"]["preStop"]["exec"]["command"]
    assert hook[:2] == ["python", "-c"] and '"127.0.0.1", 9090' in hook[2]
    port = free_port()
    model = start(["-m", "example_model", "--host", "127.0.0.1", "--test-knobs", "--port", str(port)], port, tmp_path / "model.log")
    try:
        proxy = start_proxy(model.url)
        answers: list[int] = []
        slow = threading.Thread(
            target=lambda: answers.append(
                httpx.post(f"{proxy.url}/invocations", json={"instances": [[5.1, 3.5, 1.4, 0.2]]}, headers={"X-Test-Delay-Ms": "1500"}, timeout=10).status_code
            )
        )
        slow.start()
        deadline = time.monotonic() + 5
        while proxy.value("sagemaker_concurrent_requests_per_model") != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proxy.value("sagemaker_concurrent_requests_per_model") == 1, "the invocation never reached the proxy"
        script = hook[2].replace('"127.0.0.1", 9090', f'"127.0.0.1", {proxy.metrics_port}')
        waiting = subprocess.Popen([sys.executable, "-c", script])
        try:
            proxy.proc.send_signal(signal.SIGTERM)
            assert waiting.wait(15) == 0
            model.proc.kill()  # what the kubelet's SIGTERM, then SIGKILL, may do to a model the moment its hook returns
            slow.join(10)
            assert answers == [200], "the model was stopped before the proxy had drained"
            assert proxy.proc.wait(10) == 0
        finally:
            if waiting.poll() is None:
                waiting.kill()
    finally:
        model.stop()


# -- the autoscaling queries against a real Prometheus ----------------------------------------------------


NAMESPACE = "sagemaker-test"
RATES = {"iris-model-7d9f8-aaaaa": 20.0, "iris-model-7d9f8-bbbbb": 10.0}  # invocations per second at each pod
INSTANCES = 2  # n of InvocationsPerInstance on both proxies
WINDOW_S = 8  # the rate window the test puts in place of the files' [1m]: the load runs seconds, not minutes
LOAD_S = 12.0
TOLERANCE = 0.15


@contextmanager
def prometheus_scraping_pods(binary: str, pods: dict[str, Proxy], tmp_path: Path) -> Iterator[str]:
    """Prometheus scraping each proxy every second, with the `namespace` and `pod` labels that the Operator's
    generated scrape config gives a PodMonitor target (relabelled from the same __meta_kubernetes_* labels)."""
    targets = "".join(
        f"      - targets: ['127.0.0.1:{proxy.metrics_port}']\n"
        f"        labels: {{__meta_kubernetes_namespace: {NAMESPACE}, __meta_kubernetes_pod_name: {pod}}}\n"
        for pod, proxy in pods.items()
    )
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: {NAMESPACE}/iris-model\n"
        "    static_configs:\n"
        f"{targets}"
        "    relabel_configs:\n"
        "      - {source_labels: [__meta_kubernetes_namespace], target_label: namespace}\n"
        "      - {source_labels: [__meta_kubernetes_pod_name], target_label: pod}\n"
    )
    port = free_port()
    with (tmp_path / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, proc, timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(15)


def query(prometheus: str, promql: str, at: float | None = None) -> dict[str, float]:
    """An instant query: each result series' `pod` label (or "" where it has none) and its value."""
    params = {"query": promql, **({"time": f"{at:.3f}"} if at is not None else {})}
    response = httpx.get(f"{prometheus}/api/v1/query", params=params).json()
    assert response["status"] == "success", response
    return {r["metric"].get("pod", ""): float(r["value"][1]) for r in response["data"]["result"]}


def drive(url: str, rate: float, until: float, sent: list[int]) -> None:
    """Requests at ``rate`` per second on a fixed schedule until ``until``: a late one is sent at once, so the count
    over any few seconds stays at the rate even when the machine stalls for a moment."""
    with httpx.Client(timeout=10) as client:
        start, i = time.monotonic(), 0
        while (due := start + i / rate) < until:
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            assert client.post(f"{url}/invocations", json={"instances": [[5.1, 3.5, 1.4, 0.2]]}).status_code == 200
            i += 1
    sent.append(i)


def with_window(promql: str) -> str:
    """The files' query with the test's rate window in place of its one `[1m]`."""
    assert promql.count("[1m]") == 1, promql
    return promql.replace("[1m]", f"[{WINDOW_S}s]")


@pytest.mark.e2e
def test_the_autoscaling_queries_give_the_load_per_pod(
    prometheus_binary: str, model: Running, start_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    proxy_env = env(container("proxy"))
    labels = ("--endpoint-name", proxy_env["SAGEMAKER_PROXY_ENDPOINT_NAME"], "--variant-name", proxy_env["SAGEMAKER_PROXY_VARIANT_NAME"])
    pods = {pod: start_proxy(model.url, *labels, "--instance-count", str(INSTANCES)) for pod in RATES}
    with prometheus_scraping_pods(prometheus_binary, pods, tmp_path) as prometheus:
        deadline = time.monotonic() + 30
        while query(prometheus, "sum(up)").get("") != len(pods) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert query(prometheus, "sum(up)").get("") == len(pods), "Prometheus did not scrape both proxies"

        sent: list[int] = []
        until = time.monotonic() + LOAD_S
        load = [threading.Thread(target=drive, args=(pods[pod].url, rate, until, sent)) for pod, rate in RATES.items()]
        for thread in load:
            thread.start()
        for thread in load:
            thread.join(LOAD_S + 20)
        assert len(sent) == len(RATES), "a load thread failed"
        # Evaluate where the window lies inside the load: it ended a moment ago; one more scrape for its last second.
        at = time.time() - 1.5
        time.sleep(1.5)

        total = sum(RATES.values())
        keda = one("ScaledObject")["spec"]["triggers"][0]["metadata"]
        keda_value = query(prometheus, with_window(keda["query"]), at)
        assert set(keda_value) == {""}, keda_value  # one element, as KEDA needs
        threshold = float(keda["threshold"])
        desired = math.ceil(keda_value[""] / threshold)
        print(f"KEDA query: {keda_value[''] :.2f}/s (sent {total:.0f}/s); at threshold {threshold:g}: {desired} replicas")
        assert keda_value[""] == pytest.approx(total, rel=TOLERANCE)

        # The adapter's query as it renders it for `pods/<metric>` of these two pods in the namespace.
        rule = adapter_rule()
        series = rule["seriesQuery"].split("{")[0]
        matchers = f'namespace="{NAMESPACE}",pod=~"{"|".join(RATES)}"'
        rendered = rule["metricsQuery"].replace("<<.Series>>", series).replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", "pod")
        per_pod = query(prometheus, with_window(rendered), at)
        print(f"adapter query per pod: { {p: round(v, 2) for p, v in per_pod.items()} } (sent {RATES})")
        assert set(per_pod) == set(RATES)
        for pod, rate in RATES.items():
            assert per_pod[pod] == pytest.approx(rate, rel=TOLERANCE), pod
        # What the HPA makes of it: the average over the pods is InvocationsPerInstance, the total over n.
        target = float(one("HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["target"]["averageValue"])
        average = sum(per_pod.values()) / len(per_pod)
        print(f"HPA: average {average:.2f}/s per pod; at {target:g}: {math.ceil(len(per_pod) * average / target)} replicas")

        # The same load seen through InvocationsPerInstance (1/n per invocation, n = 2): summed over the pods it is
        # SageMaker's InvocationsPerInstance, which equals the HPA's average above; per pod it is the pod's rate / n.
        ipi = with_window(f'sum by (pod) (rate(sagemaker_invocations_per_instance_total{{namespace="{NAMESPACE}"}}[1m]))')
        ipi_per_pod = query(prometheus, ipi, at)
        print(f"InvocationsPerInstance per pod: { {p: round(v, 2) for p, v in ipi_per_pod.items()} }, sum {sum(ipi_per_pod.values()):.2f}/s")
        for pod, rate in RATES.items():
            assert ipi_per_pod[pod] == pytest.approx(rate / INSTANCES, rel=TOLERANCE), pod
        assert sum(ipi_per_pod.values()) == pytest.approx(total / INSTANCES, rel=TOLERANCE)
        assert sum(ipi_per_pod.values()) == pytest.approx(average, rel=TOLERANCE)
