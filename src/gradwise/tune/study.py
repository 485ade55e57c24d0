"""Hyperparameter search over recipes with Optuna: samplers, pruners, storage, workers and a cap.

    result = gradwise.tune.tune("recipe.yaml", "space.yaml", trials=30)
    result.best_recipe, result.best_value, result.importances, result.dir

Every trial is a normal gradwise run (``runs/tune/<study>/trial-0007/``, an MLflow child run of the
study's run) that reports its validation metric after each epoch, so pruners act on real learning
curves and a pruned trial stops there. The study lives in storage (a journal file by default, a
database for many machines), so it can be resumed, shared by worker processes, and reported on.

The cap: ``trials`` counts finished trials (complete or pruned) across every worker of the study.
A worker starts no trial once the finished and running trials reach the cap (a trial that finds
itself past the cap when it starts is dropped, unrun), and Optuna's MaxTrialsCallback stops it when
the finished ones do; failed trials do not count, so they are replaced (up to ``max_failures`` per
worker). Running the same command again continues an interrupted study up to the cap.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import inspect
import math
import multiprocessing
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gradwise.errors import ConfigError, GradwiseError, did_you_mean
from gradwise.recipe import Recipe, load_recipe
from gradwise.tune import storage as stores
from gradwise.tune.report import (
    DURATION,
    EPOCHS,
    ERROR,
    MLFLOW_PARENT,
    OBJECTIVES,
    RECIPE,
    RUN,
    RUN_DIR,
    RUN_STATE,
    SKIPPED,
    SOURCE,
    SPACE,
    STEPS,
    WORKER,
    TuneResult,
    summarize,
    trial_attrs,
)
from gradwise.tune.space import SearchSpace, load_space, parse_space, propose_space


@dataclass(frozen=True)
class Engine:
    """An Optuna sampler or pruner by class name, with gradwise's settings for it."""

    cls: str  # a class of optuna.samplers / optuna.pruners
    kwargs: dict[str, Any]
    about: str
    multi_objective: bool = True
    needs: str | None = None  # a package it needs beyond Optuna
    startup: bool = False  # takes n_startup_trials: random trials before its model takes over


SAMPLERS: dict[str, Engine] = {
    "tpe": Engine(
        "TPESampler",
        {"multivariate": True, "group": True, "constant_liar": True},
        "Tree-structured Parzen Estimator (Bergstra et al. 2011), joint over parameters; "
        "constant liar keeps parallel workers apart. The default.",
        startup=True,
    ),
    "random": Engine("RandomSampler", {}, "independent random draws (Bergstra & Bengio 2012)"),
    "grid": Engine(
        "GridSampler", {}, "every combination of categorical, int and stepped values, shuffled"
    ),
    "cmaes": Engine(
        "CmaEsSampler",
        {"warn_independent_sampling": False},
        "CMA-ES (Hansen 2016): continuous parameters, tens to hundreds of trials",
        multi_objective=False,
        needs="cmaes",
    ),
    "gp": Engine(
        "GPSampler",
        {"warn_independent_sampling": False},
        "Gaussian-process Bayesian optimisation: few, expensive trials",
        startup=True,
    ),
}
PRUNERS: dict[str, Engine] = {
    "asha": Engine(
        "SuccessiveHalvingPruner",
        {"min_resource": "auto", "reduction_factor": 3},
        "asynchronous successive halving (Li et al. 2020): at 1, 3, 9... epochs keep the top "
        "third. The default.",
    ),
    "hyperband": Engine(
        "HyperbandPruner",
        {"min_resource": 1, "reduction_factor": 3},
        "Hyperband (Li et al. 2018): successive halving in several brackets of aggressiveness",
    ),
    "median": Engine(
        "MedianPruner",
        {"n_startup_trials": 5, "n_warmup_steps": 2},
        "from epoch 2, stop a trial worse than the median of earlier trials at the same epoch",
    ),
    "none": Engine("NopPruner", {}, "never prune"),
}
ALIASES = {
    "cma-es": "cmaes",
    "cma": "cmaes",
    "bayesian": "gp",
    "successive_halving": "asha",
    "sha": "asha",
    "nop": "none",
    "off": "none",
}
# objectives measured on the trained model rather than read from the validation history
MEASURES = {
    "params": "trainable parameters",
    "latency": "milliseconds per validation batch (median of 10 forward passes)",
}
LATENCY_WARMUP, LATENCY_REPEATS = 3, 10  # forward passes before timing, and timed (median)
UNCLAIMED_GRACE_S = 60.0  # a running trial without its worker's name after this long is orphaned
ATTRS_WAIT_S = 10.0  # how long to wait for the attributes of a study another worker just created
# random trials before a model-based sampler (TPE, GP): a fraction of the budget, within bounds
STARTUP_FRACTION, STARTUP_MIN, STARTUP_MAX = 0.25, 2, 10


