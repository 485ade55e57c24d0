"""Is run A really better than run B? A paired bootstrap on the same validation samples.

    result = gradwise.compare("runs/a", "runs/b")          # the monitored metric, 2000 resamples
    result["difference"], result["ci95"], result["p_value"], result["verdict"]

Both runs' best checkpoints are loaded with gradwise's own loaders (safetensors weights, the
recipe's model rebuilt from the registry; import paths only with ``trust``) and predict the
validation set their recipes load. The two sets must be the same samples (same inputs, same
targets, same order; checked by hash), else the comparison is refused: a paired test on
different samples measures the samples, not the models.

The paired bootstrap (Efron & Tibshirani 1993; Koehn 2004 for NLP) resamples the validation
samples with replacement and recomputes both runs' metric on the same resample, so what the two
models share (easy and hard samples) cancels out. The p-value is two-sided: twice the share of
resampled differences on the far side of zero, with the +1 correction of Davison & Hinkley (1997).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gradwise._lazy import callable_as_namesake
from gradwise.errors import ConfigError, DataError

RESAMPLES = 2000
"""Bootstrap resamples: enough for a p-value near 0.05 to be stable to about +-0.01."""
ALPHA = 0.05

# metrics that are a mean of per-sample values (resampled exactly by weighting those values);
# the others (f1, auroc, r2, perplexity) are recomputed on each resample
_MEAN_METRICS = ("accuracy", "loss", "mse", "mae")


def _predictions(run_dir: Path, trust: bool) -> dict[str, Any]:
    """The run's best-checkpoint outputs on its validation set, the targets, and a fingerprint."""
    import torch
    from torch.utils.data import DataLoader

    from gradwise.batch import outputs_of, run_model, split_batch
    from gradwise.deploy.source import load_model, load_source
    from gradwise.tasks import resolve_kind

    if not (Path(run_dir) / "recipe.yaml").is_file():
        raise ConfigError("run", str(run_dir), "a gradwise run directory (with recipe.yaml)")
    source = load_source(run_dir, trusted=trust)
    recipe = source.recipe
    bundle = _validation_data(recipe, trust)
    if bundle.val is None or len(bundle.val) == 0:
        raise DataError(f"{run_dir}: its recipe's data has no validation set to compare on")
    model = load_model(source)
    kind = resolve_kind(recipe.task, bundle.info)
    outputs, targets = [], []
    digest = hashlib.sha256()
    loader = DataLoader(bundle.val, batch_size=512, shuffle=False)
    with torch.no_grad():
        for raw in loader:
            batch = split_batch(raw, recipe.data.label_key)
            out, _ = outputs_of(run_model(model, batch))
            outputs.append(out.float().cpu())
            targets.append(batch.target.cpu())
            for t in (*batch.args, *batch.kwargs.values(), batch.target):
                if isinstance(t, torch.Tensor):
                    digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    monitor = (source.meta.get("monitor") or _status_monitor(run_dir) or "").removeprefix("val_")
    return {
        "kind": kind,
        "outputs": torch.cat(outputs),
        "targets": torch.cat(targets),
        "fingerprint": digest.hexdigest(),
        "monitor": monitor,
        "samples": len(bundle.val),
    }


def _status_monitor(run_dir: Path) -> str | None:
    import json

    path = Path(run_dir) / "status.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("monitor")
    except (OSError, ValueError, AttributeError):
        return None


def _validation_data(recipe: Any, trust: bool) -> Any:
    """The recipe's data, loaded as its run loaded it (a fold of a cv run included)."""
    from gradwise.assemble import OBJECT
    from gradwise.cv import FOLD_DATA, _fold_bundle
    from gradwise.data import load_data

    name, kwargs = recipe.data.name, recipe.data.kwargs
    if name.startswith(OBJECT):
        raise ConfigError(
            "run",
            name,
            "a run whose recipe names its data (this one was trained on Python objects)",
        )
    if name == FOLD_DATA:  # gradwise's own fold factory: no code from the run directory
        return _fold_bundle(dict(kwargs), trusted=trust)
    return load_data(name, kwargs, trusted=trust)


# -- per-task metrics (scikit-learn) ---------------------------------------------------------


