"""A keep-alive HTTP/1.1 client for one model server, on asyncio and the httptools parser.

The stock httpx pool scans every connection per request and costs most of the proxy's
throughput; this client keeps a LIFO stack of idle connections and parses with llhttp.
It does only what a reverse proxy needs: whole request bodies out, streamed response bodies in.

Cancellation is the only abort signal: a caller that is cancelled (client gone, timeout)
closes the response, and a connection that is not at a message boundary is closed, never reused.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Protocol
from urllib.parse import urlsplit

import httptools

from proxy.errors import Fault, UpstreamError
from proxy.types import Body, Headers, body_size

# Pause reading from the model when this much response body waits for a slow client.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
MAX_IDLE = 512
# Bodies at least this large are written with the head in one gathered write, not copied into one buffer.
GATHER_BYTES = 65536
MAX_HEAD_BYTES = 64 * 1024
# A pooled connection idle longer is not reused: below the 5 s keep-alive of uvicorn, gunicorn and most
# model servers, so the model never closes a connection at the moment it is reused.
IDLE_TIMEOUT_S = 4.0
# Retrying on a reused connection that died without an answer is safe only where repeating is.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
NO_BODY_STATUSES = frozenset({204, 304})


class ModelClient(Protocol):
    """What the request path needs from a model client; swap implementations behind this."""

    authority: bytes

    def ready(self) -> bool:
        """False when no model instance can take a request (nothing is sent then: a 503, not an invocation)."""
        ...

    async def request(self, method: bytes, target: bytes, headers: Headers, body: Body) -> UpstreamResponse: ...

    async def close(self) -> None: ...


class UpstreamResponse(Protocol):
    """What the request path reads of a model's response (``ModelResponse`` here; a fake in tests). A protocol,
    not the class: in the compiled build a parameter typed with a class accepts only that class."""

    status: int
    headers: Headers
    complete: bool
    streamed: bool

    def take_buffered(self) -> bytes: ...

    async def read(self) -> bytes: ...

    def close(self) -> None: ...


class ModelResponse:
    """A response being received: status and headers once the head is in, then body chunks.

    The httptools parser calls the ``on_*`` methods directly.
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_conn",
        "_error",
        "_head",
        "_head_bytes",
        "_head_only",
        "_interim",
        "_keep_alive",
        "_loop",
        "_pending_bytes",
        "_until_eof",
        "_waiter",
        "complete",
        "headers",
        "status",
        "streamed",
    )

    def __init__(self, conn: _Connection, loop: asyncio.AbstractEventLoop, head_only: bool) -> None:
        self.status = 0
        self.headers: Headers = []
        self.complete = False
        # True when the body is chunked or delimited by close: a stream, not one sized payload.
        self.streamed = False
        self._conn: _Connection | None = conn
        self._loop = loop
        self._head_only = head_only
        self._head: asyncio.Future[None] = loop.create_future()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._interim = False
        self._until_eof = False
        self._head_bytes = 0
        self._pending_bytes = 0
        self._keep_alive = False

    # -- parser callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            # A second response nobody asked for, in the same read: the model is out of step on this connection.
            raise _OutOfStep

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise UpstreamError(Fault.UPSTREAM_MALFORMED, "response head too large")
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        conn = self._conn
        assert conn is not None and conn.parser is not None
        parser = conn.parser
        status = parser.get_status_code()
        if 100 <= status < 200:
            if status == 101:
                raise UpstreamError(Fault.UPSTREAM_MALFORMED, "unexpected protocol switch")
            # An interim response (100 Continue, 103 Early Hints): llhttp completes it as a message; skip it.
            self._interim = True
            self.headers = []
            return
        if status < 100 or status > 599:
            raise UpstreamError(Fault.UPSTREAM_MALFORMED, f"status {status} from the model is not an HTTP status")
        self.status = status
        self._keep_alive = parser.should_keep_alive()
        if self._head_only or status in NO_BODY_STATUSES:
            self._finish()
        else:
            chunked = False
            sized = False
            for name, value in self.headers:
                if name == b"content-length":
                    sized = True
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
            self.streamed = not sized
            self._until_eof = not sized and not chunked
        if not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and self._conn is not None:
            self._conn.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._finish()

    # -- connection events ---------------------------------------------------------------------

    def _finish(self) -> None:
        if self.complete:
            return
        self.complete = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.release(self._keep_alive)
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if self.complete or self._error is not None:
            return
        self._error = error
        self._conn = None
        if not self._head.done():
            self._head.set_exception(error)
            # Retrieved by whoever awaits the head; mark it so an abandoned future logs nothing.
            self._head.exception()
        self._wake()

    def _connection_lost(self) -> None:
        if self.status and self._until_eof:
            self._finish()
        else:
            self._fail(UpstreamError(Fault.UPSTREAM_RESET, "the model closed the connection mid-response"))

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the caller's side ---------------------------------------------------------------------

    async def head(self) -> None:
        await self._head

    def take_buffered(self) -> bytes:
        """All body bytes received so far, without waiting."""
        chunks = self._chunks
        if not chunks:
            return b""
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._conn is not None:
            self._conn.resume_reading()
        return data

    async def read(self) -> bytes:
        """The next body bytes; ``b""`` once the body is complete. Raises UpstreamError if the model fails."""
        while True:
            if self._chunks:
                return self.take_buffered()
            if self.complete:
                return b""
            if self._error is not None:
                raise self._error
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def close(self) -> None:
        """Done with this response: a connection left mid-message is closed, not reused."""
        conn, self._conn = self._conn, None
        if conn is not None and not self.complete:
            conn.abort()


class _OutOfStep(Exception):
    """Raised in a parser callback: bytes followed a complete response."""


