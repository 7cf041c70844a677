"""Tokens of OpenAI-compatible responses, counted as they pass: what vLLM, TGI, llama.cpp and Ollama stream.

A stream is server-sent events (``text/event-stream``), each ``data: {json}`` a chunk of chat completions
(``choices[].delta.content``) or completions (``choices[].text``), ended by ``data: [DONE]``; with
``stream_options.include_usage`` a last chunk carries ``usage``. The parser reads events incrementally
(split across chunks, several per chunk), keeps only the unfinished event, and never changes a byte.
The proxy hands it a stream's chunks a few at a time (a bounded batch, after they went to the client),
so a token stream costs one scan per batch, not one call per chunk. A response that is not an event
stream costs nothing: no counter is made for it.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Sequence
from typing import Any

EVENT_STREAM = b"text/event-stream"
MAX_LINE = 1 << 20  # an unfinished line or event longer than this is not an OpenAI event: counting stops
MAX_TOKENS = 10**9  # a usage count above this (or below 0) is not believed
MAX_JSON_BODY = 1 << 20  # the largest non-streamed JSON body read for its usage
# A stream's chunks are scanned a batch at a time (StreamTokens.feed_chunks): at most this many chunks, or
# about this many bytes, are held past the client before their scan. The counts are the same as chunk by chunk.
TOKEN_BATCH_CHUNKS = 32
TOKEN_BATCH_BYTES = 16 << 10


# A choice that carries output: non-empty text in a chat delta (content, reasoning) or a completion, or a tool call.
# Matched in the raw bytes, in C: a JSON string's own quotes are escaped, so text inside content cannot match.
CONTENT = re.compile(rb'"(?:content|text|reasoning_content)"[ \t]*:[ \t]*"[^"]|"tool_calls"[ \t]*:[ \t]*\[[ \t]*\{')
FINISH = re.compile(rb'"finish_reason"[ \t]*:[ \t]*"([A-Za-z_]{1,32})"')  # null (not yet finished) does not match
TAIL = 2048  # the end of a stream kept for its finish reason, which comes in one of the last events
USAGE = re.compile(rb'"usage"[ \t]*:[ \t]*\{')  # a usage object, not the null OpenAI sends in every other chunk
COMPACT = b'"content":"'  # how vLLM, TGI and OpenAI write a chat delta's text: counted without a regular expression
COMPACT_EMPTY = b'"content":""'


class StreamTokens:
    """Counts the tokens of one event stream, fed each chunk with the time it arrived (monotonic ns).

    Each chunk is scanned once, in C (a regular expression), up to its last complete event; only an event
    that carries a usage object (one per stream) is decoded as JSON. What follows the last complete event
    is kept, bounded, until its end arrives."""

    __slots__ = ("_partial", "_partial_size", "_tail", "content_events", "gave_up", "input_tokens", "t_first", "t_last", "usage_output")

    def __init__(self) -> None:
        self._partial: list[bytes] = []  # the unfinished event, in the pieces it came in
        self._partial_size = 0
        self.content_events = 0
        self.input_tokens = 0
        self.usage_output: int | None = None  # completion_tokens from a usage object, when one came
        self.t_first = 0  # arrival of the first and the last chunk that carried content
        self.t_last = 0
        self.gave_up = False
        self._tail = b""  # the end of what was scanned, for the finish reason

    @property
    def output_tokens(self) -> int:
        return self.usage_output if self.usage_output is not None else self.content_events

    def time_per_output_token_ns(self) -> float | None:
        """From the first token to the last, over the tokens minus one; None under two tokens."""
        tokens = self.output_tokens
        if tokens < 2 or not self.t_first:
            return None
        return (self.t_last - self.t_first) / (tokens - 1)

    def feed(self, chunk: bytes, now: int) -> None:
        """One chunk, arrived at ``now``."""
        if not self._partial and not self.gave_up and chunk.endswith(b"\n\n"):
            self._scan(chunk, 0, (chunk,), (now,), len(chunk))  # whole events, the usual case: nothing held
        else:
            self.feed_chunks([chunk], [now])

    def feed_chunks(self, chunks: list[bytes], arrivals: list[int]) -> None:
        """Several chunks in the order they came, each with its arrival: one scan for all of them.

        An event's tokens count at the arrival of the chunk that completed it, however the chunks are
        grouped; so a caller may gather a few chunks (bounded) and pay one call instead of one per chunk."""
        if self.gave_up:
            return
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        # Where the last complete event ends in ``data``; its blank line may have begun in what is held.
        tail = b"".join(self._partial[-3:])[-3:] if self._partial else b""
        probe = tail + data if tail else data
        end = probe.rfind(b"\n\n")
        end = end + 2 if end >= 0 else 0
        if end != len(probe) and b"\r" in probe:  # no CRLF blank line can end later than the last byte
            crlf = probe.rfind(b"\n\r\n")
            end = max(end, crlf + 3 if crlf >= 0 else 0)
        end -= len(tail)  # in ``data``: past its last complete event
        if end <= 0:  # no event ends here
            self._partial.append(data)
            self._partial_size += len(data)
            if self._partial_size > MAX_LINE:
                self._give_up()
            return
        shift = 0  # where ``data`` starts in what is scanned
        if self._partial:
            held = b"".join(self._partial)
            shift = len(held)
            complete = held + data[:end]
        else:
            complete = data if end == len(data) else data[:end]
        rest = data[end:]
        self._partial, self._partial_size = ([rest], len(rest)) if rest else ([], 0)
        self._scan(complete, shift, chunks, arrivals, len(data))

    def finish(self, now: int) -> None:
        """The stream ended: an event without its blank line still counts."""
        if self._partial and not self.gave_up:
            events = b"".join(self._partial)
            self._scan(events, 0, [events], [now], len(events))
        self._partial, self._partial_size = [], 0

    @property
    def tail(self) -> bytes:
        """The end of what was scanned: the stream's last events."""
        return self._tail

    def finish_reason(self) -> str | None:
        """The last finish reason the stream's end names (once the stream finished)."""
        return finish_reason(self._tail)

    def _give_up(self) -> None:
        self.gave_up = True
        self._partial, self._partial_size = [], 0

    def _scan(self, events: bytes, shift: int, chunks: Sequence[bytes], arrivals: Sequence[int], size: int) -> None:
        """Count the complete events ``events``; ``chunks`` (``size`` bytes in all) begin at ``shift`` in them."""
        self._tail = events[-TAIL:] if len(events) > TAIL else events
        # The common form first, substring counts (vLLM, TGI, OpenAI send compact JSON); else every form.
        found = events.count(COMPACT)
        if found:
            found -= events.count(COMPACT_EMPTY)
        first = last = -1  # where the first and the last content event start (several chunks only)
        if found > 0:
            if len(arrivals) > 1:
                first = events.find(COMPACT)
                while events.startswith(b'"', first + len(COMPACT)):  # an empty one: no token
                    first = events.find(COMPACT, first + 1)
                last = events.rfind(COMPACT)
                while events.startswith(b'"', last + len(COMPACT)):
                    last = events.rfind(COMPACT, 0, last)
        elif b'"text"' in events or b'"tool_calls"' in events or b'content"' in events:
            starts = [m.start() for m in CONTENT.finditer(events)]
            found = len(starts)
            if found:
                first, last = starts[0], starts[-1]
        if found > 0:
            self.content_events += found
            if len(arrivals) == 1:
                if not self.t_first:
                    self.t_first = arrivals[0]
                self.t_last = arrivals[0]
            else:
                crlf = b"\r" in events
                if not self.t_first:
                    self.t_first = _arrival(events, first, crlf, shift, chunks, arrivals, size)
                self.t_last = _arrival(events, last, crlf, shift, chunks, arrivals, size)
        # Only the newest usage object is decoded: with continuous usage stats every event has one, each
        # counting so far, and OpenAI's other events carry "usage": null. Usually it is the last "usage" of
        # all; else one pass in C finds it.
        position = events.rfind(b'"usage"')
        if position >= 0:
            match = USAGE.match(events, position)
            if match is None:
                older = deque(USAGE.finditer(events, 0, position), maxlen=1)
                match = older[0] if older else None
            if match is not None:
                self._usage_event(_event_at(events, match.start()))

    def _usage_event(self, event: bytes) -> None:
        """Take the counts of an event's usage object, those that are counts."""
        event = event.strip()
        if event.startswith(b"data:") and b"\n" not in event:  # one data line, as every server sends it
            document = event[5:]
        else:
            document = b"\n".join(line[6:] if line[5:6] == b" " else line[5:] for line in event.splitlines() if line.startswith(b"data:"))
        prompt, completion = _usage_of(document)
        if prompt is not None:
            self.input_tokens = prompt
        if completion is not None:
            self.usage_output = completion


