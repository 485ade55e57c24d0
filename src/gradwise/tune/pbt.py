"""Population-based training (Jaderberg et al. 2017, "Population Based Training of Neural
Networks", arXiv:1711.09846).

A population of ordinary gradwise runs trains in generations. After each generation the members are
ranked by their current validation metric. Each member in the bottom ``fraction`` copies the whole
checkpoint (weights, optimizer, schedule and RNG state) of a random member of the top ``fraction``
(exploit) and continues with that member's hyperparameters, each multiplied by a random factor from
``perturb`` or, with ``resample_probability``, drawn again from its range (explore). Bad settings
are dropped early and good weights are trained further, so one budget of ``population`` runs yields
a tuned model and a hyperparameter *schedule* rather than a single setting::

    result = pbt("examples/digits_cnn.yaml", {"optim.lr": (1e-4, 1e-1)}, population=8, generations=10)
    result.best_checkpoint, result.best_metric, result.schedule

Everything lands in one folder::

    runs/pbt/<name>/pbt.json      the lineage: per generation and member the hyperparameters, the
                                  metric, the checkpoint, and the exploit (from, generation, copy)
    runs/pbt/<name>/member-<i>/   an ordinary run directory (recipe.yaml, metrics, checkpoints)

Generations and schedules: every member's recipe gets the whole budget (``generations x
epochs_per_generation`` epochs) from the start; a generation resumes the member from its latest
checkpoint and stops it at the generation's last epoch (``Trainer(on_evaluate=...)``). Extending
the epoch budget every generation instead would stretch a decaying schedule each time (a cosine
would climb back up). The default ``schedule="constant"`` (after the recipe's warmup) lets PBT's
perturbations of the learning rate be the schedule, as in the paper; ``schedule=None`` keeps the
recipe's, which then spans the whole budget and is scaled by each new learning rate. Early stopping
is off (PBT does the selecting) and ``train.max_steps`` is ignored.

Members train one after another (a synchronous PBT); all of PBT's own random choices come from
``random.Random(seed)``, so a seed gives the same lineage. After an exploit the member's run
directory keeps its own metrics.jsonl, while the copied checkpoint carries the source's history;
its best.json points at the copy. Ctrl-C stops the member at a checkpoint and PBT with it
(pbt.json says "interrupted").
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradwise import checkpoint as ckpt
from gradwise.errors import ConfigError, DataError
from gradwise.recipe import Recipe, load_recipe, override_paths
from gradwise.tasks import monitor_mode
from gradwise.tracking import atomic_write_json, atomic_write_text, new_run_dir

LINEAGE_FILE = "pbt.json"
SCALES = ("log", "linear")

Range = tuple[float, float] | tuple[float, float, str]


@dataclass
class PBTResult:
    """The outcome of :func:`pbt`."""

    dir: Path  # the PBT folder: pbt.json and the member-<i>/ run directories
    monitor: str  # the metric members are ranked by, e.g. "val_loss"
    mode: str  # "min" or "max"
    best_member: int  # the best member after the last generation
    best_metric: float
    best_hyperparams: dict[str, float]  # what the best member trained with in the last generation
    best_checkpoint: Path | None  # its checkpoint at the end of training
    schedule: list[dict[str, Any]]  # per generation: the member the best weights came from and its
    # hyperparameters, following exploits back to generation 1 (the hyperparameter schedule)
    history: list[dict[str, Any]]  # one row per generation and member: hyperparameters, metric,
    # rank, checkpoint, copied_from (the member it copied after this generation, or None)
    members: list[Path] = field(repr=False)  # the members' run directories
    lineage: dict[str, Any] = field(repr=False)  # the contents of pbt.json


@dataclass
class _Space:
    """One hyperparameter: a recipe path and the range it is sampled from and kept within."""

    path: str
    low: float
    high: float
    scale: str  # log (log-uniform) or linear

    def sample(self, rng: random.Random) -> float:
        if self.scale == "log":
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return rng.uniform(self.low, self.high)

    def clip(self, value: float) -> float:
        return min(max(value, self.low), self.high)


def pbt(
    recipe: Recipe | dict | str | Path,
    hyperparams: dict[str, Range],
    *,
    population: int = 4,
    generations: int = 5,
    epochs_per_generation: int = 1,
    exploit: str = "truncation",
    fraction: float = 0.25,
    perturb: tuple[float, ...] = (0.8, 1.2),
    resample_probability: float = 0.25,
    seed: int = 0,
    root: str | Path | None = None,
    objective: str | None = None,
    schedule: str | None = "constant",
    progress: bool = True,
) -> PBTResult:
    """Train a population of ``population`` runs of ``recipe`` with population-based training.

    hyperparams: recipe paths (``optim.lr``, ``optim.weight_decay``, ``train.label_smoothing``,
    ``model.kwargs.dropout``...; unique bare names like ``lr`` work too) to ``(low, high)`` or
    ``(low, high, "log" | "linear")``. Initial values are drawn from the range, log-uniformly when
    it spans a decade or more (rates), else uniformly; perturbed values are clipped to it.
    generations / epochs_per_generation: the budget; members are ranked after every generation and
    exploit/explore between generations (not after the last).
    exploit: "truncation": each of the bottom ``fraction`` copies a random one of the top
    ``fraction`` (at least one member each); fraction in (0, 0.5]. Members whose metric is not
    finite (diverged) are always replaced, even beyond the bottom ``fraction``.
    perturb: the factors explore multiplies each hyperparameter by (one drawn per hyperparameter);
    resample_probability: the chance that a hyperparameter is drawn from its range instead.
    seed: PBT's own random choices (initial values, partners, perturbations). Member i trains with
    the recipe's seed + i.
    root: where the PBT folder is made (default ``<tracking.root>/pbt``); its name is the recipe's
    name or model-data.
    objective: the metric to rank by (e.g. ``val_loss``); default the recipe's monitor.
    schedule: the learning-rate schedule members train with; "constant" (default, after warmup) or
    None for the recipe's own (see the module docstring).
    progress: print one line per member and generation on stderr.
    """
    base = load_recipe(recipe)
    spaces = _check(
        base,
        hyperparams,
        population,
        generations,
        epochs_per_generation,
        exploit,
        fraction,
        perturb,
        resample_probability,
    )
    if schedule is not None:
        base = base.override({"schedule.name": schedule})
    if objective is not None:
        base = base.override({"early_stopping.monitor": objective, "early_stopping.mode": "auto"})
    total_epochs = generations * epochs_per_generation
    base = base.override(
        {"train.epochs": total_epochs, "train.max_steps": None, "early_stopping.patience": None}
    )
    rng = random.Random(seed)
    hps = [{s.path: s.sample(rng) for s in spaces} for _ in range(population)]
    cut = max(1, int(fraction * population + 1e-9))

    parent = Path(root) if root is not None else Path(base.tracking.root) / "pbt"
    folder = new_run_dir(parent, base.name or _default_name(base))
    lineage: dict[str, Any] = {
        "method": "population-based training (Jaderberg et al. 2017, arXiv:1711.09846)",
        "state": "running",
        "settings": {
            "population": population,
            "generations": generations,
            "epochs_per_generation": epochs_per_generation,
            "exploit": exploit,
            "fraction": fraction,
            "truncated": cut,
            "perturb": list(perturb),
            "resample_probability": resample_probability,
            "seed": seed,
            "schedule": base.schedule.name,
        },
        "hyperparams": {s.path: {"low": s.low, "high": s.high, "scale": s.scale} for s in spaces},
        "monitor": None,
        "mode": None,
        "members": [f"member-{i}" for i in range(population)],
        "generations": [],
    }
    say = _printer(progress)
    dirs: list[Path | None] = [None] * population
    changed: set[int] = set()  # members whose hyperparameters changed since their last generation
    try:
        for generation in range(1, generations + 1):
            epoch = generation * epochs_per_generation
            metrics, checkpoints = [], []
            for i in range(population):
                run = _train(base, folder, i, dirs[i], hps[i], epoch, total_epochs, i in changed)
                if run.state == "interrupted":  # Ctrl-C or SIGTERM: the member has checkpointed
                    raise KeyboardInterrupt(f"population-based training stopped in {run.dir}")
                dirs[i] = run.dir
                lineage["monitor"] = run.monitor
                lineage["mode"] = monitor_mode(run.monitor, base.early_stopping.mode)
                metrics.append(_metric(run, epoch))
                saved = ckpt.list_checkpoints(run.dir)  # none if it diverged in its first epoch
                checkpoints.append(saved[-1] if saved else None)
                say(
                    f"pbt generation {generation}/{generations} member {i}: "
                    f"{run.monitor} {metrics[-1]:.4g}  {_fmt(hps[i])}"
                )
            changed.clear()
            ranked = _rank(metrics, lineage["mode"])
            entries = [
                {
                    "member": i,
                    "hyperparams": dict(hps[i]),
                    "metric": _finite(metrics[i]),
                    "rank": ranked.index(i) + 1,
                    "checkpoint": _rel(checkpoints[i], folder) if checkpoints[i] else None,
                    "exploit": None,
                }
                for i in range(population)
            ]
            if generation < generations:
                top, bottom = _truncate(ranked, metrics, cut)
                for i in bottom:
                    source = rng.choice(top)
                    copied = ckpt.copy_checkpoint(checkpoints[source], dirs[i])
                    ckpt.mark_best(dirs[i], copied, lineage["monitor"], _finite(metrics[source]))
                    hps[i], how = _explore(hps[source], spaces, perturb, resample_probability, rng)
                    _write_recipe(dirs[i], hps[i])
                    changed.add(i)
                    entries[i]["exploit"] = {
                        "from": source,
                        "generation": generation,
                        "checkpoint": _rel(checkpoints[source], folder),
                        "copy": _rel(copied, folder),
                        "hyperparams": dict(hps[i]),
                        "explore": how,
                    }
                    say(f"pbt member {i} <- member {source} ({_fmt(hps[i])})")
            lineage["generations"].append(
                {"generation": generation, "epoch": epoch, "members": entries}
            )
            atomic_write_json(folder / LINEAGE_FILE, lineage)
    except BaseException as exc:
        if not any(folder.iterdir()):  # failed before any member started: leave nothing behind
            folder.rmdir()
        else:
            lineage["state"] = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            atomic_write_json(folder / LINEAGE_FILE, lineage)
        raise
    return _finish(folder, lineage, dirs)


# -- checks ------------------------------------------------------------------------------------


def _check(
    base: Recipe,
    hyperparams: dict[str, Range],
    population: int,
    generations: int,
    epochs_per_generation: int,
    exploit: str,
    fraction: float,
    perturb: tuple[float, ...],
    resample_probability: float,
) -> list[_Space]:
    """Validate the arguments before anything trains; returns the hyperparameter spaces."""
    for name, value in (
        ("population", population),
        ("generations", generations),
        ("epochs_per_generation", epochs_per_generation),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(name, value, "a positive integer")
    if population < 2:
        raise ConfigError("population", population, "at least 2 members (PBT copies between them)")
    if exploit != "truncation":
        raise ConfigError("exploit", exploit, "'truncation' (the only exploit strategy so far)")
    if not isinstance(fraction, int | float) or not 0 < fraction <= 0.5:
        raise ConfigError(
            "fraction", fraction, "a number in (0, 0.5]", "the top and bottom must not overlap"
        )
    if not perturb or not all(isinstance(f, int | float) and f > 0 for f in perturb):
        raise ConfigError("perturb", perturb, "positive factors, e.g. (0.8, 1.2)")
    if not isinstance(resample_probability, int | float) or not 0 <= resample_probability <= 1:
        raise ConfigError("resample_probability", resample_probability, "a probability in [0, 1]")
    every = base.train.eval_every
    if epochs_per_generation % every:
        raise ConfigError(
            "train.eval_every",
            every,
            f"a divisor of epochs_per_generation ({epochs_per_generation})",
            "every generation must end with an evaluation",
        )
    if not isinstance(hyperparams, dict) or not hyperparams:
        raise ConfigError(
            "hyperparams", hyperparams, "recipe paths to ranges, e.g. {'optim.lr': (1e-4, 1e-1)}"
        )
    spaces, seen = [], set()
    for key, spec in hyperparams.items():
        space = _space(base, key, spec)
        if space.path in seen:
            raise ConfigError(f"hyperparams[{key!r}]", spec, "each setting once", space.path)
        seen.add(space.path)
        spaces.append(space)
    return spaces


def _space(base: Recipe, key: str, spec: Any) -> _Space:
    """One hyperparameter range, checked against the Recipe (unknown paths get a did-you-mean)."""
    field_name = f"hyperparams[{key!r}]"
    if not isinstance(key, str):
        raise ConfigError("hyperparams", key, "recipe paths as keys, e.g. 'optim.lr'")
    shape_ok = isinstance(spec, tuple | list) and len(spec) in (2, 3)
    if not shape_ok or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        for v in spec[:2]
    ):
        raise ConfigError(field_name, spec, "(low, high) or (low, high, 'log' | 'linear')")
    low, high = float(spec[0]), float(spec[1])
    if low >= high:
        raise ConfigError(field_name, spec, "low < high")
    (path,) = override_paths({key: low})  # an unknown path raises with a did-you-mean
    for bound in (low, high):  # the recipe's own checks, e.g. a learning rate must be > 0
        recipe = base.override({path: bound})
    if not isinstance(recipe.flat().get(path), float):
        raise ConfigError(
            field_name, spec, "a continuous setting (a float such as optim.lr)", f"{path} is not"
        )
    scale = spec[2] if len(spec) == 3 else ("log" if low > 0 and high >= 10 * low else "linear")
    if scale not in SCALES:
        raise ConfigError(field_name, spec, "a scale of 'log' or 'linear'")
    if scale == "log" and low <= 0:
        raise ConfigError(field_name, spec, "low > 0 for a log scale")
    return _Space(path, low, high, scale)


# -- one generation of one member --------------------------------------------------------------


def _train(
    base: Recipe,
    folder: Path,
    index: int,
    run_dir: Path | None,
    hyperparams: dict[str, float],
    epoch: int,
    total_epochs: int,
    changed: bool,
) -> Any:
    """Train member ``index`` up to ``epoch``: a new run, or a resume from its latest checkpoint.

    A member whose hyperparameters changed (after an exploit) passes them to ``Trainer.resume``
    explicitly, so they replace the copied checkpoint's values in the restored optimizer; the
    others resume exactly.
    """
    from gradwise.trainer import Trainer

    def stop(entry: dict[str, float]) -> bool:  # end the generation at its last epoch
        return epoch < total_epochs and entry["epoch"] >= epoch

    if run_dir is None:
        recipe = base.override(
            {
                **hyperparams,
                "name": f"member-{index}",
                "seed": base.seed + index,
                "tracking.root": str(folder),
            }
        )
        return Trainer(recipe=recipe, progress="off", on_evaluate=stop).fit()
    overrides = hyperparams if changed else {}
    # the member's run directory is this population's own, made from the user's recipe: trusted
    return Trainer.resume(run_dir, progress="off", on_evaluate=stop, trust=True, **overrides).fit()


def _metric(run: Any, epoch: int) -> float:
    """The member's metric at the end of the generation; NaN when it did not get there (diverged)."""
    last = run.history[-1] if run.history else None
    if run.state == "diverged" or last is None or last["epoch"] != epoch:
        return math.nan
    return float(last[run.monitor])


