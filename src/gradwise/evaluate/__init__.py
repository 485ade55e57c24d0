"""Evaluation in depth: the metrics that matter per task with bootstrap confidence intervals,
calibration (ECE, reliability, temperature scaling), error analysis, plots and one HTML page.

    result = gradwise.evaluate("runs/digits-cnn")   # writes runs/digits-cnn/evaluation/
    gradwise evaluate runs/digits-cnn --checkpoint last --slice label

Modules: ``metrics`` (classification, regression, LM; bootstrap), ``calibration`` (temperature
scaling, ``read_temperature``), ``analysis``, ``plots``, ``page``, ``run`` (loading a run,
predicting, writing ``evaluation/``). Names are imported lazily: ``calibration`` and ``metrics``
need NumPy and SciPy only, so serving can read a temperature without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gradwise._lazy import callable_as_namesake, lazy_exports

_EXPORTS: dict[str, str] = {
    "evaluate": "gradwise.evaluate.run",
    "Evaluation": "gradwise.evaluate.run",
    "read_temperature": "gradwise.evaluate.calibration",
    "fit_temperature": "gradwise.evaluate.calibration",
    "classification_metrics": "gradwise.evaluate.metrics",
    "regression_metrics": "gradwise.evaluate.metrics",
    "lm_metrics": "gradwise.evaluate.metrics",
}

__all__ = [
    "Evaluation",
    "classification_metrics",
    "evaluate",
    "fit_temperature",
    "lm_metrics",
    "read_temperature",
    "regression_metrics",
]

__getattr__, __dir__ = lazy_exports("gradwise.evaluate", _EXPORTS, globals())
callable_as_namesake(__name__)  # gradwise.evaluate(...) is gradwise.evaluate.evaluate(...)

if TYPE_CHECKING:
    from gradwise.evaluate.calibration import fit_temperature, read_temperature
    from gradwise.evaluate.metrics import classification_metrics, lm_metrics, regression_metrics
    from gradwise.evaluate.run import Evaluation, evaluate
