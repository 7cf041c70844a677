"""The SageMaker Runtime API in front: boto3 and the AWS CLI, unchanged but for endpoint_url, against a real proxy.

The model is tests/recording_model.py, so each case checks what reached it (path, headers, body) as well as what
the client got (botocore parses the responses, the errors and the event stream with its own code) and the
counters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from botocore.config import Config
from botocore.eventstream import EventStreamBuffer
from botocore.exceptions import ClientError, EventStreamError

from tests.conftest import Proxy, Running, free_port

pytestmark = pytest.mark.e2e

ENDPOINT = "test-endpoint"
BODY = b'{"instances": [[5.1, 3.5, 1.4, 0.2]]}'
CREDENTIALS = {"aws_access_key_id": "AKIDEXAMPLE", "aws_secret_access_key": "secret", "region_name": "us-east-1"}


@pytest.fixture
def model(recording_model: Running) -> Running:
    assert httpx.post(f"{recording_model.url}/__reset").status_code == 200
    return recording_model


def received(model: Running) -> list[dict[str, Any]]:
    return httpx.get(f"{model.url}/__received").json()


def runtime(proxy: Proxy) -> Any:
    return boto3.client("sagemaker-runtime", endpoint_url=proxy.url, config=Config(retries={"max_attempts": 1}), **CREDENTIALS)


def test_invoke_endpoint_reaches_the_model_as_sagemaker_calls_a_container(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(model.url)
    r = runtime(proxy).invoke_endpoint(
        EndpointName=ENDPOINT, Body=BODY, ContentType="application/json", Accept="application/json",
        CustomAttributes="c000b4f9-df62-4c85-a0bf-7c525f9104a4", InferenceId="inference-1",
    )
    answer = json.loads(r["Body"].read())
    assert answer["target"] == "/invocations" and answer["body_bytes"] == len(BODY)
    assert r["ContentType"] == "application/json"
    assert r["InvokedProductionVariant"] == "AllTraffic"
    assert r["CustomAttributes"] == "echo:c000b4f9-df62-4c85-a0bf-7c525f9104a4"
    [seen] = received(model)
    assert (seen["method"], seen["target"], seen["body"].encode("latin-1")) == ("POST", "/invocations", BODY)
    headers = {n.lower(): v for n, v in seen["headers"]}
    # What a SageMaker container gets, and nothing of the client's own (its signature, its user agent).
    assert set(headers) == {
        "host", "content-length", "content-type", "accept", "x-amzn-sagemaker-custom-attributes", "x-amzn-sagemaker-inference-id",
    }, headers
    assert proxy.value("sagemaker_invocations_total") == 1
    assert proxy.value("sagemaker_model_latency_seconds_count") == 1


def test_target_variant_picks_the_variant_and_labels_its_metrics(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(None, "--variant", f"Blue={model.url}:1", "--variant", f"Green={model.url}:1")
    client = runtime(proxy)
    for _ in range(3):
        assert client.invoke_endpoint(EndpointName=ENDPOINT, Body=BODY, TargetVariant="Green")["InvokedProductionVariant"] == "Green"
    with pytest.raises(ClientError) as raised:
        client.invoke_endpoint(EndpointName=ENDPOINT, Body=BODY, TargetVariant="Purple")
    assert raised.value.response["Error"]["Code"] == "ValidationError"
    assert "Purple" in raised.value.response["Error"]["Message"]
    assert len(received(model)) == 3
    assert proxy.value("sagemaker_invocations_total", variant_name="Green") == 3
    assert proxy.value("sagemaker_invocations_total", variant_name="Blue") == 0


@pytest.mark.parametrize("status", [404, 500])
def test_a_model_error_is_a_model_error_with_the_original_status(model: Running, start_proxy: Callable[..., Proxy], status: int) -> None:
    proxy = start_proxy(model.url)
    client = runtime(proxy)
    with pytest.raises(client.exceptions.ModelError) as raised:
        client.invoke_endpoint(EndpointName=ENDPOINT, Body=BODY, CustomAttributes=f"respond=status={status}")
    error = raised.value.response
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 424
    assert error["OriginalStatusCode"] == status
    assert json.loads(error["OriginalMessage"]) == {"error": f"model says {status}"}
    assert error["LogStreamArn"].startswith("arn:aws:logs:")
    assert len(received(model)) == 1
    assert proxy.value("sagemaker_invocations_total") == 1
    assert proxy.value("sagemaker_invocation_model_errors_total") == 1
    errors_4xx, errors_5xx = proxy.value("sagemaker_invocation_4xx_errors_total"), proxy.value("sagemaker_invocation_5xx_errors_total")
    assert (errors_4xx, errors_5xx) == ((1, 0) if status == 404 else (0, 1))


def test_an_unknown_endpoint_is_a_validation_error_and_never_reaches_the_model(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(model.url)
    client = runtime(proxy)
    with pytest.raises(ClientError) as raised:
        client.invoke_endpoint(EndpointName="other-endpoint", Body=BODY)
    assert raised.value.response["Error"]["Code"] == "ValidationError"
    assert raised.value.response["Error"]["Message"] == "Endpoint other-endpoint of account local not found."
    assert received(model) == []
    assert proxy.value("sagemaker_invocations_total") == 0


def test_a_body_over_the_limit_is_a_validation_error(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(model.url, "--max-payload-bytes", "100")
    with pytest.raises(ClientError) as raised:
        runtime(proxy).invoke_endpoint(EndpointName=ENDPOINT, Body=b"x" * 101)
    assert raised.value.response["Error"]["Code"] == "ValidationError"
    assert received(model) == []
    assert proxy.value("sagemaker_proxy_rejected_requests_total", reason="payload_too_large") == 1


def test_response_stream_carries_the_model_stream_in_payload_parts(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(model.url)
    r = runtime(proxy).invoke_endpoint_with_response_stream(
        EndpointName=ENDPOINT, Body=BODY, ContentType="application/json", Accept="text/plain", CustomAttributes="respond=stream"
    )
    assert r["ContentType"] == "text/plain" and r["InvokedProductionVariant"] == "AllTraffic"
    parts = [event["PayloadPart"]["Bytes"] for event in r["Body"]]
    assert len(parts) >= 3  # one event per chunk, as each came (100 ms apart)
    assert b"".join(parts) == b"chunk-0\nchunk-1\nchunk-2\n"
    headers = {n.lower(): v for n, v in received(model)[0]["headers"]}
    assert headers["accept"] == "text/plain"  # X-Amzn-SageMaker-Accept, as the model's Accept
    assert proxy.value("sagemaker_invocations_total") == 1
    assert proxy.value("sagemaker_first_chunk_model_latency_seconds_count") == 1
    assert proxy.value("sagemaker_mid_stream_errors_total") == 0


def test_a_broken_stream_ends_with_a_model_stream_error(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(model.url)
    r = runtime(proxy).invoke_endpoint_with_response_stream(EndpointName=ENDPOINT, Body=BODY, CustomAttributes="respond=stream-die")
    parts = []
    with pytest.raises(EventStreamError) as raised:
        for event in r["Body"]:
            parts.append(event["PayloadPart"]["Bytes"])
    assert b"".join(parts) == b"chunk-0\nchunk-1\n"
    assert raised.value.response["Error"]["Code"] == "ModelStreamError"
    assert raised.value.response["Error"]["Message"] == "the model closed the connection"
    # The same call, the bytes read by botocore's own event-stream decoder: the error event's code.
    answer = httpx.post(
        f"{proxy.url}/endpoints/{ENDPOINT}/invocations-response-stream", content=BODY,
        headers={"X-Amzn-SageMaker-Custom-Attributes": "respond=stream-die"},
    )
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/vnd.amazon.eventstream"
    buffer = EventStreamBuffer()
    buffer.add_data(answer.content)
    messages = list(buffer)
    assert [m.headers[":message-type"] for m in messages] == ["event", "event", "exception"]
    assert messages[-1].headers[":exception-type"] == "ModelStreamError"
    assert json.loads(messages[-1].payload)["ErrorCode"] == "StreamBroken"
    assert proxy.value("sagemaker_invocations_total") == 2
    assert proxy.value("sagemaker_mid_stream_errors_total") == 2
    assert proxy.value("sagemaker_invocation_model_errors_total") == 2


def test_a_stalled_stream_ends_with_model_invocation_time_exceeded(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(model.url, "--invocation-timeout", "0.5")
    answer = httpx.post(
        f"{proxy.url}/endpoints/{ENDPOINT}/invocations-response-stream", content=BODY,
        headers={"X-Amzn-SageMaker-Custom-Attributes": "respond=stream-stall"}, timeout=10,
    )
    buffer = EventStreamBuffer()
    buffer.add_data(answer.content)
    messages = list(buffer)
    assert [m.payload for m in messages[:-1]] == [b"chunk-0\n"]
    assert messages[-1].headers[":exception-type"] == "ModelStreamError"
    assert json.loads(messages[-1].payload)["ErrorCode"] == "ModelInvocationTimeExceeded"
    assert proxy.value("sagemaker_proxy_upstream_errors_total", reason="timeout") == 1
    assert proxy.value("sagemaker_mid_stream_errors_total") == 1


@pytest.mark.parametrize(("respond", "reason"), [("head-stall", "timeout"), ("head-close", "connection_reset")])
def test_a_model_that_fails_after_its_head_before_any_byte_is_a_model_error(
    model: Running, start_proxy: Callable[..., Proxy], respond: str, reason: str
) -> None:
    """No byte of the answer had gone out: InvokeEndpoint gets its ModelError, the stream call its error, never an empty reply."""
    proxy = start_proxy(model.url, "--invocation-timeout", "0.5")
    client = runtime(proxy)
    with pytest.raises(client.exceptions.ModelError):
        client.invoke_endpoint(EndpointName=ENDPOINT, Body=BODY, CustomAttributes=f"respond={respond}")
    with pytest.raises(client.exceptions.ModelError):
        client.invoke_endpoint_with_response_stream(EndpointName=ENDPOINT, Body=BODY, CustomAttributes=f"respond={respond}")
    assert proxy.value("sagemaker_invocations_total") == 2
    assert proxy.value("sagemaker_invocation_model_errors_total") == 2
    assert proxy.value("sagemaker_proxy_upstream_errors_total", reason=reason) == 2
    assert proxy.value("sagemaker_mid_stream_errors_total") == 0


def test_no_live_instance_is_service_unavailable(start_proxy: Callable[..., Proxy]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    proxy = start_proxy(dead, "--instance-count-from", "upstreams", "--health-check-interval", "0.1")
    client = runtime(proxy)
    codes = []
    for _ in range(50):  # a call before the first health check reaches the dead model: ModelError
        with pytest.raises(ClientError) as raised:
            client.invoke_endpoint(EndpointName=ENDPOINT, Body=BODY)
        codes.append((raised.value.response["Error"]["Code"], raised.value.response["ResponseMetadata"]["HTTPStatusCode"]))
        if codes[-1][0] == "ServiceUnavailable":
            break
        time.sleep(0.05)
    assert codes[-1] == ("ServiceUnavailable", 503), codes
    assert set(codes[:-1]) <= {("ModelError", 424)}, codes
    assert proxy.value("sagemaker_proxy_rejected_requests_total", reason="no_live_instance") >= 1


def test_the_aws_cli_writes_the_answer_to_its_outfile(model: Running, start_proxy: Callable[..., Proxy], tmp_path: Path) -> None:
    proxy = start_proxy(model.url)
    out = tmp_path / "answer.json"
    aws = Path(sys.executable).parent / "aws"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_DEFAULT_REGION": "us-east-1"}
    result = subprocess.run(
        [str(aws), "sagemaker-runtime", "invoke-endpoint", "--endpoint-name", ENDPOINT, "--endpoint-url", proxy.url,
         "--content-type", "application/json", "--body", BODY.decode(), str(out)],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["InvokedProductionVariant"] == "AllTraffic"
    assert json.loads(out.read_bytes())["target"] == "/invocations"
    assert proxy.value("sagemaker_invocations_total") == 1


# -- SigV4, checked against what botocore's own signer sends ----------------------------------------------------


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    path = tmp_path / "credentials"
    path.write_text("# access key id, secret\nAKIDEXAMPLE secret\nAKIDOTHER other-secret\n")
    return path


def test_sigv4_right_key_passes_and_wrong_secret_unknown_key_or_no_signature_get_403(
    model: Running, start_proxy: Callable[..., Proxy], keys: Path
) -> None:
    proxy = start_proxy(model.url, "--auth", "sigv4", "--auth-credentials", str(keys))
    assert runtime(proxy).invoke_endpoint(EndpointName=ENDPOINT, Body=BODY, ContentType="application/json")["InvokedProductionVariant"] == "AllTraffic"
    stream = runtime(proxy).invoke_endpoint_with_response_stream(EndpointName=ENDPOINT, Body=BODY, CustomAttributes="respond=stream")
    assert b"".join(e["PayloadPart"]["Bytes"] for e in stream["Body"]) == b"chunk-0\nchunk-1\nchunk-2\n"
    wrong = boto3.client("sagemaker-runtime", endpoint_url=proxy.url, aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="guess",
                         region_name="eu-west-1", config=Config(retries={"max_attempts": 1}))
    unknown = boto3.client("sagemaker-runtime", endpoint_url=proxy.url, aws_access_key_id="AKIDNOBODY", aws_secret_access_key="secret",
                           region_name="us-east-1", config=Config(retries={"max_attempts": 1}))
    for client, code in ((wrong, "InvalidSignatureException"), (unknown, "UnrecognizedClientException")):
        with pytest.raises(ClientError) as raised:
            client.invoke_endpoint(EndpointName=ENDPOINT, Body=BODY)
        assert raised.value.response["Error"]["Code"] == code
        assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    unsigned = httpx.post(f"{proxy.url}/endpoints/{ENDPOINT}/invocations", content=BODY)
    assert unsigned.status_code == 403 and unsigned.headers["x-amzn-errortype"] == "MissingAuthenticationTokenException"
    # An unknown variant is not told to whoever cannot sign.
    with pytest.raises(ClientError) as raised:
        unknown.invoke_endpoint(EndpointName=ENDPOINT, Body=BODY, TargetVariant="Purple")
    assert raised.value.response["Error"]["Code"] == "UnrecognizedClientException"
    assert len(received(model)) == 2
    assert proxy.value("sagemaker_invocations_total") == 2
    assert proxy.value("sagemaker_proxy_rejected_requests_total", reason="auth_failed") == 4
    assert "secret" not in proxy.log.read_text()


def test_sigv4_stale_date_tampered_body_and_a_rotated_key(model: Running, start_proxy: Callable[..., Proxy], keys: Path) -> None:
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    proxy = start_proxy(model.url, "--auth", "sigv4", "--auth-credentials", str(keys))
    url = f"{proxy.url}/endpoints/{ENDPOINT}/invocations"

    def signed(body: bytes, secret: str = "secret", key: str = "AKIDEXAMPLE") -> dict[str, str]:
        request = AWSRequest(method="POST", url=url, data=body, headers={"Content-Type": "application/json"})
        SigV4Auth(Credentials(key, secret), "sagemaker", "us-east-1").add_auth(request)
        return dict(request.headers.items())

    assert httpx.post(url, content=BODY, headers=signed(BODY)).status_code == 200
    tampered = httpx.post(url, content=BODY + b" ", headers={**signed(BODY), "Content-Length": str(len(BODY) + 1)})
    assert tampered.status_code == 403 and tampered.headers["x-amzn-errortype"] == "InvalidSignatureException"
    stale = signed(BODY)
    stale_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() - 600))
    stale["X-Amz-Date"] = stale_date
    stale["Authorization"] = stale["Authorization"].replace(time.strftime("%Y%m%d", time.gmtime()), stale_date[:8])
    answer = httpx.post(url, content=BODY, headers=stale)
    assert answer.status_code == 403 and answer.headers["x-amzn-errortype"] == "InvalidSignatureException"
    assert "expired" in answer.json()["message"]
    # The file is re-read when it changes: a new key works, a removed one no longer does.
    time.sleep(1.1)
    keys.write_text("AKIDNEW new-secret\n")
    deadline = time.monotonic() + 3
    while httpx.post(url, content=BODY, headers=signed(BODY, "new-secret", "AKIDNEW")).status_code != 200:
        assert time.monotonic() < deadline, "the new key was never accepted"
        time.sleep(0.2)
    assert httpx.post(url, content=BODY, headers=signed(BODY)).status_code == 403
    assert proxy.value("sagemaker_proxy_rejected_requests_total", reason="auth_failed") >= 3


def test_sigv4_covers_what_reaches_the_model(model: Running, start_proxy: Callable[..., Proxy], keys: Path) -> None:
    """Only what the signature covers goes to the model: an unsigned header added to a signed request is not
    passed; an unsigned payload, a changed header value (even by a non-breaking space), a signature that is
    not hex are refused with 403, never a 500."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    proxy = start_proxy(model.url, "--auth", "sigv4", "--auth-credentials", str(keys))
    url = f"{proxy.url}/endpoints/{ENDPOINT}/invocations"

    def signed(headers: dict[str, str], unsigned_payload: bool = False) -> dict[str, str]:
        if unsigned_payload:
            headers = {**headers, "X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"}
        request = AWSRequest(method="POST", url=url, data=BODY, headers=headers)
        SigV4Auth(Credentials("AKIDEXAMPLE", "secret"), "sagemaker", "us-east-1").add_auth(request)
        return dict(request.headers.items())

    good = signed({"Content-Type": "application/json", "X-Amzn-SageMaker-Custom-Attributes": "a b"})
    injected = httpx.post(url, content=BODY, headers={**good, "X-Amzn-SageMaker-Inference-Id": "injected"})
    assert injected.status_code == 200
    seen = {n.lower(): v for n, v in received(model)[-1]["headers"]}
    assert "x-amzn-sagemaker-inference-id" not in seen and seen["x-amzn-sagemaker-custom-attributes"] == "a b"
    raw = [(k.encode(), v.encode()) for k, v in good.items() if k != "X-Amzn-SageMaker-Custom-Attributes"]
    changed = httpx.post(url, content=BODY, headers=[*raw, (b"X-Amzn-SageMaker-Custom-Attributes", b"a\xa0b")])
    assert changed.status_code == 403
    unsigned_variant = httpx.post(url, content=BODY, headers={**good, "X-Amzn-SageMaker-Target-Variant": "AllTraffic"})
    assert unsigned_variant.status_code == 403
    payload = signed({"Content-Type": "application/json"}, unsigned_payload=True)
    assert httpx.post(url, content=b"SWAPPED", headers={**payload, "Content-Length": "7"}).status_code == 403
    not_hex = [(k.encode(), v.encode()) for k, v in good.items() if k != "Authorization"]
    not_hex.append((b"Authorization", good["Authorization"].rsplit("=", 1)[0].encode() + b"=" + b"\xe9" * 64))
    answer = httpx.post(url, content=BODY, headers=not_hex)
    assert answer.status_code == 403 and answer.headers["x-amzn-errortype"] == "InvalidSignatureException"
    assert len(received(model)) == 1
    assert proxy.value("sagemaker_proxy_rejected_requests_total", reason="auth_failed") == 4


