"""The advisor versus a naive default and versus a 30-trial Optuna search, on four real tasks.

For each task, with the same model, data and epoch budget:
  advised  gradwise.advise(...) once, trained once;
  naive    Adam at 1e-3, constant learning rate, no weight decay, no clipping (a framework default);
  tuned    the best of a 30-trial Optuna TPE search over learning rate, weight decay, batch size and
           schedule (everything else at gradwise's defaults).
Metric: the best validation value of the task's monitored metric (accuracy, loss or perplexity),
averaged over seeds 0, 1, 2 (the search itself uses seed 0; its best setting is then re-run with the
three seeds, so selection on one seed's noise does not flatter it).
Targets: advised beats naive on every task, and is within 2% (relative) of tuned on at least three.

    .venv/bin/python benchmarks/advisor.py [--trials 30] [--tasks digits-cnn ...]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import optuna
import torch

import gradwise as gw

TASKS = {  # base recipe (model and data), epoch budget
    "digits-cnn": ({"model": {"name": "cnn"}, "data": {"name": "digits"}}, 10),
    "breast-cancer-mlp": ({"model": {"name": "mlp"}, "data": {"name": "breast_cancer"}}, 30),
    "diabetes-mlp": (
        {"task": "regression", "model": {"name": "mlp"}, "data": {"name": "diabetes"}},
        30,
    ),
    "char-transformer": (
        {
            "task": "lm",
            "model": {"name": "gpt", "kwargs": {"d_model": 64, "n_layers": 2, "n_heads": 4}},
            "data": {"name": "text", "kwargs": {"seq_len": 64, "val_fraction": 0.1}},
        },
        2,
    ),
}
NAIVE = {
    "optim": {"name": "adam", "lr": 1e-3, "weight_decay": 0.0},
    "schedule": {"name": "constant", "warmup": 0},
    "train": {"grad_clip": None},
}
QUIET = {"progress": "off", "mlflow": False, "tensorboard": False, "doctor.mode": "off"}


SEEDS = (0, 1, 2)


def train(recipe: gw.Recipe, root: str, seed: int = 0) -> tuple[float | None, str]:
    """The best validation value of one run (None when it failed or diverged), and its metric."""
    run = gw.Trainer(recipe=recipe.override(QUIET, root=root, seed=seed), progress="off").fit()
    value = (
        run.best_metric if run.best_metric is not None and math.isfinite(run.best_metric) else None
    )
    return value, run.monitor


def train_seeds(recipe: gw.Recipe, root: str) -> tuple[float | None, str]:
    """The mean over SEEDS (None when any seed failed: a recipe that sometimes diverges loses)."""
    results = [train(recipe, root, seed) for seed in SEEDS]
    values = [value for value, _ in results]
    mean = None if None in values else sum(values) / len(values)
    return mean, results[0][1]


def better(a: float | None, b: float | None, monitor: str) -> bool:
    """Whether a is better than b for this metric (None, a failed run, is worst)."""
    if a is None:
        return False
    if b is None:
        return True
    return a > b if monitor.endswith(("accuracy", "f1", "auroc", "r2")) else a < b


def relative_gap(advised: float, tuned: float, monitor: str) -> float:
    """How much worse advised is than tuned, relative to tuned (0 when advised is as good or better)."""
    gap = (
        (tuned - advised) / abs(tuned)
        if monitor.endswith("accuracy")
        else (advised - tuned) / abs(tuned)
    )
    return max(gap, 0.0)


def search_space(trial: optuna.Trial) -> dict:
    return {
        "optim.lr": trial.suggest_float("lr", 1e-4, 1e-1, log=True),
        "optim.weight_decay": trial.suggest_float("weight_decay", 1e-5, 0.3, log=True),
        "data.batch_size": trial.suggest_categorical("batch_size", [16, 32, 64, 128]),
        "schedule.name": trial.suggest_categorical("schedule", ["warmup_cosine", "constant", "onecycle", "step"]),
    }  # fmt: skip


def tune(base: gw.Recipe, trials: int, root: str, monitor_mode: str) -> tuple[float | None, dict]:
    """Search on seed 0, then re-run the best setting on every seed (the mean is the result)."""

    def objective(trial: optuna.Trial) -> float:
        recipe = base.override(search_space(trial))
        value, _ = train(recipe, root)
        return value if value is not None else (-math.inf if monitor_mode == "max" else math.inf)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize" if monitor_mode == "max" else "minimize",
        sampler=optuna.samplers.TPESampler(seed=0),
    )
    study.optimize(objective, n_trials=trials)
    best = base.override(search_space(optuna.trial.FixedTrial(study.best_params)))
    value, _ = train_seeds(best, root)
    return value, study.best_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for name in args.tasks:
            start = time.perf_counter()
            base_dict, epochs = TASKS[name]
            base = gw.Recipe.parse(base_dict).override(epochs=epochs, patience=None)
            advised_recipe = gw.advise(
                recipe=base, budget=epochs, explicit={"early_stopping.patience"}
            ).recipe
            advised, monitor = train_seeds(advised_recipe, root)
            naive, _ = train_seeds(base.override(NAIVE), root)
            mode = "max" if monitor.endswith(("accuracy", "f1", "auroc", "r2")) else "min"
            tuned, params = tune(base, args.trials, root, mode)
            rows.append((name, monitor, advised, naive, tuned, params, time.perf_counter() - start))
            print(
                f"{name}: {monitor} advised {advised} naive {naive} tuned {tuned} {params}",
                flush=True,
            )
    print(
        f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {args.trials} Optuna TPE trials per task"
    )
    print(
        f"{'task':<20}{'metric':<16}{'advised':>9}{'naive':>9}{'tuned':>9}{'beats naive':>13}{'gap to tuned':>14}{'s':>7}"
    )
    hits = 0
    for name, monitor, advised, naive, tuned, _, seconds in rows:
        gap = (
            relative_gap(advised, tuned, monitor)
            if advised is not None and tuned is not None
            else math.inf
        )
        hits += gap <= 0.02
        fmt = lambda v: "failed" if v is None else f"{v:.4f}"  # noqa: E731
        print(f"{name:<20}{monitor:<16}{fmt(advised):>9}{fmt(naive):>9}{fmt(tuned):>9}"
              f"{'yes' if better(advised, naive, monitor) else 'NO':>13}{gap:>13.1%}{seconds:>7.0f}")  # fmt: skip
    print(f"\nadvised within 2% of tuned on {hits} of {len(rows)} tasks (target: >= 3)")


if __name__ == "__main__":
    main()
