"""Optimizers with expert parameter groups, and learning-rate schedules.

Weight decay shrinks weights toward zero to regularise; on biases, normalisation gains and embeddings
it only hurts (it fights the normalisation's scale and starves rare tokens), so those parameters get
none. The decision is made by module type, never by parameter name.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradwise.errors import ConfigError, did_you_mean
from gradwise.optimizers import OPTIMIZERS, OptimizerEntry, register_optimizer
from gradwise.recipe import OptimSpec, ScheduleSpec, call_factory
from gradwise.registry import resolve

__all__ = [
    "OPTIMIZERS",
    "OptimizerEntry",
    "build_optimizer",
    "build_scheduler",
    "decay_exempt",
    "lr_multiplier",
    "param_groups",
    "register_optimizer",
    "warmup_steps",
]

# Module types whose parameters are never decayed.
NO_DECAY_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
    nn.Embedding,
    nn.EmbeddingBag,
)

# recipe setting -> its value for an optimizer row (see gradwise.optimizers.SETTINGS)
SETTING_VALUES: dict[str, Callable[[OptimSpec, OptimizerEntry], Any]] = {
    "betas": lambda spec, entry: tuple(spec.betas or entry.betas or (0.9, 0.999)),
    "eps": lambda spec, entry: spec.eps,
    "momentum": lambda spec, entry: spec.momentum,
    "nesterov": lambda spec, entry: spec.nesterov and spec.momentum > 0,  # Nesterov needs momentum
}
RESERVED = {
    "params": "gradwise passes the parameter groups",
    "lr": "set optim.lr (the schedule scales it)",
    "weight_decay": "set optim.weight_decay (gradwise applies it to weights only)",
}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and the rest (biases, 1-D gains, norm and embedding parameters).

    A parameter shared between modules (tied embeddings) is placed once, and is not decayed if any
    module that owns it is exempt.
    """
    exempt = decay_exempt(model)
    ordered = {id(p): p for p in model.parameters() if p.requires_grad}
    decay = [p for i, p in ordered.items() if i not in exempt]
    no_decay = [p for i, p in ordered.items() if i in exempt]
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def decay_exempt(model: nn.Module) -> set[int]:
    """ids of the parameters that get no weight decay: those of normalisation and embedding
    modules, and every parameter of one dimension (biases, gains)."""
    exempt: set[int] = set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if isinstance(module, NO_DECAY_MODULES) or param.ndim <= 1:
                exempt.add(id(param))
    return exempt


def build_optimizer(
    model: nn.Module,
    spec: OptimSpec,
    groups: list[dict[str, Any]] | None = None,
    *,
    trusted: bool = True,
) -> torch.optim.Optimizer:
    """The optimizer ``spec.name`` names: a row of :data:`OPTIMIZERS`, or an import path to any
    ``(params, **kwargs) -> Optimizer``.

    It gets :func:`param_groups` (or ``groups``: the caller's parameter groups, dicts with
    ``"params"`` and per-group settings; a group without ``weight_decay`` gets the recipe's), the
    recipe's lr, the recipe settings its row takes, and ``spec.kwargs``. ``trusted=False`` refuses
    import paths (the recipe comes from a directory the user has not trusted; see
    :mod:`gradwise.trust`). Problems raise a ConfigError naming the setting.
    """
    found = resolve(OPTIMIZERS, spec.name, "optim.name", trusted=trusted)
    entry = found if isinstance(found, OptimizerEntry) else OptimizerEntry(spec.name, found)
    _check_arguments(entry, spec.kwargs)
    groups = param_groups(model, spec.weight_decay) if groups is None else _given(groups, spec)
    if not entry.weight_decay:
        groups = [{k: v for k, v in g.items() if k != "weight_decay"} for g in groups]
    settings = {s: SETTING_VALUES[s](spec, entry) for s in entry.settings}
    build = functools.partial(entry, groups, lr=spec.lr, **settings)
    optimizer = call_factory(build, dict(spec.kwargs), "optim.kwargs", spec.name)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            "optim.name",
            spec.name,
            "a class or factory that returns a torch.optim.Optimizer",
            f"it returned {type(optimizer).__name__}",
        )
    return optimizer


