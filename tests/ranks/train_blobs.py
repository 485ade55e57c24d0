"""A training script as users write one, launched by the tests with torchrun (or alone).

python -m torch.distributed.run --nproc-per-node 2 --standalone train_blobs.py ROOT SETTINGS_JSON
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch

import gradwise as gw


def blobs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 3
    y = torch.arange(240) % 3
    return centers[y] + torch.randn(240, 8, generator=g), y


def model() -> torch.nn.Module:
    torch.manual_seed(0)  # every rank builds the same model
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))


class KillRank:
    """SIGKILL this process when it has finished step ``step`` (a rank dying mid-run)."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_step_end(self, trainer: gw.Trainer) -> None:
        if trainer.dist.rank == self.rank and trainer.state.position.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def run(root: str, settings: dict) -> dict:
    """Train (or resume) as the settings say; rank 0's summary of the run."""
    settings = dict(settings)
    kill = settings.pop("kill", None)
    resume = settings.pop("resume", None)
    stop_after = settings.pop("on_evaluate_stop", None)
    x, y = blobs()
    data, val = (x[:200], y[:200]), (x[200:], y[200:])
    quiet = {"progress": "off", "mlflow": False, "tensorboard": False}
    if resume:
        trainer = gw.Trainer.resume(resume, model(), data, val, **quiet, **settings)
    else:
        callbacks = [KillRank(*kill)] if kill else []
        trainer = gw.Trainer(
            model(), data, val, recipe=None, root=os.path.join(root, "runs"), name="run",
            callbacks=callbacks,
            on_evaluate=(lambda e: e["epoch"] == stop_after) if stop_after else None,
            **quiet, **settings,
        )  # fmt: skip
    result = trainer.fit()
    return {"dir": str(result.dir), "history": result.history, "state": result.state}


def main() -> None:
    summary = run(sys.argv[1], json.loads(sys.argv[2]))
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
