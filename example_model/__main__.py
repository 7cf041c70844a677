"""Run the example model server: python -m example_model [--port 8081] [--test-knobs]."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import uvicorn

from example_model.server import create_app

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m example_model",
        description="Iris classifier following the SageMaker inference contract (GET /ping, POST /invocations).",
    )
    # SageMaker sends traffic to 8080 inside a container; 8081 here leaves 8080 to the proxy in front.
    parser.add_argument("--port", type=int, default=8081, help="TCP port (default: 8081; in a SageMaker container, 8080)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    parser.add_argument(
        "--test-knobs",
        action="store_true",
        help="honour X-Test-Delay-Ms, X-Test-Status, X-Test-Stream-Chunks, "
        "X-Test-Stream-Interval-Ms and X-Test-Response-Bytes request headers",
    )
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="warning",
        help="uvicorn log level (default: warning)",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be 0..65535, got {args.port}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    uvicorn.run(
        create_app(test_knobs=args.test_knobs),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        loop="uvloop",
        http="httptools",
        ws="none",  # No websocket routes; skip the websockets machinery.
        lifespan="on",
        access_log=False,
        server_header=False,
    )


if __name__ == "__main__":
    main()
