"""The demo as a user runs it: a real process that starts the model and the proxy and prints the table."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.e2e
def test_demo_sends_traffic_and_shows_the_counts() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "demo", "--requests", "60"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "60/60 requests" in out
    assert re.search(r"Invocations\s+60\.0", out), out
    # One instance: InvocationsPerInstance equals Invocations, and the legend says so.
    assert re.search(r"InvocationsPerInstance\s+60\.0", out), out
    assert "InvocationsPerInstance equals Invocations" in out
    assert re.search(r"ModelLatency\s+\d+\.\d+", out), out
    # The hint names commands that work as written from the repository, model first.
    assert ".venv/bin/python -m example_model --port 8081 &" in out
    assert ".venv/bin/sagemaker-metrics-proxy serve --upstream http://127.0.0.1:8081 --endpoint-name my-endpoint" in out
    assert "point curl or Prometheus" in out


def test_demo_refuses_a_bad_request_count() -> None:
    result = subprocess.run([sys.executable, "-m", "proxy", "demo", "--requests", "0"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["sagemaker-metrics-proxy: error: --requests must be at least 1"]
