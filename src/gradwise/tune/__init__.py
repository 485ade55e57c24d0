"""Hyperparameter tuning with Optuna: search spaces over recipe settings, studies, reports.

    from gradwise.tune import tune
    result = tune("recipe.yaml", "space.yaml", trials=30)   # or space=None: a proposed space
    result.best_recipe, result.best_value, result.importances

Names are imported lazily, so ``import gradwise.tune`` costs nothing until one is used (Optuna is
imported by the code that runs a study).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "tune": "gradwise.tune.study",
    "study_report": "gradwise.tune.study",
    "default_study_name": "gradwise.tune.study",
    "SAMPLERS": "gradwise.tune.study",
    "PRUNERS": "gradwise.tune.study",
    "TuneResult": "gradwise.tune.report",
    "TrialRow": "gradwise.tune.report",
    "SearchSpace": "gradwise.tune.space",
    "Param": "gradwise.tune.space",
    "load_space": "gradwise.tune.space",
    "parse_space": "gradwise.tune.space",
    "propose_space": "gradwise.tune.space",
}

__all__ = [
    "PRUNERS",
    "SAMPLERS",
    "Param",
    "SearchSpace",
    "TrialRow",
    "TuneResult",
    "default_study_name",
    "load_space",
    "parse_space",
    "propose_space",
    "study_report",
    "tune",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gradwise.tune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(__all__) | {"space", "study", "report", "storage"})


if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from gradwise.tune.report import TrialRow, TuneResult
    from gradwise.tune.space import Param, SearchSpace, load_space, parse_space, propose_space
    from gradwise.tune.study import PRUNERS, SAMPLERS, default_study_name, study_report, tune
