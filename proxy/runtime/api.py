"""The SageMaker Runtime API on the proxy port: what boto3, the AWS CLI and the SageMaker SDK send to an endpoint.

``POST /endpoints/{EndpointName}/invocations`` (InvokeEndpoint) and ``.../invocations-response-stream``
(InvokeEndpointWithResponseStream), as botocore's service model ``sagemaker-runtime`` 2017-05-13 (rest-json)
describes them. The model is called at its own invocation path, with the headers a SageMaker container gets;
its answer goes back in the API's shapes: a 2xx as it is (a stream as event-stream ``PayloadPart`` events, each
chunk as it comes), a non-2xx as a 424 ``ModelError``, a stream broken midway as a ``ModelStreamError`` event.
Errors carry ``x-amzn-errortype`` and a JSON body, so botocore raises its modeled exceptions.

The call is recorded as any invocation is: same metrics, labelled by the endpoint and the variant that served.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass

from proxy.errors import Fault
from proxy.types import Headers, Message, Send

PREFIX = "/endpoints/"
INVOKE = "/invocations"
STREAM = "/invocations-response-stream"
EVENT_STREAM_TYPE = b"application/vnd.amazon.eventstream"
# Request headers a SageMaker container gets (besides Content-Type and Accept); the client's others are not passed.
CONTAINER_HEADERS = frozenset({
    b"x-amzn-sagemaker-custom-attributes",
    b"x-amzn-sagemaker-target-model",
    b"x-amzn-sagemaker-inference-id",
    b"x-amzn-sagemaker-enable-explanations",
    b"x-amzn-sagemaker-inference-component",
    b"x-amzn-sagemaker-session-id",
})
# Response headers that go back to the client from the model's answer.
RESPONSE_HEADERS = frozenset({
    b"x-amzn-sagemaker-custom-attributes",
    b"x-amzn-sagemaker-new-session-id",
    b"x-amzn-sagemaker-closed-session-id",
})
MAX_ORIGINAL_MESSAGE = 64 * 1024  # the model's error body kept in a ModelError
LOG_STREAM = "arn:aws:logs:local:000000000000:log-group:/aws/sagemaker/Endpoints/{endpoint}"


@dataclass(frozen=True, slots=True)
class Target:
    """What the path asks for."""

    endpoint: str
    streaming: bool


def in_api(path: str) -> bool:
    """Whether a path is the Runtime API's, served or not: nothing under /endpoints/ is forwarded as it is."""
    return path.startswith(PREFIX) or path == PREFIX[:-1]


def target(path: str) -> Target | None:
    """The Runtime API call a path names, or None if it is not one."""
    if not path.startswith(PREFIX):
        return None
    rest = path[len(PREFIX):]
    for suffix, streaming in ((STREAM, True), (INVOKE, False)):
        if rest.endswith(suffix):
            name = rest[: -len(suffix)]
            if name and "/" not in name:
                return Target(name, streaming)
    return None


def request_headers(incoming: Headers, streaming: bool, signed: frozenset[bytes] | None = None) -> Headers:
    """The headers the model gets: Content-Type, Accept (for a stream, from X-Amzn-SageMaker-Accept) and the
    SageMaker headers a container sees; Host and Content-Length are set on the way. With SigV4 on, ``signed``:
    only the headers the signature covers; never one the client's Connection header names (hop-by-hop)."""
    out: Headers = []
    accept_header = b"x-amzn-sagemaker-accept" if streaming else b"accept"
    hop = {t.strip().lower() for n, v in incoming if n == b"connection" for t in v.split(b",")}
    for name, value in incoming:
        if name in hop or (signed is not None and name not in signed):
            continue
        if name == b"content-type" or name in CONTAINER_HEADERS:
            out.append((name, value))
        elif name == accept_header:
            out.append((b"accept", value))
    return out


# -- errors -------------------------------------------------------------------------------------------------


