"""Divergence handled as an expert would: caught at the step it appears, never validated or saved as
best, and in repair mode logged as recovered."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import QUIET
from torch import nn

import gradwise as gw
from gradwise.checkpoint import best_checkpoint, list_checkpoints, load_checkpoint
from gradwise.tracking import read_metrics
from gradwise.trainer import FiniteGuard


class TurnsNaN(nn.Module):
    """An MLP whose training outputs turn NaN from its ``at``-th training step on (a planted fault,
    as a log(0) or an overflow would; ``once``: only that step); ``eval_nan`` poisons only its evaluation outputs instead."""

    def __init__(self, at: int | None = None, once: bool = False, eval_nan: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
        self.at, self.once, self.eval_nan, self.calls = at, once, eval_nan, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.training and torch.is_grad_enabled():
            self.calls += 1
            poisoned = self.calls == self.at if self.once else self.calls >= (self.at or 1e9)
            if poisoned:
                return out * float("nan")
        elif not self.training and self.eval_nan and self.calls:
            return out * float("nan")
        return out


def _fit(model, blobs, **overrides):
    x, y = blobs
    settings = {"epochs": 3, "batch_size": 20, "lr": 1e-3, **QUIET, **overrides}
    return gw.Trainer(model, (x[:200], y[:200]), (x[200:], y[200:]), **settings).fit()


def _findings(run) -> dict[str, dict]:
    path = run.dir / "doctor" / "findings.json"
    return {f["code"]: f for f in json.loads(path.read_text())} if path.is_file() else {}


def test_watch_mode_stops_at_the_step_the_loss_turns_nan(blobs):
    run = _fit(TurnsNaN(at=7), blobs)  # 10 steps per epoch: the fault comes before any validation
    assert run.state == "diverged" and run.steps == 7  # not at the doctor's next sampled step (20)
    gw301 = _findings(run)["GW301"]
    assert (
        gw301["step"] == 6 and gw301["evidence"]["step_first_seen"] == 6
    )  # the doctor counts from 0
    assert run.best_checkpoint is None and run.best_metric is None and run.history == []
    assert list_checkpoints(run.dir) == []  # nothing after the fault is saved
    status = json.loads((run.dir / "status.json").read_text())
    assert status["state"] == "failed" and "step 7" in status["message"]


def test_the_best_checkpoint_of_a_diverged_run_is_the_last_good_one(blobs):
    run = _fit(TurnsNaN(at=15), blobs)  # epoch 1 (steps 1-10) is healthy
    assert run.state == "diverged" and run.steps == 15
    assert [h["step"] for h in run.history] == [10] and math.isfinite(run.best_metric)
    best = best_checkpoint(run.dir)
    assert best is not None and best.name == "step-00000010"
    model = TurnsNaN()
    load_checkpoint(run.dir, model)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_doctor_off_still_stops_a_diverged_run(blobs):
    run = _fit(TurnsNaN(at=4), blobs, doctor={"mode": "off"})
    assert run.state == "diverged" and run.steps == 4 and run.best_checkpoint is None


def test_a_nan_validation_is_never_best(blobs):
    # accuracy of NaN logits is still a number (argmax picks class 0): the loss gives it away
    run = _fit(TurnsNaN(eval_nan=True), blobs, epochs=2, monitor="accuracy", doctor={"mode": "off"})
    assert [math.isnan(h["val_loss"]) for h in run.history] == [True, True]
    assert all(math.isfinite(h["val_accuracy"]) for h in run.history)
    assert run.best_metric is None and best_checkpoint(run.dir) is None


def test_repair_mode_logs_the_recovered_loss(blobs):
    model = TurnsNaN(at=7, once=True)  # one poisoned step: a rollback recovers from it
    run = _fit(model, blobs, **{"doctor.mode": "repair", "log_every": 1})
    assert run.state == "finished"
    repairs = json.loads((run.dir / "doctor" / "repairs.json").read_text())
    assert [r["code"] for r in repairs] == ["GW301"] and repairs[0]["step"] == 7
    train = [m for m in read_metrics(run.dir) if m["split"] == "train"]
    assert [m["step"] for m in train] == list(range(1, 31))
    assert all(math.isfinite(m["loss"]) for m in train if m["step"] > 7), train[6:9]
    assert all(math.isfinite(h["train_loss"]) for h in run.history)


def test_guard_on_an_accelerator_reads_the_device_only_when_due_or_forced():
    guard = FiniteGuard(torch.device("meta"), every=5)  # any non-CPU device takes the lazy path
    assert not guard.on_host and guard.every == 5
    guard._first_on_device = torch.full((), -1)  # stand-in for the device tensor, on the CPU
    for step, value in [(1, 1.0), (2, 0.5), (3, float("inf")), (4, float("nan"))]:
        guard.record(step, torch.tensor(value), None)
    assert guard.poll(4) is None  # not due: no synchronisation
    assert guard.poll(4, force=True) == 3  # the first bad step, not the latest
    guard.reset()
    assert guard.poll(5) is None
    guard.record(6, torch.tensor(1.0), torch.tensor(float("nan")))  # a non-finite gradient norm
    assert guard.poll(10) == 6


@pytest.mark.parametrize("every", [1, 3])
def test_guard_on_the_host_sees_every_step(every):
    guard = FiniteGuard(torch.device("cpu"), every=every)
    guard.record(1, torch.tensor(1.0), None)
    guard.record(2, torch.tensor(float("nan")), None)
    guard.record(3, torch.tensor(float("nan")), None)
    assert guard.poll(2) == 2  # on the host every step is read at once, whatever ``every``
