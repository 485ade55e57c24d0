"""Real studies on real (journal) storage with real, tiny training: iris, an MLP, 1-3 epochs."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest

from gradwise.errors import ConfigError, GradwiseError
from gradwise.tune import study_report, tune
from gradwise.tune.report import WORKER
from gradwise.tune.storage import journal_path, open_storage
from gradwise.tune.study import PRUNERS, SAMPLERS, make_pruner, make_sampler

RECIPE = {
    "model": {"name": "mlp", "kwargs": {"hidden": [16]}},
    "data": {"name": "iris"},
    "train": {"epochs": 3},
    "doctor": {"mode": "off"},
    "tracking": {"mlflow": False, "tensorboard": False, "progress": False},
}
SPACE = {  # two continuous parameters, so CMA-ES and GP really model them
    "optim.lr": {"type": "log_uniform", "low": 1.0e-4, "high": 0.3},
    "optim.weight_decay": {"type": "log_uniform", "low": 1.0e-4, "high": 0.3},
}
QUIET = {"plots": False, "verbose": False}


def _recipe(epochs: int = 3, **sections) -> dict:
    return {**RECIPE, "train": {"epochs": epochs}, **sections}


def _storage_trials(name: str) -> list[optuna.trial.FrozenTrial]:
    store = open_storage(str(journal_path("runs", name)))
    return optuna.load_study(study_name=name, storage=store).get_trials()


def _finished(result) -> list:
    return [t for t in result.trials if t.state in ("complete", "pruned")]


@pytest.mark.parametrize("sampler", ["tpe", "random", "cmaes", "gp"])
def test_each_sampler_runs_a_real_study(sampler):
    result = tune(
        RECIPE, SPACE, trials=4, sampler=sampler, pruner="none", study_name=sampler, **QUIET
    )
    assert [t.state for t in result.trials] == ["complete"] * 4
    assert (
        0 <= result.best_value <= 1
        and result.best_recipe.optim.lr == result.best_params["optim.lr"]
    )
    assert result.best_recipe_path.read_text().startswith(f"# best trial {result.best.number}")
    engine = SAMPLERS[sampler]
    assert type(make_sampler(sampler, 0, result.space, 4)).__name__ == engine.cls


def test_grid_sampler_visits_every_point_once():
    space = {"optim.lr": [0.01, 0.1], "data.batch_size": [16, 32]}
    result = tune(_recipe(1), space, trials=10, sampler="grid", pruner="none", **QUIET)
    points = {(t.params["optim.lr"], t.params["data.batch_size"]) for t in result.trials}
    assert len(result.trials) == 4 and len(points) == 4  # the grid ends the study early


@pytest.mark.parametrize("pruner", ["hyperband", "median", "none"])
def test_each_pruner_runs_a_real_study(pruner):
    result = tune(RECIPE, SPACE, trials=6, pruner=pruner, study_name=pruner, **QUIET)
    assert len(_finished(result)) == 6
    assert type(make_pruner(pruner)).__name__ == PRUNERS[pruner].cls
    if pruner == "none":
        assert all(t.state == "complete" and t.epochs == 3 for t in result.trials)


def test_pruned_trials_stop_early_and_keep_their_steps():
    result = tune(RECIPE, SPACE, trials=6, pruner="asha", **QUIET)
    pruned = [t for t in result.trials if t.state == "pruned"]
    complete = [t for t in result.trials if t.state == "complete"]
    assert pruned and complete and len(pruned) + len(complete) == 6
    stored = {t.number: t for t in _storage_trials(result.study_name)}
    for t in complete:
        assert t.epochs == 3 and sorted(stored[t.number].intermediate_values) == [1, 2, 3]
    for t in pruned:
        assert t.epochs < 3 and sorted(stored[t.number].intermediate_values) == list(
            range(1, t.epochs + 1)
        )
        run_dir = Path(t.run_dir)
        assert stored[t.number].user_attrs["run"]["run_state"] == "stopped"
        assert json.loads((run_dir / "status.json").read_text())["message"] == "stopped"
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert len([m for m in lines if m["split"] == "val"]) == t.epochs  # it really stopped


def test_resume_continues_to_the_cap_with_mlflow_child_runs():
    from mlflow.tracking import MlflowClient

    recipe = {**RECIPE, "tracking": {"mlflow": True, "tensorboard": False}}
    first = tune(recipe, SPACE, trials=2, pruner="none", **QUIET)
    assert len(first.trials) == 2
    again = tune(recipe, SPACE, trials=4, pruner="none", **QUIET)
    assert [t.number for t in again.trials] == list(range(4))
    assert all(t.state == "complete" for t in again.trials)
    assert len(tune(recipe, SPACE, trials=4, pruner="none", **QUIET).trials) == 4  # at the cap

    client = MlflowClient(tracking_uri=f"sqlite:///{Path('runs/mlflow.db').resolve()}")
    runs = client.search_runs([client.get_experiment_by_name("gradwise").experiment_id])
    parents = [r for r in runs if r.info.run_name == "tune-mlp-iris"]
    children = [r for r in runs if r.data.tags.get("gradwise.study") == "mlp-iris"]
    assert len(parents) == 1  # the resumed study found its run again
    trials = [r for r in children if r.info.run_id != parents[0].info.run_id]
    assert len(trials) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parents[0].info.run_id}
    assert "best_val_accuracy" in parents[0].data.metrics


def test_a_trial_left_running_by_a_dead_worker_is_failed_and_replaced():
    tune(_recipe(1), SPACE, trials=2, pruner="none", **QUIET)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store = open_storage(str(journal_path("runs", "mlp-iris")))
    study = optuna.load_study(study_name="mlp-iris", storage=store)
    orphan = study.ask()  # as if a worker was killed (kill -9) in the middle of this trial
    orphan.set_user_attr(WORKER, f"{socket.gethostname()}:{dead.pid}")
    result = tune(_recipe(1), SPACE, trials=3, pruner="none", **QUIET)
    states = {t.number: t.state for t in result.trials}
    assert states[orphan.number] == "failed" and len(_finished(result)) == 3
    assert "is gone" in next(t for t in result.trials if t.number == orphan.number).message


def test_a_trial_whose_worker_died_before_recording_itself_is_failed(monkeypatch):
    import gradwise.tune.study as study_module

    tune(_recipe(1), SPACE, trials=1, pruner="none", **QUIET)
    store = open_storage(str(journal_path("runs", "mlp-iris")))
    unnamed = optuna.load_study(study_name="mlp-iris", storage=store).ask()  # no worker attribute
    result = tune(_recipe(1), SPACE, trials=2, pruner="none", **QUIET)
    assert {t.number: t.state for t in result.trials}[unnamed.number] == "running"  # too young
    monkeypatch.setattr(study_module, "UNCLAIMED_GRACE_S", 0.0)
    result = tune(_recipe(1), SPACE, trials=3, pruner="none", **QUIET)
    orphan = next(t for t in result.trials if t.number == unnamed.number)
    assert orphan.state == "failed" and "never recorded itself" in orphan.message
    assert len(_finished(result)) == 3


def test_two_worker_processes_share_one_journal_study_and_its_cap():
    result = tune(_recipe(1), SPACE, trials=5, workers=2, pruner="none", **QUIET)
    numbers = [t.number for t in result.trials]
    assert len(_finished(result)) == 5 and len(numbers) == len(set(numbers))
    trials = _storage_trials(result.study_name)
    workers = {t.user_attrs.get(WORKER) for t in trials if t.state.name == "COMPLETE"}
    assert len(workers) == 2  # both processes ran trials
    extra = [t for t in trials if t.state.name != "COMPLETE"]
    assert all(t.user_attrs.get("skipped") for t in extra)  # nothing beyond the cap was run


FLAKY = textwrap.dedent(
    """
    import torch

    class Flaky(torch.nn.Module):
        def __init__(self, in_features, num_outputs, crash=False):
            super().__init__()
            self.crash = crash
            self.layer = torch.nn.Linear(in_features, num_outputs)

        def forward(self, x):
            if self.crash and self.training:
                raise RuntimeError("boom in training")
            return self.layer(x)

    def flaky(in_features, num_outputs, crash=False):
        return Flaky(in_features, num_outputs, crash)
    """
)


def test_a_crashed_trial_is_failed_with_its_message_and_the_study_goes_on(tmp_path, monkeypatch):
    (tmp_path / "flaky_models.py").write_text(FLAKY)
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = _recipe(1, model={"name": "flaky_models:flaky"})
    space = {"model.kwargs.crash": [False, True], "optim.lr": [0.01, 0.1]}
    result = tune(recipe, space, trials=4, sampler="grid", pruner="none", **QUIET)
    failed = [t for t in result.trials if t.state == "failed"]
    complete = [t for t in result.trials if t.state == "complete"]
    assert failed and all(t.params["model.kwargs.crash"] for t in failed)
    assert all(t.message == "RuntimeError: boom in training" for t in failed)
    assert len(complete) == 2 and not any(t.params["model.kwargs.crash"] for t in complete)


def test_multi_objective_returns_a_pareto_front():
    space = {"model.kwargs.hidden": [[4], [64]], "optim.lr": [0.01, 0.1]}
    result = tune(
        RECIPE,
        space,
        trials=4,
        objective=["val_accuracy", "params", "latency"],
        sampler="grid",
        verbose=False,
    )
    assert result.directions == ["maximize", "minimize", "minimize"]
    done = [t for t in result.trials if t.state == "complete"]
    assert len(done) == 4 and all(t.epochs == 3 for t in done)  # no pruning
    params = {tuple(t.params["model.kwargs.hidden"]): t.values[1] for t in done}
    assert params[(4,)] < params[(64,)]
    assert all(t.values[2] > 0 for t in done)
    front = {t.number for t in result.pareto}
    assert front and result.best.number in front
    for t in result.pareto:  # nothing dominates a Pareto trial
        assert not any(_dominates(o.values, t.values) for o in done)
    assert {p.name for p in result.plots} >= {"pareto_front.png", "history.png"}


def _dominates(a: list[float], b: list[float]) -> bool:
    signs = [-1, 1, 1]  # maximize accuracy, minimize params and latency
    return all(s * x <= s * y for s, x, y in zip(signs, a, b, strict=True)) and a != b


def test_bad_study_settings_fail_before_any_trial():
    cases = [
        ({"objective": "accuracyy"}, "did you mean 'val_accuracy'"),
        ({"objective": ["val_accuracy", "params"], "sampler": "cmaes"}, "several objectives"),
        ({"sampler": "grid"}, "discrete values"),
        ({"pruner": "hyperbnd"}, "did you mean 'hyperband'"),
        ({"workers": 2, "storage": "sqlite:///runs/s.db"}, "database is locked"),
        ({"storage": "runs/study.txt"}, "a journal file ending in .journal"),
        ({"trials": 0}, "a positive integer"),
        ({"storage": "postgresql://gradwise@127.0.0.1:1/db"}, "cannot open the study storage"),
    ]
    for kwargs, expected in cases:
        with pytest.raises((ConfigError, GradwiseError), match=expected):
            tune(RECIPE, SPACE, **{"trials": 2, **kwargs}, **QUIET)
    assert not Path("runs/tune/mlp-iris").exists()  # no trial ran


def test_a_study_continues_only_with_its_space_and_recipe():
    tune(_recipe(1), SPACE, trials=1, pruner="none", **QUIET)
    with pytest.raises(ConfigError, match="the space study 'mlp-iris' was started with"):
        tune(_recipe(1), {"optim.lr": [0.1]}, trials=2, **QUIET)
    with pytest.raises(ConfigError, match=r"train\.epochs: got 2; expected 1"):
        tune(_recipe(2), SPACE, trials=2, **QUIET)


def test_a_database_url_is_an_rdb_storage_that_the_report_reads_back():
    url = "sqlite:///runs/db/studies.db"  # the RDBStorage path that postgresql:// URLs take
    result = tune(_recipe(1), SPACE, trials=2, pruner="none", storage=url, **QUIET)
    assert result.storage == url and len(_finished(result)) == 2
    assert type(open_storage(url)).__name__ == "RDBStorage"
    again = study_report("mlp-iris", storage=url, plots=False)
    assert [t.number for t in again.trials] == [0, 1] and again.best.number == result.best.number


def test_a_tampered_study_recipe_imports_nothing(tmp_path):
    # the storage (a shared database, a journal someone sent) holds the base recipe its trials
    # train and its report reads: an import path planted there must not run
    marker = tmp_path / "pwned"
    (tmp_path / "planted_gw.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n\ndef build(**kwargs):\n    raise SystemExit\n"
    )
    space = {"model.kwargs.dropout": [0.0, 0.1], "optim.lr": [0.01]}
    tune(_recipe(1), space, trials=1, pruner="none", **QUIET)
    store = open_storage(str(journal_path("runs", "mlp-iris")))
    study = optuna.load_study(study_name="mlp-iris", storage=store)
    recipe = study.user_attrs["gradwise.recipe"].replace("name: mlp", "name: planted_gw:build")
    assert recipe != study.user_attrs["gradwise.recipe"]
    study.set_user_attr("gradwise.recipe", recipe)
    report = study_report("mlp-iris", plots=False)  # the space's kwargs check imports nothing
    assert len(report.trials) == 1
    with pytest.raises(ConfigError, match="names other code than yours"):
        tune(_recipe(1), space, trials=2, **QUIET)
    assert not marker.exists()