class _Connection(asyncio.Protocol):
    __slots__ = ("_paused", "closed", "idle_since", "parser", "pool", "response", "reused", "transport")

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.response: ModelResponse | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport

    def send(self, head: bytes, body: Body, head_only: bool) -> ModelResponse:
        response = ModelResponse(self, self.pool.loop, head_only)
        self.response = response
        # A fresh parser per message: a HEAD response's parser state must not leak into the next one.
        self.parser = httptools.HttpResponseParser(response)
        assert self.transport is not None
        if not isinstance(body, bytes):
            self.transport.writelines((head, *body))
        elif len(body) < GATHER_BYTES:
            self.transport.write(head + body)
        else:
            self.transport.writelines((head, body))
        return response

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None or self.parser is None:
            # Bytes while idle: the model is out of step with us; this connection cannot be trusted.
            self.abort()
            return
        try:
            self.parser.feed_data(data)
            if not response.status:
                # A head still incomplete: the parser buffers a header line until it ends, so bound the raw bytes.
                response._pending_bytes += len(data)
                if response._pending_bytes > MAX_HEAD_BYTES:
                    raise UpstreamError(Fault.UPSTREAM_MALFORMED, "response head too large")
        except UpstreamError as e:
            response._fail(e)
            self.abort()
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if not isinstance(cause, _OutOfStep):
                response._fail(cause if isinstance(cause, UpstreamError) else UpstreamError(Fault.UPSTREAM_MALFORMED, str(e)))
            self.abort()  # the response in hand is complete; only the first one is forwarded, and never this connection again
        except httptools.HttpParserError as e:
            response._fail(UpstreamError(Fault.UPSTREAM_MALFORMED, f"malformed response from the model: {e}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response, self.response = self.response, None
        if response is not None:
            response._connection_lost()

    def release(self, keep_alive: bool) -> None:
        self.response = None
        self.parser = None
        if keep_alive and not self.closed:
            self.resume_reading()
            self.pool._idle_push(self)
        else:
            self.abort()

    def pause_reading(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        self.closed = True
        self.response = None
        if self.transport is not None:
            self.transport.abort()


class ConnectionPool:
    """A pool of keep-alive HTTP/1.1 connections to one model server (``http://host:port``)."""

    def __init__(self, url: str, *, idle_timeout: float = IDLE_TIMEOUT_S, loop: asyncio.AbstractEventLoop | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be http://host:port, got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.url = url
        self.authority = parts.netloc.encode("ascii")
        self._loop = loop
        self._idle_timeout = idle_timeout
        self._idle: list[_Connection] = []
        # Set by the process layer while a model it started is not yet answering its ping; otherwise a failed
        # call is an invocation that the model failed.
        self.available = True

    def ready(self) -> bool:
        return self.available

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _idle_push(self, conn: _Connection) -> None:
        conn.reused = True
        conn.idle_since = self.loop.time()
        if len(self._idle) < MAX_IDLE:
            self._idle.append(conn)
        else:
            conn.abort()

    def _idle_pop(self) -> _Connection | None:
        """The most recently used connection that is open and not idle too long. The stack is in order of use,
        so past the first stale one all are stale."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.closed or conn.transport is None or conn.transport.is_closing():
                continue
            if self.loop.time() - conn.idle_since > self._idle_timeout:
                conn.abort()
                for older in idle:
                    older.abort()
                idle.clear()
                return None
            return conn
        return None

    async def _connect(self) -> _Connection:
        try:
            _, conn = await self.loop.create_connection(lambda: _Connection(self), self.host, self.port)
        except OSError as e:
            raise UpstreamError(Fault.UPSTREAM_CONNECT, f"could not connect to the model at {self.url}: {e.strerror or e}") from None
        return conn

    async def request(self, method: bytes, target: bytes, headers: Headers, body: Body) -> ModelResponse:
        """Send one request and wait for the response head. Body chunks follow through ``read()``."""
        lines = [b"%s %s HTTP/1.1\r\n" % (method, target)]
        for name, value in headers:
            lines.append(name + b": " + value + b"\r\n")
        if body or method not in (b"GET", b"HEAD", b"DELETE", b"OPTIONS"):
            lines.append(b"content-length: %d\r\n" % body_size(body))
        lines.append(b"\r\n")
        head = b"".join(lines)
        head_only = method == b"HEAD"
        for attempt in (1, 2):
            # The retry always takes a new connection: the other idle ones may be just as stale.
            conn = self._idle_pop() if attempt == 1 else None
            if conn is None:
                conn = await self._connect()
            response = conn.send(head, body, head_only)
            # A write that failed at once (the model had closed the connection) closes the transport here.
            unsent = conn.transport is None or conn.transport.is_closing()
            try:
                await response.head()
            except UpstreamError as e:
                # Retried once, on a fresh connection, only where repeating cannot do the work twice: a reused
                # connection that gave no byte of an answer, and the request never left (any method) or is idempotent.
                stale = conn.reused and response.status == 0 and e.fault is Fault.UPSTREAM_RESET
                if stale and attempt == 1 and (unsent or method in IDEMPOTENT):
                    continue
                raise
            except BaseException:
                response.close()
                raise
            return response
        raise AssertionError("unreachable")

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.abort()


async def ping(upstream: ModelClient, path: str, timeout_s: float) -> str | None:
    """None if the model answers ``GET path`` with 200 within ``timeout_s``, else why not, in one line."""
    try:
        async with asyncio.timeout(timeout_s):
            response = await upstream.request(b"GET", path.encode(), [(b"host", upstream.authority)], b"")
            try:
                while await response.read():
                    pass
            finally:
                response.close()
    except UpstreamError as e:
        return str(e)
    except TimeoutError:
        return f"the model's {path} took over {timeout_s:g} s"
    return None if response.status == 200 else f"the model's {path} answered {response.status}"