def _usage(usage: dict[str, Any]) -> tuple[int | None, int | None]:
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    return _count(prompt), _count(completion)


def _count(value: Any) -> int | None:
    """A token count the model reported, if it is one: a whole number from 0 to MAX_TOKENS."""
    return value if type(value) is int and 0 <= value <= MAX_TOKENS else None


def finish_reason(text: bytes) -> str | None:
    """The last finish reason in ``text`` (an answer, or a stream's end), or None."""
    position = text.rfind(b'"finish_reason"')
    while position >= 0:
        found = FINISH.match(text, position)
        if found is not None:
            return found.group(1).decode()
        position = text.rfind(b'"finish_reason"', 0, position)
    return None


def json_usage(content_type: bytes, body: bytes) -> tuple[int, int] | None:
    """The (input, output) tokens of a non-streamed OpenAI-compatible JSON response, if it has a usage object."""
    if not content_type.startswith(b"application/json") or len(body) > MAX_JSON_BODY or b'"usage"' not in body:
        return None
    prompt, completion = _usage_of(body)
    if prompt is None and completion is None:
        return None
    return prompt or 0, completion or 0


def _usage_of(document: bytes) -> tuple[int | None, int | None]:
    """The (prompt, completion) counts of a JSON document's usage object; None for each it lacks."""
    try:
        parsed = json.loads(document)
    except (ValueError, RecursionError):  # not JSON, or nested past Python's limit
        return None, None
    usage = parsed.get("usage") if isinstance(parsed, dict) else None
    return _usage(usage) if isinstance(usage, dict) else (None, None)