def _rank(metrics: list[float], mode: str) -> list[int]:
    """Member indices best first; non-finite metrics last, ties by index."""

    def key(i: int) -> tuple[int, float, int]:
        m = metrics[i]
        if not math.isfinite(m):
            return (1, 0.0, i)
        return (0, -m if mode == "max" else m, i)

    return sorted(range(len(metrics)), key=key)


def _truncate(ranked: list[int], metrics: list[float], cut: int) -> tuple[list[int], list[int]]:
    """Truncation selection: the top and the bottom ``cut`` members (the bottom in index order).

    Members that diverged (no finite metric) are always in the bottom, however many they are, so
    that none goes on from a broken state; the top holds finite members only.
    """
    broken = [i for i in ranked if not math.isfinite(metrics[i])]
    bottom = sorted(set(ranked[-cut:]) | set(broken))
    top = [i for i in ranked if i not in bottom][:cut]
    if not top:
        raise DataError(
            "population-based training: every member diverged (the loss or gradients are not "
            "finite); lower the learning-rate range"
        )
    return top, bottom


def _explore(
    hyperparams: dict[str, float],
    spaces: list[_Space],
    perturb: tuple[float, ...],
    resample_probability: float,
    rng: random.Random,
) -> tuple[dict[str, float], dict[str, str]]:
    """Perturb each hyperparameter by a random factor, or resample it; returns values and how."""
    values, how = {}, {}
    for space in spaces:
        if rng.random() < resample_probability:
            values[space.path] = space.sample(rng)
            how[space.path] = "resampled"
        else:
            factor = rng.choice(perturb)
            values[space.path] = space.clip(hyperparams[space.path] * factor)
            how[space.path] = f"x{factor:g}"
    return values, how


