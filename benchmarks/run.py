"""The hot-path benchmark: the model called directly, nginx as a reverse proxy, and this proxy, in one run.

    python -m benchmarks.run [--quick] [--out benchmarks/results]

Every scenario drives each target with wrk, interleaved (direct, nginx, proxy, proxy-pure, proxy-uvicorn,
...) for several rounds, and reports medians as ratios: the machine is shared and noisy, so only numbers
taken side by side in one run are compared. "proxy" is the proxy as shipped: the compiled build (mypyc)
and its default HTTP server, the built-in one; "proxy-pure" is the same proxy as pure Python; "proxy-uvicorn"
is the compiled proxy with --http-server uvicorn, the reference the built-in server replaces. Both builds
are made from this checkout in a temporary directory (benchmarks.builds). Writes results.json, results.md
and results.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

import psutil
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.builds import build_trees
from proxy.process.children import free_port, started, wait_for

ROOT = Path(__file__).resolve().parent.parent
IRIS = '{"instances": [[5.1, 3.5, 1.4, 0.2]]}'
MODEL_DELAY_MS = 20


@dataclass(frozen=True)
class Scenario:
    name: str
    connections: int
    script: str  # a key of SCRIPTS
    what: str


SCRIPTS = {
    "iris": f'wrk.method = "POST"; wrk.body = \'{IRIS}\'; wrk.headers["Content-Type"] = "application/json"',
    "delay": (
        f'wrk.method = "POST"; wrk.body = \'{IRIS}\'; wrk.headers["Content-Type"] = "application/json"; '
        f'wrk.headers["X-Test-Delay-Ms"] = "{MODEL_DELAY_MS}"'
    ),
    "body1mib": (
        'wrk.method = "POST"; wrk.body = string.rep("x", 1048576); '
        'wrk.headers["Content-Type"] = "application/octet-stream"; wrk.headers["X-Test-Response-Bytes"] = "2"'
    ),
    "stream": (
        f'wrk.method = "POST"; wrk.body = \'{IRIS}\'; wrk.headers["Content-Type"] = "application/json"; '
        'wrk.headers["X-Test-Stream-Chunks"] = "10"'
    ),
    "openai": (
        f'wrk.method = "POST"; wrk.body = \'{IRIS}\'; wrk.headers["Content-Type"] = "application/json"; '
        'wrk.headers["X-Test-Stream-Chunks"] = "10"; wrk.headers["X-Test-Stream-Format"] = "openai"'
    ),
    "openai-paced": (
        f'wrk.method = "POST"; wrk.body = \'{IRIS}\'; wrk.headers["Content-Type"] = "application/json"; '
        'wrk.headers["X-Test-Stream-Chunks"] = "10"; wrk.headers["X-Test-Stream-Format"] = "openai"; '
        'wrk.headers["X-Test-Stream-Interval-Ms"] = "1"'
    ),
}

SCENARIOS = (
    Scenario("trivial, 1 connection", 1, "iris", "added latency"),
    Scenario("trivial, 16 connections", 16, "iris", "throughput"),
    Scenario("trivial, 64 connections", 64, "iris", "throughput"),
    Scenario(f"{MODEL_DELAY_MS} ms model, 64 connections", 64, "delay", "concurrency is not capped"),
    Scenario("1 MiB request body, 16 connections", 16, "body1mib", "large payloads"),
    Scenario("streamed response (10 chunks), 16 connections", 16, "stream", "streaming"),
    Scenario("OpenAI token stream, 10 tokens at once, 16 connections", 16, "openai", "token counting"),
    Scenario("OpenAI token stream, 10 tokens 1 ms apart, 16 connections", 16, "openai-paced", "token counting, chunk by chunk"),
)
# The proxy targets and their serve flags, all on the compiled build but proxy-pure. "proxy" is the default
# (built-in) HTTP server.
PROXY_TARGETS: dict[str, tuple[str, ...]] = {
    "proxy": (),
    "proxy-pure": (),
    "proxy-uvicorn": ("--http-server", "uvicorn"),
    "proxy-no-metrics": ("--no-record-metrics",),
    "proxy-2-workers": ("--workers", "2"),
    "proxy-no-tokens": ("--no-count-tokens",),
}
PURE_TARGETS = frozenset({"proxy-pure"})
# Targets in every scenario.
MAIN_TARGETS = ("direct", "nginx", "proxy", "proxy-pure", "proxy-uvicorn")
# Extra targets run only where they answer a question: what recording costs, what a second worker gives.
EXTRA_TARGETS = {
    "trivial, 16 connections": ("proxy-no-metrics", "proxy-2-workers"),
    "trivial, 64 connections": ("proxy-2-workers",),
    "OpenAI token stream, 10 tokens at once, 16 connections": ("proxy-no-tokens",),
    "OpenAI token stream, 10 tokens 1 ms apart, 16 connections": ("proxy-no-tokens",),
}
# The goal for the built-in server: at most this much of uvicorn's CPU per request in this scenario.
CPU_GOAL = ("trivial, 16 connections", 0.7)
# The compiled build against pure Python: CPU per request at 16 connections, added p50 at 1 connection (at most);
# and the aims against nginx, the same two measures (at most this many times nginx's).
COMPILED_GOALS = {"cpu": ("trivial, 16 connections", 0.65), "p50": ("trivial, 1 connection", 0.75)}
NGINX_AIMS = {"cpu": ("trivial, 16 connections", 2.5), "p50": ("trivial, 1 connection", 3.0)}


@dataclass
class Run:
    """One wrk run against one target."""

    rps: float
    requests: int
    errors: int
    mean_us: float
    p50_us: float
    p99_us: float
    cpu_s: float | None = None
    model_mean_us: float | None = None  # the proxy's own ModelLatency mean over this run
    overhead_mean_us: float | None = None
    non_2xx: int = 0  # errors, split: "Non-2xx or 3xx responses" ...
    socket_errors: int = 0  # ... and connect + read + write + timeout


@dataclass
class Result:
    scenario: str
    target: str
    runs: list[Run] = field(default_factory=list)

    def median(self, attr: str) -> float | None:
        values = [getattr(r, attr) for r in self.runs if getattr(r, attr) is not None]
        return statistics.median(values) if values else None


def process(args: list[str], port: int, log: IO[bytes] | None = None, cwd: Path = ROOT) -> AbstractContextManager[subprocess.Popen[bytes]]:
    """A target or the model, started from the repository (or ``cwd``, a build of it) and stopped when the block ends."""
    return started(args, port, "benchmark: a process", log=log, cwd=cwd)


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log error;
{user}
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream model {{ server 127.0.0.1:{model_port}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 8m;
        client_body_buffer_size 8m;  # hold bodies in memory, as the proxy does
        location / {{
            proxy_pass http://model;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;  # stream responses through, as the proxy does
        }}
    }}
}}
"""


