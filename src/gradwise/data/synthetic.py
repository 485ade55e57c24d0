"""Seeded synthetic data sets with learnable structure: quick to make, deterministic, any size.

Useful to check that a model and training loop can learn at all before touching real data.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from gradwise.data.bundle import DataBundle
from gradwise.data.common import (
    check_int,
    make_bundle,
    standardize,
    standardize_target,
    train_val_split,
)
from gradwise.data.sources import DATASETS
from gradwise.errors import ConfigError, did_you_mean

SEQUENCE_TASKS = ("classification", "lm")


def _check_fraction(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(f"data.kwargs.{key}", value, "a number in [0, 1]")
    return float(value)


def _features_bundle(
    name: str, x: np.ndarray, y: np.ndarray, task: str, val_fraction: float, seed: int, **info: Any
) -> DataBundle:
    """Split, standardise features (and regression targets) with train statistics, bundle."""
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(
        y, dtype=torch.int64 if task in ("binary", "multiclass") else torch.float32
    )
    (x_tr, y_tr), val = train_val_split(
        xt, yt, val_fraction, seed, stratify=task in ("binary", "multiclass")
    )
    x_va, y_va = val if val else (None, None)
    x_tr, x_va, record = standardize(x_tr, x_va)
    preprocessing: dict[str, Any] = {"standardize": record}
    if task == "regression":
        y_tr, y_va, preprocessing["target_standardize"] = standardize_target(y_tr, y_va)
    return make_bundle(
        name, (x_tr, y_tr), (x_va, y_va) if val else None, task, preprocessing=preprocessing, **info
    )


@DATASETS.register("synthetic_classification")
def synthetic_classification(
    n_samples: int = 1000,
    n_features: int = 20,
    n_classes: int = 3,
    n_informative: int | None = None,
    class_sep: float = 1.0,
    weights: list[float] | None = None,
    noise: float = 0.01,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> DataBundle:
    """Gaussian clusters, one per class (scikit-learn's ``make_classification``).

    ``n_informative`` features carry the signal (default half), two more are linear mixes of them,
    the rest are noise. ``weights`` gives class proportions (imbalance); ``noise`` is the fraction
    of labels flipped at random. Larger ``class_sep`` is easier.
    """
    n_samples, n_features = (
        check_int(n_samples, "n_samples", 2),
        check_int(n_features, "n_features", 1),
    )
    n_classes = check_int(n_classes, "n_classes", 2)
    needed = math.ceil(
        math.log2(n_classes)
    )  # one cluster per class needs 2**n_informative >= n_classes
    if n_informative is None:
        if needed > n_features:
            raise ConfigError(
                "data.kwargs.n_classes", n_classes, f"at most 2**n_features = {2**n_features}"
            )
        n_informative = max(needed, n_features // 2, 1)
    n_informative = check_int(n_informative, "n_informative")
    if not needed <= n_informative <= n_features:
        raise ConfigError(
            "data.kwargs.n_informative",
            n_informative,
            f"between log2(n_classes) = {needed} and n_features = {n_features}",
        )
    if weights is not None:
        if len(weights) != n_classes or any(w <= 0 for w in weights):
            raise ConfigError(
                "data.kwargs.weights", weights, f"{n_classes} positive class proportions"
            )
        weights = [w / sum(weights) for w in weights]
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=n_samples,
        n_features=n_features,
        n_informative=n_informative,
        n_redundant=min(2, n_features - n_informative),
        n_classes=n_classes,
        n_clusters_per_class=1,
        weights=weights,
        flip_y=_check_fraction(noise, "noise"),
        class_sep=class_sep,
        random_state=seed,
    )
    task = "binary" if n_classes == 2 else "multiclass"
    return _features_bundle(
        "synthetic_classification", x, y, task, val_fraction, seed, num_classes=n_classes
    )


@DATASETS.register("synthetic_regression")
def synthetic_regression(
    n_samples: int = 1000,
    n_features: int = 10,
    n_informative: int | None = None,
    n_targets: int = 1,
    noise: float = 0.1,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> DataBundle:
    """A random linear model of the features (scikit-learn's ``make_regression``) plus noise.

    ``noise`` is the noise std relative to the clean target's std, so the best achievable R^2 is
    about ``1 / (1 + noise**2)``. Targets are standardised with train statistics (recorded).
    """
    n_samples, n_features = (
        check_int(n_samples, "n_samples", 2),
        check_int(n_features, "n_features"),
    )
    n_targets = check_int(n_targets, "n_targets")
    n_informative = min(
        n_features, check_int(n_informative or max(1, n_features // 2), "n_informative")
    )
    from sklearn.datasets import make_regression

    x, y = make_regression(
        n_samples=n_samples,
        n_features=n_features,
        n_informative=n_informative,
        n_targets=n_targets,
        random_state=seed,
    )
    rng = np.random.default_rng(seed)
    y = y + _check_fraction(noise, "noise") * y.std(axis=0) * rng.standard_normal(y.shape)
    return _features_bundle("synthetic_regression", x, y, "regression", val_fraction, seed)


@DATASETS.register("synthetic_multilabel")
def synthetic_multilabel(
    n_samples: int = 1000,
    n_features: int = 20,
    n_classes: int = 5,
    n_labels: int = 2,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> DataBundle:
    """Bag-of-words-like counts with several labels per sample (``make_multilabel_classification``).

    Targets are float32 0/1 vectors of ``n_classes``; ``n_labels`` is the average labels per sample.
    """
    from sklearn.datasets import make_multilabel_classification

    x, y = make_multilabel_classification(
        n_samples=check_int(n_samples, "n_samples", 2),
        n_features=check_int(n_features, "n_features"),
        n_classes=check_int(n_classes, "n_classes", 2),
        n_labels=check_int(n_labels, "n_labels"),
        allow_unlabeled=False,
        random_state=seed,
    )
    return _features_bundle(
        "synthetic_multilabel", x, y, "multilabel", val_fraction, seed, num_classes=n_classes
    )


@DATASETS.register("synthetic_sequences")
def synthetic_sequences(
    n_samples: int = 1000,
    seq_len: int = 32,
    vocab_size: int = 20,
    task: str = "classification",
    n_classes: int = 2,
    noise: float = 0.1,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> DataBundle:
    """Token sequences (int64 ids) with a rule to learn.

    ``classification``: the label is how many times token 1 occurs (0 .. n_classes-1, balanced);
    with 2 classes, whether it occurs at all. Other positions hold tokens 2..vocab_size-1 (0 is
    left free for padding). ``lm``: each next token is a fixed random permutation of the current
    one, replaced by a random token with probability ``noise``; samples are ``x = s[:-1]``,
    ``y = s[1:]``.
    """
    n_samples, seq_len = check_int(n_samples, "n_samples", 2), check_int(seq_len, "seq_len", 2)
    vocab_size = check_int(vocab_size, "vocab_size", 3)
    if task not in SEQUENCE_TASKS:
        raise ConfigError(
            "data.kwargs.task",
            task,
            f"one of {', '.join(SEQUENCE_TASKS)}",
            did_you_mean(str(task), SEQUENCE_TASKS),
        )
    rng = np.random.default_rng(seed)
    if task == "lm":
        perm = rng.permutation(vocab_size)
        seqs = np.empty((n_samples, seq_len + 1), dtype=np.int64)
        seqs[:, 0] = rng.integers(0, vocab_size, n_samples)
        for t in range(seq_len):
            flip = rng.random(n_samples) < _check_fraction(noise, "noise")
            seqs[:, t + 1] = np.where(
                flip, rng.integers(0, vocab_size, n_samples), perm[seqs[:, t]]
            )
        x, y = torch.from_numpy(seqs[:, :-1].copy()), torch.from_numpy(seqs[:, 1:].copy())
        (x_tr, y_tr), val = train_val_split(x, y, val_fraction, seed, stratify=False)
        return make_bundle(
            "synthetic_sequences", (x_tr, y_tr), val, "lm", vocab_size=vocab_size, seq_len=seq_len
        )
    n_classes = check_int(n_classes, "n_classes", 2)
    if n_classes - 1 > seq_len:
        raise ConfigError(
            "data.kwargs.n_classes",
            n_classes,
            f"at most seq_len + 1 = {seq_len + 1} (a count of token 1)",
        )
    x = rng.integers(2, vocab_size, (n_samples, seq_len))
    y = rng.permutation(np.arange(n_samples) % n_classes)
    for i, count in enumerate(y):
        x[i, rng.choice(seq_len, size=count, replace=False)] = 1
    (x_tr, y_tr), val = train_val_split(
        torch.from_numpy(x), torch.from_numpy(y), val_fraction, seed
    )
    task_name = "binary" if n_classes == 2 else "multiclass"
    return make_bundle(
        "synthetic_sequences",
        (x_tr, y_tr),
        val,
        task_name,
        num_classes=n_classes,
        vocab_size=vocab_size,
        seq_len=seq_len,
        notes=["label = number of occurrences of token 1"],
    )


@DATASETS.register("synthetic_images")
def synthetic_images(
    n_samples: int = 1000,
    channels: int = 1,
    size: int = 16,
    n_classes: int = 4,
    noise: float = 0.3,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> DataBundle:
    """``[channels, size, size]`` images: class ``k`` is a blob at the k-th of ``n_classes`` spots on a circle.

    Each image is its class blob (with a per-class colour), shifted by up to ``size // 8`` pixels,
    plus Gaussian noise of std ``noise``, clipped to [0, 1] and then standardised per channel with
    train statistics, like ``image_folder``. Learnable by an MLP; easier for a CNN.
    """
    n_samples, channels = check_int(n_samples, "n_samples", 2), check_int(channels, "channels")
    size, n_classes = check_int(size, "size", 4), check_int(n_classes, "n_classes", 2)
    rng = np.random.default_rng(seed)
    grid = np.arange(size) - (size - 1) / 2
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    angles = 2 * math.pi * np.arange(n_classes) / n_classes
    centres = np.stack([np.sin(angles), np.cos(angles)], axis=1) * size / 4
    blobs = np.exp(
        -((yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2)
        / (2 * (size / 8) ** 2)
    )
    colours = rng.uniform(0.5, 1.0, (n_classes, channels))
    templates = colours[:, :, None, None] * blobs[:, None]  # [K, C, H, W]
    y = rng.permutation(np.arange(n_samples) % n_classes)
    shift = max(1, size // 8)
    shifts = rng.integers(-shift, shift + 1, (n_samples, 2))
    x = np.stack(
        [np.roll(templates[k], tuple(s), axis=(1, 2)) for k, s in zip(y, shifts, strict=True)]
    )
    x = np.clip(x + _check_fraction(noise, "noise") * rng.standard_normal(x.shape), 0.0, 1.0)
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)
    (x_tr, y_tr), val = train_val_split(xt, yt, val_fraction, seed)
    x_tr, x_va, record = standardize(x_tr, val[0] if val else None, per="channel")
    return make_bundle(
        "synthetic_images",
        (x_tr, y_tr),
        (x_va, val[1]) if val else None,
        "binary" if n_classes == 2 else "multiclass",
        num_classes=n_classes,
        preprocessing={"standardize": record},
    )
