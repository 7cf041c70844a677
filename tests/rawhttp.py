"""A raw HTTP/1.1 client for the proxy port, and a strict parser of what comes back: shared by the raw-socket suites
(tests/test_http_conformance.py, tests/test_model_faults.py).

Everything a ``Client`` sends and receives is kept, so that a failing test can print the exchange byte for byte
(``Client.transcript``); a test module prints ``CLIENTS`` after each test and empties it.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Response:
    version: bytes
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]  # names lowercased, in order
    body: bytes
    chunks: list[bytes] | None  # the chunks of a chunked body, as framed; None when not chunked
    raw: bytes

    def header(self, name: bytes) -> bytes | None:
        values = [v for n, v in self.headers if n == name]
        assert len(values) <= 1, f"{name!r} {len(values)} times in {self.raw!r}"
        return values[0] if values else None

    def tokens(self, name: bytes) -> set[bytes]:
        return {t.strip().lower() for n, v in self.headers if n == name for t in v.split(b",")}

    def json(self) -> Any:
        return json.loads(self.body)


def parse_response(buf: bytes, *, head: bool, eof: bool) -> tuple[Response, int] | None:
    """One response from the front of ``buf`` and the bytes it took; None while incomplete. Strict CRLF framing."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buf[:end].split(b"\r\n")
    m = re.fullmatch(rb"(HTTP/1\.[01]) (\d{3}) ?(.*)", lines[0])
    assert m, f"bad status line {lines[0]!r}"
    version, status, reason = m.group(1), int(m.group(2)), m.group(3)
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        assert sep and name and name == name.strip(), f"bad response header line {line!r}"
        headers.append((name.lower(), value.strip()))
    pos = end + 4
    te = [v for n, v in headers if n == b"transfer-encoding"]
    cl = [v for n, v in headers if n == b"content-length"]
    assert not (te and cl), f"response with both Transfer-Encoding and Content-Length: {buf[:end]!r}"
    chunks: list[bytes] | None = None
    if head or 100 <= status < 200 or status in (204, 304):
        body = b""
    elif te:
        assert te == [b"chunked"], te
        chunks = []
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                return None
            size = int(buf[pos:line_end].split(b";")[0], 16)
            pos = line_end + 2
            if size == 0:
                trailers_end = buf.find(b"\r\n", pos)
                while trailers_end > pos:  # trailer lines, up to the blank line
                    pos = trailers_end + 2
                    trailers_end = buf.find(b"\r\n", pos)
                if trailers_end < 0:
                    return None
                pos += 2
                break
            if len(buf) < pos + size + 2:
                return None
            assert buf[pos + size : pos + size + 2] == b"\r\n", f"chunk not followed by CRLF: {buf!r}"
            chunks.append(buf[pos : pos + size])
            pos += size + 2
        body = b"".join(chunks)
    elif cl:
        assert len(cl) == 1, cl
        length = int(cl[0])
        if len(buf) < pos + length:
            return None
        body = buf[pos : pos + length]
        pos += length
    else:
        if not eof:
            return None
        body = buf[pos:]
        pos = len(buf)
    return Response(version, status, reason, headers, body, chunks, buf[:pos]), pos


CLIENTS: list[Client] = []  # every Client made, for the transcripts of a failed test; the test module empties it


