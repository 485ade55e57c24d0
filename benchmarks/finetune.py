"""Transfer learning on digits: pretrain a CNN on digits 0-4, adapt it to digits 5-9.

Five ways to train on a small labelled set of 5-9 (``--per-class`` images of each digit), side by
side over several seeds, interleaved: (a) full fine-tuning, (b) the head only, (c) discriminative
rates (ULMFiT's 2.6 per group) with gradual unfreezing, (d) LoRA through peft, (e) from scratch, all
at the same peak learning rate (for (c), the top group's). Each reports validation accuracy on every held-out image of 5-9, the parameters it trains, its
checkpoint size and its wall time. The fine-tuned model keeps labels 5-9, so it has 10 outputs and
the pretrained 5-output head is replaced by a fresh one (the key report says so).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/finetune.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import gradwise as gw
from gradwise.data import load_data

QUIET = {"progress": "off", "mlflow": False, "tensorboard": False}
COMMON = {"recipe": {"model": {"name": "cnn"}}, "doctor": {"mode": "off"}, **QUIET}
LR = 3e-3
VARIANTS = {
    "full fine-tuning": {},
    "head only": {"freeze": ["*"], "unfreeze": ["head"]},
    "discriminative + gradual": {"lr_decay": 2.6, "unfreeze_every": 2},
    "LoRA (r=8)": {"peft": "lora", "lora_r": 8},
    "from scratch": None,
}


def split(per_class: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    bundle = load_data("digits", {"val_fraction": 0.2, "seed": 0})
    x = torch.cat([bundle.train.tensors[0], bundle.val.tensors[0]])
    y = torch.cat([bundle.train.tensors[1], bundle.val.tensors[1]])
    old, new = y < 5, y >= 5
    g = torch.Generator().manual_seed(seed)
    few = torch.cat([
        torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=g)[:per_class]]
        for c in range(5, 10)
    ])  # fmt: skip
    held = new.clone()
    held[few] = False
    return {"pretrain": (x[old], y[old]), "few": (x[few], y[few]), "val": (x[held], y[held])}


def pretrain(data: dict, root: Path) -> Path:
    x, y = data["pretrain"]
    run = gw.Trainer(
        None, (x, y), None, epochs=15, lr=LR, seed=0, name="pretrain", root=str(root), **COMMON
    ).fit()
    return run.dir


def finetune(name: str, data: dict, base: Path, root: Path, seed: int, epochs: int) -> dict:
    spec = VARIANTS[name]
    settings = {
        "epochs": epochs,
        "lr": LR,
        "seed": seed,
        "batch_size": 16,
        "root": str(root),
        **COMMON,
    }
    if spec is not None:
        spec = {"pretrained": str(base), **spec}
        settings["finetune"] = spec
    started = time.perf_counter()
    trainer = gw.Trainer(None, data["few"], data["val"], name=f"{name}-{seed}", **settings)
    run = trainer.fit()
    seconds = time.perf_counter() - started
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if trainer.unfreezer is not None:  # everything that trained at some point of the run
        trainable = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
    best = run.best_checkpoint
    size = sum(f.stat().st_size for f in best.iterdir() if f.name.endswith(".safetensors"))
    return {
        "accuracy": max(h["val_accuracy"] for h in run.history),
        "trainable": trainable,
        "checkpoint_kb": size / 1024,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = split(args.per_class, 0)
        base = pretrain(data, root / "base")
        for seed in args.seeds:
            data = split(args.per_class, seed)
            for name in VARIANTS:  # interleaved: every variant once per seed
                results[name].append(finetune(name, data, base, root, seed, args.epochs))
    n = len(data["few"][1])
    print(
        f"\n{n} labelled images of 5-9 ({args.per_class} per digit), {len(data['val'][1])} held out; "
        f"seeds {args.seeds}; medians (accuracy: mean +- sd)\n"
    )
    print("| variant | val accuracy | trainable parameters | checkpoint | wall time |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, rows in results.items():
        acc = [r["accuracy"] for r in rows]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        print(
            f"| {name} | {statistics.mean(acc):.3f} +- {sd:.3f} "
            f"| {statistics.median(r['trainable'] for r in rows):,.0f} "
            f"| {statistics.median(r['checkpoint_kb'] for r in rows):,.0f} KB "
            f"| {statistics.median(r['seconds'] for r in rows):.1f} s |"
        )


if __name__ == "__main__":
    main()
