"""The training state: everything a run changes as it trains, in one object with one state_dict.

Checkpoints save it, resume loads it, and the doctor's repair snapshots it and rolls it back, all
through the same two methods. The weights themselves go to safetensors (gradwise.checkpoint); the
rest (optimizer, schedule, loss scaler, counters, every random generator, the data position) is
plain tensors and values that load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from gradwise import checkpoint as ckpt

LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")  # the rates a param group may carry


@dataclass
class Position:
    """Where training is: what a checkpoint records to resume exactly."""

    epoch: int = 0
    batch: int = 0  # micro-batches consumed in this epoch
    step: int = 0  # optimizer steps so far


@dataclass
class TrainState:
    """Model, optimizer, schedule, loss scaler, EMA, the data position, the best result so far, the
    loss totals of the epoch and of the last logging interval, and the gradient clip (which a repair
    may tighten)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    ema: nn.Module | None = None
    grad_clip: float | None = None
    position: Position = field(default_factory=Position)
    best: float | None = None
    best_step: int = -1
    bad_evals: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    epoch_rng: dict[str, Any] | None = None  # the random state when the epoch began
    # loss sum and count since the epoch began, and at the last logged step (device tensors)
    loss_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    loss_count: torch.Tensor = field(default=None)  # type: ignore[assignment]
    log_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    log_count: torch.Tensor = field(default=None)  # type: ignore[assignment]
    sharded: bool = False  # FSDP2: the optimizer's state goes to the sharded checkpoint instead

    def __post_init__(self) -> None:
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        for name in ("loss_sum", "loss_count", "log_sum", "log_count"):
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros((), device=device))

    @property
    def totals(self) -> tuple[torch.Tensor, ...]:
        return (self.loss_sum, self.loss_count, self.log_sum, self.log_count)

    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights, as tensors and plain values (and every RNG's state)."""
        return {
            "position": asdict(self.position),
            "optimizer": None if self.sharded else self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": ckpt.rng_state(),
            "epoch_rng": self.epoch_rng,
            "best": self.best,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "history": self.history,
            "grad_clip": self.grad_clip,
            "loss_sums": torch.stack(self.totals).cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The inverse of :meth:`state_dict` (the weights are loaded with the checkpoint)."""
        if state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.position = Position(**state["position"])
        self.best, self.best_step, self.bad_evals = (
            state["best"],
            state["best_step"],
            state["bad_evals"],
        )
        self.history = list(state["history"])
        self.epoch_rng = state["epoch_rng"]
        self.grad_clip = state.get("grad_clip", self.grad_clip)  # older checkpoints lack it
        for total, value in zip(self.totals, state["loss_sums"], strict=True):
            total.copy_(value)
        ckpt.set_rng_state(state["rng"])

    def snapshot(self) -> dict[str, Any]:
        """An in-memory copy of the weights, optimizer, scaler and EMA (for a repair's rollback)."""
        return {
            "step": self.position.step,
            "model": copy.deepcopy(self.model.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scaler": self.scaler.state_dict(),
            "ema": copy.deepcopy(self.ema.state_dict()) if self.ema is not None else None,
        }

    def roll_back(self, snapshot: dict[str, Any]) -> None:
        """Back to ``snapshot``'s weights and optimizer state; the schedule's current rates stay,
        and the loss totals start afresh (the losses since belong to a discarded trajectory)."""
        self.model.load_state_dict(snapshot["model"])
        rates = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(snapshot["optimizer"])
        for group, kept in zip(self.optimizer.param_groups, rates, strict=True):
            group.update(kept)
        self.scaler.load_state_dict(snapshot["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(snapshot["ema"])
        for total in self.totals:
            total.zero_()


def scale_lr(
    optimizer: torch.optim.Optimizer, scheduler: Any, factors: float | list[float]
) -> None:
    """Multiply each param group's learning rate (and its schedule's peak and floor) by its factor,
    now and for the rest of the schedule: the schedule keeps its position and shape."""
    groups = optimizer.param_groups
    factors = [factors] * len(groups) if isinstance(factors, (int, float)) else factors
    for group, factor in zip(groups, factors, strict=True):
        for key in LR_KEYS:
            if isinstance(group.get(key), float):
                group[key] *= factor
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr * f for lr, f in zip(scheduler.base_lrs, factors, strict=True)]
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = [g["lr"] for g in groups]
