"""Facts about a user's Dataset: shapes and dtypes from the first sample, task and classes from the targets."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Subset

from gradwise.data.bundle import IGNORE_INDEX, DataInfo
from gradwise.errors import DataError

MAX_SCAN = 10_000
ITER_SCAN = 1_000  # samples of a stream read up front (a stream may be slow or endless)


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    try:
        return value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(
            f"the {what} of a sample is not a tensor or array of numbers: {exc}"
        ) from None


def sample_pair(
    sample: Any, name: str, label_key: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A sample's main input and its target as tensors: ``(input, target)``, ``(inputs..., target)``
    or a mapping with a label key (see gradwise.batch); a DataError naming the data set otherwise."""
    from gradwise.batch import LABEL_KEYS, split_batch

    if isinstance(sample, (tuple, list)) and len(sample) >= 2:
        return _as_tensor(sample[0], "input"), _as_tensor(sample[-1], "target")
    if isinstance(sample, Mapping):
        parts = split_batch(sample, label_key)
        inputs = next(iter(parts.kwargs.values()), None)
        if parts.target is not None and inputs is not None:
            return _as_tensor(inputs, "input"), _as_tensor(parts.target, "target")
    raise DataError(
        f"data set {name!r}: a sample must be (input, target), (inputs..., target) or a mapping "
        f"with a {'/'.join(LABEL_KEYS)} key; got {type(sample).__name__}"
        + (f" of length {len(sample)}" if isinstance(sample, (tuple, list)) else "")
    )


def _all_targets(
    dataset: Dataset, max_scan: int, name: str, label_key: str | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """(targets, inputs or None, complete?): cheap for TensorDataset/.targets/Subset, else a scan."""
    if isinstance(dataset, Subset):
        targets, inputs, complete = _all_targets(dataset.dataset, max_scan, name, label_key)
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
    if isinstance(dataset, IterableDataset):  # a stream: the first samples tell
        samples = [sample_pair(s, name, label_key) for s in itertools.islice(dataset, max_scan)]
        n, complete = len(samples), False
    else:
        n = min(len(dataset), max_scan)
        samples = [sample_pair(dataset[i], name, label_key) for i in range(n)]
        complete = n == len(dataset)
    if not samples:
        raise DataError(f"data set {name!r} is empty")
    try:
        targets = torch.stack([y for _, y in samples])
        inputs = (
            torch.stack([x for x, _ in samples]) if samples[0][0].dtype == torch.int64 else None
        )
    except RuntimeError as exc:
        raise DataError(f"data set {name!r}: samples have different shapes: {exc}") from None
    return targets, inputs, complete


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


def describe(
    dataset: Dataset, name: str = "data", max_scan: int = MAX_SCAN, label_key: str | None = None
) -> DataInfo:
    """A DataInfo for a user Dataset of samples (see :func:`sample_pair`).

    Input and target shape/dtype come from the first sample. The targets, which decide the
    suggested task and the number of classes (or the vocabulary size), are read at once from a
    TensorDataset or a ``.targets`` attribute, otherwise from up to ``max_scan`` samples; an
    IterableDataset (a stream, without a length) is judged by its first ``ITER_SCAN`` samples.
    """
    streaming = isinstance(dataset, IterableDataset)
    if streaming:
        n = None
    else:
        try:
            n = len(dataset)
        except TypeError:
            raise DataError(
                f"data set {name!r} has no length: give a map-style Dataset or an IterableDataset"
            ) from None
        if n == 0:
            raise DataError(f"data set {name!r} is empty")
    targets, inputs, complete = _all_targets(
        dataset, ITER_SCAN if streaming else max_scan, name, label_key
    )
    first = next(iter(dataset)) if streaming else dataset[0]
    x, y = sample_pair(first, name, label_key)
    facts = infer_task(x, y, targets, inputs)
    notes = facts.pop("notes")
    if not complete:
        of = f"of {n} samples" if n is not None else "samples of the stream"
        notes.append(f"task and classes inferred from the first {len(targets)} {of}")
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
        n_train=n or 0,
        notes=notes,
        label_range=label_range(targets),
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
