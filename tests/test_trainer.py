"""The Trainer end to end: tasks, data forms, accumulation, clipping, schedules, metrics, EMA, stopping."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import QUIET, mlp
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import gradwise as gw
from gradwise.errors import ConfigError, DataError
from gradwise.tasks import IGNORE_INDEX, Task


def _fit(model, train, val=None, **overrides):
    return gw.Trainer(model, train, val, **{**QUIET, **overrides}).fit()


# -- tasks, each trains a few steps -------------------------------------------------------------


def test_multiclass_learns_and_writes_a_run_directory(blobs):
    x, y = blobs
    run = _fit(
        mlp(), (x[:200], y[:200]), (x[200:], y[200:]), task="classification", epochs=4, lr=1e-2
    )
    assert run.recipe.task == "multiclass" and run.monitor == "val_accuracy"
    assert run.best_metric > 0.9
    assert len(run.history) == 4 and run.history[-1]["epoch"] == 4
    assert {"val_loss", "val_accuracy", "val_f1", "val_auroc", "train_loss", "lr"} <= set(
        run.history[-1]
    )
    assert run.history[-1]["train_loss"] < run.history[0]["train_loss"]
    for name in ("recipe.yaml", "metrics.jsonl", "environment.json", "status.json"):
        assert (run.dir / name).is_file()
    assert json.loads((run.dir / "status.json").read_text())["state"] == "finished"
    assert (run.best_checkpoint / "model.safetensors").is_file()
    assert gw.load_recipe(run.dir / "recipe.yaml").task == "multiclass"


def test_builtin_tasks_train(tmp_path):
    cases = [
        ({"data": {"name": "breast_cancer"}, "model": {"name": "mlp", "kwargs": {"hidden": [16]}}}, "binary", "val_accuracy", 0.85),
        ({"data": {"name": "iris"}, "model": {"name": "mlp", "kwargs": {"hidden": [64]}}}, "multiclass", "val_accuracy", 0.7),
        ({"data": {"name": "synthetic_multilabel", "kwargs": {"n_samples": 300}}}, "multilabel", "val_f1", 0.3),
        ({"data": {"name": "diabetes"}, "task": "regression"}, "regression", "val_loss", None),
    ]  # fmt: skip
    for recipe, kind, monitor, floor in cases:
        run = gw.Trainer(recipe=recipe, epochs=10, lr=1e-2, batch_size=16, **QUIET).fit()
        assert run.recipe.task == kind and run.monitor == monitor
        if floor is not None:
            assert run.best_metric > floor, (kind, run.best_metric)
    assert max(h["val_r2"] for h in run.history) > 0.2  # diabetes: clearly better than the mean


def test_language_model_with_a_zoo_gpt():
    recipe = {
        "task": "lm",
        "model": {"name": "gpt", "kwargs": {"d_model": 32, "n_layers": 1, "n_heads": 2}},
        "data": {
            "name": "synthetic_sequences",
            "kwargs": {"task": "lm", "n_samples": 200, "seq_len": 16},
        },
    }
    run = gw.Trainer(recipe=recipe, epochs=3, lr=3e-3, **QUIET).fit()
    assert run.monitor == "val_perplexity"
    assert run.history[-1]["val_perplexity"] < run.history[0]["val_perplexity"]
    assert run.history[-1]["val_perplexity"] == pytest.approx(
        np.exp(run.history[-1]["val_loss"]), rel=1e-3
    )


def test_custom_loss(blobs):
    x, y = blobs
    calls = []

    def loss_fn(out, target):
        calls.append(1)
        return nn.functional.cross_entropy(out, target)

    run = _fit(
        mlp(), (x[:200], y[:200]), (x[200:], y[200:]), task="custom", loss_fn=loss_fn, epochs=2
    )
    assert calls and run.monitor == "val_loss"
    assert (
        run.history[-1]["val_loss"] < run.history[0]["val_loss"] or run.history[0]["val_loss"] < 1.0
    )


# -- data forms ----------------------------------------------------------------------------------


def test_numpy_arrays_dataset_and_dataloader(blobs):
    x, y = blobs
    arrays = _fit(
        mlp(), (x.numpy()[:200], y.numpy()[:200]), (x.numpy()[200:], y.numpy()[200:]), epochs=1
    )
    dataset = _fit(
        mlp(), TensorDataset(x[:200], y[:200]), TensorDataset(x[200:], y[200:]), epochs=1
    )
    loaders = _fit(
        mlp(),
        DataLoader(TensorDataset(x[:200], y[:200]), batch_size=32, shuffle=True),
        DataLoader(TensorDataset(x[200:], y[200:]), batch_size=64),
        epochs=1,
    )
    assert arrays.history[-1]["val_accuracy"] == dataset.history[-1]["val_accuracy"]
    assert loaders.steps == 7  # 200 samples in batches of 32


class _Samples(Dataset):
    """Samples one by one, not from memory: the loader gets worker processes, which record their
    pids."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, pids: Path) -> None:
        self.x, self.y, self.pids = x, y, pids

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        with open(self.pids, "a") as f:
            f.write(f"{os.getpid()}\n")
        return self.x[i], self.y[i]


