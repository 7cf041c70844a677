"""What the request path changes in the headers on the way to the model and back: hop-by-hop headers dropped
(RFC 9110 7.6.1, and whatever Connection names), X-Forwarded-* added, Server-Timing and the variant set."""

from __future__ import annotations

import re

from proxy.types import Body, Headers, Scope

TARGET_VARIANT_HEADER = b"x-amzn-sagemaker-target-variant"
VARIANT_HEADER = b"x-amzn-invoked-production-variant"
# Each proxy adds its own mark to what it forwards: a request that comes back with it has looped (508).
HOP_HEADER = b"x-sagemaker-metrics-proxy-hop"
# Hop-by-hop headers plus those this proxy sets itself.
REQUEST_DROP = frozenset({
    TARGET_VARIANT_HEADER,
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te", b"trailer", b"upgrade",
    b"proxy-authorization", b"proxy-authenticate", b"expect", b"host", b"content-length",
    b"x-forwarded-proto", b"x-forwarded-host",
})
RESPONSE_DROP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te", b"trailer", b"upgrade",
    b"proxy-authenticate", VARIANT_HEADER,
})


TARGET_MODEL_HEADER = b"x-amzn-sagemaker-target-model"
# The "model" of an OpenAI-style JSON request, looked for in its first bytes only.
_JSON_MODEL = re.compile(rb'"model"[ \t]*:[ \t]*"([^"\\]{1,256})"')


def named_model(headers: Headers, body: Body) -> str | None:
    """The model a request names (``--model-label``): SageMaker's target model (multi-model endpoints), else the
    ``model`` of an OpenAI-style JSON body; None when it names none."""
    for name, value in headers:
        if name == TARGET_MODEL_HEADER:
            return value.decode("latin-1")[:256]
    head = body if isinstance(body, bytes) else (body[0] if body else b"")
    if head[:1] == b"{":
        found = _JSON_MODEL.search(head, 0, 4096)
        if found is not None:
            return found.group(1).decode("utf-8", "replace")
    return None


def dropped(headers: Headers, always: frozenset[bytes]) -> frozenset[bytes]:
    """``always`` plus the header names listed in Connection, which are hop-by-hop for this hop only."""
    tokens: set[bytes] | None = None
    for name, value in headers:
        if name == b"connection":
            tokens = tokens or set(always)
            tokens.update(t.strip().lower() for t in value.split(b","))
    return always if tokens is None else frozenset(tokens)


def request_headers(scope: Scope, hop: bytes) -> tuple[Headers, int | None, bytes | None, bool]:
    """The headers for the model (Host first, set once the variant is known), the declared
    Content-Length of the request body, the target variant asked for, and whether the request carries
    this proxy's own mark ``hop``: it has been through here already."""
    incoming: Headers = scope["headers"]
    drop = dropped(incoming, REQUEST_DROP)
    out: Headers = [(b"host", b"")]
    declared: int | None = None
    target_variant: bytes | None = None
    forwarded_for: bytes | None = None
    original_host = b""
    looped = False
    for name, value in incoming:
        if name == b"content-length":
            declared = int(value) if value.isdigit() else None
        elif name == b"host":
            original_host = value
        elif name == TARGET_VARIANT_HEADER:
            target_variant = value
        elif name == HOP_HEADER and value == hop:
            looped = True
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
    return out, declared, target_variant, looped


def response_headers(status: int, headers: Headers, server_timing: bytes, variant: str) -> Headers:
    """The model's response headers for the client, with Server-Timing and the variant that answered."""
    drop = dropped(headers, RESPONSE_DROP)
    if status == 204 or status == 304:
        # No body follows, whatever length the model declared; a server that checks the length would fail the response.
        drop = drop | {b"content-length"}
    out = [(name, value) for name, value in headers if name not in drop]
    out.append((b"server-timing", server_timing))
    out.append((VARIANT_HEADER, variant.encode()))
    return out
