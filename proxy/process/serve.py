"""The composition root: builds the pieces from Settings and runs the proxy and admin servers in one loop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from multiprocessing.process import BaseProcess
from typing import Any, Protocol

import uvicorn
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from metrics import definitions as d
from metrics.inflight import InFlight, SharedInFlight
from metrics.inmemory import SharedFiles
from metrics.recorder import InvocationMetrics, ModelLifecycleMetrics
from metrics.statistics import PeriodStatistics
from proxy.errors import Fault
from proxy.http.client import ModelClient, ping
from proxy.http.server import HttpServer, Limits
from proxy.invocation.app import ProxyApp
from proxy.invocation.genai import GenAIMetrics
from proxy.invocation.genai import wanted as genai_wanted
from proxy.invocation.routes import Routes
from proxy.invocation.tracing import Tracing
from proxy.invocation.tracing import wanted as tracing_wanted
from proxy.process.admin import create_admin_app
from proxy.process.background import Background, Host, Stream, check_regions, endpoint_host
from proxy.process.build import describe
from proxy.process.model import ModelProcess, ReadinessGate
from proxy.process.variant_set import VariantSet, build_variants, component_key, first_ping, recording_units
from proxy.runtime import api
from proxy.runtime.sigv4 import CredentialsFile
from proxy.settings import ConfigError, MonitorSettings, Settings
from proxy.types import DISCONNECT_EXTENSION, DISCONNECTED, ASGIApp

log = logging.getLogger("proxy")
LOG_ORDER = ("debug", "info", "warning", "error", "critical")
IN_FLIGHT_FILE = "in_flight.cells"  # in the multiprocess directory; not *.db, which prometheus-client reads as metrics


class Listener(Protocol):
    """A server on one listening socket: ``serve`` returns once ``stop`` was called and it has drained."""

    async def serve(self, sock: socket.socket) -> None: ...

    def stop(self) -> None: ...


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
        # Every request of this connection not answered yet: uvicorn keeps only the newest as self.cycle.
        self._open_cycles = [c for c in getattr(self, "_open_cycles", ()) if not c.response_complete] + [self.cycle]

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        super().connection_lost(exc)
        self._disconnected(cycle)

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers a parse error mid-pipeline itself and closes the transport, but tells the request in
        # flight only later: its answer would go to a closed transport and fail as an error of the proxy.
        super().send_400_response(msg)
        for cycle in getattr(self, "_open_cycles", ()):
            cycle.disconnected = True
            self._disconnected(cycle)

    @staticmethod
    def _disconnected(cycle: Any) -> None:
        if cycle is not None and not cycle.response_complete:
            cycle.scope.setdefault("extensions", {})[DISCONNECTED] = True
            callbacks: list[Callable[[], None]] = cycle.scope.get("extensions", {}).get(DISCONNECT_EXTENSION, [])
            while callbacks:
                callbacks.pop()()


class _Uvicorn(uvicorn.Server):
    """A uvicorn server that leaves signals to us: servers in one loop stop in an order of ours."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class UvicornListener:
    """uvicorn, the reference server, kept as a fallback (``--http-server uvicorn``)."""

    def __init__(self, app: ASGIApp, settings: Settings | MonitorSettings) -> None:
        keep_alive = settings.keep_alive_timeout if isinstance(settings, Settings) else Limits().keep_alive_timeout
        self._server = _Uvicorn(uvicorn.Config(
            app,
            http=_HttpProtocol,
            lifespan="off",
            access_log=False,
            server_header=False,
            date_header=False,
            log_config=None,
            log_level=max(settings.log_level, "warning", key=LOG_ORDER.index),  # its own start and stop lines are ours (_Named)
            timeout_keep_alive=int(keep_alive) or 1,
            proxy_headers=False,  # the peer address is the client's; we add X-Forwarded-For ourselves
        ))

    async def serve(self, sock: socket.socket) -> None:
        await self._server.serve([sock])

    def stop(self) -> None:
        self._server.should_exit = True


