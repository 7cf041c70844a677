"""How a request arrives and how its answers go out: natively (the model's own API, passed through) or as the
SageMaker Runtime API (boto3's InvokeEndpoint, in botocore's shapes). The request path runs the same phases for
both and calls the front for what differs; it never asks which front it has."""

from __future__ import annotations

from proxy.errors import Fault, error_body
from proxy.invocation.headers import TARGET_VARIANT_HEADER, VARIANT_HEADER
from proxy.runtime import api, sigv4
from proxy.types import Body, Headers, Scope, Send

# Refusals after which the connection cannot be trusted to be at a request boundary: an oversized
# upload or a tunnel is not drained, and a broken or stalled body has no end to find.
CLOSE_AFTER = frozenset({Fault.PAYLOAD_TOO_LARGE, Fault.BODY_BUDGET, Fault.METHOD_NOT_ALLOWED, Fault.BODY_TIMEOUT, Fault.MALFORMED_REQUEST})
ALLOW = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
COMPONENT_HEADER = b"x-amzn-sagemaker-inference-component"


class Front:
    """The native front: the request goes to the model as it came; refusals are a status and a short JSON error."""

    __slots__ = ("send", "signed")

    def __init__(self, send: Send, *, signed: bool = False) -> None:
        self.send = send
        self.signed = signed  # authenticated with SigV4 (the proxy has credentials)

    def method_refusal(self, method: str) -> str | None:
        """Why this front does not take ``method``; None when it does."""
        return None

    def component(self, scope: Scope) -> bytes | None:
        """The inference component the request names (the Runtime API's InferenceComponentName)."""
        return None

    def model_request(self, scope: Scope, headers: Headers, model_path: bytes) -> tuple[bytes, Headers, str | None]:
        """The target for the model, its headers, and the route to match against the invocation routes
        (None: an invocation whatever the route)."""
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope.get("query_string", b"")
        return (raw_path + b"?" + query if query else raw_path), headers, scope["path"]

    async def authenticated(self, scope: Scope, body: Body, targets_variant: bool, auth: sigv4.CredentialsFile, headers: Headers) -> Headers | None:
        """Of ``headers`` (those built for the model, Host first), the ones to send once the request's signature
        checks out: the signed ones and X-Forwarded-*, never the signature itself; None once it was refused
        with 403."""
        try:
            signed = _verified(scope, body, targets_variant, auth)
        except sigv4.AuthError as e:
            await self.refuse(Fault.AUTH_FAILED, f"{e.code}: {e.message}", None, "")
            return None
        return [(n, v) for n, v in headers[1:] if (n in signed or n in FORWARDED) and n not in UNFORWARDED]

    async def refuse(self, fault: Fault, message: str, server_timing: bytes | None, variant: str) -> None:
        body = error_body(message)
        headers: Headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        if fault in CLOSE_AFTER:
            headers.append((b"connection", b"close"))
        if fault is Fault.METHOD_NOT_ALLOWED:
            headers.append((b"allow", ALLOW))
        if server_timing is not None:
            headers.append((b"server-timing", server_timing))
            headers.append((VARIANT_HEADER, variant.encode()))
        await self.send({"type": "http.response.start", "status": fault.status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})

    async def broke(self, fault: Fault) -> bool:
        """The model failed after the response head went out: True when the front ended the answer in its own
        way; False leaves the server to abort the connection."""
        return False


class RuntimeFront(Front):
    """The SageMaker Runtime API: the model is called at its own invocation path with a SageMaker container's
    headers, and every answer goes out in the API's shapes (``proxy.runtime.api.RuntimeSend``)."""

    __slots__ = ("_api",)

    def __init__(self, send: Send, call: api.Target) -> None:
        self._api = api.RuntimeSend(send, call)
        super().__init__(self._api, signed=True)

    def method_refusal(self, method: str) -> str | None:
        if method == "POST":
            return None
        return f"{'InvokeEndpointWithResponseStream' if self._api.streaming else 'InvokeEndpoint'} takes POST"

    def component(self, scope: Scope) -> bytes | None:
        for name, value in scope["headers"]:
            if name == COMPONENT_HEADER:
                return value
        return b""

    def model_request(self, scope: Scope, headers: Headers, model_path: bytes) -> tuple[bytes, Headers, str | None]:
        return model_path, [headers[0], *api.request_headers(scope["headers"], self._api.streaming)], None

    async def authenticated(self, scope: Scope, body: Body, targets_variant: bool, auth: sigv4.CredentialsFile, headers: Headers) -> Headers | None:
        """The call's headers for the model (only those its signature covers), or None once it was refused:
        answered with the error botocore expects."""
        try:
            signed = _verified(scope, body, targets_variant, auth)
        except sigv4.AuthError as e:
            await self._api.auth_error(e.code, e.message)
            return None
        return api.request_headers(scope["headers"], self._api.streaming, signed)

    async def refuse(self, fault: Fault, message: str, server_timing: bytes | None, variant: str) -> None:
        await self._api.refuse(fault, message)

    async def broke(self, fault: Fault) -> bool:
        if not self._api.streaming:
            return False
        await self._api.stream_error(fault)
        return True


FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})
# What a signed native request never passes to the model: the signature, and what only the signature needs.
UNFORWARDED = frozenset({b"authorization", b"x-amz-date", b"x-amz-content-sha256", b"x-amz-security-token", b"host", b"content-length"})


def _verified(scope: Scope, body: Body, targets_variant: bool, auth: sigv4.CredentialsFile) -> frozenset[bytes]:
    """The header names the request's valid signature covers; raises AuthError."""
    headers: Headers = scope["headers"]
    sigv4.verify(scope["method"], scope.get("raw_path") or scope["path"].encode(), scope.get("query_string", b""), headers, body, auth)
    signed = sigv4.signed_headers(headers)
    if targets_variant and TARGET_VARIANT_HEADER not in signed:
        raise sigv4.AuthError("InvalidSignatureException", "X-Amzn-SageMaker-Target-Variant must be signed.")
    return signed
