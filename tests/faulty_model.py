"""A model server that misbehaves on request, at the byte level, for the proxy's fault tests.

Run as ``python tests/faulty_model.py --port N``. The request header ``X-Fault`` picks the misbehaviour:

- ``reset``: close the connection (RST) without answering.
- ``malformed``: answer bytes that are not HTTP.
- ``truncate``: send a head with Content-Length 100 and 10 bytes, then close.
- ``hang``: never answer; count the connection when the peer closes it (``GET /stats``).
- ``slow-body``: send a 200 head, then 5 chunks 100 ms apart (chunked).
- anything else, or none: 200 with body ``ok``.

``GET /stats`` answers ``{"requests": n, "hung_closed_by_peer": k}``; ``GET /ping`` answers 200 and is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct

stats = {"requests": 0, "hung_closed_by_peer": 0}


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
    try:
        while True:
            request = await read_request(reader)
            if request is None:
                return
            line, headers = request
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


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(main(parser.parse_args().port))
