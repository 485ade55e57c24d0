"""Tuning for less compute: ASHA-pruned TPE against unpruned random search, side by side.

On each task (an example recipe of gradwise with a shorter epoch budget) both searches run the
same space, trial count and sampler seed through ``gradwise.tune.tune``, one after the other in one
process. Compute is training steps, the sum of ``steps`` over the trials table (the batch size is
fixed, so a step costs the same everywhere). Printed per task and seed:

- the best objective each search reaches with the same trial count (complete trials only; a
  pruned trial is no result), the steps each spent, and their ratio;
- the compute at which ASHA first matches random search's final best: ASHA's trials in order,
  steps accumulated, until its running best is at least as good; divided by random's total. ASHA
  may go on past the trial count (up to ``--extra`` times as many trials, never past random's total
  compute): pruning is what buys those extra trials. That longer study is a second run (its TPE
  start-up phase is sized for its own budget).

The objective is the validation loss: on these small validation sets (360 and 114 samples)
accuracy saturates, and many settings tie at the top. Torch runs on one thread (a shared machine;
two threads on two busy cores were ten times slower).

    .venv/bin/python benchmarks/tune.py [--trials 30] [--extra 3] [--seeds 0 1 2] [--tasks digits ...]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import torch
import yaml

from gradwise.tune import tune


@dataclass(frozen=True)
class Task:
    recipe: str  # a file of gradwise/examples
    epochs: int  # the full budget of a trial; ASHA's rungs are at 1, 3, 9, 27 epochs
    objective: str


TASKS = {
    "digits": Task("digits_cnn.yaml", epochs=9, objective="val_loss"),
    "diabetes": Task("diabetes_regression.yaml", epochs=27, objective="val_loss"),
    "breast_cancer": Task("breast_cancer_mlp.yaml", epochs=27, objective="val_loss"),
}
SPACE = {
    "optim.lr": {"type": "log_uniform", "low": 1.0e-4, "high": 1.0e-1},
    "optim.weight_decay": {"type": "log_uniform", "low": 1.0e-5, "high": 0.3},
    "model.kwargs.dropout": {"type": "uniform", "low": 0.0, "high": 0.5},
}
METHODS = {"asha-tpe": ("tpe", "asha"), "random": ("random", "none")}


@dataclass
class Search:
    method: str
    minimize: bool
    best: float
    steps: int  # all trials
    complete: int
    pruned: int
    wall_s: float
    trail: list[tuple[int, float | None]]  # per trial in order: (steps, value if complete)


def recipe_for(task: Task, root: Path) -> dict:
    recipe = yaml.safe_load((files("gradwise") / "examples" / task.recipe).read_text())
    recipe["train"]["epochs"] = task.epochs
    recipe["tracking"] = {"root": str(root), "mlflow": False, "tensorboard": False}
    recipe["doctor"] = {"mode": "off"}  # steps are the same with it; wall time is shorter
    return recipe


def run_search(task: Task, method: str, seed: int, trials: int, root: Path) -> Search:
    sampler, pruner = METHODS[method]
    name = f"{Path(task.recipe).stem}-{method}-{seed}-{trials}"
    start = time.perf_counter()
    result = tune(
        recipe_for(task, root),
        SPACE,
        trials=trials,
        objective=task.objective,
        sampler=sampler,
        pruner=pruner,
        storage=str(root / f"{name}.journal"),
        study_name=name,
        seed=seed,
        plots=False,
        verbose=False,
    )
    wall = time.perf_counter() - start
    rows = sorted(result.trials, key=lambda t: t.number)
    trail = [(t.steps or 0, t.values[0] if t.state == "complete" else None) for t in rows]
    return Search(
        method=method,
        minimize=result.directions[0] == "minimize",
        best=result.best_value,
        steps=sum(steps for steps, _ in trail),
        complete=sum(t.state == "complete" for t in rows),
        pruned=sum(t.state == "pruned" for t in rows),
        wall_s=wall,
        trail=trail,
    )


def steps_to_match(search: Search, target: float, limit: int) -> int | None:
    """Steps ``search`` spends, trial by trial, until its running best is as good as ``target``
    (None if it is not within ``limit`` steps)."""
    spent, best = 0, math.inf if search.minimize else -math.inf
    for steps, value in search.trail:
        spent += steps
        if spent > limit:
            return None
        if value is not None:
            best = min(best, value) if search.minimize else max(best, value)
        if (best <= target) if search.minimize else (best >= target):
            return spent
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--extra", type=int, default=3, help="ASHA's trial cap, x --trials")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.trials} trials")
    print("task\tseed\tmethod\tbest\tcomplete\tpruned\tsteps\tcompute\twall_s")
    summary: dict[str, list[tuple[float, float | None, bool]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.tasks:
            task = TASKS[name]
            for seed in args.seeds:
                random = run_search(task, "random", seed, args.trials, Path(tmp))
                asha = run_search(task, "asha-tpe", seed, args.trials, Path(tmp))
                longer = run_search(task, "asha-tpe", seed, args.trials * args.extra, Path(tmp))
                minimize = random.minimize
                for search in (random, asha):
                    print(
                        f"{name}\t{seed}\t{search.method}\t{search.best:.4f}\t{search.complete}\t"
                        f"{search.pruned}\t{search.steps}\t{search.steps / random.steps:.3f}\t"
                        f"{search.wall_s:.0f}"
                    )
                matched = steps_to_match(longer, random.best, random.steps)
                ratio = None if matched is None else matched / random.steps
                as_good = asha.best <= random.best if minimize else asha.best >= random.best
                summary.setdefault(name, []).append((asha.steps / random.steps, ratio, as_good))
                print(
                    f"{name}\t{seed}\tASHA matches random's best "
                    + (
                        f"after {matched} steps = {ratio:.3f} of random's compute"
                        if matched is not None
                        else f"never within random's compute ({len(longer.trail)} trials, "
                        f"best {longer.best:.4f})"
                    ),
                    flush=True,
                )

    print("\nsummary (ASHA-pruned TPE / unpruned random search, same trial count)")
    print("task\tseeds\tas good or better\tcompute (median)\tcompute to match (median)")
    for name, rows in summary.items():
        totals = [total for total, _, _ in rows]
        matches = [ratio for _, ratio, _ in rows if ratio is not None]
        to_match = f"{statistics.median(matches):.3f}" if matches else "-"
        if len(matches) < len(rows):
            to_match += f" ({len(rows) - len(matches)} never matched)"
        wins = sum(good for _, _, good in rows)
        print(
            f"{name}\t{len(rows)}\t{wins}/{len(rows)}\t{statistics.median(totals):.3f}\t{to_match}"
        )


if __name__ == "__main__":
    main()
