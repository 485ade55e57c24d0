"""The metrics that matter per task, with bootstrap confidence intervals.

Point estimates come from scikit-learn (``precision_recall_fscore_support``, ``roc_auc_score``,
``average_precision_score``, ``top_k_accuracy_score``, ``r2_score``...), so they mean exactly what
the field means by them. Confidence intervals are percentile bootstraps (Efron & Tibshirani 1993,
ch. 13): ``B`` resamples of the evaluation set with replacement, each metric recomputed on each
resample, the 2.5th and 97.5th percentiles. A resample is a vector of counts (how often each sample
was drawn), so every metric is a weighted sum: one matrix product per metric over all resamples at
once, instead of ``B`` calls to scikit-learn (10,000 samples x 1,000 resamples take ~0.2 s).

Conventions (one place, for every caller; ``classification_metrics`` takes probabilities):

* binary: ``scores`` is p(class 1) per sample, the decision threshold is 0.5;
* multiclass: ``scores`` is [n, C] class probabilities, the prediction is the argmax;
* multilabel: ``scores`` is [n, L] per-label probabilities, each thresholded at 0.5;
* Brier score as scikit-learn's ``brier_score_loss`` (binary: mean (p - y)^2; multiclass: the
  squared error summed over classes, Brier's original score, in [0, 2]); NLL as ``log_loss``; ECE with 15 equal-width bins (Guo et al. 2017) on the
  top-label confidence (binary: max(p, 1 - p)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from gradwise.errors import ConfigError, DataError

RESAMPLES = 1000  # bootstrap resamples: percentile CIs settle to ~0.5% of their width by 1000
CONFIDENCE = 0.95  # two-sided confidence level of every interval
ECE_BINS = 15  # Guo et al. 2017 (On Calibration of Modern Neural Networks)
TOP_K = (1, 3, 5)  # top-k accuracies reported when there are more than k classes
RANKING_BUDGET = 40_000_000  # classes x resamples x samples for bootstrapped AUC/AP (~1 s)
_CHUNK = 20_000_000  # bootstrap weights per block (resamples x samples): 80 MB of float32
CLASSIFICATION_KINDS = ("binary", "multiclass", "multilabel")


# -- probabilities ---------------------------------------------------------------------------


def probabilities(logits: np.ndarray, kind: str, temperature: float = 1.0) -> np.ndarray:
    """Probabilities from logits: softmax(logits / T) for multiclass, sigmoid(logits / T) for
    binary (one logit per sample, or two: z1 - z0) and multilabel."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    if kind == "multiclass":
        from scipy.special import softmax

        return softmax(z, axis=-1)
    if kind == "binary" and z.ndim == 2 and z.shape[1] == 2:
        z = z[:, 1] - z[:, 0]
    elif kind == "binary" and z.ndim == 2 and z.shape[1] == 1:
        z = z[:, 0]
    from scipy.special import expit

    return expit(z)


# -- bootstrap ---------------------------------------------------------------------------------


