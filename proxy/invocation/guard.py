"""The clocks that can end a request early: the model's invocation timeout, the client's write timeout, and the
client going away. Each cancels the request task and says which fired, so the request path can tell them from a
shutdown."""

from __future__ import annotations

import asyncio

from proxy.errors import Fault
from proxy.types import DISCONNECT_EXTENSION, DISCONNECTED, Receive, Scope


class Deadlines:
    """The timeouts of one app's requests, on one ticker instead of a timer per request: the model's
    (``timeout``: to the response head, and between body chunks) and the client's (``client_timeout``:
    blocked writing to a client that does not read).

    The ticker runs while requests are in flight, every twentieth of the shorter timeout (between
    10 ms and half a second), so a timeout fires at most one tick late."""

    def __init__(self, timeout: float, client_timeout: float) -> None:
        self.timeout = timeout
        self.client_timeout = client_timeout
        self.guards: set[Guard] = set()
        self._tick = min(0.5, max(0.01, min(timeout, client_timeout) / 20))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None

    def add(self, guard: Guard, loop: asyncio.AbstractEventLoop) -> None:
        self.guards.add(guard)
        if self._handle is None or self._loop is not loop:
            self._loop = loop
            self._handle = loop.call_later(self._tick, self._check)

    def _check(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        for guard in [g for g in self.guards if g.deadline <= now]:
            guard.timed_out()
        self._handle = loop.call_later(self._tick, self._check) if self.guards else None


class Guard:
    """Cancels the request task when the client disconnects or the model overruns the invocation timeout.

    ``fault`` records which one fired, so the request path can tell these from a shutdown.
    """

    __slots__ = ("_deadlines", "_loop", "_task", "_watcher", "deadline", "done", "fault", "on_client")

    def __init__(self, loop: asyncio.AbstractEventLoop, deadlines: Deadlines, scope: Scope, receive: Receive) -> None:
        self.fault: Fault | None = None
        self.done = False
        task = asyncio.current_task(loop)
        assert task is not None
        self._task = task
        self._loop = loop
        self._deadlines = deadlines
        self.deadline = loop.time() + deadlines.timeout
        self.on_client = False  # which clock runs: the model's, or the client's while a write to it blocks
        deadlines.add(self, loop)
        self._watcher: asyncio.Task[None] | None = None
        extensions = scope.get("extensions", {})
        hooks = extensions.get(DISCONNECT_EXTENSION)
        if hooks is not None:
            hooks.append(self._disconnected)
            if extensions.get(DISCONNECTED):  # gone before this guard was here to hear it
                self._disconnected()
        else:
            # Any other ASGI server: the only portable signal is http.disconnect from receive().
            self._watcher = loop.create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._disconnected()

    def _disconnected(self) -> None:
        self._fire(Fault.CLIENT_DISCONNECT)

    def timed_out(self) -> None:
        # A client that stops reading is a client gone, not a model error.
        self._fire(Fault.CLIENT_DISCONNECT if self.on_client else Fault.UPSTREAM_TIMEOUT)

    def _fire(self, fault: Fault) -> None:
        if self.fault is None and not self.done:
            self.fault = fault
            self._task.cancel()

    def rearm(self) -> None:
        """Waiting on the model again: its timeout counts from now (an idle timeout between chunks)."""
        self.on_client = False
        self.deadline = self._loop.time() + self._deadlines.timeout

    def writing(self) -> None:
        """Waiting on the client: the model's clock stops and the client's runs."""
        self.on_client = True
        self.deadline = self._loop.time() + self._deadlines.client_timeout

    def stop(self) -> None:
        if not self.done:
            self.done = True
            self._deadlines.guards.discard(self)
            if self._watcher is not None:
                self._watcher.cancel()
