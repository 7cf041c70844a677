"""Admission: at most ``--max-concurrency`` requests at the model at once per process, the rest waiting their
turn in a bounded FIFO queue, as Knative's queue-proxy holds requests for a container (containerConcurrency).

A request that finds the queue full (``--queue-depth``) is refused at once; one that waits past
``--queue-timeout`` is refused then; one whose client goes away while it waits leaves the queue. Each is a
503, never an invocation. The time waited is overhead, not the model's: it lies between ``t_in`` and ``t_send``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from metrics.recorder import InvocationRecorder
from proxy.errors import Fault
from proxy.types import DISCONNECT_EXTENSION, DISCONNECTED, Scope


class Admission:
    """The slots and the queue of one process. ``limit`` 0: no limit and no queue."""

    __slots__ = ("_loop", "_waiters", "depth", "in_flight", "limit", "timeout")

    def __init__(self, limit: int, depth: int, timeout: float) -> None:
        self.limit = limit
        self.depth = depth
        self.timeout = timeout
        self.in_flight = 0  # requests holding a slot: at the model, or being answered
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_enter(self) -> bool:
        """A slot now, if one is free and nobody waits before this request (called only with a limit)."""
        if self.in_flight < self.limit and not self._waiters:
            self.in_flight += 1
            return True
        return False

    async def wait(self, scope: Scope) -> Fault | None:
        """Waits in line for a slot; None once it holds one, else why it gave up (the request is refused)."""
        if scope.get("extensions", {}).get(DISCONNECTED):
            return Fault.CLIENT_DISCONNECT_EARLY  # gone already: no place in line
        if len(self._waiters) >= self.depth:
            return Fault.QUEUE_FULL if self.depth else Fault.OVER_CAPACITY
        loop = self._loop = self._loop or asyncio.get_running_loop()
        turn: asyncio.Future[None] = loop.create_future()
        self._waiters.append(turn)
        hooks = scope.get("extensions", {}).get(DISCONNECT_EXTENSION)
        if hooks is not None:
            hooks.append(turn.cancel)  # the client went away: leave the line
        try:
            await asyncio.wait_for(asyncio.shield(turn), self.timeout)
            return None
        except TimeoutError:
            return self._gave_up(turn, Fault.QUEUE_TIMEOUT)
        except asyncio.CancelledError:
            if turn.cancelled():
                return self._gave_up(turn, Fault.CLIENT_DISCONNECT_EARLY)
            self._gave_up(turn, Fault.CLIENT_DISCONNECT_EARLY)
            raise
        finally:
            if hooks is not None and turn.cancel in hooks:
                hooks.remove(turn.cancel)

    def _gave_up(self, turn: asyncio.Future[None], fault: Fault) -> Fault:
        if turn.done() and not turn.cancelled():
            self.leave()  # the slot came as it gave up: pass it on
        elif turn in self._waiters:
            self._waiters.remove(turn)
            turn.cancel()
        return fault

    def leave(self) -> None:
        """A slot is free: the next in line takes it, else it is given back."""
        if not self._waiters:
            self.in_flight -= 1
            return
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.in_flight -= 1


async def queue(admission: Admission, scope: Scope, recorder: InvocationRecorder, clock: Callable[[], int]) -> int | Fault:
    """A request waits its turn, shown in ``sagemaker_requests_waiting``: the microseconds it waited once it
    holds a slot, or why it was refused."""
    started = clock()
    recorder.waiting(1)
    try:
        fault = await admission.wait(scope)
    finally:
        recorder.waiting(-1)
    return fault if fault is not None else (clock() - started) // 1000
