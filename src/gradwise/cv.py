"""Cross-validation: K runs of one recipe on K folds of its training data, and their spread.

    result = gradwise.cv("recipe.yaml", folds=5)                  # runs/<name>-cv/fold-1..5
    result.summary["val_accuracy"]  # {"mean", "std", "ci95", "ci95_naive", "values"}
    result = gradwise.cv("a.yaml", folds=5, against="b.yaml")     # same folds; paired t-test
    result.comparison["val_accuracy"]["verdict"]                   # "significant" or not

Each fold is a normal gradwise run directory whose recipe names the fold as its data
(``data.name: gradwise.cv:fold_data``), so ``gradwise report``, ``gradwise runs --root
runs/<name>-cv`` and ``gradwise resume --trust`` work on it, and it can be retrained exactly.

Judgment built in:

* folds are stratified for classification (StratifiedKFold), grouped when a group column is
  given (GroupKFold: a group never sits on both sides), plain shuffled KFold for regression and
  multilabel, contiguous blocks for language models (neighbouring windows share text);
* the standardisation statistics the data set fitted on its whole training split are refitted
  on each fold's training part, so nothing of the held-out fold leaks into its run;
* the recipe's own validation split is not touched (it stays a held-out set); with a group
  column every row of the file is used, since a random split would put a group on both sides;
* the spread: folds share most of their training data, so the naive ``s / sqrt(K)`` interval is
  too narrow (Bengio & Grandvalet 2004); ``ci95`` uses Nadeau & Bengio's (2003) corrected
  variance ``(1/K + n_val/n_train) s^2``, ``ci95_naive`` is shown next to it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradwise._lazy import callable_as_namesake
from gradwise.errors import ConfigError, DataError
from gradwise.recipe import Recipe, load_recipe

FOLD_DATA = "gradwise.cv:fold_data"
"""The data name a fold run's recipe carries; its kwargs say which data, folds, fold and seed."""
ALPHA = 0.05
"""Significance level of the paired tests."""
CV_FILE = "cv.json"


# -- folds ------------------------------------------------------------------------------------


@dataclass
class Folds:
    """How a data set's training part is cut: the splitter, and (train, val) indices per fold."""

    splitter: str  # StratifiedKFold | GroupKFold | KFold | KFold (contiguous)
    splits: list[tuple[np.ndarray, np.ndarray]]
    n: int
    why: str


