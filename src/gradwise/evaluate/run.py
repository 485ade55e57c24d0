"""``gw.evaluate``: a run (or a model and data) evaluated in depth, written to ``RUN/evaluation/``.

    result = gw.evaluate("runs/digits-cnn")                  # best checkpoint, validation split
    result = gw.evaluate("runs/digits-cnn", checkpoint="last", slices="label")
    result = gw.evaluate(model, (X_test, y_test), task="multiclass")
    result.headline["f1_macro"], result.metrics["confusion_matrix"], result.write("eval/")

A run directory is data anyone may hand over: the model is rebuilt from the zoo (or from import
paths only with ``trust=True``), its weights read from safetensors by gradwise's loaders, and the
data loaded from the recipe's built-in data set; nothing in the directory is unpickled or run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gradwise.errors import ConfigError, DataError, warn
from gradwise.evaluate import analysis as an
from gradwise.evaluate import calibration as cal
from gradwise.evaluate import metrics as mt
from gradwise.evaluate import plots as pl
from gradwise.evaluate.page import render

BATCH_SIZE = 512  # samples per forward pass while predicting
PAGE, METRICS = "index.html", "metrics.json"
DATA_SPLITS = ("val", "train")


@dataclass
class Evaluation:
    """What :func:`evaluate` found: metrics, calibration, error analysis and plots."""

    task: str
    metrics: dict[str, Any]  # metrics.py's dict: headline (value, ci_low, ci_high), per class...
    calibration: dict[str, Any] | None = None  # the contract's record, when fitted
    analysis: dict[str, Any] = field(default_factory=dict)
    plots: dict[str, bytes] = field(default_factory=dict, repr=False)  # name -> PNG
    source: dict[str, Any] = field(default_factory=dict)  # run, checkpoint, data
    notes: list[str] = field(default_factory=list)
    dir: Path | None = None  # where it was written, if it was

    @property
    def headline(self) -> dict[str, float]:
        """Headline metric -> point estimate."""
        return {k: v["value"] for k, v in self.metrics["headline"].items()}

    def to_dict(self) -> dict[str, Any]:
        """Everything but the PNGs, JSON-ready (what metrics.json holds)."""
        return {
            "task": self.task,
            "source": self.source,
            "metrics": self.metrics,
            "calibration": self.calibration,
            "analysis": self.analysis,
            "plots": sorted(f"{name}.png" for name in self.plots),
            "notes": self.notes,
        }

    def write(self, directory: str | Path) -> Path:
        """Write metrics.json, the PNGs, index.html (and calibration.json when fitted) into
        ``directory``, atomically: a new directory renamed over the old one when complete."""
        from gradwise.tracking.files import atomic_write_json, publish_dir

        final = Path(directory)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            for name, png in self.plots.items():
                (tmp / f"{name}.png").write_bytes(png)
            if self.calibration is not None:
                cal.write(tmp, self.calibration)
            title = f"gradwise evaluation: {self.source.get('run') or 'model'}"
            (tmp / PAGE).write_text(render(self.to_dict(), self.plots, title), encoding="utf-8")
            atomic_write_json(tmp / METRICS, self.to_dict())
            publish_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.dir = final
        return final


# -- entry point ---------------------------------------------------------------------------------


def evaluate(
    run_or_model: str | Path | nn.Module,
    data: Any = None,
    *,
    task: str | None = None,
    checkpoint: str | int = "best",
    slices: Any = None,
    model: nn.Module | None = None,
    trust: bool = False,
    calibrate: bool = True,
    resamples: int = mt.RESAMPLES,
    seed: int = 0,
    plots: bool = True,
    write: bool = True,
    mlflow: bool | None = None,
) -> Evaluation:
    """Evaluate a run directory (its ``checkpoint``: best, last or a step) or a model on ``data``.

    data: for a run, None (its validation split), "val", "train", or a ``.npz`` file with raw
    inputs ``x`` and targets ``y`` (preprocessed with the run's training statistics); for a model,
    ``(X, y)`` tensors/arrays, a Dataset or a DataLoader (in the model's input space).
    task: binary, multiclass, multilabel, regression or lm (a run knows its own).
    slices: "label", a column name, {name: group per sample}, or a list of these.
    model: the model object, for a run trained on one (its recipe cannot rebuild it).
    calibrate: fit a temperature on the validation split (classification; a run's calibration
    is stored in ``RUN/evaluation/calibration.json``, read by export, serve and predict).
    resamples: bootstrap resamples for the 95% intervals (0: none).
    write: a run's evaluation goes to ``RUN/evaluation/`` (a model's only on ``.write(dir)``).
    mlflow: log metrics and artifacts to the run's MLflow run (None: when it has one).
    """
    if isinstance(run_or_model, nn.Module):
        if data is None:
            raise ConfigError("data", None, "(X, y), a Dataset or a DataLoader to evaluate on")
        if task is None:
            raise ConfigError("task", None, "binary, multiclass, multilabel, regression or lm")
        loaded = _Loaded(model=run_or_model.eval(), kind=_kind(task), eval_data=data, where="data")
    elif isinstance(run_or_model, (str, os.PathLike)):
        loaded = _load_run(Path(run_or_model), data, task, checkpoint, model, trust)
    else:
        raise ConfigError(
            "run_or_model", type(run_or_model).__name__, "a run directory or a torch.nn.Module"
        )
    result = _evaluate(loaded, slices, calibrate, resamples, seed, plots)
    if loaded.run_dir is not None and write:
        result.write(loaded.run_dir / cal.EVALUATION)
        if mlflow is not False:
            logged = log_to_mlflow(loaded.run_dir, result, required=bool(mlflow))
            if logged:
                result.notes.append(f"logged to MLflow run {logged}")
    return result


def _kind(task: str) -> str:
    kinds = (*mt.CLASSIFICATION_KINDS, "regression", "lm")
    if task not in kinds:
        raise ConfigError("task", task, f"one of {', '.join(kinds)}")
    return task


# -- loading a run -------------------------------------------------------------------------------


@dataclass
class _Loaded:
    model: nn.Module
    kind: str
    eval_data: Any
    where: str  # validation | train | a file | data
    val_data: Any = None  # for calibration
    info: Any = None
    run_dir: Path | None = None
    checkpoint: Path | None = None
    label_key: str | None = None


def resolve_step(run_dir: Path, checkpoint: str | int) -> Path:
    """The checkpoint directory for ``best``, ``last`` or a step number (verified)."""
    from gradwise.checkpoint import list_checkpoints, resolve_checkpoint, verify_checkpoint

    which = str(checkpoint).strip()
    if which == "best":
        return resolve_checkpoint(run_dir, "best")
    if which in ("last", "latest"):
        return resolve_checkpoint(run_dir, "latest")
    steps = {int(c.name.removeprefix("step-")): c for c in list_checkpoints(run_dir)}
    shown = ", ".join(str(s) for s in sorted(steps)) or "none"
    if not which.isdigit() or int(which) not in steps:
        raise ConfigError(
            "--checkpoint", checkpoint, f"best, last, or the step of a checkpoint ({shown})"
        )
    path = steps[int(which)]
    damage = verify_checkpoint(path)
    if damage:
        raise DataError(f"checkpoint {path} is damaged: {damage}")
    return path


def _load_run(
    run_dir: Path,
    data: Any,
    task: str | None,
    checkpoint: str | int,
    model: nn.Module | None,
    trust: bool,
) -> _Loaded:
    from gradwise.assemble import OBJECT
    from gradwise.deploy.source import Source, load_model
    from gradwise.recipe import load_recipe

    if not (run_dir / "recipe.yaml").is_file():
        raise ConfigError("run", str(run_dir), "a gradwise run directory (with recipe.yaml)")
    if str(checkpoint).strip() not in ("best", "last", "latest") and not str(checkpoint).isdigit():
        raise ConfigError("--checkpoint", checkpoint, "best, last, or a step number")
    recipe = load_recipe(run_dir / "recipe.yaml")
    ckpt = resolve_step(run_dir, checkpoint)
    kind = _kind(task or recipe.task)
    source = Source(run_dir=run_dir, checkpoint=ckpt, recipe=recipe, trusted=trust)
    net = load_model(source, model)
    bundle = None
    if not recipe.data.name.startswith(OBJECT):
        from gradwise.data import load_data

        bundle = load_data(recipe.data.name, recipe.data.kwargs, trusted=trust)
    val = bundle.val if bundle is not None and bundle.val is not None and len(bundle.val) else None
    info = bundle.info if bundle is not None else None
    where = "validation"
    if data is None or data == "val":
        if val is None:
            raise ConfigError(
                "--data",
                data,
                "data to evaluate on: the run has no validation split gradwise can rebuild",
                "pass a .npz file with x and y",
            )
        eval_data = val
    elif data == "train":
        if bundle is None:
            raise ConfigError("--data", data, "a .npz file: the run's data was a Python object")
        eval_data, where = bundle.train, "train"
    elif isinstance(data, (str, os.PathLike)):
        eval_data, where = _npz(Path(data), info), str(data)
    else:
        eval_data, where = data, "data"
    return _Loaded(
        model=net,
        kind=kind,
        eval_data=eval_data,
        where=where,
        val_data=val,
        info=info,
        run_dir=run_dir,
        checkpoint=ckpt,
        label_key=recipe.data.label_key,
    )


def _npz(path: Path, info: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw inputs ``x`` and targets ``y`` of a .npz file, preprocessed as the run's training data
    (regression targets standardised as well, when the run did)."""
    from gradwise.deploy.card import preprocess

    if path.suffix != ".npz" or not path.is_file():
        raise ConfigError("--data", str(path), "val, train, or an existing .npz file with x and y")
    with np.load(path, allow_pickle=False) as f:  # never unpickle: object arrays are refused
        keys = {k.lower(): k for k in f.files}
        if "x" not in keys or "y" not in keys:
            raise DataError(f"{path}: expected arrays x and y; found {sorted(f.files)}")
        x, y = f[keys["x"]], f[keys["y"]]
    if len(x) != len(y):
        raise DataError(f"{path}: x has {len(x)} rows but y has {len(y)}")
    prep = info.preprocessing if info is not None else {}
    x = preprocess(x, prep)
    if "target_standardize" in prep and y.dtype.kind == "f":
        t = prep["target_standardize"]
        y = (y - np.asarray(t["mean"])) / np.asarray(t["std"])
    from gradwise.data.common import input_tensor, target_tensor

    return input_tensor(x, "x"), target_tensor(y, "y")


# -- predicting ----------------------------------------------------------------------------------


def predict_outputs(
    model: nn.Module, data: Any, label_key: str | None = None, batch_size: int = BATCH_SIZE
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(outputs, targets, main inputs or None) of ``model`` in eval mode over ``data``."""
    from torch.utils.data import DataLoader, Dataset

    from gradwise.batch import outputs_of, run_model, split_batch
    from gradwise.data import as_dataset

    if isinstance(data, DataLoader):
        loader = data
    else:
        dataset = data if isinstance(data, Dataset) else as_dataset(data)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    outs, targets, inputs = [], [], []
    model.eval()
    with torch.inference_mode():
        for raw in loader:
            batch = split_batch(raw, label_key)
            if batch.target is None:
                raise DataError("the evaluation data has no targets: expected (inputs, target)")
            logits, _ = outputs_of(run_model(model, batch.to(device)))
            outs.append(logits.float().cpu())
            targets.append(batch.target.cpu())
            x = batch.inputs
            inputs.append(x.cpu() if x is not None else None)
    if not outs:
        raise DataError("the evaluation data is empty")
    keep_inputs = all(x is not None for x in inputs) and inputs[0].ndim == 2
    return (
        torch.cat(outs).numpy(),
        torch.cat(targets).numpy(),
        torch.cat(inputs).numpy() if keep_inputs else None,
    )


# -- evaluating ----------------------------------------------------------------------------------


def _evaluate(
    loaded: _Loaded,
    slices: Any,
    calibrate: bool,
    resamples: int,
    seed: int,
    make_plots: bool,
) -> Evaluation:
    kind, info = loaded.kind, loaded.info
    logits, y, x = predict_outputs(loaded.model, loaded.eval_data, loaded.label_key)
    names = info.class_names if info is not None else None
    source = {
        "run": str(loaded.run_dir) if loaded.run_dir else None,
        "checkpoint": loaded.checkpoint.name if loaded.checkpoint else None,
        "data": loaded.where,
    }
    notes: list[str] = []
    if kind == "lm":
        return _evaluate_lm(logits, y, info, source, resamples, seed)
    if kind == "regression":
        return _evaluate_regression(logits, y, x, info, slices, source, resamples, seed, make_plots)

    if kind == "binary" and logits.ndim == 2 and logits.shape[1] in (1, 2):
        logits = logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]
    y = y.astype(np.int64)
    probs = mt.probabilities(logits, kind)
    m = mt.classification_metrics(y, probs, kind, class_names=names, resamples=resamples, seed=seed)
    labels = m["labels"]

    record = None
    if calibrate:
        if loaded.where == "validation" or loaded.val_data is None:
            val_logits, val_y = logits, y
            if loaded.val_data is None and loaded.run_dir is None:
                notes.append("temperature fitted on the evaluation data (no separate validation)")
        else:
            val_logits, val_y, _ = predict_outputs(loaded.model, loaded.val_data, loaded.label_key)
            if kind == "binary" and val_logits.ndim == 2:
                val_logits = (
                    val_logits[:, 0]
                    if val_logits.shape[1] == 1
                    else val_logits[:, 1] - val_logits[:, 0]
                )
        if loaded.run_dir is not None and loaded.val_data is None and loaded.where != "validation":
            notes.append("no validation split: no temperature was fitted")
        else:
            record = cal.fit_temperature(val_logits, val_y.astype(np.int64), kind)

    an_result: dict[str, Any] = {}
    groups = an.slice_groups(
        slices,
        len(y),
        inputs=_raw_inputs(x, info),
        targets=y if kind != "multilabel" else None,
        feature_names=info.feature_names if info is not None else None,
        class_names=labels,
    )
    if kind != "multilabel":
        full = np.stack([1 - probs, probs], 1) if kind == "binary" else probs
        an_result["confident_mistakes"] = an.confident_mistakes(full, y, labels)
        an_result["worst_classes"] = an.worst_classes(m["per_class"])
        an_result["confused_pairs"] = an.confused_pairs(m["confusion_matrix"], labels)
        pred = full.argmax(1)
        if groups:
            an_result["slices"] = an.slice_metrics(groups, kind, y, pred)
    else:
        an_result["worst_classes"] = an.worst_classes(m["per_class"])
        if groups:
            raise ConfigError("slices", slices, "a single-label or regression task")

    png: dict[str, bytes] = {}
    if make_plots:
        h = m["headline"]
        auc = h.get("roc_auc", h.get("roc_auc_macro", {})).get("value")
        ap = h.get("average_precision", h.get("average_precision_macro", {})).get("value")
        if "confusion_matrix" in m:
            png["confusion_matrix"] = pl.confusion_matrix(m["confusion_matrix"], labels)
        if m["curves"]["roc"]:
            png["roc"] = pl.roc(m["curves"], auc)
            png["pr"] = pl.pr(m["curves"], ap)
        before = cal.reliability(probs, y, kind)
        after = (
            cal.reliability(mt.probabilities(logits, kind, record["temperature"]), y, kind)
            if record
            else None
        )
        m["reliability"] = {"before": before, "after": after}
        png["reliability"] = pl.reliability(before, after, record and record["temperature"])
    return Evaluation(kind, m, record, an_result, png, source, notes)


def _raw_inputs(x: np.ndarray | None, info: Any) -> np.ndarray | None:
    """Inputs in their raw units (slices by a column read the values people know)."""
    if x is None or info is None or not info.preprocessing:
        return x
    from gradwise.deploy.card import unpreprocess

    try:
        return unpreprocess(x, info.preprocessing)
    except (KeyError, ValueError):
        return x


def _evaluate_regression(
    out: np.ndarray,
    y: np.ndarray,
    x: np.ndarray | None,
    info: Any,
    slices: Any,
    source: dict[str, Any],
    resamples: int,
    seed: int,
    make_plots: bool,
) -> Evaluation:
    y = y.astype(np.float64)
    p = out.astype(np.float64)
    if p.ndim == y.ndim + 1 and p.shape[-1] == 1:
        p = p[..., 0]
    notes = []
    prep = info.preprocessing if info is not None else {}
    if "target_standardize" in prep:  # report in the target's own units
        t = prep["target_standardize"]
        mean, std = np.asarray(t["mean"]), np.asarray(t["std"])
        p, y = p * std + mean, y * std + mean
        notes.append("predictions and targets in the target's original units")
    m = mt.regression_metrics(y, p, resamples=resamples, seed=seed)
    groups = an.slice_groups(
        slices,
        len(y),
        inputs=_raw_inputs(x, info),
        feature_names=info.feature_names if info is not None else None,
    )
    an_result = {}
    if groups:
        an_result["slices"] = an.slice_metrics(
            groups, "regression", y.reshape(len(y), -1).mean(1), p.reshape(len(p), -1).mean(1)
        )
    err = np.abs(p - y).reshape(len(y), -1).mean(1)
    worst = np.argsort(-err, kind="stable")[: an.MISTAKES]
    an_result["largest_errors"] = [
        {
            "index": int(i),
            "true": float(y.reshape(len(y), -1)[i].mean()),
            "predicted": float(p.reshape(len(p), -1)[i].mean()),
            "abs_error": float(err[i]),
        }
        for i in worst
    ]
    png = {}
    if make_plots:
        png["residuals"] = pl.residuals(y, p)
        png["predicted_vs_true"] = pl.predicted_vs_true(y, p)
    return Evaluation("regression", m, None, an_result, png, source, notes)


def _evaluate_lm(
    logits: np.ndarray, y: np.ndarray, info: Any, source: dict[str, Any], resamples: int, seed: int
) -> Evaluation:
    from gradwise.data.bundle import IGNORE_INDEX

    z = torch.from_numpy(logits)
    t = torch.from_numpy(y).long()
    nll = torch.nn.functional.cross_entropy(
        z.flatten(0, -2), t.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(t.shape)
    mask = t != IGNORE_INDEX
    sums = (nll * mask).reshape(len(t), -1).sum(1).double().numpy()
    counts = mask.reshape(len(t), -1).sum(1).numpy()
    char_level = bool(info is not None and "char_vocab" in info.preprocessing)
    m = mt.lm_metrics(sums, counts, char_level=char_level, resamples=resamples, seed=seed)
    notes = [] if char_level else ["bits per character needs a character-level vocabulary"]
    return Evaluation("lm", m, None, {}, {}, source, notes)


# -- MLflow --------------------------------------------------------------------------------------


def log_to_mlflow(run_dir: Path, result: Evaluation, required: bool = False) -> str | None:
    """Log the headline metrics (``eval/<name>``, and their CI bounds) and the evaluation
    directory's files to the MLflow run the training run created (found by its
    ``gradwise.run_dir`` tag); None when there is no such tracking store or run."""
    run_dir = Path(run_dir).resolve()
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    db = run_dir.parent / "mlflow.db"
    if not uri and not db.is_file():
        if required:
            raise ConfigError("mlflow", True, f"an MLflow store: {db} does not exist")
        return None
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        if required:
            raise ConfigError(
                "mlflow", True, "mlflow installed: pip install 'gradwise[track]'"
            ) from None
        return None
    from gradwise.tracking.tracker import quiet_loggers

    with quiet_loggers("mlflow.store.db.utils", "alembic"):
        client = MlflowClient(tracking_uri=uri or f"sqlite:///{db.as_posix()}")
        tag = str(run_dir).replace("'", "\\'")
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            filter_string=f"tags.`gradwise.run_dir` = '{tag}'",
            max_results=1,
        )
    if not runs:
        if required:
            raise ConfigError("mlflow", True, f"an MLflow run tagged with {run_dir}")
        return None
    from mlflow.entities import Metric

    run_id = runs[0].info.run_id
    import time

    ms = int(time.time() * 1000)
    entries = []
    for name, v in result.metrics["headline"].items():
        for suffix, key in (("", "value"), ("_ci_low", "ci_low"), ("_ci_high", "ci_high")):
            value = v.get(key)
            if value is not None and math.isfinite(value):
                entries.append(Metric(f"eval/{name}{suffix}", float(value), ms, 0))
    if result.calibration:
        entries.append(Metric("eval/temperature", result.calibration["temperature"], ms, 0))
    try:
        client.log_batch(run_id, metrics=entries)
        if result.dir is not None:
            client.log_artifacts(run_id, str(result.dir), "evaluation")
    except Exception as exc:  # tracking never fails an evaluation already written
        warn(f"logging the evaluation to MLflow failed: {exc}")
        return None
    return run_id


def read_evaluation(run_dir: str | Path) -> dict[str, Any]:
    """A run's metrics.json (written by gradwise evaluate)."""
    path = Path(run_dir) / cal.EVALUATION / METRICS
    if not path.is_file():
        raise DataError(f"{path} does not exist: run gradwise evaluate {run_dir} first")
    return json.loads(path.read_text(encoding="utf-8"))
