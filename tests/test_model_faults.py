"""Model-side faults, end to end: the real proxy in front of a model that misbehaves at the byte level.

Every row runs against both proxy-port servers (``--http-server builtin`` and ``uvicorn``), through raw sockets
(tests/rawhttp.py), in front of tests/faulty_model.py (whose ``X-Fault`` header picks the misbehaviour and whose
``/stats`` counts the requests it received, by fault). Each row asserts:

- what the client got: status, framing and body, from the raw bytes; a short JSON ``{"error": ...}`` for a 502/504;
- whether the client connection stays usable: after a failure before the response head, a keep-alive follow-up on
  the SAME connection gets 200; after a failure mid-body, the connection is closed before the body completes;
- what the model received: exactly the requests sent, none twice, none on a connection that must not be reused;
- every counter of the variant: invocations, model errors, 4xx, 5xx, client disconnects and upstream errors by
  reason (``internal_error`` is 0 in every row).

The rows (numbered as in the issue "model-side faults"):

1. bytes after a complete response (a second, unrequested one): only the first is forwarded, as a success;
2. a status outside 100-599, an unasked 101, a head that is not HTTP: 502 malformed_response;
3. 204 and 304 with a Content-Length, and HEAD: forwarded without a body, the connection usable;
4. a slow reader of a 20 MB body, past the invocation timeout: all of it, and no timeout counted;
5. a client that never reads: closed after ``--client-write-timeout``, counted as a client disconnect;
6. pooled model connections near the model's 5 s keep-alive: no 502 from the race;
7. faults that already behaved: the model killed under load, reset, close, garbage, stall, trickled head,
   truncated and dying or stalling bodies, bad heads, interim responses, close-delimited and HTTP/1.0 responses.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import ROOT, Proxy, Running, free_port, start
from tests.faulty_model import BIG_BYTES, big_body
from tests.rawhttp import CLIENTS, Client, Response, get, parse_response, post

pytestmark = pytest.mark.e2e

SERVERS = ["builtin", "uvicorn"]
TIMEOUT = 0.5  # --invocation-timeout, in every row that does not pass its own
N = 3  # faulty requests per row, before the follow-up
# The upstream error reasons of the contract; every one is exported (absent fails), and any other must stay 0.
REASONS = ("connect_failed", "connection_reset", "malformed_response", "timeout", "internal_error")
VARIANT = {"endpoint_name": "test-endpoint", "variant_name": "AllTraffic"}
SMALL_RCVBUF = 64 * 1024  # rows 4 and 5: the client's receive window, so that not reading stalls the proxy at once
IRIS = {"instances": [[5.1, 3.5, 1.4, 0.2]]}


def fault(name: str) -> bytes:
    return post(headers=b"X-Fault: %s\r\n" % name.encode())


# -- the model -----------------------------------------------------------------------------------------


class Faulty:
    """tests/faulty_model.py (conftest's session-wide ``faulty_model``): its /stats, as differences since a snapshot."""

    def __init__(self, running: Running) -> None:
        self.url = running.url
        self.before = self.stats()

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = httpx.get(f"{self.url}/stats").json()
        return stats

    def received(self) -> dict[str, int]:
        """The requests received since this test began, by X-Fault (``none``: without one), and by method (``HEAD`` ...),
        and the connection events the model counts (``requests_after_extra`` ...); zeros left out."""
        now, before = self.stats(), self.before
        out: dict[str, int] = {}
        for key in ("faults", "methods"):
            for name, n in now[key].items():
                out[name] = n - before[key].get(name, 0)
        for key in ("requests_after_extra", "hung_closed_by_peer", "stalled_closed_by_peer"):
            out[key] = now[key] - before[key]
        return {k: v for k, v in out.items() if v}

    def assert_received(self, want: dict[str, int], timeout: float = 3.0) -> None:
        """Exactly ``want``, in the terms of ``received``. Polled: the model counts a connection the proxy closed
        a little after the client has its answer."""
        deadline = time.monotonic() + timeout
        got = self.received()
        while got != want and time.monotonic() < deadline:
            time.sleep(0.05)
            got = self.received()
        assert got == want, f"the model received {got}, expected {want}"


@pytest.fixture
def faulty(faulty_model: Running) -> Faulty:
    return Faulty(faulty_model)


# -- the proxy -----------------------------------------------------------------------------------------


@pytest.fixture
def serve(start_proxy: Callable[..., Proxy], faulty: Faulty) -> Iterator[Callable[..., Proxy]]:
    """``serve(server, *flags, upstream=faulty model)``: a proxy with ``--invocation-timeout TIMEOUT`` unless flags override it."""
    started: list[Proxy] = []

    def _serve(server: str, *flags: str, upstream: str | None = None) -> Proxy:
        proxy = start_proxy(upstream or faulty.url, "--http-server", server, "--invocation-timeout", str(TIMEOUT), *flags)
        started.append(proxy)
        return proxy

    yield _serve
    for c in CLIENTS:
        c.close()
    for proxy in started:  # its graceful shutdown is not under test here
        proxy.proc.kill()
        proxy.proc.wait()


@pytest.fixture(autouse=True)
def transcripts() -> Iterator[None]:
    """Print every raw exchange of the test: shown by pytest when it fails."""
    CLIENTS.clear()
    yield
    for i, c in enumerate(CLIENTS):
        print(f"--- connection {i}\n{c.transcript()}")
        c.close()
    CLIENTS.clear()


def counters(proxy: Proxy) -> dict[str, float]:
    """Every counter of the variant, from one scrape; a counter of the contract that is not exported fails here."""
    samples = proxy.samples()

    def one(name: str, **labels: str) -> float:
        key = (name, frozenset({**VARIANT, **labels}.items()))
        assert key in samples, f"{name}{labels} is not exported"
        return samples[key]

    out = {
        "invocations": one("sagemaker_invocations_total"),
        "model_errors": one("sagemaker_invocation_model_errors_total"),
        "4xx": one("sagemaker_invocation_4xx_errors_total"),
        "5xx": one("sagemaker_invocation_5xx_errors_total"),
        "client_disconnects": one("sagemaker_proxy_client_disconnects_total"),
    }
    exported = {
        dict(labels)["reason"]
        for name, labels in samples
        if name == "sagemaker_proxy_upstream_errors_total" and VARIANT.items() <= dict(labels).items()
    }
    for reason in sorted(set(REASONS) | exported):
        out[f"upstream_errors[{reason}]"] = one("sagemaker_proxy_upstream_errors_total", reason=reason)
    return out


def assert_counters(
    proxy: Proxy, invocations: int, *, model_errors: int = 0, client_disconnects: int = 0, e4xx: int = 0, e5xx: int = 0,
    **upstream_errors: int,
) -> None:
    """Every counter exactly; those not named are 0 (every upstream error reason not named, internal_error included).

    Polled for a while: an invocation is recorded just after its answer is handed over."""
    assert set(upstream_errors) <= set(REASONS), upstream_errors
    want: dict[str, float] = {
        "invocations": invocations, "model_errors": model_errors, "4xx": e4xx, "5xx": e5xx, "client_disconnects": client_disconnects,
    }
    deadline = time.monotonic() + 3
    while True:
        got = counters(proxy)
        full = {**want, **{k: 0 for k in got if k.startswith("upstream_errors")}}
        full.update({f"upstream_errors[{r}]": n for r, n in upstream_errors.items()})
        if got == full or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    assert got == full, "counters (got != want):\n" + "\n".join(
        f"  {k}: {got.get(k)} != {full.get(k)}" for k in sorted(set(got) | set(full)) if got.get(k) != full.get(k)
    )


# -- what the client gets ----------------------------------------------------------------------------------


def assert_error_answer(r: Response, c: Client, status: int) -> None:
    """The proxy's own answer to a model that failed before its head: a short JSON error, and keep-alive."""
    assert r.status == status, c.transcript()
    assert r.header(b"content-type") == b"application/json", c.transcript()
    assert r.header(b"content-length") == b"%d" % len(r.body), c.transcript()
    assert len(r.body) < 512, c.transcript()
    error = r.json()
    assert set(error) == {"error"} and isinstance(error["error"], str) and error["error"], c.transcript()
    assert b"close" not in r.tokens(b"connection"), c.transcript()


def assert_nothing_more(c: Client, wait: float = 0.1) -> None:
    """No stray bytes after the last answer, and the connection still open."""
    c.wait_data(wait)
    assert c.unread == b"" and not c.eof, c.transcript()


def assert_follow_up(c: Client) -> None:
    """The keep-alive follow-up: a good invocation on the same connection gets the model's ``ok``, and nothing more."""
    assert not c.eof, c.transcript()
    c.send(post())
    r = c.response()
    assert (r.status, r.body) == (200, b"ok"), c.transcript()
    assert r.header(b"content-length") == b"2", c.transcript()
    assert_nothing_more(c)


def fresh_follow_up(proxy: Proxy) -> None:
    """A new client connection is served: the proxy is fine after the fault."""
    assert_follow_up(Client(proxy.port))


# -- row 1: bytes after a complete response ----------------------------------------------------------------


@pytest.mark.parametrize("server", SERVERS)
def test_row1_an_unrequested_second_response_is_dropped_with_its_model_connection(
    serve: Callable[..., Proxy], faulty: Faulty, server: str
) -> None:
    proxy = serve(server)
    c = Client(proxy.port)
    for _ in range(N):
        c.send(fault("extra-response"))
        r = c.response()
        assert (r.status, r.body) == (200, b"first"), c.transcript()
        assert [v for n, v in r.headers if n == b"content-length"] == [b"5"], c.transcript()
        assert r.header(b"transfer-encoding") is None, c.transcript()
        assert_nothing_more(c)  # the second response never reaches the client
    assert_follow_up(c)
    # The connection that sent the extra response is never used again: no request arrives on it.
    faulty.assert_received({"extra-response": N, "none": 1, "POST": N + 1})
    assert_counters(proxy, invocations=N + 1)


# -- rows 2 and 7: failures before the response head --------------------------------------------------------

BEFORE_HEAD = [
    pytest.param("status-999", 502, "malformed_response", id="row2-status-999"),
    pytest.param("switching", 502, "malformed_response", id="row2-unasked-101"),
    pytest.param("malformed", 502, "malformed_response", id="row2-head-not-http"),
    pytest.param("reset", 502, "connection_reset", id="row7-reset"),
    pytest.param("close", 502, "connection_reset", id="row7-close-without-answer"),
    pytest.param("garbage", 502, "malformed_response", id="row7-garbage"),
    pytest.param("hang", 504, "timeout", id="row7-stall-past-the-timeout"),
    pytest.param("huge-head", 502, "malformed_response", id="row7-head-over-64KiB"),
    pytest.param("huge-header", 502, "malformed_response", id="row7-one-header-over-64KiB"),
    pytest.param("ctl-header", 502, "malformed_response", id="row7-control-char-in-header"),
    pytest.param("cl-te", 502, "malformed_response", id="row7-content-length-and-chunked"),
    pytest.param("dup-cl", 502, "malformed_response", id="row7-duplicate-content-length"),
    pytest.param("dup-cl-differ", 502, "malformed_response", id="row7-two-content-lengths"),
    # The head came, no body byte yet: the head is held, so the client still gets a real answer.
    pytest.param("head-stall", 504, "timeout", id="row7-head-then-stall"),
    pytest.param("head-close", 502, "connection_reset", id="row7-head-then-close"),
    pytest.param("head-bad-chunk", 502, "malformed_response", id="row7-head-then-bad-chunk"),
]


@pytest.mark.parametrize(("name", "status", "reason"), BEFORE_HEAD)
@pytest.mark.parametrize("server", SERVERS)
def test_failure_before_the_head_is_answered_and_the_connection_stays_usable(
    serve: Callable[..., Proxy], faulty: Faulty, server: str, name: str, status: int, reason: str
) -> None:
    proxy = serve(server)
    c = Client(proxy.port)
    for _ in range(N):
        sent = time.monotonic()
        c.send(fault(name))
        assert_error_answer(c.response(), c, status)
        took = time.monotonic() - sent
        if status == 504:
            assert TIMEOUT * 0.9 < took < TIMEOUT + 2, f"504 after {took:.2f} s for a {TIMEOUT} s timeout"
        assert_nothing_more(c, 0.02)
    assert_follow_up(c)
    # Each faulty request reached the model once (never retried); a stalled model connection was closed by the proxy.
    faulty.assert_received({name: N, "none": 1, "POST": N + 1, **({"hung_closed_by_peer": N} if name == "hang" else {})})
    assert_counters(proxy, invocations=N + 1, model_errors=N, **{reason: N})


# -- row 3: no body allowed -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["204-length", "304-length"])
@pytest.mark.parametrize("server", SERVERS)
def test_row3_204_and_304_with_a_content_length_are_forwarded_without_a_body(
    serve: Callable[..., Proxy], faulty: Faulty, server: str, name: str
) -> None:
    status = int(name[:3])
    proxy = serve(server)
    c = Client(proxy.port)
    for _ in range(N):
        c.send(fault(name))
        r = c.response()  # a 204 or 304 has no body whatever its headers say (the parser reads none)
        assert r.status == status and r.body == b"", c.transcript()
        assert r.header(b"x-fault-echo") == name.encode(), c.transcript()
        if status == 304:
            assert r.header(b"etag") == b'"v1"', c.transcript()
        assert r.header(b"transfer-encoding") is None, c.transcript()
        assert_nothing_more(c)  # no body bytes, and still open (its Content-Length may be dropped: not asserted)
    assert_follow_up(c)
    faulty.assert_received({name: N, "none": 1, "POST": N + 1})
    # A model error is any non-2xx outcome (README, InvocationModelErrors): the 304s are, and are neither 4xx nor 5xx.
    assert_counters(proxy, invocations=N + 1, model_errors=N if status == 304 else 0)


@pytest.mark.parametrize("server", SERVERS)
def test_row3_head_response_keeps_its_content_length_and_has_no_body(serve: Callable[..., Proxy], faulty: Faulty, server: str) -> None:
    proxy = serve(server)
    c = Client(proxy.port)
    for _ in range(N):
        c.send(get(b"/invocations", headers=b"X-Fault: head-length\r\n", method=b"HEAD"))
        r = c.response(head=True)
        assert r.status == 200, c.transcript()
        assert r.header(b"content-length") == b"1000" and r.header(b"x-fault-echo") == b"head-length", c.transcript()
        assert r.header(b"transfer-encoding") is None, c.transcript()
        assert_nothing_more(c)
    assert_follow_up(c)
    faulty.assert_received({"head-length": N, "HEAD": N, "none": 1, "POST": 1})
    assert_counters(proxy, invocations=1)  # HEAD /invocations is not an invocation route: only the follow-up counts


# -- rows 4 and 5: a client that does not read ------------------------------------------------------------


@pytest.mark.parametrize("server", SERVERS)
def test_row4_slow_reader_gets_all_20MB_and_the_model_is_not_timed_out(serve: Callable[..., Proxy], faulty: Faulty, server: str) -> None:
    proxy = serve(server, "--invocation-timeout", "2")
    c = Client(proxy.port, timeout=10, rcvbuf=SMALL_RCVBUF)
    c.send(fault("big"))
    time.sleep(4.0)  # not reading, for twice the invocation timeout: the model has long sent everything it could
    r = c.response(head=True)
    assert r.status == 200 and r.header(b"content-length") == b"%d" % BIG_BYTES, c.transcript()
    digest = hashlib.sha256()
    got = c.stream(BIG_BYTES, digest.update, timeout=30)
    assert got == BIG_BYTES, f"{got} of {BIG_BYTES} body bytes\n{c.transcript()}"
    assert digest.digest() == hashlib.sha256(big_body(BIG_BYTES)).digest(), "the body arrived, but not byte for byte"
    assert_follow_up(c)
    faulty.assert_received({"big": 1, "none": 1, "POST": 2})
    assert_counters(proxy, invocations=2)


def holds(proxy: Proxy, client_port: int) -> bool:
    """Whether the proxy process still has a socket for the client connection from ``client_port``."""
    return any(
        s.laddr and s.laddr.port == proxy.port and s.raddr and s.raddr.port == client_port
        for s in psutil.Process(proxy.proc.pid).net_connections(kind="tcp")
    )


@pytest.mark.parametrize(
    "server",
    [
        "builtin",
        pytest.param("uvicorn", marks=pytest.mark.xfail(
            strict=True, reason="uvicorn closes (flushes) instead of aborting when the app returns mid-response: a client that never reads holds the socket",
        )),
    ],
)
def test_row5_client_that_never_reads_is_closed_after_the_client_write_timeout(
    serve: Callable[..., Proxy], faulty: Faulty, server: str
) -> None:
    proxy = serve(server, "--invocation-timeout", "2", "--client-write-timeout", "1")
    c = Client(proxy.port, timeout=10, rcvbuf=SMALL_RCVBUF)
    client_port = c.sock.getsockname()[1]
    c.send(fault("big"))
    sent = time.monotonic()
    # Not reading for 5 s. Meanwhile the proxy gives up on this client once its writes have been blocked for 1 s:
    # the invocation is counted as a client disconnect, and the proxy lets go of the connection.
    counted: float | None = None
    released: float | None = None
    while time.monotonic() < sent + 5 and (counted is None or released is None):
        if counted is None and counters(proxy)["client_disconnects"] >= 1:
            counted = time.monotonic() - sent
        if released is None and not holds(proxy, client_port):
            released = time.monotonic() - sent
        time.sleep(0.05)
    time.sleep(max(0.0, sent + 5 - time.monotonic()))
    raw = bytearray()
    got = c.stream(BIG_BYTES + 4096, lambda piece: raw.extend(piece[: max(0, 4096 - len(raw))]), timeout=5)
    assert counted is not None and 0.9 < counted < 3, f"client disconnect counted after {counted} s, for a 1 s client write timeout"
    assert released is not None and released < 4, (
        f"the proxy still held the client connection {released or 5:.1f} s after the request, for a 1 s client write timeout"
    )
    assert c.eof, f"the connection is still open after {got} bytes\n{c.transcript()}"
    assert got < BIG_BYTES, f"the whole body arrived ({got} bytes) through a connection that was to be closed\n{c.transcript()}"
    assert not raw or raw.startswith(b"HTTP/1.1 200 "), bytes(raw[:200])
    assert_counters(proxy, invocations=1, client_disconnects=1)
    faulty.assert_received({"big": 1, "POST": 1})
    fresh_follow_up(proxy)
    assert_counters(proxy, invocations=2, client_disconnects=1)


# -- row 6: the model's keep-alive edge ---------------------------------------------------------------------

WIDTH = 150  # client connections, so requests at once and pooled model connections, per burst
# Seconds from a burst's last answer to the next burst. The model (uvicorn) closes a connection 5 s after its answer
# on it, and a burst's answers spread over a tenth of a second or more: so the bursts straddle the edge.
GAPS = (4.85, 4.9, 4.95, 4.98, 5.0, 5.02, 5.05)


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """One request on a raw keep-alive connection; the status (0: the connection failed), its body read to the end."""
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:] if line)}
        if b"content-length" in fields:
            await reader.readexactly(int(fields[b"content-length"]))
        else:
            assert fields.get(b"transfer-encoding") == b"chunked", head
            while (size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)) != 0:
                await reader.readexactly(size + 2)
            await reader.readuntil(b"\r\n")
        return status
    except (ConnectionError, asyncio.IncompleteReadError):
        return 0