# Each refusal as SageMaker answers it: (status, error type).
_REFUSALS = {
    Fault.PAYLOAD_TOO_LARGE: (400, "ValidationError"),  # ValidationError is a 400 in the service model
    Fault.UNKNOWN_VARIANT: (400, "ValidationError"),
    Fault.MALFORMED_REQUEST: (400, "ValidationError"),
    Fault.METHOD_NOT_ALLOWED: (400, "ValidationError"),
    Fault.NO_LIVE_INSTANCE: (503, "ServiceUnavailable"),
    Fault.OVER_CAPACITY: (503, "ServiceUnavailable"),
    Fault.QUEUE_FULL: (503, "ServiceUnavailable"),
    Fault.QUEUE_TIMEOUT: (503, "ServiceUnavailable"),
    Fault.BODY_BUDGET: (503, "ServiceUnavailable"),
    Fault.BODY_TIMEOUT: (400, "ValidationError"),
    Fault.UPSTREAM_CONNECT: (424, "ModelError"),
    Fault.UPSTREAM_RESET: (424, "ModelError"),
    Fault.UPSTREAM_MALFORMED: (424, "ModelError"),
    Fault.UPSTREAM_TIMEOUT: (424, "ModelError"),
    Fault.INTERNAL: (500, "InternalFailure"),
    Fault.UNKNOWN_OPERATION: (404, "UnknownOperationException"),
    Fault.UNKNOWN_ENDPOINT: (400, "ValidationError"),
}


def error_response(status: int, error_type: str, fields: dict[str, object]) -> tuple[Message, Message]:
    """The start and body messages of an error botocore parses into its modeled exception."""
    body = json.dumps(fields).encode()
    headers: Headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (b"x-amzn-errortype", error_type.encode()),
    ]
    return {"type": "http.response.start", "status": status, "headers": headers}, {"type": "http.response.body", "body": body}


def refusal(fault: Fault, message: str, endpoint: str) -> tuple[Message, Message]:
    status, error_type = _REFUSALS.get(fault, (400, "ValidationError"))
    fields: dict[str, object] = {"Message": message}
    if error_type == "ModelError":
        fields["Message"] = f"Received server error from the model ({message}). See {LOG_STREAM.format(endpoint=endpoint)} for more information."
        fields["LogStreamArn"] = LOG_STREAM.format(endpoint=endpoint)
    return error_response(status, error_type, fields)


def refusal_headers(target: bytes, status: int) -> bytes:
    """For the front door's own refusals of a Runtime API call (a malformed head, a timeout, a head too large):
    the error type botocore reads, so its callers get a modeled exception, not a bare status."""
    if not target.startswith(PREFIX.encode()):
        return b""
    return b"x-amzn-errortype: %s\r\n" % (b"ServiceUnavailable" if status >= 500 else b"ValidationError")


def unknown_endpoint_message(endpoint: str) -> str:
    return f"Endpoint {endpoint} of account local not found."


def unknown_operation_message(path: str) -> str:
    """What a path under /endpoints/ that names no operation served here gets told."""
    if path.endswith("/async-invocations"):
        return "InvokeEndpointAsync is not served by this proxy: use invocations or invocations-response-stream."
    return "Not an operation of the SageMaker Runtime API: POST /endpoints/{EndpointName}/invocations or .../invocations-response-stream."


def model_error(status: int, body: bytes, variant: str, endpoint: str) -> tuple[Message, Message]:
    """The model answered ``status``, not 2xx: SageMaker's 424 ModelError, with the model's status and message."""
    original = body[:MAX_ORIGINAL_MESSAGE].decode("utf-8", "replace")
    kind = "client" if 400 <= status < 500 else "server"
    log_stream = LOG_STREAM.format(endpoint=endpoint)
    return error_response(424, "ModelError", {
        "Message": f'Received {kind} error ({status}) from {variant} with message "{original}". See {log_stream} for more information.',
        "OriginalStatusCode": status,
        "OriginalMessage": original,
        "LogStreamArn": log_stream,
    })


# -- the event stream (application/vnd.amazon.eventstream) -------------------------------------------------