def test_sigv4_needs_a_readable_credentials_file(tmp_path: Path) -> None:
    from tests.test_settings import run_cli

    result = run_cli("serve", "--upstream", "http://127.0.0.1:1", "--endpoint-name", "e", "--auth", "sigv4")
    assert result.returncode == 2 and result.stderr.strip().endswith("--auth sigv4 needs --auth-credentials FILE")
    result = run_cli("serve", "--upstream", "http://127.0.0.1:1", "--endpoint-name", "e", "--auth", "sigv4", "--auth-credentials", str(tmp_path / "none"))
    assert result.returncode == 2 and "--auth-credentials: cannot read" in result.stderr
    bad = tmp_path / "bad"
    bad.write_text("only-one-field\n")
    result = run_cli("serve", "--upstream", "http://127.0.0.1:1", "--endpoint-name", "e", "--auth", "sigv4", "--auth-credentials", str(bad))
    assert result.returncode == 2 and "line 1: expected ACCESS_KEY_ID SECRET_ACCESS_KEY" in result.stderr


# -- several endpoints from a config file -------------------------------------------------------------------


def test_two_endpoints_from_a_config_file_each_with_two_weighted_variants(
    model: Running, start_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    config = tmp_path / "endpoints.toml"
    config.write_text(f"""
[[Endpoints]]
EndpointName = "iris"
[[Endpoints.ProductionVariants]]
VariantName = "Blue"
InitialVariantWeight = 3
Instances = ["{model.url}"]
[[Endpoints.ProductionVariants]]
VariantName = "Green"
InitialVariantWeight = 1
Instances = ["{model.url}"]
InitialInstanceCount = 4

[[Endpoints]]
EndpointName = "chat"
[[Endpoints.ProductionVariants]]
VariantName = "Small"
InitialVariantWeight = 1
Instances = ["{model.url}"]
[[Endpoints.ProductionVariants]]
VariantName = "Large"
InitialVariantWeight = 1
Instances = ["{model.url}"]
""")
    proxy = start_proxy(None, "--config", str(config))
    client = runtime(proxy)
    served = {"iris": [], "chat": []}
    for name, n in (("iris", 200), ("chat", 100)):
        for _ in range(n):
            served[name].append(client.invoke_endpoint(EndpointName=name, Body=BODY)["InvokedProductionVariant"])
    assert 130 <= served["iris"].count("Blue") <= 170 and served["iris"].count("Blue") + served["iris"].count("Green") == 200
    assert 30 <= served["chat"].count("Small") <= 70 and served["chat"].count("Small") + served["chat"].count("Large") == 100
    assert client.invoke_endpoint(EndpointName="chat", Body=BODY, TargetVariant="Large")["InvokedProductionVariant"] == "Large"
    with pytest.raises(ClientError) as raised:
        client.invoke_endpoint(EndpointName="chat", Body=BODY, TargetVariant="Blue")  # iris's, not chat's
    assert raised.value.response["Error"]["Code"] == "ValidationError"
    # The native route goes to the first endpoint.
    assert httpx.post(f"{proxy.url}/invocations", content=BODY).headers["x-amzn-invoked-production-variant"] in ("Blue", "Green")
    def invocations(endpoint: str, variant: str) -> float:
        return proxy.value("sagemaker_invocations_total", endpoint_name=endpoint, variant_name=variant)

    blue, green = invocations("iris", "Blue"), invocations("iris", "Green")
    assert (blue - served["iris"].count("Blue"), green - served["iris"].count("Green")) in ((1, 0), (0, 1))  # + the native call
    assert invocations("chat", "Small") == served["chat"].count("Small")
    assert invocations("chat", "Large") == served["chat"].count("Large") + 1
    assert proxy.value("sagemaker_live_instances", endpoint_name="iris", variant_name="Green") == 4
    assert proxy.value("sagemaker_proxy_rejected_requests_total", endpoint_name="chat", variant_name="Small", reason="unknown_variant") == 1
    assert len(received(model)) == 302


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[[Endpoints]]\nEndpointName = 'a'\n", "Endpoints[0].ProductionVariants must be one or more"),
        ("[[Endpoints]]\nEndpointName = 'bad_name'\n[[Endpoints.ProductionVariants]]\nVariantName = 'V'\nInstances = ['http://a:1']\n",
         "Endpoints[0].EndpointName must be 1-63"),
        ("[[Endpoints]]\nEndpointName = 'a'\n[[Endpoints.ProductionVariants]]\nVariantName = 'V'\nInitialVariantWeight = 0\nInstances = ['http://a:1']\n",
         "Endpoints[0].ProductionVariants[0].InitialVariantWeight must be a positive number, got 0"),
        ("[[Endpoints]]\nEndpointName = 'a'\n[[Endpoints.ProductionVariants]]\nVariantName = 'V'\nInstances = ['https://a:1']\n",
         "Endpoints[0].ProductionVariants[0].Instances TLS to the model is not supported"),
        ("[[Endpoints]]\nEndpointName = 'a'\n[[Endpoints.ProductionVariants]]\nVariantName = 'V'\nInstances = ['http://a:1']\nWeight = 2\n",
         "Endpoints[0].ProductionVariants[0].Weight is not a key here"),
        ("[[Endpoints]]\nEndpointName = 'a'\n[[Endpoints.ProductionVariants]]\nVariantName = 'V'\nInstances = ['http://a:1']\n"
         "[[Endpoints.InferenceComponents]]\nInferenceComponentName = 'ic'\nVariantName = 'W'\nInstances = ['http://a:2']\n",
         "Endpoints[0].InferenceComponents[0].VariantName must name a variant of the endpoint (V), got 'W'"),
        ("[[Endpoints]]\nEndpointName = 'a'\n[[Endpoints.ProductionVariants]]\nVariantName = 'V'\nInstances = ['http://a:1']\n"
         "[[Endpoints.InferenceComponents]]\nInferenceComponentName = 'ic'\nInstances = ['http://a:2']\nCopyCount = 0\n",
         "Endpoints[0].InferenceComponents[0].CopyCount must be 1 to 100000, got 0"),
        ("Endpoints = 3", "Endpoints must be one or more [[Endpoints]] tables"),
        ("not toml [", "is not TOML"),
    ],
)
def test_a_bad_config_file_exits_2_naming_the_key(tmp_path: Path, text: str, says: str) -> None:
    from tests.test_settings import run_cli

    config = tmp_path / "endpoints.toml"
    config.write_text(text)
    result = run_cli("serve", "--config", str(config))
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("sagemaker-metrics-proxy: error: --config: ") and says in line, line


