"""What a data source hands to the trainer: train/validation datasets plus the facts models are sized from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset

IGNORE_INDEX = -100  # target positions that carry no loss (padding): torch's cross-entropy default


@dataclass
class DataInfo:
    """Facts about a data set that models and tasks are sized from (all per sample, no batch axis)."""

    name: str
    input_shape: tuple[int, ...]
    input_dtype: str  # "float32" for features/pixels, "int64" for token ids
    target_shape: tuple[int, ...]  # () for a class index or a scalar target
    target_dtype: str  # "int64" for class indices and tokens, "float32" otherwise
    task: str | None = None  # suggested task: binary | multiclass | multilabel | regression | lm
    num_classes: int | None = None
    vocab_size: int | None = None
    seq_len: int | None = None
    class_names: list[str] | None = None
    feature_names: list[str] | None = None
    n_train: int = 0
    n_val: int = 0
    # lowest and highest integer target (class index or token id, padding excluded) in the training
    # data, so labels are checked against the model's outputs before the first step; complete: False
    # when only a sample of the data was read (the rest is checked batch by batch)
    label_range: tuple[int, int] | None = None
    labels_complete: bool = True
    # how raw inputs were transformed (e.g. {"standardize": {"mean": [...], "std": [...]}}), so that
    # export and serving can apply the same preprocessing
    preprocessing: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class DataBundle:
    """A training set, an optional validation set and their :class:`DataInfo`."""

    train: Dataset
    val: Dataset | None
    info: DataInfo
