"""Learning-rate range test: the curve's shape, a suggestion that trains, nothing mutated."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradwise.doctor.lr_finder import (
    STEEP_METHOD,
    TOO_HIGH_FACTOR,
    TOO_LOW_FACTOR,
    LRRangeResult,
    build_optimizer_like,
    lr_range_test,
    private_copy,
    suggest,
)


def rings(n: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Four concentric rings in 2-D: learnable, but not at any learning rate."""
    g = torch.Generator().manual_seed(0)
    radius = torch.rand(n, generator=g) * 4
    theta = torch.rand(n, generator=g) * 2 * math.pi
    x = torch.stack([radius * torch.cos(theta), radius * torch.sin(theta)], 1)
    x = x + 0.1 * torch.randn(n, 2, generator=g)
    return (x - x.mean(0)) / x.std(0), radius.long()


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    )


def train(lr: float, x: torch.Tensor, y: torch.Tensor, steps: int = 200) -> float:
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


@pytest.fixture(scope="module")
def result() -> LRRangeResult:
    return lr_range_test(net(), rings(), F.cross_entropy)


def test_curve_shape(result: LRRangeResult) -> None:
    lrs, losses = result.lrs, result.losses
    assert lrs[0] == pytest.approx(1e-7)
    ratios = [b / a for a, b in itertools.pairwise(lrs)]
    assert max(ratios) == pytest.approx(min(ratios))  # exponential sweep
    assert ratios[0] == pytest.approx(1e8 ** (1 / 99))
    assert len(lrs) == len(losses) == len(result.raw_losses) <= 100
    start, lowest = losses[0], min(losses)
    assert lowest < 0.9 * start  # the loss falls ...
    assert result.diverged_at is not None  # ... and blows up: the sweep stopped early
    assert losses[-1] > 4.0 * lowest * 0.999 or not math.isfinite(losses[-1])
    assert result.lr_min_loss < result.diverged_at
    assert result.suggestion <= result.lr_min_loss
    assert result.steepest is not None and result.method == "centre of the steepest descent"


def test_suggestion_trains_and_100x_higher_does_not(result: LRRangeResult) -> None:
    x, y = rings()
    with torch.no_grad():
        initial = F.cross_entropy(net()(x), y).item()
    at_suggestion = train(result.suggestion, x, y)
    too_high = train(100 * result.suggestion, x, y)
    assert at_suggestion < 0.3 * initial
    assert too_high > 2 * at_suggestion


def test_plot_writes_a_png(result: LRRangeResult, tmp_path: Path) -> None:
    path = result.plot(tmp_path / "sub" / "lr.png")
    assert path == tmp_path / "sub" / "lr.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "suggestion" in str(result)


def test_same_curve_from_pairs_datasets_and_loaders() -> None:
    x, y = rings(256)
    kwargs = {"steps": 30, "end_lr": 1.0}
    a = lr_range_test(net(), (x, y), F.cross_entropy, **kwargs)
    b = lr_range_test(net(), TensorDataset(x, y), F.cross_entropy, **kwargs)
    c = lr_range_test(
        net(), DataLoader(TensorDataset(x, y), batch_size=32), F.cross_entropy, **kwargs
    )
    assert a.losses == b.losses == c.losses


def test_nothing_is_mutated() -> None:
    x, y = rings(256)
    model = nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    model.eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    F.cross_entropy(model(x[:8]), y[:8]).backward()
    optimizer.step()
    weights = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(optimizer.state_dict())
    rng = torch.get_rng_state()
    lr_range_test(model, (x, y), F.cross_entropy, optimizer=optimizer, steps=20)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert not model.training
    assert optimizer.state_dict()["param_groups"] == opt_state["param_groups"]
    for key, values in opt_state["state"].items():
        assert torch.equal(
            optimizer.state_dict()["state"][key]["momentum_buffer"], values["momentum_buffer"]
        )
    assert torch.equal(torch.get_rng_state(), rng)


