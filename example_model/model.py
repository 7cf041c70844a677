"""Pure-Python softmax (multinomial logistic regression) iris classifier."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

WEIGHTS_PATH = Path(__file__).with_name("iris.json")


class IrisModel:
    """Scores rows of 4 features; standardization is folded into the weights."""

    def __init__(
        self,
        *,
        class_names: Sequence[str],
        feature_names: Sequence[str],
        coefficients: Sequence[Sequence[float]],
        intercepts: Sequence[float],
        mean: Sequence[float],
        scale: Sequence[float],
    ) -> None:
        n_features = len(feature_names)
        if not (len(mean) == len(scale) == n_features):
            raise ValueError("mean/scale length must match feature_names")
        if not (len(coefficients) == len(intercepts) == len(class_names)):
            raise ValueError("coefficients/intercepts length must match class_names")
        if any(len(row) != n_features for row in coefficients):
            raise ValueError("each coefficient row must have one weight per feature")
        self.class_names: tuple[str, ...] = tuple(class_names)
        self.feature_names: tuple[str, ...] = tuple(feature_names)
        self.n_features = n_features
        # w·((x - m) / s) + b == (w / s)·x + (b - Σ w·m / s): one dot product per class.
        self._weights: tuple[tuple[float, ...], ...] = tuple(
            tuple(w / s for w, s in zip(row, scale, strict=True)) for row in coefficients
        )
        self._biases: tuple[float, ...] = tuple(
            b - sum(w * m / s for w, m, s in zip(row, mean, scale, strict=True))
            for row, b in zip(coefficients, intercepts, strict=True)
        )

    @classmethod
    def load(cls, path: Path = WEIGHTS_PATH) -> IrisModel:
        data: dict[str, Any] = json.loads(path.read_text())
        return cls(
            class_names=data["class_names"],
            feature_names=data["feature_names"],
            coefficients=data["coefficients"],
            intercepts=data["intercepts"],
            mean=data["mean"],
            scale=data["scale"],
        )

    def probabilities(self, row: Sequence[float]) -> list[float]:
        """Class probabilities for one row of n_features finite floats (not checked)."""
        logits = [
            b + sum(w * x for w, x in zip(weights, row, strict=True))
            for weights, b in zip(self._weights, self._biases, strict=True)
        ]
        top = max(logits)  # Subtract the max so exp() cannot overflow.
        exps = [math.exp(z - top) for z in logits]
        total = sum(exps)
        return [e / total for e in exps]

    def predict(self, rows: Sequence[Sequence[float]]) -> list[dict[str, Any]]:
        """One {"label", "probabilities"} dict per row (rounded: shorter JSON)."""
        out: list[dict[str, Any]] = []
        for row in rows:
            probs = self.probabilities(row)
            best = max(range(len(probs)), key=probs.__getitem__)
            out.append(
                {
                    "label": self.class_names[best],
                    "probabilities": {name: round(p, 6) for name, p in zip(self.class_names, probs, strict=True)},
                }
            )
        return out
