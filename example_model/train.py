# mypy: disable-error-code="import-untyped,import-not-found"
# (scikit-learn is untyped and is not installed in the run-time environment.)
"""Retrain the iris classifier and write example_model/iris.json.

Only needed to regenerate the shipped weights; the server itself never imports this
module. Requires scikit-learn (and numpy), which are not run-time dependencies:

    pip install scikit-learn
    python -m example_model.train
"""

from __future__ import annotations

import json
from pathlib import Path

from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from example_model.model import WEIGHTS_PATH, IrisModel

# Enough significant digits to match sklearn's probabilities to ~1e-8, still readable.
DIGITS = 10


def _round(values: list[float]) -> list[float]:
    return [float(f"{v:.{DIGITS}g}") for v in values]


def _dumps(weights: dict[str, object]) -> str:
    """JSON with one matrix row per line, so the weights diff and read well."""
    fields = []
    for key, value in weights.items():
        if key == "coefficients" and isinstance(value, list):
            rows = ",\n    ".join(json.dumps(row) for row in value)
            fields.append(f'  "{key}": [\n    {rows}\n  ]')
        else:
            fields.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(fields) + "\n}\n"


def main(out: Path = WEIGHTS_PATH) -> None:
    iris = load_iris()
    x, y = iris.data, iris.target
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
    cv_accuracy = float(cross_val_score(pipeline, x, y, cv=5).mean())
    pipeline.fit(x, y)
    train_accuracy = float(pipeline.score(x, y))
    scaler: StandardScaler = pipeline[0]
    clf: LogisticRegression = pipeline[1]

    weights = {
        "description": "Multinomial logistic regression on the Iris data set "
        "(scikit-learn load_iris, StandardScaler + LogisticRegression(C=1.0, lbfgs)). "
        "p = softmax(coefficients @ ((x - mean) / scale) + intercepts).",
        "feature_names": [str(name) for name in iris.feature_names],
        "class_names": [str(name) for name in iris.target_names],
        "mean": _round(scaler.mean_.tolist()),
        "scale": _round(scaler.scale_.tolist()),
        "coefficients": [_round(row) for row in clf.coef_.tolist()],
        "intercepts": _round(clf.intercept_.tolist()),
        "training_accuracy": round(train_accuracy, 4),
        "cv5_accuracy": round(cv_accuracy, 4),
    }
    out.write_text(_dumps(weights))

    # Check the pure-Python run-time model agrees with scikit-learn on every row.
    model = IrisModel.load(out)
    expected = pipeline.predict_proba(x)
    for row, probs in zip(x.tolist(), expected.tolist(), strict=True):
        got = model.probabilities(row)
        assert max(abs(a - b) for a, b in zip(got, probs, strict=True)) < 1e-6, (
            row,
            got,
            probs,
        )

    print(f"training accuracy: {train_accuracy:.4f} ({len(y)} samples)")
    print(f"5-fold CV accuracy: {cv_accuracy:.4f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