# -- nothing under /endpoints/ passes unserved, nothing unsigned passes under SigV4 -------------------------


@pytest.mark.parametrize(
    ("path", "says"),
    [
        (f"/endpoints/{ENDPOINT}/async-invocations", "InvokeEndpointAsync"),
        (f"/endpoints/{ENDPOINT}/invocations/", "Not an operation"),
        ("/endpoints//invocations", "Not an operation"),
        (f"/endpoints/{ENDPOINT}/x/invocations", "Not an operation"),
        ("/endpoints", "Not an operation"),
    ],
)
def test_a_path_under_endpoints_that_is_no_operation_is_refused_in_the_apis_shape(
    model: Running, start_proxy: Callable[..., Proxy], path: str, says: str
) -> None:
    proxy = start_proxy(model.url)
    answer = httpx.post(f"{proxy.url}{path}", content=BODY, headers={"Authorization": "Bearer must-not-reach-the-model"})
    assert answer.status_code == 404 and answer.headers["x-amzn-errortype"] == "UnknownOperationException"
    assert says in answer.json()["Message"]
    assert received(model) == []
    assert proxy.value("sagemaker_proxy_rejected_requests_total", reason="unknown_operation") == 1
    assert proxy.value("sagemaker_invocations_total") == 0


def test_invoke_endpoint_async_is_an_error_boto3_raises_not_a_success(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(model.url)
    with pytest.raises(ClientError) as raised:
        runtime(proxy).invoke_endpoint_async(EndpointName=ENDPOINT, InputLocation="s3://bucket/input.json")
    assert raised.value.response["Error"]["Code"] == "UnknownOperationException"
    assert received(model) == []


def test_an_unknown_endpoint_is_told_only_to_a_signed_request(model: Running, start_proxy: Callable[..., Proxy], keys: Path) -> None:
    proxy = start_proxy(model.url, "--auth", "sigv4", "--auth-credentials", str(keys))
    unsigned = httpx.post(f"{proxy.url}/endpoints/nobody/invocations", content=BODY)
    assert unsigned.status_code == 403 and unsigned.headers["x-amzn-errortype"] == "MissingAuthenticationTokenException"
    with pytest.raises(ClientError) as raised:
        runtime(proxy).invoke_endpoint(EndpointName="nobody", Body=BODY)
    assert raised.value.response["Error"]["Code"] == "ValidationError" and "nobody" in raised.value.response["Error"]["Message"]
    assert proxy.value("sagemaker_proxy_rejected_requests_total", reason="auth_failed") == 1
    assert proxy.value("sagemaker_proxy_rejected_requests_total", reason="unknown_endpoint") == 1
    assert received(model) == []


def test_under_sigv4_the_native_routes_need_a_signature_too_and_the_signature_stays_here(
    model: Running, start_proxy: Callable[..., Proxy], keys: Path
) -> None:
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    proxy = start_proxy(model.url, "--auth", "sigv4", "--auth-credentials", str(keys), "--auth-region", "us-east-1")
    url = f"{proxy.url}/invocations"
    unsigned = httpx.post(url, content=BODY, headers={"Content-Type": "application/json"})
    assert unsigned.status_code == 403 and "MissingAuthenticationTokenException" in unsigned.json()["error"]

    def signed(region: str) -> dict[str, str]:
        request = AWSRequest(method="POST", url=url, data=BODY, headers={"Content-Type": "application/json", "X-Custom": "kept", "X-Hop": "1", "Connection": "X-Hop"})
        SigV4Auth(Credentials("AKIDEXAMPLE", "secret"), "sagemaker", region).add_auth(request)
        return dict(request.headers.items())

    answer = httpx.post(url, content=BODY, headers=signed("us-east-1"))
    assert answer.status_code == 200, answer.text
    [seen] = received(model)
    names = {name.lower() for name, _ in seen["headers"]}
    assert "authorization" not in names and "x-amz-date" not in names and "x-custom" in names
    assert "x-hop" not in names and "connection" not in names  # signed, but hop-by-hop for this hop
    assert "x-forwarded-for" in names and "x-forwarded-proto" in names  # as for an unsigned request
    elsewhere = httpx.post(url, content=BODY, headers=signed("us-west-2"))
    assert elsewhere.status_code == 403 and "region" in elsewhere.json()["error"]
    with pytest.raises(ClientError) as raised:  # the Runtime API checks the region the same way
        boto3.client("sagemaker-runtime", endpoint_url=proxy.url, aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret",
                     region_name="us-west-2", config=Config(retries={"max_attempts": 1})).invoke_endpoint(EndpointName=ENDPOINT, Body=BODY)
    assert raised.value.response["Error"]["Code"] == "InvalidSignatureException"
    assert proxy.value("sagemaker_invocations_total") == 1
    assert proxy.value("sagemaker_proxy_rejected_requests_total", reason="auth_failed") == 3


def test_native_routes_off_serves_the_runtime_api_only(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(model.url, "--native-routes", "off")
    answer = httpx.post(f"{proxy.url}/invocations", content=BODY)
    assert answer.status_code == 404 and "Runtime API only" in answer.json()["error"]
    assert runtime(proxy).invoke_endpoint(EndpointName=ENDPOINT, Body=BODY)["InvokedProductionVariant"] == "AllTraffic"
    assert len(received(model)) == 1
    assert proxy.value("sagemaker_proxy_rejected_requests_total", reason="unknown_operation") == 1


def test_the_front_doors_own_refusal_of_an_api_call_carries_the_error_type(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    """A head the parser refuses (a control character in Content-Type) never reaches the app; on the API's path
    the 400 still says ValidationError, so botocore raises its modeled exception."""
    import socket as sockets

    proxy = start_proxy(model.url)
    with sockets.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(f"POST /endpoints/{ENDPOINT}/invocations HTTP/1.1\r\nHost: x\r\nContent-Type: text/\x01csv\r\nContent-Length: 2\r\n\r\nok".encode())
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    head = answer.split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 400") and b"x-amzn-errortype: validationerror" in head, answer
    with sockets.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:  # the native route keeps its plain 400
        s.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: text/\x01csv\r\nContent-Length: 2\r\n\r\nok")
        plain = s.recv(4096).lower()
    assert plain.startswith(b"http/1.1 400") and b"x-amzn-errortype" not in plain
    assert received(model) == []
    assert proxy.value("sagemaker_proxy_rejected_requests_total", reason="malformed_request") == 2


def test_inference_components_are_called_by_name_and_counted_per_copy(
    model: Running, moto: Running, aws_env: None, start_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    """An endpoint with two inference components (2 and 4 copies): InvokeEndpoint's InferenceComponentName picks
    one; each is counted under its name, InvocationsPerCopy is 1/copies, and CloudWatch gets SageMaker's
    InferenceComponentName dimension with InvocationsPerCopy and ConcurrentRequestsPerCopy."""
    import uuid

    config = tmp_path / "components.toml"
    config.write_text(f"""
[[Endpoints]]
EndpointName = "llm"
[[Endpoints.ProductionVariants]]
VariantName = "AllTraffic"
Instances = ["{model.url}"]
[[Endpoints.InferenceComponents]]
InferenceComponentName = "ic-small"
Instances = ["{model.url}"]
CopyCount = 2
[[Endpoints.InferenceComponents]]
InferenceComponentName = "ic-large"
Instances = ["{model.url}"]
CopyCount = 4
""")
    namespace = f"Test{uuid.uuid4().hex[:8]}"
    proxy = start_proxy(None, "--config", str(config), "--cloudwatch", "--cloudwatch-endpoint-url", moto.url,
                        "--cloudwatch-namespace", namespace, "--cloudwatch-period", "1")
    client = runtime(proxy)
    for name, n in (("ic-small", 3), ("ic-large", 2)):
        for _ in range(n):
            r = client.invoke_endpoint(EndpointName="llm", Body=BODY, InferenceComponentName=name)
            assert r["InvokedProductionVariant"] == "AllTraffic"
    [seen, *_] = received(model)
    assert dict((k.lower(), v) for k, v in seen["headers"])["x-amzn-sagemaker-inference-component"] == "ic-small"
    for kwargs, says in (({}, "InferenceComponentName is required"), ({"InferenceComponentName": "ic-none"}, "no inference component 'ic-none'")):
        with pytest.raises(ClientError) as raised:
            client.invoke_endpoint(EndpointName="llm", Body=BODY, **kwargs)
        assert raised.value.response["Error"]["Code"] == "ValidationError" and says in raised.value.response["Error"]["Message"]
    labels = {"endpoint_name": "llm", "variant_name": "AllTraffic"}
    samples = proxy.samples()

    def sample(name: str, component: str) -> float:
        return samples[(name, frozenset({**labels, "inference_component": component}.items()))]

    assert sample("sagemaker_invocations_total", "ic-small") == 3 and sample("sagemaker_invocations_total", "ic-large") == 2
    assert sample("sagemaker_invocations_per_instance_total", "ic-small") == pytest.approx(1.5)  # 3 x 1/2
    assert sample("sagemaker_invocations_per_instance_total", "ic-large") == pytest.approx(0.5)  # 2 x 1/4
    assert sample("sagemaker_invocations_total", "") == 0  # the variant's own traffic
    assert proxy.value("sagemaker_proxy_rejected_requests_total", endpoint_name="llm", inference_component="", reason="unknown_inference_component") == 2

    cloudwatch = boto3.client("cloudwatch", endpoint_url=moto.url, region_name="us-east-1")

    def cw(metric: str, component: str) -> dict[str, float]:
        deadline = time.monotonic() + 20
        while True:
            points = cloudwatch.get_metric_statistics(
                Namespace=namespace, MetricName=metric, Dimensions=[{"Name": "InferenceComponentName", "Value": component}],
                StartTime=time.time() - 600, EndTime=time.time() + 300, Period=3600, Statistics=["SampleCount", "Sum", "Maximum"],
            )["Datapoints"]
            if points or time.monotonic() > deadline:
                return points[0] if points else {}
            time.sleep(0.25)

    assert cw("Invocations", "ic-small")["Sum"] == 3
    assert cw("InvocationsPerCopy", "ic-small")["Sum"] == pytest.approx(1.5)
    assert cw("ConcurrentRequestsPerCopy", "ic-large")["Maximum"] == pytest.approx(0.25)  # one at a time over 4 copies
    names = {m["MetricName"] for m in cloudwatch.list_metrics(Namespace=namespace, Dimensions=[{"Name": "InferenceComponentName"}])["Metrics"]}
    assert {"Invocations", "ModelLatency", "OverheadLatency", "InvocationsPerCopy", "ConcurrentRequestsPerCopy"} <= names
    assert "InvocationsPerInstance" not in names and "ConcurrentRequestsPerModel" not in names
