"""The one fault taxonomy: every way a request can go wrong, mapped once to a status and a metric reason."""

from __future__ import annotations

import enum
import json


class ConfigError(ValueError):
    """A bad configuration value; the message is one line that names the flag (exit code 2, before listening)."""


class Fault(enum.Enum):
    """A failure on the request path.

    ``status`` is what the client gets (``None``: nobody is listening any more);
    ``reason`` is the bounded label value used in metrics;
    ``invocation`` says whether the model was called, so the request still counts as an invocation.
    """

    # Refused before the model is called: counted in sagemaker_proxy_rejected_requests_total.
    PAYLOAD_TOO_LARGE = ("payload_too_large", 413, False, "request body exceeds the maximum payload size")
    MALFORMED_REQUEST = ("malformed_request", 400, False, "malformed request")
    METHOD_NOT_ALLOWED = ("method_not_allowed", 405, False, "method not allowed through this proxy")
    UNKNOWN_VARIANT = ("unknown_variant", 400, False, "no such production variant")
    UNKNOWN_COMPONENT = ("unknown_inference_component", 400, False, "no such inference component")
    CLIENT_DISCONNECT_EARLY = ("client_disconnect", None, False, "client disconnected before the request was forwarded")
    NO_LIVE_INSTANCE = ("no_live_instance", 503, False, "no live model instance")
    OVER_CAPACITY = ("over_capacity", 503, False, "too many requests in flight")
    QUEUE_FULL = ("queue_full", 503, False, "too many requests waiting for the model")
    QUEUE_TIMEOUT = ("queue_timeout", 503, False, "waited too long for the model")
    LOOP_DETECTED = ("loop_detected", 508, False, "this request has been through this proxy already: its model address leads back here")
    BODY_BUDGET = ("body_budget", 503, False, "too many request bytes held at once; try again")
    AUTH_FAILED = ("auth_failed", 403, False, "the request's AWS signature is missing or invalid")
    UNKNOWN_OPERATION = ("unknown_operation", 404, False, "not an operation this proxy serves")
    UNKNOWN_ENDPOINT = ("unknown_endpoint", 400, False, "no such endpoint")
    # Refused by the front door (proxy/http/server.py) before the app sees a request.
    HEAD_TIMEOUT = ("head_timeout", 408, False, "the request head did not arrive in time")
    BODY_TIMEOUT = ("body_timeout", 408, False, "the request body stopped arriving")
    HEAD_TOO_LARGE = ("head_too_large", 431, False, "request head too large")
    UPGRADE_REFUSED = ("upgrade_refused", 400, False, "protocol upgrades (WebSocket) are not supported through this proxy")
    TOO_MANY_CONNECTIONS = ("too_many_connections", None, False, "too many open connections")
    ADMIN_TOO_MANY_CONNECTIONS = ("admin_too_many_connections", None, False, "too many open connections to the admin port")
    IDLE_CONNECTION = ("idle_connection", None, False, "a new connection sent no request within the head timeout")
    UNSUPPORTED_TRANSFER_CODING = ("unsupported_transfer_coding", 501, False, "transfer codings other than chunked are not supported")

    # The model was called and the call failed: an invocation and a model error.
    UPSTREAM_CONNECT = ("connect_failed", 502, True, "could not connect to the model")
    UPSTREAM_RESET = ("connection_reset", 502, True, "the model closed the connection")
    UPSTREAM_MALFORMED = ("malformed_response", 502, True, "the model sent a malformed response")
    UPSTREAM_TIMEOUT = ("timeout", 504, True, "the model did not answer within the invocation timeout")
    # A defect in the proxy itself; still counted, so that no invocation is lost.
    INTERNAL = ("internal_error", 500, True, "internal proxy error")

    # The model was called and the client went away: an invocation, but no error class.
    CLIENT_DISCONNECT = ("client_disconnect", None, True, "client disconnected while the model was working")

    def __init__(self, reason: str, status: int | None, invocation: bool, message: str) -> None:
        self.reason = reason
        self.status = status
        self.invocation = invocation
        self.message = message


REJECT_REASONS = tuple(sorted({f.reason for f in Fault if not f.invocation}))
UPSTREAM_ERROR_REASONS = tuple(f.reason for f in Fault if f.invocation and f.status is not None)


def error_body(message: str) -> bytes:
    """The short JSON error every refusal carries."""
    return json.dumps({"error": message}).encode()


class UpstreamError(Exception):
    """The model call failed; ``fault`` says how."""

    def __init__(self, fault: Fault, detail: str = "") -> None:
        super().__init__(detail or fault.message)
        self.fault = fault
        self.detail = detail
