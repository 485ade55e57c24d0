"""Lineage: which data a run trained on, as a fingerprint that is cheap, deterministic and never
reads code from the data (no pickle).

``environment.json`` holds a run's lineage, written at run start (see :func:`write_environment`):
``"data"`` (below), ``"git"`` (commit, branch, dirty flag of the working directory's repository, or
null outside one) and ``"versions"`` (Python, gradwise and every dependency)::

    "data": {
      "train": {"sha256": "9f2c...", "method": "full", "samples": 1437, "hashed": 1437},
      "val": {"sha256": "...", "method": "sample", "samples": 250000, "hashed": 4096}
    }

How each split is hashed (``method``; SHA-256 over dtypes, shapes and raw bytes, in chunks):

- ``full``: in-memory tensors (``TensorDataset``, ``(X, y)`` arrays) up to :data:`FULL_BYTES` per
  split, byte for byte; one of gradwise's map-style data sets of at most :data:`DATASET_ITEMS`
  samples, every sample.
- ``sample``: larger tensors: :data:`SAMPLE_ROWS` evenly spaced rows, plus every tensor's shape;
  larger map-style Datasets (whose samples may each read a file): :data:`DATASET_ITEMS` evenly
  spaced samples, plus the length. A change outside the sample goes unseen; a changed size,
  shape, dtype, order or sampled sample does not.
- ``stream``: one of gradwise's streaming data sets: its first :data:`DATASET_ITEMS` samples;
  ``samples`` is null.
- ``not-read``: a Dataset or stream of the user's own (not tensors): ``sha256`` is null, as its
  samples are never read for lineage (a read may count, consume or signal); its length is kept.

Samples are read with the random generators seeded and restored afterwards, so random
augmentations give the same fingerprint every time and the run's own randomness is untouched.
A split that cannot be read or hashed (a sample of a type without a byte form) records
``"sha256": null`` and the reason, and the run goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import random
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

FULL_BYTES = 1 << 30
"""In-memory tensors up to this many bytes per split are hashed whole: SHA-256 runs at about
1 GB/s on one core, so at most about a second at run start."""
SAMPLE_ROWS = 4096
"""Rows hashed of larger tensors, evenly spaced."""
DATASET_ITEMS = 256
"""Samples read from a map-style Dataset or a stream (each may decode a file), evenly spaced; the
same number the advisor's facts read."""
CHUNK_BYTES = 16 << 20
"""Tensors are hashed in chunks of about this many bytes, so hashing never copies a whole split."""


class _Unhashable(Exception):
    """A sample of a type the fingerprint has no byte form for."""


def fingerprint(dataset: Any) -> dict[str, Any] | None:
    """The fingerprint of one split (a Dataset, DataLoader or None): ``{"sha256", "method",
    "samples", "hashed"}``, see the module's docstring; None for None."""
    if dataset is None:
        return None
    if isinstance(dataset, DataLoader):
        dataset = dataset.dataset
    try:
        with _seeded():
            tensors = getattr(dataset, "tensors", None)
            if _all_tensors(tensors):
                return _tensors(tensors)
            if not _readable(dataset):
                return _not_read(dataset)
            if isinstance(dataset, IterableDataset):
                items = itertools.islice(iter(dataset), DATASET_ITEMS)
                return _items(items, None, "stream")
            n = len(dataset)
            index = _spaced(n, DATASET_ITEMS)
            method = "full" if len(index) == n else "sample"
            return _items((dataset[int(i)] for i in index), n, method)
    except _Unhashable as exc:
        return {"sha256": None, "method": "unhashable", "reason": str(exc)}
    except Exception as exc:  # the user's dataset failed to read: lineage must not stop the run
        return {"sha256": None, "method": "unreadable", "reason": f"{type(exc).__name__}: {exc}"}


def _readable(dataset: Any) -> bool:
    """Whether reading samples for the fingerprint is free of side effects: gradwise's own data
    sets are; a user's Dataset or stream may count, consume or signal on each read (a stream
    from a queue loses what it yields), so its samples are never read for lineage."""
    return type(dataset).__module__.startswith("gradwise.")


def _not_read(dataset: Any) -> dict[str, Any]:
    try:
        n = len(dataset)
    except TypeError:
        n = None
    return {
        "sha256": None,
        "method": "not-read",
        "samples": n,
        "reason": f"{type(dataset).__name__} is not gradwise's: its samples are not read for "
        "lineage (reading may have side effects); give the data as tensors to fingerprint it",
    }


def data_lineage(train: Any, val: Any = None) -> dict[str, Any]:
    """``{"train": fingerprint, "val": fingerprint or None}`` for environment.json."""
    return {"train": fingerprint(train), "val": fingerprint(val)}


