"""Doctor overhead inside Lightning and the Hugging Face Trainer: the same fit with and without
gradwise's DoctorCallback.

The model is doctor_overhead.py's MLP (256 -> 768 -> 768 -> 10, batch 128, AdamW), trained for
``--steps`` optimizer steps on fixed random data. Runs with and without the callback alternate
(the order flips every repeat), so both see the same machine state; each run is timed from the
first training batch to the end of training (a timing callback, present in both), so the
frameworks' start-up is left out. Two ratios of medians: the steady state (from step WARM on: a
long run's cost) and the whole run (with the doctor's one-time first-step probes and its first 5
watched steps, which a run of ``--steps`` steps pays once). Target: <= 1.05.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/doctor_overhead_frameworks.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

IN, WIDTH, CLASSES, BATCH = 256, 768, 10, 128
WARM = 40  # steps after which a run is in its steady state (the doctor's first-step probes and
# its first 5 watched steps are behind it)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(IN, WIDTH),
        nn.ReLU(),
        nn.Linear(WIDTH, WIDTH),
        nn.ReLU(),
        nn.Linear(WIDTH, CLASSES),
    )


def data(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(steps * BATCH, IN, generator=g), torch.randint(
        0, CLASSES, (steps * BATCH,), generator=g
    )


def lightning_fit(steps: int, watched: bool) -> list[float]:
    import tempfile

    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from gradwise.integrations.lightning import DoctorCallback

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if batch_idx in (0, WARM):
                self.marks = [*getattr(self, "marks", []), time.perf_counter()]

        def on_train_end(self, trainer, module) -> None:
            self.marks.append(time.perf_counter())

    clock = Clock()
    callbacks = [clock, *([DoctorCallback(tempfile.mkdtemp(), on_finding=None)] if watched else [])]
    trainer = L.Trainer(
        max_steps=steps, callbacks=callbacks, accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Module(), DataLoader(TensorDataset(*data(steps)), batch_size=BATCH))
    return clock.marks


def transformers_fit(steps: int, watched: bool) -> list[float]:
    import tempfile

    from transformers import Trainer, TrainerCallback, TrainingArguments

    from gradwise.integrations.transformers import DoctorCallback

    class WithLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def forward(self, x, labels=None):
            logits = self.net(x)
            return {"loss": F.cross_entropy(logits, labels), "logits": logits}

    class Rows(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.x, self.y = data(steps)

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i):
            return {"x": self.x[i], "labels": self.y[i]}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step in (0, WARM):
                self.marks = [*getattr(self, "marks", []), time.perf_counter()]

        def on_train_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=1e-3,
            report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
            use_cpu=True, dataloader_num_workers=0,
        )  # fmt: skip
        callbacks = [clock, *([DoctorCallback(on_finding=None)] if watched else [])]
        Trainer(WithLoss(), args, train_dataset=Rows(), callbacks=callbacks).train()
    return clock.marks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--frameworks", nargs="+", default=["lightning", "transformers"])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    fits = {"lightning": lightning_fit, "transformers": transformers_fit}
    print(f"{args.steps} steps of a {IN}-{WIDTH}-{WIDTH}-{CLASSES} MLP, batch {BATCH}; "
          f"{args.repeats} interleaved repeats")  # fmt: skip
    print("| framework | plain ms/step | with DoctorCallback ms/step | ratio, steady state |"
          " ratio, whole run |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in args.frameworks:
        fit = fits[name]
        fit(WARM + 5, True)  # warm-up: imports, the doctor's one-time costs of a process
        runs: dict[bool, list[list[float]]] = {False: [], True: []}
        for r in range(args.repeats):
            for w in (False, True) if r % 2 == 0 else (True, False):
                runs[w].append(fit(args.steps, w))
        steady = {w: statistics.median(m[2] - m[1] for m in runs[w]) for w in runs}
        whole = {w: statistics.median(m[2] - m[0] for m in runs[w]) for w in runs}
        per_step = {w: 1000 * steady[w] / (args.steps - WARM) for w in runs}
        print(
            f"| {name} | {per_step[False]:.2f} | {per_step[True]:.2f} | "
            f"{steady[True] / steady[False]:.3f} | {whole[True] / whole[False]:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
