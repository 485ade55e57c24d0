"""Trainer overhead: gradwise.Trainer versus a hand-written PyTorch loop doing the same work.

Both train the same MLP (a plain step takes several ms here) on the same data, seed and number of
steps, with the same algorithm: AdamW without decay on biases/norms, linear warmup + cosine decay,
gradient clipping, validation at each epoch's end and a checkpoint when it improves. The Trainer runs
as a user runs it: live progress bar, torchmetrics validation metrics, metrics.jsonl, TensorBoard and
MLflow on. Runs alternate (interleaved repeats); we compare medians of the time per step, measured
from the first step to the end of the last epoch (setup, e.g. MLflow's database, is excluded).

    .venv/bin/python benchmarks/overhead.py [--repeats 5] [--epochs 3]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradwise as gw
from gradwise.data.loader import make_loader
from gradwise.optim import param_groups

IN, WIDTH, CLASSES, BATCH = 256, 768, 10, 128
N_TRAIN, N_VAL = 12_800, 1_280  # 100 steps per epoch


def make_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(IN, CLASSES, generator=g)
    x = torch.randn(N_TRAIN + N_VAL, IN, generator=g)
    y = (x @ w + 0.5 * torch.randn(N_TRAIN + N_VAL, CLASSES, generator=g)).argmax(1)
    return (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(IN, WIDTH),
        nn.ReLU(),
        nn.Linear(WIDTH, WIDTH),
        nn.ReLU(),
        nn.Linear(WIDTH, CLASSES),
    )


def plain_loop(train, val, epochs: int, out: Path, fast_loader: bool = False) -> tuple[float, int]:
    """What an expert writes by hand. Returns (seconds from first step to the end, steps).

    fast_loader: use gradwise's loader (whole-batch gathering from in-memory tensors) instead of a
    stock DataLoader, to separate the Trainer's own overhead from its faster data path.
    """
    torch.manual_seed(0)
    model = make_model()
    if fast_loader:
        loader = make_loader(TensorDataset(*train), BATCH, shuffle=True, drop_last=False)
    else:
        loader = DataLoader(TensorDataset(*train), batch_size=BATCH, shuffle=True)
    val_loader = DataLoader(TensorDataset(*val), batch_size=2 * BATCH)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)
    total = epochs * len(loader)
    warm = round(0.05 * total)

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - 1 - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    best, step = 0.0, 0
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            if step % 10 == 0:
                print(f"step {step} loss {loss.item():.4f}", end="\r", flush=True)
        model.eval()
        correct = 0
        with torch.inference_mode():
            for x, y in val_loader:
                correct += (model(x).argmax(1) == y).sum().item()
        accuracy = correct / len(val[1])
        if accuracy > best:
            best = accuracy
            torch.save(
                {"model": model.state_dict(), "optimizer": opt.state_dict()}, out / "best.pt"
            )
    print()
    return time.perf_counter() - start, step


def trainer_run(train, val, epochs: int, root: Path) -> tuple[float, int]:
    """gradwise.Trainer as a user runs it. Returns (seconds from first step to the end, steps)."""
    recipe = {"data": {"batch_size": BATCH, "drop_last": False}, "train": {"epochs": epochs}}
    recipe["tracking"] = {"root": str(root), "tensorboard": True, "mlflow": True}
    run = gw.Trainer(make_model(), train, val, recipe=recipe, progress="bar", lr=1e-3).fit()
    return run.history[-1]["time_s"], run.steps


def lightning_run(train, val, epochs: int, root: Path) -> tuple[float, int] | None:
    """The same work in Lightning with its defaults, if Lightning is installed."""
    try:
        import lightning as L
    except ImportError:
        return None

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = make_model()

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self.model(x), y)

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_acc", (self.model(x).argmax(1) == y).float().mean())

        def configure_optimizers(self):
            opt = torch.optim.AdamW(param_groups(self.model, 0.05), lr=1e-3)
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, 1e-3, total_steps=epochs * N_TRAIN // BATCH
            )
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, *_):
            if trainer.global_step == 0 and not hasattr(self, "start"):
                self.start = time.perf_counter()

    timer = Timer()
    trainer = L.Trainer(
        max_epochs=epochs, gradient_clip_val=1.0, default_root_dir=str(root), callbacks=[timer],
        accelerator="cpu", devices=1,
    )  # fmt: skip
    torch.manual_seed(0)
    trainer.fit(
        Module(),
        DataLoader(TensorDataset(*train), batch_size=BATCH, shuffle=True),
        DataLoader(TensorDataset(*val), batch_size=2 * BATCH),
    )
    return time.perf_counter() - timer.start, trainer.global_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    train, val = make_data()
    loops = ["plain", "plain_fast", "gradwise", "lightning"]
    times: dict[str, list[float]] = {name: [] for name in loops}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for r in range(args.repeats):
            for name in loops if r % 2 == 0 else loops[::-1]:
                if name.startswith("plain"):
                    seconds, steps = plain_loop(train, val, args.epochs, tmp, name == "plain_fast")
                elif name == "gradwise":
                    seconds, steps = trainer_run(train, val, args.epochs, tmp / "runs")
                else:
                    result = lightning_run(train, val, args.epochs, tmp / "lightning")
                    if result is None:
                        continue
                    seconds, steps = result
                times[name].append(1000 * seconds / steps)
    plain = statistics.median(times["plain"])
    ours = statistics.median(times["gradwise"])
    print(f"\nMLP {IN}-{WIDTH}-{WIDTH}-{CLASSES}, batch {BATCH}, {args.epochs} epochs x 100 steps, "
          f"{args.repeats} interleaved repeats, torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'loop':<12}{'median ms/step':>16}{'ratio':>8}{'overhead ms/step':>18}   all ms/step")
    for name in loops:
        if not times[name]:
            print(f"{name:<12}{'(not installed)':>16}")
            continue
        med = statistics.median(times[name])
        runs = " ".join(f"{t:.2f}" for t in times[name])
        print(f"{name:<12}{med:>16.2f}{med / plain:>8.3f}{med - plain:>18.2f}   {runs}")
    fast = statistics.median(times["plain_fast"])
    paired = statistics.median(
        b / a for a, b in zip(times["plain"], times["gradwise"], strict=True)
    )
    print(
        f"\ngradwise / plain = {ours / plain:.3f}, median of paired ratios {paired:.3f} (target <= 1.03)"
    )
    print(
        f"gradwise / plain with the same fast loader = {ours / fast:.3f}: the Trainer's own overhead"
    )
    print(
        "plain: stock DataLoader; plain_fast: gradwise's batched loader; lightning: Lightning defaults"
    )


if __name__ == "__main__":
    main()
