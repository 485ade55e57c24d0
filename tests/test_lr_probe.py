"""The learning-rate probe (gradwise.lr_probe): it overrules a prior that fails, keeps one that works,
costs what it says, and leaves the model and the random state alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from gradwise.lr_probe import BUDGET, MAX_CANDIDATES, ProbeResult, probe_lr
from gradwise.recipe import OptimSpec, ScheduleSpec

RUN_STEPS = 2000  # 200 probe steps: 40 per candidate


@pytest.fixture(scope="module")
def task() -> tuple[nn.Module, TensorDataset]:
    """Four Gaussian classes in 8 dimensions and a small MLP without normalisation layers."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=g) * 2
    y = torch.randint(0, 4, (600,), generator=g)
    x = centres[y] + torch.randn(600, 8, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    return model, TensorDataset(x, y)


def probe(task, prior: float, run_steps: int = RUN_STEPS) -> ProbeResult | None:
    model, data = task
    return probe_lr(
        model,
        data,
        nn.functional.cross_entropy,
        prior=prior,
        optim=OptimSpec(name="adamw", lr=prior, weight_decay=0.01),
        schedule=ScheduleSpec(warmup=0.05),
        batch_size=32,
        run_steps=run_steps,
        grad_clip=1.0,
    )


def test_a_prior_far_too_low_is_raised_and_one_far_too_high_is_lowered(task) -> None:
    low, high = probe(task, 1e-4), probe(task, 100.0)
    assert low.chosen > low.prior and low.prior not in low.good
    assert low.chosen == pytest.approx((low.prior * low.towards) ** 0.5, rel=0.05)  # halfway
    assert high.chosen < high.prior and high.prior not in high.good
    assert "1e+02 diverged: the nearest rate that did not, 32" in high.summary()


def test_a_prior_among_the_best_is_kept(task) -> None:
    result = probe(task, 0.1)  # on this task 0.01..0.3 all learn in 50 steps
    assert result.prior in result.good and result.chosen == result.prior
    assert "is among them: kept" in result.summary()


def test_its_cost_is_the_budget_it_states(task) -> None:
    result = probe(task, 3e-3)
    assert result.steps == round(BUDGET * RUN_STEPS / MAX_CANDIDATES)
    assert result.steps * len(result.candidates) <= BUDGET * RUN_STEPS
    assert f"for the run's first {result.steps} steps each" in result.summary()
    assert probe(task, 3e-3, run_steps=300) is None  # 30 steps cannot try three rates


def test_the_model_and_the_random_state_are_left_alone(task) -> None:
    model, _ = task
    weights = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    first = probe(task, 3e-2)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    assert probe(task, 3e-2).losses == first.losses  # and it is deterministic
