"""The sampler against this machine's real cgroups: a burner in a cgroup of its own, and 500 MB allocated in one.

Each test makes a child cgroup (root is needed) so the measurement sees only the process under test. On a
machine where that is impossible the test skips with the reason, except under CI=true, where it fails:
CI runs as root on the same kind of machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from metrics.cgroups import Cgroups, Mount, host_memory, mounts, own_cgroups

ROOT = Path("/")
MB = 1 << 20

# Waits for a line on stdin, then burns one CPU until stopped.
BURNER = "import sys\nsys.stdin.readline()\nwhile True:\n    pass\n"
# Waits for a line, allocates 500 MB and touches every page, says so, and holds it until stdin closes.
ALLOCATOR = "import sys\nsys.stdin.readline()\ndata = b'x' * (500 * 2**20)\nprint('ready', flush=True)\nsys.stdin.readline()\n"


def need(ok: bool, reason: str) -> None:
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI runs as root on a machine with cgroups, so this must work there")
    pytest.skip(reason)


@dataclass
class ChildCgroup:
    """A cgroup of our own beside this process's, in the CPU and the memory hierarchy."""

    path: str  # as /proc/PID/cgroup would show it
    directories: dict[str, Path]  # controller: directory
    version: int

    def add(self, pid: int) -> None:
        for directory in dict.fromkeys(self.directories.values()):
            (directory / "cgroup.procs").write_text(f"{pid}\n")

    def limit_memory(self, limit: int) -> None:
        name = "memory.limit_in_bytes" if self.version == 1 else "memory.max"
        (self.directories["memory"] / name).write_text(f"{limit}\n")


def _mount_of(all_mounts: list[Mount], controller: str) -> Mount | None:
    for m in all_mounts:
        if m.version == 1 and controller in m.controllers:
            return m
    return next((m for m in all_mounts if m.version == 2), None)


@contextlib.contextmanager
def child_cgroup() -> Iterator[ChildCgroup]:
    need(os.geteuid() == 0, "making a cgroup needs root")
    need((ROOT / "proc/self/mountinfo").exists(), "no /proc/self/mountinfo: not Linux")
    all_mounts = mounts(ROOT)
    cpu, memory = _mount_of(all_mounts, "cpuacct"), _mount_of(all_mounts, "memory")
    need(cpu is not None and memory is not None, "no cgroup hierarchy serves cpuacct and memory")
    assert cpu is not None and memory is not None
    need(cpu.root == memory.root, f"the CPU and memory hierarchies show different roots ({cpu.root}, {memory.root})")
    name = f"sagemaker-metrics-proxy-test-{uuid.uuid4().hex[:8]}"
    path = f"{cpu.root.rstrip('/')}/{name}"
    directories = {"cpuacct": Path(cpu.point) / name, "memory": Path(memory.point) / name}
    made: list[Path] = []
    try:
        for directory in dict.fromkeys(directories.values()):
            try:
                directory.mkdir()
            except OSError as e:
                need(False, f"cannot make a cgroup at {directory}: {e}")
            made.append(directory)
        if cpu.version == 2:
            need((directories["memory"] / "memory.current").exists(), "the cgroup v2 root does not delegate the memory controller")
        yield ChildCgroup(path, directories, cpu.version)
    finally:
        for directory in reversed(made):
            for _ in range(50):  # the last process may take a moment to leave after it is killed
                try:
                    directory.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


@contextlib.contextmanager
def python(code: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def own_cpu_percent(pid: int, seconds: float) -> tuple[float, float]:
    """The process's own CPU time over ``seconds`` as percent of one CPU, and the wall time it took."""
    process = psutil.Process(pid)
    before, start = sum(process.cpu_times()[:2]), time.monotonic()
    time.sleep(seconds)
    after, end = sum(process.cpu_times()[:2]), time.monotonic()
    return (after - before) / (end - start) * 100, end - start


def test_this_process_cgroups_are_found() -> None:
    need((ROOT / "proc/self/cgroup").exists(), "no /proc/self/cgroup: not Linux")
    cgroups = Cgroups.discover(ROOT, [], clock=time.monotonic)
    own = own_cgroups(ROOT)
    [cpu_dir] = cgroups.cpu.directories
    [memory_dir] = cgroups.memory.directories
    assert cpu_dir.is_dir() and memory_dir.is_dir()
    assert str(memory_dir).endswith(own.get("memory", own.get("", "/")).rstrip("/"))
    time.sleep(0.2)
    cpu, memory = cgroups.cpu.percent(), cgroups.memory.percent()
    assert cpu is not None and 0 <= cpu <= 100 * (os.cpu_count() or 1) * 1.05
    assert memory is not None and 0 < memory <= 100


def test_one_burning_cpu_reads_100_then_0() -> None:
    with child_cgroup() as cgroup, python(BURNER) as burner:
        cgroup.add(burner.pid)
        cpu = Cgroups.discover(ROOT, [cgroup.path], include_own=False, clock=time.monotonic).cpu
        assert burner.stdin is not None
        burner.stdin.write("go\n")
        burner.stdin.flush()
        time.sleep(0.3)
        cpu.percent()  # start the interval now that it burns
        own, _ = own_cpu_percent(burner.pid, 3.0)
        burning = cpu.percent()
        assert burning is not None
        # What the cgroup says is what the kernel charged the process: one CPU, less what others took from it.
        assert burning == pytest.approx(own, abs=5)
        assert 60 <= burning <= 105, f"one burning CPU read as {burning:.1f}% (its own accounting: {own:.1f}%)"
        burner.send_signal(signal.SIGSTOP)
        time.sleep(0.2)
        cpu.percent()
        time.sleep(2.0)
        stopped = cpu.percent()
        assert stopped is not None and stopped < 2, stopped


@pytest.mark.parametrize("limit_mb", [1024, None], ids=["limit-1GiB", "no-limit"])
def test_500_mb_raise_memory_by_the_matching_share(limit_mb: int | None) -> None:
    with child_cgroup() as cgroup, python(ALLOCATOR) as allocator:
        if limit_mb is not None:
            cgroup.limit_memory(limit_mb * MB)
        cgroup.add(allocator.pid)
        memory = Cgroups.discover(ROOT, [cgroup.path], include_own=False, clock=time.monotonic).memory
        before = memory.percent()
        assert before is not None
        assert allocator.stdin is not None and allocator.stdout is not None
        allocator.stdin.write("go\n")
        allocator.stdin.flush()
        assert allocator.stdout.readline().strip() == "ready"
        after = memory.percent()
        assert after is not None
        denominator = limit_mb * MB if limit_mb is not None else host_memory(ROOT)
        expected = 500 * MB / denominator * 100
        # The interpreter's own pages since it moved in add a few MB at most.
        assert after - before == pytest.approx(expected, abs=8 * MB / denominator * 100), (before, after, expected)
