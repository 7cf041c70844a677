"""CPU and memory of the watched containers, read from their cgroups (v1 or v2, detected at start).

A watched cgroup is named by its path as ``/proc/PID/cgroup`` shows it (``/docker/abc``); by default it
is the cgroup this process runs in. Each controller's path is resolved against the mount that serves
that controller, read from ``/proc/self/mountinfo``, so a cgroup namespace or a container that sees only
its own subtree resolves to the right directory. Every path is taken under ``root`` so tests can lay
out a fake ``/proc`` and ``/sys/fs/cgroup``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("proxy.host")

U64 = 1 << 64


class CgroupError(ValueError):
    """A watched cgroup cannot be found or read; the message is one line."""


@dataclass(frozen=True)
class Mount:
    root: str  # the cgroup path that the mount point shows
    point: str  # where it is mounted
    version: int
    controllers: frozenset[str]


def mounts(root: Path) -> list[Mount]:
    """The cgroup mounts of this process's mount namespace."""
    out = []
    for line in (root / "proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        dash = fields.index("-")
        fstype, options = fields[dash + 1], fields[dash + 3]
        if fstype == "cgroup":
            out.append(Mount(fields[3], fields[4], 1, frozenset(options.split(","))))
        elif fstype == "cgroup2":
            out.append(Mount(fields[3], fields[4], 2, frozenset()))
    return out


def own_cgroups(root: Path) -> dict[str, str]:
    """Controller (``""`` for the v2 hierarchy) to this process's cgroup path, from /proc/self/cgroup."""
    out = {}
    for line in (root / "proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            out[controller] = path
    return out


def _directory(root: Path, mount: Mount, path: str) -> Path:
    if mount.root == "/":
        relative = path
    elif path == mount.root or path.startswith(mount.root + "/"):
        relative = path[len(mount.root) :]
    else:
        relative = "/"  # outside what the mount shows: the mount's own cgroup is the nearest we can see
    return root / mount.point.lstrip("/") / relative.lstrip("/")


@dataclass(frozen=True)
class Controller:
    """Where one controller (``cpuacct`` or ``memory``) is read: its cgroup version and mount."""

    version: int
    mount: Mount

    @classmethod
    def find(cls, name: str, all_mounts: Sequence[Mount]) -> Controller:
        # A v1 hierarchy that has the controller wins: on a hybrid host the v2 mount holds no controllers.
        for m in all_mounts:
            if m.version == 1 and name in m.controllers:
                return cls(1, m)
        for m in all_mounts:
            if m.version == 2:
                return cls(2, m)
        raise CgroupError(f"no cgroup hierarchy serves {name}: is /sys/fs/cgroup mounted?")


def _read_int(path: Path) -> int:
    return int(path.read_text().split()[0])


def _stat(path: Path) -> dict[str, int]:
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        out[key] = int(value)
    return out


class CpuUsage:
    """Cumulative CPU time of the watched cgroups; ``percent()`` is their usage since the last call, summed,
    as percent of one CPU (0-100 x CPUs)."""

    def __init__(self, directories: Sequence[Path], version: int, clock: Callable[[], float], cpus: int | None = None) -> None:
        self.directories = tuple(directories)
        self._version = version
        self._clock = clock
        self._last: dict[Path, int] = {}
        self._last_time = clock()
        self._warned: set[Path] = set()
        self._cpus = cpus  # the host's CPUs, where known: the most the watched cgroups can use
        for directory in self.directories:
            counter = self._counter(directory)
            if counter is not None:
                self._last[directory] = counter

    def _counter(self, directory: Path) -> int | None:
        """Native units: nanoseconds (v1 cpuacct.usage) or microseconds (v2 cpu.stat usage_usec)."""
        try:
            if self._version == 1:
                return _read_int(directory / "cpuacct.usage")
            return _stat(directory / "cpu.stat")["usage_usec"]
        except (OSError, ValueError, KeyError) as e:
            if directory not in self._warned:
                self._warned.add(directory)
                log.warning("cannot read the CPU usage of cgroup %s: %s", directory, e)
            return None

    def percent(self) -> float | None:
        """None on the first call after a counter went missing or was reset (a restarted container)."""
        before = self._clock()
        counters = {directory: self._counter(directory) for directory in self.directories}
        # The counters were read between two clock readings: take the middle, so a thread that was
        # descheduled while reading does not stretch the CPU time against the interval.
        now = (before + self._clock()) / 2
        elapsed = now - self._last_time
        self._last_time = now
        used_s = 0.0
        complete = True
        scale = 1e-9 if self._version == 1 else 1e-6
        for directory, counter in counters.items():
            last = self._last.pop(directory, None)
            if counter is None:
                complete = False
                continue
            self._warned.discard(directory)
            self._last[directory] = counter
            if last is None:
                complete = False
            elif counter >= last:
                used_s += (counter - last) * scale
            elif last >= U64 // 2:  # wrapped around 2^64
                used_s += (counter + U64 - last) * scale
            else:  # went back: the cgroup was recreated, so the interval's usage is unknown
                complete = False
        if not complete or elapsed <= 0:
            return None
        percent = used_s / elapsed * 100.0
        # No cgroup can use more than every CPU of the host; more is the residue of a late reading.
        return percent if self._cpus is None else min(percent, 100.0 * self._cpus)


@dataclass(frozen=True)
class MemoryReading:
    used: int  # bytes, without reclaimable page cache
    limit: int  # bytes; the host's total when the cgroup has no lower limit


class MemoryUsage:
    """Memory in use by the watched cgroups (usage less inactive file pages, as ``docker stats`` and the
    kubelet's working set count it) over their limits, or the host's memory where there is none."""

    def __init__(self, directories: Sequence[Path], version: int, mount_point: Path, host_total: int) -> None:
        self.directories = tuple(directories)
        self._version = version
        self._mount_point = mount_point
        self.host_total = host_total

    def read(self, directory: Path) -> MemoryReading:
        if self._version == 1:
            stat = _stat(directory / "memory.stat")
            usage = _read_int(directory / "memory.usage_in_bytes")
            inactive = stat.get("total_inactive_file", stat.get("inactive_file", 0))
            # Includes every ancestor's limit, the smallest of which is the one that applies.
            limit = stat.get("hierarchical_memory_limit") or _read_int(directory / "memory.limit_in_bytes")
        else:
            stat = _stat(directory / "memory.stat")
            usage = _read_int(directory / "memory.current")
            inactive = stat.get("inactive_file", 0)
            limit = self._v2_limit(directory)
        return MemoryReading(max(0, usage - inactive), min(limit, self.host_total))

    def _v2_limit(self, directory: Path) -> int:
        limit = self.host_total
        current = directory
        while True:
            try:
                raw = (current / "memory.max").read_text().strip()
            except FileNotFoundError:
                raw = "max"  # the root cgroup has no memory.max
            if raw != "max":
                limit = min(limit, int(raw))
            if current == self._mount_point or current.parent == current:
                return limit
            current = current.parent

    def percent(self) -> float | None:
        readings = []
        for directory in self.directories:
            try:
                readings.append(self.read(directory))
            except (OSError, ValueError) as e:
                log.debug("cannot read the memory of cgroup %s: %s", directory, e)
        if not readings:
            return None
        # Limits add up, but together they can use no more than the host has.
        limit = min(self.host_total, sum(r.limit for r in readings))
        return sum(r.used for r in readings) / limit * 100.0


def host_memory(root: Path) -> int:
    """MemTotal from /proc/meminfo, in bytes."""
    for line in (root / "proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise CgroupError("no MemTotal in /proc/meminfo")


@dataclass(frozen=True)
class Cgroups:
    """The readers for the watched cgroups, resolved once at start."""

    cpu: CpuUsage
    memory: MemoryUsage

    @classmethod
    def discover(cls, root: Path, watch: Sequence[str], *, include_own: bool = True, clock: Callable[[], float]) -> Cgroups:
        """Resolve this process's cgroup (unless ``include_own`` is false) and each of ``watch``; raises
        CgroupError, naming the path, when one does not exist."""
        try:
            all_mounts = mounts(root)
            own = own_cgroups(root)
            total = host_memory(root)
        except OSError as e:
            raise CgroupError(f"cannot read the cgroups of this process: {e}") from None
        cpu = Controller.find("cpuacct", all_mounts)
        memory = Controller.find("memory", all_mounts)

        def directories(controller: Controller, name: str) -> list[Path]:
            out: list[Path] = []
            paths = [own.get(name if controller.version == 1 else "", "/")] if include_own else []
            for path in [*paths, *watch]:
                directory = _directory(root, controller.mount, path)
                if not directory.is_dir():
                    raise CgroupError(f"cgroup {path} not found: no {directory}")
                if directory not in out:
                    out.append(directory)
            return out

        cpu_dirs = directories(cpu, "cpuacct")
        memory_dirs = directories(memory, "memory")
        log.debug("watching cgroup v%d CPU %s and v%d memory %s", cpu.version, cpu_dirs, memory.version, memory_dirs)
        if include_own:
            own_path = own.get("cpuacct" if cpu.version == 1 else "", "/")
            # cgroup v2's true root has no cpu.max; a container's namespaced root (also "/") has one.
            machine = own_path == "/" and cpu.version == 2 and not (cpu_dirs[0] / "cpu.max").exists()
            measured = "the whole machine: this process runs in the root cgroup, as on a plain VM" if machine else f"cgroup {own_path}"
            also = f", and of {', '.join(watch)}" if watch else ""
            log.info("CPU and memory utilization are of %s%s", measured, also)
        return cls(
            CpuUsage(cpu_dirs, cpu.version, clock, cpus=os.cpu_count() if root == Path("/") else None),
            MemoryUsage(memory_dirs, memory.version, root / memory.mount.point.lstrip("/"), total),
        )
