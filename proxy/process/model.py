"""The model server as a child of the proxy (``--model-command``), the way a SageMaker container runs its model.

Started in its own process group, its output passed through; the proxy port answers 503 (no live instance) and
``/readyz`` says not ready until the model's ping answers 200, and the time that took is ModelSetupTime. At
SIGTERM the proxy stops accepting, drains, then stops the model (SIGTERM to its group, a grace period,
SIGKILL). When the model exits on its own the proxy says so with its exit status, and either starts it again
with backoff (``--model-restart``, counted) or stops with a non-zero status, so that the orchestrator restarts
the container.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable, Sequence

from metrics.recorder import ModelLifecycleMetrics
from proxy.http.client import ConnectionPool, ModelClient

log = logging.getLogger("proxy.model")

POLL_S = 0.1  # between pings while the model starts
_ASSIGNMENT = r"""[A-Za-z_][A-Za-z0-9_]*=(?:'[^']*'|"(?:[^"\\]|\\.)*"|[^\s'"])*"""  # NAME=value, the value quoted or not
ASSIGNMENTS = re.compile(rf"^((?:\s*{_ASSIGNMENT})*\s*)")  # `FOO='a b' serve` runs as `FOO='a b' exec serve`
COMPOUND = re.compile(r"[;&|()\n`]|\$\(|^\s*exec\s")  # a command line the shell must run as more than one command
MAX_BACKOFF_S = 30.0


def exit_status(returncode: int) -> int:
    """The proxy's exit status for a model that ended with ``returncode``: the model's own, 128 + the signal
    that killed it (as a shell reports it), and 1 for a model that exited 0 on its own."""
    if returncode < 0:
        return 128 - returncode
    return returncode or 1


def describe(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


class ModelProcess:
    """Starts, watches and stops the model. ``ping()`` returns None once the model answers, else why not;
    ``down()`` is called as soon as the model has exited, ``failed(status)`` once when the proxy must stop
    because the model is gone."""

    def __init__(
        self,
        command: str,
        *,
        ping: Callable[[], Awaitable[str | None]],
        metrics: ModelLifecycleMetrics,
        failed: Callable[[int], None],
        down: Callable[[], None] = lambda: None,
        setup_timeout: float,
        stop_timeout: float,
        restart: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._command = command
        self._ping = ping
        self._metrics = metrics
        self._failed = failed
        self._down = down
        self._setup_timeout = setup_timeout
        self._stop_timeout = stop_timeout
        self._restart = restart
        self._clock = clock
        self._process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._timed_out = False  # the last start did not answer within the setup timeout

    async def __aenter__(self) -> ModelProcess:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._stop()

    async def _start(self) -> asyncio.subprocess.Process:
        # Its own session (and process group, which is signalled whole), so a terminal's Ctrl-C reaches the
        # proxy, which stops the model after the drain. A simple command is exec'd: the child is the model
        # itself, so its exit is the model's (a compound one should exec the model last: `cd /m; exec serve`).
        line = self._command if COMPOUND.search(self._command) else ASSIGNMENTS.sub(r"\1exec ", self._command, count=1)
        process = await asyncio.create_subprocess_exec("/bin/sh", "-c", line, start_new_session=True)
        log.info("model: started `%s` (pid %d)", self._command, process.pid)
        return process

    async def _run(self) -> None:
        backoff = 1.0
        while True:
            started = self._clock()
            self._timed_out = False
            process = self._process = await self._start()
            ready = await self._set_up(process, started)
            returncode = await process.wait() if ready else await self._stop()
            self._down()
            if ready:
                _signal_group(process.pid, signal.SIGKILL)  # whatever it left behind in its group
                log.error("model: exited on its own (%s)", describe(returncode))
                backoff = 1.0  # it ran: start again soon
            if not self._restart:
                # Its own status if it ended by itself (crashed while starting, say); 1 if it was stopped for not answering.
                self._failed(exit_status(returncode) if ready or not self._timed_out else 1)
                return
            self._metrics.restarted()
            log.warning("model: starting it again in %g s (--model-restart)", backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _set_up(self, process: asyncio.subprocess.Process, started: float) -> bool:
        """Pings the model until it answers: True, with ModelSetupTime recorded; False if it exited first or
        took longer than the setup timeout."""
        why: str | None = "not pinged yet"
        while process.returncode is None:
            why = await self._ping()
            elapsed = self._clock() - started
            if why is None:
                self._metrics.set_up(int(elapsed * 1_000_000))
                log.info("model: answering its ping after %.3f s", elapsed)
                return True
            if elapsed > self._setup_timeout:
                self._timed_out = True
                log.error("model: not answering its ping after %g s (--model-setup-timeout): %s", self._setup_timeout, why)
                return False
            await asyncio.sleep(POLL_S)
        log.error("model: exited while starting (%s); its last ping: %s", describe(process.returncode), why)
        return False

    async def _stop(self) -> int:
        """SIGTERM to the model's process group, then SIGKILL after the grace period; its return code."""
        process = self._process
        if process is None:
            return 0
        if process.returncode is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), self._stop_timeout)
            except TimeoutError:
                log.warning("model: still running %g s after SIGTERM (--model-stop-timeout); killing it", self._stop_timeout)
                _signal_group(process.pid, signal.SIGKILL)
                await process.wait()
            assert process.returncode is not None
            log.info("model: stopped (%s)", describe(process.returncode))
        _signal_group(process.pid, signal.SIGKILL)  # whatever the model left behind in its group
        return process.returncode


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


class ReadinessGate:
    """Holds the variants' model clients shut (a 503, not an invocation) until the model answers its ping, and
    again while it does not; runs in every process that serves the proxy port."""

    def __init__(self, clients: Sequence[ModelClient], ping: Callable[[ModelClient], Awaitable[str | None]], *, interval_s: float, threshold: int) -> None:
        self._pools = [c for c in clients if isinstance(c, ConnectionPool)]  # a balanced client checks its own
        self._ping = ping
        self._interval_s = interval_s
        self._threshold = threshold
        self._tasks: list[asyncio.Task[None]] = []
        for pool in self._pools:
            pool.available = False

    async def __aenter__(self) -> ReadinessGate:
        self._tasks = [asyncio.create_task(self._watch(p)) for p in self._pools]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def close(self) -> None:
        """The model is gone: 503 at once, until it answers its ping again."""
        for pool in self._pools:
            pool.available = False

    async def _watch(self, pool: ConnectionPool) -> None:
        failures = 0
        while True:
            why = await self._ping(pool)
            failures = 0 if why is None else failures + 1
            if why is None and not pool.available:
                pool.available = True
            elif why is not None and pool.available and failures >= self._threshold:
                pool.available = False
                log.warning("model: %s not answering its ping (%s): 503 until it does", pool.url, why)
            await asyncio.sleep(self._interval_s if pool.available else POLL_S)
