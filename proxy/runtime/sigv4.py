"""AWS Signature Version 4 on the Runtime API, as SageMaker requires it: the signature is recomputed from what
arrived (the signed headers only, the payload hashed) with the secret of the access key it names.

The credentials file holds one ``ACCESS_KEY_ID SECRET_ACCESS_KEY`` per line (``#`` starts a comment) and is
re-read when it changes. Secrets are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from calendar import timegm
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qsl, quote

from proxy.types import Body, Headers

log = logging.getLogger("proxy.auth")

SERVICE = "sagemaker"
ALGORITHM = "AWS4-HMAC-SHA256"
MAX_SKEW_S = 300  # five minutes, as AWS allows


class AuthError(Exception):
    """A request that fails authentication: ``code`` is the error type botocore expects, with its message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class CredentialsFile:
    """Access key ids and their secrets, from ``path``, re-read (at most once a second) when it changes."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic, *, region: str | None = None) -> None:
        self.region = region  # the region a signature must be scoped to; None: any
        self._path = path
        self._clock = clock
        self._checked = 0.0
        self._mtime = -1.0
        self._secrets: dict[str, str] = {}
        self._warned = False  # a bad file is said once, until it is read again
        self.reload()

    def reload(self) -> None:
        """Raises ValueError (naming the line, never a secret) for a malformed file, OSError for an unreadable one."""
        mtime = os.stat(self._path).st_mtime
        secrets = {}
        for number, line in enumerate(self._path.read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{self._path} line {number}: expected ACCESS_KEY_ID SECRET_ACCESS_KEY")
            secrets[parts[0]] = parts[1]
        self._secrets, self._mtime = secrets, mtime

    def secret(self, access_key_id: str) -> str | None:
        now = self._clock()
        if now - self._checked >= 1.0:
            self._checked = now
            try:
                if os.stat(self._path).st_mtime != self._mtime:
                    self.reload()
                    self._warned = False
            except (OSError, ValueError) as e:
                if not self._warned:  # keep the last good keys; a half-written file is read again next second
                    self._warned = True
                    log.warning("credentials file not reloaded, the keys read before stay in use: %s", e.strerror if isinstance(e, OSError) else e)
        return self._secrets.get(access_key_id)


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


def _payload_hash(body: Body) -> str:
    digest = hashlib.sha256()
    for part in (body,) if isinstance(body, bytes) else body:
        digest.update(part)
    return digest.hexdigest()


def _trimmed(value: bytes) -> str:
    """A header value as SigV4 canonicalizes it: trimmed, runs of spaces made one (spaces only)."""
    return " ".join(part for part in value.decode("latin-1").strip(" \t").split(" ") if part)


def signed_headers(headers: Headers) -> frozenset[bytes]:
    """The header names a request's Authorization says it signed (lowercase)."""
    for name, value in headers:
        if name.lower() == b"authorization":
            for part in value.split(b","):
                key, _, names = part.strip().partition(b"=")
                if key == b"SignedHeaders":
                    return frozenset(names.lower().split(b";"))
    return frozenset()


def verify(
    method: str, raw_path: bytes, query: bytes, headers: Headers, body: Body, credentials: CredentialsFile, now: float | None = None
) -> None:
    """Raises AuthError unless the request carries a valid signature for service ``sagemaker``."""
    values: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        values.setdefault(name.lower(), []).append(value)
    authorization = values.get(b"authorization", [b""])[0].decode("latin-1")
    if not authorization:
        raise AuthError("MissingAuthenticationTokenException", "Missing Authentication Token")
    algorithm, _, fields = authorization.partition(" ")
    parts = dict(p.strip().partition("=")[::2] for p in fields.split(","))
    credential = parts.get("Credential", "").split("/")
    signed = parts.get("SignedHeaders", "")
    signature = parts.get("Signature", "")
    if algorithm != ALGORITHM or len(credential) != 5 or credential[4] != "aws4_request" or not signed or not signature:
        raise AuthError("IncompleteSignatureException", "Authorization header requires Credential, SignedHeaders and Signature (AWS4-HMAC-SHA256).")
    access_key, date, region, service, _ = credential
    if service != SERVICE:
        raise AuthError("InvalidSignatureException", f"Credential should be scoped to correct service: '{SERVICE}'.")
    if credentials.region is not None and region != credentials.region:
        raise AuthError("InvalidSignatureException", f"Credential should be scoped to a valid region, not '{region[:40]}'.")
    secret = credentials.secret(access_key)
    if secret is None:
        raise AuthError("UnrecognizedClientException", "The security token included in the request is invalid.")
    amz_date = values.get(b"x-amz-date", [b""])[0].decode("latin-1")
    try:
        signed_at = timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ"))
    except ValueError:
        raise AuthError("IncompleteSignatureException", "X-Amz-Date is missing or not in the form YYYYMMDDTHHMMSSZ.") from None
    if abs((time.time() if now is None else now) - signed_at) > MAX_SKEW_S or amz_date[:8] != date:
        raise AuthError("InvalidSignatureException", f"Signature expired: {amz_date} is more than 5 minutes from now, or not of the credential's date.")
    if len(signature) != 64 or any(c not in "0123456789abcdef" for c in signature):
        raise AuthError("InvalidSignatureException", "The signature must be 64 lowercase hexadecimal digits.")
    payload = _payload_hash(body)
    declared = values.get(b"x-amz-content-sha256", [b""])[0].decode("latin-1")
    if declared and declared != payload:  # UNSIGNED-PAYLOAD included: the body must be covered
        raise AuthError("InvalidSignatureException", "The payload's hash does not match X-Amz-Content-SHA256.")
    names = signed.split(";")
    if "host" not in names or any(n.encode() not in values for n in names):
        raise AuthError("InvalidSignatureException", "SignedHeaders must include host and name only headers that were sent.")
    canonical_headers = "".join(f"{n}:{','.join(_trimmed(v) for v in values[n.encode()])}\n" for n in names)
    pairs = sorted((quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in parse_qsl(query.decode("latin-1"), keep_blank_values=True))
    canonical = "\n".join((
        method,
        quote(raw_path.decode("latin-1"), safe="/~"),  # the path as sent, encoded again, as AWS does for all but S3
        "&".join(f"{k}={v}" for k, v in pairs),
        canonical_headers,
        signed,
        payload,
    ))
    scope = f"{date}/{region}/{service}/aws4_request"
    to_sign = f"{ALGORITHM}\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    key = _hmac(_hmac(_hmac(_hmac(f"AWS4{secret}".encode(), date), region), service), "aws4_request")
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature):
        raise AuthError(
            "InvalidSignatureException",
            "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method.",
        )
