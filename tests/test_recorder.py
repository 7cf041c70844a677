"""The recorder's two backends, lock-free in one process and prometheus-client's, export the same samples."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from metrics.recorder import InvocationMetrics, InvocationRecorder
from proxy.errors import REJECT_REASONS, UPSTREAM_ERROR_REASONS


def record_a_mix(multiprocess: bool) -> CollectorRegistry:
    registry = CollectorRegistry()
    metrics = InvocationMetrics(registry, multiprocess=multiprocess, model_latency_buckets=(100, 1000, 10_000))
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


def test_both_backends_export_the_same_samples() -> None:
    fast, reference = samples(record_a_mix(False)), samples(record_a_mix(True))
    assert fast == reference
    blue = frozenset({"endpoint_name": "ep", "variant_name": "blue"}.items())
    green = frozenset({"endpoint_name": "ep", "variant_name": "green"}.items())
    assert fast[("sagemaker_invocations_total", blue)] == 4
    assert fast[("sagemaker_invocations_total", green)] == 2
    assert fast[("sagemaker_concurrent_requests_per_model", green)] == 1
    assert fast[("sagemaker_model_latency_microseconds_bucket", blue | {("le", "100.0")})] == 2  # 50 and 100: le is inclusive
    assert fast[("sagemaker_model_latency_microseconds_bucket", blue | {("le", "+Inf")})] == 4
    assert fast[("sagemaker_model_latency_microseconds_sum", blue)] == 50 + 100 + 999 + 20_000
    assert fast[("sagemaker_invocations_per_instance_total", green)] == 2 / 3
