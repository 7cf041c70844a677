"""A model server that records every request it receives, byte for byte, for the HTTP conformance tests.

Run as ``python tests/recording_model.py --port N``. A raw asyncio HTTP/1.1 server: keep-alive, request
bodies with Content-Length or chunked, and every request recorded (method, target, version, headers, body)
once its body is in. It answers 200 with a small JSON body and Content-Length::

    {"seq": n, "method": "POST", "target": "/invocations", "body_bytes": 2}

The request header ``X-Respond`` picks another answer:

- ``stream``: a chunked response of three chunks (``chunk-0\\n`` ...), 100 ms apart.
- ``head-204``: ``204 No Content``, a head and no body.
- ``slow=MS``: the usual answer after MS milliseconds.
- ``size=N``: the usual answer padded with spaces to N bytes (still JSON).
- ``status=N``: status N with the JSON body ``{"error": "model says N"}``.
- ``stream-die``: a chunked response of two chunks, 50 ms apart, then the connection closes without the last chunk.
- ``stream-stall``: a chunked response of one chunk, then nothing until the peer closes the connection.
- ``head-stall``: a chunked 200 head and no chunk, then nothing until the peer closes; ``head-close``: the same
  head, then the connection closes.

The SageMaker Runtime API passes the model no ``X-Respond``: there ``X-Amzn-SageMaker-Custom-Attributes:
respond=...`` picks the answer, and any custom attributes come back in the response as ``echo:<attributes>``.
- ``close``: the usual answer with ``Connection: close``, then close.

A HEAD request gets the head of the answer (the usual one with its Content-Length) and never a body.

Not recorded, to be called on the model's port directly: ``GET /__received`` answers the JSON list of
recorded requests (``body`` as a latin-1 string); ``POST /__reset`` clears it. Nor is a ``GET`` that the
proxy did not forward (no ``X-Sagemaker-Metrics-Proxy-Hop``): its own health checks, answered 200.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

MAX_HEAD = 4 * 1024 * 1024  # the uvicorn path forwards heads of any size; the model must not be the limit

received: list[dict[str, Any]] = []
HOP_HEADER = "x-sagemaker-metrics-proxy-hop"  # on every request the proxy forwards


class BadRequest(Exception):
    pass


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        line = await reader.readuntil(b"\r\n")
        size_text = line[:-2].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise BadRequest(f"bad chunk size {line!r}") from None
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, up to the blank line
                pass
            return bytes(body)
        body += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise BadRequest("chunk not followed by CRLF")


async def read_request(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head[:-4].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise BadRequest(f"bad request line {lines[0]!r}")
    method, target, version = parts
    headers: list[list[str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise BadRequest(f"bad header line {line!r}")
        headers.append([name.strip(), value.strip()])
    lower = {name.lower(): value for name, value in headers}
    if "chunked" in lower.get("transfer-encoding", "").lower():
        body = await read_chunked(reader)
    else:
        body = await reader.readexactly(int(lower.get("content-length", "0")))
    return {"method": method, "target": target, "version": version, "headers": headers, "body": body.decode("latin-1")}


async def stream(writer: asyncio.StreamWriter) -> None:
    for i in range(3):
        if i:
            await asyncio.sleep(0.1)
        piece = b"chunk-%d\n" % i
        writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        await writer.drain()
    writer.write(b"0\r\n\r\n")
    await writer.drain()


def response(status: str, body: bytes, *, close: bool, head_only: bool = False, extra: bytes = b"") -> bytes:
    head = b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s" % (status.encode(), len(body), extra)
    if close:
        head += b"connection: close\r\n"
    return head + b"\r\n" + (b"" if head_only else body)


def keep_alive(request: dict[str, Any]) -> bool:
    tokens = {
        t.strip().lower() for name, value in request["headers"] if name.lower() == "connection" for t in value.split(",")
    }
    if request["version"] == "HTTP/1.0":
        return "keep-alive" in tokens
    return "close" not in tokens


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                request = await read_request(reader)
            except BadRequest as e:
                writer.write(response("400 Bad Request", json.dumps({"error": str(e)}).encode(), close=True))
                await writer.drain()
                return
            if request is None:
                return
            method, target = request["method"], request["target"]
            if method == "GET" and target == "/__received":
                writer.write(response("200 OK", json.dumps(received).encode(), close=False))
                await writer.drain()
                continue
            if method == "POST" and target == "/__reset":
                received.clear()
                writer.write(response("200 OK", b"{}", close=False))
                await writer.drain()
                continue
            if method == "GET" and not any(n.lower() == HOP_HEADER for n, _ in request["headers"]):
                # Not forwarded by a proxy: its own health check (at start, or of several instances).
                writer.write(response("200 OK", b"{}", close=False))
                await writer.drain()
                continue
            received.append(request)
            respond = next((v for n, v in request["headers"] if n.lower() == "x-respond"), "")
            attributes = next((v for n, v in request["headers"] if n.lower() == "x-amzn-sagemaker-custom-attributes"), None)
            if attributes is not None and attributes.startswith("respond="):
                respond = attributes.removeprefix("respond=")
            echo = b"x-amzn-sagemaker-custom-attributes: echo:%s\r\n" % attributes.encode() if attributes is not None else b""
            close = not keep_alive(request) or respond == "close"
            if respond.startswith("slow="):
                await asyncio.sleep(int(respond.removeprefix("slow=")) / 1000)
            if respond.startswith("status="):
                status = int(respond.removeprefix("status="))
                writer.write(response(f"{status} Error", json.dumps({"error": f"model says {status}"}).encode(), close=close, extra=echo))
            elif respond == "stream-stall":
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n8\r\nchunk-0\n\r\n")
                await writer.drain()
                await reader.read()  # until the proxy gives up and closes
                return
            elif respond in ("head-stall", "head-close"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n")
                await writer.drain()
                if respond == "head-stall":
                    await reader.read()
                return
            elif respond == "stream-die":
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n8\r\nchunk-0\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(b"8\r\nchunk-1\n\r\n")
                await writer.drain()
                return
            elif respond == "stream":
                head = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n" + echo
                writer.write(head + (b"connection: close\r\n" if close else b"") + b"\r\n")
                await writer.drain()
                if method != "HEAD":
                    await stream(writer)
            elif respond == "head-204":
                writer.write(b"HTTP/1.1 204 No Content\r\n" + (b"connection: close\r\n" if close else b"") + b"\r\n")
                await writer.drain()
            else:
                body = json.dumps({"seq": len(received), "method": method, "target": target, "body_bytes": len(request["body"])}).encode()
                if respond.startswith("size="):
                    body = body.ljust(int(respond.removeprefix("size=")))
                writer.write(response("200 OK", body, close=close, head_only=method == "HEAD", extra=echo))
                await writer.drain()
            if close:
                return
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port, limit=MAX_HEAD)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(main(parser.parse_args().port))