def _labels(dataset: Any) -> np.ndarray | None:
    """1-D integer class labels of an in-memory data set (or None)."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is None or len(tensors) < 2:
        return None
    y = tensors[1]
    if y.ndim != 1 or y.is_floating_point():
        return None
    return y.numpy()


def make_folds(
    dataset: Any, task: str | None, k: int, seed: int = 0, groups: np.ndarray | None = None
) -> Folds:
    """K disjoint validation folds covering ``dataset`` (scikit-learn's splitters).

    A ConfigError naming ``--folds`` when K is below 2 or above what the data allows (the
    smallest class for stratified folds, the number of groups, the number of samples).
    """
    from sklearn.model_selection import GroupKFold, KFold, StratifiedKFold

    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise ConfigError("--folds", k, "an integer >= 2 (K runs, each validated on 1/K)")
    n = len(dataset)
    idx = np.arange(n)
    labels = _labels(dataset) if task in ("binary", "multiclass") else None
    if groups is not None:
        groups = np.asarray(groups)
        if len(groups) != n:
            raise DataError(f"{len(groups)} group labels for {n} training samples")
        distinct = len(np.unique(groups))
        if k > distinct:
            raise ConfigError("--folds", k, f"at most {distinct}, the number of groups")
        splitter, why = GroupKFold(n_splits=k), "grouped: a group never sits in two folds"
        splits = list(splitter.split(idx, groups=groups))
        name = "GroupKFold"
    elif labels is not None:
        values, counts = np.unique(labels, return_counts=True)
        if k > counts.min():
            rare = values[counts.argmin()]
            raise ConfigError(
                "--folds",
                k,
                f"at most {counts.min()}, the size of the smallest class (class {rare}) in the "
                "training data: every fold needs every class",
            )
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        splits, name = list(splitter.split(idx, labels)), "StratifiedKFold"
        why = "stratified: every fold keeps the class proportions"
    else:
        if k > n:
            raise ConfigError("--folds", k, f"at most {n}, the number of training samples")
        contiguous = task == "lm"
        splitter = KFold(
            n_splits=k, shuffle=not contiguous, random_state=None if contiguous else seed
        )
        splits = list(splitter.split(idx))
        name = "KFold (contiguous)" if contiguous else "KFold"
        why = (
            "contiguous blocks: neighbouring windows of a text share characters"
            if contiguous
            else f"shuffled KFold ({task or 'no class labels'}: nothing to stratify)"
        )
    return Folds(name, [(np.sort(a), np.sort(b)) for a, b in splits], n, why)


def _refit(x: Any, val_x: Any, record: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """Undo a standardisation fitted on all training rows and fit it again on the fold's own."""
    import torch

    from gradwise.data.common import standardize

    per = record.get("per", "feature")
    mean, std = (
        torch.tensor(record["mean"], dtype=torch.float64),
        torch.tensor(record["std"], dtype=torch.float64),
    )
    if per == "feature":
        shape = tuple(record.get("shape", x.shape[1:]))
        mean, std = mean.reshape(shape), std.reshape(shape)
    elif per == "channel":
        view = (-1, *[1] * (x.ndim - 2))
        mean, std = mean.reshape(view), std.reshape(view)
    else:
        mean, std = mean.reshape(()), std.reshape(())

    def raw(t: Any) -> Any:
        return t.to(torch.float64) * std + mean

    new_x, new_val, new_record = standardize(raw(x), raw(val_x), per=per)
    return new_x, new_val, new_record


def _fold_bundle(spec: dict[str, Any], trusted: bool) -> Any:
    """The DataBundle of one fold: ``spec`` holds data, folds, fold, seed and group."""
    from torch.utils.data import Subset, TensorDataset

    from gradwise.data.bundle import DataBundle

    data, k, fold = spec["data"], spec["folds"], spec["fold"]
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise ConfigError("data.kwargs.data", data, "the data section {name, kwargs} of the recipe")
    if isinstance(fold, bool) or not isinstance(fold, int) or not 1 <= fold <= k:
        raise ConfigError("data.kwargs.fold", fold, f"a fold number in 1..{k}")
    base, groups = _base_data(data, spec.get("group"), trusted)
    folds = make_folds(base.train, base.info.task, k, spec.get("seed", 0), groups)
    train_idx, val_idx = folds.splits[fold - 1]
    info = dataclasses.replace(
        base.info,
        n_train=len(train_idx),
        n_val=len(val_idx),
        preprocessing=dict(base.info.preprocessing),
        notes=[*base.info.notes, f"cross-validation fold {fold}/{k} ({folds.splitter})"],
    )
    tensors = getattr(base.train, "tensors", None)
    if tensors is None or len(tensors) != 2:
        return DataBundle(
            Subset(base.train, train_idx.tolist()), Subset(base.train, val_idx.tolist()), info
        )
    x, y = tensors
    ti, vi = (torch_index(i) for i in (train_idx, val_idx))
    x_tr, x_va, y_tr, y_va = x[ti], x[vi], y[ti], y[vi]
    pre = info.preprocessing
    if "standardize" in pre and x.is_floating_point():
        x_tr, x_va, pre["standardize"] = _refit(x_tr, x_va, pre["standardize"])
        info.notes.append("standardisation refitted on the fold's training part")
    target = pre.get("target_standardize")
    if target is not None and y.is_floating_point():
        record = {**target, "per": "all"} if y.ndim == 1 else target
        y_tr, y_va, new = _refit(y_tr, y_va, record)
        pre["target_standardize"] = (
            {"mean": new["mean"][0], "std": new["std"][0]} if y.ndim == 1 else new
        )
    return DataBundle(TensorDataset(x_tr, y_tr), TensorDataset(x_va, y_va), info)


def torch_index(idx: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))


