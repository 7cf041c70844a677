"""The request path: accept, forward, stream back, record, as named phases around one invocation record.

Every clock point of DESIGN.md section 4 is stamped here, on the record (``proxy.invocation.record``):
``t_in`` as the app is called, ``t_send`` just before the model call, ``t_head`` and ``t_done`` as the model's
answer arrives and ends, ``t_out`` once the last byte went to the server. Everything else reads the record
afterwards: the recorder, spans, the access log. Per-chunk measurements are observers
(``proxy.invocation.observers``); the Runtime API is a front (``proxy.invocation.front``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.errors import Fault, UpstreamError
from proxy.http.client import GATHER_BYTES, UpstreamResponse
from proxy.invocation.access import log_access
from proxy.invocation.admission import Admission, queue
from proxy.invocation.front import Front, RuntimeFront
from proxy.invocation.genai import GenAIMetrics, describe
from proxy.invocation.guard import Deadlines, Guard
from proxy.invocation.headers import HOP_HEADER, named_model, request_headers
from proxy.invocation.record import Invocation
from proxy.invocation.routes import Routes, shape, suggestion
from proxy.invocation.stream import stream_back
from proxy.invocation.tracing import Tracing
from proxy.runtime import api, sigv4
from proxy.types import FAULT_KEY, Body, Headers, Message, Receive, Scope, Send, body_size
from proxy.upstream.variants import Endpoint, Variant

log = logging.getLogger("proxy")


@dataclass(frozen=True, slots=True)
class _Forward:
    """What goes to the model: decided in the accept phase, sent in the forward phase."""

    method: bytes
    target: bytes
    headers: Headers
    body: Body


class ProxyApp:
    """The ASGI application on the proxy port: every request goes to a model; invocations are recorded.

    With several variants, ``X-Amzn-SageMaker-Target-Variant`` picks one, else their weights do.
    """

    def __init__(
        self,
        *,
        variants: Sequence[Variant],
        invocation_routes: frozenset[tuple[str, str]],
        max_payload_bytes: int,
        invocation_timeout: float,
        max_buffered_bytes: int = 256 << 20,
        client_write_timeout: float = 60.0,
        max_concurrency: int = 0,
        queue_depth: int | None = None,
        queue_timeout: float = 30.0,
        record: bool = True,
        count_tokens: bool = True,
        endpoint_name: str = "",
        endpoints: Mapping[str, Sequence[Variant]] | None = None,
        components: Mapping[str, Mapping[str, Variant]] | None = None,
        auth: sigv4.CredentialsFile | None = None,
        log_access: bool = False,
        native_routes: bool = True,
        hop: bytes = b"",
        tracing: Tracing | None = None,
        genai: GenAIMetrics | None = None,
        clock: Callable[[], int] = time.perf_counter_ns,
        random: Callable[[], float] = random.random,
    ) -> None:
        """``variants`` are the endpoint ``endpoint_name``'s; ``endpoints`` (name: variants), when given, are
        all the endpoints, the first also served on the native routes."""
        self._endpoints = {name: Endpoint(name, vs, (components or {}).get(name)) for name, vs in (endpoints or {endpoint_name: variants}).items()}
        self._first = next(iter(self._endpoints.values()))
        self._random = random
        self._routes = Routes(invocation_routes)
        self._uncounted = _Uncounted()
        self._max_payload = max_payload_bytes
        self._budget = BodyBudget(max_buffered_bytes)
        self._deadlines = Deadlines(invocation_timeout, client_write_timeout)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._admission = Admission(max_concurrency, queue_depth if queue_depth is not None else 10 * max_concurrency, queue_timeout)
        self._record = record
        self._count_tokens = count_tokens  # off only to measure what counting costs (benchmarks)
        self._auth = auth  # SigV4 on the Runtime API, and on the native routes
        self._native = native_routes  # off: only the Runtime API is served
        self._hop = hop or os.urandom(8).hex().encode()  # this proxy's mark on what it forwards
        self._log_access = log_access  # one line per forwarded request (--access-log)
        self._tracing = tracing  # None: no tracing, and nothing of it on the request path
        self._genai = genai  # None: no GenAI metrics over OTLP, likewise
        self._reachability = _Reachability()
        # The Runtime API: where the model takes invocations.
        self._model_path = self._routes.model_path.encode()
        self._clock = clock

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """At exit, after the drain: the spans and metrics still queued go to the collector, each for at most ``timeout_s``."""
        for telemetry in (self._tracing, self._genai):
            if telemetry is not None:
                telemetry.shutdown(timeout_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is handled by the server; websockets are refused by returning
        record = Invocation(self._clock())
        path: str = scope["path"]
        if path[:10] != "/endpoints" or not api.in_api(path):
            if not self._native:
                await self._refuse(Front(send), Fault.UNKNOWN_OPERATION, "this proxy serves the SageMaker Runtime API only (--native-routes off)")
                return
            front = Front(send, signed=self._auth is not None)
            endpoint: Endpoint | None = self._first
            call = None
        else:
            # The SageMaker Runtime API: the same phases, its shapes on the way in and out.
            call = api.target(path)
            front = RuntimeFront(send, call or api.Target("", False))
            endpoint = None if call is None else self._endpoints.get(call.endpoint)
        try:
            if endpoint is None:
                await self._not_served(scope, receive, front, record, call)
            else:
                request = await self._accept(scope, receive, front, record, endpoint)
                if request is not None:
                    await self._invoke(request, record, scope, receive, front)
        finally:
            self._budget.left += record.held  # the body's bytes, given back

    async def _not_served(self, scope: Scope, receive: Receive, front: Front, record: Invocation, call: api.Target | None) -> None:
        """An endpoint or an operation this proxy does not serve. With SigV4 on, told only to a signed request:
        nobody learns which endpoints exist without a key."""
        if self._auth is not None:
            body = await read_body(receive, self._max_payload, self._budget, record, None)
            if isinstance(body, Fault):
                await self._refuse(front, body)
                return
            if await front.authenticated(scope, body, False, self._auth, []) is None:
                self._first.default.recorder.rejected(Fault.AUTH_FAILED.reason)
                return
        if call is None:
            await self._refuse(front, Fault.UNKNOWN_OPERATION, api.unknown_operation_message(scope["path"]))
        else:
            await self._refuse(front, Fault.UNKNOWN_ENDPOINT, api.unknown_endpoint_message(call.endpoint))

    # -- phase 1: accept, validate, choose the variant, read the body -------------------------------

    async def _accept(self, scope: Scope, receive: Receive, front: Front, record: Invocation, endpoint: Endpoint) -> _Forward | None:
        """The request to forward, or None once it was refused (answered and counted)."""
        method: str = scope["method"]
        headers, declared, target_variant, looped = request_headers(scope, self._hop)
        refusal = (Fault.LOOP_DETECTED, None) if looped else _head_refusal(scope, front, declared, self._max_payload)
        if refusal is not None:
            await self._refuse(front, *refusal, variant=endpoint.default)
            return None
        target, headers, route = front.model_request(scope, headers, self._model_path)
        component = front.component(scope)
        variant = endpoint.choose(target_variant, self._random, component)
        authenticate = front.signed and self._auth is not None  # then nothing is told before the signature is checked
        if variant is None and not authenticate:
            await self._refuse(front, *endpoint.not_found(target_variant, component), variant=endpoint.default)
            return None
        body = await read_body(receive, self._max_payload, self._budget, record, declared)
        if isinstance(body, Fault):
            await self._refuse(front, body, variant=variant or endpoint.default)
            return None
        if authenticate:
            assert self._auth is not None
            signed = await front.authenticated(scope, body, target_variant is not None, self._auth, headers)
            if signed is None:
                (variant or endpoint.default).recorder.rejected(Fault.AUTH_FAILED.reason)
                return None
            headers = [headers[0], *signed]
            if variant is None:
                await self._refuse(front, *endpoint.not_found(target_variant, component), variant=endpoint.default)
                return None
        assert variant is not None
        if not variant.client.ready():
            await self._refuse(front, Fault.NO_LIVE_INSTANCE, variant=variant)
            return None
        headers[0] = (b"host", variant.client.authority)
        if route is not None:  # a container behind the Runtime API gets SageMaker's headers only; a loop is caught a hop later
            headers.append((HOP_HEADER, self._hop))
        record.variant, record.endpoint = variant, endpoint.name
        invocation = True  # every Runtime API call is one
        if route is not None:
            invocation, record.model = (True, None) if (method, route) in self._routes.exact else self._routes.match(method, route)
            if not invocation and method == "POST":
                self._uncounted.seen(method, route)
        record.counted = self._record and invocation
        record.request_bytes = body_size(body)
        if variant.models is not None and record.counted and record.model is None:
            record.model = named_model(scope["headers"], body)
        record.recorder = recorder = variant.recorder if variant.models is None else variant.models.get(record.model)
        if invocation and self._admission.limit:  # only invocations take a slot: a health check never waits behind them
            waited = 0 if self._admission.try_enter() else await queue(self._admission, scope, variant.recorder, self._clock)
            if isinstance(waited, Fault):
                await self._refuse(front, waited, variant=variant)
                return None
            record.admitted = True
            if record.counted:
                recorder.queued(waited)
        return _Forward(method.encode(), target, headers, body)

    # -- phase 2: forward; then record, exactly once -----------------------------------------------------

    async def _invoke(self, request: _Forward, record: Invocation, scope: Scope, receive: Receive, front: Front) -> None:
        variant = record.variant
        assert variant is not None
        clock = self._clock
        loop = self._loop
        if loop is None or not loop.is_running():
            # asyncio.get_running_loop() makes a getpid() system call each time (a fork check): once per loop here.
            loop = self._loop = asyncio.get_running_loop()
        response: UpstreamResponse | None = None
        spans: tuple[Any, Any, int] | None = None
        guard = Guard(loop, self._deadlines, scope, receive)
        try:  # from here the slot at the model is given back, and the invocation recorded, whatever happens
            spans = _begin(scope, record, variant, request, self._tracing, self._genai, clock)
            record.t_send = clock()
            try:
                response = await variant.client.request(request.method, request.target, request.headers, request.body)
            except UpstreamError as e:
                record.t_done = clock()
                record.fault = e.fault
                guard.stop()
                self._reachability.failed(variant, e, record)
                await self._refuse(front, e.fault, server_timing=record.server_timing(), variant=variant)
                return
            record.t_head = clock()
            record.status = response.status
            self._reachability.answered(variant)
            await stream_back(response, record, front.send, guard, self._clock, self._count_tokens)
        except UpstreamError as e:
            # The model failed after its head came. Before the head went on, the client gets the error; after,
            # its connection must be aborted, unless the front ends the answer its own way (an error event).
            record.t_done = clock()
            record.fault = e.fault
            if not record.responded:
                await self._refuse(front, e.fault, server_timing=record.server_timing(), variant=variant)
            elif not await front.broke(e.fault):
                raise
        except asyncio.CancelledError:
            if guard.fault is None:
                raise  # the server is shutting down
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            await self._cancelled(guard.fault, record, front)
        except Exception:
            record.t_done = clock()
            record.fault = Fault.INTERNAL
            log.exception("internal error while proxying %s %s", scope["method"], scope["path"])
            if record.responded:
                raise
            await self._refuse(front, Fault.INTERNAL, variant=variant)
        finally:
            if record.admitted:
                self._admission.leave()
            guard.stop()
            if response is not None:
                response.close()
            if not record.t_out:  # else the answer went out before its tokens were counted
                record.t_out = clock()
            _report(scope, record, self._tracing, spans, self._log_access, self._genai)

    async def _cancelled(self, fault: Fault, record: Invocation, front: Front) -> None:
        """The guard cancelled the call: the client went away (nothing to answer), or the model overran its timeout."""
        if fault is Fault.CLIENT_DISCONNECT:
            record.fault = fault
            return
        record.t_done = self._clock()
        record.fault = Fault.UPSTREAM_TIMEOUT
        if not record.responded:
            await self._refuse(front, Fault.UPSTREAM_TIMEOUT, server_timing=record.server_timing(), variant=record.variant)
        elif not await front.broke(Fault.UPSTREAM_TIMEOUT):
            raise UpstreamError(Fault.UPSTREAM_TIMEOUT) from None

    # -- refusals ---------------------------------------------------------------------------------------

    async def _refuse(
        self, front: Front, fault: Fault, message: str | None = None, *, server_timing: bytes | None = None, variant: Variant | None = None
    ) -> None:
        """Answer with the fault's status and a short error; count refusals of requests never forwarded.

        A refusal before the variant is known is counted on the first variant."""
        variant = variant or self._first.default
        if not fault.invocation:
            variant.recorder.rejected(fault.reason)
        if fault.status is not None:
            await front.refuse(fault, message or fault.message, server_timing, variant.name)


def _begin(
    scope: Scope, record: Invocation, variant: Variant, request: _Forward, tracing: Tracing | None, genai: GenAIMetrics | None,
    clock: Callable[[], int],
) -> tuple[Any, Any, int] | None:
    """The invocation starts: its live instance count and concurrency, and its spans (with tracing on); with
    OTel on, what the GenAI conventions say of the request."""
    if record.counted:
        record.instances = variant.instances.current()
        assert record.recorder is not None
        record.recorder.invocation_started()
    if tracing is None and genai is None:
        return None
    describe(scope, record, request.body)
    return tracing.begin(scope, record, variant, request.headers, clock()) if tracing is not None else None


def _report(
    scope: Scope, record: Invocation, tracing: Tracing | None, spans: tuple[Any, Any, int] | None, access: bool, genai: GenAIMetrics | None
) -> None:
    """Record: the metrics, the spans and the access line, each read from the record, once."""
    if spans is not None:
        assert tracing is not None
        tracing.end(spans, record)
    if record.counted:
        assert record.recorder is not None
        record.recorder.invocation_ended(record)
        if genai is not None:
            genai.ended(record)
    if access:
        log_access(scope, record)


class _Uncounted:
    """Says once per path shape (at most ``limit`` of them) that forwarded POSTs match no invocation route, and
    which flag would count them: a model server whose routes the proxy was not told is otherwise silent."""

    __slots__ = ("_limit", "_shapes")

    def __init__(self, limit: int = 64) -> None:
        self._shapes: set[str] = set()
        self._limit = limit

    def seen(self, method: str, path: str) -> None:
        key = shape(method, path)
        if key in self._shapes or len(self._shapes) >= self._limit:
            return
        self._shapes.add(key)
        log.warning(
            "%s %s was forwarded but is not counted as an invocation: no --invocation-route matches it; %s would count it%s",
            method, path[:200], suggestion(method, path), "" if len(self._shapes) < self._limit else " (no more of these are said)",
        )


class _Reachability:
    """Says once when a variant's model stops taking connections, and once when it answers again."""

    __slots__ = ("_unreachable",)

    def __init__(self) -> None:
        self._unreachable: set[str] = set()

    def failed(self, variant: Variant, error: UpstreamError, record: Invocation) -> None:
        log.debug("model call failed: %s", error)
        if error.fault is Fault.UPSTREAM_CONNECT and variant.name not in self._unreachable:
            self._unreachable.add(variant.name)
            log.warning(
                "the model of variant %s is unreachable (%s): each call gets 502 until it answers; said once, and again when it is back%s",
                variant.name, error, f" (trace_id={record.trace_id} span_id={record.span_id})" if record.trace_id is not None else "",
            )

    def answered(self, variant: Variant) -> None:
        if self._unreachable and variant.name in self._unreachable:
            self._unreachable.discard(variant.name)
            log.warning("the model of variant %s answers again", variant.name)


