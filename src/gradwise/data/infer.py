"""Facts about a user's Dataset: shapes and dtypes from the first sample, task and classes from the targets."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from gradwise.data.bundle import IGNORE_INDEX, DataInfo
from gradwise.errors import DataError

MAX_SCAN = 10_000


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    try:
        return value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(
            f"the {what} of a sample is not a tensor or array of numbers: {exc}"
        ) from None


def sample_pair(sample: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A sample as an (input, target) pair of tensors; a DataError naming the data set otherwise."""
    if not isinstance(sample, (tuple, list)) or len(sample) != 2:
        raise DataError(
            f"data set {name!r}: a sample must be an (input, target) pair; got {type(sample).__name__}"
            + (f" of length {len(sample)}" if isinstance(sample, (tuple, list)) else "")
        )
    return _as_tensor(sample[0], "input"), _as_tensor(sample[1], "target")


def _all_targets(
    dataset: Dataset, max_scan: int, name: str
) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """(targets, inputs or None, complete?): cheap for TensorDataset/.targets/Subset, else a scan."""
    if isinstance(dataset, Subset):
        targets, inputs, complete = _all_targets(dataset.dataset, max_scan, name)
        if complete:
            idx = torch.as_tensor(dataset.indices, dtype=torch.int64)
            return targets[idx], (inputs[idx] if inputs is not None else None), True
    tensors = getattr(dataset, "tensors", None)
    if (
        isinstance(tensors, (tuple, list))
        and len(tensors) >= 2
        and isinstance(tensors[-1], torch.Tensor)
    ):
        return tensors[-1], tensors[0], True
    if getattr(dataset, "targets", None) is not None:
        return _as_tensor(dataset.targets, "targets"), None, True
    n = min(len(dataset), max_scan)
    samples = [sample_pair(dataset[i], name) for i in range(n)]
    try:
        targets = torch.stack([y for _, y in samples])
        inputs = (
            torch.stack([x for x, _ in samples]) if samples[0][0].dtype == torch.int64 else None
        )
    except RuntimeError as exc:
        raise DataError(f"data set {name!r}: samples have different shapes: {exc}") from None
    return targets, inputs, n == len(dataset)


def _is_binary_valued(t: torch.Tensor) -> bool:
    return bool(((t == 0) | (t == 1)).all())


def infer_task(
    x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor | None
) -> dict[str, Any]:
    """The suggested task and its sizes, from one sample (x, y) and the scanned targets.

    int64 tokens with a target of the same shape -> lm; integer class index -> binary (2 classes)
    or multiclass; 0/1 multi-column targets -> multilabel; other floats -> regression.
    """
    y_int = not y.is_floating_point() and y.dtype != torch.bool
    notes: list[str] = []
    if (
        y_int
        and not x.is_floating_point()
        and x.dtype != torch.bool
        and x.ndim >= 1
        and x.shape == y.shape
    ):
        valid = targets[targets >= 0]  # negative targets are ignore_index positions
        top = max(
            int(valid.max()) if valid.numel() else 0, int(inputs.max()) if inputs is not None else 0
        )
        return {"task": "lm", "vocab_size": top + 1, "seq_len": int(x.shape[-1]), "notes": notes}
    per_sample = y.numel()
    if per_sample > 1 and _is_binary_valued(targets):
        return {"task": "multilabel", "num_classes": per_sample, "notes": notes}
    if not y_int and y.dtype != torch.bool:
        if per_sample == 1 and _is_binary_valued(targets):
            notes.append(
                "float targets are all 0 or 1: suggested binary classification, not regression"
            )
            return {"task": "binary", "num_classes": 2, "notes": notes}
        return {"task": "regression", "notes": notes}
    t = targets.to(torch.int64)
    if int(t.min()) < 0:
        notes.append(
            f"targets contain negative values (min {int(t.min())}); class indices must be 0..K-1"
        )
    num_classes = int(t.max()) + 1
    seen = int(torch.unique(t[t >= 0]).numel())
    if seen < num_classes:
        notes.append(
            f"only {seen} of the {num_classes} class indices 0..{num_classes - 1} occur in the targets scanned"
        )
    if per_sample > 1:
        notes.append(
            f"targets have shape {tuple(y.shape)}: treated as one class index per position"
        )
    task = "binary" if num_classes <= 2 else "multiclass"
    return {"task": task, "num_classes": max(num_classes, 2), "notes": notes}


def describe(dataset: Dataset, name: str = "data", max_scan: int = MAX_SCAN) -> DataInfo:
    """A DataInfo for a user Dataset of ``(input, target)`` samples.

    Input and target shape/dtype come from the first sample. The targets, which decide the
    suggested task and the number of classes (or the vocabulary size), are read at once from a
    TensorDataset or a ``.targets`` attribute, and otherwise from up to ``max_scan`` samples.
    """
    try:
        n = len(dataset)
    except TypeError:
        raise DataError(
            f"data set {name!r} has no length; gradwise needs a map-style Dataset"
        ) from None
    if n == 0:
        raise DataError(f"data set {name!r} is empty")
    x, y = sample_pair(dataset[0], name)
    targets, inputs, complete = _all_targets(dataset, max_scan, name)
    facts = infer_task(x, y, targets, inputs)
    notes = facts.pop("notes")
    if not complete:
        notes.append(f"task and classes inferred from the first {len(targets)} of {n} samples")
    info_labels = label_range(targets)
    classes = getattr(dataset, "classes", None)
    class_names = (
        [str(c) for c in classes] if isinstance(classes, (list, tuple)) and classes else None
    )
    return DataInfo(
        name=name,
        input_shape=tuple(x.shape),
        input_dtype=str(x.dtype).removeprefix("torch."),
        target_shape=tuple(y.shape),
        target_dtype=str(y.dtype).removeprefix("torch."),
        class_names=class_names,
        n_train=n,
        notes=notes,
        label_range=info_labels,
        labels_complete=complete,
        **facts,
    )


def label_range(targets: torch.Tensor) -> tuple[int, int] | None:
    """(lowest, highest) of integer targets, padding positions (-100) excluded; None for floats."""
    if targets.is_floating_point() or targets.dtype == torch.bool or targets.numel() == 0:
        return None
    labels = targets[targets != IGNORE_INDEX]
    if labels.numel() == 0:
        return None
    return int(labels.min()), int(labels.max())
