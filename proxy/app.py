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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from metrics.recorder import InvocationRecorder
from proxy.errors import Fault, UpstreamError, error_body
from proxy.http.client import UpstreamClient, UpstreamResponse
from proxy.instances import InstanceCountSource
from proxy.types import DISCONNECT_EXTENSION, FAULT_KEY, Headers, Message, Receive, Scope, Send

log = logging.getLogger("proxy")

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


class _Guard:
    """Cancels the request task when the client disconnects or the model overruns the invocation timeout.

    ``fault`` records which one fired, so the request path can tell these from a shutdown.
    """

    __slots__ = ("_loop", "_task", "_timeout", "_timer", "_watcher", "done", "fault")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, scope: Scope, receive: Receive) -> None:
        self.fault: Fault | None = None
        self.done = False
        task = asyncio.current_task(loop)
        assert task is not None
        self._task = task
        self._loop = loop
        self._timeout = timeout
        self._timer = loop.call_later(timeout, self._fire, Fault.UPSTREAM_TIMEOUT)
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

    def _fire(self, fault: Fault) -> None:
        if self.fault is None and not self.done:
            self.fault = fault
            self._task.cancel()

    def rearm(self) -> None:
        """The model made progress: the timeout counts again from now (an idle timeout between chunks)."""
        self._timer.cancel()
        self._timer = self._loop.call_later(self._timeout, self._fire, Fault.UPSTREAM_TIMEOUT)

    def stop_timer(self) -> None:
        self._timer.cancel()

    def stop(self) -> None:
        self.done = True
        self._timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()


