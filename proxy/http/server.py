"""The front door: an HTTP/1.1 server for the proxy port, on asyncio and llhttp (httptools), hosting an ASGI 3 app.

It turns bytes into ASGI messages and bounds what a client can hold: the time to send a head, a
body and the next request, the size of a head, the number of connections. What it refuses before
the app sees a request it answers itself (400, 408, 431; a silent close where nothing was sent)
and reports through ``on_refused``. Everything the app needs to know that ASGI has no message for
travels in two scope extensions (``proxy.types``): the disconnect callbacks, and the fault on an
``http.disconnect`` when the server, not the client, ended a request's body (the app answers it).

Framing: keep-alive, pipelining (answers in order; reading pauses while a request waits), request
bodies fixed-length and chunked, ``Expect: 100-continue`` (100 only when the app reads the body),
HEAD/204/304 without a body, HTTP/1.0, the response head and the first body chunk in one write.
Timeouts run on one ticker per server and a coarse clock, not a timer per request.
"""

from __future__ import annotations

import asyncio
import collections
import http
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import httptools

from proxy.errors import Fault, error_body
from proxy.types import DISCONNECT_EXTENSION, DISCONNECTED, FAULT_KEY, ASGIApp, Headers, Message, Scope

log = logging.getLogger("proxy.http")

# Pause reading a request body while this much waits for the app.
BODY_HIGH_WATER = 1024 * 1024
# llhttp parses whatever it is fed, however many requests that holds: heads and chunked bodies are fed in
# slices of this size, so that a client pipelining tiny requests makes at most a slice's worth of them wait.
SLICE = 4096
ASGI_INFO = {"version": "3.0", "spec_version": "2.3"}
STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in http.HTTPStatus}
NO_BODY_STATUSES = frozenset({204, 304})
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
TCP_CLOSE = 7  # tcp_info.tcpi_state of a connection the peer has reset
METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE")}


@dataclass(frozen=True)
class Limits:
    """What one client may hold (seconds and bytes); each has a serve flag of the same name."""

    head_timeout: float = 10.0  # from the first byte of a head; for a new connection, from accept
    keep_alive_timeout: float = 75.0  # idle between requests; above load balancers' 60 s, so they close first
    body_timeout: float = 60.0  # without progress while a body is read
    max_head_bytes: int = 64 * 1024  # the request line and all headers
    max_headers: int = 100
    max_connections: int = 10_000
    write_timeout: float = 60.0  # without progress while a client is to read what is written to it


class _Refusal(Exception):
    """Raised inside a parser callback: the request is refused before the app sees it."""

    def __init__(self, fault: Fault) -> None:
        self.fault = fault


# What the connection's deadline is for; the ticker acts on it when it passes.
_IDLE, _NEW, _HEAD, _BODY, _FLUSH = range(5)
_TCP_INFO = getattr(socket, "TCP_INFO", None)  # Linux: tells a reset peer from a half-closed one


