"""CPU and memory from cgroup v1 and v2 file trees written here, with known counters: the percentages are exact."""

from __future__ import annotations

from pathlib import Path

import pytest

from metrics.cgroups import U64, CgroupError, Cgroups

GIB = 1 << 30
HOST_TOTAL = 8 * GIB
V1_UNLIMITED = 9223372036854771712  # what the kernel shows for no limit

V1_MOUNTS = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2_MOUNTS = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw,nsdelegate\n"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def proc(root: Path, mountinfo: str, cgroup: str) -> None:
    write(root / "proc/self/mountinfo", mountinfo)
    write(root / "proc/self/cgroup", cgroup)
    write(root / "proc/meminfo", f"MemTotal:       {HOST_TOTAL // 1024} kB\nMemFree:        1024 kB\n")


def v1_cgroup(root: Path, path: str, *, usage_ns: int = 0, memory: int = 0, inactive_file: int = 0, limit: int = V1_UNLIMITED) -> None:
    write(root / "sys/fs/cgroup/cpu,cpuacct" / path.lstrip("/") / "cpuacct.usage", f"{usage_ns}\n")
    memory_dir = root / "sys/fs/cgroup/memory" / path.lstrip("/")
    write(memory_dir / "memory.usage_in_bytes", f"{memory}\n")
    write(memory_dir / "memory.limit_in_bytes", f"{limit}\n")
    write(
        memory_dir / "memory.stat",
        f"cache 0\nrss {memory}\ninactive_file 1\ntotal_inactive_file {inactive_file}\nhierarchical_memory_limit {limit}\n",
    )


def v2_cgroup(root: Path, path: str, *, usage_us: int = 0, memory: int = 0, inactive_file: int = 0, limit: int | None = None) -> None:
    d = root / "sys/fs/cgroup" / path.lstrip("/")
    write(d / "cpu.stat", f"usage_usec {usage_us}\nuser_usec {usage_us // 2}\nsystem_usec {usage_us // 2}\n")
    write(d / "memory.current", f"{memory}\n")
    write(d / "memory.max", "max\n" if limit is None else f"{limit}\n")
    write(d / "memory.stat", f"anon {memory}\nfile 0\ninactive_file {inactive_file}\nactive_file 0\n")


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    proc(tmp_path, V1_MOUNTS, "4:memory:/ctr\n2:cpu,cpuacct:/ctr\n0::/\n")
    v1_cgroup(tmp_path, "/ctr")
    return tmp_path


@pytest.fixture
def v2(tmp_path: Path) -> Path:
    proc(tmp_path, V2_MOUNTS, "0::/ctr\n")
    v2_cgroup(tmp_path, "/ctr")
    return tmp_path


# -- CPU ------------------------------------------------------------------------------------------------


def test_v1_cpu_is_percent_of_one_cpu(v1: Path) -> None:
    clock = Clock()
    v1_cgroup(v1, "/ctr", usage_ns=1_000_000_000)
    cgroups = Cgroups.discover(v1, [], clock=clock)
    assert cgroups.cpu.directories == (v1 / "sys/fs/cgroup/cpu,cpuacct/ctr",)
    v1_cgroup(v1, "/ctr", usage_ns=4_000_000_000)  # 3 CPU seconds in 2 s: one and a half CPUs
    clock.now += 2
    assert cgroups.cpu.percent() == 150.0
    clock.now += 4  # idle: the counter did not move
    assert cgroups.cpu.percent() == 0.0


def test_v2_cpu_reads_usage_usec(v2: Path) -> None:
    clock = Clock()
    v2_cgroup(v2, "/ctr", usage_us=5_000_000)
    cgroups = Cgroups.discover(v2, [], clock=clock)
    assert cgroups.cpu.directories == (v2 / "sys/fs/cgroup/ctr",)
    v2_cgroup(v2, "/ctr", usage_us=5_000_000 + 2_500_000)
    clock.now += 10
    assert cgroups.cpu.percent() == 25.0


