"""The evaluation's plots as PNG bytes (matplotlib's Agg canvas: no display, no pyplot state).

Classification: confusion matrix (row-normalised, counts annotated up to 20 classes), ROC and PR
curves (at most ``MAX_CURVES`` classes drawn, the rest summarised by the macro AUC in the title),
reliability diagram (before and after temperature scaling). Regression: residuals against
predictions and predicted against true.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

DPI = 100
MAX_CURVES = 10  # more curves than this on one axis are unreadable
ANNOTATE_CLASSES = 20  # confusion matrices up to this size get their counts written in
MAX_POINTS = 5000  # scatter plots draw at most this many samples (a seeded subset)


def _figure(width: float = 5.5, height: float = 4.5) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def confusion_matrix(matrix: list[list[int]], names: list[str]) -> bytes:
    m = np.asarray(matrix, dtype=np.float64)
    c = len(m)
    size = min(4 + 0.35 * c, 14)
    fig = _figure(size + 1, size)
    ax = fig.add_subplot()
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.nan_to_num(m / m.sum(1, keepdims=True))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true class")
    ticks = range(c)
    ax.set_xticks(ticks, names if c <= 40 else [""] * c, rotation=90 if c > 8 else 0)
    ax.set_yticks(ticks, names if c <= 40 else [""] * c)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (rows normalised)")
    if c <= ANNOTATE_CLASSES:
        for i in range(c):
            for j in range(c):
                if m[i, j]:
                    colour = "white" if share[i, j] > 0.5 else "black"
                    ax.text(
                        j, i, f"{int(m[i, j])}", ha="center", va="center", color=colour, fontsize=8
                    )
    return _png(fig)


def roc(curves: dict[str, Any], auc: float | None) -> bytes:
    fig = _figure()
    ax = fig.add_subplot()
    for name, c in list(curves["roc"].items())[:MAX_CURVES]:
        ax.plot(c["fpr"], c["tpr"], label=name, linewidth=1.5)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC" + (f" (AUC {auc:.3f})" if auc is not None else ""))
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def pr(curves: dict[str, Any], ap: float | None) -> bytes:
    fig = _figure()
    ax = fig.add_subplot()
    for name, c in list(curves["pr"].items())[:MAX_CURVES]:
        ax.plot(c["recall"], c["precision"], label=name, linewidth=1.5)
        base = curves["prevalence"].get(name)
        if base is not None and len(curves["pr"]) == 1:  # the chance level: the prevalence
            ax.axhline(base, linestyle="--", color="grey", linewidth=1, label="chance")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_ylim(0, 1.02)
    ax.set_title("Precision-recall" + (f" (AP {ap:.3f})" if ap is not None else ""))
    ax.legend(fontsize=7, loc="lower left")
    return _png(fig)


def reliability(
    before: dict[str, Any], after: dict[str, Any] | None, temperature: float | None
) -> bytes:
    fig = _figure()
    ax = fig.add_subplot()
    edges = np.asarray(before["edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    acc = np.array([np.nan if a is None else a for a in before["accuracy"]])
    ax.bar(centres, np.nan_to_num(acc), width=width * 0.9, alpha=0.6, label="accuracy (T = 1)")
    if after is not None:
        acc_t = np.array([np.nan if a is None else a for a in after["accuracy"]])
        conf_t = np.array([np.nan if a is None else a for a in after["confidence"]])
        ok = ~np.isnan(acc_t)
        ax.plot(
            conf_t[ok],
            acc_t[ok],
            marker="o",
            color="C3",
            label=f"after scaling (T = {temperature:.2f})",
        )
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability diagram")
    ax.legend(fontsize=7, loc="upper left")
    return _png(fig)


def _subset(n: int) -> np.ndarray:
    if n <= MAX_POINTS:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, MAX_POINTS, replace=False))


def residuals(targets: np.ndarray, predictions: np.ndarray) -> bytes:
    y, p = targets.ravel(), predictions.ravel()
    keep = _subset(len(y))
    fig = _figure()
    ax = fig.add_subplot()
    ax.scatter(p[keep], (p - y)[keep], s=6, alpha=0.5)
    ax.axhline(0, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("predicted")
    ax.set_ylabel("residual (predicted - true)")
    ax.set_title("Residuals")
    return _png(fig)


def predicted_vs_true(targets: np.ndarray, predictions: np.ndarray) -> bytes:
    y, p = targets.ravel(), predictions.ravel()
    keep = _subset(len(y))
    fig = _figure()
    ax = fig.add_subplot()
    ax.scatter(y[keep], p[keep], s=6, alpha=0.5)
    lo, hi = float(min(y.min(), p.min())), float(max(y.max(), p.max()))
    ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1, label="perfect")
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    ax.set_title("Predicted vs true")
    ax.legend(fontsize=7)
    return _png(fig)