def _event_end(events: bytes, position: int, crlf: bool) -> int:
    """Where the event holding ``events[position]`` ends: past its blank line, else at the end of ``events``."""
    end = events.find(b"\n\n", position)
    end = end + 2 if end >= 0 else len(events)
    if crlf:
        other = events.find(b"\n\r\n", position)
        if 0 <= other and other + 3 < end:
            end = other + 3
    return end


def _event_at(events: bytes, position: int) -> bytes:
    """The event that holds ``events[position]``, from the blank line before it to the one after it."""
    crlf = b"\r" in events
    start = events.rfind(b"\n\n", 0, position)
    if crlf:
        start = max(start, events.rfind(b"\n\r\n", 0, position))
    return events[start + 1:_event_end(events, position, crlf)]


def _arrival(events: bytes, start: int, crlf: bool, shift: int, chunks: Sequence[bytes], arrivals: Sequence[int], size: int) -> int:
    """When the event holding ``events[start]`` was complete: the arrival of the chunk its blank line ended in.

    The chunks, ``size`` bytes in all, begin at ``shift`` in ``events``. They are walked from the nearer end:
    a batch's first content event is near its front, its last near its back."""
    end = _event_end(events, start, crlf)
    end -= shift  # in the joined chunks
    if end <= size - end:
        position = 0
        for chunk, arrival in zip(chunks, arrivals, strict=True):
            position += len(chunk)
            if position >= end:
                return arrival
        return arrivals[-1]
    position = size
    for i in range(len(chunks) - 1, 0, -1):
        position -= len(chunks[i])
        if position < end:
            return arrivals[i]
    return arrivals[0]
