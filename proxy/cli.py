"""The command line: ``sagemaker-metrics-proxy serve|monitor|demo``. Bad configuration exits 2 with one line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from proxy.settings import MONITOR_OPTIONS, SERVE_OPTIONS, ConfigError, add_options, resolve, resolve_monitor

PROG = "sagemaker-metrics-proxy"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        if "required: command" in message:  # no command at all: say which there are
            self.print_usage(sys.stderr)
            self.exit(2, f"{self.prog}: error: give a command: serve, monitor or demo (see {self.prog} --help)\n")
        # One line, no usage dump: the line names the flag and what is wrong.
        self.exit(2, f"{self.prog}: error: {message}\n")


class _Version(argparse.Action):
    """``--version``: the version and which build runs, worked out only when asked (it imports the request path)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and which build runs (compiled or pure Python), and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object, option_string: str | None = None) -> None:
        from proxy.process.build import describe

        print(describe())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="SageMaker endpoint metrics for any model server, as a reverse proxy.")
    parser.add_argument("--version", action=_Version)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve = commands.add_parser("serve", help="run the proxy in front of a model server")
    add_options(serve, SERVE_OPTIONS)
    monitor = commands.add_parser(
        "monitor", help="no proxy: sample the instance metrics of a training job's host, serve /metrics, publish to CloudWatch"
    )
    add_options(monitor, MONITOR_OPTIONS, benchmark_switch=False)
    demo = commands.add_parser("demo", help="start the example model and the proxy, send traffic, show the metrics")
    demo.add_argument("--requests", type=int, default=1000, help="how many requests to send (default 1000)")
    demo.add_argument("--keep-running", action="store_true", help="keep the model and proxy up after the traffic")
    return parser


def _see_help(error: ConfigError, command: str) -> str:
    return f" (see {PROG} {command} --help)" if " is required " in str(error) else ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        from proxy.process import serve

        try:
            settings = resolve(args, os.environ)
            return serve.run(settings)
        except ConfigError as e:
            parser.exit(2, f"{PROG}: error: {e}{_see_help(e, 'serve')}\n")
    if args.command == "monitor":
        from proxy.process import monitor

        try:
            monitor.run(resolve_monitor(args, os.environ))
        except ConfigError as e:
            parser.exit(2, f"{PROG}: error: {e}{_see_help(e, 'monitor')}\n")
        return 0
    if args.command == "demo":
        if args.requests < 1:
            parser.exit(2, f"{PROG}: error: --requests must be at least 1\n")
        from proxy.process import demo

        return demo.run(requests=args.requests, keep_running=args.keep_running)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