@dataclass(frozen=True)
class Variant:
    """A production variant: its model instances, its live count, its metrics, its share of the traffic."""

    name: str
    upstream: UpstreamClient
    recorder: InvocationRecorder
    instances: InstanceCountSource
    weight: float = 1.0


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
        max_concurrency: int = 0,
        record: bool = True,
        clock: Callable[[], int] = time.perf_counter_ns,
        random: Callable[[], float] = random.random,
    ) -> None:
        if not variants:
            raise ValueError("at least one variant is needed")
        self._variants = {v.name.encode(): v for v in variants}
        self._default = variants[0]
        self._choices = list(variants) if len(variants) > 1 else []
        total = sum(v.weight for v in variants)
        self._cumulative = list(itertools.accumulate(v.weight / total for v in variants))
        self._random = random
        self._routes = invocation_routes
        self._max_payload = max_payload_bytes
        self._timeout = invocation_timeout
        self._max_concurrency = max_concurrency  # 0: no limit
        self._in_flight = 0  # requests forwarded and not yet answered, all variants
        self._record = record
        self._clock = clock

    def _choose(self, target: bytes | None) -> Variant | None:
        """The variant for this request; None for an unknown target variant."""
        if target is not None:
            return self._variants.get(target)
        if not self._choices:
            return self._default
        i = bisect.bisect_right(self._cumulative, self._random())
        return self._choices[min(i, len(self._choices) - 1)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is handled by the server; websockets are refused by returning
        clock = self._clock
        t_in = clock()

        # Accept and validate.
        method: str = scope["method"]
        if method == "CONNECT":
            return await self._refuse(send, Fault.METHOD_NOT_ALLOWED)
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        if not raw_path.startswith(b"/"):
            return await self._refuse(send, Fault.MALFORMED_REQUEST, "request target must be a path")
        headers, declared, target_variant = self._request_headers(scope)
        if declared is not None and declared > self._max_payload:
            return await self._refuse(send, Fault.PAYLOAD_TOO_LARGE)
        variant = self._choose(target_variant)
        if variant is None:
            asked = (target_variant or b"").decode("latin-1")[:80]
            known = ", ".join(v.name for v in self._variants.values())
            return await self._refuse(send, Fault.UNKNOWN_VARIANT, f"no production variant {asked!r}; this endpoint has {known}")
        body = await self._read_body(receive)
        if isinstance(body, Fault):
            return await self._refuse(send, body, variant=variant)

        upstream = variant.upstream
        recorder = variant.recorder
        if not upstream.ready():
            return await self._refuse(send, Fault.NO_LIVE_INSTANCE, variant=variant)
        if self._max_concurrency and self._in_flight >= self._max_concurrency:
            return await self._refuse(send, Fault.OVER_CAPACITY, variant=variant)
        headers[0] = (b"host", upstream.authority)

        invocation = self._record and (method, scope["path"]) in self._routes
        query: bytes = scope.get("query_string", b"")
        target = raw_path + b"?" + query if query else raw_path
        loop = asyncio.get_running_loop()
        guard = _Guard(loop, self._timeout, scope, receive)
        instances = 1
        if invocation:
            instances = variant.instances.current()
            recorder.invocation_started()

        response: UpstreamResponse | None = None
        status = 0
        fault: Fault | None = None
        first_byte_ns: int | None = None
        blocked_ns = 0  # time spent in send() to the client while the model was still answering
        started = False
        t_send = 0
        t_done: int | None = None  # stays None if the model call never ended (client gone, shutdown)
        self._in_flight += 1
        try:
            # Forward.
            t_send = clock()
            try:
                response = await upstream.request(method.encode(), target, headers, body)
            except UpstreamError as e:
                t_done = clock()
                fault = e.fault
                guard.stop()
                log.debug("model call failed: %s", e)
                await self._refuse(send, fault, None, _server_timing(t_done - t_send, t_send - t_in), variant)
                return
            t_head = clock()
            status = response.status
            out_headers = self._response_headers(response.headers, _server_timing(t_head - t_send, t_send - t_in), variant)

            # Stream back.
            if response.complete:
                t_done = t_head
                guard.stop()
                started = True
                await send({"type": "http.response.start", "status": status, "headers": out_headers})
                await send({"type": "http.response.body", "body": response.take_buffered()})
            else:
                started = True
                await send({"type": "http.response.start", "status": status, "headers": out_headers})
                blocked_ns += clock() - t_head
                chunk = response.take_buffered()
                if chunk and response.streamed:
                    first_byte_ns = t_head - t_send
                while True:
                    if chunk:
                        t0 = clock()
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        blocked_ns += clock() - t0
                        guard.rearm()
                    chunk = await response.read()
                    if not chunk:
                        break
                    if first_byte_ns is None and response.streamed:
                        first_byte_ns = clock() - t_send
                t_done = clock()
                guard.stop()
                await send({"type": "http.response.body", "body": b""})
        except UpstreamError as e:
            # The model failed after the head was sent: the client's connection must be aborted.
            t_done = clock()
            fault = e.fault
            raise
        except Exception:
            t_done = clock()
            fault = Fault.INTERNAL
            log.exception("internal error while proxying %s %s", method, scope["path"])
            if started:
                raise
            await self._refuse(send, fault, variant=variant)
        except asyncio.CancelledError:
            cancelled = guard.fault
            if cancelled is None:
                raise  # the server is shutting down
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            if cancelled is Fault.CLIENT_DISCONNECT:
                fault = cancelled
                return
            t_done = clock()
            fault = Fault.UPSTREAM_TIMEOUT
            if started:
                raise UpstreamError(fault) from None
            await self._refuse(send, fault, None, _server_timing(t_done - t_send, t_send - t_in), variant)
        finally:
            self._in_flight -= 1
            guard.stop()
            if response is not None:
                response.close()
            if invocation:
                # Record: exactly once per invocation, whatever happened above.
                if fault is Fault.CLIENT_DISCONNECT or t_done is None:
                    recorder.invocation_abandoned(instances=instances)
                else:
                    model_ns = t_done - t_send - blocked_ns
                    total_ns = clock() - t_in
                    recorder.invocation_finished(
                        status=status if fault is None else fault.status or 0,
                        upstream_error=fault.reason if fault else None,
                        model_us=model_ns // 1000,
                        overhead_us=(total_ns - model_ns) // 1000,
                        instances=instances,
                        first_byte_us=None if first_byte_ns is None else first_byte_ns // 1000,
                    )

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

    def _response_headers(self, headers: Headers, server_timing: bytes, variant: Variant) -> Headers:
        drop = _dropped(headers, RESPONSE_DROP)
        out = [(name, value) for name, value in headers if name not in drop]
        out.append((b"server-timing", server_timing))
        out.append((VARIANT_HEADER, variant.name.encode()))
        return out

    async def _read_body(self, receive: Receive) -> bytes | Fault:
        """The whole request body, bounded by the max payload: a slow uploader costs overhead, not model time."""
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
        return b"".join(chunks)

    async def _refuse(
        self, send: Send, fault: Fault, message: str | None = None, server_timing: bytes | None = None, variant: Variant | None = None
    ) -> None:
        """Answer with the fault's status and a short JSON error; count refusals of requests never forwarded.

        A refusal before the variant is known is counted on the first variant."""
        variant = variant or self._default
        if not fault.invocation:
            variant.recorder.rejected(fault.reason)
        if fault.status is None:
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