class _Named:
    """A server that says, once each, that it serves which port and that it stopped."""

    def __init__(self, server: Listener, name: str, kind: str) -> None:
        self._server = server
        self._name = name
        self._kind = kind

    async def serve(self, sock: socket.socket) -> None:
        host, port = sock.getsockname()[:2]
        log.info("%s: serving on %s:%d (%s)", self._name, host, port, self._kind)
        try:
            await self._server.serve(sock)
        finally:
            log.info("%s: stopped", self._name)

    def stop(self) -> None:
        self._server.stop()


def listener(
    app: ASGIApp, settings: Settings | MonitorSettings, on_refused: Callable[[Fault], None] | None = None, *, name: str, admin: bool = False
) -> Listener:
    """The server for one port: the built-in front door, or uvicorn where ``--http-server uvicorn`` asks for it.
    The admin port is always the built-in server, with a connection limit of its own: a flood of connections
    to the proxy port must not take /healthz and /metrics down with it."""
    if not isinstance(settings, Settings):
        return _Named(HttpServer(app), name, "built-in HTTP/1.1 server")
    if admin:
        count = on_refused or (lambda fault: None)
        limits = Limits(max_connections=settings.admin_max_connections, keep_alive_timeout=settings.keep_alive_timeout)
        return _Named(HttpServer(app, limits, on_refused=lambda fault: count(ADMIN_REFUSALS.get(fault, fault))), name, "built-in HTTP/1.1 server")
    if settings.http_server == "uvicorn":
        return _Named(UvicornListener(app, settings), name, "uvicorn")
    limits = Limits(
        head_timeout=settings.request_head_timeout,
        keep_alive_timeout=settings.keep_alive_timeout,
        body_timeout=settings.request_body_timeout,
        max_head_bytes=settings.max_request_head_bytes,
        max_headers=settings.max_request_headers,
        max_connections=settings.max_connections,
        write_timeout=settings.client_write_timeout,
    )
    return _Named(HttpServer(app, limits, on_refused=on_refused, refusal_headers=api.refusal_headers), name, "built-in HTTP/1.1 server")


ADMIN_REFUSALS = {Fault.TOO_MANY_CONNECTIONS: Fault.ADMIN_TOO_MANY_CONNECTIONS}


def bind(host: str, port: int, flag: str) -> socket.socket:
    """Bind before serving, so a taken port is a configuration error (exit 2), not a crash; the error names
    ``flag``, the option that set the port (and ``--host`` where the address is what failed)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"{flag}: cannot listen on {host}:{port}: {e.strerror}; another process has that port: stop it or give another {flag}") from None
        raise ConfigError(f"--host and {flag}: cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _background(settings: Settings, registry: CollectorRegistry, *, invocations: bool, host: Host | None) -> Background:
    """This process's part: the invocation metrics it records (in ``cloudwatch_namespace``), the host it samples."""
    e = settings.endpoint_name
    streams = {
        (endpoint.name, v.name): Stream(settings.cloudwatch_namespace, ((("EndpointName", endpoint.name), ("VariantName", v.name)),))
        for endpoint in settings.endpoints for v in endpoint.variants
    }
    # An inference component's metrics have SageMaker's dimension InferenceComponentName alone.
    streams.update({
        (endpoint.name, component_key(c.name)): Stream(settings.cloudwatch_namespace, ((("InferenceComponentName", c.name),),))
        for endpoint in settings.endpoints for _, c in endpoint.components
    })
    return Background(
        settings.cloudwatch, registry,
        health_labels={"endpoint_name": e, "variant_name": settings.variants[0].name},
        invocations=streams if invocations else None,
        host=host,
    )


