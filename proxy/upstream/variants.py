"""Where a call goes: an endpoint's production variants, and how a request picks one (by name, else by weight)."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from metrics.recorder import InvocationRecorder, ModelRecorders
from proxy.errors import Fault
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
    """One endpoint's production variants and inference components, and how a request picks one: a component
    by name (an endpoint with components serves nothing else on the Runtime API), a variant by name, else
    by weight."""

    __slots__ = ("choices", "components", "cumulative", "default", "name", "variants")

    def __init__(self, name: str, variants: Sequence[Variant], components: Mapping[str, Variant] | None = None) -> None:
        if not variants:
            raise ValueError("at least one variant is needed")
        self.name = name
        self.variants = {v.name.encode(): v for v in variants}
        self.components = {n.encode(): c for n, c in (components or {}).items()}
        self.default = variants[0]  # where refusals before a variant is chosen are counted
        self.choices = list(variants) if len(variants) > 1 else []
        total = sum(v.weight for v in variants)
        self.cumulative = list(itertools.accumulate(v.weight / total for v in variants))

    def choose(self, target: bytes | None, random: Callable[[], float], component: bytes | None = None) -> Variant | None:
        """The variant (or inference component) for this request; None for one it names that is not here.
        ``component``: what a Runtime API call names (b"" for none), None on the native routes."""
        if component is not None and (component or self.components):
            return self.components.get(component)
        if target is not None:
            return self.variants.get(target)
        if not self.choices:
            return self.default
        i = bisect.bisect_right(self.cumulative, random())
        return self.choices[min(i, len(self.choices) - 1)]

    def not_found(self, asked_for: bytes | None, component: bytes | None) -> tuple[Fault, str]:
        """Why a request that names no variant or component of this endpoint is refused, naming what there is."""
        if component:
            asked = component.decode("latin-1")[:80]
            there = ", ".join(n.decode() for n in self.components) or "none"
            return Fault.UNKNOWN_COMPONENT, f"no inference component {asked!r}; this endpoint has {there}"
        if component is not None and self.components:
            there = ", ".join(n.decode() for n in self.components)
            return Fault.UNKNOWN_COMPONENT, f"InferenceComponentName is required here; this endpoint has {there}"
        asked = (asked_for or b"").decode("latin-1")[:80]
        return Fault.UNKNOWN_VARIANT, f"no production variant {asked!r}; this endpoint has {', '.join(v.name for v in self.variants.values())}"