def _base_data(
    data: dict[str, Any], group: str | None, trusted: bool
) -> tuple[Any, np.ndarray | None]:
    """The recipe's data set, and the group labels of its training samples when asked."""
    from gradwise.data import load_data

    kwargs = dict(data.get("kwargs") or {})
    if group is None:
        return load_data(data["name"], kwargs, trusted=trusted), None
    if data["name"] != "csv":
        raise ConfigError(
            "--group",
            group,
            "a column of a csv data set (data.name: csv)",
            f"this recipe's data is {data['name']!r}",
        )
    from gradwise.data.common import existing_file
    from gradwise.data.tabular import _column_index, _read_csv

    path = existing_file(kwargs.get("path", ""))
    header, rows = _read_csv(path, kwargs.get("delimiter", ","))
    j = _column_index(header, group, path, "group")
    if kwargs.get("features") is None:
        kwargs["features"] = [h for h in header if h not in (kwargs.get("target"), group)]
    elif group in kwargs["features"]:
        raise ConfigError(
            "--group", group, "a column that is not a feature (data.kwargs.features names it)"
        )
    kwargs["val_fraction"] = 0  # every row, in file order, so the groups line up
    return load_data("csv", kwargs, trusted=trusted), np.asarray([row[j] for _, row in rows])


def fold_data(
    data: dict[str, Any], folds: int, fold: int, seed: int = 0, group: str | None = None
) -> Any:
    """Data-set factory of a fold run: fold ``fold`` of ``folds`` of ``data``'s training part.

    ``data`` is the recipe's data section ({name, kwargs}); the fold's held-out part is its
    validation set. Named by fold runs' recipes as ``gradwise.cv:fold_data``.
    """
    spec = {"data": data, "folds": folds, "fold": fold, "seed": seed, "group": group}
    return _fold_bundle(spec, trusted=True)


# -- statistics -------------------------------------------------------------------------------


def spread(values: list[float], ratio: float) -> dict[str, Any]:
    """Mean, std and 95% t-intervals of per-fold values: corrected (``ratio`` = n_val/n_train,
    Nadeau & Bengio 2003) and naive (``s / sqrt(K)``)."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    k = len(v)
    out: dict[str, Any] = {"values": [float(x) for x in values], "folds": k}
    if k == 0:
        return out | {"mean": None, "std": None, "ci95": None, "ci95_naive": None}
    mean = float(v.mean())
    std = float(v.std(ddof=1)) if k > 1 else 0.0
    t = float(stats.t.ppf(1 - ALPHA / 2, k - 1)) if k > 1 else math.inf
    half = t * std * math.sqrt(1 / k + ratio) if std else 0.0
    naive = t * std / math.sqrt(k) if std else 0.0
    return out | {
        "mean": mean,
        "std": std,
        "ci95": [mean - half, mean + half],
        "ci95_naive": [mean - naive, mean + naive],
    }


def corrected_t_test(
    a: list[float], b: list[float], ratio: float, alpha: float = ALPHA
) -> dict[str, Any]:
    """Nadeau & Bengio's (2003) corrected resampled t-test on paired per-fold values.

    The per-fold differences ``d`` have variance ``s^2``; folds overlap in training data, so the
    mean's variance is ``(1/K + n_val/n_train) s^2`` instead of ``s^2 / K`` (``ratio`` =
    n_val/n_train). Returns the mean difference a - b, its 95% interval, t, df, the two-sided
    p-value and the verdict at ``alpha``.
    """
    from scipy import stats

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    d = d[np.isfinite(d)]
    k = len(d)
    if k < 2:
        return {"difference": None, "verdict": "not enough folds", "folds": k}
    mean, var = float(d.mean()), float(d.var(ddof=1))
    se = math.sqrt((1 / k + ratio) * var)
    df = k - 1
    if se == 0:
        t, p = (0.0, 1.0) if mean == 0 else (math.copysign(math.inf, mean), 0.0)
    else:
        t = mean / se
        p = float(2 * stats.t.sf(abs(t), df))
    half = float(stats.t.ppf(1 - alpha / 2, df)) * se
    return {
        "test": "corrected resampled t-test (Nadeau & Bengio 2003)",
        "difference": mean,
        "ci95": [mean - half, mean + half],
        "t": t,
        "df": df,
        "p_value": p,
        "alpha": alpha,
        "verdict": "significant" if p < alpha else "not significant",
        "folds": k,
    }


# -- running ----------------------------------------------------------------------------------


@dataclass
class FoldRun:
    """One fold's run: where it is and its validation metrics at the best evaluation."""

    fold: int
    dir: str
    state: str
    monitor: str
    best_metric: float | None
    metrics: dict[str, float]
    seconds: float


