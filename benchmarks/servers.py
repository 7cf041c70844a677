"""The front door alone: one trivial ASGI app under the built-in server and under uvicorn, in one run.

    python -m benchmarks.servers [--rounds 5] [--seconds 4]

The proxy's benchmark (benchmarks.run) compares whole proxies, whose app and model client are the
same on both servers; this one takes them away, to show what each server itself costs per request.
Both serve the same app (read the body, answer a small JSON document) on uvloop, driven by wrk with the
iris POST of benchmarks.run, interleaved for several rounds; medians. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from benchmarks.run import SCRIPTS, cpu_seconds, platform_line, process, wrk
from proxy.process.children import free_port, wait_for
from proxy.types import Message, Receive, Scope, Send

SERVERS = ("builtin", "uvicorn")
ANSWER = b'{"predictions": [0]}'


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    message: Message = {"more_body": True}
    while message.get("more_body", False):
        message = await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": ANSWER})


def serve(kind: str, port: int) -> None:
    """Serve ``app`` on 127.0.0.1:``port`` with one server, until killed."""
    import uvloop

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(2048)

    async def main() -> None:
        if kind == "builtin":
            from proxy.http.server import HttpServer

            await HttpServer(app).serve(sock)
        else:
            import uvicorn

            config = uvicorn.Config(app, http="httptools", lifespan="off", access_log=False, server_header=False, date_header=False, log_level="warning")
            await uvicorn.Server(config).serve([sock])

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.servers", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port)
        return 0
    with ExitStack() as stack:
        script = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="smp-servers-"))) / "iris.lua"
        script.write_text(SCRIPTS["iris"] + "\n")
        targets = {}
        for kind in SERVERS:
            port = free_port()
            proc = stack.enter_context(process([sys.executable, "-m", "benchmarks.servers", "--serve", kind, "--port", str(port)], port))
            wait_for(port, proc)
            targets[kind] = (port, proc.pid)
        rows = []
        for connections in (16, 1):
            runs: dict[str, list[tuple[float, float, float]]] = {kind: [] for kind in SERVERS}
            for round_ in range(args.rounds):
                for kind in SERVERS[round_ % 2:] + SERVERS[:round_ % 2]:
                    port, pid = targets[kind]
                    url = f"http://127.0.0.1:{port}/invocations"
                    wrk(url, connections, 1, script)
                    before = cpu_seconds(pid)
                    run = wrk(url, connections, args.seconds, script)
                    runs[kind].append((run.rps, (cpu_seconds(pid) - before) / run.requests * 1e6, run.p50_us))
            med = {kind: [statistics.median(r[i] for r in runs[kind]) for i in range(3)] for kind in SERVERS}
            rows.append((connections, med))
    print(f"{len(os.sched_getaffinity(0))} CPUs, {platform_line()}; wrk, {args.rounds} round(s) of {args.seconds:g} s per server, interleaved; medians.\n")
    print("| connections | builtin req/s | uvicorn req/s | builtin CPU us/req | uvicorn CPU us/req | CPU builtin / uvicorn | p50 us builtin / uvicorn |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for connections, med in rows:
        b, u = med["builtin"], med["uvicorn"]
        print(f"| {connections} | {b[0]:,.0f} | {u[0]:,.0f} | {b[1]:.1f} | {u[1]:.1f} | {b[1] / u[1]:.2f} | {b[2]:,.0f} / {u[2]:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
