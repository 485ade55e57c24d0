"""A budgeted learning-rate probe: short runs of candidate rates around a prior, judged on held-out loss.

    result = probe_lr(model, train_dataset, loss_fn, prior=3e-3, optim=spec, schedule=schedule,
                      batch_size=32, grad_clip=1.0, run_steps=1500)
    result.chosen, result.candidates, result.losses, result.steps, result.seconds

Each candidate trains a private copy of the model from the same initial weights, on the same batches,
with the run's optimizer (its parameter groups, weight decay and clipping) and the run's schedule
compressed into the probe (warmup, then cosine to the floor), and is judged by its loss on samples
held out of the training data. The candidates sit on a half-decade grid around the prior; while the
best one is at an edge the grid grows that way, up to ``MAX_DECADES`` from the prior.

The probe moves the rate only as far as its evidence demands. A candidate counts as good as the best
unless the best beats it by ``Z`` standard errors of their paired difference in held-out loss (read
on ``CHUNKS`` chunks of the held-out samples, the same for every candidate). The prior stands when it
is among them; otherwise the rate chosen is the one among them nearest the prior. A short probe on a
flat stretch of the curve ranks rates by noise (and by the short horizon, which favours different
rates than a full run); it then keeps the fitted prior, and it moves by decades when the prior is
clearly too high (it diverges or learns far worse) or too low.

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
Z = 2.0
"""Standard errors of the paired difference in held-out loss by which the best candidate must beat
another for that one to count as worse (one-sided, ~2.3% false alarms per comparison), read in the
mean of the paired chunk differences and, robustly, in their median (see ``_worse``)."""
CHUNKS = 32
"""Held-out losses are read per chunk of samples: 32 paired chunk differences give the standard error
of a candidate's difference from the best."""
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
    losses: list[float | None]  # mean held-out loss after training (None: diverged or not finite)
    initial_loss: float
    steps: int  # optimizer steps per candidate
    run_steps: int
    held_out: int
    as_good: list[float] = field(default_factory=list)  # not worse than the best by Z errors
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
        good = ", ".join(f"{lr:.2g}" for lr in self.as_good)
        verdict = (
            f"the rule's {self.prior:.2g} is among them: kept"
            if self.prior in self.as_good
            else f"the rule's {self.prior:.2g} is not: the nearest of them, {self.chosen:.2g}"
        )
        return (
            f"probed {len(self.candidates)} rates around {self.prior:.2g} for {self.steps} steps "
            f"each ({total:,} steps, {total / max(self.run_steps, 1):.0%} of the run's "
            f"{self.run_steps:,}; {self.seconds:.1f} s), held-out loss on {self.held_out} "
            f"training samples kept aside (untrained {self.initial_loss:.4g}): {shown}; as good "
            f"as the best within {Z:g} standard errors: {good}; {verdict}"
        )


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

    share = BUDGET * run_steps
    if share < STEPS[0] * len(FIRST):
        return None
    started = time.perf_counter()
    steps = min(max(round(share / NOMINAL_CANDIDATES), STEPS[0]), STEPS[1])
    multiplier = lr_multiplier(schedule, steps)
    train, held = _split(dataset, seed)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    chunks = [to_device(b, device) for b in _chunks(held, math.ceil(len(held) / CHUNKS))]

    def evaluate(net: nn.Module) -> torch.Tensor | None:
        """The held-out loss of each chunk (None when one is not finite)."""
        net.eval()
        with torch.no_grad():
            losses = torch.stack([loss_fn(forward(net, x), y).double().cpu() for x, y in chunks])
        net.train()
        return losses if bool(torch.isfinite(losses).all()) else None

    def run(k: int) -> torch.Tensor | None:
        lr = prior * 10 ** (k * GRID)
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
                logger.info("lr probe: %.2g diverged at step %d", lr, step)
                return None
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
        losses = evaluate(clone)
        if losses is not None and float(losses.mean()) > DIVERGED * initial:
            losses = None
        shown = "diverged" if losses is None else f"{float(losses.mean()):.4g}"
        logger.info("lr probe: %.2g for %d steps: held-out loss %s", lr, steps, shown)
        return losses

    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        untrained = evaluate(private_copy(model))
        initial = float(untrained.mean()) if untrained is not None else math.inf
        results = {k: run(k) for k in FIRST}
        while True:  # grow the grid while the best candidate sits at its edge
            best = _best(results)
            low, high = min(results), max(results)
            if best not in (low, high) or abs(best * GRID) >= MAX_DECADES:
                break
            results[best - 1 if best == low else best + 1] = run(
                best - 1 if best == low else best + 1
            )
    order = sorted(results)
    good = _as_good(results)
    pick = 0 if 0 in good else min(good, key=lambda k: (abs(k), k))
    rate = lambda k: prior * 10 ** (k * GRID)  # noqa: E731
    return ProbeResult(
        prior=prior,
        chosen=prior if pick == 0 else float(f"{rate(pick):.2g}"),
        candidates=[rate(k) for k in order],
        losses=[None if results[k] is None else float(results[k].mean()) for k in order],
        initial_loss=initial,
        steps=steps,
        run_steps=run_steps,
        held_out=len(held),
        as_good=[rate(k) for k in order if k in good],
        seconds=time.perf_counter() - started,
    )


def _best(results: dict[int, torch.Tensor | None]) -> int:
    finite = {k: float(v.mean()) for k, v in results.items() if v is not None}
    return min(finite, key=finite.get) if finite else min(results)


def _as_good(results: dict[int, torch.Tensor | None]) -> set[int]:
    """The candidates the best does not beat by Z standard errors of their paired difference (the
    lowest rate when every candidate diverged)."""
    best = _best(results)
    if results[best] is None:
        return {best}
    good = set()
    for k, losses in results.items():
        if losses is None:
            continue
        if k == best or not _worse(losses - results[best]):
            good.add(k)
    return good


def _worse(diff: torch.Tensor) -> bool:
    """Whether paired differences (candidate minus best) show the candidate worse by Z errors: in
    their mean (a rate worse everywhere) or in their median, with the error from the median absolute
    deviation (a rate that wrecks some chunks, whose heavy tail inflates the standard deviation)."""
    root = math.sqrt(len(diff))
    mean, median = float(diff.mean()), float(diff.median())
    spread = float(diff.std()) if len(diff) > 1 else 0.0
    mad = 1.4826 * float((diff - median).abs().median())
    return mean > Z * spread / root or median > Z * mad / root


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


def _chunks(dataset: Dataset, size: int) -> list[tuple[Any, Any]]:
    n = len(dataset)
    return [batch_at(dataset, torch.arange(i, min(i + size, n))) for i in range(0, n, size)]


__all__ = ["ProbeResult", "probe_lr"]
