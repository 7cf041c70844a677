"""Where one proxy process spends its CPU under wrk: perf's samples of it (kernel and user space), by library
and by symbol, for the compiled build (default) or the pure-Python one.

    python -m benchmarks.profile [--build compiled|pure] [--seconds 10] [--connections 16]

Starts the example model and one proxy (a copy of this checkout, built as asked: benchmarks.builds), drives
the proxy with the iris POST of benchmarks.run, and records it with ``perf record -g`` (Linux perf; root or
kernel.perf_event_paranoid <= 1). Prints a table of the share of samples per library and the top symbols.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from benchmarks.builds import build_tree
from benchmarks.run import SCRIPTS, model_args, process, proxy_args, wrk
from proxy.process.children import free_port, wait_for

# What each library is, for the table.
LIBRARIES = {
    "[kernel.kallsyms]": "kernel: system calls, loopback TCP, scheduling",
    "_compiled__mypyc": "the compiled request path (mypyc)",
    "loop.cpython": "uvloop: the event loop",
    "parser.cpython": "httptools: llhttp",
    "libc.so": "libc: memory copies, allocation",
    "_asyncio.cpython": "asyncio's C futures and tasks",
}


# CPython's own time, split by what its functions do (perf's symbol names).
CPYTHON = (
    ("CPython: the eval loop, running Python byte code", r"_PyEval_EvalFrameDefault"),
    ("CPython: allocating and freeing objects", r"Malloc|Free|alloc|Alloc|dealloc|GC_|_New|NewReference|Clear|free_keys"),
    ("CPython: attribute and method lookups, dicts", r"Lookup|GetAttr|SetAttr|GetMethod|dict|Dict|lookup|insertdict"),
    ("CPython: calls into Python objects (futures, transports, the loop)", r"Vectorcall|Call|call|Send|Frame|initialize_locals"),
    ("CPython: ints, bytes, str, tuples, lists, comparisons, type checks",
     r"Long|long|Bytes|bytes|Unicode|unicode|Tuple|tuple|List|list|Compare|IsTrue|IsSubtype|IsInstance|Number|Float|Bool|Format|Join|Slice|Iter"),
)


def describe(dso: str, symbol: str = "") -> str:
    if "libpython" in dso:
        return next((what for what, pattern in CPYTHON if re.search(pattern, symbol)), "CPython: the rest")
    return next((what for key, what in LIBRARIES.items() if key in dso), dso)


def perf_report(data: Path, sort: str) -> list[tuple[float, str]]:
    out = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--sort", sort, "--stdio", "-g", "none"],
        capture_output=True, text=True, check=True,
    ).stdout
    rows = []
    for line in out.splitlines():
        match = re.match(r"\s*([\d.]+)%\s+(.*\S)", line)
        if match and not line.startswith("#"):
            rows.append((float(match.group(1)), match.group(2)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--build", choices=("compiled", "pure"), default="compiled")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--top", type=int, default=25, help="symbols to list")
    args = parser.parse_args(argv)
    for tool in ("wrk", "perf"):
        if not shutil.which(tool):
            parser.exit(2, f"profile: {tool} is not installed (Debian: apt-get install {tool if tool == 'wrk' else 'linux-perf'})\n")
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="smp-profile-")))
        tree = build_tree(workdir, args.build)
        script = workdir / "iris.lua"
        script.write_text(SCRIPTS["iris"] + "\n")
        model_port, port, metrics_port = free_port(), free_port(), free_port()
        stack.enter_context(process(model_args(model_port, "--test-knobs"), model_port))
        proxy = stack.enter_context(process(proxy_args(model_port, port, metrics_port), metrics_port, cwd=tree))
        wait_for(port, proxy)
        url = f"http://127.0.0.1:{port}/invocations"
        wrk(url, args.connections, 2, script)  # warm up
        data = workdir / "perf.data"
        load = subprocess.Popen(["wrk", "-t1", f"-c{args.connections}", f"-d{round(args.seconds) + 2}s", "-s", str(script), url],
                                stdout=subprocess.PIPE, text=True)
        subprocess.run(["perf", "record", "-q", "-F", "1999", "-g", "-p", str(proxy.pid), "-o", str(data), "--", "sleep", str(args.seconds)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out, _ = load.communicate()
        rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
        by_dso: dict[str, float] = {}
        symbols = perf_report(data, "dso,sym")
        for share, row in symbols:
            dso, _, symbol = row.partition(" ")
            what = describe(dso, symbol)
            by_dso[what] = by_dso.get(what, 0.0) + share
    print(f"{args.build} build, {args.connections} connections, {rps.group(1) if rps else '?'} req/s; perf samples of the proxy process:\n")
    print("| where | share of CPU samples |\n|---|---:|")
    for what, share in sorted(by_dso.items(), key=lambda item: -item[1]):
        if share >= 0.5:
            print(f"| {what} | {share:.0f}% |")
    print(f"\nTop {args.top} symbols:\n")
    for share, symbol in symbols[: args.top]:
        print(f"{share:6.2f}%  {' '.join(symbol.split())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