def _header(name: bytes, value: bytes) -> bytes:
    return struct.pack("!B", len(name)) + name + b"\x07" + struct.pack("!H", len(value)) + value  # 7: a string


def event_message(headers: tuple[tuple[bytes, bytes], ...], payload: bytes) -> bytes:
    """One message: a prelude (total and header lengths, their CRC32), the headers, the payload, the CRC32 of it all."""
    encoded = b"".join(_header(n, v) for n, v in headers)
    total = 12 + len(encoded) + len(payload) + 4
    prelude = struct.pack("!II", total, len(encoded))
    prelude += struct.pack("!I", zlib.crc32(prelude))
    message = prelude + encoded + payload
    return message + struct.pack("!I", zlib.crc32(message))


_PAYLOAD_PART = ((b":event-type", b"PayloadPart"), (b":content-type", b"application/octet-stream"), (b":message-type", b"event"))


def payload_part(chunk: bytes) -> bytes:
    return event_message(_PAYLOAD_PART, chunk)


def model_stream_error(fault: Fault) -> bytes:
    """The event that ends a stream the model broke off (StreamBroken) or stalled (ModelInvocationTimeExceeded)."""
    code = "ModelInvocationTimeExceeded" if fault is Fault.UPSTREAM_TIMEOUT else "StreamBroken"
    body = json.dumps({"Message": fault.message, "ErrorCode": code}).encode()
    headers = ((b":exception-type", b"ModelStreamError"), (b":content-type", b"application/json"), (b":message-type", b"exception"))
    return event_message(headers, body)


class RuntimeSend:
    """The ``send`` of one Runtime API call: turns the model's answer, as the request path sends it, into the
    API's shapes. The request path calls ``refuse`` for its refusals and ``stream_error`` for a stream broken
    after its head went out."""

    __slots__ = ("_error_body", "_error_status", "_send", "endpoint", "streaming", "variant")

    def __init__(self, send: Send, call: Target) -> None:
        self._send = send
        self.endpoint = call.endpoint
        self.streaming = call.streaming
        self.variant = ""
        self._error_status = 0  # the model's non-2xx status, whose body is gathered into a ModelError
        self._error_body: list[bytes] = []

    async def __call__(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            status: int = message["status"]
            headers: Headers = message.get("headers", [])
            self.variant = next((v.decode() for n, v in headers if n == b"x-amzn-invoked-production-variant"), "")
            if not 200 <= status < 300:
                self._error_status = status
                return
            await self._send({"type": "http.response.start", "status": 200, "headers": self._headers(headers)})
            return
        body: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        if self._error_status:
            if sum(map(len, self._error_body)) < MAX_ORIGINAL_MESSAGE:
                self._error_body.append(body)
            if not more:
                start, end = model_error(self._error_status, b"".join(self._error_body), self.variant, self.endpoint)
                await self._send(start)
                await self._send(end)
            return
        if self.streaming:
            await self._send({"type": "http.response.body", "body": payload_part(body) if body else b"", "more_body": more})
        else:
            await self._send(message)

    def _headers(self, model: Headers) -> Headers:
        out: Headers = []
        for name, value in model:
            if name == b"content-type":
                out.append((b"x-amzn-sagemaker-content-type", value) if self.streaming else (name, value))
            elif name == b"content-length":
                if not self.streaming:
                    out.append((name, value))
            elif name in RESPONSE_HEADERS or name in (b"x-amzn-invoked-production-variant", b"server-timing"):
                out.append((name, value))
        if self.streaming:
            out.append((b"content-type", EVENT_STREAM_TYPE))
        return out

    async def refuse(self, fault: Fault, message: str) -> None:
        start, body = refusal(fault, message, self.endpoint)
        await self._send(start)
        await self._send(body)

    async def auth_error(self, code: str, message: str) -> None:
        """403 with the error type botocore expects for a missing or bad signature (never forwarded)."""
        start, body = error_response(403, code, {"message": message})
        await self._send(start)
        await self._send(body)

    async def stream_error(self, fault: Fault) -> None:
        await self._send({"type": "http.response.body", "body": model_stream_error(fault)})