def startup_trials(trials: int) -> int:
    """Random trials before TPE or GP model the results: a quarter of the budget, 2 to 10.

    Optuna's fixed 10 would spend half of a 20-trial budget on random search.
    """
    return max(STARTUP_MIN, min(STARTUP_MAX, int(trials * STARTUP_FRACTION)))


@dataclass(frozen=True)
class Objective:
    name: str  # a history metric (val_accuracy, val_loss, train_loss...) or a MEASURE
    direction: str  # minimize | maximize


@dataclass
class _Job:
    """What a worker process needs (plain data, so that it can be sent to a spawned process)."""

    study: str
    location: str
    recipe: dict[str, Any]
    space: dict[str, Any]
    objectives: list[tuple[str, str]]
    trials: int
    sampler: str | None
    pruner: str | None
    seed: int
    study_dir: str
    max_failures: int
    timeout: float | None
    verbose: bool
    mlflow_parent: str | None
    mlflow_uri: str | None
    threads: int | None = None


def tune(
    recipe: Recipe | dict | str | Path,
    space: SearchSpace | dict | str | Path | None = None,
    trials: int = 20,
    objective: str | list[str] | None = None,
    sampler: str | Any = "tpe",
    pruner: str | Any = "asha",
    storage: str | Path | None = None,
    workers: int = 1,
    study_name: str | None = None,
    seed: int = 0,
    *,
    probe: bool = False,
    max_failures: int | None = None,
    timeout: float | None = None,
    plots: bool = True,
    verbose: bool = True,
) -> TuneResult:
    """Search ``space`` for the best settings of ``recipe``; ``trials`` finished trials in all.

    recipe: the base recipe (file, dict or Recipe); each trial overrides the searched settings.
    space: a SearchSpace, dict or YAML file (see gradwise.tune.space); None proposes one around
    the advised recipe (``probe``: centre the learning rate on the LR range test) and tunes that.
    objective: a validation metric (val_accuracy, val_loss...; default: the recipe's monitor),
    "params" or "latency", or a list of them for a multi-objective search (Pareto front; no
    pruning). sampler: tpe, random, grid, cmaes, gp or an Optuna sampler. pruner: asha,
    hyperband, median, none or an Optuna pruner. storage: a journal file or database URL (default
    <tracking.root>/tune/<study>.journal). workers: local processes optimising the same study.
    study_name: default <model>-<data> (or the recipe's name); the same name resumes the study.
    seed: the sampler's seed (worker i uses seed + i). max_failures: failed trials after which a
    worker stops (default: trials). timeout: seconds after which no new trial starts.
    """
    optuna = _optuna()
    say = _printer(verbose)
    _check_count("trials", trials)
    _check_count("workers", workers)
    source = load_recipe(recipe)
    name = study_name or default_study_name(source)
    _check_study_name(name)
    root = Path(source.tracking.root)
    location = str(storage) if storage is not None else str(stores.journal_path(root, name))
    if workers > 1 and stores.is_sqlite(location):
        raise ConfigError(
            "--storage",
            location,
            "a journal file or a database server for several workers",
            "SQLite fails with 'database is locked' under parallel writers",
        )
    sampler_name = _engine_name(sampler, SAMPLERS, "sampler", workers)
    pruner_name = _engine_name(pruner, PRUNERS, "pruner", workers)
    store = stores.open_storage(location)
    stored = _stored_attrs(optuna, store, name)

    # the base recipe of the trials and the space they search
    if stored:  # continuing: the study's own recipe (with this machine's tracking settings)
        _check_source(stored, source, name)
        base = Recipe.from_yaml(stored[RECIPE], source=f"study {name} recipe").override(
            {"tracking": source.tracking.model_dump()}
        )
        space_obj = load_space(space if space is not None else stored[SPACE], base)
    elif space is None:
        space_obj, base = propose_space(
            recipe if isinstance(recipe, (str, Path, dict)) else source, probe=probe
        )
        say(f"proposed search space (save it and pass --space to edit):\n{space_obj.to_yaml()}")
    else:
        base = source
        space_obj = load_space(space, base)

    monitor, mode, metrics = _preflight(base)
    objectives = _objectives(
        objective or stored.get(OBJECTIVES) or [monitor], monitor, mode, metrics
    )
    _check_engines(sampler_name, objectives, space_obj)

    with _quiet_optuna():
        study = optuna.create_study(
            storage=store,
            study_name=name,
            directions=[o.direction for o in objectives],
            load_if_exists=True,
        )
    attrs = {
        SOURCE: source.to_yaml(),
        RECIPE: base.to_yaml(),
        SPACE: space_obj.to_dict(),
        OBJECTIVES: [o.name for o in objectives],  # set last: the mark of a complete study
    }
    if not stored and OBJECTIVES in study.user_attrs:  # another worker created it meanwhile
        stored = study.user_attrs
    if stored:
        _check_study(stored, attrs, name)
    else:
        for key, value in attrs.items():
            study.set_user_attr(key, value)
    study_dir = root / "tune" / name
    study_dir.mkdir(parents=True, exist_ok=True)
    parent, mlflow_uri = _mlflow_parent(base, study, name, location, sampler_name, pruner_name)
    _fail_orphans(optuna, study)

    job = _Job(
        study=name,
        location=location,
        recipe=base.to_dict(),
        space=space_obj.to_dict(),
        objectives=[(o.name, o.direction) for o in objectives],
        trials=trials,
        sampler=sampler_name,
        pruner=pruner_name,
        seed=seed,
        study_dir=str(study_dir),
        max_failures=max_failures if max_failures is not None else trials,
        timeout=timeout,
        verbose=verbose,
        mlflow_parent=parent,
        mlflow_uri=mlflow_uri,
    )
    goal = ", ".join(f"{o.name} ({o.direction})" for o in objectives)
    say(
        f"study {name} in {stores.describe(location)}: {trials} trials, "
        f"sampler {sampler_name or type(sampler).__name__}, "
        f"pruner {pruner_name or type(pruner).__name__}"
        + (" (off: several objectives)" if len(objectives) > 1 else "")
        + f", {workers} worker{'s' if workers > 1 else ''}, objective {goal}"
    )

    def finish(state: str) -> TuneResult:
        result = summarize(study, root=root, plots=plots)
        result.storage = stores.describe(location)
        _mlflow_finish(parent, mlflow_uri, result, state)
        return result

    try:
        if workers == 1:
            run_worker(
                job,
                0,
                sampler=None if sampler_name else sampler,
                pruner=None if pruner_name else pruner,
            )
        else:
            _spawn(job, workers, say)
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        if interrupted:
            say(f"interrupted: run the same command again to continue study {name}")
        with contextlib.suppress(Exception):  # the report of what ran; the error comes first
            finish("KILLED" if interrupted else "FAILED")
        raise
    return finish("FINISHED")


