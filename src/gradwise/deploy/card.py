"""The model card (``model.json``) and the reference statistics (``reference.json``) of an export.

An export directory holds::

    model.onnx | model.pt2 | model.ts   the artifact (see gradwise.deploy.formats)
    model.int8.onnx                     when quantized
    model.json                          the model card: what the artifact is, how to feed it, how
                                        good it is, and how close it is to eager PyTorch; its
                                        ``calibration`` is the run's evaluation/calibration.json
                                        (the temperature T of softmax(logits / T)) or null
    reference.json                      statistics of the training inputs and of the model's
                                        predictions on them, for drift monitoring

**Input space.** The artifact takes *model inputs*: raw inputs after ``card["preprocessing"]``
(see :func:`preprocess`). ``reference.json`` describes *raw* inputs, what clients send (the model
inputs mapped back with :func:`unpreprocess`), so a server compares like with like. PSI over
quantile bins and the KS test are unchanged by a per-feature monotone map anyway.

**Reference format** (version 1)::

    {"version": 1, "space": "raw", "source": "train", "n": 1437, "bins": 10,
     "kind": "features" | "summary",
     "features": [{"name", "edges", "fractions", "mean", "std", "min", "max", "sample"}, ...],
     "predictions": {"kind": "classes", "labels": [...], "fractions": [...]}
                  | {"kind": "values", "space": "target", "outputs": [<feature entries>]} | null}

- ``kind: features``: tabular rows (one axis, at most ``HIGH_DIM`` values): one entry per feature,
  named from ``DataInfo.feature_names`` (else ``f0``, ``f1``...).
- ``kind: summary``: images, sequences, token ids and wide rows are summarised per sample by
  :func:`summary_features`: ``mean``, ``std``, ``min``, ``max`` over the whole sample, plus
  ``channel{c}_mean`` per index of the sample's first axis when a sample has two or more axes
  (the channels of ``[C, H, W]`` images).
- ``edges`` are the *interior* quantile edges of 10 equal-frequency bins (duplicates merged, so a
  discrete feature has fewer bins); bin ``i`` of ``fractions`` (``len(edges) + 1`` of them) is
  ``numpy.digitize(value, edges) == i``, i.e. ``(-inf, e1), [e1, e2), ..., [ek, inf)``.
- ``sample``: up to ``SAMPLE_SIZE`` raw values (seeded random subset) for Kolmogorov-Smirnov tests.
- ``predictions``: the class distribution of the predicted classes (binary: logit > 0; multiclass:
  argmax) or, for regression, per-output statistics like the features', in target units
  (``p * std + mean`` when the targets were standardised); null for multilabel and language models.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradwise.errors import ConfigError, DataError, GradwiseError

CARD = "model.json"
REFERENCE = "reference.json"
INT8 = "model.int8.onnx"
REFERENCE_VERSION = 1
BINS = 10
SAMPLE_SIZE = 1000
HIGH_DIM = 64  # rows with more features than this are summarised like images


# -- files ----------------------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def versions() -> dict[str, str | None]:
    """Versions of the libraries an artifact was made with (None when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in ("gradwise", "torch", "onnx", "onnxruntime"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    found["python"] = platform.python_version()
    return found


def load_card(export_dir: str | Path) -> dict[str, Any]:
    """The model card of an export directory, checked: every file it names (the artifact, the
    int8 model) lies inside the directory and matches the sha256 the card records for it."""
    directory = Path(export_dir)
    card = _read_json(inside(directory, CARD), "a gradwise export directory with model.json")
    if not isinstance(card, dict):
        raise DataError(f"{directory / CARD} is not a model card (a JSON object)")
    for prefix, name, digest in card_files(card):
        path = inside(directory, name, f"{CARD}: {prefix}artifact")
        if not path.is_file():
            raise DataError(f"{directory} has a model card but no {name} ({prefix}artifact)")
        if not isinstance(digest, str) or not digest:
            raise ConfigError(
                f"{CARD}: {prefix}sha256",
                digest,
                f"the sha256 of {name}, which gradwise records on export",
                "without it nothing shows that the file is the one exported; export again",
            )
        if sha256_file(path) != digest:
            raise GradwiseError(
                f"{path} does not match the sha256 in its model card: the file was changed "
                "or damaged after export; export again"
            )
    return card


def card_temperature(card: dict[str, Any]) -> float | None:
    """The calibration temperature a model card carries (None: probabilities are uncalibrated,
    T = 1), checked: a card is data that anyone may have written."""
    calibration = card.get("calibration")
    if calibration is None:
        return None
    if not isinstance(calibration, dict):
        raise ConfigError(
            f"{CARD}: calibration", calibration, "an object with a temperature, or null"
        )
    t = calibration.get("temperature")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise ConfigError(f"{CARD}: calibration.temperature", t, "a finite number > 0")
    return float(t)


def card_files(card: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(field prefix, file name, sha256)`` of every file a model card names."""
    files = [("", card.get("artifact"), card.get("sha256"))]
    quantized = card.get("quantized")
    if quantized:
        if not isinstance(quantized, dict):
            raise ConfigError(f"{CARD}: quantized", quantized, "an object with artifact and sha256")
        files.append(("quantized.", quantized.get("artifact"), quantized.get("sha256")))
    peft = card.get("peft")  # export merge=False: the adapter's files
    if peft:
        listed = peft.get("files", []) if isinstance(peft, dict) else None
        if not isinstance(listed, list) or not all(isinstance(f, dict) for f in listed):
            raise ConfigError(f"{CARD}: peft.files", listed, "a list of {name, sha256} objects")
        files += [("peft.", f.get("name"), f.get("sha256")) for f in listed]
    return files


def inside(directory: Path, name: Any, field: str = "file") -> Path:
    """``directory / name``, refused unless it stays inside ``directory``: no absolute path, no
    ``..``, no symbolic link that leads out (a card is data that anyone may have written)."""
    expected = f"a file name inside {directory}"
    if not isinstance(name, str) or not name:
        raise ConfigError(field, name, expected)
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise ConfigError(field, name, expected)
    path = directory / relative
    if not path.resolve().is_relative_to(directory.resolve()):
        raise ConfigError(field, name, expected, "it is a symbolic link that leads out of it")
    return path


def load_reference(export_dir: str | Path) -> dict[str, Any]:
    """The reference statistics of an export directory."""
    directory = Path(export_dir)
    return _read_json(
        inside(directory, REFERENCE), "a gradwise export directory with reference.json"
    )


def _read_json(path: Path, expected: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError("artifact", str(path.parent), expected)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None


# -- preprocessing --------------------------------------------------------------------------------


def _standardize_arrays(record: dict[str, Any], ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of a ``standardize`` record, shaped to broadcast over a batch of ``ndim`` axes."""
    mean = np.asarray(record["mean"], dtype=np.float64)
    std = np.asarray(record["std"], dtype=np.float64)
    per = record.get("per", "feature")
    if per == "all" or mean.size == 1:
        return mean.reshape(()), std.reshape(())
    if per == "channel":
        shape = (1, -1) + (1,) * (ndim - 2)
    else:  # one value per feature: the last axis, or every element of a recorded sample shape
        shape = (1, *record.get("shape", [mean.size]))
    return mean.reshape(shape), std.reshape(shape)


def preprocess(raw: np.ndarray, preprocessing: dict[str, Any]) -> np.ndarray:
    """Raw inputs ``[N, ...]`` to model inputs: ``scale``, then ``standardize`` (see gradwise.data).

    Image ``resize``/``color`` and text ``char_vocab`` entries are not array operations and are
    left to the caller; token ids pass through unchanged.
    """
    x = np.asarray(raw)
    if x.dtype.kind in "iu":
        return x.astype(np.int64)
    x = x.astype(np.float64)
    if "scale" in preprocessing:
        x = x * float(preprocessing["scale"])
    if "standardize" in preprocessing:
        mean, std = _standardize_arrays(preprocessing["standardize"], x.ndim)
        x = (x - mean) / std
    return x.astype(np.float32)


def unpreprocess(x: np.ndarray, preprocessing: dict[str, Any]) -> np.ndarray:
    """Model inputs back to raw inputs: the inverse of :func:`preprocess` (float64)."""
    x = np.asarray(x)
    if x.dtype.kind in "iu":
        return x.astype(np.int64)
    x = x.astype(np.float64)
    if "standardize" in preprocessing:
        mean, std = _standardize_arrays(preprocessing["standardize"], x.ndim)
        x = x * std + mean
    if "scale" in preprocessing:
        x = x / float(preprocessing["scale"])
    return x


# -- reference statistics -------------------------------------------------------------------------


def feature_kind(sample_shape: Sequence[int]) -> str:
    """``features`` for tabular rows (one axis, at most ``HIGH_DIM`` values), else ``summary``."""
    return "features" if len(sample_shape) == 1 and sample_shape[0] <= HIGH_DIM else "summary"


def summary_names(sample_shape: Sequence[int]) -> list[str]:
    """Names of the columns :func:`summary_features` gives for samples of this shape."""
    names = ["mean", "std", "min", "max"]
    if len(sample_shape) >= 2:
        names += [f"channel{c}_mean" for c in range(sample_shape[0])]
    return names


def summary_features(x: np.ndarray) -> np.ndarray:
    """Per-sample summaries ``[N, F]`` of inputs ``[N, ...]``: mean, std, min and max over the
    whole sample, then one mean per index of the sample's first axis when samples have two or more
    axes (the channels of ``[C, H, W]`` images)."""
    x = np.asarray(x, dtype=np.float64)
    flat = x.reshape(len(x), -1)
    columns = [flat.mean(1), flat.std(1), flat.min(1), flat.max(1)]
    if x.ndim >= 3:
        columns += list(x.reshape(len(x), x.shape[1], -1).mean(2).T)
    return np.stack(columns, axis=1)


def drift_features(x: np.ndarray, kind: str) -> np.ndarray:
    """The ``[N, F]`` matrix that drift is measured on: the rows themselves, or their summaries."""
    x = np.asarray(x)
    if kind == "summary":
        return summary_features(x)
    return x.reshape(len(x), -1).astype(np.float64)


def quantile_edges(values: np.ndarray, bins: int = BINS) -> np.ndarray:
    """Interior edges of ``bins`` equal-frequency bins; duplicate edges are merged."""
    qs = np.quantile(np.asarray(values, dtype=np.float64), np.linspace(0, 1, bins + 1)[1:-1])
    return np.unique(qs)


def bin_fractions(values: np.ndarray, edges: Sequence[float] | np.ndarray) -> np.ndarray:
    """Fraction of ``values`` per bin ``(-inf, e1), [e1, e2), ..., [ek, inf)`` (numpy.digitize)."""
    edges = np.asarray(edges, dtype=np.float64)
    idx = np.digitize(np.asarray(values, dtype=np.float64), edges)
    return np.bincount(idx, minlength=len(edges) + 1) / max(len(values), 1)


def psi(expected: Sequence[float], actual: Sequence[float], eps: float = 1e-4) -> float:
    """Population Stability Index ``sum((a - e) * ln(a / e))``, empty bins floored at ``eps``."""
    e = np.clip(np.asarray(expected, dtype=np.float64), eps, None)
    a = np.clip(np.asarray(actual, dtype=np.float64), eps, None)
    return float(np.sum((a - e) * np.log(a / e)))


def feature_stats(
    values: np.ndarray, name: str, bins: int = BINS, sample_size: int = SAMPLE_SIZE, seed: int = 0
) -> dict[str, Any]:
    """One feature's entry: quantile edges and bin fractions (PSI), moments, a sample (KS)."""
    values = np.asarray(values, dtype=np.float64)
    edges = quantile_edges(values, bins)
    rng = np.random.default_rng(seed)
    sample = values if len(values) <= sample_size else rng.choice(values, sample_size, False)
    return {
        "name": name,
        "edges": edges.tolist(),
        "fractions": bin_fractions(values, edges).tolist(),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
        "sample": sample.tolist(),
    }


def prediction_stats(
    outputs: np.ndarray,
    task: str,
    class_labels: Sequence[Any] | None = None,
    target_standardize: dict[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Any] | None:
    """Statistics of the model's raw ``outputs`` on the training inputs (see the module doc)."""
    out = np.asarray(outputs, dtype=np.float64)
    if task == "binary":
        classes = (out.reshape(len(out), -1)[:, 0] > 0).astype(np.int64)
        n = 2
    elif task == "multiclass":
        classes, n = out.argmax(-1), out.shape[-1]
    elif task == "regression":
        values = out.reshape(len(out), -1)
        if target_standardize:
            mean = np.asarray(target_standardize["mean"], dtype=np.float64).reshape(1, -1)
            std = np.asarray(target_standardize["std"], dtype=np.float64).reshape(1, -1)
            values = values * std + mean
        return {
            "kind": "values",
            "space": "target",
            "outputs": [
                feature_stats(values[:, j], f"output{j}", seed=seed + j)
                for j in range(values.shape[1])
            ],
        }
    else:  # multilabel, lm, custom: input drift only
        return None
    labels = list(class_labels) if class_labels and len(class_labels) == n else list(range(n))
    fractions = np.bincount(classes.ravel(), minlength=n)[:n] / max(len(classes), 1)
    return {"kind": "classes", "labels": labels, "fractions": fractions.tolist()}


def reference_statistics(
    raw_inputs: np.ndarray,
    outputs: np.ndarray | None = None,
    *,
    task: str | None = None,
    class_labels: Sequence[Any] | None = None,
    feature_names: Sequence[str] | None = None,
    target_standardize: dict[str, Any] | None = None,
    source: str = "train",
    seed: int = 0,
) -> dict[str, Any]:
    """``reference.json`` for raw training inputs ``[N, ...]`` and the model's outputs on them."""
    x = np.asarray(raw_inputs)
    if len(x) == 0:
        raise DataError("reference statistics need at least one training sample")
    kind = feature_kind(x.shape[1:])
    matrix = drift_features(x, kind)
    if kind == "summary":
        names = summary_names(x.shape[1:])
    elif feature_names is not None and len(feature_names) == matrix.shape[1]:
        names = [str(n) for n in feature_names]
    else:
        names = [f"f{j}" for j in range(matrix.shape[1])]
    return {
        "version": REFERENCE_VERSION,
        "space": "raw",
        "source": source,
        "n": len(x),
        "bins": BINS,
        "kind": kind,
        "features": [
            feature_stats(matrix[:, j], names[j], seed=seed + j) for j in range(matrix.shape[1])
        ],
        "predictions": (
            prediction_stats(outputs, task or "", class_labels, target_standardize, seed)
            if outputs is not None
            else None
        ),
    }
