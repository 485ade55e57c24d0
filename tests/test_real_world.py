"""Models and data as users bring them: Hugging Face models and dict batches, streams, several
inputs, their own optimizer and parameter groups, callbacks and metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import QUIET, gradwise_cli
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

import gradwise as gw
from gradwise.checkpoint import list_checkpoints

QUIET_PLAIN = {**QUIET, "recipe": None, "doctor": {"mode": "off"}}


def _transformers():
    if os.environ.get("GRADWISE_REQUIRE_FRAMEWORKS") == "1":
        import transformers
    else:
        transformers = pytest.importorskip("transformers")
    return transformers


class Tokens(Dataset):
    """Token sequences of fixed length as a tokenizer gives them: the label says whether token 7
    occurs (a bag-of-words task a tiny BERT learns in a few epochs)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(10, 60, (n, 12), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        where = torch.randint(1, 12, (n,), generator=g)
        self.ids[self.labels == 1, where[self.labels == 1]] = 7
        self.ids[:, 0] = 1  # [CLS]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(12, dtype=torch.long),
            "labels": self.labels[i],
        }


def test_a_hugging_face_model_trains_on_dict_batches_with_its_own_loss():
    transformers = _transformers()
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16, num_labels=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)  # built offline from a config
    trainer = gw.Trainer(
        model, Tokens(512, 0), Tokens(128, 1), task="multiclass", epochs=8, lr=3e-3, **QUIET
    )
    run = trainer.fit()
    assert trainer.model_loss  # BERT takes the labels and returns its loss: gradwise trains on it
    assert run.state == "finished" and run.best_metric >= 0.9, run.history


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 16), nn.Linear(3, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.relu(self.a(a) + self.b(b))
        return self.head(hidden), hidden  # a tuple: its first tensor is the logits


def test_several_inputs_a_tuple_output_and_two_binary_logits():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 4, generator=g), torch.randn(300, 3, generator=g)
    y = ((a[:, 0] + b[:, 0]) > 0).long()
    data = torch.utils.data.TensorDataset(a[:240], b[:240], y[:240])
    val = torch.utils.data.TensorDataset(a[240:], b[240:], y[240:])
    run = gw.Trainer(TwoInputs(), data, val, task="binary", epochs=15, lr=1e-2, **QUIET).fit()
    assert run.best_metric > 0.85  # binary accuracy from two logits (z1 - z0)


class DigitStream(torch.utils.data.IterableDataset):
    """scikit-learn's digits as a stream, reshuffled every epoch (``set_epoch``, as Hugging Face
    streams do): no length, no indexing."""

    def __init__(self, train: bool) -> None:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        x, y = torch.tensor(x, dtype=torch.float32)[order] / 16.0, torch.tensor(y)[order]
        cut = 1400
        self.x, self.y = (x[:cut], y[:cut]) if train else (x[cut:], y[cut:])
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.epoch))
        for i in order.tolist():
            yield self.x[i], self.y[i]


STREAM_SCRIPT = """
import sys, torch, gradwise as gw
sys.path.insert(0, {tests!r})
from test_real_world import DigitStream
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
settings = dict(recipe=None, progress="off", mlflow=False, tensorboard=False, doctor={{"mode": "off"}},
                max_steps=400, batch_size=32, lr=1e-2, eval_steps=100, every_steps=5, keep_last=2,
                name=sys.argv[1])
if len(sys.argv) > 2:
    run = gw.Trainer.resume("runs/" + sys.argv[1], model, DigitStream(True), DigitStream(False),
                            **{{k: v for k, v in settings.items() if k in ("progress",)}}).fit()
else:
    run = gw.Trainer(model, DigitStream(True), DigitStream(False), task="multiclass", **settings).fit()
print(run.state, run.best_metric)
"""


@pytest.mark.slow
def test_a_stream_trains_and_resumes_bitwise_after_sigkill_mid_stream(tmp_path):
    script = tmp_path / "stream.py"
    script.write_text(STREAM_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the uninterrupted reference trains at the same time, in a process of its own
    reference = subprocess.Popen(
        [sys.executable, str(script), "reference"], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, str(script), "killed"], cwd=tmp_path, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    run_dir = tmp_path / "runs" / "killed"
    deadline = time.time() + 120
    while time.time() < deadline:  # mid-stream, in the second pass over the data (44 steps each)
        steps = [int(p.name.split("-")[1]) for p in list_checkpoints(run_dir)]
        if steps and max(steps) >= 60:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stdout, stderr = reference.communicate(timeout=120)
    assert reference.returncode == 0, stderr
    state, best = stdout.split()
    assert state == "finished" and float(best) >= 0.95  # validated every 100 steps of the stream

    resumed = subprocess.run(
        [sys.executable, str(script), "killed", "resume"], cwd=tmp_path, capture_output=True,
        text=True, env=env,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    last = {
        name: list_checkpoints(tmp_path / "runs" / name)[-1] for name in ("reference", "killed")
    }
    assert last["reference"].name == last["killed"].name == "step-00000400"
    expected = load_file(last["reference"] / "model.safetensors")
    got = load_file(last["killed"] / "model.safetensors")
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_your_optimizer_with_two_groups_keeps_them_through_resume(blobs):
    x, y = blobs

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))

    def optimizer(m: nn.Module) -> torch.optim.Optimizer:  # a slower body, a faster head
        return torch.optim.AdamW(
            [{"params": m[0].parameters(), "lr": 1e-3}, {"params": m[2].parameters(), "lr": 1e-2}]
        )

    data, val = (x[:200], y[:200]), (x[200:], y[200:])
    whole = gw.Trainer(model(), data, val, optimizer=optimizer, epochs=4, **QUIET_PLAIN).fit()
    halfway = gw.Trainer(
        model(), data, val, optimizer=optimizer, epochs=4, on_evaluate=lambda e: e["epoch"] == 2,
        **QUIET_PLAIN,
    ).fit()  # fmt: skip
    assert halfway.state == "stopped" and halfway.recipe.optim.name == "object:optimizer"
    with pytest.raises(gw.ConfigError, match="pass it again"):
        gw.Trainer.resume(halfway.dir, model(), data, val)
    trainer = gw.Trainer.resume(
        halfway.dir, model(), data, val, optimizer=optimizer, progress="off"
    )
    resumed = trainer.fit()
    groups = trainer.optimizer.param_groups
    assert len(groups) == 2 and groups[1]["initial_lr"] == 10 * groups[0]["initial_lr"]
    for a, b in zip(whole.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)  # exactly the uninterrupted run


