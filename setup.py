"""The compiled build: the request path's modules compiled with mypyc, where mypyc and a C compiler are at hand.

pyproject.toml holds the package's metadata; this file only adds the extension modules. Each compiled module
becomes an extension beside its ``.py`` (``proxy/http/server.cpython-311-x86_64-linux-gnu.so`` next to
``server.py``, and one shared ``proxy/_compiled__mypyc...so`` holding their code); Python imports an extension
before a ``.py`` of the same name, so the ``.py`` files are the fallback wherever none was built.

    pip install .                              # compiled where a C compiler is found, else pure Python
    SAGEMAKER_PROXY_COMPILE=0 pip install .    # pure Python
    SAGEMAKER_PROXY_COMPILE=1 pip install .    # compiled, or the install fails (CI, the image)

In a checkout, ``make compiled`` builds the extensions in place and ``make pure`` removes them.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import sys
import sysconfig

from importlib.machinery import EXTENSION_SUFFIXES

from setuptools import setup
from setuptools.command.build import build

HERE = os.path.dirname(os.path.abspath(__file__))


def compiled_paths() -> list[str]:
    """The files of ``COMPILED`` in proxy/process/build.py (read, not imported: the package is not installed yet),
    compiled together so that calls between them stay native. Modules outside it stay Python."""
    tree = ast.parse(open(os.path.join(HERE, "proxy", "process", "build.py")).read())
    names = next(
        ast.literal_eval(node.value) for node in tree.body
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "COMPILED" for t in node.targets)
    )
    return [name.replace(".", "/") + ".py" for name in names]


# The shared library's module: inside the package, so an editable install finds it as it finds the package.
GROUP = "proxy._compiled"


def why_not() -> str | None:
    """Why the compiled build cannot be made here, or None."""
    if sys.implementation.name != "cpython":
        return f"mypyc compiles for CPython, this is {sys.implementation.name}"
    try:
        import mypyc.build  # noqa: F401
    except ImportError:
        return "mypyc is not installed (it comes with mypy)"
    # mypyc compiles from the types it sees: without these, their classes would be Any to it (pyproject's build requires).
    missing = [name for name in ("httptools", "prometheus_client") if importlib.util.find_spec(name) is None]
    if missing:
        return f"{', '.join(missing)} not installed where the build runs (the compiled modules import them)"
    if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        return f"no Python headers in {sysconfig.get_paths()['include']} (Debian: python3-dev)"
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(os.environ.get("CC", cc).split()[0]) is None:
        return f"no C compiler ({cc}; Debian: build-essential)"
    return None


def extensions(mode: str) -> list:
    """The extension modules for SAGEMAKER_PROXY_COMPILE=``mode``: 0 none, 1 compiled or fail, else where possible."""
    if mode == "0":
        return []
    why = why_not()
    if why is not None:
        if mode == "1":
            sys.exit(f"SAGEMAKER_PROXY_COMPILE=1, but the compiled build cannot be made: {why}")
        print(f"sagemaker-metrics-proxy: installing the pure-Python build: {why}", file=sys.stderr)
        return []
    from mypyc.build import mypycify

    return mypycify(compiled_paths(), opt_level="3", debug_level="0", group_name=GROUP)


class BuildFresh(build):
    """``build``, less the extensions an earlier build left in the build directory: a wheel holds what its
    build lib holds, so a pure build after a compiled one would ship stale compiled modules."""

    def run(self) -> None:
        for package in ("proxy", "metrics"):
            for root, _, files in os.walk(os.path.join(self.build_lib, package)):
                for name in files:
                    if name.endswith(tuple(EXTENSION_SUFFIXES)):
                        os.remove(os.path.join(root, name))
        super().run()


if __name__ == "__main__":  # as pip and setuptools run it; tests import it
    setup(ext_modules=extensions(os.environ.get("SAGEMAKER_PROXY_COMPILE", "")), cmdclass={"build": BuildFresh})
