"""Tabular files: ``csv`` (header row, numeric features) and ``numpy`` (``.npz`` or ``.npy`` pairs)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradwise.data import common  # common.standardize: csv()'s argument shadows the name
from gradwise.data.bundle import DataBundle
from gradwise.data.common import (
    existing_file,
    input_tensor,
    make_bundle,
    standardize_target,
    target_tensor,
    train_val_split,
)
from gradwise.data.infer import describe
from gradwise.data.sources import DATASETS
from gradwise.errors import ConfigError, DataError, did_you_mean

TASKS = ("binary", "multiclass", "classification", "regression")
MAX_CLASSES_GUESS = 20  # an integer target with at most this many values is guessed to be classes


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_csv(path: Path, delimiter: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and ``(line number, cells)`` rows, blank lines skipped."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = [h.strip() for h in next(reader, [])]
        rows = [
            (reader.line_num, [c.strip() for c in row])
            for row in reader
            if any(c.strip() for c in row)
        ]
    if not header:
        raise DataError(f"{path} is empty; expected a header row of column names, then data rows")
    if all(_is_number(h) for h in header):
        raise DataError(
            f"{path}: the first row {header[:5]} looks like data; add a header row of column names"
        )
    duplicates = sorted({h for h in header if header.count(h) > 1})
    if duplicates:
        raise DataError(f"{path}: duplicate column names in the header: {duplicates}")
    if not rows:
        raise DataError(f"{path} has a header but no data rows")
    for line, row in rows:
        if len(row) != len(header):
            raise DataError(
                f"{path} line {line}: {len(row)} values but the header has {len(header)} columns"
            )
    return header, rows


def _column_index(header: list[str], column: str, path: Path, role: str) -> int:
    if column not in header:
        hint = did_you_mean(str(column), header) or f"columns: {', '.join(header)}"
        raise DataError(f"{path}: no {role} column {column!r}; {hint}")
    return header.index(column)


def _numeric_column(
    rows: list[tuple[int, list[str]]], j: int, column: str, path: Path
) -> np.ndarray:
    """Column ``j`` as float64; a DataError naming the column, row and line of the first bad cell."""
    cells = [row[j] for _, row in rows]
    try:
        values = np.asarray(cells, dtype=np.float64)
        if np.isfinite(values).all():
            return values
    except ValueError:
        pass
    for i, (cell, (line, _)) in enumerate(zip(cells, rows, strict=True), start=1):
        where = f"{path}: column {column!r}, row {i} (line {line})"
        if not cell:
            raise DataError(
                f"{where} is empty; missing values are not supported, fill or drop them"
            )
        if not _is_number(cell) or not np.isfinite(float(cell)):
            raise DataError(
                f"{where}: {cell!r} is not a finite number; encode categorical columns as numbers "
                "or leave them out with features=[...]"
            )
    raise AssertionError("unreachable")  # pragma: no cover


def _encode_target(
    cells: list[str], column: str, task: str | None, path: Path
) -> tuple[np.ndarray, str, list[str] | None, str]:
    """(y, task, class names, how the task was decided) for the target column's raw cells."""
    if task is not None and task not in TASKS:
        raise ConfigError(
            "data.kwargs.task",
            task,
            f"one of {', '.join(TASKS)} or None",
            did_you_mean(task, TASKS),
        )
    if any(not c for c in cells):
        row = next(i for i, c in enumerate(cells, start=1) if not c)
        raise DataError(
            f"{path}: target column {column!r}, row {row} is empty; drop unlabelled rows"
        )
    numeric = all(_is_number(c) for c in cells)
    values = np.asarray([float(c) for c in cells]) if numeric else None
    if task == "regression" or (task is None and numeric):
        if not numeric:
            bad = next(c for c in cells if not _is_number(c))
            raise DataError(
                f"{path}: target column {column!r} has non-numeric value {bad!r}; regression needs numbers"
            )
        distinct = np.unique(values)
        integral = bool(np.all(distinct == np.round(distinct)))
        if task == "regression" or not integral or len(distinct) > MAX_CLASSES_GUESS:
            why = (
                "task='regression'"
                if task
                else "numeric target with many distinct or fractional values"
            )
            return values.astype(np.float32), "regression", None, why
    if numeric:
        distinct = np.unique(values)
        names = [str(int(v)) if v == round(v) else str(v) for v in distinct]
        y = np.searchsorted(distinct, values)
        why = f"task={task!r}" if task else f"integer target with {len(distinct)} distinct values"
    else:
        names = sorted(set(cells))
        y = np.unique(cells, return_inverse=True)[1]
        why = f"task={task!r}" if task else f"string target with {len(names)} distinct values"
    if len(names) < 2:
        raise DataError(
            f"{path}: target column {column!r} has a single class {names[0]!r}; need at least two"
        )
    if task == "binary" and len(names) != 2:
        raise DataError(
            f"{path}: task='binary' but target column {column!r} has {len(names)} classes"
        )
    return y.astype(np.int64), ("binary" if len(names) == 2 else "multiclass"), names, why


