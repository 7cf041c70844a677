"""The composition root: builds the pieces from Settings and runs the proxy and admin servers in one loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING

import uvicorn
from prometheus_client import CollectorRegistry
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from metrics.recorder import InvocationRecorder
from metrics.statistics import PeriodStatistics
from proxy.admin import create_admin_app
from proxy.app import DISCONNECT_EXTENSION, ProxyApp
from proxy.errors import REJECT_REASONS, UPSTREAM_ERROR_REASONS
from proxy.instances import StaticInstanceCount
from proxy.settings import ConfigError, Settings
from proxy.upstream import HttpUpstream

if TYPE_CHECKING:
    from metrics.cloudwatch import CloudWatchPublisher

log = logging.getLogger("proxy")
# Longer than the 60 s idle timeout of common load balancers, so they never reuse a connection we closed.
KEEP_ALIVE_S = 75


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to us: two servers share one loop and stop together."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with two additions for the proxy.

    CONNECT reaches the app, which answers 405: uvicorn cannot parse an authority-form target and
    would answer a bare 400 that the app never sees, so the refusal would go uncounted.
    A lost connection calls the callbacks the app put in ``scope["extensions"][DISCONNECT_EXTENSION]``,
    so the app learns of it without a task per request waiting on ``receive()``.
    """

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {DISCONNECT_EXTENSION: []}  # type: ignore[dict-item]

    def on_headers_complete(self) -> None:
        if self.parser.get_method() == b"CONNECT":
            self.url = b"/"  # the authority is never used: only the configured model is contacted
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        super().connection_lost(exc)
        if cycle is not None and not cycle.response_complete:
            callbacks: list[Callable[[], None]] = cycle.scope.get("extensions", {}).get(DISCONNECT_EXTENSION, [])  # type: ignore[assignment]
            for callback in callbacks:
                callback()


