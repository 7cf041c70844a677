"""The invocation record: one request, stamped by the request path and read afterwards by whatever reports it
(the recorder, spans, the access log), the way mitmproxy stamps its flow.

Clock points in monotonic nanoseconds (DESIGN.md section 4); 0 where never reached:

- ``t_in``: the app is called for the request (head parsed).
- ``t_send``: just before the first byte of the request goes to the model.
- ``t_done``: the last byte of the model's response has arrived, or the model call failed.
- ``t_out``: the last byte of the response has been handed to the server.

ModelLatency = ``t_done - t_send`` minus the time spent blocked in ``send()`` to the client meanwhile;
OverheadLatency = ``(t_out - t_in) - ModelLatency``.
"""

from __future__ import annotations

from dataclasses import dataclass

from metrics.recorder import InvocationRecorder
from proxy.errors import Fault
from proxy.upstream.variants import Variant


@dataclass(slots=True)
class Invocation:
    """The record of one request. It imports nothing of the request path: everything reads it, it reads nothing."""

    t_in: int  # the app is called for the request (head parsed)
    variant: Variant | None = None
    counted: bool = False  # an invocation route: recorded in the invocation metrics
    instances: int = 1  # the variant's live instances when it started: n of InvocationsPerInstance
    t_send: int = 0  # just before the request's first byte goes to the model
    t_head: int = 0  # the model's response head arrived
    t_done: int = 0  # the model's last byte arrived, or its call failed; 0: it never ended (client gone)
    t_out: int = 0  # the response's last byte was handed to the server
    blocked_ns: int = 0  # time in send() to the client while the model was still answering
    t_first_byte: int = 0  # a streamed response: the model's first body byte arrived
    t_first_out: int = 0  # a streamed response: its first body chunk is handed to the server
    status: int = 0  # the model's status (read only when there is no fault)
    fault: Fault | None = None
    responded: bool = False  # the response head was handed to the server
    request_bytes: int = 0
    held: int = 0  # of the process's budget for request bodies, given back when the request ends
    admitted: bool = False  # holds a slot at the model (--max-concurrency), given back when the request ends
    response_bytes: int = 0
    input_tokens: int = 0  # OpenAI-compatible responses (proxy.invocation.tokens)
    output_tokens: int = 0
    time_per_output_token_ns: float | None = None
    t_first_token: int = 0  # an OpenAI-compatible stream: the first chunk with generated content arrived
    finish_reason: str | None = None  # of the answer's first choice, as the model said it
    answer: bytes = b""  # an OpenAI-compatible answer's JSON, or its stream's last events: where its model is named
    operation: str | None = None  # with OTel on: the GenAI operation its route is (chat, text_completion, embeddings)
    stream_asked: bool = False  # with OTel on: the request asked for a stream ("stream": true)
    endpoint: str = ""  # the endpoint's name
    model: str | None = None  # the model the request names (a route's {model}), if any
    recorder: InvocationRecorder | None = None  # where it is recorded: its variant's, or with --model-label its model's
    trace_id: str | None = None  # with tracing on (proxy.invocation.tracing): the trace, and the proxy's SERVER span in it
    span_id: str | None = None

    # What the recorder reads (metrics.recorder.Outcome).
    @property
    def abandoned(self) -> bool:
        """The client went away while the model worked: an invocation with no error class and no latency."""
        return self.fault is Fault.CLIENT_DISCONNECT or not self.t_done

    @property
    def upstream_error(self) -> str | None:
        return self.fault.reason if self.fault is not None else None

    @property
    def model_us(self) -> int:
        return (self.t_done - self.t_send - self.blocked_ns) // 1000

    @property
    def overhead_us(self) -> int:
        return (self.t_out - self.t_in - (self.t_done - self.t_send - self.blocked_ns)) // 1000

    @property
    def first_chunk_us(self) -> int | None:
        return (self.t_first_out - self.t_in) // 1000 if self.t_first_out and self.t_first_byte else None

    @property
    def first_chunk_model_us(self) -> int | None:
        return (self.t_first_byte - self.t_send) // 1000 if self.t_first_out and self.t_first_byte else None

    @property
    def mid_stream_error(self) -> bool:
        """The response broke after its head went to the client (the model's fault, not the client's)."""
        fault = self.fault
        return self.responded and fault is not None and fault.invocation and fault.status is not None

    @property
    def time_per_output_token_us(self) -> float | None:
        per_token = self.time_per_output_token_ns
        return None if per_token is None else per_token / 1000

    @property
    def time_to_first_token_us(self) -> int | None:
        return (self.t_first_token - self.t_in) // 1000 if self.t_first_token else None

    @property
    def client_status(self) -> int:
        """The status the client saw: the fault's, 499 when the client went away first, else the model's."""
        fault = self.fault
        return (fault.status or 499) if fault is not None else self.status

    def server_timing(self) -> bytes:
        """``Server-Timing`` as of the response head (or of a failed model call)."""
        end = self.t_head or self.t_done
        return b"model;dur=%.3f, overhead;dur=%.3f" % ((end - self.t_send) / 1e6, (self.t_send - self.t_in) / 1e6)
