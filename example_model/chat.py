"""An OpenAI-compatible completions endpoint with no language model behind it, for trying streams and tokens.

``POST /v1/chat/completions`` and ``POST /v1/completions`` answer ``max_tokens`` words (default 16) of a fixed
text, one word per token, as vLLM or TGI would: a JSON document with ``usage``, or with ``"stream": true``
server-sent events (a role chunk, one chunk per token, a finish chunk, a ``usage`` chunk when
``stream_options.include_usage`` is set, and ``data: [DONE]``). Prompt tokens are the prompt's words. With test
knobs, ``X-Test-Delay-Ms`` waits before the first token and ``X-Test-Stream-Interval-Ms`` between tokens.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

TEXT = (
    "the proxy measures what the model took and what was added on the way so that every endpoint reports "
    "invocations errors and latency as sagemaker would"
).split()
MAX_TOKENS = 4096


class ChatError(ValueError):
    pass


def parse(body: bytes, chat: bool) -> tuple[int, int, bool, bool]:
    """(prompt tokens, max tokens, stream, include usage) of a request; ChatError for a bad one."""
    try:
        request = json.loads(body)
    except ValueError:
        raise ChatError("the body must be JSON") from None
    if not isinstance(request, dict):
        raise ChatError("the body must be a JSON object")
    if chat:
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ChatError("messages must be a non-empty list")
        prompt = " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    else:
        given = request.get("prompt")
        if not isinstance(given, str):
            raise ChatError("prompt must be a string")
        prompt = given
    max_tokens = request.get("max_tokens", 16)
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_TOKENS:
        raise ChatError(f"max_tokens must be an integer from 1 to {MAX_TOKENS}")
    options = request.get("stream_options") or {}
    return len(prompt.split()), max_tokens, bool(request.get("stream")), bool(isinstance(options, dict) and options.get("include_usage"))


def _words(n: int) -> list[str]:
    return [TEXT[i % len(TEXT)] for i in range(n)]


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def document(chat: bool, prompt_tokens: int, max_tokens: int) -> bytes:
    text = " ".join(_words(max_tokens))
    choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    kind = "chat.completion" if chat else "text_completion"
    return json.dumps({"id": "cmpl-example", "object": kind, "model": "example", "choices": [choice], "usage": _usage(prompt_tokens, max_tokens)}).encode()


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def stream(
    send: Any, chat: bool, prompt_tokens: int, max_tokens: int, include_usage: bool, interval_s: float, first_token_s: float = 0.0
) -> None:
    """The stream: ``first_token_s`` between the role chunk (sent at once) and the first token, as a model's
    prefill; ``interval_s`` between tokens."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choice: dict[str, Any]) -> bytes:
        return _event({"id": "cmpl-example", "object": kind, "model": "example", "choices": [{"index": 0, **choice}]})

    headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    if chat:
        await send({"type": "http.response.body", "body": chunk({"delta": {"role": "assistant", "content": ""}}), "more_body": True})
    if first_token_s:
        await asyncio.sleep(first_token_s)
    for i, word in enumerate(_words(max_tokens)):
        if i and interval_s:
            await asyncio.sleep(interval_s)
        token = word if i == 0 else " " + word
        body = chunk({"delta": {"content": token}} if chat else {"text": token})
        await send({"type": "http.response.body", "body": body, "more_body": True})
    end = chunk({"delta": {}, "finish_reason": "length"} if chat else {"text": "", "finish_reason": "length"})
    if include_usage:
        end += _event({"id": "cmpl-example", "object": kind, "model": "example", "choices": [], "usage": _usage(prompt_tokens, max_tokens)})
    await send({"type": "http.response.body", "body": end + b"data: [DONE]\n\n", "more_body": True})
    await send({"type": "http.response.body", "body": b""})
