"""The admin app: readiness answers reused for a second, and no redirect built from the client's Host header."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from proxy.process.admin import READY_CACHE_S, create_admin_app
from proxy.types import Body, Headers


class Answer:
    status = 200

    async def read(self) -> bytes:
        return b""

    def close(self) -> None:
        pass


class CountingModel:
    """Implements what ping() uses of an ModelClient; answers 200 and counts the pings."""

    authority = b"model:8080"

    def __init__(self) -> None:
        self.pings = 0

    def ready(self) -> bool:
        return True

    async def request(self, method: bytes, target: bytes, headers: Headers, body: Body) -> Any:
        self.pings += 1
        return Answer()

    async def close(self) -> None:
        pass


def test_readyz_pings_the_model_at_most_once_a_second() -> None:
    model = CountingModel()
    app = create_admin_app(CollectorRegistry, [model], ping_path="/ping")  # type: ignore[list-item]

    async def probe(n: int) -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://admin") as client:
            return [(await client.get("/readyz")).status_code for _ in range(n)]

    started = time.monotonic()
    assert asyncio.run(probe(5)) == [200] * 5
    if time.monotonic() - started < READY_CACHE_S:
        assert model.pings == 1
    time.sleep(READY_CACHE_S + 0.1)
    assert asyncio.run(probe(1)) == [200]
    assert model.pings == 2


@pytest.mark.parametrize("path", ["/metrics/", "/healthz/", "/readyz/"])
def test_a_trailing_slash_is_a_404_not_a_redirect(path: str) -> None:
    app = create_admin_app(CollectorRegistry, [], ping_path="/ping")

    async def get() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://admin") as client:
            return await client.get(path, headers={"host": "attacker.example"})

    response = asyncio.run(get())
    assert response.status_code == 404
    assert "location" not in response.headers
