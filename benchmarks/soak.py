"""A soak of the proxy: many requests through one proxy process, then checks that nothing was lost or leaked.

    python -m benchmarks.soak [--requests 1000000] [--connections 16] [--slice-seconds 10]

Starts the example model and the proxy (its default HTTP server) on 127.0.0.1 and drives the proxy
with wrk (the iris POST of benchmarks.run) in slices until at least --requests requests past the
warm-up were answered, sampling the proxy's RSS after each slice. Then it checks:

- the proxy's sagemaker_invocations_total against wrk's count. wrk counts completed requests only;
  each wrk run (every slice is one) can stop with up to one request per connection in flight, which
  the proxy counts (answered or abandoned) and wrk does not. So the proxy's count may exceed wrk's
  by at most connections x wrk runs, and never fall short of it;
- no non-2xx responses and no socket errors at wrk, no model errors counted by the proxy, and no
  invocation still in flight once the load has stopped;
- flat memory: RSS after the first slice past the warm-up against RSS after the last slice.

Prints a report and exits 1 if any check fails (2 if it cannot run).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import psutil

from benchmarks.run import SCRIPTS, Run, model_args, process, proxy_args, scrape, wrk
from proxy.process.children import free_port, tail, wait_for

INVOCATIONS = "sagemaker_invocations_total"
MODEL_ERRORS = "sagemaker_invocation_model_errors_total"
IN_FLIGHT = "sagemaker_concurrent_requests_per_model"
CLIENT_DISCONNECTS = "sagemaker_proxy_client_disconnects_total"
MIN_SLICES = 5  # past the warm-up, so the RSS samples show a trend even in a short soak


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def rss_mb(pid: int) -> float:
    """Resident memory of the process and its children, summed, in MB."""
    proc = psutil.Process(pid)
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def settle(metrics_port: int, timeout: float = 10.0) -> dict[str, float]:
    """/metrics once no invocation is in flight and the count has stopped moving (or after ``timeout``)."""
    deadline = time.monotonic() + timeout
    last = scrape(metrics_port)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = scrape(metrics_port)
        if now.get(IN_FLIGHT, 0.0) == 0 and now.get(INVOCATIONS) == last.get(INVOCATIONS):
            return now
        last = now
    return last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=1_000_000, help="requests past the warm-up to send, at least (default 1000000)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument("--slice-seconds", type=float, default=10.0, help="seconds per wrk run, shorter for a short soak (default 10)")
    parser.add_argument("--warmup-seconds", type=float, default=5.0, help="wrk warm-up before the first RSS sample (default 5)")
    parser.add_argument("--max-rss-growth-mb", type=float, default=10.0, help="most RSS growth allowed past the warm-up (default 10)")
    parser.add_argument("--time-limit", type=float, default=3600.0, help="give up (and fail) after this many seconds (default 3600)")
    parser.add_argument("--json", type=Path, help="also write the report here, as JSON")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.connections < 1 or args.slice_seconds < 1 or args.warmup_seconds < 1:
        parser.error("--requests and --connections must be positive, --slice-seconds and --warmup-seconds at least 1")
    if not shutil.which("wrk"):
        parser.exit(2, "soak: wrk is not installed (Debian: apt-get install wrk)\n")

    started = time.monotonic()
    runs: list[Run] = []
    rss: list[float] = []  # after the warm-up, then after each slice
    checks: list[Check] = []
    with tempfile.TemporaryFile() as proxy_log:
        with ExitStack() as stack:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="smp-soak-")))
            script = workdir / "iris.lua"
            script.write_text(SCRIPTS["iris"] + "\n")
            model_port = free_port()
            stack.enter_context(process(model_args(model_port), model_port))
            port, metrics_port = free_port(), free_port()
            proxy = stack.enter_context(process(
                proxy_args(model_port, port, metrics_port, endpoint_name="soak", log_level="warning"), metrics_port, proxy_log
            ))
            wait_for(port, proxy)
            url = f"http://127.0.0.1:{port}/invocations"
            before = scrape(metrics_port)

            warm = wrk(url, args.connections, args.warmup_seconds, script)
            runs.append(warm)
            rss.append(rss_mb(proxy.pid))
            print(f"warm-up: {warm.requests:,} requests, {warm.rps:,.0f} req/s, RSS {rss[-1]:.1f} MB", flush=True)
            if warm.requests == 0:
                checks.append(Check("load", False, "no request completed in the warm-up"))
            # Slices of --slice-seconds, shorter where that would give fewer than MIN_SLICES.
            slice_s = max(1.0, min(args.slice_seconds, args.requests / max(warm.rps, 1.0) / MIN_SLICES))
            sent, rps = 0, max(warm.rps, 1.0)
            while sent < args.requests and not checks:
                if time.monotonic() - started > args.time_limit:
                    checks.append(Check("time limit", False, f"{sent:,} of {args.requests:,} requests in {args.time_limit:g} s"))
                    break
                seconds = max(1.0, min(slice_s, (args.requests - sent) / rps * 1.1))
                run = wrk(url, args.connections, seconds, script)
                runs.append(run)
                sent += run.requests
                rps = max(run.rps, 1.0)
                if proxy.poll() is not None:
                    checks.append(Check("proxy alive", False, f"the proxy exited with {proxy.returncode} during the soak"))
                    break
                rss.append(rss_mb(proxy.pid))
                print(
                    f"slice {len(runs) - 1:>3}  {time.monotonic() - started:5.0f} s  {sent:>10,} requests  {run.rps:>8,.0f} req/s"
                    f"  p99 {run.p99_us:>8,.0f} us  RSS {rss[-1]:6.1f} MB" + (f"  ({run.errors} errors)" if run.errors else ""),
                    flush=True,
                )
                if run.requests == 0:
                    checks.append(Check("load", False, "a slice completed no request"))
            after = settle(metrics_port) if proxy.poll() is None else {}
        log_tail = tail(proxy_log, 1000)
        proxy_log.seek(0)
        log_lines = sum(1 for _ in proxy_log)

    # The checks.
    wrk_total = sum(r.requests for r in runs)
    non_2xx = sum(r.non_2xx for r in runs)
    socket_errors = sum(r.socket_errors for r in runs)
    counted = after.get(INVOCATIONS, 0.0) - before.get(INVOCATIONS, 0.0) if after else float("nan")
    allowed = args.connections * len(runs)
    difference = counted - wrk_total
    checks.append(Check(
        "invocations counted", 0 <= difference <= allowed,
        f"proxy {counted:,.0f}, wrk {wrk_total:,} completed: difference {difference:+,.0f}, allowed 0 to {allowed:,}"
        f" ({len(runs)} wrk runs x {args.connections} connections, the requests in flight when each run stops;"
        f" {after.get(CLIENT_DISCONNECTS, 0.0):,.0f} of them counted as client disconnects)",
    ))
    checks.append(Check("no non-2xx responses", non_2xx == 0, f"{non_2xx:,} non-2xx or 3xx responses at wrk"))
    checks.append(Check("no socket errors", socket_errors == 0, f"{socket_errors:,} socket errors (connect, read, write, timeout) at wrk"))
    model_errors = after.get(MODEL_ERRORS, 0.0) - before.get(MODEL_ERRORS, 0.0) if after else float("nan")
    checks.append(Check("no model errors", model_errors == 0, f"{model_errors:,.0f} counted in {MODEL_ERRORS}"))
    in_flight = after.get(IN_FLIGHT, float("nan")) if after else float("nan")
    checks.append(Check("nothing in flight after the load", in_flight == 0, f"{IN_FLIGHT} {in_flight:g}"))
    if len(rss) >= 3:
        first, first_label = rss[1], "after the first slice past the warm-up"
    else:
        first, first_label = rss[0], "after the warm-up"
    last = rss[-1]
    checks.append(Check(
        "memory flat", last - first <= args.max_rss_growth_mb,
        f"RSS {first:.1f} MB ({first_label}) -> {last:.1f} MB after the last slice: {last - first:+.1f} MB,"
        f" at most +{args.max_rss_growth_mb:g} MB; max {max(rss):.1f} MB",
    ))

    ok = all(c.ok for c in checks)
    elapsed = time.monotonic() - started
    print()
    print(
        f"Soak: {wrk_total:,} requests ({wrk_total - warm.requests:,} past the warm-up) at {args.connections} connections"
        f" in {len(runs)} wrk runs, {elapsed:.0f} s; {wrk_total / max(sum(r.requests / max(r.rps, 1.0) for r in runs), 1e-9):,.0f} req/s."
    )
    print("RSS MB after the warm-up and each slice: " + " ".join(f"{v:.1f}" for v in rss))
    print(f"Proxy log (warning and above): {log_lines} line(s)" + (f"; last: {log_tail}" if log_lines else "."))
    for check in checks:
        print(f"  {'ok  ' if check.ok else 'FAIL'}  {check.name}: {check.detail}")
    print("PASS" if ok else "FAIL")
    if args.json:
        args.json.write_text(json.dumps({
            "ok": ok, "requests": wrk_total, "connections": args.connections, "wrk_runs": len(runs), "seconds": elapsed,
            "rss_mb": rss, "proxy_log_lines": log_lines, "checks": [c.__dict__ for c in checks],
        }, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
