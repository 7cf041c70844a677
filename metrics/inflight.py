"""The number of invocations in flight for one variant, the value of ConcurrentRequestsPerModel in CloudWatch.

A single process counts in memory. Workers share a small file of counters, a row per worker and a column
per variant: each worker writes only its own cell (no lock: one writer per cell, 8-byte aligned stores) and
reads its column's sum, so every worker's sample is the count across all workers at that instant, and the
Maximum CloudWatch computes over the workers' statistic sets is the true peak, not one worker's share.
"""

from __future__ import annotations

import mmap
import os

MAX_WORKERS = 64  # rows of the shared file; --workers allows at most this many


class InFlight:
    """In-flight invocations of one variant in this process."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def add(self, delta: int) -> int:
        """Count ``delta`` more (or fewer) and return how many are in flight now."""
        self.value += delta
        return self.value


class SharedInFlight(InFlight):
    """In-flight invocations of one variant across the workers sharing ``path``; this worker owns row ``worker``."""

    __slots__ = ("_cells", "_column", "_mine", "_stride")

    def __init__(self, path: str, worker: int, column: int, columns: int) -> None:
        super().__init__()
        size = MAX_WORKERS * columns * 8
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            buffer = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._cells = memoryview(buffer).cast("q")
        self._column = column
        self._stride = columns
        self._mine = worker * columns + column
        self._cells[self._mine] = 0  # a worker started in place of a dead one: its requests died with it

    def add(self, delta: int) -> int:
        cells = self._cells
        self.value += delta
        cells[self._mine] = self.value
        return sum(cells[self._column :: self._stride])