@contextmanager
def nginx(model_port: int, port: int, workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    conf = workdir / "nginx.conf"
    user = "user root;" if os.geteuid() == 0 else ""
    conf.write_text(NGINX_CONF.format(dir=workdir, model_port=model_port, port=port, user=user))
    with process([binary, "-c", str(conf), "-p", str(workdir)], port) as proc:
        yield proc


_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6}


def _us(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"unreadable wrk duration {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(out: str) -> Run:
    latency = re.search(r"^\s+Latency\s+(\S+)", out, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    total = re.search(r"^\s+(\d+) requests in", out, re.M)
    if not (latency and p50 and p99 and rps and total):
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    non_2xx = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    socket_match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    socket_errors = sum(int(n) for n in socket_match.groups()) if socket_match else 0
    return Run(
        float(rps.group(1)), int(total.group(1)), non_2xx + socket_errors, _us(latency.group(1)), _us(p50.group(1)), _us(p99.group(1)),
        non_2xx=non_2xx, socket_errors=socket_errors,
    )


def wrk(url: str, connections: int, seconds: float, script: Path) -> Run:
    args = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", "-s", str(script), url]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return parse_wrk(out)


def cpu_seconds(pid: int) -> float:
    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of the process and its children, summed."""
    proc = psutil.Process(pid)
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, psutil.NoSuchProcess):
            pass
    return total / 2**20


def scrape(metrics_port: int) -> dict[str, float]:
    """The proxy's /metrics: each sample name with its values summed over label sets."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def latency_sums(metrics_port: int) -> tuple[float, float, float]:
    """(count, ModelLatency sum, OverheadLatency sum) from the proxy's /metrics, the sums in microseconds."""
    values = scrape(metrics_port)
    return (
        values.get("sagemaker_model_latency_seconds_count", 0.0),
        values.get("sagemaker_model_latency_seconds_sum", 0.0) * 1e6,
        values.get("sagemaker_overhead_latency_seconds_sum", 0.0) * 1e6,
    )


@dataclass
class Target:
    name: str
    port: int
    pid: int | None = None
    metrics_port: int | None = None


def model_args(port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "example_model", "--host", "127.0.0.1", "--port", str(port), *extra]


def proxy_args(model_port: int, port: int, metrics_port: int, *extra: str, endpoint_name: str = "benchmark",
               log_level: str = "error") -> list[str]:
    return [
        sys.executable, "-m", "proxy", "serve", "--upstream", f"http://127.0.0.1:{model_port}", "--host", "127.0.0.1",
        "--port", str(port), "--metrics-port", str(metrics_port), "--endpoint-name", endpoint_name, "--log-level", log_level, *extra,
    ]


def serve_has_option(option: str) -> bool:
    """Whether ``python -m proxy serve`` knows ``option`` (as its --help lists it)."""
    out = subprocess.run([sys.executable, "-m", "proxy", "serve", "--help"], cwd=ROOT, capture_output=True, text=True).stdout
    return re.search(rf"(^|\s|\[){re.escape(option)}\b", out) is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s per run, no memory soak (under 2 minutes)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="where to write the report")
    args = parser.parse_args(argv)
    for tool in ("wrk", "nginx"):
        if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists()):
            parser.exit(2, f"benchmark: {tool} is not installed (Debian: apt-get install {tool})\n")
    if not serve_has_option("--http-server"):
        parser.exit(2, "benchmark: this proxy has no --http-server option, needed for the proxy-uvicorn target\n")
    seconds, rounds = (2.0, 1) if args.quick else (5.0, 3)
    args.out.mkdir(parents=True, exist_ok=True)

    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="smp-bench-")))
        scripts = {}
        for key, lua in SCRIPTS.items():
            scripts[key] = workdir / f"{key}.lua"
            scripts[key].write_text(lua + "\n")
        model_port = free_port()
        model = stack.enter_context(process(model_args(model_port, "--test-knobs"), model_port))
        targets = {"direct": Target("direct", model_port, model.pid)}
        nginx_port = free_port()
        ngx = stack.enter_context(nginx(model_port, nginx_port, workdir))
        targets["nginx"] = Target("nginx", nginx_port, ngx.pid)
        trees = build_trees(workdir)
        for name, extra in PROXY_TARGETS.items():
            port, metrics_port = free_port(), free_port()
            tree = trees["pure" if name in PURE_TARGETS else "compiled"]
            proc = stack.enter_context(process(proxy_args(model_port, port, metrics_port, *extra), metrics_port, cwd=tree))
            wait_for(port, proc)
            targets[name] = Target(name, port, proc.pid, metrics_port)

        plan: list[tuple[Scenario, int, str]] = []
        for scenario in SCENARIOS:
            names = [*MAIN_TARGETS, *EXTRA_TARGETS.get(scenario.name, ())]
            for round_ in range(rounds):
                # Rotate the order each round so no target always runs first (or hot).
                order = names[round_ % len(names):] + names[: round_ % len(names)]
                plan.extend((scenario, round_, name) for name in order)
        results: dict[tuple[str, str], Result] = {}
        started = time.monotonic()
        for i, (scenario, round_, name) in enumerate(plan, 1):
            target = targets[name]
            # Warm the connections (and the model's code paths) outside the measurement.
            wrk(f"http://127.0.0.1:{target.port}/invocations", scenario.connections, 1, scripts[scenario.script])
            before_cpu = cpu_seconds(target.pid) if target.pid else None
            before = latency_sums(target.metrics_port) if target.metrics_port else None
            run = wrk(f"http://127.0.0.1:{target.port}/invocations", scenario.connections, seconds, scripts[scenario.script])
            if before_cpu is not None and target.pid:
                run.cpu_s = cpu_seconds(target.pid) - before_cpu
            if before is not None and target.metrics_port:
                after = latency_sums(target.metrics_port)
                count = after[0] - before[0]
                if count:
                    run.model_mean_us = (after[1] - before[1]) / count
                    run.overhead_mean_us = (after[2] - before[2]) / count
            results.setdefault((scenario.name, name), Result(scenario.name, name)).runs.append(run)
            elapsed = time.monotonic() - started
            print(
                f"[{i:>3}/{len(plan)}] {elapsed:5.0f} s  {scenario.name:<48} round {round_ + 1}  {name:<17}"
                f"{run.rps:>10,.0f} req/s  p50 {run.p50_us:>8,.0f} us" + (f"  ({run.errors} errors)" if run.errors else ""),
                flush=True,
            )

        soak = None if args.quick else memory_soak(targets["proxy"], scripts["iris"])
        rss = {name: peak_rss_mb(t.pid) for name, t in targets.items() if t.pid}

    report = build_report(results, rss, soak, seconds, rounds)
    report["quick"] = args.quick
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = render_markdown(report)
    (args.out / "results.md").write_text(markdown)
    chart(report, args.out / "results.png")
    print()
    print(markdown)
    print(f"Wrote {args.out}/results.md, results.json and results.png")
    return 0