@dataclass
class CVResult:
    """What :func:`cv` found: the fold runs, the spread of every metric, and the comparison."""

    dir: Path
    folds: int
    monitor: str
    summary: dict[str, dict[str, Any]]
    runs: list[FoldRun]
    against: dict[str, Any] | None = None  # {"summary", "runs"} of the second recipe
    comparison: dict[str, dict[str, Any]] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str | None:
        """The paired test's verdict on the monitored metric (with ``against``)."""
        if not self.comparison or self.monitor not in self.comparison:
            return None
        return self.comparison[self.monitor]["verdict"]


def _short(name: str) -> str:
    return name.rpartition(":")[2].rpartition(".")[2].lower()


def _name(r: Recipe) -> str:
    return r.name or f"{_short(r.model.name)}-{_short(r.data.name)}"


def _best_entry(
    history: list[dict[str, float]], monitor: str, best: float | None
) -> dict[str, float]:
    """The evaluation that gave the best checkpoint (the first at the best value)."""
    for entry in history:
        if best is not None and entry.get(monitor) == best:
            return entry
    return history[-1] if history else {}


def _fold_recipe(r: Recipe, k: int, fold: int, seed: int, group: str | None, root: Path) -> Recipe:
    spec = {
        "data": {"name": r.data.name, "kwargs": r.data.kwargs},
        "folds": k,
        "fold": fold,
        "seed": seed,
        "group": group,
    }
    return r.override(
        {
            "data": {"name": FOLD_DATA, "kwargs": spec},
            "tracking.root": str(root),
            "name": f"fold-{fold}",
        }
    )


def _train_fold(r: Recipe, fold: int, progress: str, tags: dict[str, str]) -> FoldRun:
    from gradwise.trainer import Trainer

    started = time.perf_counter()
    run = Trainer(recipe=r, advise=False, progress=progress, tags=tags).fit()
    entry = _best_entry(run.history, run.monitor, run.best_metric)
    metrics = {k: float(v) for k, v in entry.items() if k.startswith("val_")}
    return FoldRun(
        fold=fold,
        dir=str(run.dir),
        state=run.state,
        monitor=run.monitor,
        best_metric=run.best_metric,
        metrics=metrics,
        seconds=time.perf_counter() - started,
    )


def _summaries(runs: list[FoldRun], ratio: float) -> dict[str, dict[str, Any]]:
    names = sorted({m for run in runs for m in run.metrics})
    return {m: spread([run.metrics.get(m, math.nan) for run in runs], ratio) for m in names}


def _check_same_data(a: Recipe, b: Recipe) -> None:
    if (a.data.name, a.data.kwargs) != (b.data.name, b.data.kwargs):
        raise ConfigError(
            "--against",
            f"data {b.data.name} {b.data.kwargs}",
            f"a recipe on the same data as the first (data {a.data.name} {a.data.kwargs}): a "
            "paired test needs the same folds",
        )