async def _bursts(port: int, request: bytes) -> tuple[list[int], list[int]]:
    """A warm-up burst, then one burst per gap: every connection sends one request at once. The statuses of the
    warm-up, and of the bursts at the edge."""
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(WIDTH)]
    try:
        warm = list(await asyncio.gather(*(_exchange(r, w, request) for r, w in conns)))
        edge: list[int] = []
        for gap in GAPS:
            await asyncio.sleep(gap)
            edge += await asyncio.gather(*(_exchange(r, w, request) for r, w in conns))
        return warm, edge
    finally:
        for _, w in conns:
            w.close()


@pytest.mark.parametrize(
    "server",
    # The pool of model connections and its idle limit are proxy/http/client.py, the same code behind both servers;
    # the front door plays no part. One server proves it, and the row costs ~40 s.
    ["builtin"],
)
def test_row6_pooled_connections_never_race_the_models_keep_alive(serve: Callable[..., Proxy], model: Running, server: str) -> None:
    proxy = serve(server, upstream=model.url)  # the default --upstream-idle-timeout; the model is uvicorn, keep-alive 5 s
    request = post(json.dumps(IRIS).encode())
    warm, edge = asyncio.run(_bursts(proxy.port, request))
    assert warm == [200] * WIDTH, {s: warm.count(s) for s in set(warm)}
    assert len(edge) >= 1000
    assert edge == [200] * len(edge), f"answers at the keep-alive edge: { {s: edge.count(s) for s in set(edge)} }"
    assert_counters(proxy, invocations=len(warm) + len(edge))