def _proxy_app(
    settings: Settings,
    registry: CollectorRegistry,
    statistics: Mapping[tuple[str, str], PeriodStatistics],
    shared: SharedFiles | None = None,
    in_flight: Callable[[int], InFlight] = lambda column: InFlight(),
    concurrency: Mapping[tuple[str, str], PeriodStatistics] | None = None,
) -> tuple[ProxyApp, VariantSet]:
    metrics = InvocationMetrics(
        registry,
        model_latency_buckets=settings.model_latency_buckets,
        overhead_latency_buckets=settings.overhead_latency_buckets,
        shared=shared,
        model_label=settings.model_label,
        component_label=any(endpoint.components for endpoint in settings.endpoints),
    )
    variants = build_variants(settings, metrics, statistics, in_flight=in_flight, concurrency=concurrency)
    app = ProxyApp(
        variants=variants.variants,
        endpoints=variants.endpoints,
        components=variants.components,
        log_access=settings.access_log,
        tracing=Tracing(registry, settings.otel) if tracing_wanted(settings.otel) else None,
        genai=GenAIMetrics(registry, settings.otel_metrics, settings.genai_provider or settings.model_server or "sagemaker")
        if genai_wanted(settings.otel_metrics) else None,
        invocation_routes=settings.invocation_routes,
        max_payload_bytes=settings.max_payload_bytes,
        max_buffered_bytes=settings.max_buffered_bytes,
        invocation_timeout=settings.invocation_timeout,
        client_write_timeout=settings.client_write_timeout,
        max_concurrency=settings.max_concurrency,
        queue_depth=settings.queue_depth,
        queue_timeout=settings.queue_timeout,
        record=settings.record_metrics,
        count_tokens=settings.count_tokens,
        endpoint_name=settings.endpoint_name,
        auth=CredentialsFile(settings.auth_credentials, region=settings.auth_region) if settings.auth == "sigv4" and settings.auth_credentials else None,
        native_routes=settings.native_routes,
        hop=_hop_mark(settings),
    )
    return app, variants


def _hop_mark(settings: Settings) -> bytes:
    """This proxy's mark on forwarded requests: the same in every worker, another for another proxy."""
    import hashlib

    return hashlib.sha256(f"{socket.gethostname()} {settings.host}:{settings.port} {os.getppid() if settings.workers > 1 else os.getpid()}".encode()).hexdigest()[:16].encode()


class _Stoppable(Protocol):
    def stop(self) -> None: ...


def stop_on_signals(*servers: _Stoppable) -> None:
    def stop() -> None:
        for server in servers:
            server.stop()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)


@contextlib.asynccontextmanager
async def serving(server: Listener, sock: socket.socket) -> AsyncIterator[Listener]:
    """``server`` serves ``sock`` in the background until the block ends, then stops and drains."""
    task = asyncio.create_task(server.serve(sock))
    try:
        yield server
    finally:
        server.stop()
        await task


# Each process role lists its long-lived pieces in an AsyncExitStack: started in order, stopped in reverse
# once its main server returns (on SIGTERM or SIGINT, after draining).


async def serve(settings: Settings, proxy_sock: socket.socket, admin_sock: socket.socket, host: Host | None = None) -> int:
    """One process: the proxy and the admin port in one loop, metrics in memory; ``host`` is sampled here too.
    Returns the exit status: 0, or the model's when it ended on its own (``--model-command``)."""
    registry = CollectorRegistry()
    background = _background(settings, registry, invocations=True, host=host)
    app, variants = _proxy_app(settings, registry, background.statistics, concurrency=background.concurrency)
    admin = create_admin_app(lambda: registry, variants.clients(), ping_path=settings.ping_path)
    proxy_server = listener(app, settings, on_refused=_count_refusals(variants), name="proxy port")
    # On SIGTERM the proxy port drains first; the admin port answers until the last invocation is recorded.
    stop_on_signals(proxy_server)
    status = _ExitStatus(proxy_server)
    _log_start(settings)
    async with contextlib.AsyncExitStack() as pieces:
        pieces.callback(app.shutdown, settings.otel_shutdown_timeout)
        await pieces.enter_async_context(variants)
        await pieces.enter_async_context(background)  # its last CloudWatch period is flushed after the drain
        await pieces.enter_async_context(serving(listener(admin, settings, _count_refusals(variants), name="admin port", admin=True), admin_sock))
        if settings.model_command:  # the model stops after the drain, and the port takes no call while it is down
            gate = await pieces.enter_async_context(_gate(settings, variants.clients()))
            await pieces.enter_async_context(_model(settings, registry, background, variants.clients(), status, gate.close))
        else:  # a model that is down at start is said at once, not at the first request
            await pieces.enter_async_context(first_ping(settings))
        await proxy_server.serve(proxy_sock)
        await _linger(settings)
    return status.code


