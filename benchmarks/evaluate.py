"""Evaluation cost per 10,000 samples: point metrics, bootstrap intervals, temperature scaling and
plots, each timed on its own, for a binary and a 10-class problem (synthetic logits: the model's
forward pass is not part of it).

Parts are interleaved within each repeat (metrics, bootstrap, calibration, plots, then again), after
one warm-up round that pays the imports (scikit-learn, SciPy, matplotlib); medians. "bootstrap" is
``classification_metrics`` with 1,000 resamples minus the same call with none.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/evaluate.py [--samples 10000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from gradwise.evaluate import calibration as cal
from gradwise.evaluate import metrics as mt
from gradwise.evaluate import plots as pl


def problem(kind: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Over-confident logits (3x) of a model that is right about 70% of the time."""
    rng = np.random.default_rng(seed)
    c = 2 if kind == "binary" else 10
    y = rng.integers(0, c, n)
    z = rng.normal(size=(n, c))
    z[np.arange(n), y] += 1.5
    z *= 3
    return y, (z[:, 1] - z[:, 0] if kind == "binary" else z)


def parts(kind: str, y: np.ndarray, z: np.ndarray) -> dict[str, float]:
    times = {}
    p = mt.probabilities(z, kind)
    t = time.perf_counter()
    m = mt.classification_metrics(y, p, kind, resamples=0)
    times["metrics"] = time.perf_counter() - t
    t = time.perf_counter()
    mt.classification_metrics(y, p, kind, resamples=1000)
    times["bootstrap"] = time.perf_counter() - t - times["metrics"]
    t = time.perf_counter()
    record = cal.fit_temperature(z, y, kind)
    times["calibration"] = time.perf_counter() - t
    t = time.perf_counter()
    pl.confusion_matrix(m["confusion_matrix"], m["labels"])
    pl.roc(m["curves"], None)
    pl.pr(m["curves"], None)
    before = cal.reliability(p, y, kind)
    after = cal.reliability(mt.probabilities(z, kind, record["temperature"]), y, kind)
    pl.reliability(before, after, record["temperature"])
    times["plots"] = time.perf_counter() - t
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    kinds = ("binary", "multiclass")
    data = {k: problem(k, args.samples) for k in kinds}
    for k in kinds:  # warm-up: imports and first-call costs
        parts(k, *data[k])
    results: dict[str, dict[str, list[float]]] = {k: {} for k in kinds}
    for _ in range(args.repeats):
        for k in kinds:
            for name, seconds in parts(k, *data[k]).items():
                results[k].setdefault(name, []).append(seconds)
    print(f"seconds per {args.samples:,} samples, median of {args.repeats} (interleaved)")
    print("task        metrics  bootstrap  calibration   plots   total  (fastest bootstrap)")
    for k in kinds:
        med = {name: statistics.median(v) for name, v in results[k].items()}
        total = sum(med.values())
        label = "binary" if k == "binary" else "10 classes"
        print(
            f"{label:<11} {med['metrics']:7.3f}  {med['bootstrap']:9.3f}  "
            f"{med['calibration']:11.3f}  {med['plots']:6.3f}  {total:6.3f}  "
            f"({min(results[k]['bootstrap']):.3f})"
        )


if __name__ == "__main__":
    main()
