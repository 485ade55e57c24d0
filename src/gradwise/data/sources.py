"""The data-set registry and ``load_data``: a name (or import path) plus kwargs in, a DataBundle out."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset

from gradwise.data.bundle import DataBundle
from gradwise.data.common import as_dataset, train_val_split
from gradwise.data.infer import describe, sample_pair
from gradwise.errors import ConfigError, DataError, did_you_mean
from gradwise.recipe import call_factory
from gradwise.registry import Registry, resolve

DATASETS: Registry[Callable[..., Any]] = Registry("dataset")


def check_kwargs(factory: Callable[..., Any], kwargs: dict[str, Any], name: str) -> None:
    """ConfigErrors naming ``data.kwargs.<arg>`` for unknown or missing arguments of ``factory``."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return  # no signature to check against (some builtins)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    allowed = [p.name for p in params.values() if p.kind in kinds]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key, value in kwargs.items():
        if key not in allowed and not takes_any:
            expected = f"an argument of data set {name!r} ({', '.join(allowed) or 'none'})"
            raise ConfigError(f"data.kwargs.{key}", value, expected, did_you_mean(key, allowed))
    for p in params.values():
        if p.kind in kinds and p.default is inspect.Parameter.empty and p.name not in kwargs:
            raise ConfigError(
                f"data.kwargs.{p.name}", None, f"a value: data set {name!r} requires it"
            )


def _is_dataset(obj: Any) -> bool:
    return isinstance(obj, Dataset)


def to_bundle(result: Any, name: str, val_fraction: float = 0.2, seed: int = 0) -> DataBundle:
    """Normalise what a data-set factory returned into a DataBundle with a complete DataInfo.

    Accepted: a DataBundle; a ``(train, val)`` pair of Datasets (``val`` may be None); a single
    Dataset (no validation set); an ``(X, y)`` pair of arrays, split here (stratified for class
    labels) with ``val_fraction`` and ``seed``.
    """
    if isinstance(result, DataBundle):
        if not result.info.n_train:
            result.info.n_train = len(result.train)
        if result.val is not None and not result.info.n_val:
            result.info.n_val = len(result.val)
        return result
    notes: list[str] = []
    if _is_dataset(result):
        train, val = result, None
        notes.append("the data source gave no validation set")
    elif isinstance(result, (tuple, list)) and len(result) == 2 and _is_dataset(result[0]):
        train, val = result
        if val is not None and not _is_dataset(val):
            raise DataError(
                f"data set {name!r} returned (train, {type(val).__name__}); expected a Dataset or None as val"
            )
    elif isinstance(result, (tuple, list)) and len(result) == 2:
        data = as_dataset(tuple(result))  # validates dtypes and lengths
        X, y = data.tensors
        train_pair, val_pair = train_val_split(X, y, val_fraction, seed)
        train, val = as_dataset(train_pair), (as_dataset(val_pair) if val_pair else None)
        notes.append(f"split by gradwise: val_fraction={val_fraction}, seed={seed}")
    else:
        raise DataError(
            f"data set {name!r} returned {type(result).__name__}; expected a DataBundle, "
            "a (train, val) pair of Datasets or an (X, y) pair of arrays"
        )
    info = describe(train, name)
    info.notes.extend(notes)
    if val is not None:
        info.n_val = len(val)
        x, y = sample_pair(val[0], name)
        if tuple(x.shape) != info.input_shape or tuple(y.shape) != info.target_shape:
            raise DataError(
                f"data set {name!r}: validation samples have input/target shapes {tuple(x.shape)}/{tuple(y.shape)} "
                f"but training samples {info.input_shape}/{info.target_shape}"
            )
    return DataBundle(train, val, info)


def load_data(
    name: str, kwargs: dict[str, Any] | None = None, *, trusted: bool = True
) -> DataBundle:
    """The DataBundle of data set ``name`` (registered, or an import path ``pkg.mod:factory``).

    ``kwargs`` are checked against the factory's signature first, so a typo gives a ConfigError
    naming ``data.kwargs.<arg>`` with a did-you-mean instead of a TypeError. ``trusted=False``
    refuses import paths (see :mod:`gradwise.trust`).
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(
            "data.name", name, "a registered data set or an import path 'module:factory'"
        )
    kwargs = dict(kwargs or {})
    factory = resolve(DATASETS, name, "data.name", trusted=trusted)
    check_kwargs(factory, kwargs, name)
    result = call_factory(factory, kwargs, "data.kwargs", name)  # wrong types: ConfigError
    short = name.rpartition(":")[2] if ":" in name else name
    return to_bundle(result, short, kwargs.get("val_fraction", 0.2), kwargs.get("seed", 0))
