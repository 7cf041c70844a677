"""The recorder, lock-free in one process, and lock-free into multiprocess files that the supervisor merges:
the same samples either way, and a dead worker's counts are kept."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from metrics.inmemory import SharedFiles
from metrics.recorder import InvocationMetrics, InvocationRecorder
from proxy.errors import REJECT_REASONS, UPSTREAM_ERROR_REASONS


def record_a_mix(shared: SharedFiles | None = None) -> CollectorRegistry:
    registry = CollectorRegistry()
    metrics = InvocationMetrics(registry, shared=shared, model_latency_buckets=(100, 1000, 10_000))
    blue, green = (
        InvocationRecorder(metrics, endpoint_name="ep", variant_name=v, reject_reasons=REJECT_REASONS, upstream_error_reasons=UPSTREAM_ERROR_REASONS)
        for v in ("blue", "green")
    )
    for status, model_us in ((200, 50), (200, 100), (404, 999), (503, 20_000)):
        blue.invocation_started()
        blue.invocation_finished(status=status, upstream_error=None, model_us=model_us, overhead_us=30, instances=2, first_byte_us=40)
    green.invocation_started()
    green.invocation_finished(status=502, upstream_error="timeout", model_us=60_000_000, overhead_us=5, instances=3)
    green.invocation_started()
    green.invocation_abandoned(instances=3)
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
    assert fast[("sagemaker_model_latency_microseconds_bucket", blue | {("le", "100.0")})] == 2  # 50 and 100: le is inclusive
    assert fast[("sagemaker_model_latency_microseconds_bucket", blue | {("le", "+Inf")})] == 4
    assert fast[("sagemaker_model_latency_microseconds_sum", blue)] == 50 + 100 + 999 + 20_000
    assert fast[("sagemaker_invocations_per_instance_total", green)] == 2 / 3


def test_two_workers_add_up_and_a_dead_one_keeps_its_counts(tmp_path: Path) -> None:
    one, two = SharedFiles(str(tmp_path), pid=101), SharedFiles(str(tmp_path), pid=102)
    record_a_mix(one)
    record_a_mix(two)
    both = samples(merged(tmp_path))
    green = frozenset({"endpoint_name": "ep", "variant_name": "green"}.items())
    blue = frozenset({"endpoint_name": "ep", "variant_name": "blue"}.items())
    assert both[("sagemaker_invocations_total", green)] == 4
    assert both[("sagemaker_model_latency_microseconds_count", blue)] == 8
    assert both[("sagemaker_concurrent_requests_per_model", green)] == 2  # livesum: one in flight in each
    assert both[("sagemaker_live_instances", blue)] == 2  # livemax, not 4
    one.close()
    multiprocess.mark_process_dead(101, str(tmp_path))
    after = samples(merged(tmp_path))
    assert after[("sagemaker_invocations_total", green)] == 4  # counted once, kept after the worker died
    assert after[("sagemaker_concurrent_requests_per_model", green)] == 1  # its in-flight gauge is gone
