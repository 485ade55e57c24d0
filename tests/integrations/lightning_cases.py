"""Planted faults in a Lightning run, for tests/integrations/test_lightning.py.

The same faults as gradwise's own planted cases (gradwise.doctor.cases), written the Lightning way:
a LightningModule, a DataLoader, ``Trainer(callbacks=[DoctorCallback(...)])``. Run as a script under
torchrun it trains one healthy and one faulty run with DDP on 2 CPU processes and prints rank 0's
findings as JSON.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradwise.doctor._casebook import _blobs, _digits, _mlp
from gradwise.doctor.cases import naive_cross_entropy
from gradwise.integrations.lightning import DoctorCallback


class Classifier(L.LightningModule):
    def __init__(self, model: nn.Module, loss_fn, lr: float = 1e-3, optimizer: str = "adamw"):
        super().__init__()
        self.model, self.loss_fn, self.lr, self.optimizer_name = model, loss_fn, lr, optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss_fn(self.model(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", self.loss_fn(self.model(x), y), sync_dist=True)

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def scenario(name: str):
    """(module, train data, val data or None, max_steps, trainer settings) of a named scenario."""
    torch.manual_seed(0)
    x, y, xv, yv = _digits()
    if name == "healthy":  # accumulation, clipping and bf16 autocast, as a careful user sets them
        extra = {"accumulate_grad_batches": 2, "gradient_clip_val": 1.0, "precision": "bf16-mixed"}
        return Classifier(_mlp(64, 10), F.cross_entropy), (x, y), (xv, yv), 120, extra
    if name == "lr-too-high":
        return Classifier(_mlp(64, 10), F.cross_entropy, lr=0.3), (x, y), None, 60, {}
    if name == "nonfinite-loss":
        xb, yb = _blobs()
        module = Classifier(_mlp(20, 4), naive_cross_entropy, lr=0.5, optimizer="sgd")
        return module, (xb * 50, yb), None, 30, {}
    if name == "targets-out-of-range":  # binary targets stored as 0/255
        xb, yb = _blobs(classes=2)
        targets = (yb.float() * 255).unsqueeze(1)
        return (
            Classifier(_mlp(20, 1), F.binary_cross_entropy_with_logits),
            (xb, targets),
            None,
            20,
            {},
        )
    if name == "unnormalised-inputs":  # digits as raw 0-255 pixels
        from sklearn.datasets import load_digits

        digits = load_digits()
        raw = torch.tensor(digits.data * 16, dtype=torch.float32)
        return (
            Classifier(_mlp(64, 10), F.cross_entropy),
            (raw, torch.tensor(digits.target)),
            None,
            20,
            {},
        )
    if name == "overfitting":  # a wide MLP memorises 200 samples with 30% wrong labels
        y = y[:200].clone()
        noisy = torch.rand(200, generator=torch.Generator().manual_seed(1)) < 0.3
        wrong = torch.randint(
            0, 10, (int(noisy.sum()),), generator=torch.Generator().manual_seed(2)
        )
        y[noisy] = wrong
        module = Classifier(_mlp(64, 10, hidden=256), F.cross_entropy, lr=3e-3)
        return module, (x[:200], y), (xv, yv), 200, {"check_val_every_n_epoch": 4}
    if name == "eval-in-train-mode":  # the hook that puts the model in eval mode overridden
        module = TrainModeValidation(nn.Sequential(_mlp(64, 10), nn.Dropout(0.5)), F.cross_entropy)
        return module, (x, y), (xv, yv), 30, {"val_check_interval": 15}
    raise ValueError(name)


class TrainModeValidation(Classifier):
    """Validation with dropout on: ``on_validation_model_eval`` overridden to do nothing (it
    is where Lightning calls ``model.eval()``), as done to keep a Monte-Carlo dropout on."""

    def on_validation_model_eval(self) -> None:
        pass


def fit(name: str, run_dir: Path, **trainer_kwargs) -> DoctorCallback:
    module, train, val, steps, extra = scenario(name)
    callback = DoctorCallback(run_dir, on_finding=None)
    trainer = L.Trainer(
        max_steps=steps,
        callbacks=[callback],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **{**extra, **trainer_kwargs},
    )
    loader = DataLoader(TensorDataset(*train), batch_size=32, shuffle=True)
    val_loader = DataLoader(TensorDataset(*val), batch_size=256) if val else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|LeafSpec|does not have many).*")
        trainer.fit(module, loader, val_loader)
    return callback


if __name__ == "__main__":  # under torchrun: DDP on 2 CPU processes
    root = Path(sys.argv[1])
    results = {}
    for name in ("healthy", "lr-too-high"):
        callback = fit(name, root / name, strategy="ddp", devices=2)
        results[name] = [[f.code, f.severity] for f in callback.findings]
    if torch.distributed.get_rank() == 0:
        print(json.dumps(results), flush=True)
    # Leaving with the process group alive lets a rank's gloo threads be torn down mid-flight at
    # interpreter exit ("terminate called without an active exception", SIGABRT): close it first.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
