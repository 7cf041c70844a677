"""Several model instances behind one proxy: active health checks, least-outstanding balancing.

``BalancedClient`` is an ``ModelClient`` over one ``ConnectionPool`` per instance. Each instance
is pinged (``GET /ping``) on an interval; it leaves the rotation after ``unhealthy_threshold``
failed checks, or at once when a request cannot connect to it, and comes back after
``healthy_threshold`` good ones. The number of healthy instances is the variant's live count.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy.errors import Fault, UpstreamError
from proxy.http.client import IDLE_TIMEOUT_S, ConnectionPool, ModelResponse, ping
from proxy.types import Body, Headers

log = logging.getLogger("proxy.balancer")


@dataclass(frozen=True)
class HealthCheck:
    path: str = "/ping"
    interval_s: float = 2.0
    timeout_s: float = 2.0  # SageMaker's ping timeout
    unhealthy_threshold: int = 2
    healthy_threshold: int = 1


@dataclass
class Instance:
    pool: ConnectionPool
    healthy: bool = True
    outstanding: int = 0
    failures: int = 0
    successes: int = 0
    served: int = field(default=0)


class BalancedClient:
    """Requests go to the healthy instance with the fewest outstanding requests (ties rotate)."""

    def __init__(
        self, urls: list[str], check: HealthCheck, on_change: Callable[[int], None] = lambda n: None, *, idle_timeout: float = IDLE_TIMEOUT_S
    ) -> None:
        if not urls:
            raise ValueError("at least one upstream is needed")
        self.instances = [Instance(ConnectionPool(url, idle_timeout=idle_timeout)) for url in urls]
        self.authority = self.instances[0].pool.authority
        self._check = check
        self._next = 0
        self.on_change = on_change

    def healthy_count(self) -> int:
        return sum(1 for i in self.instances if i.healthy)

    def ready(self) -> bool:
        return any(i.healthy for i in self.instances)

    def _pick(self) -> Instance | None:
        instances = self.instances
        n = len(instances)
        best: Instance | None = None
        start = self._next
        for k in range(n):
            candidate = instances[(start + k) % n]
            if candidate.healthy and (best is None or candidate.outstanding < best.outstanding):
                best = candidate
        self._next = (start + 1) % n
        return best

    async def request(self, method: bytes, target: bytes, headers: Headers, body: Body) -> ModelResponse:
        instance = self._pick()
        if instance is None:
            raise UpstreamError(Fault.NO_LIVE_INSTANCE)
        if headers and headers[0][0] == b"host":
            headers[0] = (b"host", instance.pool.authority)
        instance.outstanding += 1
        instance.served += 1
        try:
            return await instance.pool.request(method, target, headers, body)
        except UpstreamError as e:
            if e.fault is Fault.UPSTREAM_CONNECT:
                # Passive check: a refused connection takes it out now; the active check brings it back.
                self._mark(instance, healthy=False, why=str(e))
            raise
        finally:
            instance.outstanding -= 1

    def _mark(self, instance: Instance, *, healthy: bool, why: str) -> None:
        if instance.healthy == healthy:
            return
        instance.healthy = healthy
        instance.failures = instance.successes = 0
        n = self.healthy_count()
        log.warning("model instance %s is %s (%s); %d healthy", instance.pool.url, "back" if healthy else "out", why, n)
        self.on_change(n)

    async def _watch(self, instance: Instance) -> None:
        while True:
            why = await ping(instance.pool, self._check.path, self._check.timeout_s)
            if why is None:
                instance.failures = 0
                instance.successes += 1
                if not instance.healthy and instance.successes >= self._check.healthy_threshold:
                    self._mark(instance, healthy=True, why="ping answered")
            else:
                instance.successes = 0
                instance.failures += 1
                if instance.healthy and instance.failures >= self._check.unhealthy_threshold:
                    self._mark(instance, healthy=False, why=why)
            await asyncio.sleep(self._check.interval_s)

    async def run(self) -> None:
        """Health-check every instance until cancelled."""
        await asyncio.gather(*(self._watch(i) for i in self.instances))

    async def close(self) -> None:
        for instance in self.instances:
            await instance.pool.close()


class HealthyInstanceCount:
    """n = the healthy instances behind this proxy."""

    def __init__(self, balancer: BalancedClient) -> None:
        self._balancer = balancer

    def current(self) -> int:
        return max(1, self._balancer.healthy_count())

    async def run(self) -> None:
        return None