async def _linger(settings: Settings) -> None:
    """After the drain, the admin port answers a while longer, so that a last scrape sees every invocation."""
    if settings.admin_linger:
        log.info("drained; the admin port answers for %g s more (--admin-linger)", settings.admin_linger)
        await asyncio.sleep(settings.admin_linger)


class _ExitStatus:
    """The process's exit status; a model gone for good stops ``servers`` as a signal would."""

    def __init__(self, *servers: _Stoppable) -> None:
        self.code = 0
        self._servers = servers

    def model_failed(self, code: int) -> None:
        log.error("stopping: the model is gone; exit status %d", code)
        self.code = code
        for server in self._servers:
            server.stop()


def _model(
    settings: Settings, registry: CollectorRegistry, background: Background, clients: list[ModelClient], status: _ExitStatus,
    down: Callable[[], None] = lambda: None,
) -> ModelProcess:
    """The model as a child (--model-command), its setup time and restarts counted on the first variant."""
    assert settings.model_command is not None
    endpoint, variant = settings.endpoint_name, settings.variants[0].name
    client = clients[0]
    return ModelProcess(
        settings.model_command,
        ping=lambda: ping(client, settings.ping_path, settings.health_check_timeout),
        metrics=ModelLifecycleMetrics(registry, endpoint, variant, background.statistics.get((endpoint, variant))),
        failed=status.model_failed,
        down=down,
        setup_timeout=settings.model_setup_timeout,
        stop_timeout=settings.model_stop_timeout,
        restart=settings.model_restart,
    )


def _gate(settings: Settings, clients: list[ModelClient]) -> ReadinessGate:
    return ReadinessGate(
        clients, lambda client: ping(client, settings.ping_path, settings.health_check_timeout),
        interval_s=settings.health_check_interval, threshold=settings.unhealthy_threshold,
    )


def _count_refusals(variants: VariantSet) -> Callable[[Fault], None]:
    """What the front door refuses before a variant is chosen counts on the first variant, as the app's refusals do."""
    recorder = variants.variants[0].recorder
    return lambda fault: recorder.rejected(fault.reason)


def _log_start(settings: Settings) -> None:
    endpoints = "; ".join(
        f"endpoint {e.name}: " + ", ".join(f"variant {v.name} -> {', '.join(v.upstreams)}" for v in e.variants) for e in settings.endpoints
    )
    log.info(
        "proxying %s:%d (%s) with %d worker(s); metrics on %s:%d/metrics; invocations: %s; %s",
        settings.host, settings.port, endpoints, settings.workers, settings.host, settings.metrics_port, Routes(settings.invocation_routes),
        describe(),
    )


# -- several workers -------------------------------------------------------------------------------
# Workers share the proxy socket and write their metrics, lock-free, to files in prometheus-client's
# multiprocess format; the supervisor serves the admin port and merges those files per scrape, so
# /metrics is one set.


def _worker_main(settings: Settings, proxy_sock: socket.socket, multiproc_dir: str, index: int) -> None:
    import uvloop

    setup_logging(settings)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve_worker(settings, proxy_sock, multiproc_dir, index))


