"""Where n, the live instance count of the variant, comes from (InvocationsPerInstance = 1/n per invocation).

Every source stores its value and answers ``current()`` from memory: it is called on the request
path. Sources that poll something run ``run()`` as a background task and keep the last good value
when a poll fails, with a warning and a counted error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("proxy.instances")


class InstanceCountSource(Protocol):
    """The live number of model instances behind this variant; never below 1."""

    def current(self) -> int: ...

    async def run(self) -> None: ...


class _Polled:
    """Shared by the polling sources: the stored value, change and error callbacks, the poll loop."""

    def __init__(self, interval_s: float, initial: int = 1) -> None:
        self._count = max(1, initial)
        self._interval = interval_s
        self.on_change: Callable[[int], None] = lambda n: None
        self.on_error: Callable[[], None] = lambda: None

    def current(self) -> int:
        return self._count

    def _set(self, n: int) -> None:
        n = max(1, n)
        if n != self._count:
            log.info("%s: live instances %d -> %d", self, self._count, n)
            self._count = n
            self.on_change(n)

    async def poll(self) -> None:
        raise NotImplementedError

    async def run(self) -> None:
        while True:
            try:
                await self.poll()
            except Exception as e:  # keep the last good value; a source must never stop the proxy
                self.on_error()
                log.warning("%s: %s; keeping %d", self, e, self._count)
            await asyncio.sleep(self._interval)


class StaticInstanceCount:
    """A fixed count from configuration (``--instance-count``)."""

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError("instance count must be at least 1")
        self._count = count

    def current(self) -> int:
        return self._count

    async def run(self) -> None:
        return None


class FileInstanceCount(_Polled):
    """An integer that an orchestrator writes to a file; re-read when the file changes."""

    def __init__(self, path: Path, interval_s: float = 1.0) -> None:
        super().__init__(interval_s)
        self._path = path
        self._seen: tuple[int, int] | None = None

    def __str__(self) -> str:
        return f"instance count file {self._path}"

    async def poll(self) -> None:
        stat = os.stat(self._path)
        key = (stat.st_mtime_ns, stat.st_size)
        if key == self._seen:
            return
        text = self._path.read_text().strip()
        try:
            n = int(text)
        except ValueError:
            raise ValueError(f"holds {text[:40]!r}, not an integer") from None
        if n < 1:
            raise ValueError(f"holds {n}, below 1")
        self._seen = key
        self._set(n)


Resolver = Callable[[str], Awaitable[list[str]]]


async def resolve_addresses(name: str) -> list[str]:
    """The system resolver: every address the name has (a Kubernetes headless service: one per pod)."""
    infos = await asyncio.get_running_loop().getaddrinfo(name, None, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class DnsInstanceCount(_Polled):
    """The number of distinct addresses a name resolves to, re-resolved on an interval."""

    def __init__(self, name: str, interval_s: float = 5.0, resolver: Resolver = resolve_addresses) -> None:
        super().__init__(interval_s)
        self._name = name
        self._resolver = resolver

    def __str__(self) -> str:
        return f"DNS name {self._name}"

    async def poll(self) -> None:
        addresses = set(await self._resolver(self._name))
        if not addresses:
            raise ValueError("resolved to no address")
        self._set(len(addresses))


class SageMakerInstanceCount(_Polled):
    """CurrentInstanceCount of this variant from SageMaker's DescribeEndpoint, polled through boto3."""

    def __init__(self, endpoint_name: str, variant_name: str, client_factory: Callable[[], Any], interval_s: float = 10.0) -> None:
        super().__init__(interval_s)
        self._endpoint = endpoint_name
        self._variant = variant_name
        self._client_factory = client_factory
        self._client: Any = None

    def __str__(self) -> str:
        return f"SageMaker endpoint {self._endpoint} variant {self._variant}"

    def _describe(self) -> int:
        if self._client is None:
            self._client = self._client_factory()
        response = self._client.describe_endpoint(EndpointName=self._endpoint)
        for variant in response.get("ProductionVariants", []):
            if variant.get("VariantName") == self._variant:
                return int(variant["CurrentInstanceCount"])
        raise ValueError(f"DescribeEndpoint lists no variant {self._variant}")

    async def poll(self) -> None:
        self._set(await asyncio.to_thread(self._describe))


def sagemaker_client(region: str | None, endpoint_url: str | None) -> Any:
    """A boto3 SageMaker client; boto3 is imported only when this source is used."""
    import boto3

    return boto3.client("sagemaker", region_name=region, endpoint_url=endpoint_url)
