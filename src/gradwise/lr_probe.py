"""A budgeted learning-rate probe: short runs of candidate rates around a prior, judged on held-out loss.

    result = probe_lr(model, train_dataset, loss_fn, prior=3e-3, optim=spec, schedule=schedule,
                      batch_size=32, grad_clip=1.0, run_steps=1500)
    result.chosen, result.candidates, result.losses, result.steps, result.seconds

Each candidate trains a private copy of the model from the same initial weights, on the same batches,
with the run's optimizer (its parameter groups, weight decay and clipping) and the run's schedule
compressed into the probe (warmup, then cosine to the floor), and is judged by its loss on samples
held out of the training data. The candidates sit on a half-decade grid around the prior; when the
best one is at an edge the grid grows that way, up to ``MAX_DECADES`` from the prior. The rate chosen
is the geometric centre of the candidates whose loss is within ``NEAR`` of the best (the bottom of
the valley, not the noisiest point in it).

This is successive-halving's first rung (Jamieson & Talwalkar 2016; Li et al. 2018) with one idea of
Smith's range test kept (the loss, not a metric, reads the rate) and the cost bounded in advance: the
candidates share ``BUDGET`` of the run's optimizer steps. The numbers are measured on the tasks in
benchmarks/lr_judgment.py (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from gradwise.doctor.lr_finder import batch_at, batches, forward, private_copy, to_device
from gradwise.recipe import OptimSpec, ScheduleSpec

logger = logging.getLogger(__name__)  # INFO: each candidate's result (gradwise advise --probe)

BUDGET = 0.1
"""The candidates together train for about this fraction of the run's optimizer steps..."""
NOMINAL_CANDIDATES = 4
"""...shared by this many: the first three and one step of the grid growing."""
STEPS = (12, 400)
"""Bounds on each candidate's steps. Below 12 the held-out losses barely move from the untrained
model's and rank the candidates by noise; a run too short to give three candidates that many
steps within BUDGET is not probed (its rule's rate stands). Above 400 the ranking has settled,
and the probe of a long run stays within minutes."""
GRID = 0.5
"""Decades between neighbouring candidates: a factor of 3.16, the resolution at which held-out loss
against the learning rate stops being flat (docs/benchmarks.md, lr_finder)."""
FIRST = (-1, 0, 1)
"""The first candidates, in grid steps from the prior."""
MAX_DECADES = 2.0
"""How far the grid may grow from the prior, a step at a time, while the best candidate sits at
its edge (the benchmark's rules of thumb were off by up to 30x before their priors were fitted)."""
NEAR = 0.01
"""Candidates whose held-out loss is within this fraction of the best count as equally good; the
rate chosen is their geometric centre."""
HOLDOUT = (0.15, 64, 512)
"""Samples held out of the training data to judge the candidates: this fraction, within these
bounds (enough for the loss to rank them, few enough to evaluate in a fraction of the probe)."""
DIVERGED = 1.5
"""A candidate whose held-out loss exceeds this multiple of the untrained model's diverged."""