# -- row 7: answers that must come through ---------------------------------------------------------------

COMPLETE = [
    pytest.param("trickle-head", b"ok", id="trickled-head"),
    pytest.param("interim", b"ok", id="100-and-103-first"),
    pytest.param("close-delimited", big_body(300_000), id="body-delimited-by-close"),
    pytest.param("http10", b"ok", id="http10-response"),
]


@pytest.mark.parametrize(("name", "body"), COMPLETE)
@pytest.mark.parametrize("server", SERVERS)
def test_row7_odd_but_valid_responses_come_through(serve: Callable[..., Proxy], faulty: Faulty, server: str, name: str, body: bytes) -> None:
    proxy = serve(server)
    c = Client(proxy.port)
    for _ in range(N):
        c.send(fault(name))
        r = c.response()  # the first answer on the wire: interim responses are not forwarded
        assert r.status == 200 and r.body == body, c.transcript()
        assert_nothing_more(c, 0.02)
    assert_follow_up(c)
    faulty.assert_received({name: N, "none": 1, "POST": N + 1})
    assert_counters(proxy, invocations=N + 1)


MID_BODY = [
    pytest.param("truncate", "connection_reset", id="truncated-body"),
    pytest.param("chunked-die", "connection_reset", id="chunked-stream-dies"),
    pytest.param("chunked-stall", "timeout", id="chunked-stream-stalls"),
]


