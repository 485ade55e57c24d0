"""What a study found: the trials table, the best recipe, parameter importances and plots.

Everything is read back from the study's storage, so ``gradwise tune --report STUDY`` rebuilds the
same files at any time, from any machine that reaches the storage::

    runs/tune/<study>/best.yaml          the base recipe with the best trial's settings
    runs/tune/<study>/trials.csv         number, state, values, epochs, steps, duration, params
    runs/tune/<study>/importances.json   fANOVA importance of each parameter (Hutter et al. 2014)
    runs/tune/<study>/plots/*.png        optimization history, parallel coordinates, importances
                                         (and the Pareto front for several objectives)
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradwise.recipe import Recipe
from gradwise.tracking import atomic_write_text
from gradwise.tune.space import SearchSpace

# trial user attributes written by the tuner (gradwise.tune.study)
RUN_DIR, RUN_STATE, STEPS, EPOCHS = "run_dir", "run_state", "steps", "epochs"
DURATION, ERROR, WORKER, SKIPPED = "duration_s", "error", "worker", "skipped"
RUN = "run"  # one attribute, one storage write, for RUN_DIR, RUN_STATE, STEPS, EPOCHS, DURATION


def trial_attrs(trial: Any) -> dict[str, Any]:
    """A trial's user attributes with the run record (``RUN``) spread into them."""
    attrs = dict(trial.user_attrs)
    attrs.update(attrs.pop(RUN, None) or {})
    return attrs


# study user attributes: the user's recipe, the trials' base recipe (advised when no space was
# given), the space, the objectives (set last: a study with them is complete), the MLflow run
SOURCE, RECIPE, SPACE = "gradwise.source", "gradwise.recipe", "gradwise.space"
OBJECTIVES, MLFLOW_PARENT = "gradwise.objectives", "gradwise.mlflow_parent"

STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running"}


@dataclass
class TrialRow:
    """One trial as the table shows it."""

    number: int
    state: str  # complete | pruned | failed | running | waiting
    params: dict[str, Any]
    values: list[float] | None
    epochs: int | None
    steps: int | None
    duration_s: float | None
    run_dir: str | None
    message: str | None = None


@dataclass
class TuneResult:
    """The outcome of :func:`gradwise.tune.tune` (or of reading a study back)."""

    study_name: str
    storage: str  # where the study lives (a database URL without its password)
    dir: Path  # the study folder: trial runs, best.yaml, trials.csv, plots
    objectives: list[str]
    directions: list[str]  # minimize | maximize, one per objective
    trials: list[TrialRow]
    best: (
        TrialRow | None
    )  # one objective: the best trial; several: the Pareto trial best on the first
    pareto: list[TrialRow]  # the Pareto front (several objectives), else [best]
    best_recipe: Recipe | None
    best_recipe_path: Path | None
    importances: dict[str, float] | None
    importance_note: str | None  # why there are no importances, when there are none
    plots: list[Path]
    space: SearchSpace
    study: Any = field(default=None, repr=False)  # the optuna.Study

    @property
    def best_value(self) -> float | list[float] | None:
        if self.best is None or self.best.values is None:
            return None
        return self.best.values[0] if len(self.best.values) == 1 else self.best.values

    @property
    def best_params(self) -> dict[str, Any]:
        return dict(self.best.params) if self.best is not None else {}

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.trials:
            out[row.state] = out.get(row.state, 0) + 1
        return out

    def table(self) -> tuple[list[str], list[list[str]]]:
        """Header and rows of the trials table, as text."""
        header = ["trial", "state", *self.objectives, "epochs", "steps", "time", "params"]
        rows = []
        for t in self.trials:
            values = t.values or [None] * len(self.objectives)
            rows.append(
                [
                    str(t.number),
                    t.state,
                    *(_num(v) for v in values),
                    _num(t.epochs),
                    _num(t.steps),
                    "" if t.duration_s is None else f"{t.duration_s:.1f}s",
                    " ".join(f"{_short(k)}={_num(v)}" for k, v in t.params.items())
                    + (f" ({t.message})" if t.message and t.state == "failed" else ""),
                ]
            )
        return header, rows


def summarize(study: Any, *, root: str | Path | None = None, plots: bool = True) -> TuneResult:
    """Read a study back, write best.yaml, trials.csv, importances.json and plots; the result."""
    from gradwise.tune.space import parse_space

    attrs = study.user_attrs
    base = Recipe.from_yaml(attrs[RECIPE], source=f"study {study.study_name} recipe")
    space = parse_space(attrs[SPACE], base, f"study {study.study_name} space", trusted=False)
    objectives = list(attrs[OBJECTIVES])
    directions = [d.name.lower() for d in study.directions]
    folder = Path(root if root is not None else base.tracking.root) / "tune" / study.study_name
    folder.mkdir(parents=True, exist_ok=True)

    trials = [_row(t, space) for t in study.get_trials(deepcopy=False)]
    trials = [row for row in trials if row is not None]
    by_number = {row.number: row for row in trials}
    complete = [row for row in trials if row.state == "complete"]
    if len(objectives) == 1:
        best = _best(complete, directions[0])
        pareto = [best] if best is not None else []
    else:
        pareto = [by_number[t.number] for t in study.best_trials if t.number in by_number]
        best = _best(pareto, directions[0])

    best_recipe = best_path = None
    if best is not None:
        best_recipe = base.override(space.values(best.params))
        best_path = folder / "best.yaml"
        values = ", ".join(f"{o} {_num(v)}" for o, v in zip(objectives, best.values, strict=True))
        header = f"# best trial {best.number} of study {study.study_name}: {values}\n"
        atomic_write_text(best_path, header + best_recipe.to_yaml())
    result = TuneResult(
        study_name=study.study_name,
        storage="",
        dir=folder,
        objectives=objectives,
        directions=directions,
        trials=trials,
        best=best,
        pareto=pareto,
        best_recipe=best_recipe,
        best_recipe_path=best_path,
        importances=None,
        importance_note=None,
        plots=[],
        space=space,
        study=study,
    )
    result.importances, result.importance_note = _importances(study, len(objectives))
    _write_tables(result)
    if plots:
        result.plots = _plots(study, result, folder / "plots")
    return result


