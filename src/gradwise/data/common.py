"""Arrays to datasets: dtype rules, the train/validation split and train-only standardisation.

Every built-in data set goes through these helpers, so they all follow the same conventions:
inputs are float32 (features, pixels) or int64 (token ids), targets int64 (class indices, tokens)
or float32 (regression, multilabel), and statistics are fitted on the train split only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from gradwise.data.bundle import DataBundle, DataInfo
from gradwise.data.infer import label_range
from gradwise.errors import ConfigError, DataError

ArrayLike = Any  # a torch.Tensor, a NumPy array or a nested list of numbers
Pair = tuple[ArrayLike, ArrayLike]


# --------------------------------------------------------------------------- dtypes and datasets


def _tensor(a: ArrayLike, what: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        t = a.detach()
    else:
        arr = np.asarray(a)
        if arr.dtype.kind not in "biuf":
            hint = (
                " (string labels: map them to class indices 0..K-1 first)"
                if arr.dtype.kind in "UO"
                else ""
            )
            raise DataError(f"{what} must be numeric; got an array of dtype {arr.dtype}{hint}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.is_complex():
        raise DataError(f"{what} must be real-valued; got dtype {t.dtype}")
    if t.ndim == 0:
        raise DataError(f"{what} must have a sample axis; got a scalar")
    return t


def input_tensor(x: ArrayLike, what: str = "X") -> torch.Tensor:
    """Inputs as a tensor: floats and bools become float32, integers int64 (token ids)."""
    t = _tensor(x, what)
    if t.is_floating_point() or t.dtype == torch.bool:
        return t.to(torch.float32)
    return t.to(torch.int64)


def target_tensor(y: ArrayLike, what: str = "y") -> torch.Tensor:
    """Targets as a tensor: integers become int64 (class indices), floats and bools float32.

    The shape is kept, so a 1-D regression target stays 1-D (per-sample shape ``()``).
    """
    t = _tensor(y, what)
    if t.is_floating_point() or t.dtype == torch.bool:
        return t.to(torch.float32)
    return t.to(torch.int64)


def as_dataset(obj: Dataset | Pair) -> Dataset:
    """A torch Dataset as is, or an ``(X, y)`` pair of tensors/arrays as a TensorDataset.

    Float inputs become float32 and integer inputs int64; integer targets become int64 and float
    targets float32 (see :func:`input_tensor`, :func:`target_tensor`).
    """
    if isinstance(obj, Dataset):
        return obj
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        x, y = input_tensor(obj[0], "X"), target_tensor(obj[1], "y")
        if len(x) != len(y):
            raise DataError(
                f"X has {len(x)} samples but y has {len(y)}; their first dimensions must match"
            )
        if len(x) == 0:
            raise DataError("X and y are empty; a data set needs at least one sample")
        return TensorDataset(x, y)
    raise DataError(
        f"expected a torch Dataset or an (X, y) pair of arrays; got {type(obj).__name__}"
    )


# --------------------------------------------------------------------------- splitting


def check_val_fraction(val_fraction: float) -> float:
    """``val_fraction`` as a float in [0, 1); a ConfigError naming ``data.kwargs.val_fraction`` otherwise."""
    if (
        isinstance(val_fraction, bool)
        or not isinstance(val_fraction, (int, float))
        or not 0 <= val_fraction < 1
    ):
        raise ConfigError("data.kwargs.val_fraction", val_fraction, "a number in [0, 1), e.g. 0.2")
    return float(val_fraction)


def _class_labels(y: ArrayLike | None) -> np.ndarray | None:
    """``y`` as 1-D class labels when it looks like classification (integers, bools, strings)."""
    if y is None:
        return None
    arr = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    return arr if arr.ndim == 1 and arr.dtype.kind in "biuUSO" else None


def split_indices(
    n: int,
    y: ArrayLike | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    stratify: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and validation indices of ``n`` samples (scikit-learn's ``train_test_split``).

    Stratified by ``y`` when asked and ``y`` holds class labels, so both splits keep the class
    proportions; falls back to a plain shuffled split when a class is too rare to stratify. The
    validation part has ``ceil(val_fraction * n)`` samples (empty for ``val_fraction=0``).
    """
    val_fraction = check_val_fraction(val_fraction)
    idx = np.arange(n)
    if val_fraction == 0:
        return idx, idx[:0]
    n_val = math.ceil(val_fraction * n)
    if n < 2 or n_val >= n:
        raise DataError(
            f"cannot split {n} samples with val_fraction={val_fraction}: too few samples"
        )
    from sklearn.model_selection import train_test_split

    labels = _class_labels(y) if stratify else None
    if labels is not None:
        _, counts = np.unique(labels, return_counts=True)
        if counts.min() < 2 or min(n_val, n - n_val) < len(counts):
            labels = None  # too rare to stratify
    train, val = train_test_split(
        idx, test_size=n_val, random_state=seed, shuffle=True, stratify=labels
    )
    return np.sort(train), np.sort(val)


