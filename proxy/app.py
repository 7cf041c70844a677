"""The request path: accept, validate, forward, stream back, record.

Clock points (DESIGN.md section 4), all from the injected monotonic clock in nanoseconds:

- ``t_in``: the app is called for the request (head parsed).
- ``t_send``: just before the first byte of the request goes to the model.
- ``t_done``: the last byte of the model's response has arrived, or the model call failed.
- ``t_out``: the last byte of the response has been handed to the server.

ModelLatency = ``t_done - t_send`` minus the time spent blocked in ``send()`` to the client meanwhile;
OverheadLatency = ``(t_out - t_in) - ModelLatency``.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from metrics.recorder import InvocationRecorder
from proxy import runtime_api, sigv4
from proxy.errors import Fault, UpstreamError, error_body
from proxy.http.client import GATHER_BYTES, ModelClient, ModelResponse
from proxy.instances import InstanceCountSource
from proxy.tokens import EVENT_STREAM, MAX_JSON_BODY, TOKEN_BATCH_BYTES, TOKEN_BATCH_CHUNKS, StreamTokens, json_usage
from proxy.tracing import Tracing
from proxy.types import DISCONNECT_EXTENSION, FAULT_KEY, Body, Headers, Message, Receive, Scope, Send, body_size

log = logging.getLogger("proxy")
access_log = logging.getLogger("proxy.access")

# Hop-by-hop headers (RFC 9110 7.6.1) plus those this proxy sets itself.
TARGET_VARIANT_HEADER = b"x-amzn-sagemaker-target-variant"
REQUEST_DROP = frozenset({
    TARGET_VARIANT_HEADER,
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te", b"trailer", b"upgrade",
    b"proxy-authorization", b"proxy-authenticate", b"expect", b"host", b"content-length",
    b"x-forwarded-proto", b"x-forwarded-host",
})
RESPONSE_DROP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te", b"trailer", b"upgrade",
    b"proxy-authenticate", b"x-amzn-invoked-production-variant",
})
VARIANT_HEADER = b"x-amzn-invoked-production-variant"
# Refusals after which the connection cannot be trusted to be at a request boundary: an oversized
# upload or a tunnel is not drained, and a broken or stalled body has no end to find.
CLOSE_AFTER = frozenset({Fault.PAYLOAD_TOO_LARGE, Fault.METHOD_NOT_ALLOWED, Fault.BODY_TIMEOUT, Fault.MALFORMED_REQUEST})


def _dropped(headers: Headers, always: frozenset[bytes]) -> frozenset[bytes]:
    """``always`` plus the header names listed in Connection, which are hop-by-hop for this hop only."""
    tokens: set[bytes] | None = None
    for name, value in headers:
        if name == b"connection":
            tokens = tokens or set(always)
            tokens.update(t.strip().lower() for t in value.split(b","))
    return always if tokens is None else frozenset(tokens)


def _server_timing(model_ns: int, overhead_ns: int) -> bytes:
    return b"model;dur=%.3f, overhead;dur=%.3f" % (model_ns / 1e6, overhead_ns / 1e6)


class _Deadlines:
    """The timeouts of one app's requests, on one ticker instead of a timer per request: the model's
    (``timeout``: to the response head, and between body chunks) and the client's (``client_timeout``:
    blocked writing to a client that does not read).

    The ticker runs while requests are in flight, every twentieth of the shorter timeout (between
    10 ms and half a second), so a timeout fires at most one tick late."""

    def __init__(self, timeout: float, client_timeout: float) -> None:
        self.timeout = timeout
        self.client_timeout = client_timeout
        self.guards: set[_Guard] = set()
        self._tick = min(0.5, max(0.01, min(timeout, client_timeout) / 20))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None

    def add(self, guard: _Guard, loop: asyncio.AbstractEventLoop) -> None:
        self.guards.add(guard)
        if self._handle is None or self._loop is not loop:
            self._loop = loop
            self._handle = loop.call_later(self._tick, self._check)

    def _check(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        for guard in [g for g in self.guards if g.deadline <= now]:
            guard.timed_out()
        self._handle = loop.call_later(self._tick, self._check) if self.guards else None


class _Guard:
    """Cancels the request task when the client disconnects or the model overruns the invocation timeout.

    ``fault`` records which one fired, so the request path can tell these from a shutdown.
    """

    __slots__ = ("_deadlines", "_loop", "_task", "_watcher", "deadline", "done", "fault", "on_client")

    def __init__(self, loop: asyncio.AbstractEventLoop, deadlines: _Deadlines, scope: Scope, receive: Receive) -> None:
        self.fault: Fault | None = None
        self.done = False
        task = asyncio.current_task(loop)
        assert task is not None
        self._task = task
        self._loop = loop
        self._deadlines = deadlines
        self.deadline = loop.time() + deadlines.timeout
        self.on_client = False  # which clock runs: the model's, or the client's while a write to it blocks
        deadlines.add(self, loop)
        self._watcher: asyncio.Task[None] | None = None
        hooks = scope.get("extensions", {}).get(DISCONNECT_EXTENSION)
        if hooks is not None:
            hooks.append(self._disconnected)
        else:
            # Any other ASGI server: the only portable signal is http.disconnect from receive().
            self._watcher = loop.create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._disconnected()

    def _disconnected(self) -> None:
        self._fire(Fault.CLIENT_DISCONNECT)

    def timed_out(self) -> None:
        # A client that stops reading is a client gone, not a model error.
        self._fire(Fault.CLIENT_DISCONNECT if self.on_client else Fault.UPSTREAM_TIMEOUT)

    def _fire(self, fault: Fault) -> None:
        if self.fault is None and not self.done:
            self.fault = fault
            self._task.cancel()

    def rearm(self) -> None:
        """Waiting on the model again: its timeout counts from now (an idle timeout between chunks)."""
        self.on_client = False
        self.deadline = self._loop.time() + self._deadlines.timeout

    def writing(self) -> None:
        """Waiting on the client: the model's clock stops and the client's runs."""
        self.on_client = True
        self.deadline = self._loop.time() + self._deadlines.client_timeout

    def stop(self) -> None:
        if not self.done:
            self.done = True
            self._deadlines.guards.discard(self)
            if self._watcher is not None:
                self._watcher.cancel()


@dataclass(frozen=True)
class Variant:
    """A production variant: its model instances, its live count, its metrics, its share of the traffic."""

    name: str
    client: ModelClient
    recorder: InvocationRecorder
    instances: InstanceCountSource
    weight: float = 1.0


@dataclass(slots=True)
class Invocation:
    """The record of one request, stamped by the request path and read afterwards by whatever reports it
    (the recorder now; spans and stream metrics read the same record).

    Clock points in monotonic nanoseconds (DESIGN.md section 4); 0 where never reached.
    """

    t_in: int  # the app is called for the request (head parsed)
    variant: Variant | None = None
    counted: bool = False  # an invocation route: recorded in the invocation metrics
    instances: int = 1  # the variant's live instances when it started: n of InvocationsPerInstance
    t_send: int = 0  # just before the request's first byte goes to the model
    t_head: int = 0  # the model's response head arrived
    t_done: int = 0  # the model's last byte arrived, or its call failed; 0: it never ended (client gone)
    t_out: int = 0  # the response's last byte was handed to the server
    blocked_ns: int = 0  # time in send() to the client while the model was still answering
    t_first_byte: int = 0  # a streamed response: the model's first body byte arrived
    t_first_out: int = 0  # a streamed response: its first body chunk is handed to the server
    status: int = 0  # the model's status (read only when there is no fault)
    fault: Fault | None = None
    responded: bool = False  # the response head was handed to the server
    request_bytes: int = 0
    response_bytes: int = 0
    input_tokens: int = 0  # OpenAI-compatible responses (proxy.tokens)
    output_tokens: int = 0
    time_per_output_token_ns: float | None = None
    endpoint: str = ""  # the endpoint's name
    trace_id: str | None = None  # with tracing on (proxy.tracing): the trace, and the proxy's SERVER span in it
    span_id: str | None = None

    # What the recorder reads (metrics.recorder.Outcome).
    @property
    def abandoned(self) -> bool:
        """The client went away while the model worked: an invocation with no error class and no latency."""
        return self.fault is Fault.CLIENT_DISCONNECT or not self.t_done

    @property
    def upstream_error(self) -> str | None:
        return self.fault.reason if self.fault is not None else None

    @property
    def model_us(self) -> int:
        return (self.t_done - self.t_send - self.blocked_ns) // 1000

    @property
    def overhead_us(self) -> int:
        return (self.t_out - self.t_in - (self.t_done - self.t_send - self.blocked_ns)) // 1000

    @property
    def first_chunk_us(self) -> int | None:
        return (self.t_first_out - self.t_in) // 1000 if self.t_first_out and self.t_first_byte else None

    @property
    def first_chunk_model_us(self) -> int | None:
        return (self.t_first_byte - self.t_send) // 1000 if self.t_first_out and self.t_first_byte else None

    @property
    def mid_stream_error(self) -> bool:
        """The response broke after its head went to the client (the model's fault, not the client's)."""
        fault = self.fault
        return self.responded and fault is not None and fault.invocation and fault.status is not None

    @property
    def time_per_output_token_us(self) -> float | None:
        per_token = self.time_per_output_token_ns
        return None if per_token is None else per_token / 1000


class _Endpoint:
    """One endpoint's production variants, and how a request picks one: by name, else by weight."""

    __slots__ = ("choices", "cumulative", "default", "name", "variants")

    def __init__(self, name: str, variants: Sequence[Variant]) -> None:
        if not variants:
            raise ValueError("at least one variant is needed")
        self.name = name
        self.variants = {v.name.encode(): v for v in variants}
        self.default = variants[0]  # where refusals before a variant is chosen are counted
        self.choices = list(variants) if len(variants) > 1 else []
        total = sum(v.weight for v in variants)
        self.cumulative = list(itertools.accumulate(v.weight / total for v in variants))

    def choose(self, target: bytes | None, random: Callable[[], float]) -> Variant | None:
        """The variant for this request; None for an unknown target variant."""
        if target is not None:
            return self.variants.get(target)
        if not self.choices:
            return self.default
        i = bisect.bisect_right(self.cumulative, random())
        return self.choices[min(i, len(self.choices) - 1)]


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
        client_write_timeout: float = 60.0,
        max_concurrency: int = 0,
        record: bool = True,
        count_tokens: bool = True,
        endpoint_name: str = "",
        endpoints: Mapping[str, Sequence[Variant]] | None = None,
        auth: sigv4.CredentialsFile | None = None,
        log_access: bool = False,
        tracing: Tracing | None = None,
        clock: Callable[[], int] = time.perf_counter_ns,
        random: Callable[[], float] = random.random,
    ) -> None:
        """``variants`` are the endpoint ``endpoint_name``'s; ``endpoints`` (name: variants), when given, are
        all the endpoints, the first also served on the native routes."""
        self._endpoints = {name: _Endpoint(name, vs) for name, vs in (endpoints or {endpoint_name: variants}).items()}
        self._first = next(iter(self._endpoints.values()))
        self._random = random
        self._routes = invocation_routes
        self._max_payload = max_payload_bytes
        self._deadlines = _Deadlines(invocation_timeout, client_write_timeout)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._max_concurrency = max_concurrency  # 0: no limit
        self._in_flight = 0  # requests forwarded and not yet answered, all variants
        self._record = record
        self._count_tokens = count_tokens  # off only to measure what counting costs (benchmarks)
        # The Runtime API: where the model takes invocations.
        self._auth = auth  # SigV4 on the Runtime API
        self._log_access = log_access  # one line per forwarded request (--access-log)
        self._tracing = tracing  # None: no tracing, and nothing of it on the request path
        self._unreachable: set[str] = set()  # variants whose model last refused a connection: told once, and when back
        self._model_path = next((p for m, p in sorted(invocation_routes) if m == "POST"), "/invocations").encode()
        self._clock = clock

    def shutdown(self) -> None:
        """At exit, after the drain: the spans still queued go to the collector."""
        if self._tracing is not None:
            self._tracing.shutdown()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is handled by the server; websockets are refused by returning
        record = Invocation(self._clock())
        path: str = scope["path"]
        if path[:11] == "/endpoints/":
            call = runtime_api.target(path)
            if call is not None:
                # The SageMaker Runtime API: the same phases, its shapes on the way in and out.
                api = runtime_api.RuntimeSend(send, call)
                endpoint = self._endpoints.get(call.endpoint)
                if endpoint is None:
                    for message in runtime_api.unknown_endpoint(call.endpoint):
                        await send(message)
                    return
                request = await self._accept(scope, receive, api, record, endpoint)
                if request is not None:
                    await self._invoke(request, record, scope, receive, api)
                return
        request = await self._accept(scope, receive, send, record, self._first)
        if request is not None:
            await self._invoke(request, record, scope, receive, send)

    # -- phase 1: accept, validate, choose the variant, read the body -------------------------------

    async def _accept(self, scope: Scope, receive: Receive, send: Send, record: Invocation, endpoint: _Endpoint) -> _Forward | None:
        """The request to forward, or None once it was refused (answered and counted)."""
        method: str = scope["method"]
        if method == "CONNECT":
            await self._refuse(send, Fault.METHOD_NOT_ALLOWED, variant=endpoint.default)
            return None
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        if not raw_path.startswith(b"/"):
            await self._refuse(send, Fault.MALFORMED_REQUEST, "request target must be a path", variant=endpoint.default)
            return None
        api = send if isinstance(send, runtime_api.RuntimeSend) else None
        if api is not None and method != "POST":
            await self._refuse(send, Fault.METHOD_NOT_ALLOWED, f"{'InvokeEndpointWithResponseStream' if api.streaming else 'InvokeEndpoint'} takes POST", variant=endpoint.default)
            return None
        headers, declared, target_variant = self._request_headers(scope)
        if api is not None:
            headers = [headers[0], *runtime_api.request_headers(scope["headers"], api.streaming)]
            raw_path, scope_path = self._model_path, self._model_path.decode()
        else:
            scope_path = scope["path"]
        if declared is not None and declared > self._max_payload:
            await self._refuse(send, Fault.PAYLOAD_TOO_LARGE, variant=endpoint.default)
            return None
        variant = endpoint.choose(target_variant, self._random)
        authenticate = api is not None and self._auth is not None  # then nothing is told before the signature is checked
        if variant is None and not authenticate:
            await self._refuse_variant(send, target_variant, endpoint)
            return None
        body = await self._read_body(receive)
        if isinstance(body, Fault):
            await self._refuse(send, body, variant=variant or endpoint.default)
            return None
        if authenticate:
            assert api is not None
            signed = await self._authenticated(scope, api, body, target_variant is not None, variant or endpoint.default)
            if signed is None:
                return None
            headers = [headers[0], *signed]
            if variant is None:
                await self._refuse_variant(send, target_variant, endpoint)
                return None
        assert variant is not None
        if not variant.client.ready():
            await self._refuse(send, Fault.NO_LIVE_INSTANCE, variant=variant)
            return None
        if self._max_concurrency and self._in_flight >= self._max_concurrency:
            await self._refuse(send, Fault.OVER_CAPACITY, variant=variant)
            return None
        headers[0] = (b"host", variant.client.authority)
        query: bytes = scope.get("query_string", b"") if api is None else b""
        record.variant = variant
        record.endpoint = endpoint.name
        record.counted = self._record and (api is not None or (method, scope_path) in self._routes)
        record.request_bytes = body_size(body)
        return _Forward(method.encode(), raw_path + b"?" + query if query else raw_path, headers, body)

    # -- phases 2 and 3: forward, stream back; then record, exactly once --------------------------------

    async def _invoke(self, request: _Forward, record: Invocation, scope: Scope, receive: Receive, send: Send) -> None:
        variant = record.variant
        assert variant is not None
        clock = self._clock
        loop = self._loop
        if loop is None or not loop.is_running():
            # asyncio.get_running_loop() makes a getpid() system call each time (a fork check): once per loop here.
            loop = self._loop = asyncio.get_running_loop()
        guard = _Guard(loop, self._deadlines, scope, receive)
        if record.counted:
            record.instances = variant.instances.current()
            variant.recorder.invocation_started()
        response: ModelResponse | None = None
        tracing = self._tracing
        spans = None
        if tracing is not None:
            offset = tracing.wall_offset(clock())
            spans = tracing.begin(scope, record, variant, request.headers, record.t_in + offset)
            context = spans[0].get_span_context()
            record.trace_id, record.span_id = format(context.trace_id, "032x"), format(context.span_id, "016x")
        self._in_flight += 1
        try:
            record.t_send = clock()
            try:
                response = await variant.client.request(request.method, request.target, request.headers, request.body)
            except UpstreamError as e:
                record.t_done = clock()
                record.fault = e.fault
                guard.stop()
                log.debug("model call failed: %s", e)
                if e.fault is Fault.UPSTREAM_CONNECT and variant.name not in self._unreachable:
                    self._unreachable.add(variant.name)
                    log.warning(
                        "the model of variant %s is unreachable (%s): each call gets 502 until it answers; said once, and again when it is back%s",
                        variant.name, e, f" (trace_id={record.trace_id} span_id={record.span_id})" if record.trace_id is not None else "",
                    )
                await self._refuse(send, e.fault, None, _server_timing(record.t_done - record.t_send, record.t_send - record.t_in), variant)
                return
            record.t_head = clock()
            record.status = response.status
            if self._unreachable and variant.name in self._unreachable:
                self._unreachable.discard(variant.name)
                log.warning("the model of variant %s answers again", variant.name)
            await self._stream_back(response, record, send, guard)
        except UpstreamError as e:
            # The model failed after the head was sent: the client's connection must be aborted,
            # or a Runtime API stream ended with its error event.
            record.t_done = clock()
            record.fault = e.fault
            if isinstance(send, runtime_api.RuntimeSend) and send.streaming:
                await send.stream_error(e.fault)
                return
            raise
        except Exception:
            record.t_done = clock()
            record.fault = Fault.INTERNAL
            log.exception("internal error while proxying %s %s", scope["method"], scope["path"])
            if record.responded:
                raise
            await self._refuse(send, Fault.INTERNAL, variant=variant)
        except asyncio.CancelledError:
            cancelled = guard.fault
            if cancelled is None:
                raise  # the server is shutting down
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            if cancelled is Fault.CLIENT_DISCONNECT:
                record.fault = cancelled
                return
            record.t_done = clock()
            record.fault = Fault.UPSTREAM_TIMEOUT
            if record.responded:
                if isinstance(send, runtime_api.RuntimeSend) and send.streaming:
                    await send.stream_error(Fault.UPSTREAM_TIMEOUT)
                    return
                raise UpstreamError(Fault.UPSTREAM_TIMEOUT) from None
            await self._refuse(send, Fault.UPSTREAM_TIMEOUT, None, _server_timing(record.t_done - record.t_send, record.t_send - record.t_in), variant)
        finally:
            self._in_flight -= 1
            guard.stop()
            if response is not None:
                response.close()
            if not record.t_out:  # else the answer went out before its tokens were counted
                record.t_out = clock()
            if spans is not None:
                assert tracing is not None
                tracing.end(spans, record, record.endpoint, offset)
            if record.counted:
                variant.recorder.invocation_ended(record)
            if self._log_access:
                self._access(scope, record)

    async def _stream_back(self, response: ModelResponse, record: Invocation, send: Send, guard: _Guard) -> None:
        """The model's response to the client: whole if it is in already, else chunk by chunk as it comes.

        Time blocked in ``send()`` before the model's last byte is the client's, not the model's. A streamed
        response (chunked, or read to the close) is also timed chunk by chunk, and an OpenAI-compatible event
        stream has its tokens counted as it passes."""
        clock = self._clock
        timing = _server_timing(record.t_head - record.t_send, record.t_send - record.t_in)
        headers = self._response_headers(response.status, response.headers, timing, record.variant)
        start = {"type": "http.response.start", "status": response.status, "headers": headers}
        record.responded = True
        content_type = next((v for n, v in response.headers if n == b"content-type"), b"")
        if response.complete:
            record.t_done = record.t_head
            guard.stop()
            body = response.take_buffered()
            record.response_bytes = len(body)
            await send(start)
            if response.streamed and body:
                record.t_first_byte = record.t_head  # a whole stream that came with its head
                record.t_first_out = clock()
            await send({"type": "http.response.body", "body": body})
            record.t_out = clock()
            if record.counted and self._count_tokens:  # after the answer went out: the client does not wait for it
                self._count_whole(record, content_type, body, response.streamed)
            return
        await send(start)
        record.blocked_ns += clock() - record.t_head
        streamed = response.streamed
        recorder = record.variant.recorder if record.counted and streamed and record.variant is not None else None
        tokens = StreamTokens() if recorder is not None and self._count_tokens and content_type.startswith(EVENT_STREAM) else None
        pending: list[bytes] = []  # chunks passed on and not yet scanned for tokens, with their arrivals
        arrivals: list[int] = []
        scanned = 0  # response bytes when the last batch was scanned
        # A sized JSON answer that did not come with its head: kept (bounded) for its usage object.
        whole: list[bytes] | None = None
        if record.counted and self._count_tokens and not streamed and content_type.startswith(b"application/json"):
            length = next((v for n, v in response.headers if n == b"content-length"), b"")
            if length.isdigit() and int(length) <= MAX_JSON_BODY:
                whole = []
        chunk = response.take_buffered()
        arrived = record.t_head  # when the chunk in hand came from the model
        blocked = record.blocked_ns  # blocked_ns when it came
        if chunk and streamed:
            record.t_first_byte = arrived
        while True:
            if chunk:
                record.response_bytes += len(chunk)
                if tokens is not None:
                    pending.append(chunk)
                    arrivals.append(arrived)
                elif whole is not None:
                    whole.append(chunk)
                t0 = clock()
                if streamed and not record.t_first_out:
                    record.t_first_out = t0
                guard.writing()
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                record.blocked_ns += clock() - t0
                guard.rearm()
                if tokens is not None and (len(pending) >= TOKEN_BATCH_CHUNKS or record.response_bytes - scanned >= TOKEN_BATCH_BYTES):
                    # Scanned a batch at a time, once the chunks went out: one call per batch, not per chunk.
                    tokens.feed_chunks(pending, arrivals)
                    pending, arrivals, scanned = [], [], record.response_bytes
            chunk = await response.read()
            if not chunk:
                break
            now = clock()
            if streamed and not record.t_first_byte:
                record.t_first_byte = now
            elif recorder is not None:
                recorder.inter_chunk((now - arrived - (record.blocked_ns - blocked)) // 1000)
            arrived, blocked = now, record.blocked_ns
        record.t_done = clock()
        guard.stop()
        await send({"type": "http.response.body", "body": b""})
        record.t_out = clock()
        if tokens is not None:
            if pending:
                tokens.feed_chunks(pending, arrivals)
            tokens.finish(arrived)
            record.input_tokens = tokens.input_tokens
            record.output_tokens = tokens.output_tokens
            record.time_per_output_token_ns = tokens.time_per_output_token_ns()
        elif whole is not None:
            usage = json_usage(content_type, b"".join(whole))
            if usage is not None:
                record.input_tokens, record.output_tokens = usage

    @staticmethod
    def _access(scope: Scope, record: Invocation) -> None:
        """The access log line of a forwarded request: who, what, the status, the time split."""
        client = scope.get("client")
        fault = record.fault
        status = (fault.status or 499) if fault is not None else record.status  # 499: the client went away first
        model_ms = (record.t_done - record.t_send - record.blocked_ns) / 1e6 if record.t_done else float("nan")
        total_ms = (record.t_out - record.t_in) / 1e6
        variant = record.variant.name if record.variant is not None else "-"
        access_log.info(
            '%s "%s %s" %d %d model_ms=%.3f overhead_ms=%.3f variant=%s%s%s',
            client[0] if client else "-", scope["method"], scope["path"], status, record.response_bytes,
            model_ms, total_ms - model_ms if record.t_done else float("nan"), variant,
            f" error={fault.reason}" if fault is not None else "",
            f" trace_id={record.trace_id} span_id={record.span_id}" if record.trace_id is not None else "",
        )

    @staticmethod
    def _count_whole(record: Invocation, content_type: bytes, body: bytes, streamed: bool) -> None:
        """The tokens of a response that came whole with its head."""
        if streamed and content_type.startswith(EVENT_STREAM):
            tokens = StreamTokens()
            tokens.feed(body, record.t_head)
            tokens.finish(record.t_head)
            record.input_tokens, record.output_tokens = tokens.input_tokens, tokens.output_tokens
            record.time_per_output_token_ns = tokens.time_per_output_token_ns()
            return
        usage = json_usage(content_type, body)
        if usage is not None:
            record.input_tokens, record.output_tokens = usage

    def _request_headers(self, scope: Scope) -> tuple[Headers, int | None, bytes | None]:
        """The headers for the model (Host first, set once the variant is known), the declared
        Content-Length of the request body, and the target variant asked for."""
        incoming: Headers = scope["headers"]
        drop = _dropped(incoming, REQUEST_DROP)
        out: Headers = [(b"host", b"")]
        declared: int | None = None
        target_variant: bytes | None = None
        forwarded_for: bytes | None = None
        original_host = b""
        for name, value in incoming:
            if name == b"content-length":
                declared = int(value) if value.isdigit() else None
            elif name == b"host":
                original_host = value
            elif name == TARGET_VARIANT_HEADER:
                target_variant = value
            if name == b"x-forwarded-for":
                forwarded_for = value
            elif name not in drop:
                out.append((name, value))
        client = scope.get("client")
        if client:
            peer = client[0].encode()
            out.append((b"x-forwarded-for", forwarded_for + b", " + peer if forwarded_for else peer))
        elif forwarded_for:
            out.append((b"x-forwarded-for", forwarded_for))
        out.append((b"x-forwarded-proto", scope.get("scheme", "http").encode()))
        if original_host:
            out.append((b"x-forwarded-host", original_host))
        return out, declared, target_variant

    def _response_headers(self, status: int, headers: Headers, server_timing: bytes, variant: Variant | None) -> Headers:
        assert variant is not None
        drop = _dropped(headers, RESPONSE_DROP)
        if status == 204 or status == 304:
            # No body follows, whatever length the model declared; a server that checks the length would fail the response.
            drop = drop | {b"content-length"}
        out = [(name, value) for name, value in headers if name not in drop]
        out.append((b"server-timing", server_timing))
        out.append((VARIANT_HEADER, variant.name.encode()))
        return out

    async def _read_body(self, receive: Receive) -> Body | Fault:
        """The whole request body, bounded by the max payload: a slow uploader costs overhead, not model time.

        A large body stays in the chunks it came in, which go to the model in one gathered write: no copy here."""
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return message.get(FAULT_KEY, Fault.CLIENT_DISCONNECT_EARLY)
        body: bytes = message.get("body", b"")
        if not message.get("more_body", False):
            return body if len(body) <= self._max_payload else Fault.PAYLOAD_TOO_LARGE
        chunks = [body]
        size = len(body)
        while message.get("more_body", False):
            message = await receive()
            if message["type"] == "http.disconnect":
                return message.get(FAULT_KEY, Fault.CLIENT_DISCONNECT_EARLY)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_payload:
                return Fault.PAYLOAD_TOO_LARGE
            chunks.append(chunk)
        return chunks if size >= GATHER_BYTES else b"".join(chunks)

    async def _authenticated(
        self, scope: Scope, api: runtime_api.RuntimeSend, body: Body, targets_variant: bool, counted_on: Variant
    ) -> Headers | None:
        """With SigV4 on, a Runtime API call's headers for the model (only those its signature covers), or None
        once it was refused: answered with the error botocore expects and counted."""
        assert self._auth is not None
        headers: Headers = scope["headers"]
        try:
            sigv4.verify(scope["method"], scope.get("raw_path") or scope["path"].encode(), scope.get("query_string", b""), headers, body, self._auth)
            signed = sigv4.signed_headers(headers)
            if targets_variant and TARGET_VARIANT_HEADER not in signed:
                raise sigv4.AuthError("InvalidSignatureException", "X-Amzn-SageMaker-Target-Variant must be signed.")
        except sigv4.AuthError as e:
            counted_on.recorder.rejected(Fault.AUTH_FAILED.reason)
            await api.auth_error(e.code, e.message)
            return None
        return runtime_api.request_headers(headers, api.streaming, signed)

    async def _refuse_variant(self, send: Send, asked_for: bytes | None, endpoint: _Endpoint) -> None:
        asked = (asked_for or b"").decode("latin-1")[:80]
        known = ", ".join(v.name for v in endpoint.variants.values())
        await self._refuse(send, Fault.UNKNOWN_VARIANT, f"no production variant {asked!r}; this endpoint has {known}", variant=endpoint.default)

    async def _refuse(
        self, send: Send, fault: Fault, message: str | None = None, server_timing: bytes | None = None, variant: Variant | None = None
    ) -> None:
        """Answer with the fault's status and a short JSON error; count refusals of requests never forwarded.

        A refusal before the variant is known is counted on the first variant."""
        variant = variant or self._first.default
        if not fault.invocation:
            variant.recorder.rejected(fault.reason)
        if fault.status is None:
            return
        if isinstance(send, runtime_api.RuntimeSend):
            await send.refuse(fault, message or fault.message)
            return
        body = error_body(message or fault.message)
        headers: Headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        if fault in CLOSE_AFTER:
            headers.append((b"connection", b"close"))
        if fault is Fault.METHOD_NOT_ALLOWED:
            headers.append((b"allow", b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"))
        if server_timing is not None:
            headers.append((b"server-timing", server_timing))
            headers.append((VARIANT_HEADER, variant.name.encode()))
        await send({"type": "http.response.start", "status": fault.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
