"""gradwise: PyTorch training with the judgment of a senior ML engineer.

The public API is re-exported here and imported lazily, so ``import gradwise`` costs almost
nothing until a name is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gradwise._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "Trainer": "gradwise.trainer",
    "Run": "gradwise.trainer",
    "Recipe": "gradwise.recipe",
    "load_recipe": "gradwise.recipe",
    "GradwiseError": "gradwise.errors",
    "ConfigError": "gradwise.errors",
    "DataError": "gradwise.errors",
    "MODELS": "gradwise.models",
    "build_model": "gradwise.models",
    "DATASETS": "gradwise.data",
    "load_data": "gradwise.data",
    "load_checkpoint": "gradwise.checkpoint",
    "nn": "gradwise.nn",
    "Doctor": "gradwise.doctor",
    "Finding": "gradwise.doctor",
    "RULES": "gradwise.doctor",
    "check": "gradwise.doctor.preflight",
    "lr_range_test": "gradwise.doctor.lr_finder",
    "assemble": "gradwise.assemble",
    "Assembly": "gradwise.assemble",
    "advise": "gradwise.assemble",
    "Advice": "gradwise.advisor",
    "facts": "gradwise.facts",
    "Facts": "gradwise.facts",
    "tune": "gradwise.tune",
    "deploy": "gradwise.deploy",
    "export": "gradwise.deploy.export",
    "finetune": "gradwise.finetune",
    "load_pretrained": "gradwise.finetune.pretrained",
    "register_optimizer": "gradwise.optimizers",
    "predict": "gradwise.predict",
    "cv": "gradwise.cv",
    "compare": "gradwise.compare",
    "evaluate": "gradwise.evaluate",
}

__all__ = [  # noqa: RUF022 - grouped like _EXPORTS
    "__version__",
    "Trainer",
    "Run",
    "Recipe",
    "load_recipe",
    "GradwiseError",
    "ConfigError",
    "DataError",
    "MODELS",
    "build_model",
    "DATASETS",
    "load_data",
    "load_checkpoint",
    "nn",
    "Doctor",
    "Finding",
    "RULES",
    "check",
    "lr_range_test",
    "assemble",
    "Assembly",
    "advise",
    "Advice",
    "facts",
    "Facts",
    "tune",
    "deploy",
    "export",
    "finetune",
    "load_pretrained",
    "register_optimizer",
]


__getattr__, __dir__ = lazy_exports("gradwise", _EXPORTS, globals())


if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from gradwise import deploy, finetune, nn, tune
    from gradwise.advisor import Advice
    from gradwise.assemble import Assembly, advise, assemble
    from gradwise.checkpoint import load_checkpoint
    from gradwise.data import DATASETS, load_data
    from gradwise.deploy.export import export
    from gradwise.doctor import RULES, Doctor, Finding
    from gradwise.doctor.lr_finder import lr_range_test
    from gradwise.doctor.preflight import check
    from gradwise.errors import ConfigError, DataError, GradwiseError
    from gradwise.facts import Facts, facts
    from gradwise.finetune.pretrained import load_pretrained
    from gradwise.models import MODELS, build_model
    from gradwise.optimizers import register_optimizer
    from gradwise.recipe import Recipe, load_recipe
    from gradwise.trainer import Run, Trainer