async def _serve_worker(settings: Settings, proxy_sock: socket.socket, multiproc_dir: str, index: int) -> None:
    # The invocation metrics are written lock-free to this worker's files in multiproc_dir; the CloudWatch
    # publisher's are prometheus-client's own, which PROMETHEUS_MULTIPROC_DIR (set before this process started) sends there too.
    registry = CollectorRegistry()
    background = _background(settings, registry, invocations=True, host=None)  # the supervisor samples the host
    in_flight_path = os.path.join(multiproc_dir, IN_FLIGHT_FILE)
    columns = len(recording_units(settings))
    app, variants = _proxy_app(
        settings, registry, background.statistics, SharedFiles(multiproc_dir),
        lambda column: SharedInFlight(in_flight_path, index, column, columns), background.concurrency,
    )
    server = listener(app, settings, on_refused=_count_refusals(variants), name=f"proxy port, worker {index}")
    stop_on_signals(server)
    async with contextlib.AsyncExitStack() as pieces:
        pieces.callback(app.shutdown, settings.otel_shutdown_timeout)
        await pieces.enter_async_context(variants)
        await pieces.enter_async_context(background)
        if settings.model_command:  # the supervisor runs the model; each worker waits for its ping
            await pieces.enter_async_context(_gate(settings, variants.clients()))
        await server.serve(proxy_sock)


class _WorkersAndSupervisor(Collector):
    """The workers' multiprocess files and the supervisor's own registry (host metrics, and the health of
    its CloudWatch publisher) as one exposition. A family both have is merged as prometheus-client merges
    processes: samples with the same labels are added, or for a ``livemax`` gauge, the larger kept."""

    MAX_FAMILIES = frozenset({d.CLOUDWATCH_LAST_SUCCESS.prometheus_name, d.LIVE_INSTANCES.prometheus_name})

    def __init__(self, multiproc_dir: str, own: CollectorRegistry) -> None:
        self._multiproc_dir = multiproc_dir
        self._own = own

    def collect(self) -> Iterable[Metric]:
        from prometheus_client import multiprocess

        families: dict[str, Metric] = {}
        for family in [*multiprocess.MultiProcessCollector(None, path=self._multiproc_dir).collect(), *self._own.collect()]:
            seen = families.setdefault(family.name, family)
            if seen is family:
                continue
            combine = max if family.name in self.MAX_FAMILIES else (lambda a, b: a + b)
            index = {(s.name, tuple(sorted(s.labels.items()))): i for i, s in enumerate(seen.samples)}
            for sample in family.samples:
                i = index.get((sample.name, tuple(sorted(sample.labels.items()))))
                if i is None:
                    seen.samples.append(sample)
                else:
                    seen.samples[i] = seen.samples[i]._replace(value=combine(seen.samples[i].value, sample.value))
        return families.values()


class _Workers:
    """The worker processes: started on entry, each restarted in its place (its row of the in-flight counters)
    if it dies, terminated and joined on exit."""

    def __init__(self, settings: Settings, proxy_sock: socket.socket, multiproc_dir: str) -> None:
        self._settings = settings
        self._proxy_sock = proxy_sock
        self._multiproc_dir = multiproc_dir
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[BaseProcess] = []
        self._watch: asyncio.Task[None] | None = None
        self.stopping = False
        self.stopped = asyncio.Event()

    def stop(self) -> None:
        """On SIGINT (which the workers get too) or SIGTERM: a worker exiting now is not replaced."""
        self.stopping = True
        self.stopped.set()

    def _start(self, index: int) -> BaseProcess:
        worker = self._context.Process(
            target=_worker_main, args=(self._settings, self._proxy_sock, self._multiproc_dir, index), name="sagemaker-metrics-proxy-worker"
        )
        worker.start()
        return worker

    async def __aenter__(self) -> _Workers:
        self._workers = [self._start(i) for i in range(self._settings.workers)]
        self._watch = asyncio.create_task(self._restart_dead())
        return self

    async def _restart_dead(self) -> None:
        from prometheus_client import multiprocess

        while True:
            await asyncio.sleep(0.5)
            for i, worker in enumerate(self._workers):
                if not worker.is_alive() and not self.stopping:
                    log.warning("worker %s exited with %s; starting another", worker.pid, worker.exitcode)
                    multiprocess.mark_process_dead(worker.pid, self._multiproc_dir)
                    self._workers[i] = self._start(i)

    async def __aexit__(self, *exc: object) -> None:
        await self.drain()

    async def drain(self) -> None:
        """Each worker drains its requests and exits (SIGTERM); their last counts stay in the files."""
        from prometheus_client import multiprocess

        self.stopping = True
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.terminate()
        for worker in workers:
            await asyncio.to_thread(worker.join, 15)
            multiprocess.mark_process_dead(worker.pid, self._multiproc_dir)