def test_parameter_groups_for_the_recipes_optimizer(blobs):
    x, y = blobs
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    groups = [{"params": m[0].parameters(), "lr": 1e-4}, {"params": m[2].parameters()}]
    trainer = gw.Trainer(m, (x, y), param_groups=groups, lr=1e-2, epochs=1, **QUIET_PLAIN)
    trainer.fit()
    peaks = [g["initial_lr"] for g in trainer.optimizer.param_groups]
    assert peaks == [1e-4, 1e-2]  # a group's own lr, else the recipe's


class Recorder:
    def __init__(self) -> None:
        self.steps, self.validations, self.epochs = 0, [], 0

    def on_step_end(self, trainer) -> None:
        self.steps += 1

    def on_validation_end(self, trainer, entry) -> bool:
        self.validations.append(entry["step"])
        return len(self.validations) >= 3  # stop after the third validation

    def on_epoch_end(self, trainer) -> None:
        self.epochs += 1


class Broken:
    def on_step_end(self, trainer) -> None:
        raise RuntimeError("bug in my callback")


def test_callbacks_see_steps_validations_and_epochs_and_a_broken_one_never_ends_the_run(blobs):
    x, y = blobs
    recorder = Recorder()
    with pytest.warns(gw.errors.GradwiseWarning, match="Broken.on_step_end raised RuntimeError"):
        run = gw.Trainer(
            nn.Linear(8, 3), (x[:200], y[:200]), (x[200:], y[200:]), epochs=10, batch_size=20,
            eval_steps=5, callbacks=[Broken(), recorder], **QUIET_PLAIN,
        ).fit()  # fmt: skip
    assert run.state == "stopped" and recorder.validations == [5, 10, 15]
    assert recorder.steps == 15 and recorder.epochs == 1  # 10 steps per epoch


def test_your_metrics_are_recorded_and_can_be_the_monitor(blobs):
    from torchmetrics.classification import MulticlassAccuracy

    x, y = blobs

    def top2(outputs: torch.Tensor, targets: torch.Tensor) -> float:
        return (outputs.topk(2, dim=1).indices == targets[:, None]).any(1).float().mean().item()

    run = gw.Trainer(
        nn.Linear(8, 3), (x[:200], y[:200]), (x[200:], y[200:]), epochs=3,
        metrics={"top2": top2, "acc": MulticlassAccuracy(3, average="micro")}, lr=0.05,
        early_stopping={"monitor": "top2", "mode": "max"}, **QUIET_PLAIN,
    ).fit()  # fmt: skip
    entry = run.history[-1]
    assert run.monitor == "val_top2" and 0 <= entry["val_top2"] <= 1
    assert abs(entry["val_acc"] - entry["val_accuracy"]) < 1e-6  # the same measure, two ways
    assert entry["val_top2"] >= entry["val_accuracy"]


def test_a_batch_without_a_known_label_key_names_the_setting(tmp_path):
    class Unlabelled(Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> dict:
            return {"pixels": torch.zeros(4), "answer": torch.tensor(0)}

    with pytest.raises(gw.DataError, match="labels/label/targets/target/y"):
        gw.Trainer(nn.Linear(4, 2), Unlabelled(), **QUIET_PLAIN).fit()
    result = gradwise_cli("recipe", "--set", "data.label_key=answer", cwd=tmp_path)
    assert result.returncode == 0 and "label_key: answer" in result.stdout


def test_quick_check_runs_every_part_on_two_batches_and_keeps_nothing(blobs, tmp_path):
    x, y = blobs
    model = nn.Linear(8, 3)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = gw.Trainer(model, (x, y), (x, y), epochs=50, **QUIET_PLAIN)
    run = trainer.quick_check(2)
    assert run.steps == 2 and run.dir is None and "val_loss" in run.history[-1]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert not (tmp_path / "runs").exists()
    assert trainer.fit().steps == 50 * 4  # the real run afterwards is the whole run

    def broken(outputs, targets):  # the kind of bug a quick check is for
        raise ValueError("shapes do not match")

    with pytest.raises(ValueError, match="shapes do not match"):
        gw.Trainer(model, (x, y), (x, y), metrics={"mine": broken}, **QUIET_PLAIN).quick_check()
