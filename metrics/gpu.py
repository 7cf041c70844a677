"""GPU utilization and GPU memory through NVML (the ``nvidia-ml-py`` package, an optional extra).

The NVML module is a parameter, so tests pass a fake with the real package's names. Without the
package, a driver or a GPU, ``Gpus.open`` returns None and says why in one info line; the GPU metrics
are then absent. A GPU in MIG mode has no utilization in NVML (NVIDIA points to DCGM for that), so it
adds only memory: the used share of its MIG instances that this process can see.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("proxy.host")


@dataclass(frozen=True)
class GpuReading:
    utilization: float | None  # percent summed over the GPUs that report it (0-100 x GPUs)
    memory: float | None  # percent used summed over the GPUs


def load_nvml() -> Any:
    """The real pynvml module, or None when the optional extra is not installed."""
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


class Gpus:
    def __init__(self, nvml: Any, devices: list[tuple[int, Any, bool]]) -> None:
        """``devices``: (NVML index, handle, MIG mode enabled) of each GPU watched."""
        self._nvml = nvml
        self._devices = devices
        self._reported: set[tuple[int, str, int]] = set()

    @classmethod
    def open(cls, nvml: Any) -> Gpus | None:
        """Initialise NVML and find the GPUs; None, after one info line, when there are none to watch."""
        if nvml is None:
            log.info("no GPU metrics: NVML is not installed (pip install nvidia-ml-py, or '.[gpu]' in a clone of the proxy)")
            return None
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as e:
            log.info("no GPU metrics: NVML did not start (%s); no NVIDIA driver here", e)
            return None
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as e:
            log.info("no GPU metrics: NVML cannot count the GPUs (%s)", e)
            nvml.nvmlShutdown()
            return None
        handles = []
        for i in range(count):
            try:
                handles.append((i, nvml.nvmlDeviceGetHandleByIndex(i)))
            except nvml.NVMLError as e:  # e.g. a GPU this container may not open
                log.warning("GPU %d left out: %s", i, e)
        if not handles:
            log.info("no GPU metrics: NVML finds no GPU%s", " that this process may open" if count else "")
            nvml.nvmlShutdown()
            return None
        devices = [(i, h, cls._mig_enabled(nvml, h)) for i, h in handles]
        mig = sum(m for _, _, m in devices)
        log.info("GPU metrics from %d GPU(s)%s", len(devices), f", {mig} in MIG mode" if mig else "")
        return cls(nvml, devices)

    @staticmethod
    def _mig_enabled(nvml: Any, handle: Any) -> bool:
        try:
            current, _pending = nvml.nvmlDeviceGetMigMode(handle)
        except nvml.NVMLError:
            return False  # GPUs before Ampere do not know MIG
        return bool(current == nvml.NVML_DEVICE_MIG_ENABLE)

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError:
            pass

    def _failed(self, index: int, what: str, error: Any) -> None:
        """One line per GPU, metric and kind of error, not one per sample."""
        key = (index, what, getattr(error, "value", -1))
        if key not in self._reported:
            self._reported.add(key)
            log.warning("GPU %d: no %s from NVML: %s", index, what, error)

    def read(self) -> GpuReading:
        nvml = self._nvml
        utilization: float | None = None
        memory: float | None = None
        for index, handle, mig in self._devices:
            if not mig:
                try:
                    utilization = (utilization or 0.0) + float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                except nvml.NVMLError as e:
                    self._failed(index, "utilization", e)
            share = self._memory_share(handle, mig, index)
            if share is not None:
                memory = (memory or 0.0) + share * 100.0
        return GpuReading(utilization, memory)

    def _memory_share(self, handle: Any, mig: bool, index: int) -> float | None:
        nvml = self._nvml
        handles = self._mig_devices(handle) if mig else []
        used = total = 0
        for h in handles or [handle]:
            try:
                info = nvml.nvmlDeviceGetMemoryInfo(h)
            except nvml.NVMLError as e:
                self._failed(index, "memory", e)
                continue
            used += int(info.used)
            total += int(info.total)
        return used / total if total else None

    def _mig_devices(self, handle: Any) -> list[Any]:
        nvml = self._nvml
        out: list[Any] = []
        try:
            slots = nvml.nvmlDeviceGetMaxMigDeviceCount(handle)
        except nvml.NVMLError:
            return out
        for i in range(slots):
            try:
                out.append(nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, i))
            except nvml.NVMLError:
                continue  # an empty slot, or an instance this process may not see
        return out
