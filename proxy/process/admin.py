"""The admin port: /metrics for Prometheus, /healthz (the proxy is alive), /readyz (the model answers its ping)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.http.client import ModelClient, ping

READY_TIMEOUT_S = 2.0  # SageMaker's ping timeout
# A readiness answer is reused this long: probes from several places must not each ping the model.
READY_CACHE_S = 1.0


def create_admin_app(
    registry: Callable[[], CollectorRegistry],
    upstreams: Sequence[ModelClient] = (),
    *,
    ping_path: str | None = None,
) -> Starlette:
    """``registry`` is called per scrape, so a multiprocess collector can be built fresh each time.
    /readyz is ready when every variant's model answers its ping; without a ``ping_path`` (the
    ``monitor`` command has no model) there is no /readyz."""

    async def metrics(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(registry()), media_type=content_type)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    last: list[tuple[float, str | None]] = []  # (when, why not ready) of the latest ping round

    async def readiness() -> str | None:
        assert ping_path is not None
        if last and time.monotonic() - last[0][0] < READY_CACHE_S:
            return last[0][1]
        reason = None
        for upstream in upstreams:
            reason = await ping(upstream, ping_path, READY_TIMEOUT_S)
            if reason is not None:
                break
        last[:] = [(time.monotonic(), reason)]
        return reason

    async def readyz(request: Request) -> Response:
        reason = await readiness()
        if reason is not None:
            return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ready"})

    routes = [Route("/metrics", metrics, methods=["GET"]), Route("/healthz", healthz, methods=["GET"])]
    if ping_path is not None:
        routes.append(Route("/readyz", readyz, methods=["GET"]))
    app = Starlette(routes=routes)
    # /metrics/ is a 404, not a redirect to a URL built from the client's Host header.
    app.router.redirect_slashes = False
    return app
