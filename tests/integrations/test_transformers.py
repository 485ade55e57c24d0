"""gradwise.integrations.transformers.DoctorCallback on real Hugging Face Trainer runs: a tiny BERT
from a config (no download) trained with accumulation stays silent, each planted fault gets its
code, the run directory renders, the callback changes nothing in the run and never breaks it."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
)

from gradwise.doctor._casebook import _blobs, _digits, _mlp
from gradwise.doctor.cases import naive_cross_entropy
from gradwise.doctor.report import report_run
from gradwise.errors import GradwiseWarning
from gradwise.integrations.transformers import DoctorCallback

PLANTED = {
    "lr-too-high": "GW305",
    "nonfinite-loss": "GW301",
    "targets-out-of-range": "GW105",
    "unnormalised-inputs": "GW102",
    "overfitting": "GW401",
}


class Rows(torch.utils.data.Dataset):
    """Rows of (x, labels) as the dicts a Hugging Face collator stacks."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "labels": self.y[i]}


class WithLoss(nn.Module):
    """A plain PyTorch model that returns its loss, as the Trainer expects of a model."""

    def __init__(self, model: nn.Module, loss_fn) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.model(x)
        return {
            "logits": logits,
            **({"loss": self.loss_fn(logits, labels)} if labels is not None else {}),
        }


