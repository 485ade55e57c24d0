"""Learning-rate range test versus a log-spaced sweep of full trainings, on four real tasks.

For each example recipe: the range test's suggested learning rate (Smith 2017, run on the recipe's
model, data and optimizer), then full trainings at half-decade learning rates with the same epoch
budget and seeds. The best learning rate is the one with the lowest best-epoch validation loss,
averaged over the seeds (small validation sets are noisy).
Prints suggestion / best, and which sweep learning rates are near-optimal (validation loss within 2%
of the best), since on flat curves several are equally good. Target: within 3x on every task.

    .venv/bin/python benchmarks/lr_finder.py [--tasks digits-cnn ...]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

import gradwise as gw
from gradwise.doctor.lr_finder import lr_range_test
from gradwise.optim import build_optimizer

EXAMPLES = Path(gw.__file__).parent / "examples"
TASKS = {  # recipe, epoch budget
    "digits-cnn": ("digits_cnn.yaml", 10),
    "breast-cancer-mlp": ("breast_cancer_mlp.yaml", 20),
    "diabetes-mlp": ("diabetes_regression.yaml", 30),
    "char-transformer": ("char_lm.yaml", 1),
}
GRID = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]
NEAR = 0.02  # near-optimal: best-epoch validation loss within 2% of the best


def recipe_for(name: str, root: str) -> gw.Recipe:
    file, epochs = TASKS[name]
    return gw.load_recipe(EXAMPLES / file).override(
        {
            "epochs": epochs,
            "patience": None,
            "root": root,
            "mlflow": False,
            "tensorboard": False,
            "doctor.mode": "off",
        }
    )


def suggestion(recipe: gw.Recipe) -> float:
    a = gw.assemble(recipe=recipe)
    result = lr_range_test(
        a.model,
        a.train_loader.dataset,
        a.task.loss,
        optimizer=build_optimizer(a.model, a.recipe.optim),
        batch_size=recipe.data.batch_size,
        grad_clip=recipe.train.grad_clip,
        seed=recipe.seed,
    )
    return result.suggestion


def best_val_loss(recipe: gw.Recipe, lr: float, seeds: list[int]) -> float:
    """Best-epoch validation loss (the checkpoint one keeps), averaged over seeds."""
    scores = []
    for seed in seeds:
        run = gw.Trainer(recipe=recipe, lr=lr, seed=seed, progress="off").fit()
        losses = [h["val_loss"] for h in run.history if math.isfinite(h.get("val_loss", math.nan))]
        scores.append(min(losses) if losses else math.inf)
    return sum(scores) / len(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for name in args.tasks:
            start = time.perf_counter()
            recipe = recipe_for(name, root)
            suggested = suggestion(recipe)
            seeds = args.seeds if name != "char-transformer" else args.seeds[:1]  # minutes per run
            scores = {lr: best_val_loss(recipe, lr, seeds) for lr in GRID}
            best_lr = min(scores, key=scores.get)
            near = [lr for lr, s in scores.items() if s <= (1 + NEAR) * scores[best_lr]]
            within = any(1 / 3 <= suggested / lr <= 3 for lr in near)
            rows.append(
                (name, suggested, best_lr, scores, near, within, time.perf_counter() - start)
            )
            print(
                f"{name}: suggested {suggested:.2e}; "
                + ", ".join(f"{lr:g}: {s:.4f}" for lr, s in scores.items()),
                flush=True,
            )
    print(
        f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; grid {GRID}; metric: best-epoch validation loss"
    )
    print(
        f"{'task':<20}{'suggested':>11}{'best':>9}{'ratio':>8}  {'near-optimal (within 2%)':<32}{'within 3x':>10}{'s':>6}"
    )
    for name, suggested, best_lr, _, near, within, seconds in rows:
        near_text = ", ".join(f"{lr:g}" for lr in near)
        print(f"{name:<20}{suggested:>11.2e}{best_lr:>9g}{suggested / best_lr:>8.2f}  {near_text:<32}"
              f"{'yes' if within else 'NO':>10}{seconds:>6.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
