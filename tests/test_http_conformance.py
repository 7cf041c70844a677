"""HTTP/1.1 conformance of the proxy port, the same raw-socket cases against both servers.

``--http-server builtin`` (proxy/http/server.py) and ``--http-server uvicorn`` get the same bytes. Each case asserts
the exact responses (parsed here from the raw bytes: status, framing, order), whether the connection is closed
afterwards, what the model received (tests/recording_model.py records every request), and the counters on
/metrics. Where the servers legitimately differ (the builtin server has limits uvicorn lacks, or uvicorn is
wrong), each server's own answer is asserted, with a comment saying why; a uvicorn behaviour that is broken
and not worth asserting (it hangs) is a strict xfail.

After every case a fresh connection must still be served (``finish``).
"""

from __future__ import annotations

import resource
import selectors
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from proxy.errors import REJECT_REASONS
from tests.conftest import Proxy, Running
from tests.rawhttp import CLIENTS as _CLIENTS
from tests.rawhttp import Client, Response, get, post

pytestmark = pytest.mark.e2e

SERVERS = ["builtin", "uvicorn"]
# Short front-door timeouts so that the timeout cases are fast; a case that needs longer ones passes its own after these.
HEAD_TIMEOUT = BODY_TIMEOUT = 0.5
KEEP_ALIVE = 1.0
FAST = (
    "--request-head-timeout", str(HEAD_TIMEOUT), "--request-body-timeout", str(BODY_TIMEOUT), "--keep-alive-timeout", str(KEEP_ALIVE)
)
FRESH = b'{"fresh": true}'


def assert_took(started: float, timeout: float) -> None:
    """A timeout fired on time: not early, and not much later."""
    took = time.monotonic() - started
    assert timeout * 0.9 < took < timeout + 2.0, f"took {took:.2f} s for a {timeout} s timeout"


def uvicorn_xfail(reason: str) -> list[Any]:
    """Both servers, with uvicorn's run a strict xfail: what uvicorn does there is broken, not worth asserting."""
    return ["builtin", pytest.param("uvicorn", marks=pytest.mark.xfail(strict=True, reason=reason))]


# -- the model -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """One request as the model received it."""

    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n.lower() == name]
        assert len(values) <= 1, f"{name} sent {len(values)} times to the model: {self}"
        return values[0] if values else None

    @property
    def request(self) -> tuple[str, str, bytes]:
        return self.method, self.target, self.body


class Model:
    def __init__(self, running: Running) -> None:
        self.running = running
        self.url = running.url

    def reset(self) -> None:
        assert httpx.post(f"{self.url}/__reset").status_code == 200

    def received(self) -> list[Seen]:
        return [
            Seen(r["method"], r["target"], r["version"], tuple((n, v) for n, v in r["headers"]), r["body"].encode("latin-1"))
            for r in httpx.get(f"{self.url}/__received").json()
        ]


@pytest.fixture
def model(recording_model: Running) -> Model:
    """Here, the recording model (conftest's ``model``, the example model, is not used), emptied for the test."""
    m = Model(recording_model)
    m.reset()
    return m


# -- the proxy -----------------------------------------------------------------------------------------


@pytest.fixture
def serve(start_proxy: Callable[..., Proxy], model: Model) -> Iterator[Callable[..., Proxy]]:
    """``serve(server, *flags)``: a proxy in front of the recording model, with FAST timeouts unless flags override them."""

    started: list[Proxy] = []

    def _serve(server: str, *flags: str) -> Proxy:
        proxy = start_proxy(model.url, "--http-server", server, *FAST, *flags)
        started.append(proxy)
        return proxy

    yield _serve
    for c in _CLIENTS:
        c.close()
    for proxy in started:  # its graceful shutdown is not under test here, and costs a third of a second
        proxy.proc.kill()
        proxy.proc.wait()


def counts(proxy: Proxy) -> dict[str, float]:
    """What ``proxy.value`` reads, from one scrape."""
    samples = proxy.samples()
    variant = {"endpoint_name": "test-endpoint", "variant_name": "AllTraffic"}
    out = {"invocations": samples[("sagemaker_invocations_total", frozenset(variant.items()))]}
    for reason in REJECT_REASONS:
        out[reason] = samples[("sagemaker_proxy_rejected_requests_total", frozenset({**variant, "reason": reason}.items()))]
    return out


def assert_counts(proxy: Proxy, invocations: int, **rejected: int) -> None:
    """sagemaker_invocations_total and every reason of sagemaker_proxy_rejected_requests_total; those not named are 0."""
    want: dict[str, float] = {"invocations": invocations, **dict.fromkeys(REJECT_REASONS, 0)}
    assert set(rejected) <= set(REJECT_REASONS), rejected
    want.update(rejected)
    deadline = time.monotonic() + 2  # a refusal may be counted just after the connection closes
    got = counts(proxy)
    while got != want and time.monotonic() < deadline:
        time.sleep(0.05)
        got = counts(proxy)
    assert {k: v for k, v in got.items() if v or want[k]} == {k: v for k, v in want.items() if v or got[k]}


# -- a raw client ----------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def transcripts() -> Iterator[None]:
    """Print every raw exchange of the test: shown by pytest when it fails."""
    _CLIENTS.clear()
    yield
    for i, c in enumerate(_CLIENTS):
        print(f"--- connection {i}\n{c.transcript()}")
        c.close()
    _CLIENTS.clear()


def assert_ok(r: Response, c: Client, target: str = "/invocations") -> None:
    assert r.status == 200, c.transcript()
    assert r.json()["target"] == target, c.transcript()


def assert_refusal(r: Response, c: Client, status: int) -> None:
    """The builtin server's refusals: a short JSON error with Content-Length and Connection: close, then the close."""
    assert r.status == status, c.transcript()
    assert r.header(b"content-type") == b"application/json", c.transcript()
    assert r.header(b"content-length") == b"%d" % len(r.body), c.transcript()
    assert set(r.json()) == {"error"}, c.transcript()
    assert b"close" in r.tokens(b"connection"), c.transcript()
    assert c.closed(), c.transcript()
    assert c.unread == b"", c.transcript()


def assert_uvicorn_400(r: Response, c: Client) -> None:
    """uvicorn answers parse errors itself (text/plain), before the app sees a request: nothing is counted."""
    assert r.status == 400, c.transcript()
    assert r.body == b"Invalid HTTP request received.", c.transcript()
    assert b"close" in r.tokens(b"connection"), c.transcript()
    assert c.closed(), c.transcript()


def finish(proxy: Proxy, model: Model, forwarded: list[tuple[str, str, bytes]], invocations: int, **rejected: int) -> None:
    """A fresh connection is still served; the model received exactly ``forwarded`` (then the fresh request);
    the counters are exact, the fresh invocation included."""
    c = Client(proxy.port)
    c.send(post(FRESH))
    assert_ok(c.response(), c)
    seen = model.received()
    assert [s.request for s in seen] == [*forwarded, ("POST", "/invocations", FRESH)]
    for s in seen:
        if s.body:  # bodies reach the model with their Content-Length, whatever the client's framing
            assert s.header("content-length") == str(len(s.body)), s
            assert s.header("transfer-encoding") is None, s
    assert_counts(proxy, invocations + 1, **rejected)