def test_watched_cgroups_are_summed(v1: Path) -> None:
    clock = Clock()
    v1_cgroup(v1, "/sidecar", usage_ns=0)
    cgroups = Cgroups.discover(v1, ["/sidecar"], clock=clock)
    v1_cgroup(v1, "/ctr", usage_ns=1_000_000_000)
    v1_cgroup(v1, "/sidecar", usage_ns=3_000_000_000)
    clock.now += 1
    assert cgroups.cpu.percent() == 400.0  # 4 CPUs fully used: 0-100 per CPU, summed


def test_counter_wrap_counts_the_usage_across_it(v1: Path) -> None:
    clock = Clock()
    v1_cgroup(v1, "/ctr", usage_ns=U64 - 1_000_000_000)
    cgroups = Cgroups.discover(v1, [], clock=clock)
    v1_cgroup(v1, "/ctr", usage_ns=500_000_000)
    clock.now += 3
    assert cgroups.cpu.percent() == 50.0  # 1.5 s of CPU in 3 s


def test_v2_counter_wrap(v2: Path) -> None:
    clock = Clock()
    v2_cgroup(v2, "/ctr", usage_us=U64 - 250_000)
    cgroups = Cgroups.discover(v2, [], clock=clock)
    v2_cgroup(v2, "/ctr", usage_us=750_000)
    clock.now += 1
    assert cgroups.cpu.percent() == 100.0


def test_a_reset_counter_gives_no_value_for_that_interval(v1: Path) -> None:
    clock = Clock()
    v1_cgroup(v1, "/ctr", usage_ns=50_000_000_000)
    cgroups = Cgroups.discover(v1, [], clock=clock)
    v1_cgroup(v1, "/ctr", usage_ns=1_000_000_000)  # the container restarted: its counter began again
    clock.now += 1
    assert cgroups.cpu.percent() is None
    v1_cgroup(v1, "/ctr", usage_ns=1_200_000_000)
    clock.now += 1
    assert cgroups.cpu.percent() == pytest.approx(20.0)


def test_a_vanished_cgroup_gives_no_value_until_it_is_back(v1: Path) -> None:
    clock = Clock()
    cgroups = Cgroups.discover(v1, [], clock=clock)
    (v1 / "sys/fs/cgroup/cpu,cpuacct/ctr/cpuacct.usage").unlink()
    clock.now += 1
    assert cgroups.cpu.percent() is None
    v1_cgroup(v1, "/ctr", usage_ns=7)
    clock.now += 1
    assert cgroups.cpu.percent() is None  # back, but with no earlier reading to compare with
    v1_cgroup(v1, "/ctr", usage_ns=7 + 100_000_000)
    clock.now += 1
    assert cgroups.cpu.percent() == pytest.approx(10.0)


# -- memory ---------------------------------------------------------------------------------------------


def test_v1_memory_leaves_out_inactive_page_cache_and_uses_the_limit(v1: Path) -> None:
    v1_cgroup(v1, "/ctr", memory=3 * GIB, inactive_file=1 * GIB, limit=4 * GIB)
    cgroups = Cgroups.discover(v1, [], clock=Clock())
    assert cgroups.memory.percent() == 50.0


def test_v1_memory_without_a_limit_is_of_the_host(v1: Path) -> None:
    v1_cgroup(v1, "/ctr", memory=3 * GIB, inactive_file=1 * GIB)
    cgroups = Cgroups.discover(v1, [], clock=Clock())
    assert cgroups.memory.percent() == 25.0  # 2 GiB of the host's 8


def test_v2_memory_uses_memory_max(v2: Path) -> None:
    v2_cgroup(v2, "/ctr", memory=3 * GIB, inactive_file=GIB, limit=4 * GIB)
    assert Cgroups.discover(v2, [], clock=Clock()).memory.percent() == 50.0


def test_v2_memory_without_a_limit_is_of_the_host(v2: Path) -> None:
    v2_cgroup(v2, "/ctr", memory=3 * GIB, inactive_file=GIB)
    assert Cgroups.discover(v2, [], clock=Clock()).memory.percent() == 25.0


