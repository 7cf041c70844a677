"""The access log (``--access-log``): one line per forwarded request, written after its answer went out."""

from __future__ import annotations

import logging

from proxy.invocation.record import Invocation
from proxy.types import Scope

access_log = logging.getLogger("proxy.access")


def log_access(scope: Scope, record: Invocation) -> None:
    """Who, what, the status the client saw, the bytes, the time split, and the trace."""
    client = scope.get("client")
    fault = record.fault
    model_ms = (record.t_done - record.t_send - record.blocked_ns) / 1e6 if record.t_done else float("nan")
    total_ms = (record.t_out - record.t_in) / 1e6
    variant = record.variant.name if record.variant is not None else "-"
    access_log.info(
        '%s "%s %s" %d %d model_ms=%.3f overhead_ms=%.3f variant=%s%s%s',
        client[0] if client else "-", scope["method"], scope["path"], record.client_status, record.response_bytes,
        model_ms, total_ms - model_ms if record.t_done else float("nan"), variant,
        f" error={fault.reason}" if fault is not None else "",
        f" trace_id={record.trace_id} span_id={record.span_id}" if record.trace_id is not None else "",
    )