def bind(host: str, port: int) -> socket.socket:
    """Bind before serving, so a taken port is a configuration error (exit 2), not a crash."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _config(app: object, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        http=_HttpProtocol,
        lifespan="off",
        access_log=False,
        server_header=False,
        date_header=False,
        log_config=None,
        log_level=settings.log_level,
        timeout_keep_alive=KEEP_ALIVE_S,
        proxy_headers=False,  # the peer address is the client's; we add X-Forwarded-For ourselves
    )


class _Background:
    """What runs beside the request path in a process that serves it: today, the CloudWatch publisher."""

    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        self._settings = settings
        self.statistics: PeriodStatistics | None = None
        self._publisher: CloudWatchPublisher | None = None
        self._task: asyncio.Task[None] | None = None
        if settings.cloudwatch:
            from metrics.cloudwatch import CloudWatchPublisher, CloudWatchTarget, PublisherHealth

            self.statistics = PeriodStatistics(settings.cloudwatch_period)
            target = CloudWatchTarget(
                namespace=settings.cloudwatch_namespace,
                dimensions=(("EndpointName", settings.endpoint_name), ("VariantName", settings.variant_name)),
                storage_resolution=1 if settings.cloudwatch_period < 60 else 60,
                region=settings.cloudwatch_region,
                endpoint_url=settings.cloudwatch_endpoint_url,
            )
            self._publisher = CloudWatchPublisher(
                self.statistics,
                target,
                PublisherHealth(registry, endpoint_name=settings.endpoint_name, variant_name=settings.variant_name),
                buffer_periods=settings.cloudwatch_buffer_periods,
            )

    def start(self) -> None:
        if self._publisher is not None:
            self._task = asyncio.create_task(self._publisher.run())

    async def stop(self) -> None:
        """After the server has drained its requests: flush the last partial period, within the bound."""
        if self._task is not None:
            self._task.cancel()
        if self._publisher is not None:
            await self._publisher.flush(self._settings.cloudwatch_flush_timeout)


def _proxy_app(settings: Settings, registry: CollectorRegistry, statistics: PeriodStatistics | None) -> tuple[ProxyApp, HttpUpstream]:
    recorder = InvocationRecorder(
        registry,
        endpoint_name=settings.endpoint_name,
        variant_name=settings.variant_name,
        reject_reasons=REJECT_REASONS,
        upstream_error_reasons=UPSTREAM_ERROR_REASONS,
        model_latency_buckets=settings.model_latency_buckets,
        overhead_latency_buckets=settings.overhead_latency_buckets,
        statistics=statistics,
    )
    instances = StaticInstanceCount(settings.instance_count)
    recorder.live_instances(instances.current())
    upstream = HttpUpstream(settings.upstream)
    app = ProxyApp(
        upstream=upstream,
        recorder=recorder,
        instances=instances,
        variant_name=settings.variant_name,
        invocation_routes=settings.invocation_routes,
        max_payload_bytes=settings.max_payload_bytes,
        invocation_timeout=settings.invocation_timeout,
        record=settings.record_metrics,
    )
    return app, upstream


def _on_stop_signals(*servers: uvicorn.Server) -> None:
    def stop() -> None:
        for server in servers:
            server.should_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)


async def serve(settings: Settings, proxy_sock: socket.socket, admin_sock: socket.socket) -> None:
    """One process: the proxy and the admin port in one loop, metrics in memory."""
    registry = CollectorRegistry()
    background = _Background(settings, registry)
    app, upstream = _proxy_app(settings, registry, background.statistics)
    admin = create_admin_app(lambda: registry, upstream, ping_path=settings.ping_path)
    proxy_server = _Server(_config(app, settings))
    admin_server = _Server(_config(admin, settings))
    _on_stop_signals(proxy_server, admin_server)
    _log_start(settings)
    background.start()
    try:
        await asyncio.gather(proxy_server.serve([proxy_sock]), admin_server.serve([admin_sock]))
    finally:
        proxy_server.should_exit = admin_server.should_exit = True
        await background.stop()
        await upstream.close()


def _log_start(settings: Settings) -> None:
    log.info(
        "proxying %s:%d -> %s for endpoint %s variant %s with %d worker(s); metrics on %s:%d/metrics",
        settings.host, settings.port, settings.upstream, settings.endpoint_name, settings.variant_name,
        settings.workers, settings.host, settings.metrics_port,
    )


# -- several workers -------------------------------------------------------------------------------
# Workers share the proxy socket and write their metrics to prometheus-client's multiprocess files;
# the supervisor serves the admin port and merges those files per scrape, so /metrics is one set.


def _worker_main(settings: Settings, proxy_sock: socket.socket) -> None:
    import uvloop

    _setup_logging(settings)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve_worker(settings, proxy_sock))


async def _serve_worker(settings: Settings, proxy_sock: socket.socket) -> None:
    # PROMETHEUS_MULTIPROC_DIR was set before this process started, so values live in its files.
    registry = CollectorRegistry()
    background = _Background(settings, registry)
    app, upstream = _proxy_app(settings, registry, background.statistics)
    server = _Server(_config(app, settings))
    _on_stop_signals(server)
    background.start()
    try:
        await server.serve([proxy_sock])
    finally:
        await background.stop()
        await upstream.close()


async def _supervise(settings: Settings, proxy_sock: socket.socket, admin_sock: socket.socket, multiproc_dir: str) -> None:
    from prometheus_client import multiprocess

    context = multiprocessing.get_context("spawn")

    def start_worker() -> BaseProcess:
        worker = context.Process(target=_worker_main, args=(settings, proxy_sock), name="sagemaker-metrics-proxy-worker")
        worker.start()
        return worker

    def collect() -> CollectorRegistry:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=multiproc_dir)
        return registry

    workers = [start_worker() for _ in range(settings.workers)]
    upstream = HttpUpstream(settings.upstream)
    admin_server = _Server(_config(create_admin_app(collect, upstream, ping_path=settings.ping_path), settings))
    _on_stop_signals(admin_server)
    _log_start(settings)

    async def restart_dead_workers() -> None:
        while not admin_server.should_exit:
            await asyncio.sleep(0.5)
            for i, worker in enumerate(workers):
                if not worker.is_alive() and not admin_server.should_exit:
                    log.warning("worker %s exited with %s; starting another", worker.pid, worker.exitcode)
                    multiprocess.mark_process_dead(worker.pid, multiproc_dir)
                    workers[i] = start_worker()

    supervisor = asyncio.create_task(restart_dead_workers())
    try:
        await admin_server.serve([admin_sock])
    finally:
        supervisor.cancel()
        for worker in workers:
            worker.terminate()
        for worker in workers:
            await asyncio.to_thread(worker.join, 15)
            multiprocess.mark_process_dead(worker.pid, multiproc_dir)
        await upstream.close()


def _setup_logging(settings: Settings) -> None:
    from prometheus_client import disable_created_metrics

    disable_created_metrics()  # *_created series double the exposition and nobody reads them
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")


def run(settings: Settings) -> None:
    """Bind both ports (ConfigError if either is taken), then serve until SIGINT or SIGTERM."""
    import uvloop

    _setup_logging(settings)
    proxy_sock = bind(settings.host, settings.port)
    admin_sock = bind(settings.host, settings.metrics_port)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        if settings.workers == 1:
            runner.run(serve(settings, proxy_sock, admin_sock))
            return
        # A directory of our own, fresh at every start: stale files from an earlier run would add up.
        multiproc_dir = tempfile.mkdtemp(prefix="sagemaker-metrics-proxy-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiproc_dir  # read by prometheus-client in each worker at import
        try:
            runner.run(_supervise(settings, proxy_sock, admin_sock, multiproc_dir))
        finally:
            shutil.rmtree(multiproc_dir, ignore_errors=True)
