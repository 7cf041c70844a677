"""Phase 3 of the request path: the model's response back to the client, timed as it goes.

ModelLatency stops counting while a write to the client blocks (``record.blocked_ns``); the invocation timeout
then gives way to the client's write timeout (``Guard.writing``). Per-chunk measurements are observers
(``proxy.invocation.observers``), chosen once per response."""

from __future__ import annotations

from collections.abc import Callable

from proxy.http.client import UpstreamResponse
from proxy.invocation import observers
from proxy.invocation.guard import Guard
from proxy.invocation.headers import response_headers
from proxy.invocation.record import Invocation
from proxy.types import Message, Send


async def stream_back(
    response: UpstreamResponse, record: Invocation, send: Send, guard: Guard, clock: Callable[[], int], count_tokens: bool
) -> None:
    """The model's response to the client: whole if it is in already, else chunk by chunk as it comes; the
    observers chosen for the response look at each chunk as it passes."""
    assert record.variant is not None
    headers = response_headers(response.status, response.headers, record.server_timing(), record.variant.name)
    start = {"type": "http.response.start", "status": response.status, "headers": headers}
    watching = observers.for_response(response, record, count_tokens)
    chunk = response.take_buffered()
    arrived = record.t_head  # when the chunk in hand came from the model
    if response.complete:
        record.t_done = arrived
        guard.stop()
        record.response_bytes, record.responded = len(chunk), True
        await send(start)
        t0 = clock() if watching else 0
        await send({"type": "http.response.body", "body": chunk})
        record.t_out = clock()
        for o in watching:  # after the answer went out: the client does not wait for them
            o.whole(record, chunk, arrived, t0)
        return
    arrived = await _chunks(response, record, send, guard, clock, start, watching, chunk)
    for o in watching:  # every chunk was seen on the way; after the answer went out, the end
        o.ended(record, arrived)


async def _chunks(
    response: UpstreamResponse, record: Invocation, send: Send, guard: Guard, clock: Callable[[], int],
    start: Message, watching: tuple[observers.Observer, ...], chunk: bytes,
) -> int:
    """A response still arriving, chunk by chunk as it comes; the last chunk's arrival. Time blocked in
    ``send()`` before the model's last byte is the client's, not the model's."""
    arrived = t0 = record.t_head  # when the chunk in hand came from the model
    if not chunk:
        # The head waits for the first body byte, so a model that fails before it gets a real answer (502, 504).
        record.blocked_ns += clock() - t0  # the proxy's work on the head is not the model's
        chunk = await response.read()
        t0 = arrived = clock()
    if chunk:
        for o in watching:  # as it arrived: what is blocked from here on is the client's
            o.arrived(record, chunk, arrived)
    record.responded = True
    await send(start)
    record.blocked_ns += clock() - t0
    # Past the first chunk, only the observers that look at every chunk are called.
    arriving = tuple(o for o in watching if o.each_arrival)
    sending, after_first = watching, tuple(o for o in watching if o.each_sent)
    while chunk:
        record.response_bytes += len(chunk)
        t0 = clock()
        guard.writing()
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        record.blocked_ns += clock() - t0
        guard.rearm()
        for o in sending:
            o.sent(record, chunk, t0)
        sending = after_first
        chunk = await response.read()
        if not chunk:
            break
        arrived = clock()
        for o in arriving:
            o.arrived(record, chunk, arrived)
    record.t_done = clock()
    guard.stop()
    await send({"type": "http.response.body", "body": b""})
    record.t_out = clock()
    return arrived