def test_optimizer_copies_keep_hyperparameters_not_state() -> None:
    model = net()
    clone = private_copy(model)
    head = list(model.parameters())[-2:]
    body = list(model.parameters())[:-2]
    original = torch.optim.SGD(
        [{"params": body}, {"params": head, "lr": 0.5}], lr=0.1, momentum=0.9, nesterov=True
    )
    opt, ratios = build_optimizer_like(original, model, clone, 1e-3)
    assert type(opt) is torch.optim.SGD and ratios == [1.0, 5.0]
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["nesterov"]
    assert opt.param_groups[1]["params"][0] is list(clone.parameters())[-2]
    assert not opt.state
    opt, _ = build_optimizer_like(torch.optim.Adam, model, clone, 1e-3)
    assert type(opt) is torch.optim.Adam and opt.param_groups[0]["lr"] == 1e-3
    opt, _ = build_optimizer_like("adamw", model, clone, 1e-3)
    assert type(opt) is torch.optim.AdamW
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.05}  # no decay on biases
    with pytest.raises(TypeError):
        build_optimizer_like(42, model, clone, 1e-3)


def test_optimizer_in_warmup_is_swept_like_its_peak() -> None:
    data = rings(256)
    model = net()
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    warming = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.optim.lr_scheduler.LambdaLR(warming, lambda step: step / 100)  # its lr is 0 now
    curves = [
        lr_range_test(model, data, F.cross_entropy, optimizer=opt, steps=30).losses
        for opt in (plain, warming)
    ]
    assert curves[0] == curves[1] and min(curves[0]) < 0.95 * curves[0][0]


def test_compare_a_planned_lr_with_the_curve() -> None:
    lrs = [1e-7 * (1e8 ** (i / 99)) for i in range(90)]
    result = LRRangeResult(lrs, [1.0] * 90, 1e-3, 3e-2, lrs[-1], method=STEEP_METHOD)
    diverges = result.compare(lrs[-1] * 2)
    assert (diverges.verdict, diverges.code, diverges.severity) == ("diverges", "GW305", "error")
    assert diverges.problem and diverges.evidence["diverged_at_lr"] == lrs[-1]
    high = result.compare(1e-3 * TOO_HIGH_FACTOR * 2)
    assert (high.verdict, high.severity) == ("high", "warning") and "20x" in high.message
    low = result.compare(1e-3 / TOO_LOW_FACTOR / 2)
    assert (low.verdict, low.code, low.severity) == ("low", "GW306", "info") and not low.problem
    ok = result.compare(3e-4)
    assert ok.code is None and str(ok).startswith("planned lr 0.0003 is within the range test's")
    guess = dataclasses.replace(result, method="lr_min/10 (no clear descent)")
    assert guess.compare(1e-3 * TOO_HIGH_FACTOR * 2).verdict == "ok"  # no suggestion to trust
    assert guess.compare(lrs[-1]).verdict == "diverges"
    nan_from_start = LRRangeResult(
        lrs[:1], [math.inf], lrs[0], lrs[0], lrs[0], method="no finite loss"
    )
    assert nan_from_start.compare(1e-3).verdict == "unknown"


def test_private_copy_drops_the_originals_hooks() -> None:
    model = net()
    calls: list[int] = []
    model.register_forward_hook(lambda *args: calls.append(1))
    private_copy(model)(torch.randn(3, 2))
    assert calls == []


def test_suggest_on_synthetic_curves() -> None:
    lrs = [1e-7 * (1e8 ** (i / 99)) for i in range(100)]
    # a smooth descent centred at 1e-3 (in log10 lr), a floor, then divergence past 1
    losses = [
        2.0 - 1.5 / (1 + math.exp(-3 * (math.log10(lr) + 3))) + (10 * (lr - 1) if lr > 1 else 0)
        for lr in lrs
    ]
    suggestion, lr_min, steep, method = suggest(lrs, losses)
    assert 1e-3 / 3 < suggestion < 3e-3
    assert steep == pytest.approx(1e-3, rel=0.3)
    assert 0.1 < lr_min <= 1.5 and method == "centre of the steepest descent"
    flat = [1.0 + 0.001 * math.sin(i) for i in range(100)]
    suggestion, lr_min, steep, method = suggest(lrs, flat)
    assert steep is None and suggestion == pytest.approx(lr_min / 10)
    assert "no clear descent" in method


def test_bad_arguments() -> None:
    data = rings(64)
    with pytest.raises(ValueError):
        lr_range_test(net(), data, F.cross_entropy, start_lr=1.0, end_lr=0.1)
    with pytest.raises(ValueError):
        lr_range_test(net(), data, F.cross_entropy, steps=1)
    with pytest.raises(ValueError):
        lr_range_test(net(), data, F.cross_entropy, smooth=0)