# -- keep-alive and connection management ----------------------------------------------------------------


@pytest.mark.parametrize("server", SERVERS)
def test_keep_alive_serves_several_requests_on_one_connection(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    proxy = serve(server)
    c = Client(proxy.port)
    bodies = [b'{"n": %d}' % i for i in range(3)]
    for i, body in enumerate(bodies):
        c.send(post(body))
        r = c.response()
        assert_ok(r, c)
        assert r.json()["seq"] == i + 1 and r.json()["body_bytes"] == len(body)
        assert b"close" not in r.tokens(b"connection"), c.transcript()
    assert not c.closed(0.1) and c.unread == b""
    finish(proxy, model, [("POST", "/invocations", b) for b in bodies], invocations=3)


@pytest.mark.parametrize("server", SERVERS)
def test_connection_close_is_answered_with_close_and_closed(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    proxy = serve(server)
    c = Client(proxy.port)
    c.send(post(headers=b"Connection: close\r\n"))
    r = c.response()
    assert_ok(r, c)
    assert b"close" in r.tokens(b"connection"), c.transcript()
    assert c.closed() and c.unread == b"", c.transcript()
    finish(proxy, model, [("POST", "/invocations", b'{"x": 1}')], invocations=1)


@pytest.mark.parametrize("server", SERVERS)
def test_http10_without_keep_alive_is_closed_after_the_response(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    proxy = serve(server)
    c = Client(proxy.port)
    c.send(post(version=b"HTTP/1.0"))
    assert_ok(c.response(), c)
    assert c.closed() and c.unread == b"", c.transcript()
    finish(proxy, model, [("POST", "/invocations", b'{"x": 1}')], invocations=1)


@pytest.mark.parametrize("server", SERVERS)
def test_http10_with_keep_alive_is_kept_open(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    proxy = serve(server)
    c = Client(proxy.port)
    c.send(post(b'{"n": 1}', version=b"HTTP/1.0", headers=b"Connection: keep-alive\r\n"))
    r = c.response()
    assert_ok(r, c)
    assert r.header(b"content-length") is not None, c.transcript()  # an HTTP/1.0 client needs it to find the end
    forwarded = [("POST", "/invocations", b'{"n": 1}')]
    if server == "uvicorn":
        # uvicorn never keeps an HTTP/1.0 connection alive, Connection: keep-alive or not (allowed, not wrong).
        assert b"close" in r.tokens(b"connection") and c.closed(), c.transcript()
    else:
        assert b"close" not in r.tokens(b"connection"), c.transcript()
        assert not c.closed(0.1), c.transcript()
        c.send(post(b'{"n": 2}', version=b"HTTP/1.0", headers=b"Connection: keep-alive\r\n"))
        assert_ok(c.response(), c)
        forwarded.append(("POST", "/invocations", b'{"n": 2}'))
    finish(proxy, model, forwarded, invocations=len(forwarded))


@pytest.mark.parametrize("server", SERVERS)
def test_idle_keep_alive_connection_is_closed_silently_after_the_keep_alive_timeout(
    serve: Callable[..., Proxy], model: Model, server: str
) -> None:
    # The keep-alive timeout is longer than the head timeout: the idle connection must outlive the latter.
    proxy = serve(server)
    c = Client(proxy.port)
    c.send(post())
    assert_ok(c.response(), c)
    idle_from = time.monotonic()
    assert not c.closed(HEAD_TIMEOUT + 0.25), f"closed after {time.monotonic() - idle_from:.2f} s idle\n{c.transcript()}"
    assert c.closed(KEEP_ALIVE + 1), c.transcript()
    assert c.unread == b"" and not c.reset, c.transcript()
    assert_took(idle_from, KEEP_ALIVE)
    finish(proxy, model, [("POST", "/invocations", b'{"x": 1}')], invocations=1)  # nothing counted for it


@pytest.mark.parametrize("server", uvicorn_xfail("uvicorn closes the connection at the client's FIN and drops the response"))
@pytest.mark.parametrize("version", [b"HTTP/1.1", b"HTTP/1.0"])
def test_client_half_close_after_a_complete_request_still_gets_the_response(
    serve: Callable[..., Proxy], model: Model, server: str, version: bytes
) -> None:
    proxy = serve(server)
    c = Client(proxy.port)
    c.send(post(headers=b"X-Respond: slow=100\r\n", version=version))  # the FIN arrives while the model works
    c.shutdown_write()
    r = c.response()
    if server == "builtin" and version == b"HTTP/1.1":
        # The builtin server's probe, to tell a half-close from a close: an interim 100 Continue, which a closed
        # socket answers with a reset. Allowed: an HTTP/1.1 client must parse 1xx it did not ask for (RFC 9110 15.2).
        assert r.status == 100, c.transcript()
        r = c.response()
    assert_ok(r, c)
    assert c.closed() and c.unread == b"", c.transcript()
    finish(proxy, model, [("POST", "/invocations", b'{"x": 1}')], invocations=1)


@pytest.mark.parametrize("server", SERVERS)
def test_connections_over_max_connections_are_closed_at_once(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    proxy = serve(server, "--max-connections", "3", "--keep-alive-timeout", "10", "--request-head-timeout", "10")
    held = [Client(proxy.port) for _ in range(3)]
    forwarded = []
    for i, c in enumerate(held):
        c.send(post(b'{"held": %d}' % i))
        assert_ok(c.response(), c)
        forwarded.append(("POST", "/invocations", b'{"held": %d}' % i))
    extra = Client(proxy.port)
    if server == "builtin":
        started = time.monotonic()
        assert extra.closed(1.0), extra.transcript()
        assert extra.unread == b"" and time.monotonic() - started < 0.5, extra.transcript()
        rejected = {"too_many_connections": 1}
    else:
        # uvicorn has no connection limit: the fourth connection is served.
        extra.send(post(b'{"extra": 1}'))
        assert_ok(extra.response(), extra)
        forwarded.append(("POST", "/invocations", b'{"extra": 1}'))
        extra.close()
        rejected = {}
    # The connections already open keep being served.
    for i, c in enumerate(held):
        c.send(post(b'{"again": %d}' % i))
        assert_ok(c.response(), c)
        forwarded.append(("POST", "/invocations", b'{"again": %d}' % i))
    held[0].close()  # room for one again: the fresh connection of finish()
    time.sleep(0.1)
    finish(proxy, model, forwarded, invocations=len(forwarded), **rejected)


@pytest.mark.parametrize("server", SERVERS)
def test_connection_slots_are_freed_by_every_kind_of_close(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    """With --max-connections 2, connections closed every way (head timeout, refusal, Connection: close, the
    client) give their slot back: two held connections are served after all that, and a third is refused."""
    proxy = serve(server, "--max-connections", "2", "--keep-alive-timeout", "10")
    idle = [Client(proxy.port) for _ in range(2)]
    for c in idle:
        if server == "builtin":
            assert c.closed(HEAD_TIMEOUT + 2.0) and c.unread == b"", c.transcript()  # the head timeout
        else:
            c.close()  # uvicorn has no head timeout
    forwarded = []
    for i in range(2):
        bad = Client(proxy.port)
        bad.send(MALFORMED["bare_lf_line_endings"])
        assert bad.response().status == 400 and bad.closed(), bad.transcript()
        closing = Client(proxy.port)
        closing.send(post(b'{"close": %d}' % i, headers=b"Connection: close\r\n"))
        assert_ok(closing.response(), closing)
        assert closing.closed(), closing.transcript()
        leaving = Client(proxy.port)
        leaving.send(post(b'{"leave": %d}' % i))
        assert_ok(leaving.response(), leaving)
        leaving.close()
        forwarded += [("POST", "/invocations", b'{"close": %d}' % i), ("POST", "/invocations", b'{"leave": %d}' % i)]
    time.sleep(0.1)  # the server sees the clients' closes
    held = [Client(proxy.port) for _ in range(2)]
    for i, c in enumerate(held):
        c.send(post(b'{"held": %d}' % i))
        assert_ok(c.response(), c)
        forwarded.append(("POST", "/invocations", b'{"held": %d}' % i))
    third = Client(proxy.port)
    if server == "builtin":
        assert third.closed(1.0) and third.unread == b"", third.transcript()
        rejected = {"idle_connection": 2, "malformed_request": 2, "too_many_connections": 1}
    else:
        # uvicorn has no connection limit (nor head timeout: the test closed its idle ones); its 400s are not counted.
        third.send(post(b'{"third": 1}'))
        assert_ok(third.response(), third)
        forwarded.append(("POST", "/invocations", b'{"third": 1}'))
        third.close()
        rejected = {}
    held[0].close()
    time.sleep(0.1)
    finish(proxy, model, forwarded, invocations=len(forwarded), **rejected)


# -- timeouts ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("server", uvicorn_xfail("uvicorn has no head timeout: a connection that sends nothing stays open"))
def test_new_connection_sending_nothing_is_closed_silently_after_the_head_timeout(
    serve: Callable[..., Proxy], model: Model, server: str
) -> None:
    proxy = serve(server, "--keep-alive-timeout", "5")
    c = Client(proxy.port)
    opened = time.monotonic()
    assert c.closed(HEAD_TIMEOUT + 2.0), c.transcript()
    assert c.unread == b"", c.transcript()
    assert_took(opened, HEAD_TIMEOUT)
    finish(proxy, model, [], invocations=0, idle_connection=1)  # no request was refused: it sent none


@pytest.mark.parametrize("server", uvicorn_xfail("uvicorn has no head timeout: a half-sent head holds the connection forever"))
def test_half_sent_head_gets_408_after_the_head_timeout(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    proxy = serve(server, "--keep-alive-timeout", "5")
    c = Client(proxy.port)
    c.send(b"POST /invocations HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\n")
    sent = time.monotonic()
    r = c.response(timeout=HEAD_TIMEOUT + 2.0)
    assert_took(sent, HEAD_TIMEOUT)
    assert_refusal(r, c, 408)
    finish(proxy, model, [], invocations=0, head_timeout=1)


@pytest.mark.parametrize("server", uvicorn_xfail("uvicorn has no head timeout: a half-sent head holds the connection forever"))
def test_head_timeout_counts_from_the_first_byte_on_a_kept_alive_connection(
    serve: Callable[..., Proxy], model: Model, server: str
) -> None:
    proxy = serve(server, "--keep-alive-timeout", "5")
    c = Client(proxy.port)
    c.send(post())
    assert_ok(c.response(), c)
    time.sleep(HEAD_TIMEOUT + 0.2)  # idle: the keep-alive timeout, not the head timeout, applies until the next head starts
    c.send(b"POST /invocations HTTP/1.1\r\nHost: te")
    sent = time.monotonic()
    r = c.response(timeout=HEAD_TIMEOUT + 2.0)
    assert_took(sent, HEAD_TIMEOUT)
    assert_refusal(r, c, 408)
    finish(proxy, model, [("POST", "/invocations", b'{"x": 1}')], invocations=1, head_timeout=1)


@pytest.mark.parametrize("server", uvicorn_xfail("uvicorn has no body timeout: a stalled body holds the request forever"))
@pytest.mark.parametrize(
    "start",
    [
        b"POST /invocations HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n" + b"x" * 10,
        b"POST /invocations HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n64\r\n" + b"x" * 10,
    ],
    ids=["content_length", "chunked"],
)
def test_stalled_body_gets_408_and_never_reaches_the_model(
    serve: Callable[..., Proxy], model: Model, server: str, start: bytes
) -> None:
    proxy = serve(server)
    c = Client(proxy.port)
    c.send(start)
    sent = time.monotonic()
    r = c.response(timeout=BODY_TIMEOUT + 2.0)
    assert_took(sent, BODY_TIMEOUT)
    assert_refusal(r, c, 408)
    finish(proxy, model, [], invocations=0, body_timeout=1)


@pytest.mark.parametrize("server", SERVERS)
def test_slow_body_that_keeps_progressing_is_served(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    # Four pieces 0.3 s apart: 1.2 s in all, over the body timeout, but never that long without progress.
    proxy = serve(server)
    body = b'{"slow": "0123456789"}'
    c = Client(proxy.port)
    c.send(b"POST /invocations HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n" % len(body))
    for i in range(0, len(body), 6):
        time.sleep(0.3)
        c.send(body[i : i + 6])
    assert_ok(c.response(), c)
    finish(proxy, model, [("POST", "/invocations", body)], invocations=1)


# -- malformed requests -------------------------------------------------------------------------------------

MALFORMED = {
    "content_length_with_transfer_encoding": (
        b"POST /invocations HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ),
    "duplicate_content_length": b"POST /invocations HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}x",
    "non_numeric_content_length": b"POST /invocations HTTP/1.1\r\nHost: test\r\nContent-Length: 2x\r\n\r\n{}",
    "negative_content_length": b"POST /invocations HTTP/1.1\r\nHost: test\r\nContent-Length: -1\r\n\r\n{}",
    "bad_chunk_size": b"POST /invocations HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "bare_lf_line_endings": b"POST /invocations HTTP/1.1\nHost: test\nContent-Length: 2\n\n{}",
    "nul_in_header_value": b"POST /invocations HTTP/1.1\r\nHost: test\r\nX-Bad: a\x00b\r\nContent-Length: 2\r\n\r\n{}",
    "invalid_method": b"G(T /ping HTTP/1.1\r\nHost: test\r\n\r\n",
    "http09_request_line": b"GET /\r\n\r\n",
    "space_before_header_colon": b"POST /invocations HTTP/1.1\r\nHost: test\r\nContent-Length : 2\r\n\r\n{}",
    "bare_cr_in_header_value": b"POST /invocations HTTP/1.1\r\nHost: test\r\nX-Bad: a\rb\r\nContent-Length: 2\r\n\r\n{}",
    # RFC 9112 6.3: a request whose last transfer coding is not chunked has no reliable length.
    "transfer_encoding_not_chunked": b"POST /invocations HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: gzip\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "chunk_size_overflow": (
        b"POST /invocations HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\n{}\r\n0\r\n\r\n"
    ),
    "chunk_data_longer_than_its_size": (
        b"POST /invocations HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}XX\r\n0\r\n\r\n"
    ),
}


# Errors uvicorn's parser finds after the head, once the app has started: the app counts a client disconnect.
UVICORN_BODY_ERRORS = {"bad_chunk_size", "transfer_encoding_not_chunked", "chunk_size_overflow", "chunk_data_longer_than_its_size"}


@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_gets_400_and_close(serve: Callable[..., Proxy], model: Model, server: str, case: str) -> None:
    proxy = serve(server)
    c = Client(proxy.port)
    c.send(MALFORMED[case])
    r = c.response()
    if server == "builtin":
        assert_refusal(r, c, 400)
        finish(proxy, model, [], invocations=0, malformed_request=1)
    elif case == "http09_request_line":
        # uvicorn (llhttp) takes "GET /" for a request and forwards it: wrong, HTTP/0.9 is not HTTP/1.x.
        assert_ok(r, c, "/")
        assert c.closed(), c.transcript()
        finish(proxy, model, [("GET", "/", b"")], invocations=0)
    elif case in UVICORN_BODY_ERRORS:
        # uvicorn answers its own 400; the app, started at the end of the head, sees a disconnect instead.
        assert_uvicorn_400(r, c)
        finish(proxy, model, [], invocations=0, client_disconnect=1)
    else:
        assert_uvicorn_400(r, c)  # uvicorn's own 400: the app never sees the request, so it is not counted
        finish(proxy, model, [], invocations=0)


@pytest.mark.parametrize("server", SERVERS)
def test_bad_chunk_in_the_middle_of_a_body_gets_400(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    proxy = serve(server)
    c = Client(proxy.port)
    c.send(b"POST /invocations HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    time.sleep(0.1)  # the request has begun: the head is parsed and the first chunk read
    c.send(b"5\r\nworld\r\nzz\r\nbad\r\n0\r\n\r\n")
    r = c.response()
    if server == "builtin":
        assert_refusal(r, c, 400)
        finish(proxy, model, [], invocations=0, malformed_request=1)
    else:
        # uvicorn answers its own 400 and closes; the app, already waiting for the body, sees a disconnect.
        assert_uvicorn_400(r, c)
        finish(proxy, model, [], invocations=0, client_disconnect=1)


@pytest.mark.parametrize(
    "server", uvicorn_xfail("uvicorn writes its 400 for the garbage at once and closes: the good request's 200 is lost")
)
def test_pipelined_good_request_then_garbage(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    proxy = serve(server)
    c = Client(proxy.port)
    c.send(post() + b"\x16\x03\x01 this is not http\r\n\r\n")
    assert_ok(c.response(), c)
    assert_refusal(c.response(), c, 400)
    finish(proxy, model, [("POST", "/invocations", b'{"x": 1}')], invocations=1, malformed_request=1)


def test_uvicorn_pipelined_good_requests_then_garbage_is_a_documented_limit_but_counted_honestly(serve: Callable[..., Proxy], model: Model) -> None:
    """The fallback's limit (README, The front door): uvicorn answers its own 400 for the garbage at once and
    closes, so the good requests before it get nothing. None of them is half-counted: the one the app took sees
    the client gone before the model is called (no invocation, no error class), the others never reach the app."""
    proxy = serve("uvicorn")
    c = Client(proxy.port)
    c.send(post() * 3 + b"\x16\x03\x01 this is not http\r\n\r\n")
    assert_uvicorn_400(c.response(), c)
    finish(proxy, model, [], invocations=0, client_disconnect=1)
    assert proxy.value("sagemaker_proxy_upstream_errors_total", reason="internal_error") == 0
    assert proxy.value("sagemaker_mid_stream_errors_total") == 0


@pytest.mark.parametrize("server", uvicorn_xfail("uvicorn passes the request on and the gzip coding is lost unseen"))
@pytest.mark.parametrize("coding", [b"gzip, chunked", b"deflate,chunked", b"identity, chunked"])
def test_a_transfer_coding_other_than_chunked_gets_501_and_never_reaches_the_model(
    serve: Callable[..., Proxy], model: Model, server: str, coding: bytes
) -> None:
    proxy = serve(server)
    c = Client(proxy.port)
    c.send(b"POST /invocations HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: %s\r\n\r\n2\r\nok\r\n0\r\n\r\n" % coding)
    assert_refusal(c.response(), c, 501)
    finish(proxy, model, [], invocations=0, unsupported_transfer_coding=1)


@pytest.mark.parametrize("server", uvicorn_xfail("uvicorn forwards a request without a Host, or with two"))
@pytest.mark.parametrize(
    "head",
    [
        b"POST /invocations HTTP/1.1\r\nContent-Length: 2\r\n\r\nok",
        b"POST /invocations HTTP/1.1\r\nHost: a\r\nHost: b\r\nContent-Length: 2\r\n\r\nok",
    ],
    ids=["http11-without-host", "two-hosts"],
)
def test_a_missing_or_doubled_host_gets_400(serve: Callable[..., Proxy], model: Model, server: str, head: bytes) -> None:
    proxy = serve(server)
    c = Client(proxy.port)
    c.send(head)
    assert_refusal(c.response(), c, 400)
    finish(proxy, model, [], invocations=0, malformed_request=1)


@pytest.mark.parametrize("server", SERVERS)
def test_http10_needs_no_host(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    proxy = serve(server)
    c = Client(proxy.port)
    c.send(b"POST /invocations HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: 8\r\n\r\n{\"x\": 1}")
    assert_ok(c.response(), c)
    finish(proxy, model, [("POST", "/invocations", b'{"x": 1}')], invocations=1)


def test_the_admin_port_has_its_own_connection_limit(serve: Callable[..., Proxy], model: Model) -> None:
    proxy = serve("builtin", "--max-connections", "20", "--admin-max-connections", "8")
    held = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(20)]  # the proxy port is full
    admin = [socket.create_connection(("127.0.0.1", proxy.metrics_port)) for _ in range(8)]
    try:
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", proxy.metrics_port))  # past the admin port's own limit: closed at once
        extra.settimeout(2)
        assert extra.recv(1) == b""
        extra.close()
        for s in admin:
            s.close()
        deadline = time.monotonic() + 3
        while True:  # with the proxy port still full, the probes and the scrape answer
            try:
                if httpx.get(f"{proxy.metrics_url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert proxy.value("sagemaker_proxy_rejected_requests_total", reason="admin_too_many_connections") == 1
    finally:
        for s in held:
            s.close()


# -- head limits -------------------------------------------------------------------------------------------


BIG_HEADS = {  # each over the default --max-request-head-bytes (64 KiB), and under --max-request-headers (100)
    "one_100kb_header": post(headers=b"X-Big: %s\r\n" % (b"b" * 100_000)),
    "100kb_request_target": post(path=b"/invocations?q=" + b"q" * 100_000),
    "80_headers_of_1kb": post(headers=b"".join(b"X-H%d: %s\r\n" % (i, b"h" * 1024) for i in range(80))),
}


@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize("shape", list(BIG_HEADS))
def test_head_over_max_request_head_bytes_gets_431(serve: Callable[..., Proxy], model: Model, server: str, shape: str) -> None:
    proxy = serve(server)  # the default limit, 64 KiB
    c = Client(proxy.port)
    c.send(BIG_HEADS[shape])
    r = c.response()
    if server == "builtin":
        assert_refusal(r, c, 431)
        finish(proxy, model, [], invocations=0, head_too_large=1)
    elif shape == "100kb_request_target":
        assert_uvicorn_400(r, c)  # httptools' URL parser refuses it: uvicorn's own 400, not counted
        finish(proxy, model, [], invocations=0)
    else:
        # uvicorn has no limit on the head: forwarded whole.
        assert r.status == 200, c.transcript()
        seen = model.received()
        assert len(seen) == 1 and BIG_HEADS[shape].startswith(b"POST %s " % seen[0].target.encode())
        finish(proxy, model, [seen[0].request], invocations=1)


@pytest.mark.parametrize("server", SERVERS)
def test_heads_within_the_limits_are_served_one_after_another(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    """The head limits are per request: four heads of 3 KB (limit 4 KiB) and 10 headers (limit 10) on one
    connection, two in turn and two pipelined in one write, are all served."""
    proxy = serve(server, "--max-request-head-bytes", "4096", "--max-request-headers", "10")
    c = Client(proxy.port)
    # post() sends Host, Content-Type and Content-Length: 7 more make 10.
    headers = b"X-Big: %s\r\n" % (b"b" * 3000) + b"".join(b"X-H%d: v\r\n" % i for i in range(6))
    bodies = [b'{"n": %d}' % i for i in range(4)]
    for body in bodies[:2]:
        c.send(post(body, headers=headers))
        assert_ok(c.response(), c)
    c.send(post(bodies[2], headers=headers) + post(bodies[3], headers=headers))
    assert_ok(c.response(), c)
    assert_ok(c.response(), c)
    finish(proxy, model, [("POST", "/invocations", b) for b in bodies], invocations=4)


@pytest.mark.parametrize("server", SERVERS)
def test_head_arriving_byte_by_byte_is_served(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    proxy = serve(server)
    c = Client(proxy.port)
    for byte in post(b'{"slow": 1}'):
        c.send(bytes([byte]))
    assert_ok(c.response(), c)
    finish(proxy, model, [("POST", "/invocations", b'{"slow": 1}')], invocations=1)


@pytest.mark.parametrize("server", SERVERS)
def test_more_than_max_request_headers_gets_431(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    proxy = serve(server, "--max-request-headers", "10")
    # post() sends Host, Content-Type and Content-Length: 7 more make 10 (served), 8 more make 11.
    at_limit = Client(proxy.port)
    at_limit.send(post(b'{"at": 10}', headers=b"".join(b"X-H%d: v\r\n" % i for i in range(7))))
    assert_ok(at_limit.response(), at_limit)
    over = Client(proxy.port)
    over.send(post(b'{"at": 11}', headers=b"".join(b"X-H%d: v\r\n" % i for i in range(8))))
    r = over.response()
    if server == "builtin":
        assert_refusal(r, over, 431)
        finish(proxy, model, [("POST", "/invocations", b'{"at": 10}')], invocations=1, head_too_large=1)
    else:
        # uvicorn has no limit on the number of headers: forwarded.
        assert_ok(r, over)
        finish(proxy, model, [("POST", "/invocations", b'{"at": 10}'), ("POST", "/invocations", b'{"at": 11}')], invocations=2)


@pytest.mark.parametrize("server", uvicorn_xfail("uvicorn has no head-size limit: it buffers an endless header and never answers"))
def test_endless_header_gets_431_as_soon_as_the_limit_is_passed(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    limit = 16384
    # A long head timeout: the answer must come from the size limit, not from the clock.
    proxy = serve(server, "--max-request-head-bytes", str(limit), "--request-head-timeout", "10")
    c = Client(proxy.port)
    c.send(b"POST /invocations HTTP/1.1\r\nHost: test\r\nX-Endless: ")
    passed_at: float | None = None
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and not c.unread and not c.eof and c.send_error is None:
        c.send(b"a" * 1024)
        if passed_at is None and len(c.sent) > limit:
            passed_at = time.monotonic()
        c.wait_data(0.005)
    r = c.response(timeout=0.5)
    assert passed_at is not None and time.monotonic() - passed_at < 1.0, c.transcript()
    assert len(c.sent) < limit + 256 * 1024, f"{len(c.sent)} bytes sent before the refusal"
    assert_refusal(r, c, 431)
    finish(proxy, model, [], invocations=0, head_too_large=1)


# -- methods, upgrades, targets ----------------------------------------------------------------------------


@pytest.mark.parametrize("server", SERVERS)
def test_connect_gets_405_with_allow_and_close(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    proxy = serve(server)
    with socket.socket() as other:  # the CONNECT target: never contacted
        other.bind(("127.0.0.1", 0))
        other.listen()
        other.settimeout(0.1)
        port = other.getsockname()[1]
        c = Client(proxy.port)
        c.send(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (port, port))
        r = c.response()
        assert_refusal(r, c, 405)
        assert r.header(b"allow"), c.transcript()
        with pytest.raises(TimeoutError):
            other.accept()
    finish(proxy, model, [], invocations=0, method_not_allowed=1)


WEBSOCKET = (
    b"GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.mark.parametrize("server", SERVERS)
def test_websocket_upgrade_is_refused_and_not_forwarded(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    proxy = serve(server)
    c = Client(proxy.port)
    c.send(WEBSOCKET)
    r = c.response()
    if server == "builtin":
        assert_refusal(r, c, 400)
        finish(proxy, model, [], invocations=0, upgrade_refused=1)
    else:
        # uvicorn hands the handshake to its websocket protocol; the app ignores websocket scopes, so uvicorn
        # answers 500 itself: refused, not forwarded, but not counted.
        assert r.status == 500 and b"close" in r.tokens(b"connection"), c.transcript()
        assert c.closed(), c.transcript()
        finish(proxy, model, [], invocations=0)


H2C = (
    b"POST /invocations HTTP/1.1\r\nHost: test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nContent-Length: 9\r\n\r\n{\"h2c\":1}"
)


@pytest.mark.parametrize("server", uvicorn_xfail("uvicorn forwards the POST of an h2c upgrade without its body"))
def test_h2c_upgrade_is_served_as_plain_http11(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    proxy = serve(server)
    c = Client(proxy.port)
    c.send(H2C)
    r = c.response()
    assert_ok(r, c)
    assert r.version == b"HTTP/1.1" and b"upgrade" not in r.tokens(b"connection"), c.transcript()
    forwarded = [("POST", "/invocations", b'{"h2c":1}')]
    assert [s.request for s in model.received()] == forwarded
    assert all(s.header("upgrade") is None and s.header("http2-settings") is None for s in model.received())
    # Still an HTTP/1.1 connection: the next request on it is served.
    c.send(post(b'{"after": 1}'))
    assert_ok(c.response(), c)
    forwarded.append(("POST", "/invocations", b'{"after": 1}'))
    finish(proxy, model, forwarded, invocations=2)


@pytest.mark.parametrize("server", SERVERS)
def test_absolute_form_target_goes_to_the_configured_model(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    proxy = serve(server)
    with socket.socket() as other:  # "other-host": never contacted
        other.bind(("127.0.0.1", 0))
        other.listen()
        other.settimeout(0.1)
        port = other.getsockname()[1]
        c = Client(proxy.port)
        c.send(get(b"http://127.0.0.1:%d/ping?q=1" % port, headers=b"X-A: 1\r\n"))
        assert_ok(c.response(), c, "/ping?q=1")
        c.send(post(b'{"abs": 1}', path=b"http://other-host:1/invocations"))
        assert_ok(c.response(), c)
        with pytest.raises(TimeoutError):
            other.accept()
    finish(proxy, model, [("GET", "/ping?q=1", b""), ("POST", "/invocations", b'{"abs": 1}')], invocations=1)


# -- bodies and framing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("server", SERVERS)
def test_fixed_length_body_reaches_the_model_byte_for_byte(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    proxy = serve(server)
    body = bytes(range(256)) * 64
    c = Client(proxy.port)
    c.send(b"POST /invocations HTTP/1.1\r\nHost: test\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % len(body))
    c.send(body)
    r = c.response()
    assert_ok(r, c)
    assert r.json()["body_bytes"] == len(body)
    finish(proxy, model, [("POST", "/invocations", body)], invocations=1)


@pytest.mark.parametrize("server", SERVERS)
def test_chunked_request_body_is_forwarded_with_content_length(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    proxy = serve(server)
    c = Client(proxy.port)
    c.send(b"POST /invocations HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    time.sleep(0.05)
    c.send(b"1;ext=1\r\n \r\nA\r\n0123456789\r\n1f\r\n" + b"y" * 31 + b"\r\n0\r\nX-Trailer: t\r\n\r\n")
    assert_ok(c.response(), c)
    body = b"hello 0123456789" + b"y" * 31
    finish(proxy, model, [("POST", "/invocations", body)], invocations=1)


@pytest.mark.parametrize("server", SERVERS)
def test_chunked_response_is_streamed_back_chunked(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    proxy = serve(server)
    c = Client(proxy.port)
    c.send(post(headers=b"X-Respond: stream\r\n"))
    sent = time.monotonic()
    c.wait_data(2.0)
    while b"chunk-0" not in c.unread and time.monotonic() - sent < 2:
        c._recv(time.monotonic() + 0.05)
    first_chunk_after = time.monotonic() - sent
    r = c.response()
    done_after = time.monotonic() - sent
    assert r.status == 200 and r.header(b"transfer-encoding") == b"chunked", c.transcript()
    assert r.body == b"chunk-0\nchunk-1\nchunk-2\n", c.transcript()
    assert r.chunks is not None and len(r.chunks) >= 2, c.transcript()
    # Streamed: the first chunk arrives before the model has written the last (200 ms later).
    assert done_after - first_chunk_after > 0.12, (first_chunk_after, done_after)
    c.send(post(b'{"next": 1}'))  # the connection is reusable after the last chunk
    assert_ok(c.response(), c)
    finish(proxy, model, [("POST", "/invocations", b'{"x": 1}'), ("POST", "/invocations", b'{"next": 1}')], invocations=2)


@pytest.mark.parametrize("server", SERVERS)
def test_streamed_response_to_http10_is_not_chunked(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    proxy = serve(server)
    c = Client(proxy.port)
    c.send(post(version=b"HTTP/1.0", headers=b"X-Respond: stream\r\n"))
    assert c.closed(3.0), c.transcript()
    r = c.response()
    assert r.status == 200, c.transcript()
    if server == "builtin":
        # RFC 9112 6.1: no chunked to an HTTP/1.0 client; the body ends with the connection.
        assert r.header(b"transfer-encoding") is None and r.body == b"chunk-0\nchunk-1\nchunk-2\n", c.transcript()
    else:
        # uvicorn sends chunked framing to an HTTP/1.0 client (wrong: it cannot decode it).
        assert r.header(b"transfer-encoding") == b"chunked", c.transcript()
    finish(proxy, model, [("POST", "/invocations", b'{"x": 1}')], invocations=1)


@pytest.mark.parametrize("server", SERVERS)
def test_pipelined_requests_are_answered_in_order(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    proxy = serve(server)
    c = Client(proxy.port)
    c.send(post(b'{"n": 1}', headers=b"X-Respond: slow=150\r\n") + get(b"/ping") + post(b'{"n": 3}'))
    answers = [c.response() for _ in range(3)]
    assert [(a.status, a.json()["target"], a.json()["seq"]) for a in answers] == [
        (200, "/invocations", 1), (200, "/ping", 2), (200, "/invocations", 3)
    ], c.transcript()
    assert not c.closed(0.1) and c.unread == b"", c.transcript()
    finish(proxy, model, [("POST", "/invocations", b'{"n": 1}'), ("GET", "/ping", b""), ("POST", "/invocations", b'{"n": 3}')], invocations=2)


@pytest.mark.parametrize("server", SERVERS)
def test_slow_model_is_not_cut_by_the_front_door_timeouts(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    """The head, body and keep-alive timeouts are for the client: a model slower than all three (1.2 s) is
    waited for, and a request pipelined behind it (its head already in) is not timed out meanwhile."""
    proxy = serve(server)
    c = Client(proxy.port)
    c.send(post(b'{"n": 1}', headers=b"X-Respond: slow=1200\r\n") + post(b'{"n": 2}'))
    assert [(r.status, r.json()["seq"]) for r in (c.response(), c.response())] == [(200, 1), (200, 2)], c.transcript()
    assert c.unread == b"" and not c.eof, c.transcript()
    finish(proxy, model, [("POST", "/invocations", b'{"n": 1}'), ("POST", "/invocations", b'{"n": 2}')], invocations=2)


@pytest.mark.parametrize("server", SERVERS)
def test_connection_close_ends_a_pipeline(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    """A request pipelined after one with Connection: close is never read: not answered, not forwarded."""
    proxy = serve(server)
    c = Client(proxy.port)
    c.send(post(b'{"n": 1}', headers=b"Connection: close\r\n") + post(b'{"n": 2}'))
    r = c.response()
    assert_ok(r, c)
    assert b"close" in r.tokens(b"connection"), c.transcript()
    assert c.closed() and c.unread == b"", c.transcript()
    finish(proxy, model, [("POST", "/invocations", b'{"n": 1}')], invocations=1)


@pytest.mark.parametrize("server", SERVERS)
def test_head_response_has_no_body_and_the_connection_is_reused(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    proxy = serve(server)
    c = Client(proxy.port)
    c.send(get(b"/ping", method=b"HEAD"))
    r = c.response(head=True)
    assert r.status == 200 and r.header(b"content-length") is not None, c.transcript()
    c.send(get(b"/ping"))
    assert_ok(c.response(), c, "/ping")
    assert c.unread == b"", c.transcript()
    finish(proxy, model, [("HEAD", "/ping", b""), ("GET", "/ping", b"")], invocations=0)


@pytest.mark.parametrize("server", SERVERS)
def test_204_response_has_no_body_and_the_connection_is_reused(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    proxy = serve(server)
    c = Client(proxy.port)
    c.send(post(headers=b"X-Respond: head-204\r\n"))
    r = c.response()
    assert r.status == 204 and r.body == b"", c.transcript()
    assert r.header(b"transfer-encoding") is None and r.header(b"content-length") in (None, b"0"), c.transcript()
    c.send(post(b'{"next": 1}'))
    assert_ok(c.response(), c)
    finish(proxy, model, [("POST", "/invocations", b'{"x": 1}'), ("POST", "/invocations", b'{"next": 1}')], invocations=2)


@pytest.mark.parametrize("server", SERVERS)
def test_expect_100_continue_gets_100_before_the_body(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    proxy = serve(server)
    c = Client(proxy.port)
    body = b'{"expect": 1}'
    c.send(b"POST /invocations HTTP/1.1\r\nHost: test\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
    interim = c.response(timeout=2.0)
    assert (interim.version, interim.status, interim.body) == (b"HTTP/1.1", 100, b""), c.transcript()
    c.send(body)
    assert_ok(c.response(), c)
    assert model.received()[0].header("expect") is None  # hop-by-hop: the proxy answered it
    finish(proxy, model, [("POST", "/invocations", body)], invocations=1)


@pytest.mark.parametrize("server", SERVERS)
def test_expect_100_continue_from_an_http10_client_gets_no_100(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    proxy = serve(server)
    c = Client(proxy.port)
    body = b'{"expect": 1}'
    c.send(b"POST /invocations HTTP/1.0\r\nHost: test\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
    c.wait_data(0.3)
    if server == "builtin":
        # RFC 9110 15.2: no 1xx to an HTTP/1.0 client (it waits a while, then sends the body anyway).
        assert c.unread == b"", c.transcript()
    else:
        # uvicorn sends 100 Continue to an HTTP/1.0 client: wrong, but harmless to a client that ignores it.
        assert c.response().status == 100, c.transcript()
    c.send(body)
    assert_ok(c.response(), c)
    assert c.closed(), c.transcript()
    finish(proxy, model, [("POST", "/invocations", body)], invocations=1)


@pytest.mark.parametrize("server", SERVERS)
def test_expect_100_continue_over_max_payload_gets_413_without_100(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    proxy = serve(server, "--max-payload-bytes", "1000")
    c = Client(proxy.port)
    c.send(b"POST /invocations HTTP/1.1\r\nHost: test\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n")
    assert_refusal(c.response(timeout=2.0), c, 413)  # the first answer: no 100 Continue before it
    finish(proxy, model, [], invocations=0, payload_too_large=1)


@pytest.mark.parametrize("server", SERVERS)
def test_chunked_body_over_max_payload_gets_413(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    proxy = serve(server, "--max-payload-bytes", "1000")
    c = Client(proxy.port)
    c.send(b"POST /invocations HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n")
    c.send(b"258\r\n" + b"x" * 600 + b"\r\n")
    c.send(b"258\r\n" + b"x" * 600 + b"\r\n0\r\n\r\n")
    assert_refusal(c.response(), c, 413)
    finish(proxy, model, [], invocations=0, payload_too_large=1)


# -- end to end, many connections (builtin: uvicorn has no head timeout) ------------------------------------


def raise_nofile(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard) if hard != resource.RLIM_INFINITY else n, hard))


def serve_clients(proxy: Proxy, n: int, tag: str) -> list[tuple[str, str, bytes]]:
    """``n`` new clients, one after the other (so that the model sees them in order), each served."""
    bodies = [b'{"%s": %d}' % (tag.encode(), i) for i in range(n)]
    for body in bodies:
        c = Client(proxy.port)
        c.send(post(body, headers=b"Connection: close\r\n"))
        assert_ok(c.response(timeout=2.0), c)
    return [("POST", "/invocations", b) for b in bodies]


def test_idle_connection_flood_is_closed_within_the_head_timeout(serve: Callable[..., Proxy], model: Model) -> None:
    n = 1500
    raise_nofile(4 * n)  # before the proxy starts: it inherits the limit
    proxy = serve("builtin", "--request-head-timeout", "2", "--keep-alive-timeout", "5")
    idle: list[socket.socket] = []
    first_opened = time.monotonic()
    try:
        for _ in range(n):
            idle.append(socket.create_connection(("127.0.0.1", proxy.port), timeout=5))
        opened = time.monotonic()
        # Meanwhile a real client is served at once.
        forwarded = serve_clients(proxy, 1, "during")
        assert time.monotonic() - opened < 1.0
        with selectors.DefaultSelector() as sel:
            for s in idle:
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ)
            open_left, leaked = n, 0
            deadline = opened + 4
            first_closed: float | None = None
            while open_left and time.monotonic() < deadline:
                for key, _ in sel.select(timeout=max(0.0, deadline - time.monotonic())):
                    first_closed = first_closed or time.monotonic()
                    sock: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        data = sock.recv(1024)
                    except ConnectionResetError:
                        data = b""
                    leaked += len(data)
                    sel.unregister(sock)
                    open_left -= 1
        assert open_left == 0, f"{open_left} of {n} idle connections still open 4 s after the last was opened"
        assert leaked == 0, "bytes sent to connections that never sent a request"
        assert first_closed is not None and first_closed - first_opened > 1.8, "closed before the head timeout"
        forwarded += serve_clients(proxy, 20, "after")
    finally:
        for s in idle:
            s.close()
    finish(proxy, model, forwarded, invocations=len(forwarded), idle_connection=n)


def test_half_sent_heads_are_closed_within_the_head_timeout(serve: Callable[..., Proxy], model: Model) -> None:
    proxy = serve("builtin", "--request-head-timeout", "2", "--keep-alive-timeout", "5")
    slow = [Client(proxy.port) for _ in range(20)]
    for c in slow:
        c.send(b"POST /invocations HTTP/1.1\r\nHost: test\r\nContent-Le")
    sent = time.monotonic()
    for i, c in enumerate(slow):
        assert_refusal(c.response(timeout=max(0.1, sent + 4 - time.monotonic())), c, 408)
        if i == 0:
            assert time.monotonic() - sent > 1.8, "408 before the head timeout"
    assert time.monotonic() - sent < 4
    forwarded = serve_clients(proxy, 20, "after")
    finish(proxy, model, forwarded, invocations=len(forwarded), head_timeout=20)



# -- what one client can hold: trailers, pipelines, unread responses -------------------------------------------


@pytest.mark.parametrize("server", uvicorn_xfail("uvicorn has no limit on trailers: it buffers an endless one and never answers"))
def test_endless_trailer_gets_431_as_soon_as_the_limit_is_passed(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    """Trailers are bounded with the head: llhttp holds a trailer line until it ends, so an endless one would
    grow without bound (and block the loop while it grows). The app, reading the body, answers the 431."""
    limit = 16384
    proxy = serve(server, "--max-request-head-bytes", str(limit), "--request-body-timeout", "10")
    c = Client(proxy.port)
    c.send(b"POST /invocations HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Endless: ")
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and not c.unread and not c.eof and c.send_error is None:
        c.send(b"a" * 1024)
        c.wait_data(0.005)
    assert len(c.sent) < limit + 256 * 1024, f"{len(c.sent)} bytes sent before the refusal"
    assert_refusal(c.response(timeout=0.5), c, 431)
    finish(proxy, model, [], invocations=0, head_too_large=1)


@pytest.mark.parametrize("server", SERVERS)
def test_many_trailers_get_431(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    proxy = serve(server, "--max-request-headers", "10")
    c = Client(proxy.port)
    trailers = b"".join(b"X-T%d: v\r\n" % i for i in range(50))
    c.send(b"POST /invocations HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n%s\r\n" % trailers)
    r = c.response()
    if server == "builtin":
        assert_refusal(r, c, 431)
        finish(proxy, model, [], invocations=0, head_too_large=1)
    else:  # uvicorn has no limit on trailers (and drops them): forwarded
        assert_ok(r, c)
        finish(proxy, model, [("POST", "/invocations", b"hello")], invocations=1)


@pytest.mark.parametrize("server", SERVERS)
def test_body_and_the_next_head_in_one_read_are_not_counted_as_head_bytes(
    serve: Callable[..., Proxy], model: Model, server: str
) -> None:
    """A 100 KB body and the start of the next head arriving together: the head limit (64 KiB) counts the
    head's bytes only."""
    proxy = serve(server)
    c = Client(proxy.port)
    body = b'{"x": 1}' + b" " * 99_992
    c.send(b"POST /invocations HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Le")
    time.sleep(0.1)
    c.send(b"ngth: %d\r\n\r\n%sGET /ping HTTP/1.1\r\nHo" % (len(body), body))
    time.sleep(0.1)
    c.send(b"st: test\r\n\r\n")
    assert_ok(c.response(), c)
    assert_ok(c.response(), c, "/ping")
    finish(proxy, model, [("POST", "/invocations", body), ("GET", "/ping", b"")], invocations=1)


@pytest.mark.parametrize("server", SERVERS)
def test_pipelined_body_behind_a_slow_model_is_not_timed_out(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    """A request pipelined behind one the model takes 1.2 s over, with a body too large for one read: its body
    is not read (and not timed, body timeout 0.5 s) until its turn comes."""
    proxy = serve(server)
    c = Client(proxy.port)
    big = b'{"x": 2}' + b" " * 599_992
    c.send(post(b'{"n": 1}', headers=b"X-Respond: slow=1200\r\n") + post(big))
    assert [(r.status, r.json()["seq"]) for r in (c.response(), c.response())] == [(200, 1), (200, 2)], c.transcript()
    finish(proxy, model, [("POST", "/invocations", b'{"n": 1}'), ("POST", "/invocations", big)], invocations=2)


@pytest.mark.parametrize("server", uvicorn_xfail("uvicorn closes the connection after the first request with an h2c Upgrade header"))
def test_a_deep_pipeline_is_answered_in_order_one_request_at_a_time(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    """1,500 requests in one write, each with an h2c Upgrade header (ignored): every one answered, in order.
    While the first waits on the model, the model has seen only it: the others wait unparsed, not as a
    queue of 1,500 requests in memory."""
    proxy = serve(server)
    c = Client(proxy.port, timeout=30)
    one = b"GET /ping HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    c.send(get(headers=b"X-Respond: slow=300\r\n") + one * 1500)
    time.sleep(0.15)
    assert len(model.received()) == 1
    seqs = [c.response().json()["seq"] for _ in range(1501)]
    assert seqs == list(range(1, 1502)), c.transcript()
    assert not c.closed(0.1) and c.unread == b"", c.transcript()
    finish(proxy, model, [("GET", "/ping", b"")] * 1501, invocations=0)


@pytest.mark.parametrize("server", SERVERS)
def test_pipelined_requests_wait_while_the_client_does_not_read(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    """A client pipelines 40 requests for 1 MB answers and reads nothing: the proxy does not call the model for
    answers the client has not made room for (they would pile up in memory); once it reads, all 40 come, in order."""
    proxy = serve(server, "--client-write-timeout", "10", "--keep-alive-timeout", "10")
    c = Client(proxy.port, rcvbuf=4096)
    size = 1_000_000
    c.send(get(headers=b"X-Respond: size=%d\r\n" % size) * 40)
    time.sleep(1.0)
    assert len(model.received()) <= 3, f"the model was called {len(model.received())} times for a client that reads nothing"
    seqs = []
    for _ in range(40):
        r = c.response(head=True)
        assert r.status == 200, c.transcript()
        assert c.stream(size, lambda piece: None, timeout=10) == size, c.transcript()
        seqs.append(len(seqs) + 1)
    assert c.unread == b"" and not c.closed(0.1), c.transcript()
    finish(proxy, model, [("GET", "/ping", b"")] * 40, invocations=0)


@pytest.mark.parametrize("server", uvicorn_xfail("uvicorn has no write timeout: a client that never reads holds its connection forever"))
@pytest.mark.parametrize("connection", [b"close", b"keep-alive"])
def test_client_that_stops_reading_is_cut_after_the_write_timeout(
    serve: Callable[..., Proxy], model: Model, server: str, connection: bytes
) -> None:
    """An 8 MB answer to a client that reads nothing: the model's whole answer is in, the connection waits for
    the client, and after --client-write-timeout without progress it is reset. A SIGTERM meanwhile does not
    wait for that client for ever."""
    proxy = serve(server, "--client-write-timeout", "1")
    c = Client(proxy.port, rcvbuf=4096)
    size = 8_000_000
    c.send(get(headers=b"Connection: %s\r\nX-Respond: size=%d\r\n" % (connection, size)))
    time.sleep(0.3)
    proxy.proc.send_signal(15)
    proxy.proc.wait(timeout=4)
    assert c.response(head=True).status == 200
    assert c.stream(size, lambda piece: None, timeout=2) < size, c.transcript()
    assert c.eof, c.transcript()


@pytest.mark.parametrize("server", SERVERS)
def test_slow_reader_that_keeps_reading_gets_all_of_a_large_answer(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    """The write timeout is without progress: a client reading 64 KB every 50 ms takes longer than it in all."""
    proxy = serve(server, "--client-write-timeout", "0.5")
    c = Client(proxy.port, rcvbuf=4096)
    size = 2_000_000
    c.send(get(headers=b"Connection: close\r\nX-Respond: size=%d\r\n" % size))
    assert c.response(head=True).status == 200
    taken = 0
    started = time.monotonic()
    while taken < size and not c.eof:
        taken += c.stream(min(65536, size - taken), lambda piece: None, timeout=2)
        time.sleep(0.05)
    assert taken == size and time.monotonic() - started > 0.5, c.transcript()
    assert c.closed(), c.transcript()
    finish(proxy, model, [("GET", "/ping", b"")], invocations=0)


@pytest.mark.parametrize("server", SERVERS)
def test_pipelined_connect_is_refused_and_nothing_after_it_is_read(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    proxy = serve(server)
    c = Client(proxy.port)
    c.send(post() + b"CONNECT evil:443 HTTP/1.1\r\nHost: evil:443\r\n\r\n" + post(b'{"smuggled": 1}') + b"\x16\x03\x01tls")
    assert_ok(c.response(), c)
    r = c.response()
    assert r.status == 405 and b"close" in r.tokens(b"connection"), c.transcript()
    assert c.closed(), c.transcript()
    finish(proxy, model, [("POST", "/invocations", b'{"x": 1}')], invocations=1, method_not_allowed=1)


@pytest.mark.parametrize("server", SERVERS)
def test_options_asterisk_is_answered_by_the_proxy(serve: Callable[..., Proxy], model: Model, server: str) -> None:
    """``OPTIONS *`` (asterisk-form, RFC 9112 3.2.4) is a valid request line: both servers hand it to the app,
    which answers that only paths are proxied; the model never sees it."""
    proxy = serve(server)
    c = Client(proxy.port)
    c.send(b"OPTIONS * HTTP/1.1\r\nHost: test\r\n\r\n")
    r = c.response()
    assert r.status == 400 and r.json() == {"error": "request target must be a path"}, c.transcript()
    finish(proxy, model, [], invocations=0, malformed_request=1)