@dataclass
class ProbeResult:
    """The evidence behind a probed learning rate."""

    prior: float
    chosen: float
    candidates: list[float]
    losses: list[float | None]  # held-out loss after training (None: diverged or not finite)
    initial_loss: float
    steps: int  # optimizer steps per candidate
    run_steps: int
    held_out: int
    near: list[float] = field(default_factory=list)  # the candidates within NEAR of the best
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line for the advice: the candidates, their losses and the choice."""
        shown = ", ".join(
            f"{lr:.2g}: {'diverged' if loss is None else f'{loss:.4g}'}"
            for lr, loss in zip(self.candidates, self.losses, strict=True)
        )
        total = self.steps * len(self.candidates)
        return (
            f"probed {len(self.candidates)} rates around {self.prior:.2g} for {self.steps} steps "
            f"each ({total:,} steps, {total / max(self.run_steps, 1):.0%} of the run's "
            f"{self.run_steps:,}; {self.seconds:.1f} s), held-out loss on {self.held_out} "
            f"training samples kept aside (untrained {self.initial_loss:.4g}): {shown}; "
            f"within {NEAR:.0%} of the best: {', '.join(f'{lr:.2g}' for lr in self.near)}, "
            f"centre {self._centre():.2g}"
        )

    def _centre(self) -> float:
        return math.exp(sum(math.log(lr) for lr in self.near) / len(self.near))


def probe_lr(
    model: nn.Module,
    dataset: Dataset,
    loss_fn: Any,
    *,
    prior: float,
    optim: OptimSpec,
    schedule: ScheduleSpec,
    batch_size: int,
    run_steps: int,
    grad_clip: float | None = None,
    seed: int = 0,
) -> ProbeResult | None:
    """Probe rates around ``prior`` (see the module docstring); None when ``run_steps`` is too short
    to probe within the budget. The model is never modified and the global random state is left as
    it was."""
    from gradwise.optim import build_optimizer, lr_multiplier

    started = time.perf_counter()
    train, held = _split(dataset, seed)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    share = BUDGET * run_steps
    if share < STEPS[0] * len(FIRST):
        return None
    steps = min(max(round(share / NOMINAL_CANDIDATES), STEPS[0]), STEPS[1])
    multiplier = lr_multiplier(schedule, steps)
    held_batches = [to_device(b, device) for b in _chunks(held)]

    def evaluate(net: nn.Module) -> float | None:
        net.eval()
        total = count = 0.0
        with torch.no_grad():
            for x, y in held_batches:
                total += float(loss_fn(forward(net, x), y)) * len(y)
                count += len(y)
        net.train()
        loss = total / count
        return loss if math.isfinite(loss) else None

    def run(lr: float) -> float | None:
        clone = private_copy(model).train()
        opt = build_optimizer(clone, optim.model_copy(update={"lr": lr}))
        peaks = [g["lr"] for g in opt.param_groups]
        params = [p for g in opt.param_groups for p in g["params"]]
        source = batches(train, batch_size, seed)
        for step in range(steps):
            for group, peak in zip(opt.param_groups, peaks, strict=True):
                group["lr"] = peak * multiplier(step)
            x, y = to_device(next(source), device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(forward(clone, x), y)
            if not torch.isfinite(loss):
                return None
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
        loss = evaluate(clone)
        logger.info("lr probe: %.2g for %d steps: held-out loss %s", lr, steps, loss)
        return loss

    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        initial = evaluate(private_copy(model)) or math.inf
        losses: dict[int, float | None] = {}
        for k in FIRST:
            losses[k] = _judge(run(prior * 10 ** (k * GRID)), initial)
        while True:  # grow the grid while the best candidate sits at its edge
            best = _best(losses)
            edge = (
                min(losses) if best == min(losses) else max(losses) if best == max(losses) else None
            )
            if edge is None or abs(edge * GRID) >= MAX_DECADES:
                break
            k = edge - 1 if edge == min(losses) else edge + 1
            losses[k] = _judge(run(prior * 10 ** (k * GRID)), initial)
    order = sorted(losses)
    candidates = [prior * 10 ** (k * GRID) for k in order]
    values = [losses[k] for k in order]
    finite = [v for v in values if v is not None]
    if not finite:  # every candidate diverged: keep the lowest rate probed, the prior's side
        near = [candidates[0]]
    else:
        best = min(finite)
        near = [
            lr
            for lr, v in zip(candidates, values, strict=True)
            if v is not None and v <= best * (1 + NEAR)
        ]
    centre = math.exp(sum(math.log(lr) for lr in near) / len(near))
    chosen = float(f"{centre:.2g}")
    return ProbeResult(
        prior=prior,
        chosen=chosen,
        candidates=candidates,
        losses=values,
        initial_loss=initial,
        steps=steps,
        run_steps=run_steps,
        held_out=len(held),
        near=near,
        seconds=time.perf_counter() - started,
    )


def _judge(loss: float | None, initial: float) -> float | None:
    return None if loss is None or loss > DIVERGED * initial else loss


def _best(losses: dict[int, float | None]) -> int:
    finite = {k: v for k, v in losses.items() if v is not None}
    if not finite:
        return min(losses)
    return min(finite, key=finite.get)


def _split(dataset: Dataset, seed: int) -> tuple[Dataset, Dataset]:
    """Training and held-out parts of ``dataset`` (a fixed random split)."""
    n = len(dataset)
    fraction, low, high = HOLDOUT
    size = min(max(round(fraction * n), low), high, n // 2)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return _take(dataset, order[size:]), _take(dataset, order[:size])


def _take(dataset: Dataset, index: torch.Tensor) -> Dataset:
    tensors = getattr(dataset, "tensors", None)
    if isinstance(tensors, (tuple, list)) and len(tensors) >= 2:  # in memory: slice, keep fast
        return TensorDataset(*(t[index] for t in tensors))
    return Subset(dataset, index.tolist())


def _chunks(dataset: Dataset, size: int = 256) -> list[tuple[Any, Any]]:
    n = len(dataset)
    return [batch_at(dataset, torch.arange(i, min(i + size, n))) for i in range(0, n, size)]


__all__ = ["ProbeResult", "probe_lr"]
