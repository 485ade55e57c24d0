"""Error analysis: the most confident mistakes, the worst classes, the most confused pairs, and
metrics by slice (a column of the inputs, the true label, or any grouping you pass).

Aggregate metrics hide where a model fails; these tables point at the samples and groups to look
at first (mislabelled data tends to surface among the most confident mistakes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gradwise.errors import ConfigError, DataError

MISTAKES = 20  # most confident mistakes listed
WORST_CLASSES = 5
CONFUSED_PAIRS = 10
SLICE_BINS = 4  # a numeric column with many values is sliced into quartiles
MAX_SLICES = 50  # a column with more distinct values than this (and not numeric) is refused
MIN_SLICE = 1  # slices smaller than this are still listed, with their size: small n, wide error


def confident_mistakes(
    probs: np.ndarray, targets: np.ndarray, names: Sequence[str], most: int = MISTAKES
) -> list[dict[str, Any]]:
    """The wrong predictions the model was surest of (single-label): sample index, true and
    predicted class, the confidence and the probability it gave the true class."""
    pred = probs.argmax(1)
    conf = probs.max(1)
    wrong = np.flatnonzero(pred != targets)
    order = wrong[np.argsort(-conf[wrong], kind="stable")][:most]
    return [
        {
            "index": int(i),
            "true": names[int(targets[i])],
            "predicted": names[int(pred[i])],
            "confidence": float(conf[i]),
            "p_true": float(probs[i, targets[i]]),
        }
        for i in order
    ]


def worst_classes(per_class: list[dict[str, Any]], most: int = WORST_CLASSES) -> list[dict]:
    """The classes with the lowest F1 (ties: more support first), among those in the data."""
    seen = [c for c in per_class if c["support"] > 0]
    return sorted(seen, key=lambda c: (c["f1"], -c["support"]))[:most]


def confused_pairs(
    matrix: Sequence[Sequence[int]], names: Sequence[str], most: int = CONFUSED_PAIRS
) -> list[dict[str, Any]]:
    """Off-diagonal cells of the confusion matrix, largest first: (true, predicted, count, share
    of the true class)."""
    m = np.asarray(matrix)
    rows = m.sum(1)
    cells = [
        (int(m[i, j]), i, j) for i in range(len(m)) for j in range(len(m)) if i != j and m[i, j]
    ]
    cells.sort(key=lambda c: -c[0])
    return [
        {"true": names[i], "predicted": names[j], "count": c, "share": c / rows[i]}
        for c, i, j in cells[:most]
    ]


def slice_groups(
    spec: Any,
    n: int,
    *,
    inputs: np.ndarray | None = None,
    targets: np.ndarray | None = None,
    feature_names: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Slices as {slicing name: group label per sample}.

    ``spec``: "label" (the true class), a feature name (a column of tabular inputs, by
    ``feature_names`` or as ``col3``), a mapping {name: group per sample}, or a list of these.
    """
    if spec is None:
        return {}
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    out: dict[str, np.ndarray] = {}
    for item in items:
        if isinstance(item, Mapping):
            for name, groups in item.items():
                g = np.asarray(groups)
                if len(g) != n:
                    raise DataError(f"slices[{name!r}] has {len(g)} values for {n} samples")
                out[str(name)] = _groups(g, str(name))
        elif item == "label":
            if targets is None or targets.ndim != 1:
                raise ConfigError("slices", item, "a column or groups (the targets are not labels)")
            names = list(class_names) if class_names else None
            out["label"] = np.array([names[t] if names else str(t) for t in targets.tolist()])
        elif isinstance(item, str):
            out[item] = _groups(_column(item, inputs, feature_names), item)
        else:
            raise ConfigError(
                "slices", item, "'label', a column name, or a mapping {name: group per sample}"
            )
    return out


def _column(name: str, inputs: np.ndarray | None, feature_names: Sequence[str] | None) -> Any:
    if inputs is None or inputs.ndim != 2:
        raise ConfigError(
            "slices", name, "'label' or groups per sample (the inputs have no columns)"
        )
    names = list(feature_names or [])
    if name in names:
        return inputs[:, names.index(name)]
    if name.startswith("col") and name[3:].isdigit() and int(name[3:]) < inputs.shape[1]:
        return inputs[:, int(name[3:])]
    shown = (
        ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") if names else "col0, col1, ..."
    )
    raise ConfigError("slices", name, f"'label' or a column: {shown}")


def _groups(values: np.ndarray, name: str) -> np.ndarray:
    """Group labels: the values themselves when few, quantile bins for a numeric column."""
    values = np.asarray(values)
    distinct = np.unique(values)
    if len(distinct) <= SLICE_BINS * 2 or not np.issubdtype(values.dtype, np.number):
        if len(distinct) > MAX_SLICES:
            raise ConfigError(
                "slices", name, f"at most {MAX_SLICES} groups; it has {len(distinct)}"
            )
        return values.astype(str)
    edges = np.unique(np.quantile(values, np.linspace(0, 1, SLICE_BINS + 1)))
    b = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)
    labels = [
        f"[{edges[k]:.3g}, {edges[k + 1]:.3g}{']' if k == len(edges) - 2 else ')'}"
        for k in range(len(edges) - 1)
    ]
    return np.array([labels[k] for k in b])


def slice_metrics(
    groups: dict[str, np.ndarray],
    kind: str,
    targets: np.ndarray,
    outputs: np.ndarray,
) -> dict[str, list[dict[str, Any]]]:
    """Per slice and group: samples and the task's main numbers (classification: accuracy and
    macro F1 from the predicted labels ``outputs``; regression: MAE and RMSE)."""
    from sklearn import metrics as skm

    result: dict[str, list[dict[str, Any]]] = {}
    for name, g in groups.items():
        rows = []
        for value in np.unique(g):
            m = g == value
            row: dict[str, Any] = {"group": str(value), "samples": int(m.sum())}
            if kind == "regression":
                err = outputs[m] - targets[m]
                row["mae"] = float(np.abs(err).mean())
                row["rmse"] = float(np.sqrt((err**2).mean()))
            else:
                row["accuracy"] = float(skm.accuracy_score(targets[m], outputs[m]))
                row["f1_macro"] = float(
                    skm.f1_score(targets[m], outputs[m], average="macro", zero_division=0)
                )
            rows.append(row)
        key = "mae" if kind == "regression" else "accuracy"
        rows.sort(key=lambda r: r[key], reverse=kind == "regression")  # worst first
        result[name] = rows
    return result