@pytest.mark.parametrize(("name", "reason"), MID_BODY)
@pytest.mark.parametrize("server", SERVERS)
def test_row7_failure_mid_body_closes_the_client_connection_before_the_body_ends(
    serve: Callable[..., Proxy], faulty: Faulty, server: str, name: str, reason: str
) -> None:
    proxy = serve(server)
    for _ in range(N):
        c = Client(proxy.port)
        c.send(fault(name))
        sent = time.monotonic()
        assert c.closed(TIMEOUT + 3), c.transcript()
        took = time.monotonic() - sent
        head = parse_response(c.unread, head=True, eof=False)
        assert head is not None and head[0].status == 200, c.transcript()
        # Framed, so that the client can tell the body is cut short; and it is.
        framing = head[0].header(b"content-length"), head[0].header(b"transfer-encoding")
        assert framing[0] is not None or framing[1] == b"chunked", c.transcript()
        assert parse_response(c.unread, head=False, eof=True) is None, c.transcript()
        if reason == "timeout":
            assert TIMEOUT * 0.9 < took < TIMEOUT + 2, f"closed after {took:.2f} s for a {TIMEOUT} s timeout"
    fresh_follow_up(proxy)
    faulty.assert_received({name: N, "none": 1, "POST": N + 1, **({"stalled_closed_by_peer": N} if name == "chunked-stall" else {})})
    assert_counters(proxy, invocations=N + 1, model_errors=N, **{reason: N})