def study_report(
    study_name: str,
    storage: str | Path | None = None,
    root: str | Path = "runs",
    plots: bool = True,
) -> TuneResult:
    """Read a study back from storage: trials table, best recipe, importances; redraw the plots."""
    optuna = _optuna()
    _check_study_name(study_name)
    location = str(storage) if storage is not None else str(stores.journal_path(root, study_name))
    if storage is None and not Path(location).is_file():
        raise ConfigError(
            "--report",
            study_name,
            f"a study in {location}",
            "pass --storage where the study lives, or --root for another runs directory",
        )
    store = stores.open_storage(location)
    names = optuna.study.get_all_study_names(storage=store)
    if study_name not in names:
        hint = did_you_mean(study_name, names) or (
            f"studies there: {', '.join(names)}" if names else None
        )
        raise ConfigError("--report", study_name, f"a study in {stores.describe(location)}", hint)
    with _quiet_optuna():
        study = optuna.load_study(study_name=study_name, storage=store)
    if RECIPE not in study.user_attrs:
        raise ConfigError("--report", study_name, "a study started by gradwise tune")
    result = summarize(study, root=root, plots=plots)
    result.storage = stores.describe(location)
    return result


def default_study_name(recipe: Recipe) -> str:
    """The recipe's name, or <model>-<data> (e.g. mlp-iris)."""

    def short(name: str) -> str:
        return name.rpartition(":")[2].rpartition(".")[2].lower()

    return recipe.name or f"{short(recipe.model.name)}-{short(recipe.data.name)}"