def _write_recipe(run_dir: Path, hyperparams: dict[str, float]) -> None:
    """Record the member's new hyperparameters in its recipe.yaml (what a resume trains with)."""
    path = run_dir / "recipe.yaml"
    atomic_write_text(path, load_recipe(path).override(hyperparams).to_yaml())


# -- the result --------------------------------------------------------------------------------


def _finish(folder: Path, lineage: dict[str, Any], dirs: list[Path | None]) -> PBTResult:
    last = lineage["generations"][-1]["members"]
    best = min(last, key=lambda e: e["rank"])
    schedule = _schedule(lineage["generations"], best["member"])
    lineage["state"] = "finished"
    lineage["best"] = {
        "member": best["member"],
        "metric": best["metric"],
        "hyperparams": best["hyperparams"],
        "checkpoint": best["checkpoint"],
        "schedule": schedule,
    }
    atomic_write_json(folder / LINEAGE_FILE, lineage)
    history = [
        {
            "generation": gen["generation"],
            "member": e["member"],
            **e["hyperparams"],
            lineage["monitor"]: e["metric"],
            "rank": e["rank"],
            "checkpoint": folder / e["checkpoint"] if e["checkpoint"] else None,
            "copied_from": e["exploit"]["from"] if e["exploit"] else None,
        }
        for gen in lineage["generations"]
        for e in gen["members"]
    ]
    return PBTResult(
        dir=folder,
        monitor=lineage["monitor"],
        mode=lineage["mode"],
        best_member=best["member"],
        best_metric=math.nan if best["metric"] is None else best["metric"],
        best_hyperparams=dict(best["hyperparams"]),
        best_checkpoint=folder / best["checkpoint"] if best["checkpoint"] else None,
        schedule=schedule,
        history=history,
        members=[d for d in dirs if d is not None],
        lineage=lineage,
    )


