"""Early stopping on small, noisy validation sets: does the advised patience stop runs before their best?

For each small data set and seed, the advised recipe (``gw.Trainer(recipe=..., advise=True)``: the
zoo MLP, every setting the advisor's) is trained once for its whole epoch budget with early stopping
off. Early stopping never changes what happens before it stops, so the same history tells where a
run would have stopped under any patience: it is replayed with the Trainer's own rule (an
evaluation improves when it beats the best by more than ``min_delta``; stop after ``patience``
evaluations without one) for the rule before issue 16 (a fifth of the budget, at least 5
evaluations) and for the advice in this checkout. Reported, mean over seeds: the best validation
value the whole budget reached, the best a stopped run kept, how many runs stopped before their
best, and the epochs trained. ``--verify`` also trains the advised recipe with its early stopping
on and checks that it stops where the replay says.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/early_stopping.py --seeds 0 1 2 --verify
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import gradwise as gw
from gradwise.tasks import monitor_mode
from gradwise.trainer import improves

DATASETS = {  # name: the recipe's data section
    "breast_cancer": {"name": "breast_cancer"},
    "wine": {"name": "wine"},
    "iris": {"name": "iris"},
    "digits": {"name": "digits"},
    "noisy_synthetic": {  # 480 train / 120 validation samples, overlapping classes
        "name": "synthetic_classification",
        "kwargs": {"n_samples": 600, "class_sep": 0.7},
    },
    "diabetes": {"name": "diabetes"},  # regression: val_loss
}
QUIET = {"progress": "off", "mlflow": False, "tensorboard": False}


def old_patience(epochs: int) -> int | None:
    """The advisor's rule before issue 16: a fifth of the epoch budget, at least 5."""
    return None if epochs < 10 else max(5, round(0.2 * epochs))


def replay(values: list[float], patience: int | None, min_delta: float, mode: str) -> tuple:
    """(index of the last evaluation trained, best value kept) under the Trainer's stopping rule."""
    best, bad = None, 0
    for i, value in enumerate(values):
        if improves(value, best, mode, min_delta):
            best, bad = value, 0
        else:
            bad += 1
        if patience is not None and bad >= patience:
            return i, best
    return len(values) - 1, best


def one(data: str, seed: int, verify: bool) -> dict:
    recipe = {"model": {"name": "mlp"}, "data": DATASETS[data], "seed": seed}
    advised = gw.advise(recipe=recipe)
    es = advised.recipe.early_stopping
    why = next(a.why for a in advised.advice if a.setting == "early_stopping.patience")
    full = gw.Trainer(
        recipe={**recipe, "early_stopping": {"patience": None}},
        advise=True,
        **QUIET,
    ).fit()
    history, monitor = full.history, full.monitor
    mode = monitor_mode(monitor, full.recipe.early_stopping.mode)
    values = [h[monitor] for h in history]
    best = max(values) if mode == "max" else min(values)
    rows = {
        "best": best,
        "best_at": values.index(best) + 1,
        "evals": len(values),
        "epochs": advised.recipe.train.epochs,
    }
    for label, patience, delta in (
        ("before", old_patience(advised.recipe.train.epochs), 0.0),
        ("after", es.patience, es.min_delta),
    ):
        last, kept = replay(values, patience, delta, mode)
        rows[label] = {
            "patience": patience,
            "min_delta": delta,
            "kept": kept,
            "stopped_at": last + 1,
            "early": kept != best,
        }
    if verify:
        run = gw.Trainer(recipe=recipe, advise=True, **QUIET).fit()
        assert len(run.history) == rows["after"]["stopped_at"], (data, seed, len(run.history))
        assert run.best_metric == rows["after"]["kept"], (data, seed, run.best_metric)
    rows["monitor"], rows["why"] = monitor, why
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data", nargs="+", default=list(DATASETS))
    parser.add_argument("--verify", action="store_true")
    args = parser.parse_args()
    print(
        f"{'data set':<17}{'monitor':<14}{'rule':<8}{'patience':>9}{'best (budget)':>15}"
        f"{'best kept':>11}{'stopped early':>15}{'evals trained':>15}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # the runs' directories go there
        for data in args.data:
            results = [one(data, seed, args.verify) for seed in args.seeds]
            best = statistics.mean(r["best"] for r in results)
            evals = results[0]["evals"]
            for label in ("before", "after"):
                rows = [r[label] for r in results]
                kept = statistics.mean(r["kept"] for r in rows)
                early = sum(r["early"] for r in rows)
                trained = statistics.mean(r["stopped_at"] for r in rows)
                patience = sorted({r["patience"] for r in rows}, key=str)
                print(
                    f"{data:<17}{results[0]['monitor']:<14}{label:<8}"
                    f"{'/'.join(map(str, patience)):>9}{best:>15.4f}{kept:>11.4f}"
                    f"{f'{early}/{len(rows)}':>15}"
                    f"{f'{trained:.1f}/{evals}':>15}"
                )
            for seed, r in zip(args.seeds, results, strict=True):
                print(
                    f"  seed {seed}: best {r['best']:.4f} at evaluation {r['best_at']}; "
                    + "; ".join(
                        f"{label} kept {r[label]['kept']:.4f}, stopped at {r[label]['stopped_at']}"
                        for label in ("before", "after")
                    )
                )
            print(f"  advice: {results[0]['why']}")


if __name__ == "__main__":
    main()