# == one worker ==================================================================================


def run_worker(job: _Job, index: int, sampler: Any = None, pruner: Any = None) -> None:
    """Optimise the study until it has its trials (or this worker its failures)."""
    import optuna

    base = Recipe.parse(job.recipe)
    space = parse_space(job.space, base)
    objectives = [Objective(n, d) for n, d in job.objectives]
    multi = len(objectives) > 1
    with _quiet_optuna():
        sampler = sampler or make_sampler(job.sampler, job.seed + index, space, job.trials)
        pruner = optuna.pruners.NopPruner() if multi else pruner or make_pruner(job.pruner)
        study = optuna.load_study(
            study_name=job.study,
            storage=stores.open_storage(job.location),
            sampler=sampler,
            pruner=pruner,
        )
        if _finished(study) >= job.trials:
            return
        objective = _Objective(job, base, space, objectives, _printer(job.verbose))
        study.optimize(
            objective,
            timeout=job.timeout,
            catch=(Exception,),
            gc_after_trial=False,  # a full collection costs ~0.4 s with torch loaded
            callbacks=[
                optuna.study.MaxTrialsCallback(job.trials, states=_states(*FINISHED)),
                objective.after_trial,
            ],
        )


def make_sampler(name: str, seed: int, space: SearchSpace, trials: int = 20) -> Any:
    """An Optuna sampler from the SAMPLERS table, for a budget of ``trials``."""
    import optuna

    engine = SAMPLERS[name]
    kwargs = dict(engine.kwargs)
    if engine.startup:
        kwargs["n_startup_trials"] = startup_trials(trials)
    if name == "grid":
        kwargs["search_space"] = space.grid()
    return _build(getattr(optuna.samplers, engine.cls), seed=seed, **kwargs)


def make_pruner(name: str) -> Any:
    """An Optuna pruner from the PRUNERS table."""
    import optuna

    engine = PRUNERS[name]
    return _build(getattr(optuna.pruners, engine.cls), **engine.kwargs)


def _build(cls: type, **kwargs: Any) -> Any:
    """``cls(**kwargs)`` without the options this Optuna version does not have (they are tweaks)."""
    accepted = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in kwargs.items() if k in accepted})


class _CapReached(Exception):
    """A trial started after the study had its trials: dropped without running."""


