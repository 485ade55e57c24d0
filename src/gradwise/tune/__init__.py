"""Hyperparameter tuning with Optuna: search spaces over recipe settings, studies, reports.

    from gradwise.tune import tune
    result = tune("recipe.yaml", "space.yaml", trials=30)   # or space=None: a proposed space
    result.best_recipe, result.best_value, result.importances

Names are imported lazily, so ``import gradwise.tune`` costs nothing until one is used (Optuna is
imported by the code that runs a study).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gradwise._lazy import callable_as_namesake, lazy_exports

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


__getattr__, __dir__ = lazy_exports("gradwise.tune", _EXPORTS, globals())
callable_as_namesake(__name__)  # gradwise.tune(...) is gradwise.tune.tune(...)


if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from gradwise.tune.report import TrialRow, TuneResult
    from gradwise.tune.space import Param, SearchSpace, load_space, parse_space, propose_space
    from gradwise.tune.study import PRUNERS, SAMPLERS, default_study_name, study_report, tune