def memory_soak(target: Target, script: Path, total: int = 200_000) -> dict[str, float]:
    """RSS after a warm-up, then after 200,000 more requests: growth past warm-up would be a leak."""
    assert target.pid is not None
    url = f"http://127.0.0.1:{target.port}/invocations"
    warm = wrk(url, 16, 3, script)
    before = psutil.Process(target.pid).memory_info().rss / 2**20
    sent = 0
    while sent < total:
        seconds = max(2.0, min(30.0, (total - sent) / max(warm.rps, 1.0) * 1.1))
        sent += wrk(url, 16, seconds, script).requests
    after = psutil.Process(target.pid).memory_info().rss / 2**20
    print(f"memory soak: {sent:,} requests, RSS {before:.1f} MB -> {after:.1f} MB", flush=True)
    return {"requests": sent, "rss_before_mb": before, "rss_after_mb": after, "growth_mb": after - before}


def build_report(results: dict[tuple[str, str], Result], rss: dict[str, float], soak: dict[str, float] | None,
                 seconds: float, rounds: int) -> dict[str, object]:
    rows = []
    for scenario in SCENARIOS:
        direct = results[(scenario.name, "direct")]
        row: dict[str, object] = {"scenario": scenario.name, "connections": scenario.connections, "what": scenario.what}
        entries: dict[str, dict[str, object]] = {}
        cpu_per_1000: dict[str, float | None] = {}
        for name in ("direct", "nginx", *PROXY_TARGETS):
            result = results.get((scenario.name, name))
            if result is None:
                continue
            rps = result.median("rps") or 0.0
            entry: dict[str, object] = {
                "rps": rps,
                "p50_us": result.median("p50_us"),
                "p99_us": result.median("p99_us"),
                "mean_us": result.median("mean_us"),
                "errors": sum(r.errors for r in result.runs),
                "non_2xx": sum(r.non_2xx for r in result.runs),
                "socket_errors": sum(r.socket_errors for r in result.runs),
                "runs": [asdict(r) for r in result.runs],
            }
            if name != "direct":
                entry["throughput_vs_direct"] = rps / (direct.median("rps") or 1.0)
                entry["added_p50_us"] = (result.median("p50_us") or 0) - (direct.median("p50_us") or 0)
                entry["added_p99_us"] = (result.median("p99_us") or 0) - (direct.median("p99_us") or 0)
                cpu = [r.cpu_s / r.requests * 1000 for r in result.runs if r.cpu_s is not None and r.requests]
                entry["cpu_s_per_1000"] = cpu_per_1000[name] = statistics.median(cpu) if cpu else None
            if name.startswith("proxy"):
                nginx_result = results[(scenario.name, "nginx")]
                entry["throughput_vs_nginx"] = rps / (nginx_result.median("rps") or 1.0)
                entry["model_latency_mean_us"] = result.median("model_mean_us")
                entry["overhead_latency_mean_us"] = result.median("overhead_mean_us")
            entries[name] = row[name] = entry
        if "proxy" in entries and "proxy-uvicorn" in entries:
            # The built-in server against uvicorn, the same proxy otherwise: throughput, and CPU per request.
            uvicorn_rps = results[(scenario.name, "proxy-uvicorn")].median("rps")
            entries["proxy"]["throughput_vs_uvicorn"] = _ratio(results[(scenario.name, "proxy")].median("rps"), uvicorn_rps)
            entries["proxy"]["cpu_vs_uvicorn"] = _ratio(cpu_per_1000.get("proxy"), cpu_per_1000.get("proxy-uvicorn"))
        if "proxy" in entries and "proxy-pure" in entries:
            # The compiled build against pure Python, and each against nginx: CPU per request and added p50.
            p, pure, n = entries["proxy"], entries["proxy-pure"], entries["nginx"]
            p["throughput_vs_pure"] = _ratio(_num(p["rps"]), _num(pure["rps"]))
            p["cpu_vs_pure"] = _ratio(cpu_per_1000.get("proxy"), cpu_per_1000.get("proxy-pure"))
            p["added_p50_vs_pure"] = _ratio(_num(p["added_p50_us"]), _num(pure["added_p50_us"]))
            for e in (p, pure):
                e["cpu_vs_nginx"] = _ratio(_num(e["cpu_s_per_1000"]), cpu_per_1000.get("nginx"))
                e["added_p50_vs_nginx"] = _ratio(_num(e["added_p50_us"]), _num(n["added_p50_us"]))
        rows.append(row)
    goal_scenario, goal_max = CPU_GOAL
    goal_row = next(r for r in rows if r["scenario"] == goal_scenario)
    goal_proxy = goal_row["proxy"]
    assert isinstance(goal_proxy, dict)
    goal_value = goal_proxy.get("cpu_vs_uvicorn")
    cpu_goal = {
        "scenario": goal_scenario,
        "measure": "proxy CPU s per 1k requests / proxy-uvicorn CPU s per 1k requests",
        "max": goal_max,
        "value": goal_value,
        "met": isinstance(goal_value, float) and goal_value <= goal_max,
    }
    goals = [
        _goal(rows, f"compiled / pure, CPU per request ({COMPILED_GOALS['cpu'][0]})", COMPILED_GOALS["cpu"], "cpu_vs_pure"),
        _goal(rows, f"compiled / pure, added p50 ({COMPILED_GOALS['p50'][0]})", COMPILED_GOALS["p50"], "added_p50_vs_pure"),
        _goal(rows, f"aim: compiled / nginx, CPU per request ({NGINX_AIMS['cpu'][0]})", NGINX_AIMS["cpu"], "cpu_vs_nginx"),
        _goal(rows, f"aim: compiled / nginx, added p50 ({NGINX_AIMS['p50'][0]})", NGINX_AIMS["p50"], "added_p50_vs_nginx"),
    ]
    machine = f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, {platform_line()}"
    return {
        "machine": machine, "seconds_per_run": seconds, "rounds": rounds,
        "targets": {
            "direct": "the example model", "nginx": "nginx, one worker",
            **{k: " ".join(("serve", *v, "(pure Python)" if k in PURE_TARGETS else "(compiled)")) for k, v in PROXY_TARGETS.items()},
        },
        "scenarios": rows, "cpu_goal": cpu_goal, "goals": goals, "peak_rss_mb": rss, "memory_soak": soak,
    }


