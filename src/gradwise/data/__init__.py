"""Data sources: built-in and user data sets as a :class:`DataBundle` (train, val, :class:`DataInfo`).

``load_data("digits")`` or ``load_data("csv", {"path": "x.csv", "target": "label"})`` gives a
bundle; ``load_data("my.module:make_data")`` calls a user factory and normalises what it returns.
``as_dataset`` and ``describe`` turn user arrays and Datasets into the same form.

Conventions shared by all built-ins:

* arguments ``val_fraction`` (default 0.2) and ``seed`` (default 0); same seed, same split;
  classification splits are stratified;
* inputs float32 (or int64 token ids), targets int64 class indices / tokens or float32;
* statistics are fitted on the train split only. ``info.preprocessing`` records, in the order
  applied to a raw sample: ``resize`` [H, W] and ``color`` ("L"/"RGB") for images, ``scale``
  (multiply raw values), ``standardize`` ``{"mean", "std", "per"}`` with ``per`` one of
  ``feature`` (last axis), ``channel`` (axis 0 of ``[C, H, W]``) or ``all`` (one value), and
  ``target_standardize`` ``{"mean", "std"}`` for regression targets (map predictions back with
  ``p * std + mean``); ``char_vocab`` for character-level text (token ``i`` is ``vocab[i]``).

Heavy libraries (scikit-learn, PIL) are imported only by the data sets that need them.
"""

from __future__ import annotations

from gradwise.data import images, sklearn_sets, synthetic, tabular, text  # noqa: F401  (register built-ins)
from gradwise.data.bundle import DataBundle, DataInfo
from gradwise.data.common import as_dataset, split_indices, train_val_split
from gradwise.data.infer import describe
from gradwise.data.sources import DATASETS, load_data
from gradwise.data.text import TokenWindows, decode_chars, encode_chars

__all__ = [
    "DATASETS",
    "DataBundle",
    "DataInfo",
    "TokenWindows",
    "as_dataset",
    "decode_chars",
    "describe",
    "encode_chars",
    "load_data",
    "split_indices",
    "train_val_split",
]
