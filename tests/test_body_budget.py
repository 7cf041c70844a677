"""Request bodies are read whole before forwarding, so the bytes held at once are bounded per process
(--max-buffered-bytes): many clients sending the largest bodies to a slow model cannot take the memory."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import psutil
import pytest

from tests.conftest import Proxy, Running

pytestmark = pytest.mark.e2e

MIB = 1 << 20
CLIENTS = 60
BODY = 6 * MIB  # the default --max-payload-bytes
BUDGET = 32 * MIB


def upload(port: int, statuses: list[int]) -> None:
    head = (
        b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        b"X-Fault: delay=1000\r\nContent-Length: %d\r\n\r\n" % BODY
    )
    body = b"x" * BODY
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(head)
            try:
                s.sendall(body)
            except OSError:
                pass  # refused before its body was read: the proxy closed the connection
            answer = s.recv(64)
            statuses.append(int(answer.split(b" ")[1]) if answer.startswith(b"HTTP/1.1 ") else 0)
    except OSError:
        statuses.append(0)


@pytest.mark.parametrize("server", ["builtin", "uvicorn"])
def test_many_large_bodies_at_once_stay_within_the_budget_and_each_is_counted_once(
    faulty_model: Running, start_proxy: Callable[..., Proxy], server: str
) -> None:
    proxy = start_proxy(faulty_model.url, "--max-buffered-bytes", str(BUDGET), "--http-server", server)
    process = psutil.Process(proxy.proc.pid)
    baseline = process.memory_info().rss
    peak = baseline
    statuses: list[int] = []
    threads = [threading.Thread(target=upload, args=(proxy.port, statuses)) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak = max(peak, process.memory_info().rss)
        time.sleep(0.02)
    grown = (peak - baseline) / MIB
    # Without the budget all 60 bodies (360 MiB) are held while the model sleeps.
    assert grown < BUDGET / MIB + 48, f"RSS grew {grown:.0f} MiB for a {BUDGET // MIB} MiB budget"
    invocations = proxy.value("sagemaker_invocations_total")
    refused = proxy.value("sagemaker_proxy_rejected_requests_total", reason="body_budget")
    assert invocations >= 1 and refused >= 1, (invocations, refused, statuses)
    assert invocations + refused == CLIENTS, (invocations, refused, statuses)  # each once, nothing lost
    assert statuses.count(200) == invocations
    assert set(statuses) <= {200, 503, 0}
    # The budget is given back: one more body goes through once the others are done.
    upload_after: list[int] = []
    upload(proxy.port, upload_after)
    assert upload_after == [200]
