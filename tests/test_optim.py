"""Parameter groups by module type, optimizers, and schedule values."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from gradwise.optim import (
    build_optimizer,
    build_scheduler,
    lr_multiplier,
    param_groups,
    warmup_steps,
)
from gradwise.recipe import OptimSpec, ScheduleSpec


class Net(nn.Module):
    """Names chosen to fool name-based rules: 'bn1' is a BatchNorm, 'norm' is a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv1d(8, 8, 3)
        self.bn1 = nn.BatchNorm1d(8)
        self.norm = nn.Linear(8, 8)  # a Linear, whatever its name: decayed
        self.weird_name = nn.LayerNorm(8)
        self.gn = nn.GroupNorm(2, 8)
        self.rms = nn.RMSNorm(8)
        self.scale = nn.Parameter(torch.ones(8))  # a 1-D gain: not decayed
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def _names(model: nn.Module, params: list) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_weight_decay_groups_by_module_type():
    model = Net()
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert _names(model, groups["decay"]["params"]) == {"conv.weight", "norm.weight"}
    assert _names(model, groups["no_decay"]["params"]) == {
        "emb.weight", "conv.bias", "bn1.weight", "bn1.bias", "norm.bias", "weird_name.weight",
        "weird_name.bias", "gn.weight", "gn.bias", "rms.weight", "scale",
    }  # fmt: skip
    # frozen parameters belong to no group
    assert not _names(model, groups["decay"]["params"] + groups["no_decay"]["params"]) & {
        "frozen.weight"
    }


def test_tied_embedding_is_placed_once_and_not_decayed():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    groups = param_groups(model, 0.1)
    assert sum(len(g["params"]) for g in groups) == 1
    assert groups[0]["name"] == "no_decay"


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "lion"])
def test_every_optimizer_reduces_a_loss(name):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([[0.5], [-0.3], [0.2], [0.1]])
    lr = {"sgd": 0.05}.get(name, 1e-2)
    opt = build_optimizer(model, OptimSpec(name=name, lr=lr))
    first = None
    for _ in range(50):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_sgd_uses_nesterov_momentum_and_lion_its_own_betas():
    sgd = build_optimizer(nn.Linear(2, 2), OptimSpec(name="sgd", lr=0.1))
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    lion = build_optimizer(nn.Linear(2, 2), OptimSpec(name="lion", lr=1e-4))
    assert tuple(lion.defaults["betas"]) == (0.9, 0.99)


def test_warmup_is_linear_and_cosine_reaches_the_floor_at_the_last_step():
    spec = ScheduleSpec(warmup=0.1, min_lr=0.05)
    total = 200
    f = lr_multiplier(spec, total)
    warm = warmup_steps(spec, total)
    assert warm == 20
    ramp = [f(s) for s in range(warm + 1)]
    diffs = [b - a for a, b in itertools.pairwise(ramp)]
    assert all(math.isclose(d, diffs[0], rel_tol=1e-9) for d in diffs)  # linear
    assert f(0) > 0 and f(warm) == pytest.approx(1.0)
    assert f(total - 1) == pytest.approx(0.05)
    assert all(f(s) >= f(s + 1) for s in range(warm, total - 1))  # monotone decay
    assert f((warm + total - 1) / 2) == pytest.approx(0.05 + 0.95 * 0.5)  # halfway down the cosine


def test_warmup_in_steps_and_step_decay():
    spec = ScheduleSpec(name="step", warmup=10, milestones=[0.5, 0.75], gamma=0.1)
    f = lr_multiplier(spec, 100)
    assert f(9) == pytest.approx(10 / 11) and f(10) == 1.0
    assert f(49) == 1.0 and f(50) == pytest.approx(0.1) and f(75) == pytest.approx(0.01)


def test_constant_schedule_without_warmup():
    f = lr_multiplier(ScheduleSpec(name="constant", warmup=0), 50)
    assert {f(s) for s in range(50)} == {1.0}


def test_onecycle_and_plateau_schedulers():
    model = nn.Linear(2, 2)
    opt = build_optimizer(model, OptimSpec(lr=0.01))
    one = build_scheduler(opt, ScheduleSpec(name="onecycle"), 100)
    lrs = []
    for _ in range(100):
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
        one.step()
    assert max(lrs) == pytest.approx(0.01, rel=1e-3) and lrs[-1] < 1e-5
    opt = build_optimizer(model, OptimSpec(lr=0.01))
    plateau = build_scheduler(
        opt, ScheduleSpec(name="plateau", plateau_patience=0, gamma=0.5), 100, mode="max"
    )
    plateau.step(0.9)
    plateau.step(0.8)  # worse for mode=max
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)
