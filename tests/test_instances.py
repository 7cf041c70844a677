"""Instance-count sources: a real file, a resolver fed answers over time, and SageMaker through moto's server."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import boto3
import pytest

from proxy.upstream.instances import (
    DnsInstanceCount,
    FileInstanceCount,
    SageMakerInstanceCount,
    StaticInstanceCount,
    resolve_addresses,
)
from tests.conftest import Running


def test_static_count_is_never_below_one() -> None:
    assert StaticInstanceCount(3).current() == 3
    with pytest.raises(ValueError):
        StaticInstanceCount(0)


def test_file_source_follows_the_file_and_keeps_the_last_good_value(tmp_path: Path) -> None:
    path = tmp_path / "instances"
    path.write_text("3\n")
    source = FileInstanceCount(path)
    changes: list[int] = []
    errors: list[None] = []
    source.on_change = changes.append
    source.on_error = lambda: errors.append(None)

    async def scenario() -> None:
        await source.poll()
        assert source.current() == 3
        path.write_text("5")
        os.utime(path, ns=(1, 10**18))  # a new mtime even within the file system's timestamp resolution
        await source.poll()
        assert source.current() == 5
        path.write_text("five")
        os.utime(path, ns=(1, 2 * 10**18))
        with pytest.raises(ValueError, match="not an integer"):
            await source.poll()
        assert source.current() == 5
        path.write_text("0")
        os.utime(path, ns=(1, 3 * 10**18))
        with pytest.raises(ValueError, match="below 1"):
            await source.poll()
        assert source.current() == 5

    asyncio.run(scenario())
    assert changes == [3, 5]


def test_file_source_run_loop_counts_errors(tmp_path: Path) -> None:
    source = FileInstanceCount(tmp_path / "missing", interval_s=0.01)
    errors: list[None] = []
    source.on_error = lambda: errors.append(None)

    async def scenario() -> None:
        task = asyncio.create_task(source.run())
        await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(scenario())
    assert len(errors) >= 2
    assert source.current() == 1


def test_dns_source_counts_distinct_addresses_over_time() -> None:
    answers = iter([["10.0.0.1", "10.0.0.2", "10.0.0.2"], ["10.0.0.1", "10.0.0.2", "10.0.0.3"], [], ["10.0.0.9"]])

    async def resolver(name: str) -> list[str]:
        assert name == "model.default.svc.cluster.local"
        return next(answers)

    source = DnsInstanceCount("model.default.svc.cluster.local", resolver=resolver)

    async def scenario() -> list[int]:
        seen = []
        for _ in range(4):
            try:
                await source.poll()
            except ValueError:
                pass  # no address: the last good value stays
            seen.append(source.current())
        return seen

    assert asyncio.run(scenario()) == [2, 3, 3, 1]


def test_dns_source_real_lookup_of_localhost() -> None:
    addresses = asyncio.run(resolve_addresses("localhost"))
    assert addresses and set(addresses) <= {"127.0.0.1", "::1"}
    source = DnsInstanceCount("localhost")
    asyncio.run(source.poll())
    assert source.current() == len(set(addresses))


@pytest.mark.e2e
def test_sagemaker_source_follows_describe_endpoint(moto: Running, aws_env: None) -> None:
    client = boto3.client("sagemaker", endpoint_url=moto.url, region_name="us-east-1")
    client.create_model(ModelName="iris", ExecutionRoleArn="arn:aws:iam::123456789012:role/r", PrimaryContainer={"Image": "iris:1"})
    client.create_endpoint_config(
        EndpointConfigName="iris-config",
        ProductionVariants=[{"VariantName": "AllTraffic", "ModelName": "iris", "InitialInstanceCount": 2, "InstanceType": "ml.m5.large"}],
    )
    client.create_endpoint(EndpointName="iris", EndpointConfigName="iris-config")
    source = SageMakerInstanceCount("iris", "AllTraffic", lambda: client)
    changes: list[int] = []
    source.on_change = changes.append
    asyncio.run(source.poll())
    assert source.current() == 2
    client.update_endpoint_weights_and_capacities(
        EndpointName="iris", DesiredWeightsAndCapacities=[{"VariantName": "AllTraffic", "DesiredInstanceCount": 5}]
    )
    asyncio.run(source.poll())
    assert source.current() == 5
    assert changes == [2, 5]
    # An unknown variant or a failing API keeps the last good value.
    missing = SageMakerInstanceCount("iris", "Blue", lambda: client)
    with pytest.raises(ValueError, match="no variant Blue"):
        asyncio.run(missing.poll())
    assert missing.current() == 1
