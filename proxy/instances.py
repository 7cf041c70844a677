"""Where n, the live instance count of the variant, comes from (InvocationsPerInstance = 1/n per invocation)."""

from __future__ import annotations

from typing import Protocol


class InstanceCountSource(Protocol):
    """The live number of model instances behind this variant; never below 1.

    ``current()`` is called on the request path, so it must return a stored value, never do I/O.
    """

    def current(self) -> int: ...


class StaticInstanceCount:
    """A fixed count from configuration (``--instance-count``)."""

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError("instance count must be at least 1")
        self._count = count

    def current(self) -> int:
        return self._count
