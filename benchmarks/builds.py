"""Both builds of this checkout side by side, for the benchmarks: a copy of the source as pure Python and a copy
compiled with mypyc (setup.py), each in a directory of its own, whatever build the checkout itself is in.

A proxy process runs one of them with that directory as its working directory: ``python -m proxy`` puts the
working directory first on ``sys.path``, so its ``proxy`` package is the one imported.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("proxy", "metrics", "example_model")
FILES = ("setup.py", "pyproject.toml", "README.md")


def _copy(target: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", *(f"*{suffix}" for suffix in EXTENSION_SUFFIXES))
    for name in SOURCES:
        shutil.copytree(ROOT / name, target / name, ignore=ignore)
    for name in FILES:
        shutil.copy2(ROOT / name, target / name)
    return target


def which_build(tree: Path) -> str:
    """What ``--version`` says in ``tree``."""
    out = subprocess.run([sys.executable, "-m", "proxy", "--version"], cwd=tree, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def build_tree(workdir: Path, which: str) -> Path:
    """A copy of the checkout in ``workdir/which``, built ``which`` (``pure`` or ``compiled``); SystemExit if the
    compiled build cannot be made."""
    tree = _copy(workdir / which)
    if which == "compiled":
        started = time.monotonic()
        print("benchmark: compiling the request path with mypyc (about a minute)", flush=True)
        result = subprocess.run(
            [sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree, capture_output=True, text=True,
            env={**os.environ, "SAGEMAKER_PROXY_COMPILE": "1"},
        )
        if result.returncode != 0:
            raise SystemExit(f"benchmark: the compiled build failed (it needs a C compiler, Python's headers and mypy):\n{result.stderr[-2000:]}")
        print(f"benchmark: compiled in {time.monotonic() - started:.0f} s", flush=True)
    line = which_build(tree)
    if f"{which} build" not in line.replace("pure-Python build", "pure build"):
        raise SystemExit(f"benchmark: the {which} copy runs something else: {line}")
    return tree


def build_trees(workdir: Path) -> dict[str, Path]:
    """``{"pure": dir, "compiled": dir}`` under ``workdir``."""
    return {which: build_tree(workdir, which) for which in ("pure", "compiled")}
