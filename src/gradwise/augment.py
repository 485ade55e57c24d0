"""Batch-level augmentation for image classification: mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019).

Both draw from torch's global generator, whose state every checkpoint saves, so resumed runs mix
exactly as uninterrupted ones.
"""

from __future__ import annotations

import math

import torch


def soft_targets(target: torch.Tensor, kind: str, num_classes: int | None) -> torch.Tensor:
    """Targets as probabilities: one-hot for class indices, floats for 0/1 labels."""
    if kind == "multiclass":
        return torch.nn.functional.one_hot(target, num_classes).float()
    return target.float()


def mix_batch(
    x: torch.Tensor, y: torch.Tensor, *, mixup: float, cutmix: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix a batch of images [B, C, H, W] and soft targets [B, ...] with a shuffled copy of itself.

    With both alphas positive, each batch uses one of the two at random.
    """
    use_cutmix = cutmix > 0 and (mixup <= 0 or bool(torch.rand(()) < 0.5))
    alpha = cutmix if use_cutmix else mixup
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(x.shape[0], device=x.device)
    if use_cutmix:
        height, width = x.shape[-2:]
        cut = math.sqrt(1 - lam)
        cut_h, cut_w = round(height * cut), round(width * cut)
        cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        x = x.clone()
        x[..., top:bottom, left:right] = x[perm][..., top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (height * width)  # the area actually pasted
    else:
        x = lam * x + (1 - lam) * x[perm]
    return x, lam * y + (1 - lam) * y[perm]
