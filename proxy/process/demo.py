"""``sagemaker-metrics-proxy demo``: the example model behind the proxy, a mix of traffic, and a live table."""

from __future__ import annotations

import http.client
import json
import random
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from prometheus_client.parser import text_string_to_metric_families

from metrics import definitions as d
from proxy.process.children import free_port, started, wait_for

ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]
CONCURRENCY = 8
TIMEOUT_S = 0.5


def _request_mix(rng: random.Random) -> tuple[str, bytes, dict[str, str]]:
    """One request of the mix: mostly good predictions, some bad input, model failures, streams and timeouts."""
    roll = rng.random()
    headers = {"Content-Type": "application/json"}
    body = json.dumps({"instances": [rng.choice(ROWS)]}).encode()
    if roll < 0.08:
        body = b'{"instances": [[1, 2]]}'  # wrong number of features: the model answers 400
    elif roll < 0.13:
        headers["X-Test-Status"] = "500"
    elif roll < 0.15:
        headers["X-Test-Delay-Ms"] = str(TIMEOUT_S * 2000)  # past the invocation timeout: 504
    elif roll < 0.20:
        headers["X-Test-Stream-Chunks"] = "5"
        headers["X-Test-Stream-Interval-Ms"] = "10"
    else:
        headers["X-Test-Delay-Ms"] = f"{rng.uniform(2, 30):.1f}"
    return "/invocations", body, headers


def _send(port: int, request: tuple[str, bytes, dict[str, str]]) -> int:
    path, body, headers = request
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def _scrape(metrics_port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    conn = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=5)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def _total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    return sum(v for _, v in samples.get(name, []))


def _quantile(samples: dict[str, list[tuple[dict[str, str], float]]], histogram: str, q: float) -> float:
    """Like PromQL's histogram_quantile: linear interpolation inside the bucket that holds the rank."""
    buckets = sorted((float(labels["le"]), v) for labels, v in samples.get(histogram + "_bucket", []))
    if not buckets or buckets[-1][1] == 0:
        return float("nan")
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / max(count - lower_count, 1e-9)
        lower_bound, lower_count = bound, count
    return lower_bound


def _table(samples: dict[str, list[tuple[dict[str, str], float]]]) -> list[str]:
    def ms(seconds: float) -> str:
        return "      -" if seconds != seconds else f"{seconds * 1000:7.2f}"

    rows = [
        ("Invocations", d.INVOCATIONS),
        ("Invocation4XXErrors", d.INVOCATION_4XX_ERRORS),
        ("Invocation5XXErrors", d.INVOCATION_5XX_ERRORS),
        ("InvocationModelErrors", d.INVOCATION_MODEL_ERRORS),
        ("InvocationsPerInstance", d.INVOCATIONS_PER_INSTANCE),
        ("ConcurrentRequestsPerModel", d.CONCURRENT_REQUESTS_PER_MODEL),
    ]
    lines = [f"  {'metric':<28}{'value':>10}"]
    for label, metric in rows:
        lines.append(f"  {label:<28}{_total(samples, metric.prometheus_name):>10.1f}")
    lines.append("")
    lines.append(f"  {'latency (ms)':<28}{'mean':>8}{'p50':>8}{'p90':>8}{'p99':>8}")
    for label, metric in (("ModelLatency", d.MODEL_LATENCY), ("OverheadLatency", d.OVERHEAD_LATENCY)):
        name = metric.prometheus_name
        count = _total(samples, name + "_count")
        mean = _total(samples, name + "_sum") / count if count else float("nan")
        quantiles = "".join(f" {ms(_quantile(samples, name, q))}" for q in (0.5, 0.9, 0.99))
        lines.append(f"  {label:<28}{ms(mean)}{quantiles}")
    lines.append("")
    rejected = {labels["reason"]: v for labels, v in samples.get(d.REJECTED_REQUESTS.prometheus_name, []) if v}
    failed = {labels["reason"]: v for labels, v in samples.get(d.UPSTREAM_ERRORS.prometheus_name, []) if v}
    lines.append(f"  model call failures: {', '.join(f'{k}={v:g}' for k, v in failed.items()) or 'none'}")
    lines.append(f"  refused by the proxy: {', '.join(f'{k}={v:g}' for k, v in rejected.items()) or 'none'}")
    return lines


