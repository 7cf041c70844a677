"""A model server that misbehaves on request, at the byte level, for the proxy's fault tests.

Run as ``python tests/faulty_model.py --port N``. The request header ``X-Fault`` picks the misbehaviour:

- ``reset``: close the connection (RST) without answering.
- ``malformed``: answer bytes that are not HTTP.
- ``truncate``: send a head with Content-Length 100 and 10 bytes, then close.
- ``hang``: never answer; count the connection when the peer closes it (``GET /stats``).
- ``slow-body``: send a 200 head, then 5 chunks 100 ms apart (chunked).
- anything else, or none: 200 with body ``ok``.

More, for tests/test_model_faults.py (the connection stays open after an answer unless the fault says it closes):

- ``extra-response``: a 200 with body ``first`` and, in the same write, a second complete response nobody asked
  for (body ``second-unrequested``). A later request on that connection is counted in ``requests_after_extra``.
- ``status-999``: ``HTTP/1.1 999 Weird`` with a 2-byte body.
- ``switching``: ``HTTP/1.1 101 Switching Protocols`` (Upgrade: websocket) that nobody asked for.
- ``garbage``: binary bytes that are not HTTP (the start of a TLS handshake), then close.
- ``close``: close the connection (FIN) without answering.
- ``204-length``: ``204 No Content`` with ``Content-Length: 5`` and no body bytes.
- ``304-length``: ``304 Not Modified`` with ``Content-Length: 11`` and no body bytes.
- ``head-length``: a 200 head with ``Content-Length: 1000`` and no body (the answer to a HEAD request).
- ``big``: a 200 with a sized body of ``X-Body-Bytes`` bytes (default 20,000,000; ``big_body(n)``), written at once.
- ``delay=MS``: the usual answer after MS milliseconds.
- ``trickle-head``: the usual answer, its head written 8 bytes at a time, 15 ms apart.
- ``chunked-die``: a chunked 200, two chunks 50 ms apart, then close (FIN) without the last chunk.
- ``chunked-stall``: a chunked 200 and one chunk, then nothing; counted in ``stalled_closed_by_peer`` when the
  peer closes the connection.
- ``head-stall``: a chunked 200 head and nothing more, until the peer closes; ``head-close``: the same head, then
  close (FIN); ``head-bad-chunk``: the same head, then a chunk size that is not hex, then close.
- ``huge-head``: a 200 whose head is over 64 KiB (100 headers of 1,000 bytes).
- ``huge-header``: a 200 with one header line of 70,000 bytes.
- ``ctl-header``: a 200 with a control character (``\\x01``) in a header value.
- ``cl-te``: a 200 with both ``Content-Length`` and ``Transfer-Encoding: chunked``.
- ``dup-cl``: a 200 with ``Content-Length: 2`` twice; ``dup-cl-differ``: ``Content-Length`` 2 and 3.
- ``interim``: ``100 Continue``, then ``103 Early Hints``, then the usual answer, 20 ms apart.
- ``close-delimited``: a 200 with neither length nor chunking, body ``big_body(300000)``, ended by closing.
- ``http10``: ``HTTP/1.0 200 OK`` with body ``ok``, then close.

``GET /stats`` answers ``{"requests": n, "hung_closed_by_peer": k, "faults": {fault: n}, "methods": {method: n},
"requests_after_extra": n, "stalled_closed_by_peer": n}`` (``faults`` counts requests by their ``X-Fault``, ``none``
without one); ``GET /ping`` answers 200 and is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
from typing import Any

stats: dict[str, Any] = {
    "requests": 0, "hung_closed_by_peer": 0, "faults": {}, "methods": {}, "requests_after_extra": 0, "stalled_closed_by_peer": 0,
}
BIG_BYTES = 20_000_000
_PATTERN = bytes(range(256)) * 4096  # 1 MiB


def big_body(n: int) -> bytes:
    """The body of ``big`` and ``close-delimited``: a 1 MiB byte pattern, repeated and cut to ``n`` bytes."""
    return (_PATTERN * (n // len(_PATTERN) + 1))[:n]


def make_head(status: bytes, *headers: bytes) -> bytes:
    return b"HTTP/1.1 " + status + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"


# Answers written in one piece, after which the connection stays open (the model believes all is well).
CANNED = {
    "status-999": b"HTTP/1.1 999 Weird\r\ncontent-length: 2\r\n\r\nok",
    "switching": make_head(b"101 Switching Protocols", b"connection: upgrade", b"upgrade: websocket"),
    "204-length": make_head(b"204 No Content", b"x-fault-echo: 204-length", b"content-length: 5"),
    "304-length": make_head(b"304 Not Modified", b"x-fault-echo: 304-length", b'etag: "v1"', b"content-length: 11"),
    "head-length": make_head(b"200 OK", b"x-fault-echo: head-length", b"content-type: application/json", b"content-length: 1000"),
    "huge-head": make_head(b"200 OK", *(b"x-pad-%03d: %s" % (i, b"a" * 1000) for i in range(100)), b"content-length: 2") + b"ok",
    "huge-header": make_head(b"200 OK", b"x-pad: " + b"a" * 70_000, b"content-length: 2") + b"ok",
    "ctl-header": make_head(b"200 OK", b"x-bad: a\x01b", b"content-length: 2") + b"ok",
    "cl-te": make_head(b"200 OK", b"content-length: 2", b"transfer-encoding: chunked") + b"2\r\nok\r\n0\r\n\r\n",
    "dup-cl": make_head(b"200 OK", b"content-length: 2", b"content-length: 2") + b"ok",
    "dup-cl-differ": make_head(b"200 OK", b"content-length: 2", b"content-length: 3") + b"ok",
}
# Answers written in one piece, after which the model closes the connection (FIN).
CANNED_THEN_CLOSE = {
    "garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)),
    "close": b"",
    "http10": b"HTTP/1.0 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\nok",
    "close-delimited": make_head(b"200 OK", b"content-type: application/octet-stream") + big_body(300_000),
}


def count(key: str, name: str) -> None:
    stats[key][name] = stats[key].get(name, 0) + 1


async def read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    if length:
        await reader.readexactly(length)
    return lines[0], headers


def respond(body: bytes, status: str = "200 OK") -> bytes:
    return b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (status.encode(), len(body), body)


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    out_of_step = False  # this connection sent a response nobody asked for
    try:
        while True:
            request = await read_request(reader)
            if request is None:
                return
            line, headers = request
            if await more_faults(line, headers, reader, writer, out_of_step):
                if headers.get("x-fault") == "extra-response":
                    out_of_step = True
                if writer.is_closing():
                    return
                continue
            if line.startswith("GET /stats"):
                writer.write(respond(json.dumps(stats).encode()))
                await writer.drain()
                continue
            if line.startswith("GET /ping"):  # health checks are not requests to the model's work
                writer.write(respond(b"{}"))
                await writer.drain()
                continue
            stats["requests"] += 1
            fault = headers.get("x-fault", "")
            if fault == "reset":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.close()
                return
            if fault == "malformed":
                writer.write(b"THIS IS NOT HTTP\r\n\r\n")
                await writer.drain()
                writer.close()
                return
            if fault == "truncate":
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
                await writer.drain()
                writer.close()
                return
            if fault == "hang":
                if await reader.read(1) == b"":
                    stats["hung_closed_by_peer"] += 1
                return
            if fault == "slow-body":
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                for i in range(5):
                    await asyncio.sleep(0.1)
                    writer.write(b"1\r\n%d\r\n" % i)
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
                await writer.drain()
                continue
            writer.write(respond(b"ok"))
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def more_faults(
    line: str, headers: dict[str, str], reader: asyncio.StreamReader, writer: asyncio.StreamWriter, out_of_step: bool
) -> bool:
    """The faults added for tests/test_model_faults.py; False for a request that is none of theirs (handled as before).

    Every request that is not /stats or /ping is counted by fault and method here, whichever handles it."""
    if line.startswith(("GET /stats", "GET /ping")):
        return False
    fault = headers.get("x-fault", "")
    count("faults", fault.split("=")[0] or "none")
    count("methods", line.split(" ")[0])
    if out_of_step:
        stats["requests_after_extra"] += 1
    if fault in CANNED:
        stats["requests"] += 1
        writer.write(CANNED[fault])
        await writer.drain()
        return True
    if fault in CANNED_THEN_CLOSE:
        stats["requests"] += 1
        writer.write(CANNED_THEN_CLOSE[fault])
        await writer.drain()
        writer.close()
        return True
    if fault == "extra-response":
        stats["requests"] += 1
        writer.write(respond(b"first") + respond(b"second-unrequested"))
        await writer.drain()
        return True
    if fault == "big":
        stats["requests"] += 1
        n = int(headers.get("x-body-bytes", BIG_BYTES))
        writer.write(make_head(b"200 OK", b"content-type: application/octet-stream", b"content-length: %d" % n))
        body = memoryview(big_body(n))
        for i in range(0, n, 1 << 20):
            writer.write(body[i : i + (1 << 20)])
            await writer.drain()
        return True
    if fault.startswith("delay="):
        stats["requests"] += 1
        await asyncio.sleep(int(fault.split("=")[1]) / 1000)
        writer.write(respond(b"ok"))
        await writer.drain()
        return True
    if fault == "trickle-head":
        stats["requests"] += 1
        answer = respond(b"ok")
        end = answer.index(b"\r\n\r\n") + 4
        for i in range(0, end, 8):
            writer.write(answer[i : min(i + 8, end)])
            await writer.drain()
            await asyncio.sleep(0.015)
        writer.write(answer[end:])
        await writer.drain()
        return True
    if fault == "chunked-die":
        stats["requests"] += 1
        writer.write(make_head(b"200 OK", b"transfer-encoding: chunked") + b"7\r\npart-1\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"7\r\npart-2\n\r\n")
        await writer.drain()
        writer.close()
        return True
    if fault in ("head-stall", "head-close", "head-bad-chunk"):
        stats["requests"] += 1
        writer.write(make_head(b"200 OK", b"transfer-encoding: chunked"))
        await writer.drain()
        if fault == "head-bad-chunk":
            writer.write(b"zz\r\nnot a chunk\r\n")
            await writer.drain()
        if fault == "head-stall":
            await reader.read(1)  # nothing more, until the peer closes
        writer.close()
        return True
    if fault == "chunked-stall":
        stats["requests"] += 1
        writer.write(make_head(b"200 OK", b"transfer-encoding: chunked") + b"7\r\npart-1\n\r\n")
        await writer.drain()
        if await reader.read(1) == b"":
            stats["stalled_closed_by_peer"] += 1
        writer.close()
        return True
    if fault == "interim":
        stats["requests"] += 1
        for part in (make_head(b"100 Continue"), make_head(b"103 Early Hints", b"link: </style.css>; rel=preload"), respond(b"ok")):
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.02)
        return True
    return False


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(main(parser.parse_args().port))