def _goal(rows: list[dict[str, object]], what: str, goal: tuple[str, float], key: str) -> dict[str, object]:
    """The compiled proxy's ``key`` in the goal's scenario against its bound (at most)."""
    scenario, bound = goal
    proxy = next(r for r in rows if r["scenario"] == scenario)["proxy"]
    assert isinstance(proxy, dict)
    value = proxy.get(key)
    return {"what": what, "max": bound, "value": value, "met": isinstance(value, float) and value <= bound}


def _num(value: object) -> float | None:
    return float(value) if isinstance(value, float | int) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def platform_line() -> str:
    import platform

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu or platform.processor()}, Python {platform.python_version()}, Linux {platform.release()}"


def render_markdown(report: dict[str, object]) -> str:
    rows = report["scenarios"]
    assert isinstance(rows, list)
    smoke = (
        ["**Smoke run** (`--quick`: one round of 2 s per target, no soak): it shows that the benchmark runs, not how fast"
         " anything is; one round on a shared machine can even show the proxy faster with metrics than without. Use"
         " `make bench` for numbers.", ""]
        if report.get("quick") else []
    )
    lines = [
        *smoke,
        f"Machine: {report['machine']}. wrk, {report['rounds']} round(s) of {report['seconds_per_run']:g} s per target, interleaved; medians."
        " proxy: the compiled build (mypyc) and the default (built-in) HTTP server; proxy-pure: the same as pure Python;"
        " proxy-uvicorn: the compiled build with --http-server uvicorn.",
        "",
        "Throughput:",
        "",
        "| scenario | direct req/s | nginx req/s | proxy req/s | proxy-pure req/s | proxy-uvicorn req/s | proxy / direct | proxy / nginx"
        " | proxy-pure / nginx | proxy-uvicorn / nginx | proxy / proxy-pure | proxy / proxy-uvicorn |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        d, n, p, c, u = row["direct"], row["nginx"], row["proxy"], row["proxy-pure"], row["proxy-uvicorn"]
        lines.append(
            f"| {row['scenario']} | {d['rps']:,.0f} | {n['rps']:,.0f} | {p['rps']:,.0f} | {c['rps']:,.0f} | {u['rps']:,.0f} | {p['throughput_vs_direct']:.2f} | "
            f"{p['throughput_vs_nginx']:.2f} | {c['throughput_vs_nginx']:.2f} | {u['throughput_vs_nginx']:.2f} | "
            f"{_fmt(p.get('throughput_vs_pure'), '.2f')} | {_fmt(p.get('throughput_vs_uvicorn'), '.2f')} |"
        )
    lines += [
        "",
        "Latency added over calling the model directly, and CPU per request (nginx / proxy / proxy-pure / proxy-uvicorn):",
        "",
        "| scenario | added p50 us | added p99 us | CPU s per 1k req | CPU proxy / proxy-pure | added p50 proxy / proxy-pure"
        " | CPU proxy / nginx | CPU proxy / proxy-uvicorn |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        n, p, c, u = row["nginx"], row["proxy"], row["proxy-pure"], row["proxy-uvicorn"]
        lines.append(
            f"| {row['scenario']} | {n['added_p50_us']:,.0f} / {p['added_p50_us']:,.0f} / {c['added_p50_us']:,.0f} / {u['added_p50_us']:,.0f} | "
            f"{n['added_p99_us']:,.0f} / {p['added_p99_us']:,.0f} / {c['added_p99_us']:,.0f} / {u['added_p99_us']:,.0f} | "
            + " / ".join(_fmt(e["cpu_s_per_1000"], ".3f") for e in (n, p, c, u)) + " | "
            f"{_fmt(p.get('cpu_vs_pure'), '.2f')} | {_fmt(p.get('added_p50_vs_pure'), '.2f')} | {_fmt(p.get('cpu_vs_nginx'), '.2f')} | "
            f"{_fmt(p.get('cpu_vs_uvicorn'), '.2f')} |"
        )
    lines.append("")
    goals = report.get("goals") or []
    assert isinstance(goals, list)
    for g in goals:
        lines.append(f"- Goal, {g['what']}: {_fmt(g['value'], '.2f')}, at most {g['max']:g}: " + ("met." if g["met"] else "NOT met."))
    goal = report["cpu_goal"]
    assert isinstance(goal, dict)
    lines.append(
        f"- Goal, {goal['scenario']}: proxy CPU / proxy-uvicorn CPU per request {_fmt(goal['value'], '.2f')}, at most {goal['max']:g}: "
        + ("met." if goal["met"] else "NOT met.")
    )
    for row in rows:
        for name in ("proxy-no-metrics", "proxy-2-workers"):
            if name in row:
                e, p = row[name], row["proxy"]
                lines.append(f"- {row['scenario']}: {name} {e['rps']:,.0f} req/s ({e['throughput_vs_nginx']:.2f} of nginx); proxy with metrics / {name} = {p['rps'] / e['rps']:.3f}")
        if "proxy-no-tokens" in row:
            e, p = row["proxy-no-tokens"], row["proxy"]
            lines.append(
                f"- {row['scenario']}: counting tokens costs, proxy / proxy-no-tokens: throughput {p['rps'] / e['rps']:.3f},"
                f" CPU per request {_fmt(_ratio(p['cpu_s_per_1000'], e['cpu_s_per_1000']), '.3f')} (goal: under 5% more)"
            )
    trivial = rows[0]
    delay = next(r for r in rows if r["scenario"].startswith(f"{MODEL_DELAY_MS} ms"))
    lines.append(
        "- Accuracy at 1 connection, ModelLatency + OverheadLatency mean against wrk's mean: "
        + "; ".join(
            f"{name} {_fmt(_add(trivial[name]['model_latency_mean_us'], trivial[name]['overhead_latency_mean_us']), ',.0f')} us"
            f" against {trivial[name]['mean_us']:,.0f} us"
            for name in ("proxy", "proxy-pure", "proxy-uvicorn")
        )
        + "."
    )
    lines.append(
        f"- Accuracy with a {MODEL_DELAY_MS} ms model at 64 connections: ModelLatency mean {_fmt(delay['proxy']['model_latency_mean_us'], ',.0f')} us"
        f" (proxy-uvicorn {_fmt(delay['proxy-uvicorn']['model_latency_mean_us'], ',.0f')} us)"
        f" against the model's own time, called directly, {delay['direct']['mean_us']:,.0f} us (wrk mean)."
    )
    errors = [
        f"{row['scenario']} {name} {entry['errors']:,} ({entry['non_2xx']:,} non-2xx, {entry['socket_errors']:,} socket)"
        for row in rows for name, entry in row.items() if isinstance(entry, dict) and entry.get("errors")
    ]
    lines.append("- wrk errors: " + ("; ".join(errors) if errors else "none") + ".")
    rss = report["peak_rss_mb"]
    assert isinstance(rss, dict)
    lines.append("- Peak RSS: " + ", ".join(f"{k} {v:.1f} MB" for k, v in rss.items()) + ".")
    soak = report["memory_soak"]
    if isinstance(soak, dict):
        lines.append(f"- Memory over {soak['requests']:,.0f} requests past warm-up (proxy): {soak['rss_before_mb']:.1f} MB -> {soak['rss_after_mb']:.1f} MB ({soak['growth_mb']:+.1f} MB).")
    return "\n".join(lines) + "\n"


def _add(a: object, b: object) -> float | None:
    return a + b if isinstance(a, float | int) and isinstance(b, float | int) else None


def _fmt(value: object, spec: str) -> str:
    return format(value, spec) if isinstance(value, float | int) else "-"


def chart(report: dict[str, object], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no chart", file=sys.stderr)
        return
    rows = report["scenarios"]
    assert isinstance(rows, list)
    labels = [r["scenario"].replace(", ", "\n").replace(" (", "\n(") for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 8))
    width = 0.16
    xs = range(len(rows))
    colours = {name: f"C{i}" for i, name in enumerate(MAIN_TARGETS)}  # one colour per target in both panels
    if report.get("quick"):
        fig.suptitle("SMOKE RUN (--quick: 1 round of 2 s): not for comparisons; make bench for numbers", color="red")
    for i, name in enumerate(MAIN_TARGETS):
        top.bar([x + (i - (len(MAIN_TARGETS) - 1) / 2) * width for x in xs], [r[name]["rps"] for r in rows], width, label=name, color=colours[name])
    top.set_ylabel("requests/s (median)")
    top.set_title("Throughput")
    top.legend()
    for i, name in enumerate(MAIN_TARGETS[1:]):
        bottom.bar([x + (i - (len(MAIN_TARGETS) - 2) / 2) * width for x in xs], [r[name]["added_p50_us"] for r in rows], width, label=name, color=colours[name])
    bottom.set_ylabel("added p50 latency, us")
    bottom.set_title("Latency added over calling the model directly")
    bottom.legend()
    for ax in (top, bottom):
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
