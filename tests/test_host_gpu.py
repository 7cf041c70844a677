"""GPU metrics through a fake NVML module with the real package's names: several GPUs, MIG, errors.

No test here needs a GPU; with a real one, ``Gpus.open`` gets the real ``pynvml`` module instead of the fake.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import pytest

from metrics.gpu import GpuReading, Gpus, load_nvml

GIB = 1 << 30


class NVMLError(Exception):
    """As in pynvml: the NVML return code is ``value``."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return FakeNvml.MESSAGES.get(self.value, f"NVML error {self.value}")


@dataclass
class Utilization:
    gpu: int
    memory: int


@dataclass
class Memory:
    total: int
    used: int

    @property
    def free(self) -> int:
        return self.total - self.used


@dataclass
class Device:
    utilization: int | Exception = 0
    memory: Memory | Exception = field(default_factory=lambda: Memory(16 * GIB, 0))
    mig: int | Exception = 0  # NVML_DEVICE_MIG_DISABLE
    mig_devices: list[Device | Exception] = field(default_factory=list)


class FakeNvml:
    """The functions and constants of ``pynvml`` that the sampler uses, over a list of devices."""

    NVMLError = NVMLError
    NVML_ERROR_UNINITIALIZED = 1
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_NO_PERMISSION = 4
    NVML_ERROR_NOT_FOUND = 6
    NVML_ERROR_DRIVER_NOT_LOADED = 9
    NVML_ERROR_LIBRARY_NOT_FOUND = 12
    NVML_ERROR_GPU_IS_LOST = 15
    NVML_DEVICE_MIG_DISABLE = 0
    NVML_DEVICE_MIG_ENABLE = 1
    MESSAGES = {3: "Not Supported", 4: "Insufficient Permissions", 6: "Not Found", 9: "Driver Not Loaded", 12: "NVML Shared Library Not Found", 15: "GPU is lost"}

    def __init__(self, devices: list[Device | Exception], init_error: int | None = None) -> None:
        self.devices = devices
        self.init_error = init_error
        self.initialised = False
        self.calls: list[str] = []

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def nvmlDeviceGetCount(self) -> int:
        assert self.initialised
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Device:
        device = self.devices[index]
        if isinstance(device, Exception):
            raise device
        return device

    def nvmlDeviceGetUtilizationRates(self, handle: Device) -> Utilization:
        self.calls.append("utilization")
        if handle.mig == self.NVML_DEVICE_MIG_ENABLE:
            raise NVMLError(self.NVML_ERROR_NOT_SUPPORTED)  # as NVML does for a GPU in MIG mode
        if isinstance(handle.utilization, Exception):
            raise handle.utilization
        return Utilization(handle.utilization, 0)

    def nvmlDeviceGetMemoryInfo(self, handle: Device) -> Memory:
        if isinstance(handle.memory, Exception):
            raise handle.memory
        return handle.memory

    def nvmlDeviceGetMigMode(self, handle: Device) -> list[int]:
        if isinstance(handle.mig, Exception):
            raise handle.mig
        return [handle.mig, handle.mig]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: Device) -> int:
        return 7 if handle.mig == self.NVML_DEVICE_MIG_ENABLE else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: Device, index: int) -> Device:
        if index >= len(handle.mig_devices):
            raise NVMLError(self.NVML_ERROR_NOT_FOUND)
        device = handle.mig_devices[index]
        if isinstance(device, Exception):
            raise device
        return device


def test_the_fake_has_the_real_packages_names() -> None:
    pynvml = load_nvml()
    if pynvml is None:
        pytest.skip("nvidia-ml-py is not installed (pip install -e '.[gpu]')")
    names = [n for n in vars(FakeNvml) if n.startswith(("nvml", "NVML"))]
    assert [n for n in names if not hasattr(pynvml, n)] == []
    for n in names:
        if n.startswith("NVML_"):
            assert getattr(FakeNvml, n) == getattr(pynvml, n), n


def test_several_gpus_are_summed() -> None:
    nvml = FakeNvml([
        Device(10, Memory(16 * GIB, 4 * GIB)),
        Device(50, Memory(16 * GIB, 8 * GIB)),
        Device(100, Memory(80 * GIB, 80 * GIB)),
    ])
    gpus = Gpus.open(nvml)
    assert gpus is not None
    assert gpus.read() == GpuReading(utilization=160.0, memory=175.0)  # 0-100 per GPU, summed
    gpus.close()
    assert not nvml.initialised


