"""Balancing over real model processes: fair spread, health checks take a dead instance out and bring it back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.errors import Fault, UpstreamError
from proxy.upstream.balancer import BalancedClient, HealthCheck, HealthyInstanceCount
from tests.conftest import Running, free_port, start

pytestmark = pytest.mark.e2e

CHECK = HealthCheck(interval_s=0.1, timeout_s=0.5, unhealthy_threshold=2, healthy_threshold=1)
BODY = b'{"instances": [[5.1, 3.5, 1.4, 0.2]]}'


def start_model(port: int, log: Path) -> Running:
    return start(["-m", "example_model", "--host", "127.0.0.1", "--port", str(port)], port, log)


@pytest.fixture
def models(tmp_path: Path) -> Iterator[list[Running]]:
    running = [start_model(free_port(), tmp_path / f"model-{i}.log") for i in range(3)]
    yield running
    for model in running:
        model.stop()


async def invoke(balancer: BalancedClient) -> int:
    headers = [(b"host", b"x"), (b"content-type", b"application/json")]
    response = await balancer.request(b"POST", b"/invocations", headers, BODY)
    try:
        while await response.read():
            pass
    finally:
        response.close()
    return response.status


async def wait_until(condition: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:  # type: ignore[operator]
        await asyncio.sleep(0.02)


def test_spread_health_and_live_count(models: list[Running], tmp_path: Path) -> None:
    changes: list[int] = []
    balancer = BalancedClient([m.url for m in models], CHECK, on_change=changes.append)
    count = HealthyInstanceCount(balancer)

    async def scenario() -> None:
        checks = asyncio.create_task(balancer.run())
        try:
            # Sequential requests rotate over equally idle instances: a fair share each.
            assert [await invoke(balancer) for _ in range(30)] == [200] * 30
            assert [i.served for i in balancer.instances] == [10, 10, 10]
            assert count.current() == 3

            models[1].stop()
            await wait_until(lambda: count.current() == 2)
            assert count.current() == 2
            served = balancer.instances[1].served
            assert [await invoke(balancer) for _ in range(10)] == [200] * 10
            assert balancer.instances[1].served == served  # nothing goes to the dead one

            models[1] = start_model(models[1].port, tmp_path / "model-1-again.log")
            await wait_until(lambda: count.current() == 3)
            assert count.current() == 3
            assert [await invoke(balancer) for _ in range(6)] == [200] * 6
            assert balancer.instances[1].served > served

            for model in models:
                model.stop()
            await wait_until(lambda: not balancer.ready())
            assert not balancer.ready()
            assert count.current() == 1  # n never drops below 1
            with pytest.raises(UpstreamError) as raised:
                await invoke(balancer)
            assert raised.value.fault is Fault.NO_LIVE_INSTANCE
        finally:
            checks.cancel()
            await balancer.close()

    asyncio.run(scenario())
    assert changes[:2] == [2, 3] and changes[-1] == 0


def test_a_refused_connection_takes_the_instance_out_at_once(models: list[Running]) -> None:
    # No active checks running: only the passive check can notice.
    balancer = BalancedClient([m.url for m in models], CHECK)

    async def scenario() -> None:
        models[0].stop()
        statuses = []
        for _ in range(6):
            try:
                statuses.append(await invoke(balancer))
            except UpstreamError as e:
                statuses.append(e.fault.status or 0)
        assert statuses.count(502) == 1  # the one in-flight failure; then the instance is out
        assert statuses.count(200) == 5
        assert not balancer.instances[0].healthy
        await balancer.close()

    asyncio.run(scenario())
