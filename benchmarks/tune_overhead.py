"""The tuner's own cost per trial: gradwise.tune.tune against Optuna called directly.

Both sides use the same sampler (TPE, multivariate, group, constant liar, the same start-up
trials and seed), the same pruner (successive halving, reduction factor 3) and the same storage
kind (an Optuna journal file), and run the same objective. Two objectives:

- trivial: a quadratic in the three sampled settings, "trained" for three epochs that each report
  an intermediate value (no training at all). A gradwise trial is a Trainer run, so the tuner runs
  here with a stand-in Trainer that computes the quadratic: what remains is the tuner itself
  (sampling through the search space, the recipe of the trial, the cap, the attributes it
  records, its callbacks).
- tiny: a real gradwise run (an MLP on iris, two epochs), what a user tunes. Optuna's side is the
  objective a user would write around ``gradwise.Trainer``: the same recipe overrides, a report
  and a pruning check after each evaluation.

Per-trial time is the median gap between the starts of consecutive trials (Optuna records when
each starts), so a study's set-up and summary do not count. Studies alternate between the two
sides (interleaved repeats); we print medians and their ratio.

    .venv/bin/python benchmarks/tune_overhead.py [--repeats 7] [--trials 60] [--tiny-trials 15]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import statistics
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import torch

import gradwise.trainer
from gradwise.recipe import Recipe
from gradwise.tune import tune
from gradwise.tune.space import parse_space
from gradwise.tune.study import make_pruner, make_sampler

RECIPE = {
    "model": {"name": "mlp", "kwargs": {"hidden": [16]}},
    "data": {"name": "iris", "batch_size": 32},
    "train": {"epochs": 2},
    "doctor": {"mode": "off"},
    "tracking": {"mlflow": False, "tensorboard": False, "progress": False},
}
SPACE = {
    "optim.lr": {"type": "log_uniform", "low": 1.0e-4, "high": 1.0e-1},
    "optim.weight_decay": {"type": "log_uniform", "low": 1.0e-5, "high": 0.3},
    "model.kwargs.dropout": {"type": "uniform", "low": 0.0, "high": 0.5},
}
EPOCHS = 3  # intermediate values per trivial trial


def quadratic(lr: float, weight_decay: float, dropout: float, epoch: int) -> float:
    """A smooth bowl in (log lr, log weight decay, dropout); epochs approach its floor."""
    bowl = (math.log10(lr) + 2.5) ** 2 + 0.5 * (math.log10(weight_decay) + 3) ** 2
    return bowl + (dropout - 0.2) ** 2 + 1.0 / epoch


# == the trivial objective ======================================================================


class QuadraticTrainer:
    """Stands in for gradwise.Trainer inside the tuner: no model, no data, no run directory."""

    monitor, mode = "val_loss", "min"

    def __init__(self, recipe: Recipe, on_evaluate: Callable | None = None, **_: Any) -> None:
        self.recipe = recipe
        self.on_evaluate = on_evaluate
        self.dir = None

    def fit(self) -> SimpleNamespace:
        r = self.recipe
        history, state = [], "finished"
        for epoch in range(1, EPOCHS + 1):
            value = quadratic(r.optim.lr, r.optim.weight_decay, r.model.kwargs["dropout"], epoch)
            history.append({"epoch": epoch, "step": epoch, "val_loss": value})
            if self.on_evaluate is not None and self.on_evaluate(history[-1]):
                state = "stopped"
                break
        return SimpleNamespace(dir="-", state=state, steps=len(history), history=history)


@contextlib.contextmanager
def stand_in_trainer() -> Iterator[None]:
    """The tuner with QuadraticTrainer for the Trainer and no model or data to check first."""
    real, preflight = gradwise.trainer.Trainer, gradwise.tune.study._preflight
    gradwise.trainer.Trainer = QuadraticTrainer
    gradwise.tune.study._preflight = lambda base: ("val_loss", "min", ["train_loss", "val_loss"])
    try:
        yield
    finally:
        gradwise.trainer.Trainer, gradwise.tune.study._preflight = real, preflight


def optuna_trivial(trial: optuna.Trial) -> float:
    lr = trial.suggest_float("optim.lr", 1.0e-4, 1.0e-1, log=True)
    weight_decay = trial.suggest_float("optim.weight_decay", 1.0e-5, 0.3, log=True)
    dropout = trial.suggest_float("model.kwargs.dropout", 0.0, 0.5)
    for epoch in range(1, EPOCHS + 1):
        value = quadratic(lr, weight_decay, dropout, epoch)
        trial.report(value, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned
    return value


# == the tiny real run ==========================================================================


def optuna_tiny(root: Path) -> Callable[[optuna.Trial], float]:
    """The objective a user writes around gradwise.Trainer when driving Optuna directly."""
    base = Recipe.parse(RECIPE)

    def objective(trial: optuna.Trial) -> float:
        recipe = base.override(
            {
                "optim.lr": trial.suggest_float("optim.lr", 1.0e-4, 1.0e-1, log=True),
                "optim.weight_decay": trial.suggest_float(
                    "optim.weight_decay", 1.0e-5, 0.3, log=True
                ),
                "model.kwargs.dropout": trial.suggest_float("model.kwargs.dropout", 0.0, 0.5),
                "name": f"trial-{trial.number:04d}",
                "tracking.root": str(root),
            }
        )

        def on_evaluate(entry: dict[str, float]) -> bool:
            trial.report(entry["val_accuracy"], int(entry["epoch"]))
            return trial.should_prune()

        run = gradwise.trainer.Trainer(recipe=recipe, progress="off", on_evaluate=on_evaluate).fit()
        if run.state == "stopped":
            raise optuna.TrialPruned
        return max(e["val_accuracy"] for e in run.history)

    return objective


# == measurement ================================================================================


def per_trial_ms(study: optuna.Study) -> float:
    """Median gap between the starts of consecutive trials, in milliseconds."""
    starts = sorted(t.datetime_start for t in study.get_trials(deepcopy=False))
    gaps = [(b - a).total_seconds() * 1000 for a, b in itertools.pairwise(starts)]
    return statistics.median(gaps)


def journal(path: Path) -> optuna.storages.JournalStorage:
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def run_optuna(
    objective: Callable, trials: int, direction: str, seed: int, folder: Path
) -> optuna.Study:
    space = parse_space(SPACE, Recipe.parse(RECIPE))
    study = optuna.create_study(
        study_name="direct",
        storage=journal(folder / "direct.journal"),
        sampler=make_sampler("tpe", seed, space, trials),
        pruner=make_pruner("asha"),
        direction=direction,
    )
    study.optimize(objective, n_trials=trials, gc_after_trial=False)
    return study


def run_gradwise(trials: int, seed: int, folder: Path, objective: str | None) -> optuna.Study:
    recipe = {**RECIPE, "tracking": {**RECIPE["tracking"], "root": str(folder)}}
    result = tune(
        recipe,
        SPACE,
        trials=trials,
        objective=objective,
        sampler="tpe",
        pruner="asha",
        storage=str(folder / "gradwise.journal"),
        study_name="gradwise",
        seed=seed,
        plots=False,
        verbose=False,
    )
    return result.study


def measure(kind: str, repeats: int, trials: int) -> None:
    times: dict[str, list[float]] = {"optuna": [], "gradwise": []}
    for repeat in range(repeats):
        order = ["optuna", "gradwise"] if repeat % 2 == 0 else ["gradwise", "optuna"]
        for side in order:
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp)
                if kind == "trivial" and side == "optuna":
                    study = run_optuna(optuna_trivial, trials, "minimize", repeat, folder)
                elif kind == "trivial":
                    with stand_in_trainer():
                        study = run_gradwise(trials, repeat, folder, "val_loss")
                elif side == "optuna":
                    study = run_optuna(optuna_tiny(folder), trials, "maximize", repeat, folder)
                else:
                    study = run_gradwise(trials, repeat, folder, None)
                states = {t.state.name for t in study.get_trials(deepcopy=False)}
                assert states <= {"COMPLETE", "PRUNED"}, states
                times[side].append(per_trial_ms(study))
    direct, ours = statistics.median(times["optuna"]), statistics.median(times["gradwise"])
    paired = statistics.median(
        g / o for g, o in zip(times["gradwise"], times["optuna"], strict=True)
    )
    print(
        f"{kind}\t{trials}\t{repeats}\t{direct:.2f}\t{ours:.2f}\t{ours / direct:.3f}\t"
        f"{paired:.3f}\t{ours - direct:+.2f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--trials", type=int, default=60, help="trials per trivial study")
    parser.add_argument("--tiny-trials", type=int, default=15, help="trials per tiny-run study")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"optuna {optuna.__version__}, torch {torch.__version__}, {args.threads} thread(s)")
    print("objective\ttrials\trepeats\toptuna_ms\tgradwise_ms\tratio\tpaired\toverhead_ms")
    measure("trivial", args.repeats, args.trials)
    measure("tiny", args.repeats, args.tiny_trials)


if __name__ == "__main__":
    main()
