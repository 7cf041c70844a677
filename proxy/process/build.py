"""Which build runs: the request path compiled with mypyc at install time (``setup.py``), or pure Python.

A compiled module is an extension beside its ``.py``, and Python imports the extension first; so what runs is
told by the file each module was loaded from.
"""

from __future__ import annotations

import importlib
import platform
from importlib import machinery, metadata

# The modules setup.py compiles (it reads this list): the request path, and what a profile of it showed on top.
COMPILED = (
    "proxy.http.server",
    "proxy.http.client",
    "proxy.invocation.app",
    "proxy.invocation.stream",
    "proxy.invocation.record",
    "proxy.invocation.observers",
    "proxy.invocation.headers",
    "proxy.invocation.guard",
    "proxy.invocation.tokens",
    "proxy.invocation.front",
    "proxy.invocation.admission",
    "proxy.invocation.routes",
    "proxy.upstream.balancer",
    "proxy.upstream.variants",
    "metrics.recorder",
    "metrics.inmemory",
    "metrics.inflight",
)


def compiled_modules() -> list[str]:
    """Those of ``COMPILED`` that were loaded from a compiled extension."""
    suffixes = tuple(machinery.EXTENSION_SUFFIXES)
    return [name for name in COMPILED if (importlib.import_module(name).__file__ or "").endswith(suffixes)]


def build() -> str:
    """``compiled``, ``pure``, or ``mixed`` where only some modules are compiled (a partial or stale build)."""
    found = len(compiled_modules())
    return "compiled" if found == len(COMPILED) else "pure" if not found else "mixed"


def describe() -> str:
    """One line: the version, the build and the Python, for ``--version`` and the start line."""
    try:
        version = metadata.version("sagemaker-metrics-proxy")
    except metadata.PackageNotFoundError:
        version = "(not installed)"
    which = build()
    if which == "compiled":
        what = f"compiled build (mypyc, {len(COMPILED)} modules)"
    elif which == "pure":
        what = "pure-Python build"
    else:
        what = f"mixed build: {len(compiled_modules())} of {len(COMPILED)} modules compiled (make compiled or make pure)"
    return f"sagemaker-metrics-proxy {version}, {what}, {platform.python_implementation()} {platform.python_version()}"