@DATASETS.register("csv")
def csv_file(
    path: str,
    target: str,
    features: list[str] | None = None,
    task: str | None = None,
    standardize: bool = True,
    delimiter: str = ",",
    val_fraction: float = 0.2,
    seed: int = 0,
) -> DataBundle:
    """A CSV file with a header row: ``target`` column against numeric ``features`` (default: all others).

    String targets become class indices (``class_names`` sorted); numeric targets are classes when
    integral with at most 20 values, otherwise regression (``task`` overrides: binary, multiclass,
    classification, regression). With ``standardize``, features, and regression targets, are
    standardised with the train split's statistics.
    """
    p = existing_file(path)
    header, rows = _read_csv(p, delimiter)
    t = _column_index(header, target, p, "target")
    if features is None:
        features = [h for h in header if h != target]
    elif isinstance(features, str) or not isinstance(features, (list, tuple)):
        raise ConfigError(
            "data.kwargs.features",
            features,
            "a list of column names, or None for all but the target",
        )
    if target in features:
        raise DataError(f"{p}: the target column {target!r} is also listed in features")
    if not features:
        raise DataError(f"{p}: no feature columns besides the target {target!r}")
    x = np.stack(
        [_numeric_column(rows, _column_index(header, f, p, "feature"), f, p) for f in features],
        axis=1,
    )
    y, task, class_names, why = _encode_target([row[t] for _, row in rows], target, task, p)
    xt, yt = input_tensor(x.astype(np.float32)), target_tensor(y)
    (x_tr, y_tr), val = train_val_split(xt, yt, val_fraction, seed, stratify=task != "regression")
    x_va, y_va = val if val else (None, None)
    preprocessing: dict[str, Any] = {}
    if standardize:
        x_tr, x_va, preprocessing["standardize"] = common.standardize(x_tr, x_va)
        if task == "regression":
            y_tr, y_va, preprocessing["target_standardize"] = standardize_target(y_tr, y_va)
    return make_bundle(
        p.stem,
        (x_tr, y_tr),
        (x_va, y_va) if val else None,
        task=task,
        num_classes=len(class_names) if class_names else None,
        class_names=class_names,
        feature_names=list(features),
        preprocessing=preprocessing,
        notes=[f"task {task}: {why}"],
    )


def _npz_array(archive: Any, key: str, kwarg: str, path: Path) -> np.ndarray:
    if key not in archive.files:
        hint = (
            did_you_mean(str(key), archive.files)
            or f"arrays in the file: {', '.join(archive.files)}"
        )
        raise DataError(f"{path} has no array {key!r} (data.kwargs.{kwarg}); {hint}")
    return archive[key]


def _load_array(path: Path, what: str) -> Any:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"cannot read {what} {path}: {exc}") from None


@DATASETS.register("numpy")
def numpy_files(
    path: str | None = None,
    x_key: str = "X",
    y_key: str = "y",
    x: str | None = None,
    y: str | None = None,
    standardize: bool = False,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> DataBundle:
    """Arrays from an ``.npz`` file (keys ``x_key``, ``y_key``) or from two ``.npy`` files ``x`` and ``y``.

    The task is inferred from the targets as in :func:`gradwise.data.describe`; the split is
    stratified for class labels. ``standardize=True`` standardises float features per feature.
    """
    if (path is None) == (x is None or y is None):
        raise ConfigError(
            "data.kwargs.path",
            path,
            "either path='data.npz' or x='X.npy' and y='y.npy' (not both, not neither)",
        )
    if path is not None:
        p = existing_file(path)
        with _load_array(p, "array file") as archive:
            if not hasattr(archive, "files"):
                raise DataError(
                    f"{p} is a single array; use numpy(x=..., y=...) for .npy files or save both in an .npz"
                )
            x_arr, y_arr = (
                _npz_array(archive, x_key, "x_key", p),
                _npz_array(archive, y_key, "y_key", p),
            )
        name = p.stem
    else:
        x_path, y_path = existing_file(x, "x"), existing_file(y, "y")
        x_arr, y_arr = _load_array(x_path, "array file"), _load_array(y_path, "array file")
        name = x_path.stem
    xt, yt = input_tensor(x_arr, "X"), target_tensor(y_arr, "y")
    if len(xt) != len(yt):
        raise DataError(
            f"X has {len(xt)} samples but y has {len(yt)}; their first dimensions must match"
        )
    (x_tr, y_tr), val = train_val_split(xt, yt, val_fraction, seed)
    x_va, y_va = val if val else (None, None)
    preprocessing: dict[str, Any] = {}
    if standardize and x_tr.is_floating_point():
        x_tr, x_va, preprocessing["standardize"] = common.standardize(x_tr, x_va)
    train_ds = torch.utils.data.TensorDataset(x_tr, y_tr)
    val_ds = torch.utils.data.TensorDataset(x_va, y_va) if val else None
    info = describe(train_ds, name)
    info.n_val = len(val_ds) if val_ds is not None else 0
    info.preprocessing = preprocessing
    return DataBundle(train_ds, val_ds, info)