def _check_arguments(entry: OptimizerEntry, kwargs: dict[str, Any]) -> None:
    """optim.kwargs must not set what the recipe sets and must be arguments the optimizer takes;
    the optimizer must take parameter groups and lr."""
    for key, value in kwargs.items():
        if key in RESERVED or key in entry.settings:
            hint = RESERVED.get(key, f"set optim.{key}")
            raise ConfigError(
                f"optim.kwargs.{key}", value, "an argument gradwise does not set", hint
            )
    try:
        signature = inspect.signature(entry.factory)
    except (TypeError, ValueError):
        return  # no signature to check against: the optimizer itself will say
    params = signature.parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        named = [
            k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        for key, value in kwargs.items():
            if key not in named:
                hint = did_you_mean(key, named) or f"it accepts: {', '.join(named[1:]) or 'none'}"
                raise ConfigError(
                    f"optim.kwargs.{key}", value, f"an argument of {entry.name!r}", hint
                )
    try:
        signature.bind([], lr=0.0, **dict.fromkeys(entry.settings), **kwargs)
    except TypeError as exc:
        raise ConfigError(
            "optim.name",
            entry.name,
            "an optimizer class or factory (params, lr, **kwargs) -> torch.optim.Optimizer",
            str(exc),
        ) from None


def _given(groups: Any, spec: OptimSpec) -> list[dict[str, Any]]:
    """The caller's parameter groups, checked and copied; the recipe's weight decay by default."""
    if not isinstance(groups, (list, tuple)) or not groups:
        raise ConfigError("param_groups", groups, "a non-empty list of dicts with 'params'")
    out, seen = [], set()
    for i, group in enumerate(groups):
        if not isinstance(group, dict) or "params" not in group:
            raise ConfigError(f"param_groups[{i}]", group, "a dict with 'params'")
        params = group["params"]
        field = f"param_groups[{i}].params"
        try:
            params = [params] if isinstance(params, torch.Tensor) else list(params)
        except TypeError:
            raise ConfigError(field, params, "a list of parameters") from None
        if not params or not all(isinstance(p, torch.Tensor) for p in params):
            raise ConfigError(field, group["params"], "a non-empty list of parameters")
        ids = {id(p) for p in params}
        if seen & ids:
            raise ConfigError(field, f"{len(params)} tensors", "parameters no other group holds")
        seen |= ids
        out.append({"weight_decay": spec.weight_decay, **group, "params": params})
    return out


def warmup_steps(spec: ScheduleSpec, total_steps: int) -> int:
    """Warmup length in optimizer steps (`warmup` is a fraction when < 1)."""
    steps = round(spec.warmup * total_steps) if spec.warmup < 1 else int(spec.warmup)
    return min(steps, max(total_steps - 1, 0))


def lr_multiplier(spec: ScheduleSpec, total_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier for optimizer step s (0-based) for the per-step schedules.

    Warmup is linear: step s < W uses (s + 1) / (W + 1), so no step is wasted at lr 0 and step W is
    at the peak. Cosine then falls from the peak to ``min_lr`` exactly at the last step.
    """
    warm = warmup_steps(spec, total_steps)
    last = max(total_steps - 1, 1)

    def multiplier(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if spec.name == "warmup_cosine":
            progress = min((step - warm) / max(last - warm, 1), 1.0)
            return spec.min_lr + (1 - spec.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
        if spec.name == "step":
            passed = sum(step >= m * total_steps for m in spec.milestones)
            return spec.gamma**passed
        return 1.0  # constant

    return multiplier


def build_scheduler(
    optimizer: torch.optim.Optimizer, spec: ScheduleSpec, total_steps: int, mode: str = "min"
) -> torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau:
    """The schedule the recipe names. All but ``plateau`` step once per optimizer step; ``plateau``
    steps once per evaluation with the monitored metric."""
    if spec.name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=max(total_steps, 2),
            pct_start=spec.pct_start,
        )
    if spec.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=mode, factor=spec.gamma, patience=spec.plateau_patience
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(spec, total_steps))
