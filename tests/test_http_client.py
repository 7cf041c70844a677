"""Conformance of the keep-alive model client against scripted servers on loopback.

Each test starts a raw ``asyncio.start_server`` on 127.0.0.1 port 0 whose handler writes exact
bytes, so the wire is under the test's control. Every test runs on the stock asyncio loop and on
uvloop, which is what the proxy runs on in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvloop

from proxy.errors import Fault, UpstreamError
from proxy.http.client import ConnectionPool, ModelResponse
from tests.conftest import free_port

Run = Callable[[Coroutine[Any, Any, None]], None]
Handler = Callable[["Conn"], Awaitable[None]]

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
# A hang guard only: a healthy test finishes in milliseconds.
GUARD_S = 5.0


@dataclass
class Request:
    """One request as the server read it off the wire; header names lower-cased."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def values(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]


@dataclass
class Conn:
    """One accepted connection, as the scripted server sees it."""

    index: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    requests: list[Request] = field(default_factory=list)
    # Set once the server has read end-of-stream: the client closed (or reset) this connection.
    eof: asyncio.Event = field(default_factory=asyncio.Event)

    async def request(self) -> Request | None:
        """The next request, or None once the client has closed the connection."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.eof.set()
            return None
        lines = head[:-4].split(b"\r\n")
        method, target, _ = lines[0].split(b" ", 2)
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower(), value.strip()))
        length = sum(int(v) for n, v in headers if n == b"content-length")
        body = await self.reader.readexactly(length)
        request = Request(method, target, headers, body)
        self.requests.append(request)
        return request

    async def send(self, *parts: bytes) -> None:
        """Each part in its own write, drained before the next."""
        for part in parts:
            self.writer.write(part)
            await self.writer.drain()

    async def until_eof(self) -> None:
        """Wait for the client to close this connection, discarding anything it sends."""
        try:
            while await self.reader.read(65536):
                pass
        except ConnectionError:
            pass
        self.eof.set()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()

    async def answer_all(self, response: bytes = OK) -> None:
        """Answer every request on this connection the same way until the client closes it."""
        while await self.request() is not None:
            await self.send(response)


class Server:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.conns: list[Conn] = []
        self.errors: list[BaseException] = []
        self.tasks: set[asyncio.Task[Any]] = set()

    @property
    def requests(self) -> list[Request]:
        return [r for c in self.conns for r in c.requests]

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        conn = Conn(len(self.conns), reader, writer)
        self.conns.append(conn)
        try:
            await self.handler(conn)
        except (ConnectionError, asyncio.IncompleteReadError):
            conn.eof.set()
        except asyncio.CancelledError:
            pass  # torn down at the end of the test; asyncio logs a cancelled handler task as an error
        except Exception as e:
            self.errors.append(e)
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[tuple[Server, ConnectionPool]]:
    """A scripted server and a client pointed at it; both torn down on exit."""
    server = Server(handler)
    listener = await asyncio.start_server(server.accept, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    upstream = ConnectionPool(f"http://127.0.0.1:{port}")
    try:
        yield server, upstream
    finally:
        await upstream.close()
        listener.close()
        for task in server.tasks:
            task.cancel()
        await asyncio.gather(*server.tasks, return_exceptions=True)
        await listener.wait_closed()
    assert not server.errors, server.errors


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def _run(scenario: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(asyncio.wait_for(scenario, GUARD_S))

    return _run


async def read_all(response: ModelResponse) -> bytes:
    parts = []
    while chunk := await response.read():
        parts.append(chunk)
    return b"".join(parts)


async def get(upstream: ConnectionPool, target: bytes = b"/") -> bytes:
    response = await upstream.request(b"GET", target, [], b"")
    assert response.status == 200
    body = await read_all(response)
    assert response.complete
    response.close()
    return body


async def upstream_error(call: Awaitable[Any]) -> Fault:
    with pytest.raises(UpstreamError) as raised:
        await call
    return raised.value.fault


# -- keep-alive and connection reuse ---------------------------------------------------------------


def test_sequential_requests_reuse_one_connection(run: Run) -> None:
    async def scenario() -> None:
        async with serving(Conn.answer_all) as (server, upstream):
            for i in range(5):
                assert await get(upstream, b"/r%d" % i) == b"ok"
            assert len(server.conns) == 1
            assert [r.target for r in server.requests] == [b"/r%d" % i for i in range(5)]

    run(scenario())


def test_connection_closed_while_idle_is_replaced(run: Run) -> None:
    closed = asyncio.Event()

    async def handler(conn: Conn) -> None:
        if conn.index == 0:
            await conn.request()
            await conn.send(OK)
            await conn.close()  # an idle timeout on the model's side, no Connection: close
            closed.set()
        else:
            await conn.answer_all()

    async def scenario() -> None:
        async with serving(handler) as (server, upstream):
            assert await get(upstream) == b"ok"
            await closed.wait()
            await asyncio.sleep(0.1)  # let the client's loop see the FIN
            # A POST is never retried, so this succeeds only if the dead connection was not picked.
            response = await upstream.request(b"POST", b"/invocations", [], b"{}")
            assert response.status == 200
            assert await read_all(response) == b"ok"
            assert len(server.conns) == 2
            assert [len(c.requests) for c in server.conns] == [1, 1]

    run(scenario())


async def answer_once_then_drop(conn: Conn) -> None:
    """Answer the first request; on a reused connection, read the next one and close without a word."""
    if await conn.request() is None:
        return
    await conn.send(OK)
    if await conn.request() is None:
        return
    await conn.close()


def test_get_on_a_reused_connection_that_dies_is_retried_on_a_fresh_one(run: Run) -> None:
    async def scenario() -> None:
        async with serving(answer_once_then_drop) as (server, upstream):
            assert await get(upstream, b"/first") == b"ok"
            assert await get(upstream, b"/second") == b"ok"
            assert len(server.conns) == 2
            assert [[r.target for r in c.requests] for c in server.conns] == [[b"/first", b"/second"], [b"/second"]]

    run(scenario())


def test_get_retry_goes_to_a_fresh_connection_not_another_idle_one(run: Run) -> None:
    async def scenario() -> None:
        async with serving(answer_once_then_drop) as (server, upstream):
            # Two concurrent requests leave two idle connections in the pool.
            assert await asyncio.gather(get(upstream, b"/a"), get(upstream, b"/b")) == [b"ok", b"ok"]
            assert len(server.conns) == 2
            # Both idle connections now die on their next request (a model restart, an idle sweep).
            # One retry is allowed, and it must not land on another connection of the same age.
            assert await get(upstream, b"/c") == b"ok"
            assert len(server.conns) == 3
            assert server.conns[2].requests[0].target == b"/c"

    run(scenario())


def test_post_on_a_reused_connection_that_dies_is_not_retried(run: Run) -> None:
    async def scenario() -> None:
        async with serving(answer_once_then_drop) as (server, upstream):
            assert await get(upstream, b"/first") == b"ok"
            fault = await upstream_error(upstream.request(b"POST", b"/invocations", [], b'{"x": 1}'))
            assert fault is Fault.UPSTREAM_RESET
            assert len(server.conns) == 1
            posts = [r for r in server.requests if r.method == b"POST"]
            assert len(posts) == 1
            assert posts[0].body == b'{"x": 1}'

    run(scenario())


# -- response bodies ----------------------------------------------------------------------------------


def test_content_length_body_in_the_same_write_as_the_head(run: Run) -> None:
    async def handler(conn: Conn) -> None:
        await conn.answer_all(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-Model-Name: Iris\r\n\r\nhello world")

    async def scenario() -> None:
        async with serving(handler) as (server, upstream):
            response = await upstream.request(b"GET", b"/", [], b"")
            assert response.status == 200
            assert response.headers == [(b"content-length", b"11"), (b"x-model-name", b"Iris")]
            assert response.complete
            assert not response.streamed
            assert response.take_buffered() == b"hello world"
            assert await response.read() == b""
            response.close()
            assert await get(upstream) == b"hello world"
            assert len(server.conns) == 1

    run(scenario())


def test_content_length_body_in_separate_writes(run: Run) -> None:
    got = asyncio.Event()

    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", b"01234")
        await got.wait()
        await conn.send(b"56789")
        await conn.answer_all()

    async def scenario() -> None:
        async with serving(handler) as (server, upstream):
            response = await upstream.request(b"GET", b"/", [], b"")
            assert not response.streamed
            first = b""
            while len(first) < 5:
                first += await response.read()
            assert first == b"01234"
            assert not response.complete
            got.set()
            assert await read_all(response) == b"56789"
            assert response.complete
            assert await get(upstream) == b"ok"
            assert len(server.conns) == 1

    run(scenario())


def test_chunked_body_arrives_chunk_by_chunk(run: Run) -> None:
    chunks = [b"hello ", b"streaming ", b"world"]
    turn = asyncio.Queue[None]()

    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for chunk in chunks:
            await turn.get()  # the client has consumed the previous chunk
            await conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        await turn.get()
        await conn.send(b"0\r\n\r\n")
        await conn.answer_all()

    async def scenario() -> None:
        async with serving(handler) as (server, upstream):
            response = await upstream.request(b"GET", b"/stream", [], b"")
            assert response.status == 200
            assert response.streamed
            assert not response.complete
            for chunk in chunks:
                turn.put_nowait(None)
                got = b""
                while len(got) < len(chunk):
                    got += await response.read()
                assert got == chunk
                assert not response.complete
            turn.put_nowait(None)
            assert await response.read() == b""
            assert response.complete
            response.close()
            assert await get(upstream) == b"ok"
            assert len(server.conns) == 1

    run(scenario())


def test_body_delimited_by_close(run: Run) -> None:
    got = asyncio.Event()

    async def handler(conn: Conn) -> None:
        if conn.index == 0:
            await conn.request()
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n", b"first part, ")
            await got.wait()
            await conn.send(b"second part")
            await conn.close()
        else:
            await conn.answer_all()

    async def scenario() -> None:
        async with serving(handler) as (server, upstream):
            response = await upstream.request(b"GET", b"/", [], b"")
            assert response.status == 200
            assert response.streamed
            assert not response.complete
            body = await response.read()
            assert not response.complete
            got.set()
            body += await read_all(response)
            assert body == b"first part, second part"
            assert response.complete
            response.close()
            assert await get(upstream) == b"ok"
            assert len(server.conns) == 2
            assert [len(c.requests) for c in server.conns] == [1, 1]

    run(scenario())


# -- request bodies -------------------------------------------------------------------------------------


def test_request_body_carries_its_content_length(run: Run) -> None:
    async def scenario() -> None:
        async with serving(Conn.answer_all) as (server, upstream):
            headers = [(b"host", b"model"), (b"content-type", b"application/json")]
            response = await upstream.request(b"POST", b"/invocations", headers, b'{"instances": [1]}')
            assert await read_all(response) == b"ok"
            empty = await upstream.request(b"POST", b"/invocations", [], b"")
            assert await read_all(empty) == b"ok"
            first, second = server.requests
            assert first.method == b"POST" and first.target == b"/invocations"
            assert first.values(b"content-length") == [b"%d" % len(b'{"instances": [1]}')]
            assert first.values(b"host") == [b"model"]
            assert first.values(b"content-type") == [b"application/json"]
            assert first.body == b'{"instances": [1]}'
            # A POST without a body still says so, or the model would wait for one.
            assert second.values(b"content-length") == [b"0"]
            assert second.body == b""
            assert len(server.conns) == 1

    run(scenario())


def test_one_mebibyte_request_body_arrives_intact(run: Run) -> None:
    body = bytes(range(256)) * 4096 + b"tail"

    async def scenario() -> None:
        async with serving(Conn.answer_all) as (server, upstream):
            response = await upstream.request(b"PUT", b"/upload", [], body)
            assert await read_all(response) == b"ok"
            (request,) = server.requests
            assert request.values(b"content-length") == [b"%d" % len(body)]
            assert request.body == body
            assert await get(upstream) == b"ok"
            assert len(server.conns) == 1

    run(scenario())


def test_get_without_body_sends_no_content_length(run: Run) -> None:
    async def scenario() -> None:
        async with serving(Conn.answer_all) as (server, upstream):
            assert await get(upstream, b"/ping") == b"ok"
            (request,) = server.requests
            assert request.method == b"GET"
            assert request.values(b"content-length") == []
            assert request.values(b"transfer-encoding") == []

    run(scenario())


# -- responses without a body ------------------------------------------------------------------------


def test_head_response_has_no_body_and_the_connection_is_reused(run: Run) -> None:
    async def handler(conn: Conn) -> None:
        while (request := await conn.request()) is not None:
            if request.method == b"HEAD":
                await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nContent-Type: text/plain\r\n\r\n")
            else:
                await conn.send(OK)

    async def scenario() -> None:
        async with serving(handler) as (server, upstream):
            response = await upstream.request(b"HEAD", b"/", [], b"")
            assert response.status == 200
            assert (b"content-length", b"1000") in response.headers
            assert response.complete
            assert await response.read() == b""
            response.close()
            assert await get(upstream) == b"ok"
            head_again = await upstream.request(b"HEAD", b"/", [], b"")
            assert head_again.complete and await head_again.read() == b""
            assert await get(upstream) == b"ok"
            assert len(server.conns) == 1
            assert [r.method for r in server.requests] == [b"HEAD", b"GET", b"HEAD", b"GET"]

    run(scenario())


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n',
        # A 304 may carry the length of the representation it stands for; there is still no body.
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\n\r\n",
    ],
    ids=["204", "304", "304-with-length"],
)
def test_no_body_statuses_complete_at_once_and_reuse(run: Run, head: bytes) -> None:
    status = int(head.split(b" ")[1])

    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(head)
        await conn.answer_all()

    async def scenario() -> None:
        async with serving(handler) as (server, upstream):
            response = await upstream.request(b"GET", b"/", [], b"")
            assert response.status == status
            assert response.complete
            assert await response.read() == b""
            response.close()
            assert await get(upstream) == b"ok"
            assert len(server.conns) == 1

    run(scenario())


# -- interim responses ----------------------------------------------------------------------------------

INTERIM = [
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Final: yes\r\n\r\nhello",
]


@pytest.mark.parametrize("split", [True, False], ids=["separate-writes", "one-write"])
def test_interim_responses_are_skipped(run: Run, split: bool) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(*INTERIM) if split else await conn.send(b"".join(INTERIM))
        await conn.answer_all()

    async def scenario() -> None:
        async with serving(handler) as (server, upstream):
            response = await upstream.request(b"POST", b"/invocations", [], b"{}")
            assert response.status == 200
            assert response.headers == [(b"content-length", b"5"), (b"x-final", b"yes")]
            assert await read_all(response) == b"hello"
            assert response.complete
            response.close()
            assert await get(upstream) == b"ok"
            assert len(server.conns) == 1

    run(scenario())


# -- Connection: close --------------------------------------------------------------------------------


def test_connection_close_response_is_read_fully_and_not_reused(run: Run) -> None:
    async def handler(conn: Conn) -> None:
        if conn.index == 0:
            await conn.request()
            # The server says close but leaves the socket open: only the client's decision is tested.
            await conn.send(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 4\r\n\r\n", b"done")
            await conn.until_eof()
        else:
            await conn.answer_all()

    async def scenario() -> None:
        async with serving(handler) as (server, upstream):
            response = await upstream.request(b"GET", b"/", [], b"")
            assert await read_all(response) == b"done"
            assert response.complete
            response.close()
            await server.conns[0].eof.wait()
            assert await get(upstream) == b"ok"
            assert len(server.conns) == 2
            assert [len(c.requests) for c in server.conns] == [1, 1]

    run(scenario())


# -- malformed and failed responses ---------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        b"THIS IS NOT HTTP\r\n\r\n",
        b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 100_000 + b"\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 40) for i in range(2000)) + b"Content-Length: 0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    ],
    ids=["garbage", "bad-status", "one-100k-header", "many-headers-100k", "101-switch", "conflicting-lengths"],
)
def test_malformed_response_head(run: Run, reply: bytes) -> None:
    async def handler(conn: Conn) -> None:
        if conn.index == 0:
            await conn.request()
            await conn.send(reply)
            await conn.until_eof()
        else:
            await conn.answer_all()

    async def scenario() -> None:
        async with serving(handler) as (server, upstream):
            fault = await upstream_error(upstream.request(b"GET", b"/", [], b""))
            assert fault is Fault.UPSTREAM_MALFORMED
            await server.conns[0].eof.wait()  # the client dropped the connection
            assert await get(upstream) == b"ok"
            assert len(server.conns) == 2

    run(scenario())


def test_oversized_head_fails_before_it_is_complete(run: Run) -> None:
    # A model that streams an endless header must not be buffered without bound.
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nX-Endless: ", b"a" * 200_000)
        await conn.until_eof()

    async def scenario() -> None:
        async with serving(handler) as (server, upstream):
            try:
                fault = await upstream_error(asyncio.wait_for(upstream.request(b"GET", b"/", [], b""), 1.0))
            except TimeoutError:
                pytest.fail("200 KB of one unfinished header did not fail the request (MAX_HEAD_BYTES is 64 KiB)")
            assert fault is Fault.UPSTREAM_MALFORMED
            await server.conns[0].eof.wait()

    run(scenario())


def test_malformed_chunked_body_fails_the_read(run: Run) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n")
        await conn.until_eof()

    async def scenario() -> None:
        async with serving(handler) as (server, upstream):
            response = await upstream.request(b"GET", b"/", [], b"")
            assert response.status == 200
            with pytest.raises(UpstreamError) as raised:
                await read_all(response)
            assert raised.value.fault is Fault.UPSTREAM_MALFORMED
            await server.conns[0].eof.wait()

    run(scenario())


@pytest.mark.parametrize(
    "reply",
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"x" * 50),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"32\r\n" + b"x" * 50 + b"\r\n"),
    ],
    ids=["content-length", "chunked"],
)
def test_truncated_body_raises_reset(run: Run, reply: tuple[bytes, bytes]) -> None:
    async def handler(conn: Conn) -> None:
        if conn.index == 0:
            await conn.request()
            await conn.send(*reply)
            await conn.close()
        else:
            await conn.answer_all()

    async def scenario() -> None:
        async with serving(handler) as (server, upstream):
            response = await upstream.request(b"GET", b"/", [], b"")
            assert response.status == 200
            received = b""
            with pytest.raises(UpstreamError) as raised:
                while True:
                    chunk = await response.read()
                    assert chunk, "a truncated body must not end like a complete one"
                    received += chunk
            assert raised.value.fault is Fault.UPSTREAM_RESET
            assert received == b"x" * 50
            assert not response.complete
            response.close()
            assert await get(upstream) == b"ok"
            assert len(server.conns) == 2

    run(scenario())


def test_connection_refused(run: Run) -> None:
    async def scenario() -> None:
        upstream = ConnectionPool(f"http://127.0.0.1:{free_port()}")  # nothing listens there
        fault = await upstream_error(upstream.request(b"GET", b"/ping", [], b""))
        assert fault is Fault.UPSTREAM_CONNECT
        await upstream.close()

    run(scenario())


def test_reset_before_any_answer_on_a_fresh_connection_is_not_retried(run: Run) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.close()

    async def scenario() -> None:
        async with serving(handler) as (server, upstream):
            fault = await upstream_error(upstream.request(b"GET", b"/", [], b""))
            assert fault is Fault.UPSTREAM_RESET
            # A fresh connection that dies says the model is failing, not that the pool was stale.
            assert len(server.conns) == 1

    run(scenario())


# -- flow control, cancellation and early close ----------------------------------------------------


def test_slow_reader_applies_backpressure_to_the_model(run: Run) -> None:
    size = 8 * 1024 * 1024
    piece = 64 * 1024
    body = bytes(range(256)) * (size // 256)
    pushed = 0
    transports: list[asyncio.WriteTransport] = []

    async def handler(conn: Conn) -> None:
        nonlocal pushed
        await conn.request()
        # A fixed small send buffer: the kernel's autotuned one could swallow megabytes.
        conn.writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        transports.append(conn.writer.transport)
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for start in range(0, size, piece):
            await conn.send(body[start : start + piece])
            pushed += piece
        await conn.answer_all()

    async def scenario() -> None:
        async with serving(handler) as (server, upstream):
            response = await upstream.request(b"GET", b"/big", [], b"")
            assert response.status == 200
            # Read nothing until the model stops making progress.
            last = -1
            for _ in range(40):
                if pushed == last:
                    break
                last = pushed
                await asyncio.sleep(0.05)
            assert pushed == last, "the model never stalled against a client that reads nothing"
            assert pushed < size // 2
            assert transports[0].get_write_buffer_size() > 0  # the model is blocked in drain()
            first = response.take_buffered()
            assert 0 < len(first) < 1024 * 1024  # the client held back, it did not buffer the body
            received = first + await read_all(response)
            assert len(received) == size
            assert received == body
            assert response.complete
            response.close()
            assert await get(upstream) == b"ok"
            assert len(server.conns) == 1

    run(scenario())


def test_cancelled_request_closes_its_connection(run: Run) -> None:
    waiting = asyncio.Event()

    async def handler(conn: Conn) -> None:
        if conn.index == 0:
            await conn.request()
            await conn.send(OK)
            await conn.request()  # on the reused connection: never answered
            waiting.set()
            await conn.until_eof()
        else:
            await conn.answer_all()

    async def scenario() -> None:
        async with serving(handler) as (server, upstream):
            assert await get(upstream) == b"ok"
            task = asyncio.create_task(upstream.request(b"POST", b"/invocations", [], b"{}"))
            await waiting.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await server.conns[0].eof.wait()  # the client closed it rather than keep it for reuse
            assert await get(upstream) == b"ok"
            assert len(server.conns) == 2
            assert [len(c.requests) for c in server.conns] == [2, 1]

    run(scenario())


@pytest.mark.parametrize(
    "reply",
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", b"y" * 100),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"64\r\n" + b"y" * 100 + b"\r\n"),
    ],
    ids=["content-length", "chunked"],
)
def test_closing_a_response_mid_body_closes_its_connection(run: Run, reply: tuple[bytes, bytes]) -> None:
    async def handler(conn: Conn) -> None:
        if conn.index == 0:
            await conn.request()
            await conn.send(*reply)
            await conn.until_eof()
        else:
            await conn.answer_all()

    async def scenario() -> None:
        async with serving(handler) as (server, upstream):
            response = await upstream.request(b"GET", b"/", [], b"")
            received = b""
            while len(received) < 100:
                received += await response.read()
            assert received == b"y" * 100
            assert not response.complete
            response.close()
            await server.conns[0].eof.wait()
            assert await get(upstream) == b"ok"
            assert len(server.conns) == 2

    run(scenario())
