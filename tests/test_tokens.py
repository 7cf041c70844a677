"""The event-stream token counter against byte streams cut every possible way."""

from __future__ import annotations

import json
import re

import pytest

from proxy.invocation.tokens import StreamTokens, json_usage


def event(payload: object) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def chat(content: str) -> bytes:
    return event({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": content}}]})


STREAM = (
    event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})  # no token
    + chat("Hello")
    + b": a comment\n\n"
    + chat(" wor")
    + chat("ld")
    + event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})  # no token
    + b"data: [DONE]\n\n"
)


@pytest.mark.parametrize("cut", [1, 2, 7, 64, len(STREAM)])
def test_events_split_across_chunks_and_several_per_chunk(cut: int) -> None:
    tokens = StreamTokens()
    for i, start in enumerate(range(0, len(STREAM), cut)):
        tokens.feed(STREAM[start : start + cut], now=1000 * (i + 1))
    tokens.finish(now=10**9)
    assert (tokens.content_events, tokens.output_tokens, tokens.input_tokens) == (3, 3, 0)


def compact(content: str) -> bytes:
    """A chat chunk as vLLM, TGI and OpenAI write it: compact JSON (the counter's fast path)."""
    return b"data: " + json.dumps({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": content}}]}, separators=(",", ":")).encode() + b"\n\n"


FORMS = {
    "compact": b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n' + b"".join(compact(f" t{i}") for i in range(10)) + b"data: [DONE]\n\n",
    "spaced": STREAM,
    "crlf": STREAM.replace(b"\n", b"\r\n"),
}


@pytest.mark.parametrize("form", FORMS)
def test_tokens_count_when_the_chunk_ending_their_event_arrived_however_chunks_are_cut_and_grouped(form: str) -> None:
    """Every cut of the stream into chunks, fed one at a time and in batches (as the proxy gathers them):
    the same count, and the first and last token stamped with the arrival of the chunk that ended their event,
    also when that event's blank line is split between two chunks."""
    data = FORMS[form]
    texts = [m.start() for m in re.finditer(rb'"content": ?"[^"]', data)]
    first_text, last_text = texts[0], texts[-1]
    ends = [m.end() for m in re.finditer(rb"\r?\n\r?\n", data)]
    first_end = next(e for e in ends if e > first_text)
    last_end = next(e for e in ends if e > last_text)
    expected = {"compact": 10, "spaced": 3, "crlf": 3}[form]
    for cut in range(1, 120):
        chunks = [data[i:i + cut] for i in range(0, len(data), cut)]
        arrivals = [i + 1 for i in range(len(chunks))]  # chunk i arrives at i + 1
        for batch in (1, 2, 3, 7, 32, len(chunks)):
            tokens = StreamTokens()
            for k in range(0, len(chunks), batch):
                tokens.feed_chunks(chunks[k:k + batch], arrivals[k:k + batch])
            tokens.finish(now=10**9)
            got = (tokens.output_tokens, tokens.t_first, tokens.t_last)
            assert got == (expected, (first_end - 1) // cut + 1, (last_end - 1) // cut + 1), (cut, batch, got)


def test_usage_wins_over_the_event_count_and_time_per_token_spans_first_to_last() -> None:
    tokens = StreamTokens()
    tokens.feed(chat("a"), now=1_000_000)
    tokens.feed(chat("b").replace(b"\n", b"\r\n"), now=2_000_000)  # CRLF line ends
    tokens.feed(chat("c"), now=5_000_000)
    tokens.feed(event({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 5}}), now=6_000_000)
    tokens.finish(now=7_000_000)
    assert (tokens.output_tokens, tokens.input_tokens) == (5, 9)
    assert tokens.time_per_output_token_ns() == (5_000_000 - 1_000_000) / 4


def test_the_newest_usage_object_counts_null_ones_do_not_and_any_line_form_is_read() -> None:
    """OpenAI's ``usage: null`` in every chunk but the last; vLLM's continuous usage stats (a usage object
    in every chunk, each counting so far); CRLF lines; a usage event whose JSON spans two data lines."""
    with_null = b"".join(event({"choices": [{"delta": {"content": c}}], "usage": None}) for c in "abc")
    last = event({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3}})
    continuous = b"".join(event({"choices": [{"delta": {"content": c}}], "usage": {"prompt_tokens": 4, "completion_tokens": i + 1}}) for i, c in enumerate("abcde"))
    two_lines = b'data: {"choices": [],\ndata:  "usage": {"prompt_tokens": 2, "completion_tokens": 9}}\n\n'
    for stream, expected in (
        (with_null + last, (4, 3)),
        (continuous, (4, 5)),
        (continuous + event({"choices": [], "usage": None}), (4, 5)),  # the last "usage" is a null: the object before it
        ((with_null + last).replace(b"\n", b"\r\n"), (4, 3)),
        (with_null + two_lines, (2, 9)),
        (with_null, (0, 3)),  # no usage object at all: the content events
    ):
        for cut in (1, 5, 64, len(stream)):
            tokens = StreamTokens()
            for i in range(0, len(stream), cut):
                tokens.feed(stream[i:i + cut], now=i + 1)
            tokens.finish(now=len(stream) + 1)
            assert (tokens.input_tokens, tokens.output_tokens) == expected, (stream[:60], cut)


def test_completions_text_and_an_event_without_its_blank_line() -> None:
    tokens = StreamTokens()
    tokens.feed(b'data: {"choices": [{"text": "x"}]}\n\ndata: {"choices": [{"text": "y"}]}', now=1)
    tokens.finish(now=2)
    assert tokens.output_tokens == 2
    assert tokens.time_per_output_token_ns() == 1.0


def test_not_json_and_an_endless_line_count_nothing() -> None:
    tokens = StreamTokens()
    tokens.feed(b"data: 1\n\ndata: {not json}\n\n", now=1)
    tokens.feed(b"x" * (2 << 20), now=2)  # no newline for 2 MiB: not an OpenAI stream
    tokens.feed(chat("late"), now=3)
    tokens.finish(now=4)
    assert tokens.output_tokens == 0 and tokens.gave_up
    assert tokens.time_per_output_token_ns() is None


def test_json_usage() -> None:
    body = json.dumps({"choices": [{"message": {"content": "hi"}}], "usage": {"prompt_tokens": 3, "completion_tokens": 7}}).encode()
    assert json_usage(b"application/json; charset=utf-8", body) == (3, 7)
    assert json_usage(b"text/plain", body) is None
    assert json_usage(b"application/json", b'{"predictions": [1]}') is None
    assert json_usage(b"application/json", b'{"usage": 1') is None


def test_what_a_broken_or_hostile_model_sends_counts_nothing_and_holds_nothing() -> None:
    deep = b"data: " + b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b"\n\n"
    tokens = StreamTokens()
    tokens.feed(deep, now=1)  # nested past Python's recursion limit: not counted, no exception
    tokens.finish(now=2)
    assert tokens.output_tokens == 0
    assert json_usage(b"application/json", b'{"usage": ' + b"[" * 100_000 + b"]" * 100_000 + b"}") is None
    many = StreamTokens()
    for _ in range(2000):
        many.feed(b"data: " + b"x" * 1000 + b"\n", now=1)  # data lines and never the blank line that ends the event
    assert many.gave_up and not many._partial  # bounded, not 2 MB held
    long = StreamTokens()
    for _ in range(20_000):
        long.feed(b"y" * 100, now=1)  # a 2 MB line in small pieces
    assert long.gave_up and not long._partial


@pytest.mark.parametrize("count", [-5, True, 10**400, 1.5, "7"])
def test_usage_counts_that_are_not_token_counts_are_ignored(count: object) -> None:
    tokens = StreamTokens()
    tokens.feed(chat("a") + b'data: {"choices": [], "usage": {"prompt_tokens": ' + json.dumps(count).encode() + b', "completion_tokens": ' + json.dumps(count).encode() + b"}}\n\n", now=1)
    tokens.finish(now=2)
    assert (tokens.input_tokens, tokens.output_tokens) == (0, 1)  # the event count stands
