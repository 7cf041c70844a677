"""``sagemaker-metrics-proxy monitor``: the instance metrics of one host of a training job, with no proxy.

It samples the watched containers, serves /metrics and /healthz on the metrics port, and with
``--cloudwatch`` publishes to ``/aws/sagemaker/TrainingJobs`` with Host ``[training-job-name]/algo-[n]``.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from prometheus_client import CollectorRegistry

from proxy.process.admin import create_admin_app
from proxy.process.background import Background, Host, check_region, training_host
from proxy.process.serve import bind, listener, setup_logging, stop_on_signals
from proxy.settings import MonitorSettings

log = logging.getLogger("proxy")


async def monitor(settings: MonitorSettings, admin_sock: socket.socket, host: Host) -> None:
    registry = CollectorRegistry()
    background = Background(settings.cloudwatch, registry, health_labels=host.labels, host=host)
    server = listener(create_admin_app(lambda: registry), settings, name="metrics port")
    stop_on_signals(server)
    log.info(
        "sampling %s every %g s; metrics on %s:%d/metrics", host.labels["host"], settings.sampling.interval,
        settings.host, settings.metrics_port,
    )
    async with background:
        await server.serve(admin_sock)


def run(settings: MonitorSettings) -> None:
    """Bind the metrics port and find the cgroups to watch (ConfigError if either fails), then run until SIGINT or SIGTERM."""
    import uvloop

    setup_logging(settings)
    if settings.cloudwatch.enabled:
        check_region(settings.cloudwatch, "--cloudwatch")
    admin_sock = bind(settings.host, settings.metrics_port, "--metrics-port")
    host = training_host(settings)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(monitor(settings, admin_sock, host))