def _schedule(generations: list[dict[str, Any]], member: int) -> list[dict[str, Any]]:
    """The hyperparameters the weights of ``member`` were trained with, generation by generation.

    Walks back from the last generation: where the member had copied another member's checkpoint
    after the previous generation, the lineage continues with that member.
    """
    chain = []
    for index in range(len(generations) - 1, -1, -1):
        entry = generations[index]["members"][member]
        generation = generations[index]["generation"]
        chain.append({"generation": generation, "member": member, **entry["hyperparams"]})
        if index > 0:
            exploit = generations[index - 1]["members"][member]["exploit"]
            if exploit is not None:
                member = exploit["from"]
    return chain[::-1]


# -- helpers -----------------------------------------------------------------------------------


def _default_name(recipe: Recipe) -> str:
    def short(name: str) -> str:
        return name.rpartition(":")[2].rpartition(".")[2].lower()

    return f"{short(recipe.model.name)}-{short(recipe.data.name)}"


def _rel(path: Path, folder: Path) -> str:
    return Path(path).relative_to(folder).as_posix()


def _fmt(hyperparams: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.3g}" for k, v in hyperparams.items())


def _printer(enabled: bool) -> Any:
    if not enabled:
        return lambda text: None
    from gradwise.progress import Progress

    lines = Progress(0, mode="lines")
    return lines.line


def _finite(value: float) -> float | None:
    """JSON has no NaN: a metric that is not finite (a diverged member) is recorded as null."""
    return value if math.isfinite(value) else None