def bootstrap_weights(n: int, resamples: int = RESAMPLES, seed: int = 0) -> Iterator[np.ndarray]:
    """Blocks of bootstrap resamples as count vectors: float32 arrays [b, n] whose rows sum to n
    (row i: how often each sample was drawn in resample i). Seeded, so intervals are repeatable."""
    rng = np.random.default_rng(seed)
    per_block = max(1, min(resamples, _CHUNK // max(n, 1)))
    done = 0
    while done < resamples:
        b = min(per_block, resamples - done)
        idx = rng.integers(0, n, size=(b, n))
        w = np.empty((b, n), dtype=np.float32)
        for i in range(b):  # row by row: n bins stay in cache (one flat bincount is ~10x slower)
            w[i] = np.bincount(idx[i], minlength=n)
        yield w
        done += b


def bootstrap(
    statistics: Callable[[np.ndarray], dict[str, np.ndarray]],
    n: int,
    resamples: int = RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of every statistic ``statistics(W)`` returns for weights W [b, n]
    (one value per resample). Resamples where a statistic is undefined (NaN: e.g. no positives
    drawn) are left out of its interval."""
    if resamples <= 0 or n == 0:
        return {}
    values: dict[str, list[np.ndarray]] = {}
    for w in bootstrap_weights(n, resamples, seed):
        for name, v in statistics(w).items():
            values.setdefault(name, []).append(np.asarray(v, dtype=np.float64))
    tail = (1 - confidence) / 2 * 100
    out = {}
    for name, parts in values.items():
        v = np.concatenate(parts)
        drawn = len(v)
        v = v[np.isfinite(v)]
        if len(v) < drawn // 2:  # undefined in most resamples: no honest interval
            continue
        lo, hi = np.percentile(v, [tail, 100 - tail])
        out[name] = (float(lo), float(hi))
    return out


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


def ranking_metrics(
    scores: np.ndarray, positive: np.ndarray, w: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(ROC-AUC, average precision) under each row of weights ``w`` [b, n]: equal to
    scikit-learn's ``roc_auc_score`` and ``average_precision_score`` with ``sample_weight=row``
    (ties: one half for AUC, one threshold for AP). NaN where a row draws one class only."""
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    ws = np.take(w, order, axis=1)
    pos = ws * positive[order].astype(np.float32)
    if np.any(s[1:] == s[:-1]):  # tied scores form one threshold
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
        pos = np.add.reduceat(pos, starts, axis=1)
        ws = np.add.reduceat(ws, starts, axis=1)
    neg = ws - pos
    p, n = pos.sum(1, dtype=np.float64), neg.sum(1, dtype=np.float64)
    # counts are integers: float32 sums are exact up to 2**24 samples; in place, one pass each
    tp, seen = np.cumsum(pos, axis=1), np.cumsum(ws, axis=1)
    below = np.cumsum(neg, axis=1)  # negatives at or above each threshold ...
    np.subtract(n.astype(np.float32)[:, None], below, out=below)  # ... now those below it
    below += 0.5 * neg  # ties: one half
    auc_sum = np.einsum("ij,ij->i", pos, below, dtype=np.float64)
    np.divide(tp, seen, out=tp, where=seen > 0)  # precision at each threshold
    ap_sum = np.einsum("ij,ij->i", pos, tp, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc, ap = auc_sum / (p * n), ap_sum / p
    return auc, ap


# -- calibration quantities (shared with calibration.py) ---------------------------------------


def bin_index(confidence: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """Equal-width bin of each confidence in [0, 1]: [k/bins, (k+1)/bins), the last one closed
    (as torchmetrics' calibration error)."""
    edges = np.linspace(0, 1, bins + 1)
    return np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)


def top_label(scores: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, predicted label) per decision: max probability and argmax (binary and
    multilabel: per decision max(p, 1 - p) and p >= 0.5), flattened for multilabel."""
    if kind == "multiclass":
        return scores.max(1), scores.argmax(1)
    p = scores.ravel()
    return np.maximum(p, 1 - p), (p >= 0.5).astype(np.int64)


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over bins of (bin share) x |accuracy - mean confidence|."""
    if len(confidence) == 0:
        return math.nan
    b = bin_index(confidence, bins)
    gap = np.bincount(b, correct.astype(np.float64) - confidence, minlength=bins)
    return float(np.abs(gap).sum() / len(confidence))


def _ece_weighted(conf: np.ndarray, correct: np.ndarray, w: np.ndarray, bins: int) -> np.ndarray:
    onehot = np.eye(bins, dtype=np.float32)[bin_index(conf, bins)]
    gap = w @ (onehot * (correct - conf)[:, None].astype(np.float32))
    return np.abs(gap).sum(1) / w.sum(1)


# -- classification ------------------------------------------------------------------------------


def classification_metrics(
    targets: Any,
    scores: Any,
    kind: str,
    *,
    class_names: Sequence[str] | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """Every classification metric for ``targets`` and probabilities ``scores`` (see the module's
    conventions), as a JSON-ready dict: ``headline`` (name -> value, ci_low, ci_high), per-class
    precision/recall/F1/support, macro/micro/weighted averages, confusion matrix, ROC-AUC,
    average precision, top-k accuracy, ECE, Brier score, NLL and the curves."""
    y, p = _classification_inputs(targets, scores, kind)
    if kind == "multilabel":
        return _multilabel(y, p, class_names, resamples, seed)
    return _single_label(y, p, kind, class_names, resamples, seed)


def _classification_inputs(targets: Any, scores: Any, kind: str) -> tuple[np.ndarray, np.ndarray]:
    if kind not in CLASSIFICATION_KINDS:
        raise ConfigError("task", kind, f"one of {', '.join(CLASSIFICATION_KINDS)}")
    y = np.asarray(targets)
    p = np.asarray(scores, dtype=np.float64)
    if len(y) != len(p):
        raise DataError(f"targets have {len(y)} samples but scores have {len(p)}")
    if len(y) == 0:
        raise DataError("there are no samples to evaluate")
    if not np.isfinite(p).all():
        raise DataError("the model's scores contain NaN or infinity; nothing can be evaluated")
    if kind == "binary":
        if p.ndim == 2 and p.shape[1] == 2:
            p = p[:, 1]
        if p.ndim != 1 or y.ndim != 1:
            raise DataError(f"binary: expected one score per sample; got scores {p.shape}")
    elif kind == "multiclass" and (p.ndim != 2 or y.ndim != 1):
        raise DataError(
            f"multiclass: expected scores [n, classes] and targets [n]; got {p.shape}, {y.shape}"
        )
    elif kind == "multilabel" and (p.shape != y.shape or p.ndim != 2):
        raise DataError(f"multilabel: expected scores and targets [n, labels]; got {p.shape}")
    width = p.shape[1] if p.ndim == 2 else 2
    if kind != "multilabel" and (y.min() < 0 or y.max() >= width):
        raise DataError(f"{kind}: labels {int(y.min())}..{int(y.max())} for {width} classes")
    return y.astype(np.int64), p


def _names(class_names: Sequence[str] | None, count: int) -> list[str]:
    if class_names is not None and len(class_names) == count:
        return [str(c) for c in class_names]
    return [str(i) for i in range(count)]


def _ranking_share(classes: int, n: int, resamples: int) -> float:
    """Share of the resamples that macro AUC/AP are bootstrapped on: all of them within
    ``RANKING_BUDGET`` (one sort and two cumulative sums per class and resample), fewer beyond
    (at least 200, since percentile intervals from fewer are too rough)."""
    if classes <= 1 or resamples <= 0:
        return 1.0
    fits = RANKING_BUDGET / (classes * max(n, 1))
    return float(min(1.0, max(fits, min(200, resamples)) / resamples))


def _boot_info(resamples: int, seed: int, ranking_share: float) -> dict[str, Any]:
    info: dict[str, Any] = {"resamples": resamples, "confidence": CONFIDENCE, "seed": seed}
    if ranking_share < 1:
        info["ranking_resamples"] = max(1, round(resamples * ranking_share))
    return info


def _headline(point: dict[str, float], cis: dict[str, tuple[float, float]]) -> dict[str, Any]:
    return {
        name: {
            "value": value,
            "ci_low": cis[name][0] if name in cis else None,
            "ci_high": cis[name][1] if name in cis else None,
        }
        for name, value in point.items()
    }


def _single_label(
    y: np.ndarray,
    p: np.ndarray,
    kind: str,
    class_names: Sequence[str] | None,
    resamples: int,
    seed: int,
) -> dict[str, Any]:
    from sklearn import metrics as skm

    n = len(y)
    probs = np.stack([1 - p, p], axis=1) if kind == "binary" else p
    c = probs.shape[1]
    labels = list(range(c))
    names = _names(class_names, c)
    pred = probs.argmax(1) if kind == "multiclass" else (p >= 0.5).astype(np.int64)
    prec, rec, f1, support = skm.precision_recall_fscore_support(
        y, pred, labels=labels, zero_division=0
    )
    averages = {}
    for average in ("macro", "micro", "weighted"):
        a = skm.precision_recall_fscore_support(
            y, pred, labels=labels, average=average, zero_division=0
        )
        averages[average] = {"precision": a[0], "recall": a[1], "f1": a[2]}
    conf, _ = top_label(p if kind == "binary" else probs, kind)
    correct = (pred == y).astype(np.float64)
    onehot = np.eye(c)[y]
    present = [k for k in labels if 0 < support[k] < n]  # classes with positives and negatives
    auc = {k: skm.roc_auc_score(y == k, probs[:, k]) for k in present}
    ap = {k: skm.average_precision_score(y == k, probs[:, k]) for k in present}
    point = {
        "accuracy": skm.accuracy_score(y, pred),
        "balanced_accuracy": float(np.mean(rec[support > 0])),
        "f1_macro": averages["macro"]["f1"],
        "f1_weighted": averages["weighted"]["f1"],
    }
    if kind == "binary":
        point["precision"], point["recall"], point["f1"] = prec[1], rec[1], f1[1]
        if present:
            point["roc_auc"], point["average_precision"] = auc[1], ap[1]
    elif present:
        point["roc_auc_macro"] = float(np.mean(list(auc.values())))
        point["average_precision_macro"] = float(np.mean(list(ap.values())))
    point["ece"] = ece(conf, correct)
    point["brier"] = skm.brier_score_loss(y, p if kind == "binary" else probs, labels=labels)
    point["nll"] = skm.log_loss(y, probs, labels=labels)
    point = {k: float(v) for k, v in point.items()}

    # the same quantities per sample, for the bootstrap
    brier_i = ((probs - onehot) ** 2).sum(1) / (2.0 if kind == "binary" else 1.0)
    nll_i = -np.log(np.clip(probs[np.arange(n), y], 1e-15, 1))
    true_1h = onehot.astype(np.float32)
    pred_1h = np.eye(c, dtype=np.float32)[pred]
    per_sample = np.stack([correct, brier_i, nll_i], axis=1).astype(np.float32)

    def statistics(w: np.ndarray) -> dict[str, np.ndarray]:
        total = w.sum(1)
        sums = w @ per_sample
        tp = w @ (true_1h * correct[:, None].astype(np.float32))
        actual, predicted = w @ true_1h, w @ pred_1h
        recall = _ratio(tp, actual)
        precision = _ratio(tp, predicted)
        f1c = _ratio(2 * tp, actual + predicted)
        has = actual > 0
        out = {
            "accuracy": sums[:, 0] / total,
            "balanced_accuracy": (recall * has).sum(1) / has.sum(1),
            "f1_macro": f1c.mean(1),
            "f1_weighted": (f1c * actual).sum(1) / total,
            "ece": _ece_weighted(conf, correct, w, ECE_BINS),
            "brier": sums[:, 1] / total,
            "nll": sums[:, 2] / total,
        }
        if kind == "binary":
            out["precision"], out["recall"], out["f1"] = precision[:, 1], recall[:, 1], f1c[:, 1]
            if present:
                out["roc_auc"], out["average_precision"] = ranking_metrics(p, y == 1, w)
        elif present:
            r = w[: max(1, round(len(w) * ranking_share))]
            ranked = [ranking_metrics(probs[:, k], true_1h[:, k], r) for k in present]
            out["roc_auc_macro"] = np.nanmean([r[0] for r in ranked], axis=0)
            out["average_precision_macro"] = np.nanmean([r[1] for r in ranked], axis=0)
        return out

    ranking_share = _ranking_share(len(present), n, resamples)
    with np.errstate(invalid="ignore", divide="ignore"), _quiet_nanmean():
        cis = bootstrap(statistics, n, resamples, seed)
    result: dict[str, Any] = {
        "task": kind,
        "samples": n,
        "headline": _headline(point, cis),
        "bootstrap": _boot_info(resamples, seed, ranking_share),
        "per_class": _per_class(labels, names, prec, rec, f1, support, auc, ap),
        "averages": {a: {k: float(v) for k, v in d.items()} for a, d in averages.items()},
        "labels": names,
        "confusion_matrix": skm.confusion_matrix(y, pred, labels=labels).tolist(),
        "top_k_accuracy": {
            str(k): float(skm.top_k_accuracy_score(y, probs, k=k, labels=labels))
            for k in TOP_K
            if kind == "multiclass" and k < c
        },
        "ece_bins": ECE_BINS,
    }
    result["curves"] = _curves(y, probs, kind, present, names)
    return result


def _curves(
    y: np.ndarray, probs: np.ndarray, kind: str, present: list[int], names: list[str]
) -> dict[str, Any]:
    """ROC and PR curves per class (binary: the positive class), thinned to <= 200 points."""
    from sklearn import metrics as skm

    classes = [1] if kind == "binary" else present
    roc, pr = {}, {}
    for k in classes:
        if k not in present:
            continue
        fpr, tpr, _ = skm.roc_curve(y == k, probs[:, k])
        precision, recall, _ = skm.precision_recall_curve(y == k, probs[:, k])
        roc[names[k]] = {"fpr": _thin(fpr), "tpr": _thin(tpr)}
        pr[names[k]] = {"recall": _thin(recall), "precision": _thin(precision)}
    prevalence = {names[k]: float(np.mean(y == k)) for k in classes if k in present}
    return {"roc": roc, "pr": pr, "prevalence": prevalence}


def _thin(values: np.ndarray, most: int = 200) -> list[float]:
    if len(values) > most:
        values = values[np.unique(np.linspace(0, len(values) - 1, most).round().astype(int))]
    return [round(float(v), 6) for v in values]


class _quiet_nanmean:
    """Silence numpy's "Mean of empty slice" (a resample without some class is expected)."""

    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


def _multilabel(
    y: np.ndarray,
    p: np.ndarray,
    class_names: Sequence[str] | None,
    resamples: int,
    seed: int,
) -> dict[str, Any]:
    from sklearn import metrics as skm

    n, L = y.shape
    names = _names(class_names, L)
    pred = (p >= 0.5).astype(np.int64)
    prec, rec, f1, support = skm.precision_recall_fscore_support(y, pred, zero_division=0)
    averages = {}
    for average in ("macro", "micro", "weighted", "samples"):
        a = skm.precision_recall_fscore_support(y, pred, average=average, zero_division=0)
        averages[average] = {"precision": a[0], "recall": a[1], "f1": a[2]}
    present = [k for k in range(L) if 0 < support[k] < n]
    auc = {k: skm.roc_auc_score(y[:, k], p[:, k]) for k in present}
    ap = {k: skm.average_precision_score(y[:, k], p[:, k]) for k in present}
    conf, _ = top_label(p, "multilabel")
    correct = (pred.ravel() == y.ravel()).astype(np.float64)
    point = {
        "subset_accuracy": skm.accuracy_score(y, pred),
        "hamming_loss": skm.hamming_loss(y, pred),
        "f1_macro": averages["macro"]["f1"],
        "f1_micro": averages["micro"]["f1"],
    }
    if present:
        point["roc_auc_macro"] = float(np.mean(list(auc.values())))
        point["average_precision_macro"] = float(np.mean(list(ap.values())))
    point["ece"] = ece(conf, correct)
    point["brier"] = float(np.mean((p - y) ** 2))
    point = {k: float(v) for k, v in point.items()}

    yf, pf = y.astype(np.float32), pred.astype(np.float32)
    exact = (pred == y).all(1).astype(np.float32)
    wrong = (pred != y).mean(1).astype(np.float32)
    sq = ((p - y) ** 2).mean(1).astype(np.float32)

    def statistics(w: np.ndarray) -> dict[str, np.ndarray]:
        total = w.sum(1)
        tp, actual, predicted = w @ (yf * pf), w @ yf, w @ pf
        out = {
            "subset_accuracy": w @ exact / total,
            "hamming_loss": w @ wrong / total,
            "f1_macro": _ratio(2 * tp, actual + predicted).mean(1),
            "f1_micro": _ratio(2 * tp.sum(1), actual.sum(1) + predicted.sum(1)),
            "brier": w @ sq / total,
            "ece": _ece_weighted(conf, correct, np.repeat(w, L, axis=1), ECE_BINS),
        }
        if present:
            r = w[: max(1, round(len(w) * ranking_share))]
            ranked = [ranking_metrics(p[:, k], yf[:, k], r) for k in present]
            out["roc_auc_macro"] = np.nanmean([r[0] for r in ranked], axis=0)
            out["average_precision_macro"] = np.nanmean([r[1] for r in ranked], axis=0)
        return out

    ranking_share = _ranking_share(len(present), n, resamples)
    with np.errstate(invalid="ignore", divide="ignore"), _quiet_nanmean():
        cis = bootstrap(statistics, n, resamples, seed)
    return {
        "task": "multilabel",
        "samples": n,
        "headline": _headline(point, cis),
        "bootstrap": _boot_info(resamples, seed, ranking_share),
        "per_class": _per_class(range(L), names, prec, rec, f1, support, auc, ap),
        "averages": {a: {k: float(v) for k, v in d.items()} for a, d in averages.items()},
        "labels": names,
        "ece_bins": ECE_BINS,
        "curves": _curves_multilabel(y, p, present, names),
    }


def _curves_multilabel(
    y: np.ndarray, p: np.ndarray, present: list[int], names: list[str]
) -> dict[str, Any]:
    from sklearn import metrics as skm

    roc, pr = {}, {}
    for k in present:
        fpr, tpr, _ = skm.roc_curve(y[:, k], p[:, k])
        precision, recall, _ = skm.precision_recall_curve(y[:, k], p[:, k])
        roc[names[k]] = {"fpr": _thin(fpr), "tpr": _thin(tpr)}
        pr[names[k]] = {"recall": _thin(recall), "precision": _thin(precision)}
    return {"roc": roc, "pr": pr, "prevalence": {names[k]: float(y[:, k].mean()) for k in present}}


# -- regression ----------------------------------------------------------------------------------


def regression_metrics(
    targets: Any, predictions: Any, *, resamples: int = RESAMPLES, seed: int = 0
) -> dict[str, Any]:
    """MAE, RMSE and R2 (averaged uniformly over outputs) with bootstrap intervals, plus the
    residuals' summary. ``targets`` and ``predictions`` in the same (raw) units."""
    from sklearn import metrics as skm

    y = np.asarray(targets, dtype=np.float64)
    p = np.asarray(predictions, dtype=np.float64)
    if p.shape != y.shape:
        p = p.reshape(y.shape) if p.size == y.size else p
    if p.shape != y.shape:
        raise DataError(f"regression: predictions {p.shape} do not match targets {y.shape}")
    if len(y) == 0:
        raise DataError("there are no samples to evaluate")
    if not np.isfinite(p).all():
        raise DataError("the model's predictions contain NaN or infinity")
    y2, p2 = y.reshape(len(y), -1), p.reshape(len(p), -1)
    n = len(y2)
    point = {
        "mae": skm.mean_absolute_error(y2, p2),
        "rmse": math.sqrt(skm.mean_squared_error(y2, p2)),
        "r2": skm.r2_score(y2, p2) if n > 1 else math.nan,
    }
    point = {k: float(v) for k, v in point.items()}
    r = p2 - y2
    abs_r = np.abs(r).mean(1).astype(np.float32)
    sq_r = (r**2).astype(np.float32)
    yc = (y2 - y2.mean(0)).astype(np.float32)  # centred: stable sums of squares in float32

    def statistics(w: np.ndarray) -> dict[str, np.ndarray]:
        total = w.sum(1)[:, None]
        ss_res = w @ sq_r
        mean = (w @ yc) / total
        ss_tot = w @ (yc**2) - total * mean**2
        with np.errstate(invalid="ignore", divide="ignore"):
            r2 = np.where(ss_tot > 0, 1 - ss_res / ss_tot, np.nan).mean(1)
        return {
            "mae": (w @ abs_r) / total[:, 0],
            "rmse": np.sqrt((ss_res / total).mean(1)),
            "r2": r2,
        }

    cis = bootstrap(statistics, n, resamples, seed)
    return {
        "task": "regression",
        "samples": n,
        "headline": _headline(point, cis),
        "bootstrap": {"resamples": resamples, "confidence": CONFIDENCE, "seed": seed},
        "residuals": {
            "mean": float(r.mean()),
            "std": float(r.std()),
            "median_abs": float(np.median(np.abs(r))),
            "max_abs": float(np.abs(r).max()),
        },
    }


# -- language models -----------------------------------------------------------------------------


def lm_metrics(
    nll_sums: Any,
    token_counts: Any,
    *,
    char_level: bool = False,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """Perplexity exp(mean NLL per token) and bits per token (mean NLL / ln 2; for a
    character-level model also bits per character), from each sequence's summed NLL (nats) and
    token count; intervals resample whole sequences (tokens within one are not independent)."""
    s = np.asarray(nll_sums, dtype=np.float64)
    t = np.asarray(token_counts, dtype=np.float64)
    if len(s) == 0 or t.sum() <= 0:
        raise DataError("there are no tokens to evaluate")
    mean = s.sum() / t.sum()
    point = {"nll": mean, "perplexity": math.exp(mean), "bits_per_token": mean / math.log(2)}
    if char_level:
        point["bits_per_character"] = point["bits_per_token"]
    st = np.stack([s, t], axis=1).astype(np.float64)

    def statistics(w: np.ndarray) -> dict[str, np.ndarray]:
        sums = w.astype(np.float64) @ st
        m = sums[:, 0] / sums[:, 1]
        out = {"nll": m, "perplexity": np.exp(m), "bits_per_token": m / math.log(2)}
        if char_level:
            out["bits_per_character"] = out["bits_per_token"]
        return out

    cis = bootstrap(statistics, len(s), resamples, seed)
    return {
        "task": "lm",
        "samples": len(s),
        "tokens": int(t.sum()),
        "headline": _headline({k: float(v) for k, v in point.items()}, cis),
        "bootstrap": {"resamples": resamples, "confidence": CONFIDENCE, "seed": seed},
    }


def _per_class(
    labels: Any, names: Any, prec: Any, rec: Any, f1: Any, support: Any, auc: dict, ap: dict
) -> list[dict[str, Any]]:
    """One row per class: precision, recall, F1, support, and AUC/AP where defined."""
    return [
        {
            "class": names[k],
            "precision": float(prec[k]),
            "recall": float(rec[k]),
            "f1": float(f1[k]),
            "support": int(support[k]),
            "roc_auc": float(auc[k]) if k in auc else None,
            "average_precision": float(ap[k]) if k in ap else None,
        }
        for k in labels
    ]
