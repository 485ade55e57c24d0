"""The optimizer table: one row per optimizer gradwise knows by name (timm's ``OptimInfo``, trimmed).

A row says how to build the optimizer (a class or factory ``(params, **kwargs) -> Optimizer``, or
its import path, so that this module imports no torch and the Recipe checks ``optim.name``
instantly), which recipe settings it takes and its default betas. Adding an optimizer is adding a
row, here or in your own code before the Recipe names it::

    register_optimizer("rmsprop", torch.optim.RMSprop, settings=("eps", "momentum"))

Anything else is named by import path (``optim.name: "torch.optim:RMSprop"``): see
:func:`gradwise.optim.build_optimizer`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gradwise.errors import did_you_mean
from gradwise.registry import Registry, import_path

SETTINGS = ("betas", "eps", "momentum", "nesterov")
"""Recipe settings (``optim.<setting>``) that a row may take, besides lr and weight decay."""


@dataclass(frozen=True)
class OptimizerEntry:
    """One optimizer: called like its class, ``entry(params, **kwargs)``."""

    name: str
    build: Callable[..., Any] | str
    """The class or factory, or its import path 'module:attr' (imported on first use)."""
    settings: tuple[str, ...] = ()
    """Which of :data:`SETTINGS` it takes."""
    betas: tuple[float, float] | None = None
    """Default betas when the recipe gives none (rows that take betas)."""
    weight_decay: bool = True
    """Whether it takes weight decay (a group's ``weight_decay``)."""

    def __post_init__(self) -> None:
        unknown = set(self.settings) - set(SETTINGS)
        if unknown:
            raise ValueError(f"optimizer {self.name!r}: unknown settings {sorted(unknown)}")

    @property
    def factory(self) -> Callable[..., Any]:
        """The class or factory (an import path is a row's own, never a directory's: trusted)."""
        if isinstance(self.build, str):
            return import_path(self.build, f"optimizer {self.name!r}")
        return self.build

    def __call__(self, params: Any, **kwargs: Any) -> Any:
        return self.factory(params, **kwargs)


OPTIMIZERS: Registry[OptimizerEntry] = Registry("optimizer")


def register_optimizer(
    name: str,
    build: Callable[..., Any] | str | None = None,
    *,
    settings: tuple[str, ...] = (),
    betas: tuple[float, float] | None = None,
    weight_decay: bool = True,
) -> Any:
    """Add a row to :data:`OPTIMIZERS`; without ``build``, a decorator for the class or factory."""

    def add(fn: Callable[..., Any] | str) -> Callable[..., Any] | str:
        OPTIMIZERS.register(name)(OptimizerEntry(name, fn, tuple(settings), betas, weight_decay))
        return fn

    return add if build is None else add(build)


# name, class, settings, default betas
register_optimizer("adamw", "torch.optim:AdamW", settings=("betas", "eps"), betas=(0.9, 0.999))
register_optimizer("adam", "torch.optim:Adam", settings=("betas", "eps"), betas=(0.9, 0.999))
register_optimizer("sgd", "torch.optim:SGD", settings=("momentum", "nesterov"))
register_optimizer("lion", "lion_pytorch:Lion", settings=("betas",), betas=(0.9, 0.99))


def check_name(name: str) -> str:
    """``name`` if it is a row or an import path; else a ValueError with a did-you-mean (the
    Recipe turns it into a ConfigError naming ``optim.name``)."""
    if ":" in name or name in OPTIMIZERS:
        return name
    names = ", ".join(map(repr, OPTIMIZERS))
    expected = f"one of {names}, or an import path 'package.module:Optimizer'"
    hint = did_you_mean(name, OPTIMIZERS)
    raise ValueError(f"{expected}. {hint}" if hint else expected)
