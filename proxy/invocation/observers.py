"""Per-chunk measurements of a response on its way back: small objects the stream-back loop calls, chosen once
per response (``for_response``). A response that nothing observes pays nothing.

Each observer is told, for every body chunk, when it ``arrived`` from the model (monotonic ns, before it goes
on) and once it was ``sent`` to the client (``t0``: just before the hand-over), and at the end, after the last
byte went out, that the response ``ended`` (``last``: the last chunk's arrival). What they find goes into the
invocation record or the variant's recorder; the client never waits for it."""

from __future__ import annotations

from metrics.recorder import InvocationRecorder
from proxy.http.client import UpstreamResponse
from proxy.invocation.record import Invocation
from proxy.invocation.tokens import (
    EVENT_STREAM,
    MAX_JSON_BODY,
    TOKEN_BATCH_BYTES,
    TOKEN_BATCH_CHUNKS,
    StreamTokens,
    finish_reason,
    json_usage,
)


class Observer:
    """Looks at nothing; the measurements below each override what they need, and say whether they look at
    every chunk's arrival and hand-over or only the first's (the loop then calls them no more)."""

    __slots__ = ()

    each_arrival = False
    each_sent = False

    def arrived(self, record: Invocation, chunk: bytes, now: int) -> None:
        pass

    def sent(self, record: Invocation, chunk: bytes, t0: int) -> None:
        pass

    def ended(self, record: Invocation, last: int) -> None:
        pass

    def whole(self, record: Invocation, body: bytes, arrived: int, t0: int) -> None:
        """A response that came whole with its head, after it went out: one chunk, arrived and sent, then ended."""
        if body:
            self.arrived(record, body, arrived)
            self.sent(record, body, t0)
        self.ended(record, arrived)


class FirstChunk(Observer):
    """A streamed response's first body byte: when it came from the model, and when it went on to the client."""

    __slots__ = ()

    def arrived(self, record: Invocation, chunk: bytes, now: int) -> None:
        if not record.t_first_byte:
            record.t_first_byte = now

    def sent(self, record: Invocation, chunk: bytes, t0: int) -> None:
        if not record.t_first_out:
            record.t_first_out = t0


class InterChunk(Observer):
    """The model's gaps between chunks, less any time spent blocked on the client meanwhile."""

    __slots__ = ("_blocked", "_last", "_recorder")

    each_arrival = True

    def __init__(self, recorder: InvocationRecorder) -> None:
        self._recorder = recorder
        self._last = 0  # the previous chunk's arrival
        self._blocked = 0  # blocked_ns when it arrived

    def arrived(self, record: Invocation, chunk: bytes, now: int) -> None:
        if self._last:
            self._recorder.inter_chunk((now - self._last - (record.blocked_ns - self._blocked)) // 1000)
        self._last, self._blocked = now, record.blocked_ns


class WholeTokens(Observer):
    """The tokens of an event stream that came whole with its head: one scan, nothing kept between calls."""

    __slots__ = ()

    def whole(self, record: Invocation, body: bytes, arrived: int, t0: int) -> None:
        tokens = StreamTokens()
        tokens.feed(body, arrived)
        tokens.finish(arrived)
        _tokens_to(record, tokens)


class StreamedTokens(Observer):
    """The tokens of an OpenAI-compatible event stream, scanned a batch of chunks at a time once they went out."""

    __slots__ = ("_arrivals", "_pending", "_scanned", "_size", "_tokens")

    each_arrival = True
    each_sent = True

    def __init__(self) -> None:
        self._tokens = StreamTokens()
        self._pending: list[bytes] = []  # chunks passed on and not yet scanned, with their arrivals
        self._arrivals: list[int] = []
        self._size = 0  # bytes passed on, and when the last batch was scanned
        self._scanned = 0

    def arrived(self, record: Invocation, chunk: bytes, now: int) -> None:
        self._pending.append(chunk)
        self._arrivals.append(now)

    def sent(self, record: Invocation, chunk: bytes, t0: int) -> None:
        self._size += len(chunk)
        if len(self._pending) >= TOKEN_BATCH_CHUNKS or self._size - self._scanned >= TOKEN_BATCH_BYTES:
            self._tokens.feed_chunks(self._pending, self._arrivals)  # one call per batch, not per chunk
            self._pending, self._arrivals, self._scanned = [], [], self._size

    def ended(self, record: Invocation, last: int) -> None:
        tokens = self._tokens
        if len(self._pending) == 1:
            tokens.feed(self._pending[0], self._arrivals[0])
        elif self._pending:
            tokens.feed_chunks(self._pending, self._arrivals)
        tokens.finish(last)
        _tokens_to(record, tokens)


class JsonUsage(Observer):
    """The usage object of a whole (not streamed) OpenAI-compatible JSON answer, kept bounded until its end."""

    __slots__ = ("_content_type", "_parts")

    each_arrival = True

    def __init__(self, content_type: bytes) -> None:
        self._content_type = content_type
        self._parts: list[bytes] = []

    def arrived(self, record: Invocation, chunk: bytes, now: int) -> None:
        self._parts.append(chunk)

    def ended(self, record: Invocation, last: int) -> None:
        body = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        usage = json_usage(self._content_type, body)
        if usage is not None:
            record.input_tokens, record.output_tokens = usage
            record.finish_reason = finish_reason(body)
            record.answer = body


def _tokens_to(record: Invocation, tokens: StreamTokens) -> None:
    """What a stream's tokens say, on its record: counts, time per token, time to the first token, finish reason."""
    record.input_tokens = tokens.input_tokens
    record.output_tokens = tokens.output_tokens
    record.time_per_output_token_ns = tokens.time_per_output_token_ns()
    if tokens.t_first:
        record.t_first_token = tokens.t_first
    record.finish_reason = tokens.finish_reason()
    record.answer = tokens.tail


FIRST_CHUNK = FirstChunk()  # it keeps nothing of its own: one for all responses
WHOLE_TOKENS = WholeTokens()
NOTHING: tuple[Observer, ...] = ()


def for_response(response: UpstreamResponse, record: Invocation, count_tokens: bool) -> tuple[Observer, ...]:
    """The observers of one response: first chunk and gaps for a stream (chunked, or read to the close), its
    tokens for a counted event stream, and the usage object of a counted JSON answer."""
    streamed = response.streamed
    recorder = record.recorder
    if not record.counted or recorder is None:
        return (FIRST_CHUNK,) if streamed else NOTHING
    content_type = next((v for n, v in response.headers if n == b"content-type"), b"")
    if streamed:
        if count_tokens and content_type.startswith(EVENT_STREAM):
            if response.complete:  # one chunk: no gaps to measure, one scan
                return FIRST_CHUNK, WHOLE_TOKENS
            return FIRST_CHUNK, InterChunk(recorder), StreamedTokens()
        if count_tokens and response.complete:
            return FIRST_CHUNK, InterChunk(recorder), JsonUsage(content_type)
        return FIRST_CHUNK, InterChunk(recorder)
    if count_tokens and content_type.startswith(b"application/json"):
        if response.complete:
            return (JsonUsage(content_type),)
        length = next((v for n, v in response.headers if n == b"content-length"), b"")
        if length.isdigit() and int(length) <= MAX_JSON_BODY:
            return (JsonUsage(content_type),)
    return NOTHING
