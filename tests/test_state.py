"""The training state: one state_dict for checkpoints, resume and repair; one learning-rate rescale."""

from __future__ import annotations

import copy

import torch
from conftest import mlp

from gradwise.optim import build_optimizer, build_scheduler
from gradwise.recipe import OptimSpec, ScheduleSpec
from gradwise.state import Position, TrainState, scale_lr


def _state(lr: float = 0.1, grad_clip: float | None = None) -> TrainState:
    model = mlp()
    optimizer = build_optimizer(model, OptimSpec(lr=lr))
    scheduler = build_scheduler(optimizer, ScheduleSpec(), total_steps=20)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return TrainState(model, optimizer, scheduler, scaler, grad_clip=grad_clip)


def _train(state: TrainState, steps: int) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
        loss = torch.nn.functional.cross_entropy(state.model(x), y)
        loss.backward()
        state.optimizer.step()
        state.optimizer.zero_grad()
        state.scheduler.step()
        state.loss_sum += loss.detach() * 16
        state.loss_count += 16
        state.position.step += 1


def test_state_dict_round_trips_everything_but_the_weights():
    a = _state(grad_clip=0.5)
    _train(a, 5)
    a.best, a.best_step, a.history = 0.7, 4, [{"step": 4, "val_loss": 0.7}]
    saved = copy.deepcopy(a.state_dict())  # as a checkpoint holds it, not live tensors
    b = _state()
    b.model.load_state_dict(a.model.state_dict())
    b.load_state_dict(saved)
    assert b.position == Position(0, 0, 5) and (b.best, b.best_step) == (0.7, 4)
    assert b.grad_clip == 0.5  # a repair's tighter clip survives resume
    assert torch.equal(torch.stack(b.totals), torch.stack(a.totals))
    assert b.scheduler.get_last_lr() == a.scheduler.get_last_lr()
    _train(a, 3)
    _train(b, 3)
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q)  # optimizer moments and schedule continue exactly


def test_roll_back_restores_weights_and_optimizer_but_keeps_the_schedule():
    s = _state()
    _train(s, 3)
    snapshot = s.snapshot()
    weights = {k: v.clone() for k, v in s.model.state_dict().items()}
    _train(s, 4)
    lr_now = s.optimizer.param_groups[0]["lr"]
    s.roll_back(snapshot)
    assert all(torch.equal(v, s.model.state_dict()[k]) for k, v in weights.items())
    assert s.optimizer.param_groups[0]["lr"] == lr_now  # the schedule's position stays
    assert float(s.loss_count) == 0  # the discarded steps' losses are not reported


def test_scale_lr_scales_now_and_for_the_rest_of_the_schedule():
    a, b = _state(), _state()
    _train(a, 3)
    _train(b, 3)
    scale_lr(b.optimizer, b.scheduler, 0.5)
    for _ in range(6):
        for s in (a, b):
            s.optimizer.step()
            s.scheduler.step()
        ratios = [
            gb["lr"] / ga["lr"]
            for ga, gb in zip(a.optimizer.param_groups, b.optimizer.param_groups, strict=True)
        ]
        assert all(abs(r - 0.5) < 1e-12 for r in ratios)
