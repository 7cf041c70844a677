"""Where a call goes: an endpoint's production variants, and how a request picks one (by name, else by weight)."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from metrics.recorder import InvocationRecorder, ModelRecorders
from proxy.http.client import ModelClient
from proxy.upstream.instances import InstanceCountSource


@dataclass(frozen=True)
class Variant:
    """A production variant: its model instances, its live count, its metrics, its share of the traffic."""

    name: str
    client: ModelClient
    recorder: InvocationRecorder
    instances: InstanceCountSource
    weight: float = 1.0
    models: ModelRecorders | None = None  # --model-label: a recorder per model the requests name, bounded

    def recorder_for(self, model: str | None) -> InvocationRecorder:
        return self.recorder if self.models is None else self.models.get(model)


class Endpoint:
    """One endpoint's production variants, and how a request picks one: by name, else by weight."""

    __slots__ = ("choices", "cumulative", "default", "name", "variants")

    def __init__(self, name: str, variants: Sequence[Variant]) -> None:
        if not variants:
            raise ValueError("at least one variant is needed")
        self.name = name
        self.variants = {v.name.encode(): v for v in variants}
        self.default = variants[0]  # where refusals before a variant is chosen are counted
        self.choices = list(variants) if len(variants) > 1 else []
        total = sum(v.weight for v in variants)
        self.cumulative = list(itertools.accumulate(v.weight / total for v in variants))

    def choose(self, target: bytes | None, random: Callable[[], float]) -> Variant | None:
        """The variant for this request; None for an unknown target variant."""
        if target is not None:
            return self.variants.get(target)
        if not self.choices:
            return self.default
        i = bisect.bisect_right(self.cumulative, random())
        return self.choices[min(i, len(self.choices) - 1)]

    def unknown_variant(self, asked_for: bytes | None) -> str:
        """What a request that names no variant of this endpoint is told: the variants there are."""
        asked = (asked_for or b"").decode("latin-1")[:80]
        return f"no production variant {asked!r}; this endpoint has {', '.join(v.name for v in self.variants.values())}"
