"""The README as a newcomer meets it: every block marked runnable runs as written, and its metric tables are
the definitions in metrics/.

A fenced block preceded by ``<!-- runnable ... -->`` runs from the repository, with the repository's
``.venv`` as the README's commands name it (``.venv/bin/...``), in a directory of links to the repository's
files, so that what a block writes (``answer.json``) stays out of it: a ``sh`` block under ``bash -e -o pipefail``,
a ``python`` block under ``.venv/bin/python``. ``<!-- runnable beside make serve ... -->`` blocks run while
the example model and the proxy run as ``make serve`` starts them. Each block is bounded in time, and every
process it leaves behind is stopped. The blocks listen on the README's own ports (8080, 8081, 9090): a test
fails, saying so, where one of them is taken. No AWS: blocks bring their own region and (fake) credentials.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from metrics import definitions as d
from tests.conftest import ROOT

README = ROOT / "README.md"
VENV_BIN = ROOT / ".venv" / "bin"
PORTS = (8080, 8081, 9090)  # the example model's, and the proxy's two, as the README starts them
BLOCK_TIMEOUT_S = 120.0
MIN_RUNNABLE = 4  # the by-hand start, the token stream, boto3 and the AWS CLI: the marker cannot silently go
MARKER = "<!-- runnable"
BLOCK = re.compile(
    r"^(?P<indent>[ ]*)<!-- runnable(?P<beside> beside make serve)?(?::[^\n]*?)? -->\n"
    r"(?P=indent)```(?P<language>sh|python)\n(?P<code>.*?)\n(?P=indent)```$",
    re.MULTILINE | re.DOTALL,
)
# What `make serve` starts (the Makefile's serve target; test_make_serve_starts_what_the_tests_start checks it).
SERVE = (
    [".venv/bin/python", "-m", "example_model", "--port", "8081"],
    [".venv/bin/sagemaker-metrics-proxy", "serve", "--upstream", "http://127.0.0.1:8081", "--endpoint-name", "my-endpoint"],
)
# Beyond a clean exit: what a block's output shows, for the blocks that contain the key.
SHOWS = {
    "grep '^sagemaker_invocations_total'": [
        r'^\{"predictions":\[\{"label":"setosa"',
        r'^sagemaker_invocations_total\{endpoint_name="my-endpoint",variant_name="AllTraffic"\} 1\.0$',
    ],
    "--endpoint-name chat": [
        r"^data: \[DONE\]$",
        *(
            rf'^sagemaker_{name}\{{endpoint_name="chat",variant_name="AllTraffic"\}} {value}$'
            for name, value in (
                ("first_chunk_latency_seconds_count", "1.0"),
                ("time_to_first_token_seconds_count", "1.0"),
                ("time_per_output_token_seconds_count", "1.0"),
                ("output_tokens_total", "20.0"),
            )
        ),
    ],
    "invoke_endpoint_with_response_stream": [
        r"""^b'\{"predictions":\[\{"label":"setosa".*' AllTraffic$""",  # InvokeEndpoint
        r"""^b'\{"predictions":\[\{"label":"setosa".*'$""",  # a PayloadPart of the stream
    ],
    "sagemaker-runtime invoke-endpoint": [r'^    "InvokedProductionVariant": "AllTraffic"$', r'^\{"predictions":\[\{"label":"setosa"'],
}


@dataclass(frozen=True)
class Block:
    language: str
    code: str
    beside_serve: bool
    line: int

    def __str__(self) -> str:
        return f"README.md:{self.line}"


def runnable_blocks(text: str) -> list[Block]:
    blocks = []
    for match in BLOCK.finditer(text):
        indent = len(match["indent"])
        code = "\n".join(line[indent:] for line in match["code"].splitlines())
        blocks.append(Block(match["language"], code, bool(match["beside"]), text.count("\n", 0, match.start()) + 2))
    return blocks


BLOCKS = runnable_blocks(README.read_text())


def test_the_runnable_marker_is_on_every_block_that_a_newcomer_copies() -> None:
    text = README.read_text()
    assert text.count(MARKER) == len(BLOCKS), "a <!-- runnable --> marker that is not right above a ```sh or ```python block"
    assert len(BLOCKS) >= MIN_RUNNABLE, f"{len(BLOCKS)} runnable blocks in the README, at least {MIN_RUNNABLE} expected"
    for key in SHOWS:
        assert any(key in block.code for block in BLOCKS), f"no runnable block contains {key!r} any more"


def test_make_serve_starts_what_the_tests_start() -> None:
    recipe = (ROOT / "Makefile").read_text().split("\nserve:", 1)[1].split("\n\n", 1)[0]
    for command in SERVE:
        assert " ".join(command).replace(".venv/bin/", "$(BIN)/") in recipe, recipe


# -- running the blocks --------------------------------------------------------------------------------------


def _venv_or_skip() -> None:
    missing = [name for name in ("python", "sagemaker-metrics-proxy", "aws") if not (VENV_BIN / name).exists()]
    if missing:
        why = f"the README's blocks run .venv/bin/{missing[0]}, which is not there; `make test` makes the .venv"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)


def _taken(port: int) -> bool:
    """Whether the proxy or the example model could not listen on ``port`` now, as they bind it."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def _ports_free_or_fail(wait_s: float = 0.0) -> None:
    deadline = time.monotonic() + wait_s
    while (taken := [p for p in PORTS if _taken(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    if taken:
        pytest.fail(f"port {taken[0]} is taken here: the README's commands start the model and the proxy on ports 8080, 8081 and 9090")


def _environment() -> dict[str, str]:
    """The caller's environment without anything that would configure the proxy, AWS or OpenTelemetry: what
    the blocks need, they say."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGEMAKER_PROXY_", "AWS_", "OTEL_"))}
    env.update(AWS_CONFIG_FILE="/nonexistent/aws-config", AWS_SHARED_CREDENTIALS_FILE="/nonexistent/aws-credentials")
    return env


@dataclass
class Started:
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    def stop(self, grace_s: float = 15.0) -> None:
        """Everything in the process group: SIGTERM, then SIGKILL after ``grace_s``."""
        pgid = self.proc.pid
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                self.proc.poll()  # reaps the leader; the others are reparented and reaped by init
                try:
                    os.killpg(pgid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.1)

    def output(self) -> tuple[str, str]:
        return self.out.read_text(errors="replace"), self.err.read_text(errors="replace")


def _start(args: list[str], directory: Path, name: str) -> Started:
    # Output to files, not pipes: a process left in the background would hold a pipe open past the block.
    out, err = directory / f"{name}.out", directory / f"{name}.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            args, cwd=directory / "repository", env=_environment(), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, start_new_session=True
        )
    return Started(proc, out, err)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory for the output, and ``repository/``: a link to each of the repository's files."""
    with tempfile.TemporaryDirectory(prefix="readme-") as directory:
        links = Path(directory) / "repository"
        links.mkdir()
        for entry in ROOT.iterdir():
            (links / entry.name).symlink_to(entry)
        yield Path(directory)


def _serving(workdir: Path) -> list[Started]:
    """What `make serve` starts, until /readyz says the proxy and the model answer."""
    started = [_start(command, workdir, f"serve-{i}") for i, command in enumerate(SERVE)]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get("http://127.0.0.1:9090/readyz", timeout=2).status_code == 200:
                return started
        except httpx.HTTPError:
            pass
        if any(s.proc.poll() is not None for s in started):
            break
        time.sleep(0.2)
    for s in started:
        s.stop()
    raise AssertionError(f"what make serve starts did not become ready: {[s.output() for s in started]}")


@pytest.mark.e2e
@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_the_readme_block_runs_as_written(block: Block, workdir: Path) -> None:
    _venv_or_skip()
    _ports_free_or_fail()
    servers = _serving(workdir) if block.beside_serve else []
    command = ["bash", "-e", "-o", "pipefail", "-c", block.code] if block.language == "sh" else [".venv/bin/python", "-c", block.code]
    run = _start(command, workdir, "block")
    try:
        try:
            code = run.proc.wait(BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
    finally:
        for started in (run, *servers):
            started.stop()
    stdout, stderr = run.output()
    assert code == 0, f"{block} exited {code if code is not None else f'after no {BLOCK_TIMEOUT_S:g} s'}:\n{block.code}\n-- stdout:\n{stdout[-4000:]}\n-- stderr:\n{stderr[-4000:]}"
    assert "Traceback" not in stderr, stderr
    for key, patterns in SHOWS.items():
        if key in block.code:
            for pattern in patterns:
                assert re.search(pattern, stdout, re.MULTILINE), f"{block}: {pattern!r} not in its output:\n{stdout[-4000:]}"
    _ports_free_or_fail(wait_s=30)  # all stopped: the next block finds the ports as this one did


# -- the metric tables are the definitions -----------------------------------------------------------------


def _section(text: str, title: str) -> str:
    start = text.index(f"\n{title}\n")
    end = re.compile(r"^#{2,3} ", re.MULTILINE).search(text, start + len(title) + 2)
    return text[start : end.start() if end else len(text)]


def _table(section: str, header: str) -> list[list[str]]:
    """The rows of the table under ``header`` in ``section``, each a list of its cells."""
    lines = section[section.index(header) :].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_the_cloudwatch_table_is_what_the_proxy_publishes() -> None:
    """Every invocation metric with a CloudWatch name (metrics/definitions.py) is a row, with its unit, and
    every row is published; the instance metrics have their own table, and the component names the text."""
    text = README.read_text()
    published = {m.cloudwatch_name: m.unit for m in d.ALL_METRICS if m.cloudwatch_name and m not in d.HOST_METRICS}
    rows = _table(_section(text, "## CloudWatch"), "| metric | unit | per invocation |")
    table = {name.strip(): unit for names, unit, _ in rows for name in names.split(",")}
    assert len(table) == sum(len(names.split(",")) for names, _, _ in rows), "a metric listed twice"
    assert set(table) - set(published) == set(), "rows of the README's CloudWatch table that nothing publishes"
    assert set(published) - set(table) == set(), "published to CloudWatch, missing from the README's table (## CloudWatch)"
    assert table == published, "units differ"
    for m in d.ALL_METRICS:
        if m.component_cloudwatch_name:
            assert f"`{m.component_cloudwatch_name}`" in text, m.component_cloudwatch_name
    instance = _table(_section(text, "## Instance metrics"), "| SageMaker (CloudWatch) | Prometheus (gauge) | what it is |")
    assert {row[0]: row[1].strip("`") for row in instance} == {m.cloudwatch_name: m.prometheus_name for m in d.HOST_METRICS}


def test_the_metric_tables_pair_each_cloudwatch_name_with_its_prometheus_name() -> None:
    by_cloudwatch = {m.cloudwatch_name: m.prometheus_name for m in d.ALL_METRICS if m.cloudwatch_name}
    rows = [
        row
        for header in ("| SageMaker (CloudWatch) | Prometheus | recorded per invocation |", "| SageMaker (CloudWatch) | Prometheus | recorded per streamed invocation |")
        for row in _table(_section(README.read_text(), "## Metrics"), header)
    ]
    assert len(rows) >= 12
    for cloudwatch, prometheus, _ in rows:
        name = re.match(r"`([a-z0-9_]+)`", prometheus)
        assert name is not None, prometheus
        if cloudwatch:
            assert by_cloudwatch[cloudwatch] == name[1], (cloudwatch, prometheus)
        else:
            assert name[1] not in by_cloudwatch.values(), f"{name[1]} has a CloudWatch name; the table leaves it out"
