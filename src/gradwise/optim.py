"""Optimizers with expert parameter groups, and learning-rate schedules.

Weight decay shrinks weights toward zero to regularise; on biases, normalisation gains and embeddings
it only hurts (it fights the normalisation's scale and starves rare tokens), so those parameters get
none. The decision is made by module type, never by parameter name.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from gradwise.recipe import OptimSpec, ScheduleSpec

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

DEFAULT_BETAS = {"adamw": (0.9, 0.999), "adam": (0.9, 0.999), "lion": (0.9, 0.99)}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and the rest (biases, 1-D gains, norm and embedding parameters).

    A parameter shared between modules (tied embeddings) is placed once, and is not decayed if any
    module that owns it is exempt.
    """
    exempt: set[int] = set()
    ordered: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad:
                continue
            ordered.setdefault(id(param), param)
            if isinstance(module, NO_DECAY_MODULES) or param.ndim <= 1:
                exempt.add(id(param))
    decay = [p for i, p in ordered.items() if i not in exempt]
    no_decay = [p for i, p in ordered.items() if i in exempt]
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, spec: OptimSpec) -> torch.optim.Optimizer:
    """The optimizer the recipe names, over :func:`param_groups`."""
    groups = param_groups(model, spec.weight_decay)
    betas = tuple(spec.betas or DEFAULT_BETAS.get(spec.name, (0.9, 0.999)))
    if spec.name == "adamw":
        return torch.optim.AdamW(groups, lr=spec.lr, betas=betas, eps=spec.eps)
    if spec.name == "adam":
        return torch.optim.Adam(groups, lr=spec.lr, betas=betas, eps=spec.eps)
    if spec.name == "sgd":
        nesterov = spec.nesterov and spec.momentum > 0  # Nesterov needs momentum
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, nesterov=nesterov)
    if spec.name == "lion":
        from lion_pytorch import Lion

        return Lion(groups, lr=spec.lr, betas=betas)
    raise AssertionError(f"unhandled optimizer {spec.name}")  # the Recipe's Literal prevents this


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