def _drive(proxy_port: int, metrics_port: int, requests: int) -> None:
    """Sends the mix, a few at a time, redrawing the table from /metrics as the answers come."""
    tty = sys.stdout.isatty()
    rng = random.Random(7)
    mix = [_request_mix(rng) for _ in range(requests)]
    done = 0
    lock = threading.Lock()

    def one(request: tuple[str, bytes, dict[str, str]]) -> None:
        nonlocal done
        _send(proxy_port, request)
        with lock:
            done += 1

    drawn = 0
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        futures = [pool.submit(one, r) for r in mix]
        while True:
            finished = all(f.done() for f in futures)
            width = min(shutil.get_terminal_size().columns, 100) - 30
            table = _table(_scrape(metrics_port))  # scraped first: an invocation counted there has been answered
            filled = int(width * done / requests)
            lines = [f"  [{'#' * filled}{'.' * (width - filled)}] {done}/{requests} requests answered", "", *table]
            if tty:
                if drawn:
                    sys.stdout.write(f"\x1b[{drawn}F")
                sys.stdout.write("".join(f"{line}\x1b[K\n" for line in lines))
                sys.stdout.flush()
                drawn = len(lines)
            elif finished:
                print("\n".join(lines))
            if finished:
                break
            time.sleep(0.25)
        for f in futures:
            f.result()


def run(*, requests: int, keep_running: bool) -> int:
    model_port, proxy_port, metrics_port = free_port(), free_port(), free_port()
    model_args = ["-m", "example_model", "--host", "127.0.0.1", "--port", str(model_port), "--test-knobs"]
    proxy_args = [
        "-m", "proxy", "serve", "--upstream", f"http://127.0.0.1:{model_port}", "--host", "127.0.0.1",
        "--port", str(proxy_port), "--metrics-port", str(metrics_port), "--endpoint-name", "demo-endpoint",
        "--invocation-timeout", str(TIMEOUT_S), "--log-level", "error",
    ]
    print(f"Starting the example iris model on :{model_port} and the proxy on :{proxy_port} (metrics on :{metrics_port})")
    with started([sys.executable, *model_args], model_port, "demo: the example model"), \
            started([sys.executable, *proxy_args], metrics_port, "demo: the proxy") as proxy:
        wait_for(proxy_port, proxy, "demo: the proxy")
        _drive(proxy_port, metrics_port, requests)
        print(
            "\nThe mix: good predictions with 2-30 ms of model time, bad input (the model's 400: a 4XX error),"
            f" model failures (500: a 5XX error), calls past the {TIMEOUT_S:g} s --invocation-timeout (the proxy answers 504;"
            " a model error, not a 5XX, as on SageMaker) and short streams. One model instance, so InvocationsPerInstance"
            " equals Invocations. Quantiles are estimated from the histogram buckets, as Prometheus's histogram_quantile"
            f" does: a p99 above {TIMEOUT_S:g} s comes from the bucket that holds the timed-out calls."
        )
        if keep_running:
            print(
                f"\nTry it:\n  curl -s -X POST http://127.0.0.1:{proxy_port}/invocations -H 'Content-Type: application/json' "
                f"-d '{{\"instances\": [[5.1, 3.5, 1.4, 0.2]]}}'\n"
                f"  curl -s http://127.0.0.1:{metrics_port}/metrics | grep ^sagemaker_\n"
                "Point Prometheus at it:\n"
                f"  scrape_configs: [{{job_name: sagemaker-metrics-proxy, static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]}}]\n"
                "Press Ctrl-C to stop."
            )
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the cleanup
                print("\nStopping the model and the proxy.")
        else:
            print(
                "\nRun it yourself, from this directory:\n"
                "  .venv/bin/python -m example_model --port 8081 &\n"
                "  .venv/bin/sagemaker-metrics-proxy serve --upstream http://127.0.0.1:8081 --endpoint-name my-endpoint\n"
                "then send requests to :8080/invocations and point curl or Prometheus at :9090/metrics."
                " `make demo ARGS=--keep-running` (or `.venv/bin/sagemaker-metrics-proxy demo --keep-running`) keeps this demo up to try."
            )
    return 0