class Client:
    """A raw socket to the proxy port; everything sent and received is kept for the failure report."""

    def __init__(self, port: int, timeout: float = 5.0, *, rcvbuf: int | None = None) -> None:
        if rcvbuf is None:
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        else:  # a small receive window, set before connecting: a client that does not read stalls the server sooner
            self.sock = socket.socket()
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.settimeout(timeout)
            self.sock.connect(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sent = bytearray()
        self.got = bytearray()
        self._buf = bytearray()
        self.eof = False
        self.reset = False
        self.send_error: str | None = None
        self.streamed = 0  # body bytes read by stream(): counted, not kept in got
        CLIENTS.append(self)

    def send(self, data: bytes) -> None:
        self.sent += data
        try:
            self.sock.sendall(data)
        except OSError as e:  # the server closed first; what it answered is still to be read
            self.send_error = repr(e)

    def shutdown_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def _recv(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if self.eof or remaining <= 0:
            return
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        except ConnectionResetError:
            self.eof = self.reset = True
            return
        if not data:
            self.eof = True
        self.got += data
        self._buf += data

    def response(self, *, head: bool = False, timeout: float = 5.0) -> Response:
        """The next complete response; fails if the connection closes or nothing complete arrives in time."""
        deadline = time.monotonic() + timeout
        while True:
            parsed = parse_response(bytes(self._buf), head=head, eof=self.eof)
            if parsed is not None:
                response, used = parsed
                del self._buf[:used]
                return response
            if self.eof:
                raise AssertionError(f"closed before a complete response\n{self.transcript()}")
            if time.monotonic() >= deadline:
                raise AssertionError(f"no complete response within {timeout} s\n{self.transcript()}")
            self._recv(deadline)

    def closed(self, timeout: float = 2.0) -> bool:
        """Whether the server closes the connection within ``timeout``; bytes meanwhile stay in ``unread``."""
        deadline = time.monotonic() + timeout
        while not self.eof and time.monotonic() < deadline:
            self._recv(deadline)
        return self.eof

    def wait_data(self, timeout: float) -> None:
        """Until some bytes or the close arrive, or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while not self._buf and not self.eof and time.monotonic() < deadline:
            self._recv(deadline)

    @property
    def unread(self) -> bytes:
        return bytes(self._buf)

    def stream(self, limit: int, sink: Callable[[bytes], object], timeout: float) -> int:
        """Up to ``limit`` bytes of a large body, after its head was read with ``response(head=True)``: those already
        buffered first, then from the socket, each piece handed to ``sink`` and not kept (the transcript counts them).
        Returns how many came before the limit, the close, or ``timeout``."""
        deadline = time.monotonic() + timeout
        buffered = bytes(self._buf[:limit])
        if buffered:
            del self._buf[: len(buffered)]
            del self.got[len(self.got) - len(self._buf) - len(buffered) : len(self.got) - len(self._buf)]
            sink(buffered)
        taken = len(buffered)
        while taken < limit and not self.eof:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                break
            except ConnectionResetError:
                self.eof = self.reset = True
                break
            if not data:
                self.eof = True
                break
            piece, rest = data[: limit - taken], data[limit - taken :]
            sink(piece)
            taken += len(piece)
            self.got += rest
            self._buf += rest
        self.streamed += taken
        return taken

    def close(self) -> None:
        self.sock.close()

    def transcript(self) -> str:
        end = "closed by the server (RST)" if self.reset else "closed by the server" if self.eof else "open"
        streamed = f" (and {self.streamed} body bytes streamed, not kept)" if self.streamed else ""
        return f"sent:     {abbreviate(self.sent)}\nreceived: {abbreviate(self.got)}{streamed}\nconnection: {end}" + (
            f", send failed: {self.send_error}" if self.send_error else ""
        )


def abbreviate(data: bytes | bytearray, limit: int = 4000) -> str:
    """repr() of raw bytes, with long runs of one byte written as <N x b'c'>."""
    data = bytes(data)
    parts, pos = [], 0
    for m in re.finditer(rb"(.)\1{63,}", data, flags=re.DOTALL):
        if m.start() > pos:
            parts.append(repr(data[pos : m.start()]))
        parts.append(f"<{len(m.group(0))} x {m.group(1)!r}>")
        pos = m.end()
    if pos < len(data) or not parts:
        parts.append(repr(data[pos:]))
    text = " + ".join(parts)
    return text if len(text) <= limit else text[:limit] + f"... ({len(data)} bytes)"



def post(body: bytes = b'{"x": 1}', path: bytes = b"/invocations", headers: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    return b"POST %s %s\r\nHost: test\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s" % (
        path, version, headers, len(body), body,
    )


def get(path: bytes = b"/ping", headers: bytes = b"", method: bytes = b"GET", version: bytes = b"HTTP/1.1") -> bytes:
    return b"%s %s %s\r\nHost: test\r\n%s\r\n" % (method, path, version, headers)