class _Objective:
    """One trial: sample settings, train a gradwise run, report each epoch, return the values."""

    def __init__(
        self,
        job: _Job,
        base: Recipe,
        space: SearchSpace,
        objectives: list[Objective],
        say: Callable[[str], None],
    ) -> None:
        self.job = job
        self.base = base
        self.space = space
        self.objectives = objectives
        self.say = say
        self.failures = 0  # failed trials of this worker

    def __call__(self, trial: Any) -> float | list[float]:
        import optuna

        from gradwise.trainer import Trainer

        trial.set_user_attr(WORKER, stores.worker_id())  # first: a killed worker is recognised
        earlier = trial.study.get_trials(deepcopy=False, states=_states(*CLAIMED))
        if sum(t.number < trial.number for t in earlier) >= self.job.trials:
            trial.set_user_attr(SKIPPED, True)
            trial.study.stop()
            raise _CapReached(f"study {self.job.study} has its {self.job.trials} trials")
        overrides = self.space.sample(trial)
        recipe = self.base.override(overrides).override(
            {"name": f"trial-{trial.number:04d}", "tracking.root": self.job.study_dir}
        )
        metric = self.objectives[0].name
        prune = len(self.objectives) == 1 and metric not in MEASURES
        pruned_at: list[int] = []

        def on_evaluate(entry: dict[str, float]) -> bool:
            value = entry.get(metric)
            if not prune or value is None or not math.isfinite(value):
                return False
            trial.report(value, step=int(entry["epoch"]))
            if trial.should_prune():
                pruned_at.append(int(entry["epoch"]))
                return True
            return False

        tags = {"gradwise.study": self.job.study, "gradwise.trial": str(trial.number)}
        if self.job.mlflow_parent:
            tags["mlflow.parentRunId"] = self.job.mlflow_parent
        trainer = Trainer(
            recipe=recipe,
            progress="off",
            on_evaluate=on_evaluate,
            tags=tags,
            mlflow_uri=self.job.mlflow_uri,
        )
        started = time.perf_counter()
        try:
            run = trainer.fit()
        except Exception as exc:
            trial.set_user_attr(ERROR, _message(exc))
            if getattr(trainer, "dir", None) is not None:
                trial.set_user_attr(RUN_DIR, str(trainer.dir))
            trial.set_user_attr(DURATION, time.perf_counter() - started)
            raise
        record = {
            RUN_DIR: str(run.dir),
            RUN_STATE: run.state,
            STEPS: run.steps,
            EPOCHS: len(run.history),
            DURATION: time.perf_counter() - started,
        }
        trial.set_user_attr(RUN, record)  # one write: each is an fsync on journal storage
        if run.state == "interrupted":
            trial.set_user_attr(ERROR, "interrupted")
            raise KeyboardInterrupt
        if pruned_at:
            raise optuna.TrialPruned(f"pruned at epoch {pruned_at[0]}")
        values = [self._measure(o, run, trainer) for o in self.objectives]
        return values[0] if len(values) == 1 else values

    def _measure(self, objective: Objective, run: Any, trainer: Any) -> float:
        if objective.name == "params":
            return float(sum(p.numel() for p in run.model.parameters() if p.requires_grad))
        if objective.name == "latency":
            return latency_ms(trainer)
        seen = [e[objective.name] for e in run.history if objective.name in e]
        finite = [v for v in seen if math.isfinite(v)]
        if not finite:
            raise GradwiseError(f"the run ({run.state}) recorded no finite {objective.name}")
        return max(finite) if objective.direction == "maximize" else min(finite)

    def after_trial(self, study: Any, trial: Any) -> None:
        """A line per trial; stop this worker after ``max_failures`` failed trials."""
        attrs = trial_attrs(trial)
        if attrs.get(SKIPPED):
            return
        params = " ".join(f"{k}={_num(v)}" for k, v in self.space.values(trial.params).items())
        took = f"{attrs.get(EPOCHS, '?')} epochs, {attrs.get(DURATION, 0):.1f}s"
        state = trial.state.name
        if state == "COMPLETE":
            values = ", ".join(
                f"{o.name} {_num(v)}" for o, v in zip(self.objectives, trial.values, strict=True)
            )
            self.say(f"trial {trial.number} complete: {values} ({took}) {params}")
        elif state == "PRUNED":
            epoch = max(trial.intermediate_values or {0: 0})
            self.say(f"trial {trial.number} pruned at epoch {epoch} ({took}) {params}")
        elif state == "FAIL":
            self.failures += 1
            self.say(f"trial {trial.number} failed: {attrs.get(ERROR, 'unknown error')} {params}")
            if self.failures >= self.job.max_failures:
                self.say(f"stopping this worker: {self.failures} trials failed")
                study.stop()


