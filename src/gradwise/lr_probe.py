"""A budgeted learning-rate probe: short runs of candidate rates around a prior, judged on held-out loss.

    result = probe_lr(model, train_dataset, loss_fn, prior=3e-3, optim=spec, schedule=schedule,
                      batch_size=32, grad_clip=1.0, run_steps=1500)
    result.chosen, result.candidates, result.losses, result.steps, result.seconds

Each candidate trains a private copy of the model from the same initial weights, on the same batches,
with the run's optimizer (its parameter groups, weight decay and clipping), through the first steps
of the run's own schedule (its warmup included: a compressed warmup would fail every high rate), and
is judged by how far it brings the loss on samples held out of the training data below the untrained
model's. The candidates sit on a half-decade grid around the prior; while the best one is at an edge
the grid grows that way, within the budget (``MAX_CANDIDATES``: up to 1.5 decades from the prior).

The prior is fitted on a wider set of tasks than one probe sees, and a short probe favours other
rates than the full run does, so the probe vetoes the prior only when it fails outright: it diverges,
or it takes the held-out loss down less than ``GOOD`` as far as the best candidate does. The rate
chosen then moves halfway (``SHRINK``, in log rate) to the one nearest the prior among those that
do reach ``GOOD`` of the best, or all the way if the prior diverged. When no
candidate moves the held-out loss by ``SIGNAL`` of its untrained value, the probe saw too little to
overrule anything and the prior stands.

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
MAX_CANDIDATES = 5
"""...shared by at most this many: the first three and two steps of the grid growing (fewer when a
short run's budget cannot give each STEPS[0] steps)."""
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
GOOD = 0.5
"""A rate fails when it lowers the held-out loss less than this fraction as much as the best one."""
SHRINK = 0.5
"""A prior that learned too little moves this fraction of the way (in log rate) to the nearest rate
that learned enough: the probe sees the run's first steps only, where fast rates shine (on the
LSTM fit task the full move went 0.01 -> 0.032, 3x the search's best; half of it, 0.018). A prior
that diverged moves all the way."""
SIGNAL = 0.05
"""The best candidate must lower the held-out loss by this fraction of the untrained model's loss for
the probe to overrule the prior (a sequence model that has not started to learn in the probe's steps
ranks the rates by noise and by their first few updates)."""
HOLDOUT = (0.15, 64, 512)
"""Samples held out of the training data to judge the candidates: this fraction, within these
bounds (enough for the loss to rank them, few enough to evaluate in a fraction of the probe)."""
DIVERGED = 1.5
"""A candidate whose held-out loss exceeds this multiple of the untrained model's diverged."""


def too_short(run_steps: int) -> str:
    """Why a run of ``run_steps`` optimizer steps is not probed (``probe_lr`` returned None)."""
    return (
        f"not probed: {run_steps} optimizer steps are too few to try {len(FIRST)} rates for "
        f"{STEPS[0]} steps each within {BUDGET:.0%} of them"
    )


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
    good: list[float] = field(default_factory=list)  # lowered the loss >= GOOD as far as the best
    towards: float | None = None  # the rate the prior was moved towards, if it was
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
        good = ", ".join(f"{lr:.2g}" for lr in self.good)
        if self.chosen == self.prior:
            verdict = (
                f"the rule's {self.prior:.2g} is among them: kept"
                if self.prior in self.good
                else f"no rate learned enough in {self.steps} steps to judge: the rule's "
                f"{self.prior:.2g} kept"
            )
        elif self.losses[self.candidates.index(self.prior)] is None:
            verdict = f"the rule's {self.prior:.2g} diverged: the nearest rate that did not, {self.chosen:.2g}"
        else:
            verdict = (
                f"the rule's {self.prior:.2g} is not: {self.chosen:.2g}, halfway (in log rate) to "
                f"the nearest of them, {self.towards:.2g}"
            )
        return (
            f"probed {len(self.candidates)} rates around {self.prior:.2g} for the run's first "
            f"{self.steps} steps each ({total:,} steps, {total / max(self.run_steps, 1):.0%} of the "
            f"run's {self.run_steps:,}; {self.seconds:.1f} s), held-out loss on {self.held_out} "
            f"training samples kept aside (untrained {self.initial_loss:.4g}): {shown}; "
            f"lowered it at least {GOOD:.0%} as far as the best: {good or 'none'}; {verdict}"
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
    steps = min(max(round(share / MAX_CANDIDATES), STEPS[0]), STEPS[1])
    allowed = min(MAX_CANDIDATES, int(share // steps))  # never more than the budget
    multiplier = lr_multiplier(schedule, run_steps)  # the run's schedule, its first steps
    train, held = _split(dataset, seed)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    chunks = [to_device(b, device) for b in _chunks(held, 256)]

    def evaluate(net: nn.Module) -> float | None:
        """The mean held-out loss (None when not finite)."""
        net.eval()
        with torch.no_grad():
            total = sum(float(loss_fn(forward(net, x), y)) * len(y) for x, y in chunks)
        net.train()
        loss = total / len(held)
        return loss if math.isfinite(loss) else None

    def run(k: int) -> float | None:
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
        loss = evaluate(clone)
        if loss is not None and loss > DIVERGED * initial:
            loss = None
        shown = "diverged" if loss is None else f"{loss:.4g}"
        logger.info("lr probe: %.2g for %d steps: held-out loss %s", lr, steps, shown)
        return loss

    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        initial = evaluate(private_copy(model)) or math.inf
        results = {k: run(k) for k in FIRST}
        while True:  # grow the grid while the best candidate sits at its edge
            best = _best(results)
            low, high = min(results), max(results)
            if best not in (low, high) or len(results) >= allowed:
                break
            results[best - 1 if best == low else best + 1] = run(
                best - 1 if best == low else best + 1
            )
    order = sorted(results)
    good = _good(results, initial)
    rate = lambda k: prior * 10 ** (k * GRID)  # noqa: E731
    if results[0] is not None and (0 in good or not good):
        chosen, towards = prior, None  # the prior did not fail (or nothing learned enough to say)
    else:  # the nearest good rate; when none learned, the nearest that did not diverge
        pool = good or {k for k, v in results.items() if v is not None} or {min(results)}
        pick = min(pool, key=lambda k: (abs(k), k))
        shrink = SHRINK if results[0] is not None else 1.0  # a diverging prior moves all the way
        chosen, towards = float(f"{rate(pick * shrink):.2g}"), rate(pick)
    return ProbeResult(
        prior=prior,
        chosen=chosen,
        candidates=[rate(k) for k in order],
        losses=[results[k] for k in order],
        initial_loss=initial,
        steps=steps,
        run_steps=run_steps,
        held_out=len(held),
        good=[rate(k) for k in order if k in good],
        towards=towards,
        seconds=time.perf_counter() - started,
    )


def _best(results: dict[int, float | None]) -> int:
    finite = {k: v for k, v in results.items() if v is not None}
    return min(finite, key=finite.get) if finite else min(results)


def _good(results: dict[int, float | None], initial: float) -> set[int]:
    """The candidates that lowered the held-out loss at least GOOD as far as the best; empty when the
    best lowered it by less than SIGNAL of the untrained loss (or every candidate diverged)."""
    best = results[_best(results)]
    if best is None or not math.isfinite(initial) or initial - best < SIGNAL * abs(initial):
        return set()
    return {
        k
        for k, loss in results.items()
        if loss is not None and initial - loss >= GOOD * (initial - best)
    }


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


__all__ = ["ProbeResult", "probe_lr", "too_short"]