def _row(trial: Any, space: SearchSpace) -> TrialRow | None:
    attrs = trial_attrs(trial)
    if attrs.get(SKIPPED):  # asked, then not run: the study already had its trials
        return None
    state = STATES.get(trial.state.name, trial.state.name.lower())
    epochs = attrs.get(EPOCHS)
    if state == "pruned" and trial.intermediate_values:
        epochs = epochs or max(trial.intermediate_values)
    duration = attrs.get(DURATION)
    if duration is None and trial.datetime_start and trial.datetime_complete:
        duration = (trial.datetime_complete - trial.datetime_start).total_seconds()
    values = trial.values
    if state == "pruned" and not values and trial.intermediate_values:
        values = [trial.intermediate_values[max(trial.intermediate_values)]]
    message = attrs.get(ERROR)
    if state == "pruned":
        message = f"pruned at epoch {max(trial.intermediate_values or {0: 0})}"
    return TrialRow(
        number=trial.number,
        state=state,
        params=space.values(trial.params),
        values=list(values) if values else None,
        epochs=epochs,
        steps=attrs.get(STEPS),
        duration_s=duration,
        run_dir=attrs.get(RUN_DIR),
        message=message,
    )


def _best(rows: list[TrialRow], direction: str) -> TrialRow | None:
    rows = [r for r in rows if r.values and math.isfinite(r.values[0])]
    if not rows:
        return None
    pick = max if direction == "maximize" else min
    return pick(rows, key=lambda r: r.values[0])


def _importances(study: Any, n_objectives: int) -> tuple[dict[str, float] | None, str | None]:
    """fANOVA importances of the parameters for the first objective, or why there are none."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return None, "importances need at least 2 complete trials"
    target = (lambda t: t.values[0]) if n_objectives > 1 else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = optuna.importance.get_param_importances(
                study, evaluator=FanovaImportanceEvaluator(seed=0), target=target
            )
    except (ValueError, RuntimeError) as exc:
        return None, f"no importances: {exc}"
    if not found:
        return None, "no parameter was sampled in every complete trial"
    return {k: float(v) for k, v in found.items()}, None


def _write_tables(result: TuneResult) -> None:
    names = sorted({k for row in result.trials for k in row.params})
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(
        ["number", "state", *result.objectives, "epochs", "steps", "duration_s", *names, "message"]
    )
    for row in result.trials:
        values = row.values or [None] * len(result.objectives)
        writer.writerow(
            [row.number, row.state, *values, row.epochs, row.steps, row.duration_s]
            + [row.params.get(n) for n in names]
            + [row.message]
        )
    atomic_write_text(result.dir / "trials.csv", text.getvalue())
    atomic_write_text(
        result.dir / "importances.json", json.dumps(result.importances or {}, indent=2) + "\n"
    )


# plot file name -> optuna.visualization function; the multi-objective ones plot the first objective
PLOTS = {
    "history": "plot_optimization_history",
    "parallel_coordinate": "plot_parallel_coordinate",
    "importances": "plot_param_importances",
}


def _plots(study: Any, result: TuneResult, folder: Path) -> list[Path]:
    """PNG plots (matplotlib), plus interactive HTML where plotly is installed."""
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as mpl_plots

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    names = dict(PLOTS)
    if len(result.objectives) > 1:
        names["pareto_front"] = "plot_pareto_front"
    if result.importances is None:
        names.pop("importances")
    html = importlib.util.find_spec("plotly") is not None
    written = []
    for name, function in names.items():
        kwargs = _target(result, function)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ax = getattr(mpl_plots, function)(study, **kwargs)
            except (ValueError, RuntimeError, ImportError):
                continue
            figure = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
            figure.set_size_inches(8, 5)
            figure.tight_layout()
            path = folder / f"{name}.png"
            figure.savefig(path, dpi=100)
            plt.close(figure)
            written.append(path)
            if html:
                try:
                    getattr(optuna.visualization, function)(study, **kwargs).write_html(
                        folder / f"{name}.html"
                    )
                    written.append(folder / f"{name}.html")
                except (ValueError, RuntimeError, ImportError):
                    pass
    return written


def _target(result: TuneResult, function: str) -> dict[str, Any]:
    """Keyword arguments of a plot: the first objective, by name, when there are several."""
    from optuna.importance import FanovaImportanceEvaluator

    if function == "plot_pareto_front":
        return {"target_names": result.objectives}
    kwargs: dict[str, Any] = {"target_name": result.objectives[0]}
    if len(result.objectives) > 1:
        kwargs["target"] = lambda t: t.values[0]
    if function == "plot_param_importances":
        kwargs["evaluator"] = FanovaImportanceEvaluator(seed=0)
    return kwargs


def _num(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _short(path: str) -> str:
    """optim.lr -> lr; model.kwargs.dropout -> dropout (the table is read by people)."""
    return path.rpartition(".")[2]