async def _supervise(
    settings: Settings, proxy_sock: socket.socket, admin_sock: socket.socket, multiproc_dir: str, host: Host | None
) -> int:
    # Sampled once, here: in-memory metrics of the supervisor, merged with the workers' at every scrape.
    own = CollectorRegistry()
    # The supervisor records no invocation, but runs the model: its setup time goes to the variant's stream.
    background = _background(settings, own, invocations=bool(settings.model_command), host=host)
    merged = _WorkersAndSupervisor(multiproc_dir, own)

    def collect() -> CollectorRegistry:
        registry = CollectorRegistry()
        registry.register(merged)
        return registry

    # /readyz: the supervisor's own clients, from the workers' builder, health loops running (a balanced client
    # without its loop would take an instance out for good at one refused ping of a model still starting).
    # Their recorders are the supervisor's (merged with the workers' at a scrape): what its admin port refuses counts.
    readiness = build_variants(settings, InvocationMetrics(own), {}, count=False)
    admin_app = create_admin_app(collect, readiness.clients(), ping_path=settings.ping_path)
    admin_server = listener(admin_app, settings, _count_refusals(readiness), name="admin port", admin=True)
    workers = _Workers(settings, proxy_sock, multiproc_dir)
    stop_on_signals(workers)
    status = _ExitStatus(workers)
    _log_start(settings)
    async with contextlib.AsyncExitStack() as pieces:
        await pieces.enter_async_context(readiness)
        await pieces.enter_async_context(background)
        if settings.model_command:  # stopped after the workers have drained
            await pieces.enter_async_context(_model(settings, own, background, readiness.clients(), status))
        else:
            await pieces.enter_async_context(first_ping(settings))
        await pieces.enter_async_context(workers)
        # The admin port answers until every worker has drained, and a little longer: the last scrape sees it all.
        await pieces.enter_async_context(serving(admin_server, admin_sock))
        await workers.stopped.wait()
        await workers.drain()
        await _linger(settings)
    return status.code


def setup_logging(settings: Settings | MonitorSettings) -> None:
    from prometheus_client import disable_created_metrics

    disable_created_metrics()  # *_created series double the exposition and nobody reads them
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    if isinstance(settings, Settings) and settings.access_log:
        logging.getLogger("proxy.access").setLevel(logging.INFO)  # whatever --log-level says


def run(settings: Settings) -> int:
    """Bind both ports and find the cgroups to watch (ConfigError if a port is taken or a cgroup missing),
    then serve until SIGINT or SIGTERM, or until a model it runs is gone; the exit status."""
    import uvloop

    setup_logging(settings)
    check_regions(settings)
    proxy_sock = bind(settings.host, settings.port, "--port")
    admin_sock = bind(settings.host, settings.metrics_port, "--metrics-port")
    host = endpoint_host(settings)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        if settings.workers == 1:
            return runner.run(serve(settings, proxy_sock, admin_sock, host))
        # A directory of our own, fresh at every start: stale files from an earlier run would add up.
        multiproc_dir = tempfile.mkdtemp(prefix="sagemaker-metrics-proxy-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiproc_dir  # read by prometheus-client in each worker at import
        try:
            return runner.run(_supervise(settings, proxy_sock, admin_sock, multiproc_dir, host))
        finally:
            shutil.rmtree(multiproc_dir, ignore_errors=True)
