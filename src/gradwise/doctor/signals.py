"""Signals: the time series the Doctor's telemetry collects and its rules read.

Telemetry is separate from judgment: hooks fill these series cheaply; rules are pure functions over
them, so every rule can be tested on a synthetic series without training anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Series:
    """(step, value) pairs in step order."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def append(self, step: int, value: float) -> None:
        self.steps.append(step)
        self.values.append(float(value))

    def last(self, n: int = 1) -> list[float]:
        return self.values[-n:]

    def __len__(self) -> int:
        return len(self.values)

    def pairs(self, limit: int | None = None) -> list[list[float]]:
        """[[step, value], ...], evenly thinned to at most ``limit`` points (for reports)."""
        stride = max(1, math.ceil(len(self) / limit)) if limit else 1
        return [[s, v] for s, v in zip(self.steps[::stride], self.values[::stride], strict=True)]


@dataclass
class Activation:
    """Statistics of one module's outputs at sampled steps."""

    kind: str  # the module's class name, e.g. ReLU, Tanh, Linear
    mean: Series = field(default_factory=Series)
    std: Series = field(default_factory=Series)
    dead: Series = field(
        default_factory=Series
    )  # ReLU: fraction of units never active in the window
    saturated: Series = field(
        default_factory=Series
    )  # sigmoid/tanh: fraction of outputs near the bounds


@dataclass
class Signals:
    """Everything the live rules look at."""

    step: int = 0  # doctor.step() calls so far
    loss: Series = field(default_factory=Series)  # every step
    lr: Series = field(default_factory=Series)  # sampled
    grad_norm: Series = field(
        default_factory=Series
    )  # global L2 norm (before clipping), every step
    new_values: int = 0  # per-step values added since the rules last ran
    since: int = 0  # per-step series start here for the rules (moved on after a repair's rollback)
    layers: list[str] = field(default_factory=list)  # modules with parameters, in forward order
    layer_grad_norm: dict[str, Series] = field(default_factory=dict)  # relative: ||g|| / ||w||
    zero_init: set[str] = field(default_factory=set)  # layers seen with all-zero weights
    update_ratio: dict[str, Series] = field(default_factory=dict)  # ||w_t+1 - w_t|| / ||w_t||
    activations: dict[str, Activation] = field(default_factory=dict)
    output_module: str | None = None  # the last module to run in a forward pass
    init_activation_stds: list[tuple[str, float]] = field(default_factory=list)
    # one entry per validate(): {"step", "loss", "metric", "train_loss"} (mean train loss since the
    # previous validate); loss and metric may be None when not given
    val: list[dict[str, float | None]] = field(default_factory=list)
    # the loss on the probe set from the original task (Doctor(probe=...)): the first value before
    # any update, then one per validate(); probe_noise: the standard error of the first value
    probe_loss: Series = field(default_factory=Series)
    probe_noise: float = 0.0
    num_classes: int | None = None  # from the outputs, for chance-level checks
    target_var: float | None = None  # variance of the first steps' float targets (regression)
    loss_kind: str = "other"
    loss_scaling: bool = False  # fp16 GradScaler: overflowing gradients are expected and skipped
    grad_clip: float | None = None  # the norm gradients are clipped to, when the loop says so
    _ema: dict | None = field(default=None, repr=False)  # state of smoothed_losses()

    def smoothed_losses(self) -> list[float]:
        """Bias-corrected EMA (beta 0.9, as Adam's) of the finite losses since the last rollback.

        Updated incrementally: each call only processes the losses added since the last one.
        """
        state = self._ema
        if state is None or state["since"] != self.since:
            state = self._ema = {
                "since": self.since,
                "pos": self.since,
                "avg": 0.0,
                "n": 0,
                "out": [],
            }
        avg, n, out = state["avg"], state["n"], state["out"]
        for value in self.loss.values[state["pos"] :]:
            if math.isfinite(value):
                n += 1
                avg = EMA_BETA * avg + (1 - EMA_BETA) * value
                out.append(avg / (1 - EMA_BETA**n))
        state.update(pos=len(self.loss.values), avg=avg, n=n)
        return out

    def losses(self) -> list[float]:
        """Per-step losses the rules judge: those since the last rollback."""
        return self.loss.values[self.since :]

    def grads(self) -> tuple[list[int], list[float]]:
        """(steps, global gradient norms) since the last rollback."""
        return self.grad_norm.steps[self.since :], self.grad_norm.values[self.since :]

    def median_update_ratio(self, samples: int = 1) -> float | None:
        """Median over layers of each layer's mean update ratio in the last ``samples`` samples."""
        per_layer = [
            sum(s.last(samples)) / len(s.last(samples))
            for s in self.update_ratio.values()
            if len(s)
        ]
        if not per_layer:
            return None
        per_layer.sort()
        return per_layer[len(per_layer) // 2]

    def to_dict(self, limit: int = 2000) -> dict:
        """The telemetry format of ``doctor/telemetry.json`` (series thinned to ``limit`` points)."""
        return {
            "loss": self.loss.pairs(limit),
            "lr": self.lr.pairs(limit),
            "grad_norm": self.grad_norm.pairs(limit),
            "layers": list(self.layers),
            "layer_grad_norm": {k: v.pairs(limit) for k, v in self.layer_grad_norm.items()},
            "update_ratio": {k: v.pairs(limit) for k, v in self.update_ratio.items()},
            "activations": {
                name: {
                    "kind": a.kind,
                    "mean": a.mean.pairs(limit),
                    "std": a.std.pairs(limit),
                    "dead": a.dead.pairs(limit),
                    "saturated": a.saturated.pairs(limit),
                }
                for name, a in self.activations.items()
            },
            "val": list(self.val),
            **({"probe_loss": self.probe_loss.pairs(limit)} if len(self.probe_loss) else {}),
        }


EMA_BETA = 0.9


def smooth(values: list[float], beta: float = EMA_BETA) -> list[float]:
    """Bias-corrected exponential moving average (as in Adam), for noisy mini-batch losses."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out
