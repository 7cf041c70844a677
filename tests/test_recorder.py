"""The recorder, lock-free in one process, and lock-free into multiprocess files that the supervisor merges:
the same samples either way, and a dead worker's counts are kept."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from metrics.inmemory import SharedFiles
from metrics.recorder import InvocationMetrics, InvocationRecorder
from proxy.errors import REJECT_REASONS, UPSTREAM_ERROR_REASONS


@dataclass
class Ended:
    """An ended invocation as the recorder reads it (metrics.recorder.Outcome)."""

    status: int = 200
    model_us: int = 0
    overhead_us: int = 30
    instances: int = 1
    upstream_error: str | None = None
    abandoned: bool = False
    request_bytes: int = 10
    response_bytes: int = 100
    first_chunk_us: int | None = None
    first_chunk_model_us: int | None = None
    mid_stream_error: bool = False
    input_tokens: int = 0
    output_tokens: int = 0
    time_per_output_token_us: float | None = None
    time_to_first_token_us: int | None = None
    finish_reason: str | None = None
    trace_id: str | None = None


def record_a_mix(shared: SharedFiles | None = None) -> CollectorRegistry:
    registry = CollectorRegistry()
    metrics = InvocationMetrics(registry, shared=shared, model_latency_buckets=(0.0001, 0.001, 0.01))
    blue, green = (
        InvocationRecorder(metrics, endpoint_name="ep", variant_name=v, reject_reasons=REJECT_REASONS, upstream_error_reasons=UPSTREAM_ERROR_REASONS)
        for v in ("blue", "green")
    )
    for status, model_us in ((200, 50), (200, 100), (404, 999), (503, 20_000)):
        blue.invocation_started()
        blue.invocation_ended(Ended(
            status, model_us, instances=2, first_chunk_us=70, first_chunk_model_us=40, output_tokens=3,
            time_to_first_token_us=60, finish_reason="stop" if status == 200 else "refused",
        ))
    green.invocation_started()
    green.invocation_ended(Ended(502, 60_000_000, 5, instances=3, upstream_error="timeout", mid_stream_error=True))
    green.invocation_started()
    green.invocation_ended(Ended(instances=3, abandoned=True))
    green.invocation_started()  # still in flight
    blue.rejected("payload_too_large")
    blue.live_instances(2)
    green.instance_count_error()
    return registry


def samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }


def merged(directory: Path) -> CollectorRegistry:
    """What the supervisor serves: prometheus-client's merge of the workers' files."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))
    return registry


def test_files_written_lock_free_merge_to_the_same_samples(tmp_path: Path) -> None:
    fast = samples(record_a_mix())
    shared = SharedFiles(str(tmp_path), pid=101)
    assert samples(record_a_mix(shared)) == fast  # the worker's own view
    assert samples(merged(tmp_path)) == fast  # the supervisor's, read from the file
    blue = frozenset({"endpoint_name": "ep", "variant_name": "blue"}.items())
    green = frozenset({"endpoint_name": "ep", "variant_name": "green"}.items())
    assert fast[("sagemaker_invocations_total", blue)] == 4
    assert fast[("sagemaker_invocations_total", green)] == 2
    assert fast[("sagemaker_concurrent_requests_per_model", green)] == 1
    assert fast[("sagemaker_model_latency_seconds_bucket", blue | {("le", "0.0001")})] == 2  # 50 and 100 us: le is inclusive
    assert fast[("sagemaker_model_latency_seconds_bucket", blue | {("le", "+Inf")})] == 4
    assert fast[("sagemaker_model_latency_seconds_sum", blue)] == pytest.approx((50 + 100 + 999 + 20_000) / 1e6)
    assert fast[("sagemaker_first_chunk_overhead_latency_seconds_sum", blue)] == pytest.approx(4 * 30 / 1e6)
    assert fast[("sagemaker_output_tokens_total", blue)] == 12
    assert fast[("sagemaker_mid_stream_errors_total", green)] == 1
    assert fast[("sagemaker_request_size_bytes_count", green)] == 2  # the abandoned invocation too
    assert fast[("sagemaker_invocations_per_instance_total", green)] == 2 / 3


def test_two_workers_add_up_and_a_dead_one_keeps_its_counts(tmp_path: Path) -> None:
    one, two = SharedFiles(str(tmp_path), pid=101), SharedFiles(str(tmp_path), pid=102)
    record_a_mix(one)
    record_a_mix(two)
    both = samples(merged(tmp_path))
    green = frozenset({"endpoint_name": "ep", "variant_name": "green"}.items())
    blue = frozenset({"endpoint_name": "ep", "variant_name": "blue"}.items())
    assert both[("sagemaker_invocations_total", green)] == 4
    assert both[("sagemaker_model_latency_seconds_count", blue)] == 8
    assert both[("sagemaker_concurrent_requests_per_model", green)] == 2  # livesum: one in flight in each
    assert both[("sagemaker_live_instances", blue)] == 2  # livemax, not 4
    one.close()
    multiprocess.mark_process_dead(101, str(tmp_path))
    after = samples(merged(tmp_path))
    assert after[("sagemaker_invocations_total", green)] == 4  # counted once, kept after the worker died
    assert after[("sagemaker_concurrent_requests_per_model", green)] == 1  # its in-flight gauge is gone
