"""The two builds (setup.py, proxy/process/build.py): which one runs is what ``--version`` and the start line say,
and the suite runs on the build it was asked to run on (``make test`` sets SAGEMAKER_PROXY_EXPECT_BUILD)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from proxy.process import build
from tests.conftest import Proxy, Running

ROOT = Path(__file__).resolve().parent.parent


def setup_py() -> ModuleType:
    spec = importlib.util.spec_from_file_location("setup_under_test", ROOT / "setup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # its setup() runs only as __main__, as pip runs it
    return module


def test_setup_compiles_the_modules_that_build_lists() -> None:
    paths = setup_py().compiled_paths()
    assert paths == [name.replace(".", "/") + ".py" for name in build.COMPILED]
    assert all((ROOT / p).is_file() for p in paths)


def test_setup_builds_nothing_when_told_not_to() -> None:
    assert setup_py().extensions("0") == []


def test_which_build_runs_is_read_from_the_loaded_modules() -> None:
    compiled = build.compiled_modules()
    for name in build.COMPILED:
        file = importlib.import_module(name).__file__ or ""
        assert (name in compiled) == (not file.endswith(".py")), (name, file)
    assert build.build() == ("compiled" if len(compiled) == len(build.COMPILED) else "pure" if not compiled else "mixed")


@pytest.mark.skipif(not os.environ.get("SAGEMAKER_PROXY_EXPECT_BUILD"), reason="SAGEMAKER_PROXY_EXPECT_BUILD is not set (make test sets it)")
def test_the_suite_runs_on_the_build_it_was_asked_for() -> None:
    assert build.build() == os.environ["SAGEMAKER_PROXY_EXPECT_BUILD"], build.describe()


def test_version_says_which_build_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "proxy", "--version"], cwd="/", capture_output=True, text=True, check=True).stdout
    which = build.build()
    assert out.startswith("sagemaker-metrics-proxy ")
    assert ("compiled build (mypyc" in out) == (which == "compiled")
    assert ("pure-Python build" in out) == (which == "pure")
    assert out == build.describe() + "\n"


@pytest.mark.e2e
def test_the_start_line_says_which_build_runs(model: Running, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy(model.url, "--log-level", "info")
    deadline = time.monotonic() + 10
    while "proxying " not in proxy.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(line for line in proxy.log.read_text().splitlines() if "proxying " in line)
    assert line.endswith(build.describe()), line