def test_a_mig_gpu_adds_memory_of_its_instances_but_no_utilization() -> None:
    mig = Device(mig=1, memory=Memory(80 * GIB, 0), mig_devices=[Device(memory=Memory(10 * GIB, 1 * GIB)), Device(memory=Memory(10 * GIB, 3 * GIB))])
    gpus = Gpus.open(FakeNvml([Device(40, Memory(16 * GIB, 4 * GIB)), mig]))
    assert gpus is not None
    reading = gpus.read()
    assert reading.utilization == 40.0
    assert reading.memory == pytest.approx(25.0 + 20.0)


def test_a_mig_gpu_whose_instances_are_hidden_falls_back_to_its_own_memory() -> None:
    denied = NVMLError(FakeNvml.NVML_ERROR_NO_PERMISSION)
    mig = Device(mig=1, memory=Memory(80 * GIB, 20 * GIB), mig_devices=[denied, denied])
    gpus = Gpus.open(FakeNvml([mig]))
    assert gpus is not None
    assert gpus.read() == GpuReading(utilization=None, memory=25.0)


def test_only_mig_gpus_leave_utilization_absent() -> None:
    gpus = Gpus.open(FakeNvml([Device(mig=1, memory=Memory(10 * GIB, 5 * GIB))]))
    assert gpus is not None
    assert gpus.read() == GpuReading(utilization=None, memory=50.0)


def test_a_gpu_that_predates_mig_is_read_as_a_whole() -> None:
    old = Device(70, Memory(12 * GIB, 3 * GIB), mig=NVMLError(FakeNvml.NVML_ERROR_NOT_SUPPORTED))
    gpus = Gpus.open(FakeNvml([old]))
    assert gpus is not None
    assert gpus.read() == GpuReading(utilization=70.0, memory=25.0)


def test_missing_permissions_leave_out_that_gpu_and_say_so_once(caplog: pytest.LogCaptureFixture) -> None:
    denied = NVMLError(FakeNvml.NVML_ERROR_NO_PERMISSION)
    gpus = Gpus.open(FakeNvml([Device(30, Memory(10 * GIB, 1 * GIB)), Device(denied, denied)]))
    assert gpus is not None
    with caplog.at_level(logging.WARNING, logger="proxy.host"):
        for _ in range(3):
            assert gpus.read() == GpuReading(utilization=30.0, memory=10.0)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["GPU 1: no utilization from NVML: Insufficient Permissions", "GPU 1: no memory from NVML: Insufficient Permissions"]


def test_every_gpu_failing_leaves_the_metrics_absent() -> None:
    lost = NVMLError(FakeNvml.NVML_ERROR_GPU_IS_LOST)
    gpus = Gpus.open(FakeNvml([Device(lost, lost)]))
    assert gpus is not None
    assert gpus.read() == GpuReading(utilization=None, memory=None)


def test_a_gpu_that_cannot_be_opened_is_left_out() -> None:
    gpus = Gpus.open(FakeNvml([NVMLError(FakeNvml.NVML_ERROR_NO_PERMISSION), Device(20, Memory(8 * GIB, 2 * GIB))]))
    assert gpus is not None
    assert gpus.read() == GpuReading(utilization=20.0, memory=25.0)


@pytest.mark.parametrize(
    ("nvml", "says"),
    [
        (None, "no GPU metrics: NVML is not installed"),
        (FakeNvml([], init_error=FakeNvml.NVML_ERROR_DRIVER_NOT_LOADED), "no GPU metrics: NVML did not start (Driver Not Loaded)"),
        (FakeNvml([], init_error=FakeNvml.NVML_ERROR_LIBRARY_NOT_FOUND), "no GPU metrics: NVML did not start (NVML Shared Library Not Found)"),
        (FakeNvml([]), "no GPU metrics: NVML finds no GPU"),
        (FakeNvml([NVMLError(FakeNvml.NVML_ERROR_NO_PERMISSION)]), "no GPU metrics: NVML finds no GPU that this process may open"),
    ],
)
def test_no_gpu_is_one_info_line(nvml: Any, says: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="proxy.host"):
        assert Gpus.open(nvml) is None
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and infos[0].startswith(says), infos


def test_the_real_nvml_without_a_driver_is_one_info_line(caplog: pytest.LogCaptureFixture) -> None:
    """The real package on a machine with no NVIDIA driver (as here): absent metrics, one line."""
    pynvml = load_nvml()
    if pynvml is None:
        pytest.skip("nvidia-ml-py is not installed (pip install -e '.[gpu]')")
    with caplog.at_level(logging.INFO, logger="proxy.host"):
        gpus = Gpus.open(pynvml)
    if gpus is not None:  # a machine with a GPU: the real path, read once
        reading = gpus.read()
        gpus.close()
        assert reading.memory is not None and 0 <= reading.memory
        return
    infos = [r.getMessage() for r in caplog.records]
    assert len(infos) == 1 and infos[0].startswith("no GPU metrics: NVML did not start"), infos