def latency_ms(trainer: Any) -> float:
    """Milliseconds for one forward pass of a validation batch (median of LATENCY_REPEATS)."""
    import torch

    loader = trainer.val_loader if trainer.val_loader is not None else trainer.train_loader
    x = next(iter(loader))[0].to(trainer.device)
    model = trainer.model
    model.eval()
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode(), trainer.autocast():
        for _ in range(LATENCY_WARMUP):  # lazy initialisation, kernel selection, caches
            model(x)
        for _ in range(LATENCY_REPEATS):
            sync()
            start = time.perf_counter()
            model(x)
            sync()
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


# == several local workers ======================================================================


def _spawn(job: _Job, workers: int, say: Callable[[str], None]) -> None:
    """Run ``workers`` processes (spawned, not forked: torch and threads) on the same study."""
    context = multiprocessing.get_context("spawn")
    job.threads = max(1, (os.cpu_count() or 1) // workers)
    processes = [
        context.Process(target=_worker_process, args=(asdict(job), i), name=f"gradwise-tune-{i}")
        for i in range(workers)
    ]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join()
    except KeyboardInterrupt:  # the workers got the Ctrl-C too: they stop at their next step
        for process in processes:
            process.join()
        raise
    codes = [p.exitcode for p in processes]
    if all(code == 130 for code in codes):
        raise KeyboardInterrupt
    for i, code in enumerate(codes):
        if code:
            say(f"worker {i} exited with code {code}")


def _worker_process(job: dict[str, Any], index: int) -> None:
    """Entry point of a spawned worker: user errors are one line and exit code 2."""
    import sys

    threads = job.get("threads")
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        run_worker(_Job(**job), index)
    except KeyboardInterrupt:
        sys.exit(130)
    except GradwiseError as exc:
        print(f"worker {index}: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


# == checks before any trial ====================================================================


def _states(*names: str) -> tuple[Any, ...]:
    """Optuna trial states by name (looked up late: importing this module needs no Optuna)."""
    from optuna.trial import TrialState

    return tuple(TrialState[n] for n in names)


FINISHED = ("COMPLETE", "PRUNED")  # the states the cap counts
CLAIMED = (*FINISHED, "RUNNING")  # the states that hold a place under the cap


def _finished(study: Any) -> int:
    return len(study.get_trials(deepcopy=False, states=_states(*FINISHED)))


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise GradwiseError(
            "tuning needs Optuna: pip install 'gradwise[tune]' (optuna, psycopg2-binary)"
        ) from None
    return optuna


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(name, value, "a positive integer")


def _check_study_name(name: str) -> None:
    if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise ConfigError("study name", name, "a name without '/', '\\' or a leading '.'")


def _engine_name(value: Any, table: dict[str, Engine], kind: str, workers: int) -> str | None:
    """A table name for ``value``, or None for an Optuna object passed as is."""
    if not isinstance(value, str):
        if workers > 1:
            raise ConfigError(
                kind,
                type(value).__name__,
                f"a {kind} name with several workers ({', '.join(table)})",
                "each worker builds and seeds its own",
            )
        return None
    name = ALIASES.get(value.lower(), value.lower())
    if name not in table:
        hint = did_you_mean(value.lower(), [*table, *ALIASES]) or f"{kind}s: {', '.join(table)}"
        raise ConfigError(kind, value, f"one of {', '.join(table)}", hint)
    return name


def _check_engines(sampler: str | None, objectives: list[Objective], space: SearchSpace) -> None:
    if sampler is None:
        return
    engine = SAMPLERS[sampler]
    if len(objectives) > 1 and not engine.multi_objective:
        raise ConfigError(
            "sampler",
            sampler,
            "a sampler for several objectives (tpe, random, grid, gp)",
            f"{sampler} optimises one objective",
        )
    if engine.needs and importlib.util.find_spec(engine.needs) is None:
        raise GradwiseError(
            f"the {sampler} sampler needs the '{engine.needs}' package: pip install {engine.needs}"
        )
    if sampler == "grid":
        space.grid()  # a ConfigError for a continuous range without a step


def _stored_attrs(optuna: Any, store: Any, name: str) -> dict[str, Any]:
    """The gradwise attributes of an existing study (empty when there is none yet).

    A study another worker has just created may not have them yet: wait a little for them.
    """
    if name not in optuna.study.get_all_study_names(storage=store):
        return {}
    deadline = time.monotonic() + ATTRS_WAIT_S
    while True:
        with _quiet_optuna():
            attrs = optuna.load_study(study_name=name, storage=store).user_attrs
        if OBJECTIVES in attrs:
            return attrs
        if time.monotonic() > deadline:
            raise ConfigError(
                "study name",
                name,
                "a new name or a study started by gradwise tune",
                "this one is not",
            )
        time.sleep(0.2)


# the settings whose values are imported (import paths): a study's stored recipe may not change them
IMPORTED = ("model.name", "data.name", "train.loss")


def _check_source(stored: dict[str, Any], source: Recipe, name: str) -> None:
    """Continuing a study needs the recipe it was started with (paths and run names aside).

    Its trials train the study's stored base recipe, which the storage (a shared database, say)
    could have changed: the names that are imported (model, data, loss) must be the user's own.
    """
    before = Recipe.from_yaml(stored[SOURCE]).flat()
    now = source.flat()
    base = Recipe.from_yaml(stored[RECIPE]).flat()
    ignored = ("name", "tracking.")
    for key in sorted(set(before) | set(now)):
        if key.startswith(ignored) or before.get(key) == now.get(key):
            continue
        raise ConfigError(
            key,
            now.get(key),
            f"{before.get(key)!r}, as in the recipe study {name!r} was started with",
            "use that recipe to continue the study, or another study name",
        )
    for key in IMPORTED:
        if base.get(key) != now.get(key):
            raise ConfigError(
                f"study {name!r}: {key}",
                base.get(key),
                f"{now.get(key)!r}, as your recipe names",
                "the study's stored recipe names other code than yours; use another study name",
            )


def _check_study(stored: dict[str, Any], attrs: dict[str, Any], name: str) -> None:
    """The space and objectives must be those the study was started with."""
    if attrs[SPACE] != stored[SPACE]:
        raise ConfigError(
            "space",
            attrs[SPACE],
            f"the space study {name!r} was started with",
            "leave --space out or give the same space to continue it, or use another study name",
        )
    if attrs[OBJECTIVES] != list(stored[OBJECTIVES]):
        raise ConfigError(
            "objective",
            attrs[OBJECTIVES],
            f"the objectives of study {name!r}: {stored[OBJECTIVES]}",
            "use another study name for other objectives",
        )


def _preflight(base: Recipe) -> tuple[str, str, list[str]]:
    """Data, model and task of the base recipe, checked once: the monitor, its mode, the metrics."""
    from gradwise.assemble import assemble

    a = assemble(recipe=base)  # everything that fails on bad input fails here, before any trial
    return a.monitor, a.mode, ["train_loss", *a.task.metric_names()]


def _objectives(
    names: str | list[str], monitor: str, mode: str, metrics: list[str]
) -> list[Objective]:
    from gradwise.tasks import monitor_mode

    names = [names] if isinstance(names, str) else list(names)
    known = [*metrics, *MEASURES]
    out = []
    for raw in names:
        name = str(raw)
        if name not in MEASURES and not name.startswith(("val_", "train_")):
            name = f"val_{name}"
        if name not in known:
            hint = did_you_mean(name, known) or f"known: {', '.join(known)}"
            raise ConfigError("objective", raw, "a metric of this task or params/latency", hint)
        if name in MEASURES:
            direction = "min"
        elif name == monitor:
            direction = mode
        else:
            direction = monitor_mode(name, "auto")
        out.append(Objective(name, "maximize" if direction == "max" else "minimize"))
    if len({o.name for o in out}) != len(out):
        raise ConfigError("objective", names, "distinct objectives")
    return out


def _fail_orphans(optuna: Any, study: Any) -> None:
    """Fail trials left running by a worker of this machine that no longer exists (a kill -9),
    and trials whose worker died between creating them and recording itself on them."""
    now = datetime.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER)
        if worker and stores.is_gone(worker):
            message = f"its worker ({worker}) is gone"
        elif worker is None and trial.datetime_start is not None:
            age = (now - trial.datetime_start).total_seconds()
            if age < UNCLAIMED_GRACE_S:
                continue
            message = f"its worker is gone: {age:.0f} s running and never recorded itself"
        else:
            continue
        study._storage.set_trial_user_attr(trial._trial_id, ERROR, message)
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)