def test_v2_memory_limit_of_a_parent_applies(v2: Path) -> None:
    proc(v2, V2_MOUNTS, "0::/pod/ctr\n")
    v2_cgroup(v2, "/pod", limit=2 * GIB)
    v2_cgroup(v2, "/pod/ctr", memory=GIB)  # no limit of its own
    assert Cgroups.discover(v2, [], clock=Clock()).memory.percent() == 50.0


def test_memory_of_watched_cgroups_is_summed_over_their_limits(v1: Path) -> None:
    v1_cgroup(v1, "/ctr", memory=GIB, limit=2 * GIB)
    v1_cgroup(v1, "/sidecar", memory=GIB, limit=2 * GIB)
    assert Cgroups.discover(v1, ["/sidecar"], clock=Clock()).memory.percent() == 50.0
    v1_cgroup(v1, "/sidecar", memory=GIB)  # one without a limit: together they may use the whole host
    assert Cgroups.discover(v1, ["/sidecar"], clock=Clock()).memory.percent() == 25.0


def test_usage_below_the_page_cache_counts_as_zero(v2: Path) -> None:
    v2_cgroup(v2, "/ctr", memory=GIB, inactive_file=2 * GIB)
    assert Cgroups.discover(v2, [], clock=Clock()).memory.percent() == 0.0


# -- finding the cgroups --------------------------------------------------------------------------------


def test_a_hybrid_host_reads_the_v1_controllers(v1: Path) -> None:
    cgroups = Cgroups.discover(v1, [], clock=Clock())
    assert cgroups.memory.directories == (v1 / "sys/fs/cgroup/memory/ctr",)


def test_a_container_without_a_cgroup_namespace_sees_its_cgroup_at_the_mount(tmp_path: Path) -> None:
    # Docker on cgroup v1 without a namespace: /proc/self/cgroup names /docker/abc, and that directory is
    # what is mounted at /sys/fs/cgroup/<controller>.
    mountinfo = (
        "32 31 0:29 /docker/abc /sys/fs/cgroup/cpu,cpuacct ro - cgroup cgroup rw,cpu,cpuacct\n"
        "35 31 0:32 /docker/abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory\n"
    )
    proc(tmp_path, mountinfo, "4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n")
    v1_cgroup(tmp_path, "/", memory=GIB, limit=4 * GIB)
    v1_cgroup(tmp_path, "/child", memory=GIB, limit=4 * GIB)
    cgroups = Cgroups.discover(tmp_path, ["/docker/abc/child"], clock=Clock())
    assert cgroups.cpu.directories == (tmp_path / "sys/fs/cgroup/cpu,cpuacct", tmp_path / "sys/fs/cgroup/cpu,cpuacct/child")
    assert cgroups.memory.percent() == 25.0


def test_watching_a_missing_cgroup_names_it(v1: Path) -> None:
    with pytest.raises(CgroupError, match="cgroup /nope not found"):
        Cgroups.discover(v1, ["/nope"], clock=Clock())


def test_the_same_cgroup_twice_counts_once(v1: Path) -> None:
    cgroups = Cgroups.discover(v1, ["/ctr", "/ctr/"], clock=Clock())
    assert len(cgroups.cpu.directories) == 1


def test_only_the_watched_cgroups_when_asked(v1: Path) -> None:
    v1_cgroup(v1, "/other")
    cgroups = Cgroups.discover(v1, ["/other"], include_own=False, clock=Clock())
    assert cgroups.cpu.directories == (v1 / "sys/fs/cgroup/cpu,cpuacct/other",)


def test_no_cgroup_mount_is_an_error(tmp_path: Path) -> None:
    proc(tmp_path, "22 27 0:21 / /proc rw,relatime - proc proc rw\n", "0::/\n")
    with pytest.raises(CgroupError, match="no cgroup hierarchy"):
        Cgroups.discover(tmp_path, [], clock=Clock())