def _prepared(kind: str, outputs: Any, targets: Any) -> tuple[np.ndarray, np.ndarray]:
    """(scores, targets) as NumPy: probabilities for classification, values for regression."""
    import torch

    if kind == "binary":
        return torch.sigmoid(outputs.reshape(len(outputs), -1)[:, -1]).numpy(), targets.numpy()
    if kind == "multiclass":
        return torch.softmax(outputs, -1).numpy(), targets.numpy()
    if kind == "multilabel":
        return torch.sigmoid(outputs).numpy(), targets.numpy()
    if kind == "lm":
        return outputs.numpy(), targets.numpy()
    return outputs.reshape(targets.shape).numpy(), targets.numpy()


def _per_sample(kind: str, metric: str, s: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    """Per-sample values whose mean is the metric (None: not a mean of per-sample values)."""
    eps = 1e-12
    if metric == "accuracy":
        if kind == "binary":
            return ((s > 0.5) == (y > 0.5)).astype(np.float64)
        if kind == "multiclass":
            return (s.argmax(-1) == y).astype(np.float64)
        if kind == "multilabel":
            return ((s > 0.5) == (y > 0.5)).mean(-1).astype(np.float64)
    if metric == "loss":
        if kind == "binary":
            return -(y * np.log(s + eps) + (1 - y) * np.log(1 - s + eps))
        if kind == "multiclass":
            return -np.log(s[np.arange(len(y)), y] + eps)
        if kind == "multilabel":
            return -(y * np.log(s + eps) + (1 - y) * np.log(1 - s + eps)).mean(-1)
        if kind == "regression":
            return ((s - y) ** 2).reshape(len(y), -1).mean(-1)
    if kind == "regression" and metric in ("mse", "mae"):
        err = (s - y).reshape(len(y), -1)
        return (err**2 if metric == "mse" else np.abs(err)).mean(-1)
    return None


def metric_function(
    kind: str, metric: str, width: int
) -> Callable[[np.ndarray, np.ndarray], float]:
    """``f(scores, targets) -> value`` of a gradwise validation metric, from scikit-learn."""
    from sklearn import metrics as m

    labels = list(range(width))
    table: dict[tuple[str, str], Callable[[np.ndarray, np.ndarray], float]] = {
        ("binary", "f1"): lambda s, y: m.f1_score(y, s > 0.5, zero_division=0),
        ("binary", "auroc"): lambda s, y: m.roc_auc_score(y, s),
        ("multiclass", "f1"): lambda s, y: m.f1_score(
            y, s.argmax(-1), labels=labels, average="macro", zero_division=0
        ),
        ("multiclass", "auroc"): lambda s, y: m.roc_auc_score(
            y, s, multi_class="ovr", labels=labels
        ),
        ("multilabel", "f1"): lambda s, y: m.f1_score(y, s > 0.5, average="macro", zero_division=0),
        ("multilabel", "auroc"): lambda s, y: m.roc_auc_score(y, s, average="macro"),
        ("regression", "r2"): lambda s, y: m.r2_score(y, s),
    }
    if (kind, metric) in table:
        return table[(kind, metric)]
    if kind == "lm" and metric in ("perplexity", "loss"):
        return lambda s, y: _lm_metric(s, y, metric)
    raise ConfigError(
        "--metric", metric, f"a metric gradwise computes for {kind} (e.g. accuracy, f1, loss)"
    )


def _lm_metric(logits: np.ndarray, y: np.ndarray, metric: str) -> float:
    from scipy.special import log_softmax

    from gradwise.data.bundle import IGNORE_INDEX

    keep = y != IGNORE_INDEX
    logp = log_softmax(logits, axis=-1)
    nll = -np.take_along_axis(logp, np.where(keep, y, 0)[..., None], -1)[..., 0]
    mean = float(nll[keep].mean())
    return float(np.exp(mean)) if metric == "perplexity" else mean


def _statistic(kind: str, metric: str, s: np.ndarray, y: np.ndarray, width: int) -> Callable:
    """``value(idx)``: the metric on the resample ``idx`` of the samples (rows of a 2-D idx)."""
    values = _per_sample(kind, metric, s, y)
    if values is not None:
        return lambda idx: values[idx].mean(-1)
    f = metric_function(kind, metric, width)

    def each(idx: np.ndarray) -> np.ndarray | float:
        if idx.ndim == 1:
            return _safe(f, s[idx], y[idx])
        return np.array([_safe(f, s[i], y[i]) for i in idx])

    return each


def _safe(f: Callable, s: np.ndarray, y: np.ndarray) -> float:
    """The metric, or NaN where a resample cannot define it (AUROC with one class)."""
    try:
        return float(f(s, y))
    except ValueError:
        return float("nan")


def paired_bootstrap(
    value_a: Callable[[np.ndarray], Any],
    value_b: Callable[[np.ndarray], Any],
    n: int,
    resamples: int = RESAMPLES,
    seed: int = 0,
    alpha: float = ALPHA,
) -> dict[str, Any]:
    """Paired bootstrap of ``value_a - value_b`` over ``n`` samples (same resamples for both).

    value_a / value_b: the metric on the samples ``idx`` (a 1-D index array, or 2-D: one
    resample per row). Returns the difference on all samples, the percentile 95% interval, the
    two-sided p-value and the verdict at ``alpha``.
    """
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    full = np.arange(n)
    diff = float(value_a(full) - value_b(full))
    d = np.asarray(value_a(idx), dtype=np.float64) - np.asarray(value_b(idx), dtype=np.float64)
    d = d[np.isfinite(d)]
    if len(d) == 0:
        raise DataError("the metric is undefined on every resample (one class only?)")
    below, above = np.count_nonzero(d <= 0), np.count_nonzero(d >= 0)
    p = min(1.0, 2 * (min(below, above) + 1) / (len(d) + 1))
    if np.all(d == 0):
        p = 1.0  # the two runs agree on every sample
    lo, hi = np.percentile(d, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return {
        "test": "paired bootstrap",
        "difference": diff,
        "ci95": [float(lo), float(hi)],
        "p_value": float(p),
        "alpha": alpha,
        "verdict": "significant" if p < alpha else "not significant",
        "resamples": len(d),
        "seed": seed,
    }


def compare(
    run_a: str | Path,
    run_b: str | Path,
    *,
    metric: str | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
    trust: bool = False,
) -> dict[str, Any]:
    """Paired bootstrap of the difference A - B of ``metric`` (default: A's monitored metric)
    on the validation samples both runs share; see the module docstring."""
    from gradwise.tasks import METRIC_MODES

    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 100:
        raise ConfigError("--resamples", resamples, "an integer >= 100")
    a, b = _predictions(Path(run_a), trust), _predictions(Path(run_b), trust)
    if a["kind"] != b["kind"]:
        raise DataError(f"the runs solve different tasks: {a['kind']} and {b['kind']}")
    if a["samples"] != b["samples"] or a["fingerprint"] != b["fingerprint"]:
        how = (
            f"{a['samples']} and {b['samples']} samples"
            if a["samples"] != b["samples"]
            else f"{a['samples']} samples each, but different inputs or targets"
        )
        raise DataError(
            f"{run_a} and {run_b} were validated on different samples ({how}): a paired "
            "comparison needs the same validation set; train both on the same data.name and "
            "data.kwargs (val_fraction, seed), or compare cv runs of the same fold"
        )
    metric = (metric or a["monitor"] or "loss").removeprefix("val_")
    if metric == "train_loss":
        metric = "loss"
    kind = a["kind"]
    width = int(a["outputs"].shape[-1]) if a["outputs"].ndim > 1 else 2
    sa, y = _prepared(kind, a["outputs"], a["targets"])
    sb, _ = _prepared(kind, b["outputs"], b["targets"])
    stat_a = _statistic(kind, metric, sa, y, width)
    stat_b = _statistic(kind, metric, sb, y, width)
    full = np.arange(len(y))
    result = paired_bootstrap(stat_a, stat_b, len(y), resamples, seed)
    mode = METRIC_MODES.get(metric)
    better = None
    if mode is not None and result["difference"] != 0:
        better = "a" if (result["difference"] > 0) == (mode == "max") else "b"
    return {
        "metric": f"val_{metric}",
        "run_a": str(run_a),
        "run_b": str(run_b),
        "a": float(stat_a(full)),
        "b": float(stat_b(full)),
        "samples": len(y),
        "better": better,
        **result,
    }


callable_as_namesake(__name__)  # gradwise.compare(...) is its function compare(...)
