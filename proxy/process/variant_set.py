"""Builds the production variants from Settings: each one's model client, live instance count and recorder."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from metrics.inflight import InFlight
from metrics.recorder import InvocationMetrics, InvocationRecorder, ModelRecorders
from metrics.statistics import PeriodStatistics
from proxy.errors import REJECT_REASONS, UPSTREAM_ERROR_REASONS
from proxy.http.client import ConnectionPool, ModelClient, ping
from proxy.settings import Settings, VariantConfig
from proxy.upstream.balancer import BalancedClient, HealthCheck, HealthyInstanceCount
from proxy.upstream.instances import (
    DnsInstanceCount,
    FileInstanceCount,
    InstanceCountSource,
    SageMakerInstanceCount,
    StaticInstanceCount,
    sagemaker_client,
)
from proxy.upstream.variants import Variant

log = logging.getLogger("proxy")


class VariantSet:
    """The variants of one process, and the background work that keeps their live counts."""

    def __init__(self) -> None:
        self.variants: list[Variant] = []  # of every endpoint, in order
        self.endpoints: dict[str, list[Variant]] = {}  # each endpoint's, the first served on the native routes
        self.components: dict[str, dict[str, Variant]] = {}  # each endpoint's inference components, by name
        self._clients: list[ConnectionPool | BalancedClient] = []
        self._jobs: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._tasks: list[asyncio.Task[None]] = []

    def clients(self) -> list[ModelClient]:
        return [v.client for v in self.variants] + [c.client for cs in self.components.values() for c in cs.values()]

    async def __aenter__(self) -> VariantSet:
        """Starts the health loops of balanced clients and the polls of live counts."""
        self._tasks = [asyncio.create_task(job()) for job in self._jobs]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for client in self._clients:
            await client.close()


def model_client(settings: Settings, spec: VariantConfig) -> ConnectionPool | BalancedClient:
    """One model: a plain client. Several, or a count of the healthy ones: health-checked and balanced."""
    if len(spec.upstreams) == 1 and (spec.count_from or settings.instance_count_from).kind != "upstreams":
        return ConnectionPool(spec.upstreams[0], idle_timeout=settings.upstream_idle_timeout)
    check = HealthCheck(
        path=settings.ping_path,
        interval_s=settings.health_check_interval,
        timeout_s=settings.health_check_timeout,
        unhealthy_threshold=settings.unhealthy_threshold,
        healthy_threshold=settings.healthy_threshold,
    )
    return BalancedClient(list(spec.upstreams), check, idle_timeout=settings.upstream_idle_timeout)


def _count_source(settings: Settings, endpoint: str, spec: VariantConfig, client: ConnectionPool | BalancedClient) -> InstanceCountSource:
    source = spec.count_from or settings.instance_count_from
    kind, arg = source.kind, source.arg
    if kind == "upstreams":
        assert isinstance(client, BalancedClient)
        return HealthyInstanceCount(client)
    if kind == "sagemaker":
        return SageMakerInstanceCount(
            endpoint, spec.name,
            lambda: sagemaker_client(settings.cloudwatch.region, settings.sagemaker_endpoint_url),
            interval_s=settings.instance_count_interval,
        )
    if kind == "file":
        return FileInstanceCount(Path(arg))
    if kind == "dns":
        return DnsInstanceCount(arg, interval_s=settings.instance_count_interval)
    return StaticInstanceCount(spec.instance_count or settings.instance_count)


def _live_count_to(recorder: InvocationRecorder) -> Callable[[int], None]:
    def update(healthy: int) -> None:
        recorder.live_instances(max(1, healthy))  # n is never below 1

    return update


def _for_model(make: Callable[..., InvocationRecorder], model: str) -> InvocationRecorder:
    return make(model=model)


def build_variants(
    settings: Settings,
    metrics: InvocationMetrics,
    statistics: Mapping[tuple[str, str], PeriodStatistics],
    *,
    in_flight: Callable[[int], InFlight] = lambda column: InFlight(),
    count: bool = True,
    concurrency: Mapping[tuple[str, str], PeriodStatistics] | None = None,
) -> VariantSet:
    """Each variant's client, live count and recorder. ``in_flight(i)`` counts variant i's invocations in
    flight; ``count=False`` (a process that serves no invocations) polls no live count."""
    out = VariantSet()
    for i, (endpoint, variant_name, spec, component) in enumerate(recording_units(settings)):
        key = (endpoint, component_key(component) if component else variant_name)
        make = partial(
            InvocationRecorder,
            metrics,
            endpoint_name=endpoint,
            variant_name=variant_name,
            reject_reasons=REJECT_REASONS,
            upstream_error_reasons=UPSTREAM_ERROR_REASONS,
            statistics=statistics.get(key),
            in_flight=in_flight(i),
            concurrency_statistics=(concurrency or {}).get(key),
            component=component,
            token_statistics=settings.cloudwatch.token_metrics,
        )
        models = ModelRecorders(partial(_for_model, make), settings.max_models) if metrics.model_label else None
        recorder = models.default if models is not None else make()
        client = model_client(settings, spec)
        source = _count_source(settings, endpoint, spec, client)
        recorder.live_instances(source.current())
        if isinstance(client, BalancedClient):
            if isinstance(source, HealthyInstanceCount):
                client.on_change = _live_count_to(recorder)
            out._jobs.append(client.run)
        if count and isinstance(source, FileInstanceCount | DnsInstanceCount | SageMakerInstanceCount):
            source.on_change = recorder.live_instances
            source.on_error = recorder.instance_count_error
            out._jobs.append(source.run)
        out._clients.append(client)
        variant = Variant(variant_name, client, recorder, source, spec.weight, models)
        if component:
            out.components.setdefault(endpoint, {})[component] = variant
        else:
            out.variants.append(variant)
            out.endpoints.setdefault(endpoint, []).append(variant)
    return out


def component_key(name: str) -> str:
    """Where an inference component's statistics are kept beside the variants' (a variant name has no '/')."""
    return f"inference-component/{name}"


def recording_units(settings: Settings) -> list[tuple[str, str, VariantConfig, str]]:
    """What is recorded apart, in a fixed order (the columns of the in-flight counts): each variant, then each
    inference component, as (endpoint, variant, its configuration, component name or "")."""
    units = [(e.name, spec.name, spec, "") for e in settings.endpoints for spec in e.variants]
    units += [(e.name, variant, spec, spec.name) for e in settings.endpoints for variant, spec in e.components]
    return units


@contextlib.asynccontextmanager
async def first_ping(settings: Settings) -> AsyncIterator[None]:
    """While the block runs: each model instance health-checked at start, in the background, and one warning
    for each that fails its first checks; else a model that is down says nothing until the first request."""
    task = asyncio.create_task(_check_each_at_start(settings))
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _check_each_at_start(settings: Settings) -> None:
    specs = [v for e in settings.endpoints for v in e.variants] + [c for e in settings.endpoints for _, c in e.components]
    urls = list(dict.fromkeys(url for spec in specs for url in spec.upstreams))
    await asyncio.gather(*(_check_at_start(url, settings) for url in urls))


async def _check_at_start(url: str, settings: Settings) -> None:
    """``--unhealthy-threshold`` pings, ``--health-check-interval`` apart, as an instance is taken out: a model
    started beside the proxy (``&`` in a shell, a pod's containers) has that long to listen."""
    path, tries = settings.ping_path, settings.unhealthy_threshold
    pool = ConnectionPool(url)
    try:
        for attempt in range(tries):
            why = await ping(pool, path, settings.health_check_timeout)
            if why is None:
                return
            if attempt + 1 < tries:
                await asyncio.sleep(settings.health_check_interval)
    finally:
        await pool.close()
    log.warning(
        "the model does not answer GET %s at start (%s; %d checks %g s apart): check that it runs and listens at %s (--upstream), "
        "and that %s is its health check (--ping-path, --model-server); said once", path, why, tries, settings.health_check_interval, url, path,
    )