def _head_refusal(scope: Scope, front: Front, declared: int | None, max_payload: int) -> tuple[Fault, str | None] | None:
    """Why a request is refused from its head alone (a tunnel, a target that is not a path, a method the front
    does not take, a declared body over the max payload); None when it is not."""
    method: str = scope["method"]
    if method == "CONNECT":
        return Fault.METHOD_NOT_ALLOWED, None
    if not (scope.get("raw_path") or scope["path"].encode()).startswith(b"/"):
        return Fault.MALFORMED_REQUEST, "request target must be a path"
    refusal = front.method_refusal(method)
    if refusal is not None:
        return Fault.METHOD_NOT_ALLOWED, refusal
    if declared is not None and declared > max_payload:
        return Fault.PAYLOAD_TOO_LARGE, None
    return None


class BodyBudget:
    """The request bytes this process holds at once (read whole before forwarding): a body that would go past
    it is refused with 503 before it is read, so memory stays bounded whatever the clients send."""

    __slots__ = ("left",)

    def __init__(self, max_bytes: int) -> None:
        self.left = max_bytes

    def take(self, n: int) -> bool:
        if n > self.left:
            return False
        self.left -= n
        return True


async def read_body(receive: Receive, max_payload: int, budget: BodyBudget, record: Invocation, declared: int | None) -> Body | Fault:
    """The whole request body, bounded by the max payload and the process's budget (what it takes is in
    ``record.held``, to give back): a slow uploader costs overhead, not model time.

    A large body stays in the chunks it came in, which go to the model in one gathered write: no copy here."""
    if declared:
        if not budget.take(declared):
            return Fault.BODY_BUDGET
        record.held = declared
    message: Message = await receive()
    if message["type"] == "http.disconnect":
        return message.get(FAULT_KEY, Fault.CLIENT_DISCONNECT_EARLY)
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body if len(body) <= max_payload else Fault.PAYLOAD_TOO_LARGE
    chunks = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            return message.get(FAULT_KEY, Fault.CLIENT_DISCONNECT_EARLY)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_payload:
            return Fault.PAYLOAD_TOO_LARGE
        if size > record.held:  # a body of no declared length takes its budget as it comes
            if not budget.take(size - record.held):
                return Fault.BODY_BUDGET
            record.held = size
        chunks.append(chunk)
    return chunks if size >= GATHER_BYTES else b"".join(chunks)
