"""Learning-rate judgment on tasks nobody tuned for: advised, probed, range test and TPE, side by side.

For each task (a zoo model, a data set and an epoch budget, as a new user would write them):
  advised   the advisor's rule-based rate (``gradwise.advise``), its recipe trained on 3 seeds;
  probed    ``gradwise.advise(probe=True)``: short budgeted runs of candidate rates around the
            rule's prior, judged on held-out loss (gradwise.lr_probe); the recipe trained on 3 seeds;
  range     the LR range test's suggestion (Smith 2017) on the same model, data and optimizer;
  tuned     a 20-trial Optuna TPE search over the learning rate alone (log-uniform 1e-5..1, every
            other setting as advised) on seed 0, its best rate then re-run on the 3 seeds.
Metric: the best validation value of the advisor's monitored metric, averaged over seeds 0, 1, 2.
The probe's cost is its wall time over that of one training run of the task timed in the same
process right before and after it (the mean of the two).

Tasks marked ``fit`` are the ones the priors in gradwise.advisor.BASE_LR are fitted on
(benchmarks/fit_lr_priors.py reads their searches from benchmarks/data/lr_judgment.json); the
others were never used to choose a number in gradwise.

Targets: the probed rate within 3x of the tuned best on >= 10 of 12 tasks; the probed recipe within
2% of the tuned result on >= 11 of 12; probe cost <= 10% of one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lr_judgment.py --jobs 2            # everything
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lr_judgment.py --redo probe        # after a change
    .venv/bin/python benchmarks/lr_judgment.py --table                               # print only

Results are cached per task and stage in benchmarks/data/lr_judgment.json (the search data the
priors are fitted on lives there too), so changing the probe re-runs only the probe stages.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "data" / "lr_judgment.json"
SEEDS = (0, 1, 2)
TRIALS = 20
SEARCH_RANGE = (1e-5, 1.0)
STAGES = ("advised", "search", "tuned", "probe", "probed", "range")
QUIET = {"progress": "off", "mlflow": False, "tensorboard": False, "doctor.mode": "off"}


def _task(recipe: dict, epochs: int | None = None, fit: bool = False, kind: str = "") -> dict:
    return {"recipe": recipe, "epochs": epochs, "fit": fit, "kind": kind}


def _seqs(**kwargs: Any) -> dict:
    return {"name": "synthetic_sequences", "kwargs": kwargs}


TASKS = {
    # -- the priors are fitted on these six -------------------------------------------------------
    "digits-cnn": _task(
        {"model": {"name": "cnn"}, "data": {"name": "digits"}}, 6, True, "CNN with BatchNorm"
    ),
    "breast-cancer-ln-mlp": _task(
        {"model": {"name": "mlp"}, "data": {"name": "breast_cancer"}},
        30,
        True,
        "tabular, LayerNorm MLP",
    ),
    "noisy-plain-mlp": _task(
        {
            "model": {"name": "mlp", "kwargs": {"norm": None}},
            "data": {
                "name": "synthetic_classification",
                "kwargs": {"n_samples": 2000, "n_classes": 4, "noise": 0.1, "class_sep": 0.8},
            },
        },
        20,
        True,
        "tabular, MLP without normalisation",
    ),
    "digits-bn-mlp": _task(
        {
            "model": {"name": "mlp", "kwargs": {"norm": "batchnorm"}},
            "data": {"name": "digits", "kwargs": {"flatten": True}},
        },
        15,
        True,
        "images as tabular, BatchNorm MLP",
    ),
    "count-lstm": _task(
        {
            "model": {"name": "rnn", "kwargs": {"cell": "lstm", "hidden": 64, "embed_dim": 32}},
            "data": _seqs(n_samples=800, seq_len=40, vocab_size=12, n_classes=6),
        },
        10,
        True,
        "LSTM sequence classifier",
    ),
    "char-gpt": _task(
        {
            "task": "lm",
            "model": {"name": "gpt", "kwargs": {"d_model": 64, "n_layers": 2, "n_heads": 4}},
            "data": {"name": "text", "kwargs": {"seq_len": 64, "val_fraction": 0.1}},
        },
        1,
        True,
        "GPT character LM",
    ),
    # -- never used to fit anything ---------------------------------------------------------------
    "breast-cancer-plain-mlp": _task(
        {"model": {"name": "mlp", "kwargs": {"norm": None}}, "data": {"name": "breast_cancer"}},
        None,
        False,
        "small tabular, MLP without normalisation",
    ),
    "noisy-bn-mlp": _task(
        {
            "model": {"name": "mlp", "kwargs": {"norm": "batchnorm"}},
            "data": {
                "name": "synthetic_classification",
                "kwargs": {"n_samples": 1500, "n_classes": 6, "noise": 0.2, "n_features": 30},
            },
        },
        None,
        False,
        "noisy multi-class, BatchNorm MLP",
    ),
    "regression-ln-mlp": _task(
        {
            "task": "regression",
            "model": {"name": "mlp"},
            "data": {
                "name": "synthetic_regression",
                "kwargs": {"n_samples": 1200, "n_features": 15, "noise": 0.5},
            },
        },
        None,
        False,
        "regression, LayerNorm MLP",
    ),
    "diabetes-plain-mlp": _task(
        {
            "task": "regression",
            "model": {"name": "mlp", "kwargs": {"norm": None}},
            "data": {"name": "diabetes"},
        },
        None,
        False,
        "regression, MLP without normalisation",
    ),
    "imbalanced-mlp": _task(
        {
            "model": {"name": "mlp"},
            "data": {
                "name": "synthetic_classification",
                "kwargs": {"n_samples": 3000, "n_classes": 2, "weights": [0.93, 0.07]},
            },
        },
        None,
        False,
        "imbalanced binary (PR-AUC)",
    ),
    "images-cnn": _task(
        {
            "model": {"name": "cnn", "kwargs": {"channels": [16, 32]}},
            "data": {
                "name": "synthetic_images",
                "kwargs": {"n_samples": 800, "size": 16, "n_classes": 6, "noise": 0.8},
            },
        },
        8,
        False,
        "CNN with BatchNorm, other images",
    ),
    "digits-resnet": _task(
        {
            "model": {"name": "resnet", "kwargs": {"widths": [16, 32, 64]}},
            "data": {"name": "digits"},
        },
        5,
        False,
        "ResNet",
    ),
    "count-gru": _task(
        {
            "model": {"name": "rnn", "kwargs": {"cell": "gru", "hidden": 48, "embed_dim": 24}},
            "data": _seqs(n_samples=800, seq_len=48, vocab_size=16, n_classes=8),
        },
        12,
        False,
        "GRU sequence classifier",
    ),
    "seq-transformer": _task(
        {
            "model": {
                "name": "transformer",
                "kwargs": {"d_model": 32, "n_layers": 2, "n_heads": 4},
            },
            "data": _seqs(n_samples=800, seq_len=32, vocab_size=12, n_classes=8),
        },
        10,
        False,
        "Transformer encoder classifier",
    ),
    "perm-gpt": _task(
        {
            "task": "lm",
            "model": {"name": "gpt", "kwargs": {"d_model": 128, "n_layers": 2, "n_heads": 4}},
            "data": _seqs(n_samples=600, seq_len=32, vocab_size=24, task="lm", noise=0.3),
        },
        3,
        False,
        "GPT LM, wider, another language",
    ),
}


# -- one task ---------------------------------------------------------------------------------


def _base(name: str):
    import gradwise as gw

    spec = TASKS[name]
    return gw.Recipe.parse(spec["recipe"]), spec["epochs"]


def _train(recipe, root: str, seed: int, lr: float | None = None) -> tuple[float | None, float]:
    """(the best validation value, or None for a failed or diverged run; the run's seconds)."""
    import gradwise as gw

    over = {**QUIET, "root": root, "seed": seed} | ({"lr": lr} if lr is not None else {})
    start = time.perf_counter()
    try:
        run = gw.Trainer(recipe=recipe.override(over), progress="off").fit()
    except (
        Exception
    ) as error:  # a diverged or failed trial scores worst, it does not stop the search
        print(f"  run failed: {type(error).__name__}: {error}", file=sys.stderr)
        return None, time.perf_counter() - start
    best = run.best_metric
    value = best if best is not None and math.isfinite(best) else None
    return value, time.perf_counter() - start


def _seeds(recipe, root: str, lr: float | None = None) -> dict:
    results = [_train(recipe, root, seed, lr) for seed in SEEDS]
    values = [v for v, _ in results]
    return {
        "values": values,
        "mean": None if None in values else statistics.fmean(values),
        "seconds": [s for _, s in results],
    }


def _advise(name: str, probe: bool):
    import gradwise as gw

    base, epochs = _base(name)
    start = time.perf_counter()
    advised = gw.advise(recipe=base.override(epochs=epochs) if epochs else base, budget=epochs,
                        probe=probe)  # fmt: skip
    return advised, time.perf_counter() - start


def _monitor_mode(recipe) -> tuple[str, str]:
    import gradwise as gw

    a = gw.assemble(recipe=recipe.override(QUIET, root=tempfile.mkdtemp()))
    return a.monitor, a.mode


def run_task(name: str, stages: list[str], cached: dict) -> dict:
    """Run the missing ``stages`` of one task; returns its updated results."""
    import optuna
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = dict(cached)
    root = tempfile.mkdtemp(prefix=f"lrj-{name}-")
    advised, _ = _advise(name, probe=False)
    recipe = advised.recipe
    if "monitor" not in out:
        out["monitor"], out["mode"] = _monitor_mode(recipe)
        out["batch_size"] = recipe.data.batch_size
        out["epochs"] = recipe.train.epochs
        out["architecture"] = advised.facts.architecture
        out["params"] = advised.facts.params
    out["advised_lr"] = recipe.optim.lr  # always the current rule's
    maximize = out["mode"] == "max"
    if "advised" in stages:
        out["advised"] = {"lr": recipe.optim.lr, **_seeds(recipe, root)}
        print(f"{name}: advised {recipe.optim.lr:.3g} -> {out['advised']['mean']}", flush=True)
    if "search" in stages:
        trials = []

        def objective(trial: optuna.Trial) -> float:
            lr = trial.suggest_float("lr", *SEARCH_RANGE, log=True)
            value, seconds = _train(recipe, root, 0, lr)
            trials.append({"lr": lr, "value": value, "seconds": seconds})
            return value if value is not None else (-math.inf if maximize else math.inf)

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(
            direction="maximize" if maximize else "minimize",
            sampler=optuna.samplers.TPESampler(seed=0),
        )
        study.optimize(objective, n_trials=TRIALS)
        out["search"] = {"best_lr": study.best_params["lr"], "trials": trials}
        out.pop("tuned", None)
        stages = [*stages, "tuned"]
        print(f"{name}: search best {study.best_params['lr']:.3g}", flush=True)
    if "tuned" in stages:
        out["tuned"] = {
            "lr": out["search"]["best_lr"],
            **_seeds(recipe, root, out["search"]["best_lr"]),
        }
        print(f"{name}: tuned -> {out['tuned']['mean']}", flush=True)
    if "probe" in stages:  # its cost against one run timed right before and after it
        before = _train(recipe, root, 0)[1]
        probed, _ = _advise(name, probe=True)
        after = _train(recipe, root, 0)[1]
        evidence = probed.probe or {}
        out["probe"] = {"lr": probed.recipe.optim.lr, "seconds": evidence.get("seconds", 0.0),
                        "run_seconds": (before + after) / 2, "evidence": evidence}  # fmt: skip
        out.pop("probed", None)
        stages = [*stages, "probed"]
        print(
            f"{name}: probe {out['probe']['lr']:.3g} in {out['probe']['seconds']:.1f} s", flush=True
        )
    if "probed" in stages:
        lr = out["probe"]["lr"]
        same = out.get("advised") and math.isclose(lr, out["advised"]["lr"], rel_tol=1e-9)
        out["probed"] = dict(out["advised"]) if same else {"lr": lr, **_seeds(recipe, root, lr)}
        print(f"{name}: probed -> {out['probed']['mean']}", flush=True)
    if "range" in stages:
        out["range"] = {"lr": _range_test(recipe)}
    return out


def _range_test(recipe) -> float:
    import gradwise as gw
    from gradwise.doctor.lr_finder import lr_range_test
    from gradwise.optim import build_optimizer

    a = gw.assemble(recipe=recipe.override(QUIET, root=tempfile.mkdtemp()))
    return lr_range_test(
        a.model,
        a.train_loader.dataset,
        a.task.unsmoothed(),
        optimizer=build_optimizer(a.model, a.recipe.optim),
        batch_size=recipe.data.batch_size,
        grad_clip=recipe.train.grad_clip,
        seed=recipe.seed,
    ).suggestion


# -- reading a search -------------------------------------------------------------------------

SMOOTH_DECADES = 0.3
"""Bandwidth of the Gaussian kernel that smooths a search's trials against log10(lr)."""


def smoothed_best(trials: list[dict], mode: str) -> float:
    """The rate at the optimum of the kernel-smoothed trials: on a flat stretch, where one seed's
    noise crowns an arbitrary trial, the middle of the good region instead of that trial."""
    points = [(math.log10(t["lr"]), t["value"]) for t in trials if t["value"] is not None]
    if not points:
        return math.nan
    worst = min(v for _, v in points) if mode == "max" else max(v for _, v in points)
    points += [(math.log10(t["lr"]), worst) for t in trials if t["value"] is None]
    lo, hi = min(x for x, _ in points), max(x for x, _ in points)
    grid = [lo + (hi - lo) * i / 200 for i in range(201)]

    def smooth(x: float) -> float:
        weights = [math.exp(-0.5 * ((x - px) / SMOOTH_DECADES) ** 2) for px, _ in points]
        return sum(w * v for w, (_, v) in zip(weights, points, strict=True)) / sum(weights)

    values = [smooth(x) for x in grid]
    pick = max if mode == "max" else min
    return 10 ** grid[values.index(pick(values))]


# -- the table --------------------------------------------------------------------------------


def gap(value: float | None, tuned: float | None, mode: str) -> float:
    """How much worse ``value`` is than ``tuned``, relative (0 when as good or better)."""
    if value is None or tuned is None:
        return math.inf
    worse = (tuned - value) if mode == "max" else (value - tuned)
    return max(worse / abs(tuned), 0.0)


def within(a: float | None, b: float | None, factor: float = 3.0) -> bool:
    return a is not None and b is not None and 1 / factor <= a / b <= factor


def table(results: dict) -> str:
    rows = [
        "| task | kind | fit | metric | advised lr | probed lr | range test | tuned lr | smoothed "
        "| probed/tuned | advised | probed | tuned | probed gap | probe cost |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: |",
    ]
    lr_hits = smooth_hits = score_hits = advised_hits = range_hits = held = 0
    costs = []
    for name, spec in TASKS.items():
        r = results.get(name)
        if not r or "tuned" not in r or "probed" not in r:
            continue
        held += not spec["fit"]
        tuned_lr, probed_lr = r["tuned"]["lr"], r["probe"]["lr"]
        run_s = r["probe"].get("run_seconds") or statistics.median(r["advised"]["seconds"])
        cost = r["probe"]["seconds"] / run_s
        costs.append(cost)
        smooth = smoothed_best(r["search"]["trials"], r["mode"])
        lr_hits += within(probed_lr, tuned_lr)
        smooth_hits += within(probed_lr, smooth)
        range_hits += within(r.get("range", {}).get("lr"), tuned_lr)
        g = gap(r["probed"]["mean"], r["tuned"]["mean"], r["mode"])
        score_hits += g <= 0.02
        advised_hits += gap(r["advised"]["mean"], r["tuned"]["mean"], r["mode"]) <= 0.02
        fmt = lambda v: "failed" if v is None else f"{v:.4g}"  # noqa: E731
        rows.append(
            f"| {name} | {spec['kind']} | {'yes' if spec['fit'] else ''} | {r['monitor']} "
            f"| {r['advised']['lr']:.2g} | {probed_lr:.2g} | {r.get('range', {}).get('lr', math.nan):.2g} "
            f"| {tuned_lr:.2g} | {smooth:.2g} | {probed_lr / tuned_lr:.2f} | {fmt(r['advised']['mean'])} "
            f"| {fmt(r['probed']['mean'])} | {fmt(r['tuned']['mean'])} | {g:.1%} | {cost:.1%} |"
        )
    n = len(rows) - 2
    rows.append("")
    rows.append(
        f"{n} tasks ({held} never used to fit): probed rate within 3x of the tuned best on "
        f"{lr_hits}/{n} (of the smoothed best: {smooth_hits}/{n}; the range test's: "
        f"{range_hits}/{n}); probed recipe within 2% of tuned on {score_hits}/{n} (advised without "
        f"the probe: {advised_hits}/{n}); probe cost median "
        f"{statistics.median(costs) if costs else math.nan:.1%}, max "
        f"{max(costs) if costs else math.nan:.1%} of one run"
    )
    return "\n".join(rows)


def load() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def save(results: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    tmp.replace(RESULTS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--redo", nargs="*", default=[], choices=STAGES,
                        help="stages to run again even when cached")  # fmt: skip
    parser.add_argument("--only", nargs="*", default=None, choices=STAGES)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--table", action="store_true", help="print the cached results only")
    args = parser.parse_args()
    results = load()
    if not args.table:
        todo = {}
        for name in args.tasks:
            cached = results.get(name, {})
            wanted = args.only if args.only is not None else STAGES
            stages = [s for s in wanted if s in args.redo or s not in cached]
            if stages:
                todo[name] = stages
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = {
                pool.submit(run_task, name, stages, results.get(name, {})): name
                for name, stages in todo.items()
            }
            for future in futures:
                result = future.result()
                results = load() | {futures[future]: result}  # another run may have saved meanwhile
                save(results)
    print(table(results))


if __name__ == "__main__":
    main()