def _take(a: ArrayLike, idx: np.ndarray) -> ArrayLike:
    if isinstance(a, torch.Tensor):
        return a[torch.from_numpy(idx).to(a.device)]
    return np.asarray(a)[idx]


def train_val_split(
    X: ArrayLike, y: ArrayLike, val_fraction: float = 0.2, seed: int = 0, stratify: bool = True
) -> tuple[Pair, Pair | None]:
    """``((X_train, y_train), (X_val, y_val))``, stratified by ``y`` for class labels.

    The validation pair is None when ``val_fraction`` is 0. Same seed, same split.
    """
    if len(X) != len(y):
        raise DataError(
            f"X has {len(X)} samples but y has {len(y)}; their first dimensions must match"
        )
    train, val = split_indices(len(X), y, val_fraction, seed, stratify)
    train_pair = (_take(X, train), _take(y, train))
    return train_pair, ((_take(X, val), _take(y, val)) if len(val) else None)


# --------------------------------------------------------------------------- standardisation


def fit_standardize(x: torch.Tensor, dims: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of ``x`` over ``dims`` (kept as size-1 axes); constant parts get std 1."""
    x64 = x.to(torch.float64)
    mean = x64.mean(dim=tuple(dims), keepdim=True)
    std = x64.std(dim=tuple(dims), keepdim=True, unbiased=False)
    std = torch.where(std < 1e-8, torch.ones_like(std), std)
    return mean, std


def standardize(
    train: torch.Tensor, val: torch.Tensor | None, per: str = "feature"
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """Standardise with the train split's statistics only, and the record of what was done.

    ``per`` says what each statistic covers: ``"feature"`` (one per column of ``[N, F]`` data, or
    per element for other shapes), ``"channel"`` (one per channel of ``[N, C, H, W]`` images) or
    ``"all"`` (a single mean and std). The record is ``{"mean": [...], "std": [...], "per": per}``;
    serving applies ``(x - mean) / std`` to raw samples broadcasting the same way.
    """
    dims = {"feature": [0], "channel": [0, *range(2, train.ndim)], "all": list(range(train.ndim))}[
        per
    ]
    mean, std = fit_standardize(train, dims)

    def apply(x: torch.Tensor) -> torch.Tensor:
        return ((x.to(torch.float64) - mean) / std).to(torch.float32)

    record = {
        "mean": mean.squeeze(0).flatten().tolist(),
        "std": std.squeeze(0).flatten().tolist(),
        "per": per,
    }
    if per == "feature" and train.ndim > 2:
        record["shape"] = list(train.shape[1:])
    return apply(train), (apply(val) if val is not None else None), record


def standardize_target(
    train: torch.Tensor, val: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """Standardise regression targets with train statistics; predictions map back as ``p * std + mean``."""
    train_s, val_s, record = standardize(train, val, per="all" if train.ndim == 1 else "feature")
    if train.ndim == 1:
        record = {"mean": record["mean"][0], "std": record["std"][0]}
    return train_s, val_s, record


# --------------------------------------------------------------------------- bundles


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def make_bundle(
    name: str,
    train: Pair,
    val: Pair | None,
    task: str,
    **info: Any,
) -> DataBundle:
    """A DataBundle of TensorDatasets with a DataInfo filled from the tensors and ``info``."""
    x_tr, y_tr = input_tensor(train[0]), target_tensor(train[1])
    val_ds = TensorDataset(input_tensor(val[0]), target_tensor(val[1])) if val is not None else None
    if task == "binary":
        info.setdefault("num_classes", 2)
    elif task == "multiclass" and "num_classes" not in info:
        info["num_classes"] = int(y_tr.max()) + 1
    elif task == "multilabel":
        info.setdefault("num_classes", int(y_tr.shape[-1]))
    data_info = DataInfo(
        name=name,
        input_shape=tuple(x_tr.shape[1:]),
        input_dtype=_dtype(x_tr),
        target_shape=tuple(y_tr.shape[1:]),
        target_dtype=_dtype(y_tr),
        task=task,
        n_train=len(x_tr),
        n_val=len(val_ds) if val_ds is not None else 0,
        label_range=label_range(y_tr),
        **info,
    )
    return DataBundle(TensorDataset(x_tr, y_tr), val_ds, data_info)


def check_int(value: Any, key: str, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``; a ConfigError naming ``data.kwargs.<key>`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"data.kwargs.{key}", value, f"an integer >= {minimum}")
    return int(value)


def existing_file(path: str | Path, key: str = "path") -> Path:
    """``path`` as a Path to an existing file; a DataError naming it otherwise."""
    if not isinstance(path, (str, Path)):
        raise ConfigError(f"data.kwargs.{key}", path, "a file path")
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise DataError(f"data.kwargs.{key}: {p} {what}")
    return p