# == MLflow: a parent run for the study ===========================================================


def _mlflow_parent(
    base: Recipe, study: Any, name: str, location: str, sampler: str | None, pruner: str | None
) -> tuple[str | None, str | None]:
    """The study's MLflow run (created once, found again on resume) and the tracking URI."""
    flag = base.tracking.mlflow
    if flag is False or importlib.util.find_spec("mlflow") is None:
        if flag:
            raise GradwiseError("MLflow logging was requested, but mlflow is not installed")
        return None, None
    root = Path(base.tracking.root).resolve()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').as_posix()}"
    try:
        from mlflow.tracking import MlflowClient

        from gradwise.tracking.tracker import quiet_loggers

        with quiet_loggers("mlflow.store.db.utils", "alembic"):
            client = MlflowClient(tracking_uri=uri)
            experiment = client.get_experiment_by_name("gradwise")
            experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else client.create_experiment(
                    "gradwise", artifact_location=(root / "mlartifacts").as_uri()
                )
            )
        known = study.user_attrs.get(MLFLOW_PARENT)
        if known:
            with contextlib.suppress(Exception):
                client.update_run(known, status="RUNNING")
                return known, uri
        run = client.create_run(
            experiment_id,
            run_name=f"tune-{name}",
            tags={"gradwise.study": name, "gradwise.storage": stores.describe(location)},
        )
        client.log_param(run.info.run_id, "sampler", sampler or "custom")
        client.log_param(run.info.run_id, "pruner", pruner or "custom")
        if not known:
            study.set_user_attr(MLFLOW_PARENT, run.info.run_id)
        return run.info.run_id, uri
    except Exception as exc:  # tracking must never stop tuning
        warnings.warn(f"MLflow parent run not created: {exc}", stacklevel=2)
        return None, uri


def _mlflow_finish(parent: str | None, uri: str | None, result: TuneResult, state: str) -> None:
    """Log the best values and the report's files to the study's run, and end it."""
    if parent is None:
        return
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        if result.best is not None and result.best.values:
            for name, value in zip(result.objectives, result.best.values, strict=True):
                client.log_metric(parent, f"best_{name}", value)
            client.set_tag(parent, "best_trial", str(result.best.number))
        for path in [result.dir / "best.yaml", result.dir / "trials.csv", *result.plots]:
            if path.is_file():
                client.log_artifact(parent, str(path))
        client.set_terminated(parent, state)
    except Exception as exc:
        warnings.warn(f"MLflow parent run not updated: {exc}", stacklevel=2)


# == small helpers ================================================================================


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna's own log lines and experimental-feature warnings off; gradwise prints per trial."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(level)


def _printer(verbose: bool) -> Callable[[str], None]:
    if not verbose:
        return lambda text: None
    return lambda text: print(text, flush=True)


def _message(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
