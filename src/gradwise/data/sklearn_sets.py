"""scikit-learn's bundled data sets (no download): digits, iris, wine, breast_cancer, diabetes.

Features are standardised with the train split's statistics only, so nothing about the
validation samples leaks into training; the statistics are recorded in ``info.preprocessing``.
"""

from __future__ import annotations

from typing import Any

import torch

from gradwise.data.bundle import DataBundle
from gradwise.data.common import make_bundle, standardize, standardize_target, train_val_split
from gradwise.data.sources import DATASETS


def _load(loader: str, **kwargs: Any) -> Any:
    from sklearn import datasets

    return getattr(datasets, loader)(**kwargs)


def _tabular_classification(name: str, loader: str, val_fraction: float, seed: int) -> DataBundle:
    data = _load(loader)
    x = torch.as_tensor(data.data, dtype=torch.float32)
    y = torch.as_tensor(data.target, dtype=torch.int64)
    (x_tr, y_tr), val = train_val_split(x, y, val_fraction, seed, stratify=True)
    x_tr, x_va, record = standardize(x_tr, val[0] if val else None)
    classes = [str(c) for c in data.target_names]
    return make_bundle(
        name,
        (x_tr, y_tr),
        (x_va, val[1]) if val else None,
        task="binary" if len(classes) == 2 else "multiclass",
        num_classes=len(classes),
        class_names=classes,
        feature_names=[str(f) for f in data.feature_names],
        preprocessing={"standardize": record},
    )


@DATASETS.register("iris")
def iris(val_fraction: float = 0.2, seed: int = 0) -> DataBundle:
    """Iris flowers: 150 samples, 4 features, 3 classes (stratified split)."""
    return _tabular_classification("iris", "load_iris", val_fraction, seed)


@DATASETS.register("wine")
def wine(val_fraction: float = 0.2, seed: int = 0) -> DataBundle:
    """Wine cultivars: 178 samples, 13 features, 3 classes (stratified split)."""
    return _tabular_classification("wine", "load_wine", val_fraction, seed)


@DATASETS.register("breast_cancer")
def breast_cancer(val_fraction: float = 0.2, seed: int = 0) -> DataBundle:
    """Wisconsin breast cancer: 569 samples, 30 features, binary (malignant/benign)."""
    return _tabular_classification("breast_cancer", "load_breast_cancer", val_fraction, seed)


@DATASETS.register("digits")
def digits(val_fraction: float = 0.2, seed: int = 0, flatten: bool = False) -> DataBundle:
    """8x8 handwritten digits: 1797 images ``[1, 8, 8]`` (or 64 features with ``flatten=True``), 10 classes.

    Pixels (0..16) are scaled to [0, 1], then standardised with one mean and std taken over all
    pixels of the train split (per-pixel statistics would blow up the always-blank border pixels).
    """
    data = _load("load_digits")
    x = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(data.target, dtype=torch.int64)
    (x_tr, y_tr), val = train_val_split(x, y, val_fraction, seed, stratify=True)
    x_tr, x_va, record = standardize(x_tr, val[0] if val else None, per="channel")
    if flatten:
        x_tr = x_tr.flatten(1)
        x_va = x_va.flatten(1) if x_va is not None else None
        record["per"] = "all"
    return make_bundle(
        "digits",
        (x_tr, y_tr),
        (x_va, val[1]) if val else None,
        task="multiclass",
        num_classes=10,
        class_names=[str(c) for c in data.target_names],
        preprocessing={"scale": 1 / 16, "standardize": record},
    )


@DATASETS.register("diabetes")
def diabetes(val_fraction: float = 0.2, seed: int = 0) -> DataBundle:
    """Diabetes progression: 442 samples, 10 features, regression.

    scikit-learn's default copy is centred and scaled with statistics of all 442 samples (each
    column has unit norm, std about 0.048): too small a scale for a network and computed with the
    validation rows. gradwise loads the raw values instead and standardises features and target
    with the train split's statistics; predictions map back as ``p * std + mean``.
    """
    data = _load("load_diabetes", scaled=False)
    x = torch.as_tensor(data.data, dtype=torch.float32)
    y = torch.as_tensor(data.target, dtype=torch.float32)
    (x_tr, y_tr), val = train_val_split(x, y, val_fraction, seed, stratify=False)
    x_tr, x_va, record = standardize(x_tr, val[0] if val else None)
    y_tr, y_va, target_record = standardize_target(y_tr, val[1] if val else None)
    return make_bundle(
        "diabetes",
        (x_tr, y_tr),
        (x_va, y_va) if val else None,
        task="regression",
        feature_names=[str(f) for f in data.feature_names],
        preprocessing={"standardize": record, "target_standardize": target_record},
        notes=["raw features (scaled=False) standardised with train statistics; the target too"],
    )