def cv(
    recipe: Recipe | dict | str | Path,
    folds: int = 5,
    *,
    seed: int = 0,
    against: Recipe | dict | str | Path | None = None,
    group: str | None = None,
    progress: str = "off",
    overrides: dict[str, Any] | None = None,
    announce: Callable[[str], None] | None = None,
) -> CVResult:
    """Cross-validate ``recipe`` on ``folds`` folds of its training data; see the module docstring.

    seed: the folds' shuffle (the recipe's own seed drives training). against: a second recipe
    on the same data, trained on the same folds, compared fold by fold with the corrected
    resampled t-test. group: a column of a csv data set whose values must not cross folds.
    overrides: recipe settings for both recipes (e.g. {"epochs": 5}). announce: called with a
    line before each fold run (the CLI prints it). Writes
    ``runs/<name>-cv/`` (``fold-k/`` or ``a/fold-k``, ``b/fold-k``) and ``cv.json``.
    """
    from gradwise.assemble import OBJECT
    from gradwise.tracking import atomic_write_text, new_run_dir

    recipes = [load_recipe(recipe).override(overrides or {})]
    if against is not None:
        recipes.append(load_recipe(against).override(overrides or {}))
        _check_same_data(*recipes)
    r = recipes[0]
    if r.data.name.startswith(OBJECT) or r.data.name == FOLD_DATA:
        raise ConfigError(
            "data.name", r.data.name, "a data set the recipe names (a built-in or an import path)"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError("--seed", seed, "an integer")
    # every check before a directory exists: the data loads and K fits it
    base, groups = _base_data({"name": r.data.name, "kwargs": r.data.kwargs}, group, trusted=True)
    plan = make_folds(base.train, _task(r, base), folds, seed, groups)
    n_val = float(np.mean([len(v) for _, v in plan.splits]))
    ratio = n_val / (plan.n - n_val)
    names = [_name(x) for x in recipes]
    title = f"{names[0]}-cv" if against is None else f"{names[0]}-vs-{names[1]}-cv"
    parent = new_run_dir(r.tracking.root, title)
    roots = [parent] if against is None else [parent / "a", parent / "b"]
    runs: list[list[FoldRun]] = [[] for _ in recipes]
    info = {
        "recipes": names,
        "data": {"name": r.data.name, "kwargs": r.data.kwargs},
        "folds": folds,
        "seed": seed,
        "group": group,
        "splitter": plan.splitter,
        "why": plan.why,
        "samples": plan.n,
        "n_val_per_fold": n_val,
        "n_val_over_n_train": ratio,
    }

    def write(state: str) -> CVResult:
        result = _result(parent, folds, runs, ratio, info, state)
        atomic_write_text(parent / CV_FILE, json.dumps(_jsonable(result, state), indent=2))
        return result

    write("running")
    for fold in range(1, folds + 1):
        for i, (x, root) in enumerate(zip(recipes, roots, strict=True)):
            if announce is not None:
                which = f" of {'ab'[i]} ({names[i]})" if against is not None else ""
                announce(f"fold {fold}/{folds}{which}: {root / f'fold-{fold}'}")
            tags = {"gradwise.cv": str(parent), "gradwise.fold": str(fold)}
            run = _train_fold(_fold_recipe(x, folds, fold, seed, group, root), fold, progress, tags)
            runs[i].append(run)
            if run.state == "interrupted":
                write("interrupted")
                raise KeyboardInterrupt
    return write("finished")


def _task(r: Recipe, base: Any) -> str | None:
    from gradwise.tasks import resolve_kind

    try:
        return resolve_kind(r.task, base.info)
    except ConfigError:
        return base.info.task


def _result(
    parent: Path, folds: int, runs: list[list[FoldRun]], ratio: float, info: dict, state: str
) -> CVResult:
    a = runs[0]
    monitor = a[0].monitor if a else ""
    result = CVResult(
        parent, folds, monitor, _summaries(a, ratio), a, info={**info, "state": state}
    )
    if len(runs) > 1:
        b = runs[1]
        result.against = {"summary": _summaries(b, ratio), "runs": b}
        n = min(len(a), len(b))
        shared = sorted(set(result.summary) & set(result.against["summary"]))
        result.comparison = {
            m: _with_better(
                corrected_t_test(
                    [run.metrics.get(m, math.nan) for run in a[:n]],
                    [run.metrics.get(m, math.nan) for run in b[:n]],
                    ratio,
                ),
                m,
            )
            for m in shared
        }
    return result


def _with_better(test: dict[str, Any], metric: str) -> dict[str, Any]:
    """Which recipe the difference favours, by the metric's direction."""
    from gradwise.tasks import METRIC_MODES

    mode = METRIC_MODES.get(metric.removeprefix("val_"))
    diff = test.get("difference")
    if mode is None or diff is None or diff == 0:
        return test | {"better": None}
    return test | {"better": "a" if (diff > 0) == (mode == "max") else "b"}


def _jsonable(result: CVResult, state: str) -> dict[str, Any]:
    out = {
        **result.info,
        "state": state,
        "monitor": result.monitor,
        "summary": result.summary,
        "runs": [dataclasses.asdict(run) for run in result.runs],
    }
    if result.against is not None:
        out["against"] = {
            "summary": result.against["summary"],
            "runs": [dataclasses.asdict(run) for run in result.against["runs"]],
        }
        out["comparison"] = result.comparison
    return out


def read_cv(parent: str | Path) -> dict[str, Any]:
    """The ``cv.json`` of a cross-validation directory."""
    path = Path(parent) / CV_FILE
    if not path.is_file():
        raise ConfigError("cv directory", str(parent), f"a directory with {CV_FILE} (gradwise cv)")
    return json.loads(path.read_text(encoding="utf-8"))


callable_as_namesake(__name__)  # gradwise.cv(...) is its function cv(...)
