"""Which requests are invocations: routes, literal (``POST /invocations``) or templates whose ``{model}`` and
``{version}`` match one path segment (``POST /v2/models/{model}/infer``), and presets for the common model
servers. A literal route is one set lookup; templates are tried only when no literal matched."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
CAPTURES = ("model", "version")
_PLACEHOLDER = re.compile(r"\{([^{}/]*)\}")
# Pattern characters a user may expect to work (globs, regular expressions) but that a route does not have.
_REFUSED = re.compile(r"[*?\[\]{}|\\^$]")


def parse(raw: str) -> tuple[str, str]:
    """A route ``METHOD /path``; raises ValueError, naming what is wrong, for anything else."""
    method, _, path = raw.strip().partition(" ")
    method, path = method.upper(), path.strip()
    if method not in METHODS or not path.startswith("/") or " " in path:
        raise ValueError(f"must be 'METHOD /path' such as 'POST /invocations' or 'POST /v2/models/{{model}}/infer', got {raw!r}")
    names = _PLACEHOLDER.findall(path)
    unknown = [n for n in names if n not in CAPTURES]
    if unknown:
        raise ValueError(f"{{{unknown[0]}}} is no placeholder: a route may capture {{model}} and {{version}}, got {raw!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"each placeholder may appear once, got {raw!r}")
    stray = _REFUSED.search(_PLACEHOLDER.sub("", path))
    if stray:
        raise ValueError(
            f"{stray.group()!r} has no meaning in a route: use {{model}} for a path segment that varies, got {raw!r}"
        )
    return method, path


def _compile(path: str) -> re.Pattern[str]:
    out, end = [], 0
    for found in _PLACEHOLDER.finditer(path):
        out.append(re.escape(path[end:found.start()]))
        out.append(f"(?P<{found.group(1)}>[^/]+)")
        end = found.end()
    out.append(re.escape(path[end:]))
    return re.compile("".join(out))


class Routes:
    """The invocation routes: ``match`` says whether a request is an invocation, and which model its path names."""

    __slots__ = ("exact", "model_path", "routes", "templates")

    def __init__(self, routes: Iterable[tuple[str, str]]) -> None:
        self.routes = tuple(sorted(routes))
        self.exact = frozenset(r for r in self.routes if "{" not in r[1])
        self.templates = tuple((m, _compile(p)) for m, p in self.routes if "{" in p)
        # Where the Runtime API calls the model: its first literal POST route, as SageMaker calls /invocations.
        self.model_path = next((p for m, p in self.exact if m == "POST"), "/invocations")

    def match(self, method: str, path: str) -> tuple[bool, str | None]:
        """(an invocation, the model its path names or None)."""
        if (method, path) in self.exact:
            return True, None
        for m, pattern in self.templates:
            if m == method:
                found = pattern.fullmatch(path)
                if found is not None:
                    return True, found.groupdict().get("model")
        return False, None

    def __str__(self) -> str:
        return ", ".join(f"{m} {p}" for m, p in self.routes)


@dataclass(frozen=True)
class ModelServer:
    """A preset: what a model server takes invocations on, and where it answers its health check."""

    routes: frozenset[tuple[str, str]]
    ping_path: str


def _server(ping_path: str, *routes: str) -> ModelServer:
    return ModelServer(frozenset(parse(r) for r in routes), ping_path)


_V2 = ("POST /v2/models/{model}/infer", "POST /v2/models/{model}/versions/{version}/infer")
_OPENAI = ("POST /v1/chat/completions", "POST /v1/completions", "POST /v1/embeddings")
MODEL_SERVERS: dict[str, ModelServer] = {
    "sagemaker": _server("/ping", "POST /invocations"),
    # KServe's open inference protocol (v2), as MLServer and KServe serve it.
    "kserve-v2": _server("/v2/health/ready", *_V2),
    "triton": _server(
        "/v2/health/ready", *_V2, "POST /v2/models/{model}/generate", "POST /v2/models/{model}/generate_stream",
        "POST /v2/models/{model}/versions/{version}/generate", "POST /v2/models/{model}/versions/{version}/generate_stream",
    ),
    "torchserve": _server("/ping", "POST /predictions/{model}", "POST /predictions/{model}/{version}"),
    # vLLM, llama.cpp's server, SGLang and other OpenAI-compatible servers.
    "openai": _server("/health", *_OPENAI),
    "tgi": _server("/health", "POST /generate", "POST /generate_stream", *_OPENAI),
    "ollama": _server("/", "POST /api/generate", "POST /api/chat", "POST /api/embed", "POST /api/embeddings", *_OPENAI),
}


def suggestion(method: str, path: str) -> str:
    """The flag that would count a request: a preset that takes it, else a route for its path."""
    for name, server in MODEL_SERVERS.items():
        if Routes(server.routes).match(method, path)[0]:
            return f"--model-server {name}"
    return f"--invocation-route '{method} {path}'"


def shape(method: str, path: str) -> str:
    """A request's path shape for the warning about uncounted requests: its first segment, the rest as ``*``,
    so model names and ids do not make a shape each."""
    parts = path.split("/")
    return method + " " + "/".join(parts[:2] + ["*"] * len(parts[2:]))
