"""Learning-rate range test (Smith 2015/2017, 'Cyclical Learning Rates for Training Neural Networks').

Train a private copy of the model for a few steps while the learning rate grows exponentially from
``start_lr`` to ``end_lr``; the smoothed loss falls, bottoms out and then blows up. The good
learning rates lie before the bottom. See :func:`lr_range_test` for how the suggestion is chosen.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from gradwise._format import times

logger = logging.getLogger(
    __name__
)  # INFO: the sweep's progress (gradwise advise --probe shows it)

# ---------------------------------------------------------------------------- suggestion table

STEEP_WINDOW = 0.5
"""Width, in decades of learning rate, of the central difference that measures the slope of the
smoothed loss against log10(lr): wide enough to ignore step-to-step noise, narrow enough to keep
the shape of the descent (7 steps at the default 100 steps over 8 decades)."""
STEEP_FRACTION = 0.7
"""The steep region is the stretch of learning rates, around the steepest point, where the smoothed
loss falls at least this fraction as fast as at the steepest point; the suggestion is its centre
(in log space). A single argmax of the slope jumps about on noisy, nearly straight descents; the
centre of the region does not."""
MIN_DROP = 0.05
"""The smoothed loss must fall by at least this fraction of its starting value before its minimum;
otherwise the curve shows no descent to read and the suggestion falls back on lr_min / 10."""
MIN_LOSS_DIVISOR = 10.0
"""Fallback without a clear descent: the lr of the smoothed minimum divided by 10 (Smith 2017,
fastai's ``minimum``)."""
SKIP_START = 0.1
"""Fraction of the first steps left out of the search: the bias-corrected average of a handful of
batches is still noisy."""
STEEP_METHOD = "centre of the steepest descent"
"""``LRRangeResult.method`` when the suggestion comes from a clear descent of the loss ..."""
NO_FINITE_LOSS = "no finite loss"
"""... and when the sweep had no finite loss to read."""

# ---------------------------------------------------------------------------- planned lr vs the test

TOO_HIGH_FACTOR = 10.0
"""A planned learning rate more than this many times the suggestion is too high even where the
sweep did not diverge: the suggestion is where the loss falls fastest, and a whole run at 10x it
is past where gradwise's examples train best (the character-level Transformer is already clearly
worse at 4x; the sweep's minimum survives a few steps, not a run: Smith 2017)."""
TOO_LOW_FACTOR = 100.0
"""A planned learning rate this many times below the suggestion (two decades) learns far slower
than it could; only a note (info), since fine-tuning uses small rates on purpose, and the examples'
validation loss is flat over two to three decades around the best rate."""


@dataclass
class LRRangeResult:
    """The outcome of a range test: the curve, the suggestion and where the loss blew up.

    ``losses`` are the smoothed (bias-corrected EMA) losses, ``raw_losses`` the per-step losses.
    """

    lrs: list[float]
    losses: list[float]
    suggestion: float
    lr_min_loss: float
    diverged_at: float | None
    raw_losses: list[float] = field(default_factory=list)
    steepest: float | None = None
    method: str = ""

    def plot(self, path: str | Path) -> Path:
        """Save the curve as a PNG (matplotlib, Agg backend) with the suggestion marked."""
        try:  # the Agg canvas directly: no pyplot, no change to the user's global backend
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError(
                "LRRangeResult.plot needs matplotlib: pip install matplotlib (or gradwise[tune])"
            ) from None

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig = Figure(figsize=(6.4, 4.2), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        if self.raw_losses:
            ax.plot(self.lrs, self.raw_losses, color="0.8", lw=0.8, label="loss")
        ax.plot(self.lrs, self.losses, color="C0", lw=1.8, label="smoothed loss")
        ax.axvline(self.suggestion, color="C2", ls="--", label=f"suggestion {self.suggestion:.2g}")
        ax.axvline(self.lr_min_loss, color="C1", ls=":", label=f"minimum {self.lr_min_loss:.2g}")
        if self.diverged_at is not None:
            ax.axvline(
                self.diverged_at, color="C3", ls=":", label=f"diverged {self.diverged_at:.2g}"
            )
        finite = [v for v in self.losses if math.isfinite(v)]
        if finite:
            lo, hi = min(finite), finite[0]
            ax.set_ylim(lo - 0.1 * (hi - lo + 1e-12), max(hi, lo) + 0.5 * (hi - lo + 1e-12))
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss")
        ax.set_title("learning-rate range test")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, format="png")
        return path

    def compare(self, planned_lr: float) -> LRComparison:
        """Judge ``planned_lr`` (the rate the run will use; its peak) against this test."""
        s, p, d = self.suggestion, planned_lr, self.diverged_at
        evidence = {"planned_lr": p, "suggested_lr": s, "lr_min_loss": self.lr_min_loss}
        if d is not None:
            evidence["diverged_at_lr"] = d
        evidence["planned_to_suggested"] = p / s
        if self.method == NO_FINITE_LOSS:
            return LRComparison(
                p,
                "unknown",
                f"the range test cannot judge the planned lr {p:.3g}: its loss was never finite",
                evidence,
            )
        diverged = d is not None and len(self.lrs) > 1
        clear = self.method == STEEP_METHOD  # without a clear descent the suggestion is a guess
        where = (
            f"diverged at {d:.3g}" if d is not None else f"did not diverge up to {self.lrs[-1]:.3g}"
        )
        if diverged and p >= d:
            return LRComparison(
                p,
                "diverges",
                f"the planned learning rate {p:.3g} is at or above {d:.3g}, where the loss diverged "
                f"in the learning-rate range test (suggestion {s:.3g}, loss lowest at "
                f"{self.lr_min_loss:.3g}): training will diverge; lower it to about {s:.2g}",
                evidence,
                "GW305",
                "error",
            )
        if clear and p > TOO_HIGH_FACTOR * s:
            return LRComparison(
                p,
                "high",
                f"the planned learning rate {p:.3g} is {times(p / s)} the learning-rate range "
                f"test's suggestion {s:.3g} (the loss was lowest at {self.lr_min_loss:.3g} and "
                f"{where}): too high to train well for a whole run; lower it toward {s:.2g}",
                evidence,
                "GW305",
                "warning",
            )
        if clear and p * TOO_LOW_FACTOR < s:
            return LRComparison(
                p,
                "low",
                f"the planned learning rate {p:.3g} is {times(s / p)} below the learning-rate "
                f"range test's suggestion {s:.3g}: training will be slow; raise it toward the "
                "suggestion (unless a small rate is deliberate, as in fine-tuning)",
                evidence,
                "GW306",
                "info",
            )
        return LRComparison(
            p,
            "ok",
            f"planned lr {p:.3g} is within the range test's stable range ({where}); "
            f"suggestion {s:.3g}",
            evidence,
        )

    def __str__(self) -> str:
        div = f", diverged at {self.diverged_at:.3g}" if self.diverged_at is not None else ""
        return (
            f"lr range test: suggestion {self.suggestion:.3g} ({self.method}); smoothed loss "
            f"lowest at lr {self.lr_min_loss:.3g}{div}; {len(self.lrs)} steps"
        )


@dataclass(frozen=True)
class LRComparison:
    """The learning rate a run will use, judged against a range test (:meth:`LRRangeResult.compare`).

    ``verdict``: "diverges" (at or above where the sweep's loss diverged), "high" (more than
    TOO_HIGH_FACTOR times the suggestion), "low" (TOO_LOW_FACTOR times below it), "ok", or
    "unknown" (the sweep's loss was never finite).
    ``code``/``severity``: the finding it makes (GW305 error/warning, GW306 info), None when ok.
    """

    planned: float
    verdict: str
    message: str
    evidence: dict[str, float]
    code: str | None = None
    severity: str | None = None

    @property
    def problem(self) -> bool:
        """The planned rate is too high: the run will diverge or train badly."""
        return self.verdict in ("diverges", "high")

    def __str__(self) -> str:
        return self.message


def peak_lr(group: dict[str, Any]) -> float:
    """A parameter group's peak learning rate: a scheduler's ``max_lr`` (OneCycleLR) or
    ``initial_lr`` (every other scheduler, e.g. during warmup), else its ``lr``; NaN without any."""
    for key in ("max_lr", "initial_lr", "lr"):
        if group.get(key) is not None:
            return float(group[key])
    return math.nan


# ---------------------------------------------------------------------------- helpers shared with preflight


def private_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without the forward/backward hooks of the original (a Doctor's
    hooks must not see the copy's activations)."""
    clone = copy.deepcopy(model)
    for module in clone.modules():
        for attr in (
            "_forward_hooks",
            "_forward_hooks_with_kwargs",
            "_forward_hooks_always_called",
            "_forward_pre_hooks",
            "_forward_pre_hooks_with_kwargs",
            "_backward_hooks",
            "_backward_pre_hooks",
        ):
            hooks = getattr(module, attr, None)
            if isinstance(hooks, dict):
                hooks.clear()
    for p in clone.parameters():
        if getattr(p, "_backward_hooks", None):
            p._backward_hooks = None
    return clone


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def to_dataset(data: Any) -> Dataset:
    """A Dataset from a Dataset, a DataLoader (its dataset) or an ``(X, y)`` pair."""
    from gradwise.data import as_dataset

    if isinstance(data, DataLoader):
        return data.dataset
    return as_dataset(data)


def batch_at(dataset: Dataset, index: torch.Tensor) -> tuple[Any, Any]:
    """The samples at ``index`` as one (inputs, targets) batch."""
    tensors = getattr(dataset, "tensors", None)
    if isinstance(tensors, (tuple, list)) and len(tensors) >= 2:
        return tensors[0][index], tensors[-1][index]
    x, y = default_collate([dataset[int(i)] for i in index])[:2]
    return x, y


def batches(dataset: Dataset, batch_size: int, seed: int) -> Iterator[tuple[Any, Any]]:
    """Endless shuffled batches (a fresh permutation each pass, fixed by ``seed``)."""
    n = len(dataset)
    size = max(1, min(batch_size, n))
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - size + 1, size):
            yield batch_at(dataset, order[start : start + size])


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def forward(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


def build_optimizer_like(
    optimizer: str | type | torch.optim.Optimizer, original: nn.Module, clone: nn.Module, lr: float
) -> tuple[torch.optim.Optimizer, list[float]]:
    """A fresh optimizer over ``clone``'s parameters, and each group's lr relative to the first.

    A name ("adamw", "adam", "sgd", "lion") builds gradwise's optimizer with its parameter groups and
    default hyperparameters; a class is called with ``clone.parameters()``; an instance is copied:
    same class, same groups (mapped from ``original``'s parameters to the clone's by position), same
    hyperparameters, and none of its state. The instance itself is never touched.
    """
    if isinstance(optimizer, str):
        from gradwise.optim import build_optimizer
        from gradwise.recipe import OptimSpec

        opt = build_optimizer(clone, OptimSpec(name=optimizer.lower(), lr=lr))
        return opt, [1.0] * len(opt.param_groups)
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        opt = optimizer([p for p in clone.parameters() if p.requires_grad], lr=lr)
        return opt, [1.0] * len(opt.param_groups)
    if isinstance(optimizer, torch.optim.Optimizer):
        index = {id(p): i for i, p in enumerate(original.parameters())}
        params = list(clone.parameters())
        groups = []
        for group in optimizer.param_groups:
            mapped = [params[index[id(p)]] for p in group["params"] if id(p) in index]
            if mapped:
                hyper = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
                groups.append({**hyper, "params": mapped})
        if not groups:
            raise ValueError("the optimizer holds none of the model's parameters")
        base = peak_lr({"lr": lr, **groups[0]}) or 1.0  # not lr: a warmup may have set it to 0
        ratios = [peak_lr({"lr": base, **g}) / base for g in groups]
        try:
            opt = type(optimizer)(groups, **dict(optimizer.defaults))
        except TypeError:
            opt = type(optimizer)(groups)
        return opt, ratios
    raise TypeError(
        f"optimizer must be a name, an Optimizer class or instance; got {type(optimizer).__name__}"
    )


# ---------------------------------------------------------------------------- the suggestion


def _smoothed_slopes(log_lrs: list[float], losses: list[float]) -> list[float]:
    """d(loss)/d(log10 lr) by central differences over a window of STEEP_WINDOW decades."""
    n = len(log_lrs)
    if n < 3:
        return [0.0] * n
    per_step = (log_lrs[-1] - log_lrs[0]) / (n - 1) or 1.0
    half = max(1, round(STEEP_WINDOW / 2 / per_step))
    slopes = []
    for i in range(n):
        a, b = max(0, i - half), min(n - 1, i + half)
        slopes.append((losses[b] - losses[a]) / (log_lrs[b] - log_lrs[a]) if b > a else 0.0)
    return slopes


def suggest(lrs: list[float], losses: list[float]) -> tuple[float, float, float | None, str]:
    """(suggestion, lr at the minimum smoothed loss, steepest-descent lr or None, method).

    The suggestion is the centre (in log10 lr) of the steep region of the smoothed loss: the
    stretch before the minimum where the loss falls at least ``STEEP_FRACTION`` as fast per decade
    as at its steepest point. This is a robust form of the steepest-descent rule (Smith 2017,
    section 3.3: a good learning rate is where the loss drops fastest; fastai's ``steep``
    suggester), chosen over ``lr_min / 10`` because the minimum of an Adam range test sits at
    learning rates that survive a few steps, not a whole training run. Calibrated with the default
    settings (100 steps from 1e-7 to 10, ``smooth=0.05``) against full AdamW + warmup/cosine
    trainings of gradwise's four examples: for the character-level Transformer, whose quality
    depends most on the learning rate, it picks 2.5e-3 against a best of 3e-3 (1e-2 is clearly
    worse); on the digits CNN, breast-cancer MLP and diabetes MLP it lands where full training
    works well (their validation loss is flat over two to three decades). Falls back on
    ``lr_min / MIN_LOSS_DIVISOR`` when the curve shows no clear descent.
    """
    n = len(losses)
    first = min(int(n * SKIP_START), max(n - 1, 0))
    finite = [i for i in range(first, n) if math.isfinite(losses[i])]
    if not finite:
        return lrs[0], lrs[0], None, NO_FINITE_LOSS
    i_min = min(finite, key=lambda i: losses[i])
    lr_min = lrs[i_min]
    fallback = (lr_min / MIN_LOSS_DIVISOR, lr_min, None, "lr_min/10 (no clear descent)")
    start = losses[finite[0]]
    if start - losses[i_min] < MIN_DROP * abs(start) or i_min - first < 2:
        return fallback
    logs = [math.log10(lr) for lr in lrs]
    slopes = _smoothed_slopes(logs[: i_min + 1], losses[: i_min + 1])
    i_steep = min(range(first, i_min + 1), key=lambda i: slopes[i])
    steepest = slopes[i_steep]
    if not steepest < 0:
        return fallback
    a = b = i_steep
    while a - 1 >= first and slopes[a - 1] <= STEEP_FRACTION * steepest:
        a -= 1
    while b + 1 <= i_min and slopes[b + 1] <= STEEP_FRACTION * steepest:
        b += 1
    suggestion = 10 ** ((logs[a] + logs[b]) / 2)
    return suggestion, lr_min, lrs[i_steep], STEEP_METHOD


# ---------------------------------------------------------------------------- the test


def lr_range_test(
    model: nn.Module,
    data: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    *,
    optimizer: str | type | torch.optim.Optimizer = "adamw",
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    steps: int = 100,
    batch_size: int = 32,
    smooth: float = 0.05,
    diverge: float = 4.0,
    seed: int = 0,
    grad_clip: float | None = None,
) -> LRRangeResult:
    """Sweep the learning rate exponentially from ``start_lr`` to ``end_lr`` over ``steps`` steps.

    Runs on a private deep copy of ``model`` in training mode with a fresh optimizer (``optimizer``:
    a name, "adamw" by default with gradwise's parameter groups; an Optimizer class; or an
    instance whose class, groups and hyperparameters are copied, never its state). ``data`` is a
    Dataset, a DataLoader (its dataset is used) or ``(X, y)``; batches of ``batch_size`` are drawn
    in a shuffled order fixed by ``seed``. The loss is smoothed with an exponential moving average
    (weight ``smooth`` on each new loss, bias-corrected as in Adam) and the sweep stops when the
    smoothed loss exceeds ``diverge`` times its best or a loss is not finite. ``grad_clip`` clips
    the gradient norm as training will (None: no clipping; the suggestion barely moves with it).

    The suggestion (:func:`suggest`) is the centre of the steepest stretch of the smoothed curve,
    a robust form of the steepest-descent rule (Smith 2017; fastai's ``steep``); the curve's
    minimum is reported as ``lr_min_loss``.

    The user's model and optimizer are never modified, and the global RNG state (CPU and CUDA) is
    restored afterwards.
    """
    if not (0 < start_lr < end_lr):
        raise ValueError(f"need 0 < start_lr < end_lr; got {start_lr} and {end_lr}")
    if steps < 2:
        raise ValueError("steps must be at least 2")
    if not 0 < smooth <= 1:
        raise ValueError("smooth must be in (0, 1]")
    dataset = to_dataset(data)
    device = model_device(model)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        clone = private_copy(model)
        clone.train()
        opt, ratios = build_optimizer_like(optimizer, model, clone, start_lr)
        params = [p for g in opt.param_groups for p in g["params"]]
        factor = (end_lr / start_lr) ** (1 / (steps - 1))
        lrs: list[float] = []
        raw: list[float] = []
        smoothed: list[float] = []
        avg, best, diverged_at = 0.0, math.inf, None
        source = batches(dataset, batch_size, seed)
        started = time.perf_counter()
        for step in range(steps):
            if step and step % 20 == 0:
                logger.info(
                    "lr range test: step %d/%d, lr %.2g, loss %.4g (%.0f s)",
                    step, steps, lrs[-1], smoothed[-1], time.perf_counter() - started,
                )  # fmt: skip
            lr = start_lr * factor**step
            for group, ratio in zip(opt.param_groups, ratios, strict=True):
                group["lr"] = lr * ratio
            x, y = next(source)
            x, y = to_device(x, device), to_device(y, device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(forward(clone, x), y)
            value = float(loss.detach())
            lrs.append(lr)
            raw.append(value)
            if not math.isfinite(value):
                smoothed.append(math.inf)
                diverged_at = lr
                break
            avg = (1 - smooth) * avg + smooth * value
            current = avg / (1 - (1 - smooth) ** (step + 1))
            smoothed.append(current)
            best = min(best, current)
            if step > 0 and current > diverge * best:
                diverged_at = lr
                break
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
        del clone, opt
    suggestion, lr_min, steep, method = suggest(lrs, smoothed)
    return LRRangeResult(
        lrs=lrs,
        losses=smoothed,
        suggestion=suggestion,
        lr_min_loss=lr_min,
        diverged_at=diverged_at,
        raw_losses=raw,
        steepest=steep,
        method=method,
    )


__all__ = ["LRComparison", "LRRangeResult", "lr_range_test", "peak_lr", "suggest"]