def same_data(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool | None:
    """Whether two fingerprints show the same data: None when either is missing or unreadable."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return None
    if not a.get("sha256") or not b.get("sha256"):
        return None
    keys = ("sha256", "method", "samples")
    return all(a.get(k) == b.get(k) for k in keys)


# -- hashing --------------------------------------------------------------------------------------


def _all_tensors(tensors: Any) -> bool:
    return (
        isinstance(tensors, (tuple, list))
        and len(tensors) > 0
        and all(isinstance(t, torch.Tensor) and t.ndim > 0 for t in tensors)
        and len({t.shape[0] for t in tensors}) == 1
    )


def _tensors(tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> dict[str, Any]:
    n = int(tensors[0].shape[0])
    size = sum(t.numel() * t.element_size() for t in tensors)
    rows = None if size <= FULL_BYTES else torch.from_numpy(_spaced(n, SAMPLE_ROWS))
    h = hashlib.sha256(b"gradwise-tensors-v1")
    for t in tensors:
        _header(h, "T", str(t.dtype), tuple(t.shape))
        source = t if rows is None else t.index_select(0, rows.to(t.device))
        _hash_rows(h, source)
    return {
        "sha256": h.hexdigest(),
        "method": "full" if rows is None else "sample",
        "samples": n,
        "hashed": n if rows is None else len(rows),
    }


def _items(items: Any, n: int | None, method: str) -> dict[str, Any]:
    h = hashlib.sha256(b"gradwise-items-v1")
    _header(h, "N", n)
    count = 0
    for item in items:
        _value(h, item)
        count += 1
    return {"sha256": h.hexdigest(), "method": method, "samples": n, "hashed": count}


def _hash_rows(h: Any, t: torch.Tensor) -> None:
    """The tensor's bytes in chunks of rows (a GPU tensor is copied one chunk at a time)."""
    t = t.detach()
    if t.is_sparse or t.layout != torch.strided:
        t = t.to_dense()
    row = max(1, t[0].numel() * t.element_size()) if len(t) else 1
    step = max(1, CHUNK_BYTES // row)
    for i in range(0, len(t), step):
        chunk = t[i : i + step].resolve_conj().resolve_neg().cpu().contiguous()
        h.update(chunk.reshape(-1).view(torch.uint8).numpy().data)


def _value(h: Any, v: Any) -> None:
    """One sample, recursively: tensors and arrays by dtype, shape and bytes; containers by their
    parts; plain values by their text. Every part is tagged and length-prefixed, so different
    structures never give the same bytes."""
    if isinstance(v, torch.Tensor):
        t = v.detach()
        _header(h, "T", str(t.dtype), tuple(t.shape))
        _hash_rows(h, t.reshape(1, -1) if t.ndim == 0 else t)
    elif isinstance(v, np.ndarray):
        if v.dtype.hasobject:
            raise _Unhashable("a NumPy array of Python objects")
        _header(h, "A", v.dtype.str, v.shape)
        h.update(np.ascontiguousarray(v).reshape(-1).view(np.uint8).data)
    elif isinstance(v, Mapping):
        _header(h, "D", len(v))
        for key in sorted(v, key=str):
            _value(h, str(key))
            _value(h, v[key])
    elif isinstance(v, (list, tuple)):
        _header(h, "L", len(v))
        for part in v:
            _value(h, part)
    elif isinstance(v, str):
        _bytes(h, "S", v.encode("utf-8"))
    elif isinstance(v, (bytes, bytearray)):
        _bytes(h, "B", bytes(v))
    elif v is None or isinstance(v, (bool, int, float, complex, np.generic)):
        _bytes(h, "V", f"{type(v).__name__}:{v!r}".encode())
    elif all(hasattr(v, a) for a in ("tobytes", "mode", "size")):  # a PIL image
        _header(h, "I", v.mode, tuple(v.size))
        _bytes(h, "P", v.tobytes())
    else:
        raise _Unhashable(f"a sample holds a {type(v).__name__}, which has no byte form to hash")


def _header(h: Any, tag: str, *parts: Any) -> None:
    _bytes(h, tag, repr(parts).encode())


def _bytes(h: Any, tag: str, data: bytes) -> None:
    h.update(f"{tag}{len(data)}:".encode())
    h.update(data)


def _spaced(n: int, k: int) -> np.ndarray:
    """``min(n, k)`` evenly spaced indices of ``range(n)``, always including the first and last."""
    if n <= k:
        return np.arange(n, dtype=np.int64)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


@contextlib.contextmanager
def _seeded() -> Iterator[None]:
    """Fixed seeds while samples are read (random augmentations repeat); every generator as it
    was afterwards (the run's randomness is untouched)."""
    python, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            random.seed(0)
            np.random.seed(0)
            torch.manual_seed(0)
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy_state)
