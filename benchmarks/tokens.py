"""What counting tokens costs inside the process: the token counter timed on the example model's stream.

    python -m benchmarks.tokens

The wrk benchmark compares a proxy that counts tokens with one that does not, but on a shared machine
two identical proxies differ by several percent from run to run, which is more than counting costs.
This times the counter itself (proxy.invocation.tokens.StreamTokens) on the example model's OpenAI-compatible
stream of 10 tokens, without and with the usage chunk that ``stream_options.include_usage`` asks for,
the two ways the request path hands it over: the whole stream at once (it came with its head, in one read) and its
chunks gathered in one batch (they came one by one). Prints microseconds per stream.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import timeit
from functools import partial

from example_model import chat
from proxy.invocation.tokens import StreamTokens
from proxy.types import Message


def model_chunks(tokens: int, include_usage: bool) -> list[bytes]:
    """The body chunks the example model writes for a streamed chat completion of ``tokens`` tokens."""
    chunks: list[bytes] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            chunks.append(message["body"])

    asyncio.run(chat.stream(send, True, 7, tokens, include_usage, 0.0))
    return chunks


def whole(body: bytes) -> None:
    counter = StreamTokens()
    counter.feed(body, 1)
    counter.finish(1)
    counter.time_per_output_token_ns()


def batch(chunks: list[bytes], arrivals: list[int]) -> None:
    counter = StreamTokens()
    counter.feed_chunks(chunks, arrivals)
    counter.finish(arrivals[-1])
    counter.time_per_output_token_ns()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tokens", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--tokens", type=int, default=10)
    parser.add_argument("--number", type=int, default=100_000)
    args = parser.parse_args(argv)
    for include_usage in (False, True):
        chunks = model_chunks(args.tokens, include_usage)
        body = b"".join(chunks)
        arrivals = list(range(1, len(chunks) + 1))
        counter = StreamTokens()
        counter.feed(body, 1)
        assert counter.output_tokens == args.tokens, counter.output_tokens
        print(f"A {args.tokens}-token stream {'with' if include_usage else 'without'} a usage chunk: {len(body):,} bytes in {len(chunks)} chunks")
        for name, run in (("whole, in one read", partial(whole, body)), (f"{len(chunks)} chunks, one batch", partial(batch, chunks, arrivals))):
            median = sorted(timeit.repeat(run, number=args.number, repeat=5))[2] / args.number
            print(f"- {name}: {median * 1e6:.2f} us per stream (median of 5 x {args.number:,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
