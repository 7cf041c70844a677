"""Raw ASGI app for the SageMaker inference contract: GET /ping, POST /invocations.

No framework on purpose: it doubles as the "direct" baseline in proxy load benchmarks.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from example_model import chat
from example_model.model import IrisModel

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

# SageMaker real-time endpoints cap payloads at 6 MB; a bigger body is never legitimate.
MAX_BODY_BYTES = 6 * 1024 * 1024
# Rows per request; more would block the event loop long enough to miss /ping deadlines.
MAX_INSTANCES = 10_000
# Knob bounds, so a typo cannot park a request for days or allocate without limit.
MAX_DELAY_MS = 3_600_000.0
MAX_STREAM_CHUNKS = 1_000_000
MAX_RESPONSE_BYTES = 1 << 30
# Big knob responses go out as 1 MiB slices of one shared buffer, bounding memory.
_FILL = b"x" * (1 << 20)

_PING_BODY = b'{"status":"healthy"}'
_JSON_HEADERS: Headers = [(b"content-type", b"application/json")]
# Statuses whose responses never carry a body (RFC 9112 section 6.3).
_NO_BODY_STATUSES = frozenset({204, 304})


class HTTPError(Exception):
    """Aborts a request with a short JSON error body."""

    def __init__(self, status: int, message: str, headers: Headers | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


@dataclass(frozen=True, slots=True)
class Knobs:
    """Test behaviour from X-Test-* headers (honoured only with --test-knobs)."""

    delay_s: float = 0.0
    status: int | None = None
    stream_chunks: int | None = None
    stream_interval_s: float = 0.0
    stream_openai: bool = False
    response_bytes: int | None = None


def _bad_knob(name: str, raw: bytes, expected: str) -> HTTPError:
    shown = raw.decode("latin-1")[:40]
    return HTTPError(400, f"invalid {name} header {shown!r}: expected {expected}")


def _float_knob(headers: dict[bytes, bytes], key: bytes, name: str, high: float) -> float | None:
    raw = headers.get(key)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= high:  # Also rejects nan and inf.
        raise _bad_knob(name, raw, f"a number from 0 to {high:.0f}")
    return value


def _int_knob(headers: dict[bytes, bytes], key: bytes, name: str, low: int, high: int) -> int | None:
    raw = headers.get(key)
    if raw is None:
        return None
    text = raw.strip()
    # isdigit() keeps out signs, underscores and spaces that int() would quietly accept.
    if not (text.isdigit() and low <= int(text) <= high):
        raise _bad_knob(name, raw, f"an integer from {low} to {high}")
    return int(text)


def parse_knobs(headers: dict[bytes, bytes]) -> Knobs:
    """Validate every X-Test-* header present; raises HTTPError(400) on a bad value."""
    delay_ms = _float_knob(headers, b"x-test-delay-ms", "X-Test-Delay-Ms", MAX_DELAY_MS)
    # No 1xx: ASGI cannot send an interim response, and a final 1xx is malformed HTTP.
    status = _int_knob(headers, b"x-test-status", "X-Test-Status", 200, 599)
    chunks = _int_knob(headers, b"x-test-stream-chunks", "X-Test-Stream-Chunks", 0, MAX_STREAM_CHUNKS)
    interval_ms = _float_knob(headers, b"x-test-stream-interval-ms", "X-Test-Stream-Interval-Ms", MAX_DELAY_MS)
    size = _int_knob(
        headers,
        b"x-test-response-bytes",
        "X-Test-Response-Bytes",
        0,
        MAX_RESPONSE_BYTES,
    )
    if interval_ms is not None and chunks is None:
        raise HTTPError(400, "X-Test-Stream-Interval-Ms requires X-Test-Stream-Chunks")
    stream_format = headers.get(b"x-test-stream-format")
    if stream_format is not None and (stream_format != b"openai" or chunks is None):
        raise HTTPError(400, "X-Test-Stream-Format takes openai, with X-Test-Stream-Chunks")
    return Knobs(
        delay_s=(delay_ms or 0.0) / 1000.0,
        status=status,
        stream_chunks=chunks,
        stream_interval_s=(interval_ms or 0.0) / 1000.0,
        stream_openai=stream_format == b"openai",
        response_bytes=size,
    )


def _features(values: object, n_features: int, where: str) -> list[float]:
    if not isinstance(values, list) or len(values) != n_features:
        raise HTTPError(400, f"{where}: expected a list of {n_features} features")
    row: list[float] = []
    for value in values:
        # bool is an int subclass, but true/false are not measurements.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise HTTPError(400, f"{where}: features must be numbers")
        try:
            number = float(value)
        except OverflowError:  # Huge JSON integers.
            number = math.inf
        if not math.isfinite(number):
            raise HTTPError(400, f"{where}: features must be finite")
        row.append(number)
    return row


def parse_json_rows(body: bytes, n_features: int) -> list[list[float]]:
    """Accept {"instances": [[...], ...]}, a bare list of rows, or a single row."""
    try:
        doc: object = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: absurdly nested arrays.
        raise HTTPError(400, "body is not valid JSON") from None
    if isinstance(doc, dict):
        if "instances" not in doc:
            raise HTTPError(400, 'JSON object needs an "instances" list')
        doc = doc["instances"]
    if not isinstance(doc, list):
        raise HTTPError(400, "expected a list of rows")
    if not doc:
        raise HTTPError(400, "no instances")
    if not isinstance(doc[0], list):
        return [_features(doc, n_features, "row 0")]
    return [_features(values, n_features, f"row {i}") for i, values in enumerate(doc)]


def parse_csv_rows(body: bytes, n_features: int) -> list[list[float]]:
    """One row per non-blank line, comma separated, no header."""
    try:
        # utf-8-sig: tolerate the BOM that spreadsheet exports often start with.
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise HTTPError(400, "body is not valid UTF-8") from None
    rows: list[list[float]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(",")
        if len(fields) != n_features:
            raise HTTPError(400, f"line {lineno}: expected {n_features} features, got {len(fields)}")
        try:
            row = [float(field) for field in fields]
        except ValueError:
            raise HTTPError(400, f"line {lineno}: features must be numbers") from None
        if not all(map(math.isfinite, row)):
            raise HTTPError(400, f"line {lineno}: features must be finite")
        rows.append(row)
    if not rows:
        raise HTTPError(400, "no instances")
    return rows


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client went away first."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk: bytes = message.get("body", b"")
        if not message.get("more_body", False) and not chunks:
            if len(chunk) > MAX_BODY_BYTES:
                raise HTTPError(413, f"body exceeds {MAX_BODY_BYTES} bytes")
            return chunk  # Common case: the body arrived in one message.
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise HTTPError(413, f"body exceeds {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def send_bytes(send: Send, status: int, headers: Headers, body: bytes) -> None:
    if status in _NO_BODY_STATUSES:
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, status: int, message: str, headers: Headers | None = None) -> None:
    body = json.dumps({"error": message}, separators=(",", ":")).encode()
    await send_bytes(send, status, [*_JSON_HEADERS, *(headers or [])], body)


async def send_event_stream(send: Send, chunks: int, interval_s: float, openai: bool = False) -> None:
    # No content-length, so uvicorn sends chunked encoding; one ASGI message per event.
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/event-stream"),
                (b"cache-control", b"no-cache"),
            ],
        }
    )
    for i in range(chunks):
        if i and interval_s:
            await asyncio.sleep(interval_s)
        await send(
            {
                "type": "http.response.body",
                "body": _openai_event(i) if openai else b"data: %d\n\n" % i,
                "more_body": True,
            }
        )
    if openai:
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def _openai_event(i: int) -> bytes:
    """Chunk i of an OpenAI-compatible chat completion stream, one token each."""
    return b'data: {"id":"cmpl-example","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":" t%d"}}]}\n\n' % i


async def send_filler(send: Send, size: int) -> None:
    headers = [
        (b"content-type", b"application/octet-stream"),
        (b"content-length", b"%d" % size),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    remaining = size
    while remaining > len(_FILL):
        await send({"type": "http.response.body", "body": _FILL, "more_body": True})
        remaining -= len(_FILL)
    await send({"type": "http.response.body", "body": _FILL[:remaining]})


def _media_type(headers: dict[bytes, bytes]) -> bytes:
    return headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()


class ModelServer:
    """The ASGI callable; holds the loaded model and whether test knobs are enabled."""

    def __init__(self, model: IrisModel, *, test_knobs: bool) -> None:
        self.model = model
        self.test_knobs = test_knobs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # Websockets are not in the contract; uvicorn rejects the handshake.
        path: str = scope["path"]
        method: str = scope["method"]
        try:
            if path == "/invocations":
                if method != "POST":
                    raise HTTPError(405, "method not allowed", [(b"allow", b"POST")])
                await self._invocations(scope, receive, send)
            elif path == "/ping":
                if method != "GET":
                    raise HTTPError(405, "method not allowed", [(b"allow", b"GET")])
                await self._ping(scope, send)
            elif path in ("/v1/chat/completions", "/v1/completions"):
                if method != "POST":
                    raise HTTPError(405, "method not allowed", [(b"allow", b"POST")])
                await self._completions(scope, receive, send, path == "/v1/chat/completions")
            else:
                raise HTTPError(404, "not found")
        except HTTPError as exc:
            await send_error(send, exc.status, exc.message, exc.headers)

    async def _ping(self, scope: Scope, send: Send) -> None:
        if self.test_knobs:
            knobs = parse_knobs(dict(scope["headers"]))
            if knobs.delay_s:
                await asyncio.sleep(knobs.delay_s)
            if knobs.status is not None:
                raise HTTPError(knobs.status, f"test status {knobs.status}")
        await send_bytes(send, 200, _JSON_HEADERS, _PING_BODY)

    async def _completions(self, scope: Scope, receive: Receive, send: Send, is_chat: bool) -> None:
        """OpenAI-compatible completions of a fixed text (example_model/chat.py)."""
        body = await read_body(receive)
        if body is None:
            return
        try:
            prompt_tokens, max_tokens, streamed, include_usage = chat.parse(body, is_chat)
        except chat.ChatError as e:
            raise HTTPError(400, str(e)) from None
        delay_ms = interval_ms = first_token_ms = None
        if self.test_knobs:
            headers: dict[bytes, bytes] = dict(scope["headers"])
            delay_ms = _float_knob(headers, b"x-test-delay-ms", "X-Test-Delay-Ms", MAX_DELAY_MS)
            interval_ms = _float_knob(headers, b"x-test-stream-interval-ms", "X-Test-Stream-Interval-Ms", MAX_DELAY_MS)
            first_token_ms = _float_knob(headers, b"x-test-first-token-ms", "X-Test-First-Token-Ms", MAX_DELAY_MS)
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000)
        if streamed:
            await chat.stream(send, is_chat, prompt_tokens, max_tokens, include_usage, (interval_ms or 0.0) / 1000, (first_token_ms or 0.0) / 1000)
        else:
            await send_bytes(send, 200, _JSON_HEADERS, chat.document(is_chat, prompt_tokens, max_tokens))

    async def _invocations(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers: dict[bytes, bytes] = dict(scope["headers"])
        # Drain the body first, so no response ever leaves a request half read.
        body = await read_body(receive)
        if body is None:
            return
        if self.test_knobs:
            knobs = parse_knobs(headers)
            if knobs.delay_s:
                await asyncio.sleep(knobs.delay_s)
            if knobs.status is not None:
                raise HTTPError(knobs.status, f"test status {knobs.status}")
            if knobs.stream_chunks is not None:
                await send_event_stream(send, knobs.stream_chunks, knobs.stream_interval_s, knobs.stream_openai)
                return
            if knobs.response_bytes is not None:
                await send_filler(send, knobs.response_bytes)
                return

        media_type = _media_type(headers)
        n_features = self.model.n_features
        if media_type == b"application/json":
            rows = parse_json_rows(body, n_features)
        elif media_type == b"text/csv":
            rows = parse_csv_rows(body, n_features)
        else:
            shown = media_type.decode("latin-1")[:60] or "none"
            raise HTTPError(
                415,
                f"unsupported content type {shown!r}; use application/json or text/csv",
            )
        if len(rows) > MAX_INSTANCES:
            raise HTTPError(413, f"too many instances: {len(rows)} > {MAX_INSTANCES}")
        payload = {"predictions": self.model.predict(rows)}
        await send_bytes(
            send,
            200,
            _JSON_HEADERS,
            json.dumps(payload, separators=(",", ":")).encode(),
        )

    @staticmethod
    async def _lifespan(receive: Receive, send: Send) -> None:
        # Answer lifespan events so uvicorn does not report lifespan as unsupported.
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


def create_app(*, test_knobs: bool) -> ASGIApp:
    """Load the shipped iris weights and return the ASGI application."""
    return ModelServer(IrisModel.load(), test_knobs=test_knobs)
