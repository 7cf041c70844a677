"""Child processes that listen on a port: what the demo and the benchmarks start (the example model, the proxy,
nginx), each stopped when its block ends. One place, so both start and stop them the same way."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(port: int, proc: subprocess.Popen[bytes] | None = None, what: str = "a process", timeout: float = 20) -> None:
    """Until something listens on ``port``; SystemExit if ``proc`` exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{what} exited with code {proc.returncode} before listening on port {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} did not start listening on port {port}")


def tail(log: IO[bytes], limit: int = 2000) -> str:
    """The last ``limit`` bytes written to ``log``, as text."""
    log.flush()
    size = log.seek(0, os.SEEK_END)
    log.seek(max(0, size - limit))
    return log.read().decode(errors="replace").strip() or "(empty)"


@contextmanager
def started(args: list[str], port: int, what: str, *, log: IO[bytes] | None = None, cwd: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``args``, wait until ``port`` listens, and stop it (terminate, then kill) when the block ends.
    Its stderr goes to ``log`` (a temporary file if none), whose tail is shown if it exits before listening."""
    with ExitStack() as stack:
        if log is None:
            log = stack.enter_context(tempfile.TemporaryFile())
        proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=log)
        try:
            try:
                wait_for(port, proc, what)
            except SystemExit as e:
                raise SystemExit(f"{e}\n  command: {' '.join(args)}\n  stderr: {tail(log)}") from None
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
