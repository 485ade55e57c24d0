"""Repair (``doctor.mode: repair``): roll back to the last good state and fix what the finding names.

After AUTOTRAINER (Zhang et al., ICSE 2021): when the loss or gradients blow up or the learning rate
is too high, restore the weights and optimizer state from before the fault and change the recipe;
when ReLU units die, switch them to LeakyReLU. Repairs are capped, logged in the run directory and
shown in the report.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from torch import nn

from gradwise.doctor.findings import Finding


@dataclass(frozen=True)
class Fix:
    """What a repair changes for one finding code."""

    lr_factor: float = 1.0  # multiply every learning rate (and the schedule's peak) by this
    clip: bool = False  # clip the gradient norm at 1.0 if it is unclipped or clipped more loosely
    leaky_relu: bool = False  # replace nn.ReLU modules with nn.LeakyReLU(0.01)


FIXES: dict[str, Fix] = {
    "GW301": Fix(lr_factor=0.3, clip=True),  # non-finite loss or gradients
    "GW302": Fix(lr_factor=0.5, clip=True),  # exploding gradients
    "GW305": Fix(lr_factor=0.3, clip=True),  # learning rate too high
    "GW304": Fix(leaky_relu=True),  # dying ReLU (falls back to a lower learning rate)
}
SNAPSHOT_EVERY = 50  # steps between snapshots of a healthy state
KEEP_SNAPSHOTS = 2  # roll back to the older one: the newer may already hold the fault's onset
COOLDOWN = 3  # sampled steps after a repair before another one (the signals must settle)
CLIP_NORM = 1.0  # the gradient-norm clip a repair sets (Pascanu et al. 2013; the Recipe's default)


class Repairer:
    """Keeps snapshots of healthy training states and applies :data:`FIXES` on findings."""

    def __init__(self, trainer: Any, max_repairs: int, sample_every: int) -> None:
        self.trainer = trainer
        self.max_repairs = max_repairs
        self.snapshot_every = SNAPSHOT_EVERY
        self.cooldown = COOLDOWN * sample_every
        self.snapshots: list[dict[str, Any]] = []
        self.repairs: list[dict[str, Any]] = []
        self._quiet_until = 0
        self._fault_since_snapshot = False
        self._snapshot(0)

    def after_step(self, step: int, fired: list[Finding]) -> str | None:
        """Called after every optimizer step; returns "stop" when the run cannot go on."""
        fatal = [f for f in fired if f.code in FIXES]
        if fatal:
            self._fault_since_snapshot = True
            if step < self._quiet_until:
                return None
            if len(self.repairs) < self.max_repairs and self.snapshots:
                self._repair(step, fatal[0])
                return None
            return "stop" if any(f.code == "GW301" for f in fatal) else None
        if step % self.snapshot_every == 0:
            if not self._fault_since_snapshot:
                self._snapshot(step)
            self._fault_since_snapshot = False
        return None

    def _snapshot(self, step: int) -> None:
        t = self.trainer
        self.snapshots.append(
            {
                "step": step,
                "model": copy.deepcopy(t.model.state_dict()),
                "optimizer": copy.deepcopy(t.optimizer.state_dict()),
                "scaler": t.scaler.state_dict(),
                "ema": copy.deepcopy(t.ema.state_dict()) if t.ema is not None else None,
            }
        )
        del self.snapshots[:-KEEP_SNAPSHOTS]

    def _repair(self, step: int, finding: Finding) -> None:
        t = self.trainer
        snapshot = self.snapshots[0]
        t.model.load_state_dict(snapshot["model"])
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in t.optimizer.param_groups]
        t.optimizer.load_state_dict(snapshot["optimizer"])
        for group, kept in zip(t.optimizer.param_groups, hyper, strict=True):
            group.update(kept)  # the schedule's current values, not the snapshot's
        t.scaler.load_state_dict(snapshot["scaler"])
        if t.ema is not None:
            t.ema.load_state_dict(snapshot["ema"])
        self.snapshots = [snapshot]

        fix = FIXES[finding.code]
        actions = [f"rolled back to step {snapshot['step']}"]
        lr_factor = fix.lr_factor
        if fix.leaky_relu:
            swapped = _swap_relu(t.model)
            if swapped:
                actions.append(f"replaced {swapped} ReLU modules with LeakyReLU(0.01)")
                t.doctor.reattach()
            else:
                lr_factor = 0.3
        if lr_factor != 1.0:
            before = t.optimizer.param_groups[0]["lr"]
            _scale_lr(t, lr_factor)
            actions.append(f"learning rate {before:.3g} -> {t.optimizer.param_groups[0]['lr']:.3g}")
        if fix.clip and (t.grad_clip is None or t.grad_clip > CLIP_NORM):
            actions.append(f"gradient clipping {t.grad_clip} -> {CLIP_NORM:g}")
            t.grad_clip = CLIP_NORM
        record = {
            "step": step,
            "code": finding.code,
            "name": finding.name,
            "action": "; ".join(actions),
            "rolled_back_to": snapshot["step"],
        }
        self.repairs.append(record)
        t.doctor.rebaseline()
        self._quiet_until = step + self.cooldown
        self._fault_since_snapshot = False
        t.on_repair(record)


def _scale_lr(trainer: Any, factor: float) -> None:
    """Scale the learning rate now and for the rest of the schedule."""
    for group in trainer.optimizer.param_groups:
        for key in ("lr", "initial_lr", "max_lr", "min_lr"):
            if isinstance(group.get(key), float):
                group[key] *= factor
    scheduler = trainer.scheduler
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = [g["lr"] for g in trainer.optimizer.param_groups]


def _swap_relu(model: nn.Module) -> int:
    """Replace every nn.ReLU module with nn.LeakyReLU(0.01) in place; returns how many."""
    count = 0
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is nn.ReLU:
                setattr(module, name, nn.LeakyReLU(0.01, inplace=child.inplace))
                count += 1
    return count
