"""ASGI type aliases shared by the proxy modules."""

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
# A request body for the model: whole, or as the chunks it arrived in (a large one, written without a copy).
Body = bytes | list[bytes]


def body_size(body: Body) -> int:
    return len(body) if isinstance(body, bytes) else sum(map(len, body))

# Scope extensions between the front door (proxy/http/server.py, or the uvicorn protocol in proxy/server.py) and the app.
# A list the app appends callbacks to, called by the server when the client disconnects mid-request.
DISCONNECT_EXTENSION = "sagemaker_metrics_proxy.disconnect"
# Set in scope["extensions"] once the client is gone, for whoever registers with DISCONNECT_EXTENSION after that.
DISCONNECTED = "sagemaker_proxy.disconnected"
# On an ``http.disconnect``: the Fault with which the server, not the client, ended the request body
# (a body timeout, a malformed chunk); the connection is still open and the app answers it.
FAULT_KEY = "sagemaker_metrics_proxy.fault"