def tokens(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences whose label is whether token 5 occurs: learnable by a tiny BERT."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, 30, (n, 12), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    ids[labels == 1, 3] = 5
    return ids, labels


def scenario(name: str) -> tuple[nn.Module, object, object, dict]:
    torch.manual_seed(0)
    x, y, xv, yv = _digits()
    if name == "healthy":  # a real transformers model, with accumulation and clipping
        config = BertConfig(
            vocab_size=30, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=16, num_labels=2,
        )  # fmt: skip
        ids, labels = tokens(256, 0)
        vids, vlabels = tokens(128, 1)
        train = [{"input_ids": i, "labels": t} for i, t in zip(ids, labels, strict=True)]
        val = [{"input_ids": i, "labels": t} for i, t in zip(vids, vlabels, strict=True)]
        settings = {"max_steps": 40, "learning_rate": 1e-3, "gradient_accumulation_steps": 2}
        return BertForSequenceClassification(config), train, val, settings
    if name == "lr-too-high":
        return (
            WithLoss(_mlp(64, 10), F.cross_entropy),
            Rows(x, y),
            None,
            {"max_steps": 60, "learning_rate": 0.3},
        )
    if name == "nonfinite-loss":
        xb, yb = _blobs()
        model = WithLoss(_mlp(20, 4), naive_cross_entropy)
        settings = {"max_steps": 30, "learning_rate": 0.5, "optim": "sgd", "max_grad_norm": 0.0}
        return model, Rows(xb * 50, yb), None, settings  # clipping at 1.0 would contain it
    if name == "targets-out-of-range":  # binary targets stored as 0/255
        xb, yb = _blobs(classes=2)
        model = WithLoss(_mlp(20, 1), F.binary_cross_entropy_with_logits)
        return model, Rows(xb, (yb.float() * 255).unsqueeze(1)), None, {"max_steps": 20}
    if name == "unnormalised-inputs":  # digits as raw 0-255 pixels
        from sklearn.datasets import load_digits

        digits = load_digits()
        raw = torch.tensor(digits.data * 16, dtype=torch.float32)
        model = WithLoss(_mlp(64, 10), F.cross_entropy)
        return model, Rows(raw, torch.tensor(digits.target)), None, {"max_steps": 20}
    if name == "overfitting":  # a wide MLP memorises 200 samples with 30% wrong labels
        y = y[:200].clone()
        noisy = torch.rand(200, generator=torch.Generator().manual_seed(1)) < 0.3
        y[noisy] = torch.randint(
            0, 10, (int(noisy.sum()),), generator=torch.Generator().manual_seed(2)
        )
        model = WithLoss(_mlp(64, 10, hidden=256), F.cross_entropy)
        settings = {
            "max_steps": 200,
            "learning_rate": 3e-3,
            "eval_strategy": "steps",
            "eval_steps": 25,
        }
        return model, Rows(x[:200], y), Rows(xv, yv), settings
    raise ValueError(name)


def train(name: str, run_dir: Path, callback: DoctorCallback | None = None) -> DoctorCallback:
    model, data, val, settings = scenario(name)
    callback = callback or DoctorCallback(on_finding=None)
    settings = {"learning_rate": 1e-3, "eval_strategy": "epoch" if val else "no", **settings}
    args = TrainingArguments(
        output_dir=str(run_dir), per_device_train_batch_size=32, per_device_eval_batch_size=256,
        lr_scheduler_type="constant", weight_decay=0.0, report_to="none", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, use_cpu=True, seed=0, data_seed=0,
        dataloader_num_workers=0, **settings,
    )  # fmt: skip
    trainer = Trainer(model, args, train_dataset=data, eval_dataset=val, callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer.train()
    return callback


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[DoctorCallback, Path]]:
    root = tmp_path_factory.mktemp("transformers")
    return {name: (train(name, root / name), root / name) for name in ["healthy", *PLANTED]}


def test_a_healthy_bert_run_has_no_findings_and_its_run_directory_renders(runs) -> None:
    callback, run_dir = runs["healthy"]
    assert [f for f in callback.findings if f.severity != "info"] == [], callback.doctor.summary()
    telemetry = json.loads((run_dir / "doctor" / "telemetry.json").read_text())
    assert len(telemetry["loss"]) == 40  # one Doctor step per optimizer step, not per micro-batch
    # the loss the optimizer steps on, as the Trainer counts it: BERT's classification loss is a
    # mean that ignores the num_items_in_batch the Trainer passes it, so the Trainer does not
    # divide by the accumulation and the window's 2 micro-batches add up (2 ln 2 at the start)
    assert 1.2 < telemetry["loss"][0][1] < 1.6
    # the gradient norm before the Trainer clips it to 1.0 (a fresh BERT's is above 1)
    assert max(v for _, v in telemetry["grad_norm"]) > 1.0
    assert telemetry["val"] and telemetry["val"][0]["loss"] is not None
    assert any(name.startswith("bert.encoder.layer.0") for name in telemetry["update_ratio"])
    assert "bert.embeddings" in report_run(run_dir).read_text()


@pytest.mark.parametrize("name", PLANTED)
def test_each_planted_fault_gets_its_code(runs, name: str) -> None:
    callback, run_dir = runs[name]
    codes = {f.code for f in callback.findings if f.severity in ("warning", "error")}
    assert PLANTED[name] in codes, callback.doctor.summary()
    saved = json.loads((run_dir / "doctor" / "findings.json").read_text())
    assert PLANTED[name] in {f["code"] for f in saved}


def test_the_callback_changes_nothing_in_the_run(tmp_path) -> None:
    weights = []
    for callback in (None, DoctorCallback(on_finding=None)):
        model, data, _, _ = scenario("lr-too-high")
        args = TrainingArguments(
            output_dir=str(tmp_path), max_steps=25, per_device_train_batch_size=32,
            report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
            use_cpu=True, seed=0,
        )  # fmt: skip
        callbacks = [callback] if callback else []
        trainer = Trainer(model, args, train_dataset=data, callbacks=callbacks)
        trainer.train()
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))


def test_a_failing_doctor_is_one_warning_and_the_run_goes_on(tmp_path, monkeypatch) -> None:
    from gradwise.doctor.doctor import Doctor

    def broken(self, *args, **kwargs):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(Doctor, "step", broken)
    with pytest.warns(GradwiseWarning, match="planted failure") as caught:
        callback = train("unnormalised-inputs", tmp_path)
    assert sum("planted failure" in str(w.message) for w in caught) == 1
    assert callback.findings == []
