"""Tokens of OpenAI-compatible responses, counted as they pass: what vLLM, TGI, llama.cpp and Ollama stream.

A stream is server-sent events (``text/event-stream``), each ``data: {json}`` a chunk of chat completions
(``choices[].delta.content``) or completions (``choices[].text``), ended by ``data: [DONE]``; with
``stream_options.include_usage`` a last chunk carries ``usage``. The parser reads events incrementally
(split across chunks, several per chunk), keeps only the unfinished line, and never changes a byte.
A response that is not an event stream costs nothing: no counter is made for it.
"""

from __future__ import annotations

import json
import re
from typing import Any

EVENT_STREAM = b"text/event-stream"
MAX_LINE = 1 << 20  # an unfinished line or event longer than this is not an OpenAI event: counting stops
MAX_TOKENS = 10**9  # a usage count above this (or below 0) is not believed
MAX_JSON_BODY = 1 << 20  # the largest non-streamed JSON body read for its usage


# A choice that carries output: non-empty text in a chat delta (content, reasoning) or a completion, or a tool call.
# Matched in the raw bytes, in C: a JSON string's own quotes are escaped, so text inside content cannot match.
CONTENT = re.compile(rb'"(?:content|text|reasoning_content)"[ \t]*:[ \t]*"[^"]|"tool_calls"[ \t]*:[ \t]*\[[ \t]*\{')
USAGE = re.compile(rb'"usage"[ \t]*:[ \t]*\{')  # a usage object, not the null OpenAI sends in every other chunk
EVENT_END = re.compile(rb"\r?\n\r?\n")


class StreamTokens:
    """Counts the tokens of one event stream, fed each chunk with the time it arrived (monotonic ns).

    Each chunk is scanned once, in C (a regular expression), up to its last complete event; only an event
    that carries a usage object (one per stream) is decoded as JSON. What follows the last complete event
    is kept, bounded, until its end arrives."""

    __slots__ = ("_partial", "_partial_size", "content_events", "gave_up", "input_tokens", "t_first", "t_last", "usage_output")

    def __init__(self) -> None:
        self._partial: list[bytes] = []  # the unfinished event, in the pieces it came in
        self._partial_size = 0
        self.content_events = 0
        self.input_tokens = 0
        self.usage_output: int | None = None  # completion_tokens from a usage object, when one came
        self.t_first = 0  # arrival of the first and the last chunk that carried content
        self.t_last = 0
        self.gave_up = False

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
        if self.gave_up:
            return
        end = chunk.rfind(b"\n\n") + 2
        if b"\r" in chunk:
            end = max(end, chunk.rfind(b"\n\r\n") + 3)
        if end < 3:  # no event ends in this chunk (2: not found)
            self._partial.append(chunk)
            self._partial_size += len(chunk)
            if self._partial_size > MAX_LINE:
                self._give_up()
            return
        if end == len(chunk) and not self._partial:
            self._scan(chunk, now)  # the usual case: whole events
            return
        complete = chunk[:end]
        if self._partial:
            complete = b"".join(self._partial) + complete
        rest = chunk[end:]
        self._partial, self._partial_size = ([rest], len(rest)) if rest else ([], 0)
        self._scan(complete, now)

    def finish(self, now: int) -> None:
        """The stream ended: an event without its blank line still counts."""
        if self._partial and not self.gave_up:
            self._scan(b"".join(self._partial), now)
        self._partial, self._partial_size = [], 0

    def _give_up(self) -> None:
        self.gave_up = True
        self._partial, self._partial_size = [], 0

    def _scan(self, events: bytes, now: int) -> None:
        # The common form first, two substring counts (vLLM, TGI, OpenAI send compact JSON); else every form.
        found = events.count(b'"content":"')
        if found:
            found -= events.count(b'"content":""')
        if found <= 0 and (b'"text"' in events or b'"tool_calls"' in events or b'content"' in events):
            found = len(CONTENT.findall(events))
        if found:
            self.content_events += found
            if not self.t_first:
                self.t_first = now
            self.t_last = now
        if b'"usage"' in events and USAGE.search(events) is not None:
            for event in EVENT_END.split(events):
                if USAGE.search(event) is not None:
                    self._usage_event(event)

    def _usage_event(self, event: bytes) -> None:
        data = [line[6:] if line[5:6] == b" " else line[5:] for line in event.splitlines() if line.startswith(b"data:")]
        prompt, completion = _usage_of(b"\n".join(data))
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