@pytest.mark.parametrize("server", SERVERS)
def test_row7_model_killed_under_load_every_request_is_answered_once(
    start_proxy: Callable[..., Proxy], tmp_path: Path, server: str
) -> None:
    port = free_port()
    victim = start([str(ROOT / "tests" / "faulty_model.py"), "--port", str(port)], port, tmp_path / "victim.log")
    try:
        proxy = start_proxy(victim.url, "--http-server", server, "--invocation-timeout", str(TIMEOUT))
        clients = [Client(proxy.port) for _ in range(8)]
        killed = threading.Event()
        statuses: list[list[tuple[bool, int]]] = [[] for _ in clients]

        def load(c: Client, seen: list[tuple[bool, int]]) -> None:
            """Requests one after the other on one keep-alive connection, until three were sent after the kill."""
            while sum(after for after, _ in seen) < 3:
                after = killed.is_set()
                c.send(fault("delay=20"))
                r = c.response()
                if r.status != 200:
                    assert_error_answer(r, c, 502)
                seen.append((after, r.status))

        with ThreadPoolExecutor(len(clients)) as pool:
            running = [pool.submit(load, c, seen) for c, seen in zip(clients, statuses, strict=True)]
            time.sleep(0.5)
            victim.proc.kill()
            victim.proc.wait()
            killed.set()
            for f in running:
                f.result(timeout=30)
    finally:
        victim.stop()
    for c in clients:
        assert_nothing_more(c, 0.02)  # exactly one answer per request; every connection still open
    every = [s for seen in statuses for _, s in seen]
    ok, failed = every.count(200), every.count(502)
    assert ok + failed == len(every), every
    assert ok > 0 and all(s == 502 for seen in statuses for after, s in seen if after), statuses
    got = counters(proxy)
    reset, refused = got["upstream_errors[connection_reset]"], got["upstream_errors[connect_failed]"]
    assert reset >= 1 and refused >= 1, f"killed with requests in flight: resets {reset}, refused {refused}"
    assert_counters(proxy, invocations=len(every), model_errors=failed, connection_reset=int(reset), connect_failed=failed - int(reset))
