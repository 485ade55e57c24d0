"""Calibration: expected calibration error, reliability diagrams, temperature scaling.

Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks") divides every
logit by one scalar T > 0 fitted on held-out data by minimising the negative log-likelihood.
It never changes a prediction (argmax and the 0.5 threshold are invariant to T), only how confident
the model claims to be, which is why it is fitted on the validation split and then trusted for
probabilities. T > 1 softens an over-confident model.

The fitted temperature is stored with the run, in ``RUN/evaluation/calibration.json``::

    {"method": "temperature", "temperature": 1.7, "fitted_on": "validation", "samples": 2000,
     "ece_before": 0.08, "ece_after": 0.02, "nll_before": 0.41, "nll_after": 0.33}

:func:`read_temperature` is how export, serve and predict read it back (validated).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from gradwise.errors import DataError
from gradwise.evaluate.metrics import ECE_BINS, bin_index, ece, probabilities, top_label

EVALUATION = "evaluation"  # the directory in a run that gradwise evaluate writes
CALIBRATION_FILE = "calibration.json"
LOG_T_BOUNDS = (-4.0, 4.0)  # T in [0.018, 55]: beyond either end the fit is degenerate
KEYS = ("ece_before", "ece_after", "nll_before", "nll_after")


def nll(logits: np.ndarray, targets: np.ndarray, kind: str, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood (nats) of ``targets`` under logits / T: cross-entropy for
    multiclass, binary cross-entropy (per label for multilabel) otherwise."""
    from scipy.special import log_expit, log_softmax

    z = np.asarray(logits, dtype=np.float64) / temperature
    y = np.asarray(targets)
    if kind == "multiclass":
        return float(-log_softmax(z, axis=1)[np.arange(len(y)), y].mean())
    if kind == "binary" and z.ndim == 2 and z.shape[1] == 2:
        z = z[:, 1] - z[:, 0]
    z = z.reshape(y.shape)
    return float(-(y * log_expit(z) + (1 - y) * log_expit(-z)).mean())


def calibration_error(scores: np.ndarray, targets: np.ndarray, kind: str) -> float:
    """ECE (15 equal-width bins) of probabilities ``scores`` on the top-label confidence."""
    conf, pred = top_label(np.asarray(scores), kind)
    y = np.asarray(targets).ravel()
    return ece(conf, (pred == y).astype(np.float64))


def reliability(
    scores: np.ndarray, targets: np.ndarray, kind: str, bins: int = ECE_BINS
) -> dict[str, list[float]]:
    """Reliability diagram data per equal-width confidence bin: its edges, how many decisions
    fell in it, their mean confidence and their accuracy (NaN for an empty bin)."""
    conf, pred = top_label(np.asarray(scores), kind)
    correct = (pred == np.asarray(targets).ravel()).astype(np.float64)
    b = bin_index(conf, bins)
    count = np.bincount(b, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore"):
        mean_conf = np.bincount(b, conf, minlength=bins) / count
        accuracy = np.bincount(b, correct, minlength=bins) / count
    return {
        "edges": np.linspace(0, 1, bins + 1).tolist(),
        "count": count.astype(int).tolist(),
        "confidence": [None if math.isnan(v) else float(v) for v in mean_conf],
        "accuracy": [None if math.isnan(v) else float(v) for v in accuracy],
    }


def fit_temperature(logits: Any, targets: Any, kind: str) -> dict[str, Any]:
    """Fit T on (validation) logits by minimising NLL over log T (bounded Brent; 1-D and convex
    in practice, so the optimum is found in ~20 evaluations); returns the contract's record."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(targets)
    if len(y) == 0:
        raise DataError("temperature scaling needs validation samples; there are none")
    if not np.isfinite(z).all():
        raise DataError("the validation logits contain NaN or infinity; no temperature is fitted")
    fit = minimize_scalar(
        lambda log_t: nll(z, y, kind, math.exp(log_t)),
        bounds=LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-5},
    )
    t = math.exp(float(fit.x))
    before, after = probabilities(z, kind), probabilities(z, kind, t)
    return {
        "method": "temperature",
        "temperature": t,
        "fitted_on": "validation",
        "samples": len(y),
        "ece_before": calibration_error(before, y, kind),
        "ece_after": calibration_error(after, y, kind),
        "nll_before": nll(z, y, kind),
        "nll_after": nll(z, y, kind, t),
    }


def calibration_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / EVALUATION / CALIBRATION_FILE


def validate(record: Any, where: str = CALIBRATION_FILE) -> dict[str, Any]:
    """``record`` if it follows the contract, else a DataError naming the field and the value."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object; got {type(record).__name__}")
    if record.get("method") != "temperature":
        raise DataError(f"{where}: method is {record.get('method')!r}; expected 'temperature'")
    t = record.get("temperature")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
        raise DataError(f"{where}: temperature is {t!r}; expected a finite number > 0")
    if record.get("fitted_on") != "validation":
        raise DataError(f"{where}: fitted_on is {record.get('fitted_on')!r}; expected 'validation'")
    samples = record.get("samples")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples <= 0:
        raise DataError(f"{where}: samples is {samples!r}; expected a positive integer")
    for key in KEYS:
        v = record.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise DataError(f"{where}: {key} is {v!r}; expected a finite number")
    return record


def read_calibration(run_dir: str | Path) -> dict[str, Any] | None:
    """The calibration record stored with a run (``RUN/evaluation/calibration.json``), validated,
    or None when the run has not been calibrated. A file that breaks the contract is a DataError."""
    path = calibration_path(run_dir)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not readable JSON ({exc})") from None
    return validate(record, str(path))


def read_temperature(run_dir: str | Path) -> float | None:
    """The temperature stored with a run, or None when the run has not been calibrated; never a
    silent 1.0 for a broken file."""
    record = read_calibration(run_dir)
    return None if record is None else float(record["temperature"])


def write(directory: str | Path, record: dict[str, Any]) -> Path:
    """Write a validated calibration record as ``directory/calibration.json``, atomically."""
    from gradwise.tracking.files import atomic_write_json

    path = Path(directory) / CALIBRATION_FILE
    atomic_write_json(path, validate(record))
    return path