def test_fit_stops_its_persistent_data_loader_workers(blobs, tmp_path):
    x, y = blobs
    pids = tmp_path / "pids"
    train, val = _Samples(x[:200], y[:200], pids), _Samples(x[200:], y[200:], pids)
    trainer = gw.Trainer(mlp(), train, val, epochs=2, num_workers=1, **QUIET)
    steps = trainer.fit().steps
    workers = {int(p) for p in pids.read_text().split()} - {os.getpid()}
    assert len(workers) == 2  # one per loader, kept across the epochs (persistent)
    # stopped and reaped by fit, not at some later garbage collection (which waited 5 s for each)
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert trainer.fit().steps == steps  # the loaders start new workers when used again


def test_training_without_validation_monitors_train_loss(blobs):
    x, y = blobs
    run = _fit(mlp(), (x, y), epochs=2)
    assert run.monitor == "train_loss" and run.best_metric is not None


# -- gradient accumulation -----------------------------------------------------------------------


def _weights_after(model_fn, data, **overrides):
    model = model_fn()
    gw.Trainer(model, data, **{**QUIET, "drop_last": False, "warmup": 0, **overrides}).fit()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("k", [2, 3])
def test_accumulation_equals_one_large_batch(k):
    # 10 samples; micro-batches of 2 grouped by k give windows of 2k samples and a short last window
    # (an epoch that is not a multiple of k). One big batch of 2k samples must give the same steps.
    torch.manual_seed(1)
    x, y = torch.randn(10, 8), torch.randint(0, 3, (10,))
    micro = _weights_after(mlp, (x, y), batch_size=2, accumulate=k, epochs=2)
    big = _weights_after(mlp, (x, y), batch_size=2 * k, accumulate=1, epochs=2)
    for a, b in zip(micro, big, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


class _PaddedTokens(Dataset):
    """Token sequences whose targets are padded (ignored) by different amounts."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 12, (9, 6), generator=g)
        self.y = torch.randint(0, 12, (9, 6), generator=g)
        for i in range(9):
            self.y[i, 6 - i % 4 :] = IGNORE_INDEX  # 0..3 padded positions

    def __len__(self) -> int:
        return 9

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def _tiny_lm() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(12, 8), nn.Linear(8, 12))


def test_accumulation_normalises_over_tokens_not_micro_batches():
    data = _PaddedTokens()
    micro = _weights_after(_tiny_lm, data, task="lm", batch_size=3, accumulate=3, epochs=1)
    big = _weights_after(_tiny_lm, data, task="lm", batch_size=9, accumulate=1, epochs=1)
    for a, b in zip(micro, big, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_scheduler_steps_once_per_optimizer_step(blobs):
    x, y = blobs
    trainer = gw.Trainer(mlp(), (x, y), batch_size=10, accumulate=4, epochs=2, **QUIET)
    run = trainer.fit()
    # 24 micro-batches per epoch -> 6 optimizer steps per epoch
    assert run.steps == 12 == trainer.scheduler.last_epoch
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(
        trainer.recipe.optim.lr * trainer.recipe.schedule.min_lr
    )


# -- clipping, metrics, EMA, mixup, stopping ---------------------------------------------------


def test_gradient_clipping_bounds_the_update(blobs):
    x, y = blobs
    common = {
        "optim": {"name": "sgd", "lr": 1.0, "momentum": 0.0, "weight_decay": 0.0},
        "schedule": {"name": "constant", "warmup": 0},
    }

    def update_norm(clip):
        model = mlp()
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        gw.Trainer(
            model, (x * 10, y), recipe=common, grad_clip=clip, max_steps=1, batch_size=240, **QUIET
        ).fit()
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        return (after - before).norm().item()

    assert update_norm(0.01) == pytest.approx(0.01, rel=1e-4)  # lr 1 * clipped norm
    assert update_norm(None) > 0.1


@pytest.mark.parametrize("kind", ["binary", "multiclass", "multilabel", "regression", "lm"])
def test_validation_metrics_keep_constant_memory(kind):
    width = {"binary": 1, "multiclass": 5, "multilabel": 4, "regression": 2, "lm": 7}[kind]
    metrics = Task(kind, width).metrics(torch.device("cpu"))

    def batch():
        if kind == "lm":
            return torch.randn(4, 3, width), torch.randint(0, width, (4, 3))
        out = torch.randn(16, width)
        target = {
            "binary": torch.randint(0, 2, (16,)),
            "multiclass": torch.randint(0, width, (16,)),
            "multilabel": torch.randint(0, 2, (16, width)).float(),
            "regression": torch.randn(16, width),
        }[kind]
        return out, target

    def state_size():
        return sum(state.numel() for state in metrics.collection.states())

    metrics.update(*batch())
    size = state_size()
    for _ in range(20):
        metrics.update(*batch())
    assert state_size() == size
    assert all(np.isfinite(v) for v in metrics.compute().values())


def test_binary_metrics_apply_sigmoid_even_when_logits_fall_in_0_1():
    metrics = Task("binary", 1).metrics(torch.device("cpu"))
    logits = torch.tensor([[0.1], [0.9], [0.2], [0.8]])  # all in [0, 1]: all positive after sigmoid
    metrics.update(logits, torch.tensor([1, 1, 1, 1]))
    assert metrics.compute()["val_accuracy"] == 1.0


def test_ema_warms_up_so_short_runs_are_not_judged_on_initial_weights(blobs):
    from gradwise.trainer import ema_update

    update = ema_update(0.999)
    average, current = (
        [torch.zeros(3), torch.zeros((), dtype=torch.long)],
        [
            torch.ones(3),
            torch.tensor(7),
        ],
    )
    update(average, current, torch.tensor(1))  # second update: decay (1 + 1) / (10 + 1)
    assert torch.allclose(average[0], torch.full((3,), 9 / 11)) and average[1] == 7
    update(average, current, torch.tensor(10_000))  # late: the configured decay
    assert torch.allclose(average[0], torch.full((3,), 9 / 11 + (2 / 11) * 0.001))

    x, y = blobs  # ~26 updates: without the warm-up a 0.999 average is still the initial weights
    run = _fit(mlp(), (x[:200], y[:200]), (x[200:], y[200:]), ema_decay=0.999, epochs=2, lr=1e-2)
    assert run.best_metric > 0.8


def test_ema_weights_are_checkpointed_and_used_for_validation(blobs):
    x, y = blobs
    trainer = gw.Trainer(
        mlp(), (x[:200], y[:200]), (x[200:], y[200:]), ema_decay=0.9, epochs=2, **QUIET
    )
    run = trainer.fit()
    assert (run.best_checkpoint / "ema.safetensors").is_file()
    ema_params = list(trainer.ema.module.parameters())
    assert any(
        not torch.equal(a, b) for a, b in zip(ema_params, trainer.model.parameters(), strict=True)
    )
    last = {k: v for k, v in run.history[-1].items() if k.startswith("val_")}
    assert trainer.evaluate() == pytest.approx(last)  # the history's numbers are the EMA model's
    trainer.ema = None
    assert trainer.evaluate()["val_loss"] != pytest.approx(last["val_loss"])


def test_mixup_and_cutmix_train_image_classifiers():
    recipe = {
        "model": {"name": "cnn", "kwargs": {"channels": [8]}},
        "data": {"name": "synthetic_images", "kwargs": {"n_samples": 200, "size": 8}},
    }
    for setting in ({"mixup": 0.4}, {"cutmix": 1.0}, {"mixup": 0.2, "cutmix": 1.0}):
        run = gw.Trainer(
            recipe=recipe, epochs=2, lr=3e-3, label_smoothing=0.1, **setting, **QUIET
        ).fit()
        assert np.isfinite(run.history[-1]["train_loss"])


def test_mixup_needs_images(blobs):
    x, y = blobs
    with pytest.raises(ConfigError, match="image classification"):
        _fit(mlp(), (x, y), mixup=0.2)


def test_early_stopping(blobs):
    x, y = blobs
    run = _fit(
        mlp(), (x[:200], y[:200]), (x[200:], y[200:]), lr=1e-9, epochs=20, patience=2, warmup=0
    )
    assert run.state == "stopped_early"
    assert len(run.history) == 3  # the first evaluation sets the best, two more fail to improve


@pytest.mark.parametrize("schedule", ["onecycle", "step", "plateau", "constant"])
def test_schedules_train(blobs, schedule):
    x, y = blobs
    run = _fit(
        mlp(),
        (x[:200], y[:200]),
        (x[200:], y[200:]),
        epochs=3,
        lr=1e-2,
        schedule={"name": schedule},
    )
    assert run.best_metric > 0.5


def test_lion_and_sgd_train(blobs):
    x, y = blobs
    for optim in ({"name": "lion", "lr": 3e-3}, {"name": "sgd", "lr": 0.05}):
        run = _fit(
            mlp(), (x[:200], y[:200]), (x[200:], y[200:]), epochs=5, batch_size=20, optim=optim
        )
        assert run.best_metric > 0.8, optim


def test_seed_makes_runs_repeatable(blobs):
    x, y = blobs
    a = _fit(mlp(dropout=0.3), (x, y), epochs=2, seed=3).model
    b = _fit(mlp(dropout=0.3), (x, y), epochs=2, seed=3).model
    c = _fit(mlp(dropout=0.3), (x, y), epochs=2, seed=4).model
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))


# -- bad input -----------------------------------------------------------------------------------


def test_labels_outside_the_models_output_range(blobs):
    x, y = blobs
    with pytest.raises(
        DataError, match=r"labels outside the model's output range.*0\.\.2.*outputs 2"
    ):
        _fit(mlp(outputs=2), (x, y), task="multiclass")
    assert not (gw.Trainer.__module__ and __import__("pathlib").Path("runs").exists())


def test_shape_mismatch_names_the_shapes(blobs):
    x, y = blobs
    with pytest.raises(DataError, match=r"shape \(2, 8\).*mat1 and mat2"):
        _fit(mlp(inputs=5), (x, y))


def test_data_and_model_lengths_and_types():
    with pytest.raises(DataError):
        _fit(mlp(), (torch.randn(10, 8), torch.randint(0, 3, (9,))))
    with pytest.raises(ConfigError, match=r"nn\.Module"):
        gw.Trainer("not a model", (torch.randn(4, 8), torch.zeros(4)))


def test_bf16_autocast_and_deterministic_mode_on_cpu(blobs):
    x, y = blobs
    run = _fit(
        mlp(),
        (x[:200], y[:200]),
        (x[200:], y[200:]),
        precision="bf16",
        deterministic=True,
        epochs=3,
        lr=1e-2,
    )
    assert run.best_metric > 0.8
    torch.use_deterministic_algorithms(False)
    with pytest.raises(ConfigError, match="fp16 loss scaling needs CUDA"):
        _fit(mlp(), (x, y), precision="fp16")


def test_on_evaluate_can_stop_a_run(blobs):
    x, y = blobs
    seen = []

    def prune(entry):
        seen.append(entry["epoch"])
        return entry["epoch"] >= 2

    run = _fit(mlp(), (x[:200], y[:200]), (x[200:], y[200:]), epochs=10, on_evaluate=prune)
    assert run.state == "stopped" and seen == [1, 2] and len(run.history) == 2


def test_logged_training_loss_stays_right_across_epoch_boundaries(blobs):
    x, y = blobs
    # 200 samples in batches of 32: 7 steps per epoch, logged every 5 steps, so logs straddle epochs
    run = _fit(mlp(), (x[:200], y[:200]), (x[200:], y[200:]), epochs=4, batch_size=32, log_every=5)
    from gradwise.tracking import read_metrics

    logged = [m["loss"] for m in read_metrics(run.dir, split="train")]
    assert len(logged) == 5 and all(0 < loss < 5 for loss in logged), logged


def test_deterministic_mode_keeps_validation_metrics_in_bounded_memory():
    # torchmetrics' deterministic bincount fallback (used before gradwise.metrics) needed 16 GB for
    # digits' 10-class AUROC
    code = (
        "import resource, gradwise as gw\n"
        "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
        "run = gw.Trainer(recipe={'model': {'name': 'cnn'}, 'data': {'name': 'digits'}},"
        " epochs=1, deterministic=True, progress='off', mlflow=False, tensorboard=False).fit()\n"
        "print(run.state, run.best_metric > 0.5)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.stdout.split() == ["finished", "True"], result.stderr[-2000:]