class HttpServer:
    """Serves ``app`` on a listening socket until ``stop()``, then drains: in-flight requests finish,
    idle connections close, and ``serve()`` returns once every app call has returned."""

    def __init__(
        self,
        app: ASGIApp,
        limits: Limits = Limits(),
        *,
        on_refused: Callable[[Fault], None] | None = None,
        refusal_headers: Callable[[bytes, int], bytes] | None = None,
    ) -> None:
        self.app = app
        self.limits = limits
        self.on_refused = on_refused or (lambda fault: None)
        # Extra header lines for the server's own refusals, from the request target and the status: an API the
        # app serves may have its own error shape (the SageMaker Runtime API's x-amzn-errortype).
        self.refusal_headers = refusal_headers or (lambda target, status: b"")
        self.connections: set[_Connection] = set()
        self.half_closed: set[_Connection] = set()  # the client sent FIN while its request is served
        self.tasks: set[asyncio.Task[None]] = set()
        self.now = 0.0  # the coarse clock: loop time at the last tick; a timeout fires between 0 and 2 ticks late
        self.stopping = False
        self._stop = asyncio.Event()
        shortest = min(limits.head_timeout, limits.keep_alive_timeout, limits.body_timeout)
        self._tick = min(1.0, max(0.05, shortest / 10))

    def stop(self) -> None:
        self._stop.set()

    async def serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self.now = loop.time()
        server = await loop.create_server(lambda: _Connection(self, loop), sock=sock, backlog=2048)
        ticker = loop.create_task(self._ticker(loop))
        try:
            await self._stop.wait()
        finally:
            server.close()
            self.stopping = True
            for conn in list(self.connections):
                conn.shut_down()
            while self.tasks or self.connections:
                await asyncio.sleep(0.02)
            ticker.cancel()

    async def _ticker(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            await asyncio.sleep(self._tick)
            now = self.now = loop.time()
            # Deadlines were set from this coarse clock, up to a tick behind: one tick of grace so none fires early.
            due = now - self._tick
            try:
                for conn in [c for c in self.connections if c.deadline <= due]:
                    conn.timed_out()
                for conn in list(self.half_closed):
                    conn.check_peer()
            except Exception:  # a defect here must not stop every timeout of the server
                log.exception("front door: the timeout ticker failed")


class _Cycle:
    """One request and its response: the ASGI ``receive`` and ``send`` of one app call."""

    __slots__ = (
        "body",
        "body_complete",
        "body_left",
        "body_read",
        "body_size",
        "chunked",
        "conn",
        "continue_due",
        "disconnected",
        "expected_length",
        "fault",
        "head_only",
        "head_written",
        "headers",
        "keep_alive",
        "response_complete",
        "response_started",
        "scope",
        "sent_length",
        "status",
        "upgrade_body",
        "waiter",
    )

    def __init__(self, conn: _Connection, scope: Scope, keep_alive: bool, continue_due: bool) -> None:
        self.conn = conn
        self.scope = scope
        self.keep_alive = keep_alive
        self.continue_due = continue_due
        self.head_only = scope["method"] == "HEAD"
        self.body: collections.deque[bytes] = collections.deque()
        self.body_size = 0
        self.body_complete = False
        self.body_left = 0  # bytes of a Content-Length body still to come
        self.body_read = False  # the last http.request went to the app
        self.upgrade_body = False  # llhttp ended the message at an Upgrade head; its body follows (h2c)
        self.disconnected = False
        self.fault: Fault | None = None  # set when the server ended the body (timeout, malformed chunk)
        self.waiter: asyncio.Future[None] | None = None
        self.response_started = False
        self.head_written = False
        self.response_complete = False
        self.status = 0
        self.headers: Headers = []
        self.chunked = False
        self.expected_length: int | None = None
        self.sent_length = 0

    # -- the app's side ----------------------------------------------------------------------

    async def receive(self) -> Message:
        if self.continue_due:
            self.continue_due = False
            if not self.disconnected and not self.body_complete:
                self.conn.write(CONTINUE)
                self.conn.set_deadline(_BODY, self.conn.limits.body_timeout)
        while not self.body and not self.body_complete and not self.disconnected:
            self.waiter = self.conn.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        if self.disconnected and not self.body:
            if self.fault is not None:
                return {"type": "http.disconnect", FAULT_KEY: self.fault}
            return {"type": "http.disconnect"}
        if self.body_read:
            # The body was read: the next message is the disconnect, once the response is done or the client gone.
            while not self.disconnected and not self.response_complete:
                self.waiter = self.conn.loop.create_future()
                try:
                    await self.waiter
                finally:
                    self.waiter = None
            return {"type": "http.disconnect"}
        # One chunk per message, as it arrived: the app gathers them without this server copying them first.
        body = self.body.popleft() if self.body else b""
        self.body_size -= len(body)
        self.conn.resume_reading()
        self.body_read = self.body_complete and not self.body
        return {"type": "http.request", "body": body, "more_body": not self.body_read}

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            if not self.response_started or self.response_complete:
                raise RuntimeError("http.response.body out of order")
            conn = self.conn
            if conn.closed:
                return  # the client is gone; the app learns of it from receive() and the disconnect callbacks
            body: bytes = message.get("body", b"")
            more: bool = message.get("more_body", False)
            head = b"" if self.head_written else self._head(body, more)
            if self.head_only:
                body = b""
            elif body:
                self.sent_length += len(body)
                if self.expected_length is not None and self.sent_length > self.expected_length:
                    raise RuntimeError("response body longer than its Content-Length")
                if self.chunked:
                    body = b"%x\r\n%b\r\n" % (len(body), body)
            if not more:
                if self.chunked:
                    body += b"0\r\n\r\n"
                self.response_complete = True
                if self.expected_length is not None and self.sent_length < self.expected_length and not self.head_only:
                    self.keep_alive = False  # the client waits for bytes that will never come: close
            conn.write(head, body)
            if self.response_complete:
                self._wake()
                conn.response_done(self)
            elif conn.write_paused:
                await conn.drained()
        elif kind == "http.response.start":
            if self.response_started:
                raise RuntimeError("http.response.start sent twice")
            self.response_started = True
            self.status = message["status"]
            self.headers = message.get("headers", [])
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")

    def _head(self, body: bytes, more: bool) -> bytes:
        status = self.status
        self.head_written = True
        no_body = self.head_only or status in NO_BODY_STATUSES or status < 200
        conn = self.conn
        keep_alive = self.keep_alive and not conn.server.stopping and not (conn.eof and not conn.waiting and not conn.stash)
        if not self.body_complete:
            keep_alive = False  # the rest of the request body would be read as the next request
        length: int | None = None
        lines = [STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status]
        for name, value in self.headers:
            if name == b"content-length":
                if status != 204 and value.isdigit():  # a 204 has no body and no length (RFC 9110 8.6)
                    length = int(value)
                continue
            elif name == b"connection" and b"close" in value.lower():
                keep_alive = False
                continue
            elif name == b"transfer-encoding":
                continue  # the framing is ours to choose
            lines.append(b"%s: %s\r\n" % (name, value))
        if no_body:
            if length is not None:
                lines.append(b"content-length: %d\r\n" % length)
            self.head_only = True
        elif length is not None:
            lines.append(b"content-length: %d\r\n" % length)
            self.expected_length = length
        elif not more:
            lines.append(b"content-length: %d\r\n" % len(body))
        elif self.scope["http_version"] == "1.1":
            lines.append(b"transfer-encoding: chunked\r\n")
            self.chunked = True
        else:
            keep_alive = False  # HTTP/1.0 and a body of unknown length: the close ends it
        if not keep_alive:
            lines.append(b"connection: close\r\n")
        elif self.scope["http_version"] == "1.0":
            lines.append(b"connection: keep-alive\r\n")
        self.keep_alive = keep_alive
        lines.append(b"\r\n")
        return b"".join(lines)

    # -- the connection's side -----------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def add_body(self, body: bytes) -> None:
        self.body.append(body)
        self.body_size += len(body)
        self._wake()

    def end_body(self) -> None:
        self.body_complete = True
        self._wake()

    def lose(self, fault: Fault | None = None) -> None:
        """The request ends here: the client is gone, or ``fault`` ended its body. Tells the app once."""
        if self.disconnected:
            return
        self.disconnected = True
        self.fault = fault
        self._wake()
        if fault is None and not self.response_complete:
            self.scope["extensions"][DISCONNECTED] = True
            callbacks: list[Callable[[], None]] = self.scope["extensions"][DISCONNECT_EXTENSION]
            for callback in callbacks:
                callback()



def _framing(headers: Headers, version: str) -> tuple[bool, bool, int]:
    """Whether the request expects a 100, has a body, and its length (0 if chunked); raises _Refusal for a
    transfer coding besides chunked (501), a body whose last coding is not chunked (400), and a missing or
    doubled Host (400, RFC 9112 3.2: which authority is meant would be a guess)."""
    expect = has_body = False
    length = hosts = 0
    for name, value in headers:
        if name == b"expect" and value.lower() == b"100-continue":
            expect = True
        elif name == b"content-length":
            if value != b"0":
                has_body = True
                length = int(value)  # llhttp has checked it is one valid number
        elif name == b"transfer-encoding":
            has_body = True
            codings = [c.strip(b" \t").lower() for c in value.split(b",")]
            if codings[-1] != b"chunked":  # no length can be found (RFC 9112 6.3): 400
                raise _Refusal(Fault.MALFORMED_REQUEST)
            if len(codings) > 1:  # chunked last, but a coding before it that would be lost unseen (6.1): 501
                raise _Refusal(Fault.UNSUPPORTED_TRANSFER_CODING)
        elif name == b"host":
            hosts += 1
    if hosts > 1 or (hosts == 0 and version == "1.1"):
        raise _Refusal(Fault.MALFORMED_REQUEST)
    return expect, has_body, length


def _target(url: bytes, method: str) -> tuple[bytes, bytes]:
    """The path and query of a request target; the authority of an absolute-form target is never used: only
    the configured model is contacted."""
    if url[:1] == b"/":
        raw_path, _, query = url.partition(b"?")
        return raw_path, query
    if method == "CONNECT":
        return b"/", b""
    if url == b"*" and method == "OPTIONS":
        return b"*", b""  # the server as a whole (RFC 9110 7.1)
    try:
        # Any: httptools' stub says bytes, but a part the target lacks is None (and the compiled build checks types).
        parsed: Any = httptools.parse_url(url)
    except httptools.HttpParserInvalidURLError:
        raise _Refusal(Fault.MALFORMED_REQUEST) from None
    return parsed.path or b"/", parsed.query or b""

class _Connection(asyncio.Protocol):
    """One client connection: parses requests with llhttp and runs the app for each, in order.

    While a request whose body is complete is served, what the client sends next is kept unparsed (the
    ``stash``, reading pauses past the head limit) and parsed once the response is written and the client
    has read it: so pipelining holds one request ahead, not a read's worth of them.
    """

    def __init__(self, server: HttpServer, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop
        self.limits = server.limits
        self.app = server.app
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.client: tuple[str, int] | None = None
        self.local: tuple[str, int] | None = None
        self.active: _Cycle | None = None  # the request whose app call runs now
        self.next: _Cycle | None = None  # the request the connection's task is to run next
        self.task: asyncio.Task[None] | None = None
        self.ready: asyncio.Future[None] | None = None  # the task waits on it between requests
        self.reading: _Cycle | None = None  # the request whose body is being parsed
        self.last: _Cycle | None = None  # the request whose head was parsed last
        self.waiting: collections.deque[_Cycle | Fault] = collections.deque()  # pipelined, in order
        self.stash = bytearray()  # received while a complete request is served; parsed after its response
        self.url = b""
        self.headers: Headers = []
        self.head_size = 0  # the request line, headers and trailers parsed so far
        self.trailers = 0
        self.in_head = False
        self.unparsed = 0  # bytes fed since llhttp last handed anything over: what it may be holding
        self.progressed = False
        self.synthetic = False  # parsing the made-up head that resumes an h2c request's body
        self.upgrade: bytes | None = None
        self.deadline = server.now + self.limits.head_timeout
        self.deadline_kind: int | None = _NEW
        self.flush_left = 0  # the write buffer when a _FLUSH deadline was set: progress re-arms it
        self.held = False  # a response is written but not read: the next request waits for the client
        self.done_reading = False  # a refusal or a tunnel: nothing more is parsed here
        self.paused = False
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.eof = False

    # -- connection events ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        server = self.server
        if len(server.connections) >= self.limits.max_connections or server.stopping:
            self.closed = True
            transport.abort()  # type: ignore[attr-defined]
            if not server.stopping:
                server.on_refused(Fault.TOO_MANY_CONNECTIONS)
            return
        server.connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        self.client = (peer[0], peer[1]) if isinstance(peer, tuple) else None
        self.local = (local[0], local[1]) if isinstance(local, tuple) else None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self.server.half_closed.discard(self)
        for cycle in (self.active, self.reading, *self.waiting):
            if isinstance(cycle, _Cycle):
                cycle.lose()
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._wake()

    def eof_received(self) -> bool:
        """The client sent FIN. Over TCP a half-close (which still wants its answers) and a full close look
        the same until we write: so an HTTP/1.1 request in progress gets an interim ``100 Continue``, which
        a closed socket answers with a reset (found by ``check_peer``) and a half-closed one reads. What the
        client sent before its FIN (pipelined, or kept unparsed) is still answered, then the connection closes."""
        reading = self.reading
        if reading is not None and not reading.body_complete:
            reading.lose()  # the body can never be completed
        active = self.active
        if active is not None and active.disconnected:
            return False
        if active is None and not (self.held and (self.stash or self.waiting)):
            return False
        self.eof = True
        if active is not None and not active.response_started and active.scope["http_version"] == "1.1":
            # HTTP/1.0 has no interim responses: there a closed client is found when the response is written.
            self.write(CONTINUE)
            self.server.half_closed.add(self)
            self.loop.call_later(0.05, self.check_peer)
        return True

    def check_peer(self) -> None:
        """After a half-close: a peer that reset the connection is gone, and so is its request."""
        if self.closed or self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        try:
            gone = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
            if not gone and _TCP_INFO is not None:
                gone = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)[0] == TCP_CLOSE
        except OSError:
            gone = True
        if gone:
            self.abort()

    def data_received(self, data: bytes) -> None:
        if self.closed or self.done_reading:
            return
        if self.stash or self._busy():
            self._hold(data)
        else:
            self._feed(data)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.held and not self.closed:
            self._go_on()

    async def drained(self) -> None:
        if self.write_paused and not self.closed:
            self.drain_waiter = self.loop.create_future()
            try:
                await self.drain_waiter
            finally:
                self.drain_waiter = None

    # -- parsing -------------------------------------------------------------------------------

    def _busy(self) -> bool:
        """A request is served (or waits) and no body is being read: what comes next is the next request."""
        return (self.active is not None or self.held or bool(self.waiting)) and self.reading is None

    def _hold(self, data: bytes | memoryview) -> None:
        self.stash += data
        if len(self.stash) > self.limits.max_head_bytes:
            self.pause_reading()

    def _feed(self, data: bytes) -> None:
        """Parse ``data``: a Content-Length body in one piece, anything else in slices, and stop at the
        end of a request that is then served (the rest is held)."""
        pos, end = 0, len(data)
        view: memoryview | None = None
        while pos < end:
            if self.closed or self.done_reading:
                return
            if self._busy():
                self._hold(data[pos:])
                return
            reading = self.reading
            step = reading.body_left if reading is not None and reading.body_left else SLICE
            piece: bytes | memoryview
            if pos == 0 and end <= step:
                piece = data
            else:
                view = view if view is not None else memoryview(data)
                piece = view[pos:pos + step]
            pos += len(piece)
            rest = self._parse(piece)
            if rest is not None:
                pos -= len(piece) - rest
                if self.closed or self.done_reading:
                    return
                self._upgraded()

    def _parse(self, piece: bytes | memoryview) -> int | None:
        """Feed llhttp one piece; returns where an Upgrade or CONNECT head ended in it, if one did."""
        self.progressed = False
        try:
            self.parser.feed_data(piece)
        except httptools.HttpParserUpgrade as e:
            return int(e.args[0]) if e.args else len(piece)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            self._refuse(cause.fault if isinstance(cause, _Refusal) else Fault.MALFORMED_REQUEST)
            if not isinstance(cause, _Refusal):
                log.exception("front door: parser callback failed")
            return None
        except httptools.HttpParserError:
            self._refuse(Fault.MALFORMED_REQUEST)
            return None
        # llhttp holds a header line (or a trailer) until it ends: bound the raw bytes it may be holding.
        if self.progressed:
            self.unparsed = 0
        else:
            self.unparsed += len(piece)
            held = self.unparsed + (self.head_size if self.in_head else 0)
            if held > self.limits.max_head_bytes and (self.in_head or self.reading is not None):
                self._refuse(Fault.HEAD_TOO_LARGE)
        return None

    # -- parser callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.synthetic:
            return
        self.in_head = True
        self.url = b""
        self.headers = []
        self.head_size = 0
        self.trailers = 0
        self.upgrade = None
        if self.active is None:
            self.set_deadline(_HEAD, self.limits.head_timeout)

    def on_url(self, url: bytes) -> None:
        if self.synthetic:
            return
        self.progressed = True
        self.url += url
        self.head_size += len(url)
        if self.head_size > self.limits.max_head_bytes:
            raise _Refusal(Fault.HEAD_TOO_LARGE)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.synthetic:
            return
        self.progressed = True
        self.head_size += len(name) + len(value) + 4
        if not self.in_head:
            # A chunked body's trailers: bounded with the head, never merged into the request's headers.
            self.trailers += 1
            if self.head_size > self.limits.max_head_bytes or self.trailers > self.limits.max_headers:
                raise _Refusal(Fault.HEAD_TOO_LARGE)
            return
        if self.head_size > self.limits.max_head_bytes or len(self.headers) >= self.limits.max_headers:
            raise _Refusal(Fault.HEAD_TOO_LARGE)
        name = name.lower()
        if name == b"upgrade":
            self.upgrade = value.lower()
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.synthetic:
            return
        self.progressed = True
        self.in_head = False
        parser = self.parser
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise _Refusal(Fault.MALFORMED_REQUEST)
        method_bytes = parser.get_method()
        method = METHODS.get(method_bytes) or method_bytes.decode("ascii")
        raw_path, query = _target(self.url, method)
        upgrading = self.upgrade is not None and parser.should_upgrade()
        if upgrading and method != "CONNECT" and b"websocket" in (self.upgrade or b""):
            raise _Refusal(Fault.UPGRADE_REFUSED)
        path = raw_path.decode("latin-1")
        scope: Scope = {
            "type": "http",
            "asgi": ASGI_INFO,
            "http_version": version,
            "server": self.local,
            "client": self.client,
            "scheme": "http",
            "method": method,
            "root_path": "",
            "path": unquote(path) if "%" in path else path,
            "raw_path": raw_path,
            "query_string": query,
            "headers": self.headers,
            "extensions": {DISCONNECT_EXTENSION: []},
        }
        keep_alive = parser.should_keep_alive() and method != "CONNECT"
        expect, has_body, length = _framing(self.headers, version)
        cycle = _Cycle(self, scope, keep_alive, expect and has_body and version == "1.1")
        cycle.body_left = length
        if upgrading and method != "CONNECT" and has_body:
            cycle.upgrade_body = True  # llhttp stops at an Upgrade head; the body is parsed after it (h2c)
        self.reading = self.last = cycle
        if self.active is None and not self.waiting and not self.held:
            if has_body and not cycle.continue_due:
                self.set_deadline(_BODY, self.limits.body_timeout)
            else:
                self.set_deadline(None, 0)
            self._start(cycle)
        else:
            self.waiting.append(cycle)  # its body, if any, is read (and timed) when its turn comes
            self.pause_reading()

    def on_body(self, body: bytes) -> None:
        cycle = self.reading
        assert cycle is not None
        self.progressed = True
        cycle.add_body(body)
        if cycle.body_left:
            cycle.body_left -= len(body)
        if cycle.body_size > BODY_HIGH_WATER:
            self.pause_reading()
        if self.deadline_kind == _BODY:
            self.deadline = self.server.now + self.limits.body_timeout

    def on_message_complete(self) -> None:
        cycle = self.reading
        assert cycle is not None
        self.progressed = True
        if cycle.upgrade_body and not self.synthetic:
            return
        self.synthetic = False
        self.reading = None
        cycle.end_body()
        if self.deadline_kind == _BODY:
            self.set_deadline(None, 0)

    # -- requests --------------------------------------------------------------------------------

    def _start(self, cycle: _Cycle) -> None:
        self.active = self.next = cycle  # no deadline of ours while the app runs: it has its own timeouts
        if self.task is None:
            self.task = self.loop.create_task(self._serve())
            self.server.tasks.add(self.task)
            self.task.add_done_callback(self.server.tasks.discard)
        else:
            self._wake()

    def _wake(self) -> None:
        ready = self.ready
        if ready is not None and not ready.done():
            ready.set_result(None)

    async def _serve(self) -> None:
        """The connection's one task: the app for each request in turn (a task per connection, not per request)."""
        while not self.closed or self.next is not None:
            cycle = self.next
            if cycle is None:
                self.ready = self.loop.create_future()
                try:
                    await self.ready
                finally:
                    self.ready = None
                continue
            self.next = None
            await self._run(cycle)

    async def _run(self, cycle: _Cycle) -> None:
        try:
            await self.app(cycle.scope, cycle.receive, cycle.send)
        except BaseException as e:
            if not isinstance(e, asyncio.CancelledError):
                log.exception("the application failed on %s %s", cycle.scope["method"], cycle.scope["path"])
            if not cycle.response_started and not cycle.disconnected:
                self._answer(500, error_body(Fault.INTERNAL.message), close=True)
                cycle.response_complete = True
                self.response_done(cycle)
            elif not cycle.response_complete:
                self.abort()
            if isinstance(e, asyncio.CancelledError):
                raise
        else:
            if not cycle.response_complete:
                if cycle.response_started:
                    self.abort()  # the app returned mid-response: the client must not wait for the rest
                elif cycle.disconnected:
                    self.close()
                else:
                    self._answer(500, error_body(Fault.INTERNAL.message), close=True)
                    cycle.response_complete = True
                    self.response_done(cycle)

    def response_done(self, cycle: _Cycle) -> None:
        """The response's last byte is written: close, or go on with the next request once the client reads."""
        if self.active is not cycle:
            return
        self.active = None
        if not cycle.keep_alive or self.closed:
            self.close()
        elif self.write_paused:
            # The client is not reading its answers: nothing more is parsed or served until it does.
            self.held = True
            self._await_flush()
        else:
            self._go_on()

    def _go_on(self) -> None:
        """The connection is free: the next pipelined request, what was held unparsed, or wait for more."""
        self.held = False
        waiting = self.waiting
        if waiting:
            nxt = waiting.popleft()
            if isinstance(nxt, Fault):
                self._refuse(nxt)
                return
            self._start(nxt)
            if not waiting and self.reading is not None:
                self.resume_reading()  # its body is still to come
                if not self.reading.continue_due:
                    self.set_deadline(_BODY, self.limits.body_timeout)
            elif not waiting and not self.stash:
                self.resume_reading()
            return
        if self.stash:
            stash, self.stash = bytes(self.stash), bytearray()
            self._feed(stash)
            if self.closed or self.done_reading or self.stash or self.waiting:
                return
        if self.active is not None:
            self.resume_reading()
        elif self.eof or self.server.stopping:
            self.close()
        else:
            if self.in_head:
                self.set_deadline(_HEAD, self.limits.head_timeout)
            elif self.reading is None:
                self.set_deadline(_IDLE, self.limits.keep_alive_timeout)
            self.resume_reading()

    def set_deadline(self, kind: int | None, seconds: float) -> None:
        """What the ticker acts on next; ``None``: nothing, while the app runs."""
        self.deadline_kind = kind
        self.deadline = float("inf") if kind is None else self.server.now + seconds

    def _await_flush(self) -> None:
        """The client is to read what is written, making progress within the write timeout."""
        transport = self.transport
        if transport is not None and transport.get_write_buffer_size():
            self.flush_left = transport.get_write_buffer_size()
            self.set_deadline(_FLUSH, self.limits.write_timeout)

    def timed_out(self) -> None:
        kind = self.deadline_kind
        self.set_deadline(None, 0)
        if kind == _IDLE:
            if self.transport is not None and self.transport.get_write_buffer_size():
                self.abort()  # a client that stopped reading its last response: nothing more will flush
            else:
                self.close()
        elif kind == _NEW:
            self.server.on_refused(Fault.IDLE_CONNECTION)  # no request was refused: a connection sent none
            self.abort()
        elif kind == _HEAD:
            self._refuse(Fault.HEAD_TIMEOUT)
        elif kind == _BODY:
            if self.reading is not None:
                self._refuse(Fault.BODY_TIMEOUT)
        elif kind == _FLUSH:
            left = self.transport.get_write_buffer_size() if self.transport is not None else 0
            if left and left < self.flush_left:
                self.flush_left = left  # slow, but reading: another write timeout
                self.set_deadline(_FLUSH, self.limits.write_timeout)
            elif left or self.held:
                self.abort()

    def shut_down(self) -> None:
        """The server is stopping: idle connections close now, busy ones after their response."""
        if self.active is None and not self.waiting:
            self.close()

    # -- refusals and the upgrade path -------------------------------------------------------------

    def _refuse(self, fault: Fault) -> None:
        """Refuse the request being parsed: answered now, or after the responses still owed (pipelining)."""
        self.done_reading = True
        self.in_head = False
        self.stash.clear()
        self.pause_reading()
        reading = self.reading
        if reading is not None and reading is not self.active and reading in self.waiting:
            self.waiting.remove(reading)  # its body broke: it never reaches the app
        self.reading = None
        if reading is not None and reading is self.active and not reading.response_started:
            # The app is reading this request's body: it answers, with the fault's status, and counts it.
            reading.keep_alive = False
            reading.lose(fault)
            return
        if self.active is not None or self.waiting or self.held:
            self.waiting.append(fault)
            return
        self.server.on_refused(fault)
        if fault.status is None:
            self.abort()
        else:
            self._answer(fault.status, error_body(fault.message), close=True)

    def _upgraded(self) -> None:
        """llhttp stopped at an Upgrade or CONNECT head. CONNECT is the app's to refuse, and nothing after it
        is read; any other upgrade (h2c) is ignored: the request is served as HTTP/1.1, its body and the next
        requests parsed by a fresh parser."""
        cycle = self.last
        if cycle is not None and cycle.scope["method"] == "CONNECT":
            cycle.keep_alive = False
            self.done_reading = True
            self.stash.clear()
            self.pause_reading()
            return
        self.parser = httptools.HttpRequestParser(self)
        if cycle is not None and cycle.upgrade_body and self.reading is cycle:
            length = next((v for n, v in cycle.scope["headers"] if n == b"content-length"), None)
            framing = b"content-length: %s" % length if length is not None else b"transfer-encoding: chunked"
            self.synthetic = True
            try:
                self.parser.feed_data(b"POST / HTTP/1.1\r\n%s\r\n\r\n" % framing)
            except httptools.HttpParserError:
                self._refuse(Fault.MALFORMED_REQUEST)

    # -- writing ------------------------------------------------------------------------------------

    def write(self, data: bytes, more: bytes = b"") -> None:
        """One write per call: the response head and the first body chunk go out together."""
        if self.closed or self.transport is None:
            return
        if more:
            if len(more) < 65536:
                self.transport.write(data + more)
            else:
                self.transport.writelines((data, more))
        elif data:
            self.transport.write(data)

    def _answer(self, status: int, body: bytes, *, close: bool) -> None:
        head = STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status
        extra = (b"connection: close\r\n" if close else b"") + self.server.refusal_headers(self.url, status)
        self.write(b"%scontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (head, len(body), extra, body))
        if close:
            self.close()

    def pause_reading(self) -> None:
        if not self.paused and not self.closed and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
            if self.deadline_kind == _BODY:
                self.deadline = float("inf")  # the client cannot send while we do not read

    def resume_reading(self) -> None:
        if self.paused and not self.closed and self.transport is not None and not self.waiting:
            self.paused = False
            self.transport.resume_reading()
            if self.deadline_kind == _BODY:
                self.deadline = self.server.now + self.limits.body_timeout

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()  # after what is buffered has been written, if the client reads it in time
            self._await_flush()

    def abort(self) -> None:
        if self.transport is not None:
            self.closed = True
            self.transport.abort()
