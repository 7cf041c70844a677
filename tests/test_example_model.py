"""The example iris model: the classifier (unit) and its server as a real process (e2e)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from example_model.model import IrisModel
from tests.conftest import Running, free_port, start

SETOSA = [5.1, 3.5, 1.4, 0.2]
VERSICOLOR = [5.9, 3.0, 4.2, 1.5]
VIRGINICA = [6.7, 3.0, 5.2, 2.3]
CLASSES = {"setosa", "versicolor", "virginica"}


@pytest.fixture(scope="module")
def client(model: Running) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=model.url, timeout=10.0) as c:
        yield c


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """The example model without --test-knobs, as it would run in production."""
    port = free_port()
    log: Path = tmp_path_factory.mktemp("plain-model") / "model.log"
    running = start(["-m", "example_model", "--host", "127.0.0.1", "--port", str(port)], port, log)
    yield running
    running.stop()


def labels(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    predictions = response.json()["predictions"]
    for p in predictions:
        assert set(p["probabilities"]) == CLASSES
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert p["label"] == max(p["probabilities"], key=p["probabilities"].get)
    return [p["label"] for p in predictions]


def assert_json_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    message = response.json()["error"]
    assert isinstance(message, str) and message
    return message


# -- the classifier -----------------------------------------------------------------------------------------

# A few rows of the iris data set (Fisher, 1936), with their species.
KNOWN_ROWS = [
    ([5.1, 3.5, 1.4, 0.2], "setosa"),
    ([4.9, 3.0, 1.4, 0.2], "setosa"),
    ([5.4, 3.9, 1.7, 0.4], "setosa"),
    ([4.6, 3.1, 1.5, 0.2], "setosa"),
    ([7.0, 3.2, 4.7, 1.4], "versicolor"),
    ([6.4, 3.2, 4.5, 1.5], "versicolor"),
    ([5.9, 3.0, 4.2, 1.5], "versicolor"),
    ([5.5, 2.3, 4.0, 1.3], "versicolor"),
    ([6.3, 3.3, 6.0, 2.5], "virginica"),
    ([7.1, 3.0, 5.9, 2.1], "virginica"),
    ([6.7, 3.0, 5.2, 2.3], "virginica"),
    ([6.5, 3.0, 5.8, 2.2], "virginica"),
]


def test_model_classifies_known_rows() -> None:
    model = IrisModel.load()
    assert model.n_features == 4
    assert model.class_names == ("setosa", "versicolor", "virginica")
    predictions = model.predict([row for row, _ in KNOWN_ROWS])
    assert [p["label"] for p in predictions] == [species for _, species in KNOWN_ROWS]


def test_model_probabilities_sum_to_one() -> None:
    model = IrisModel.load()
    for row, species in KNOWN_ROWS:
        probs = model.probabilities(row)
        assert len(probs) == 3
        assert all(0.0 <= p <= 1.0 for p in probs)
        assert sum(probs) == pytest.approx(1.0)
        assert model.class_names[probs.index(max(probs))] == species


def test_model_does_not_overflow_on_extreme_rows() -> None:
    probs = IrisModel.load().probabilities([1e6, -1e6, 1e6, 1e6])
    assert sum(probs) == pytest.approx(1.0)


def test_model_rejects_inconsistent_weights() -> None:
    with pytest.raises(ValueError, match="mean/scale"):
        IrisModel(class_names=["a"], feature_names=["x", "y"], coefficients=[[1.0, 1.0]], intercepts=[0.0], mean=[0.0], scale=[1.0, 1.0])
    with pytest.raises(ValueError, match="coefficients/intercepts"):
        IrisModel(class_names=["a", "b"], feature_names=["x"], coefficients=[[1.0]], intercepts=[0.0], mean=[0.0], scale=[1.0])


# -- the server: inference contract -------------------------------------------------------------------------

@pytest.mark.e2e
def test_ping(client: httpx.Client) -> None:
    response = client.get("/ping")
    assert response.status_code == 200
    assert response.json() == {"status": "healthy"}


@pytest.mark.e2e
def test_json_single_row(client: httpx.Client) -> None:
    assert labels(client.post("/invocations", json=SETOSA)) == ["setosa"]


@pytest.mark.e2e
def test_json_rows(client: httpx.Client) -> None:
    rows = [SETOSA, VIRGINICA, VERSICOLOR]
    assert labels(client.post("/invocations", json=rows)) == ["setosa", "virginica", "versicolor"]
    assert labels(client.post("/invocations", json={"instances": rows})) == ["setosa", "virginica", "versicolor"]


@pytest.mark.e2e
def test_json_with_charset(client: httpx.Client) -> None:
    response = client.post(
        "/invocations", content=json.dumps([VIRGINICA]), headers={"content-type": "Application/JSON; charset=utf-8"}
    )
    assert labels(response) == ["virginica"]


@pytest.mark.e2e
def test_csv(client: httpx.Client) -> None:
    body = "5.1,3.5,1.4,0.2\n6.7,3.0,5.2,2.3\n\n5.9,3.0,4.2,1.5\n"
    response = client.post("/invocations", content=body, headers={"content-type": "text/csv"})
    assert labels(response) == ["setosa", "virginica", "versicolor"]


@pytest.mark.e2e
def test_csv_with_byte_order_mark(client: httpx.Client) -> None:
    body = "\ufeff5.1,3.5,1.4,0.2\r\n".encode()
    assert labels(client.post("/invocations", content=body, headers={"content-type": "text/csv"})) == ["setosa"]


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b"not json"),
        ("application/json", b"[1, 2, 3]"),
        ("application/json", b'[1, 2, 3, "4"]'),
        ("application/json", b"[1, 2, 3, true]"),
        ("application/json", b"[1, 2, 3, NaN]"),
        ("application/json", b"[]"),
        ("application/json", b'{"rows": [[1, 2, 3, 4]]}'),
        ("application/json", b"[[5.1, 3.5, 1.4, 0.2], [1, 2]]"),
        ("application/json", b'"5.1,3.5,1.4,0.2"'),
        ("text/csv", b"5.1,3.5,1.4"),
        ("text/csv", b"5.1,3.5,1.4,abc"),
        ("text/csv", b"5.1,3.5,1.4,inf"),
        ("text/csv", b"\n\n"),
        ("text/csv", b"\xff\xfe"),
    ],
)
def test_bad_input_is_400(client: httpx.Client, content_type: str, body: bytes) -> None:
    assert_json_error(client.post("/invocations", content=body, headers={"content-type": content_type}), 400)


@pytest.mark.e2e
@pytest.mark.parametrize("content_type", ["application/x-npy", "text/plain", None])
def test_unsupported_content_type_is_415(client: httpx.Client, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    message = assert_json_error(client.post("/invocations", content=b"5.1,3.5,1.4,0.2", headers=headers), 415)
    assert "application/json" in message and "text/csv" in message


@pytest.mark.e2e
@pytest.mark.parametrize(("method", "path"), [("GET", "/"), ("POST", "/predict"), ("GET", "/invocations/extra")])
def test_unknown_path_is_404(client: httpx.Client, method: str, path: str) -> None:
    assert_json_error(client.request(method, path), 404)


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [("GET", "/invocations", "POST"), ("PUT", "/invocations", "POST"), ("POST", "/ping", "GET"), ("DELETE", "/ping", "GET")],
)
def test_wrong_method_is_405(client: httpx.Client, method: str, path: str, allow: str) -> None:
    response = client.request(method, path)
    assert_json_error(response, 405)
    assert response.headers["allow"] == allow


@pytest.mark.e2e
def test_connection_is_reused_after_errors(client: httpx.Client) -> None:
    # Errors must leave the connection usable: keep-alive clients (the proxy among them) reuse it.
    client.post("/invocations", content=b"not json", headers={"content-type": "application/json"})
    client.get("/nowhere")
    assert labels(client.post("/invocations", json=SETOSA)) == ["setosa"]


# -- the server: test knobs ---------------------------------------------------------------------------------


@pytest.mark.e2e
def test_knob_delay(client: httpx.Client) -> None:
    started = time.perf_counter()
    response = client.post("/invocations", json=SETOSA, headers={"x-test-delay-ms": "300"})
    elapsed = time.perf_counter() - started
    assert labels(response) == ["setosa"]
    assert elapsed >= 0.3


@pytest.mark.e2e
def test_knob_delay_on_ping(client: httpx.Client) -> None:
    started = time.perf_counter()
    assert client.get("/ping", headers={"x-test-delay-ms": "150"}).status_code == 200
    assert time.perf_counter() - started >= 0.15


@pytest.mark.e2e
@pytest.mark.parametrize("status", [400, 404, 429, 500, 503])
def test_knob_status(client: httpx.Client, status: int) -> None:
    message = assert_json_error(client.post("/invocations", json=SETOSA, headers={"x-test-status": str(status)}), status)
    assert str(status) in message


@pytest.mark.e2e
def test_knob_status_without_body(client: httpx.Client) -> None:
    response = client.post("/invocations", json=SETOSA, headers={"x-test-status": "204"})
    assert response.status_code == 204
    assert response.content == b""


@pytest.mark.e2e
def test_knob_status_on_ping(client: httpx.Client) -> None:
    assert client.get("/ping", headers={"x-test-status": "503"}).status_code == 503


@pytest.mark.e2e
def test_knob_stream_chunks(client: httpx.Client) -> None:
    headers = {"x-test-stream-chunks": "5", "x-test-stream-interval-ms": "10"}
    with client.stream("POST", "/invocations", json=SETOSA, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        assert "content-length" not in response.headers
        body = b"".join(response.iter_bytes())
    assert body == b"".join(b"data: %d\n\n" % i for i in range(5))
    events = [line for line in body.decode().split("\n\n") if line]
    assert events == [f"data: {i}" for i in range(5)]


@pytest.mark.e2e
def test_knob_stream_zero_chunks(client: httpx.Client) -> None:
    response = client.post("/invocations", json=SETOSA, headers={"x-test-stream-chunks": "0"})
    assert response.status_code == 200
    assert response.content == b""


@pytest.mark.e2e
@pytest.mark.parametrize("size", [0, 1000, (1 << 20) * 2 + 123])
def test_knob_response_bytes(client: httpx.Client, size: int) -> None:
    response = client.post("/invocations", json=SETOSA, headers={"x-test-response-bytes": str(size)})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert int(response.headers["content-length"]) == size
    assert response.content == b"x" * size


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("x-test-delay-ms", "soon"),
        ("x-test-delay-ms", "-5"),
        ("x-test-delay-ms", "nan"),
        ("x-test-delay-ms", "inf"),
        ("x-test-status", "99"),
        ("x-test-status", "600"),
        ("x-test-status", "abc"),
        ("x-test-status", "+500"),
        ("x-test-stream-chunks", "-1"),
        ("x-test-stream-chunks", "1_000"),
        ("x-test-stream-chunks", "many"),
        ("x-test-stream-interval-ms", "10"),  # needs X-Test-Stream-Chunks
        ("x-test-response-bytes", "-1"),
        ("x-test-response-bytes", "2000000000"),
        ("x-test-response-bytes", "lots"),
    ],
)
def test_bad_knob_is_400(client: httpx.Client, header: str, value: str) -> None:
    message = assert_json_error(client.post("/invocations", json=SETOSA, headers={header: value}), 400)
    assert header.lower() in message.lower()


@pytest.mark.e2e
def test_bad_knob_on_ping_is_400(client: httpx.Client) -> None:
    assert_json_error(client.get("/ping", headers={"x-test-status": "1000"}), 400)


@pytest.mark.e2e
def test_knobs_ignored_without_test_knobs(plain_model: Running) -> None:
    knobs = {
        "x-test-status": "500",
        "x-test-stream-chunks": "3",
        "x-test-response-bytes": "100",
        "x-test-delay-ms": "not-a-number",
    }
    with httpx.Client(base_url=plain_model.url, timeout=10.0) as c:
        assert labels(c.post("/invocations", json=[SETOSA, VIRGINICA], headers=knobs)) == ["setosa", "virginica"]
        assert c.get("/ping", headers={"x-test-status": "503"}).status_code == 200
        started = time.perf_counter()
        assert labels(c.post("/invocations", json=VERSICOLOR, headers={"x-test-delay-ms": "5000"})) == ["versicolor"]
        # Not a speed check: had the knob applied, this could not be under 5 s.
        assert time.perf_counter() - started < 5.0


@pytest.mark.e2e
def test_too_many_rows_is_413(client: httpx.Client) -> None:
    body = "5.1,3.5,1.4,0.2\n" * 10_001
    assert_json_error(client.post("/invocations", content=body, headers={"content-type": "text/csv"}), 413)
    assert labels(client.post("/invocations", json=SETOSA)) == ["setosa"]


@pytest.mark.e2e
def test_body_over_6_mib_is_413(client: httpx.Client) -> None:
    body = b" " * (6 * 1024 * 1024 + 1)
    assert_json_error(client.post("/invocations", content=body, headers={"content-type": "application/json"}), 413)
    assert labels(client.post("/invocations", json=SETOSA)) == ["setosa"]
