"""Repair (``doctor.mode: repair``): roll back to the last good state and fix what the finding names.

After AUTOTRAINER (Zhang et al., ICSE 2021): when the loss or gradients blow up or the learning rate
is too high, restore the weights and optimizer state from before the fault and change the recipe;
when ReLU units die, switch them to LeakyReLU. Repairs are capped, logged in the run directory and
shown in the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from gradwise.doctor.findings import Finding
from gradwise.state import TrainState, scale_lr

if TYPE_CHECKING:
    from gradwise.doctor.doctor import Doctor


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
    """Keeps snapshots of healthy training states and applies :data:`FIXES` on findings.

    It works on the run's :class:`~gradwise.state.TrainState` (snapshot, roll back, the learning
    rate and the gradient clip) and re-arms the doctor; ``on_repair`` is told of every repair.
    """

    def __init__(
        self,
        state: TrainState,
        doctor: Doctor,
        max_repairs: int,
        sample_every: int,
        on_repair: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.state, self.doctor, self.on_repair = state, doctor, on_repair
        self.max_repairs = max_repairs
        self.snapshot_every = SNAPSHOT_EVERY
        self.cooldown = COOLDOWN * sample_every
        self.snapshots: list[dict[str, Any]] = []
        self.repairs: list[dict[str, Any]] = []
        self._quiet_until = 0
        self._fault_since_snapshot = False
        self._snapshot()

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
                self._snapshot()
            self._fault_since_snapshot = False
        return None

    def _snapshot(self) -> None:
        self.snapshots.append(self.state.snapshot())
        del self.snapshots[:-KEEP_SNAPSHOTS]

    def _repair(self, step: int, finding: Finding) -> None:
        state = self.state
        snapshot = self.snapshots[0]
        state.roll_back(snapshot)
        self.snapshots = [snapshot]

        fix = FIXES[finding.code]
        actions = [f"rolled back to step {snapshot['step']}"]
        lr_factor = fix.lr_factor
        if fix.leaky_relu:
            swapped = _swap_relu(state.model)
            if swapped:
                actions.append(f"replaced {swapped} ReLU modules with LeakyReLU(0.01)")
                self.doctor.reattach()
            else:
                lr_factor = 0.3
        if lr_factor != 1.0:
            before = state.optimizer.param_groups[0]["lr"]
            scale_lr(state.optimizer, state.scheduler, lr_factor)
            after = state.optimizer.param_groups[0]["lr"]
            actions.append(f"learning rate {before:.3g} -> {after:.3g}")
        if fix.clip and (state.grad_clip is None or state.grad_clip > CLIP_NORM):
            actions.append(f"gradient clipping {state.grad_clip} -> {CLIP_NORM:g}")
            state.grad_clip = CLIP_NORM
        record = {
            "step": step,
            "code": finding.code,
            "name": finding.name,
            "action": "; ".join(actions),
            "rolled_back_to": snapshot["step"],
        }
        self.repairs.append(record)
        self.doctor.rebaseline()
        self._quiet_until = step + self.cooldown
        self._fault_since_snapshot = False
        if self.on_repair is not None:
            self.on_repair(record)


def _swap_relu(model: nn.Module) -> int:
    """Replace every nn.ReLU module with nn.LeakyReLU(0.01) in place; returns how many."""
    count = 0
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is nn.ReLU:
                setattr(module, name, nn.LeakyReLU(0.01, inplace=child.inplace))
                count += 1
    return count
