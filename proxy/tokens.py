"""Tokens of OpenAI-compatible responses, counted as they pass: what vLLM, TGI, llama.cpp and Ollama stream.

A stream is server-sent events (``text/event-stream``), each ``data: {json}`` a chunk of chat completions
(``choices[].delta.content``) or completions (``choices[].text``), ended by ``data: [DONE]``; with
``stream_options.include_usage`` a last chunk carries ``usage``. The parser reads events incrementally
(split across chunks, several per chunk), keeps only the unfinished line, and never changes a byte.
A response that is not an event stream costs nothing: no counter is made for it.
"""

from __future__ import annotations

import json
from typing import Any

EVENT_STREAM = b"text/event-stream"
MAX_LINE = 1 << 20  # an unfinished line or event longer than this is not an OpenAI event: counting stops
MAX_TOKENS = 10**9  # a usage count above this (or below 0) is not believed
MAX_JSON_BODY = 1 << 20  # the largest non-streamed JSON body read for its usage


class StreamTokens:
    """Counts the tokens of one event stream, fed each chunk with the time it arrived (monotonic ns)."""

    __slots__ = ("_data", "_data_size", "_partial", "_partial_size", "content_events", "gave_up", "input_tokens", "t_first", "t_last", "usage_output")

    def __init__(self) -> None:
        self._partial: list[bytes] = []  # the pieces of the unfinished line: joined once, when it ends
        self._partial_size = 0
        self._data: list[bytes] = []  # the data lines of the event being read
        self._data_size = 0
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

    def _give_up(self) -> None:
        self.gave_up = True
        self._partial, self._data = [], []

    def feed(self, chunk: bytes, now: int) -> None:
        if self.gave_up:
            return
        if b"\n" not in chunk:
            self._partial.append(chunk)
            self._partial_size += len(chunk)
            if self._partial_size > MAX_LINE:
                self._give_up()
            return
        if self._partial:
            chunk = b"".join(self._partial) + chunk
            self._partial, self._partial_size = [], 0
        lines = chunk.split(b"\n")
        rest = lines.pop()
        if rest:
            self._partial, self._partial_size = [rest], len(rest)
            if len(rest) > MAX_LINE:
                self._give_up()
                return
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                self._dispatch(now)
            elif line.startswith(b"data:"):
                piece = line[6:] if line[5:6] == b" " else line[5:]
                self._data.append(piece)
                self._data_size += len(piece)
                if self._data_size > MAX_LINE:
                    self._give_up()
                    return
            # event:, id:, retry: and comments (":") carry no tokens

    def finish(self, now: int) -> None:
        """The stream ended: an event without its blank line still counts."""
        if self._partial and not self.gave_up:
            self.feed(b"\n", now)
        if self.gave_up:
            return
        self._dispatch(now)

    def _dispatch(self, now: int) -> None:
        if not self._data:
            return
        payload = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
        self._data, self._data_size = [], 0
        if payload[:1] != b"{":
            return  # [DONE], or not JSON
        try:
            event = json.loads(payload)
        except (ValueError, RecursionError):  # not JSON, or nested past Python's limit
            return
        if not isinstance(event, dict):
            return
        usage = event.get("usage")
        if isinstance(usage, dict):
            prompt, completion = _usage(usage)
            if prompt is not None:
                self.input_tokens = prompt
            if completion is not None:
                self.usage_output = completion
        choices = event.get("choices")
        if isinstance(choices, list) and any(_has_content(c) for c in choices):
            self.content_events += 1
            if not self.t_first:
                self.t_first = now
            self.t_last = now


def _has_content(choice: Any) -> bool:
    if not isinstance(choice, dict):
        return False
    delta = choice.get("delta")
    if isinstance(delta, dict) and (delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls")):
        return True
    return bool(choice.get("text"))


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
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    usage = document.get("usage") if isinstance(document, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt, completion = _usage(usage)
    return prompt or 0, completion or 0
