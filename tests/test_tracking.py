"""The run directory files and the Tracker, against real MLflow (SQLite) and TensorBoard files."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gradwise.errors import GradwiseError
from gradwise.tracking import (
    Tracker,
    atomic_write_text,
    list_runs,
    new_run_dir,
    read_metrics,
    read_status,
    write_environment,
    write_status,
)

OFF = {"tensorboard": False, "mlflow": False, "wandb": False}


@pytest.fixture(scope="module")
def mlflow_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One runs root for all MLflow tests: creating a new database's tables takes seconds."""
    return tmp_path_factory.mktemp("runs")


def mlflow_client(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


# -- run directory files -----------------------------------------------------------------------


def test_new_run_dir_never_reuses_a_directory(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    first = new_run_dir(root, "mlp")
    (root / "empty-but-taken").mkdir()
    assert first == root / "mlp" and first.is_dir()
    assert new_run_dir(root, "mlp") == root / "mlp-2"
    assert new_run_dir(str(root), "mlp") == root / "mlp-3"
    assert new_run_dir(root, "empty-but-taken") == root / "empty-but-taken-2"
    for bad in ["", "a/b", "..", ".hidden"]:
        with pytest.raises(GradwiseError, match="run name"):
            new_run_dir(root, bad)


def test_atomic_write_text_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "note.txt"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new ünïcode")
    assert path.read_text(encoding="utf-8") == "new ünïcode"
    assert [p.name for p in tmp_path.iterdir()] == ["note.txt"]  # no temporary files left


def test_status_merges_and_stamps_times(tmp_path: Path) -> None:
    with pytest.raises(GradwiseError, match="not a gradwise run"):
        read_status(tmp_path)
    write_status(tmp_path, "running", step=0, epoch=0, monitor="val/loss")
    first = read_status(tmp_path)
    assert first["state"] == "running" and first["started"] and first["ended"] is None
    write_status(tmp_path, "running", step=100, best_metric=0.5)
    write_status(tmp_path, "finished", epoch=3, message="done")
    status = read_status(tmp_path)
    assert status["state"] == "finished"
    assert status["started"] == first["started"]  # kept from the first write
    assert status["ended"] is not None
    assert (status["step"], status["epoch"], status["best_metric"]) == (100, 3, 0.5)
    assert (status["monitor"], status["message"]) == ("val/loss", "done")
    with pytest.raises(ValueError, match="state"):
        write_status(tmp_path, "done")
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_environment_records_versions_hardware_seed_and_git(tmp_path: Path, monkeypatch) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.chdir(repo)
    if shutil.which("git"):
        git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
        subprocess.run(["git", "init", "-q"], check=True)
        (repo / "a.txt").write_text("1")
        subprocess.run(["git", "add", "a.txt"], check=True)
        subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)
        (repo / "a.txt").write_text("2")
    env = write_environment(tmp_path, seed=1234)
    assert json.loads((tmp_path / "environment.json").read_text()) == env
    assert env["seed"] == 1234
    versions = env["versions"]
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    for package in ("torch", "numpy", "gradwise"):
        assert versions[package]
    hw = env["hardware"]
    assert hw["cpu_count"] >= 1 and hw["torch_threads"] >= 1
    assert isinstance(hw["mps"], bool)
    assert hw["cuda"] is None or hw["cuda"]["devices"][0]["name"]
    if shutil.which("git"):
        assert len(env["git"]["commit"]) == 40 and env["git"]["dirty"] is True


# -- metrics.jsonl -----------------------------------------------------------------------------


def test_metrics_round_trip(tmp_path: Path) -> None:
    with Tracker(tmp_path, params={}, **OFF) as tracker:
        assert tracker.backends == [] and tracker.mlflow_run_id is None
        for step in range(1, 4):
            tracker.log(step, {"loss": 1.0 / step, "lr": 0.1}, split="train", epoch=0)
        tracker.log(3, {"loss": 0.4, "acc": 0.75}, split="val", epoch=0)
        with pytest.raises(ValueError, match="reserved"):
            tracker.log(4, {"step": 1.0}, split="train")
        with pytest.raises(ValueError, match="split"):
            tracker.log(4, {"loss": 1.0}, split="valid")
    records = read_metrics(tmp_path)
    assert [(r["step"], r["split"]) for r in records] == [
        (1, "train"),
        (2, "train"),
        (3, "train"),
        (3, "val"),
    ]
    assert records[1]["loss"] == 0.5 and records[1]["epoch"] == 0 and records[1]["time"] > 1e9
    assert read_metrics(tmp_path, split="val") == [records[3]]
    with pytest.raises(RuntimeError, match="after close"):
        tracker.log(5, {"loss": 1.0}, split="train")
    tracker.close()  # a second close does nothing


def test_truncated_last_line_is_skipped_and_repaired(tmp_path: Path) -> None:
    assert read_metrics(tmp_path) == []
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train", "loss": 1.0}\n{"step": 2, "spl')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]
    # a resumed run appends after the complete lines, not after the fragment
    with Tracker(tmp_path, params={}, **OFF) as tracker:
        tracker.log(2, {"loss": 0.5}, split="train")
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert path.read_text().endswith("\n")


def test_metrics_reach_the_file_within_seconds_without_close(tmp_path: Path) -> None:
    tracker = Tracker(tmp_path, params={}, **OFF)
    try:
        tracker.log(1, {"loss": 1.0}, split="train")
        assert wait_for(lambda: len(read_metrics(tmp_path)) == 1, timeout=5)
    finally:
        tracker.close()


# -- MLflow and TensorBoard --------------------------------------------------------------------


def test_mlflow_gets_params_and_metrics_in_batches(mlflow_root: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(Tracker, "mlflow_flush_secs", 3600.0)  # only close() sends
    run_dir = new_run_dir(mlflow_root, "mlp")
    (run_dir / "recipe.yaml").write_text("model: mlp\n")
    params = {"model": {"name": "mlp", "hidden": 64}, "optim.lr": 0.001, "amp": True}
    tracker = Tracker(run_dir, params=params, tensorboard=False, mlflow=True, wandb=False)
    assert tracker.backends == ["mlflow"] and tracker.mlflow_run_id
    for step in (10, 20, 30):
        tracker.log(step, {"loss": 1.0 / step, "top-1%": 0.5}, split="train", epoch=0)
    tracker.log(30, {"loss": 0.25}, split="val", epoch=0)

    client = mlflow_client(mlflow_root)
    run_id = tracker.mlflow_run_id
    time.sleep(1.5)  # the background thread has had a turn: still nothing sent to MLflow
    assert client.get_metric_history(run_id, "train/loss") == []
    tracker.close()

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "mlp"
    assert run.data.params == {
        "model.name": "mlp",
        "model.hidden": "64",
        "optim.lr": "0.001",
        "amp": "true",
    }
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(10, 0.1), (20, 0.05), (30, 1.0 / 30)]
    assert [m.step for m in client.get_metric_history(run_id, "train/top-1_")] == [10, 20, 30]
    assert run.data.metrics["val/loss"] == 0.25
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "gradwise"
    assert experiment.artifact_location == (mlflow_root / "mlartifacts").as_uri()
    assert "recipe.yaml" in [a.path for a in client.list_artifacts(run_id)]


def test_mlflow_sends_periodically_and_marks_failed_and_killed(
    mlflow_root: Path, monkeypatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(Tracker, "mlflow_flush_secs", 0.0)  # send on every background turn
    client = mlflow_client(mlflow_root)
    tracker = Tracker(new_run_dir(mlflow_root, "crash"), params={}, tensorboard=False, mlflow=True)
    tracker.log(1, {"loss": 2.0}, split="train")
    assert wait_for(lambda: client.get_metric_history(tracker.mlflow_run_id, "train/loss"))
    tracker.close("failed")
    assert client.get_run(tracker.mlflow_run_id).info.status == "FAILED"

    with pytest.raises(KeyboardInterrupt):  # noqa: SIM117
        with Tracker(
            new_run_dir(mlflow_root, "ctrl-c"), params={}, tensorboard=False, mlflow=True
        ) as tracker:
            raise KeyboardInterrupt
    assert client.get_run(tracker.mlflow_run_id).info.status == "KILLED"


def test_mlflow_honours_tracking_uri_env(mlflow_root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{mlflow_root / 'mlflow.db'}")
    tracker = Tracker(new_run_dir(tmp_path, "elsewhere"), params={}, tensorboard=False, mlflow=True)
    tracker.close()
    assert not (tmp_path / "mlflow.db").exists()
    assert mlflow_client(mlflow_root).get_run(tracker.mlflow_run_id).info.run_name == "elsewhere"


def test_tensorboard_scalars_and_params_are_readable(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with Tracker(tmp_path, params={"optim.lr": 0.1}, tensorboard=True, mlflow=False) as tracker:
        assert tracker.backends == ["tensorboard"]
        for step in (1, 2):
            tracker.log(step, {"loss": float(step)}, split="train")
        tracker.log(2, {"acc": 0.5}, split="val")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0)]
    assert [(e.step, e.value) for e in events.Scalars("val/acc")] == [(2, 0.5)]
    assert "params/text_summary" in events.Tags()["tensors"]


@pytest.mark.parametrize(
    ("logger", "package", "hint"),
    [
        ("mlflow", "mlflow", "gradwise[track]"),
        ("tensorboard", "tensorboard", "gradwise[track]"),
        ("wandb", "wandb", "pip install wandb"),
    ],
)
def test_missing_logger_is_an_error_only_when_required(
    tmp_path: Path, monkeypatch, logger: str, package: str, hint: str
) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # makes the package look uninstalled
    settings = {**OFF, logger: True}
    with pytest.raises(
        GradwiseError, match=f"'{package}' package is not installed.*{re.escape(hint)}"
    ):
        Tracker(tmp_path, params={}, **settings)
    with Tracker(tmp_path, params={}, **{**OFF, logger: None}) as tracker:  # auto: quietly off
        assert tracker.backends == []


def test_wandb_auto_needs_a_login(monkeypatch, tmp_path: Path) -> None:
    from gradwise.tracking.tracker import _Wandb

    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert not _Wandb.configured()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert _Wandb.configured()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert not _Wandb.configured()


# -- list_runs ---------------------------------------------------------------------------------


def test_list_runs_newest_first_with_recipe_and_best_metric(tmp_path: Path) -> None:
    def make(name: str, started: str, state: str, recipe: dict | None = None, **fields) -> Path:
        run_dir = new_run_dir(tmp_path, name)
        write_status(run_dir, "running", started=started)
        write_status(run_dir, state, **fields)
        if recipe is not None:
            (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        return run_dir

    recipe = {"task": "multiclass", "model": {"name": "mlp"}, "data": {"name": "digits"}}
    make("old", "2024-01-01T10:00:00+00:00", "finished", recipe, epoch=5, step=500,
         best_metric=0.91, monitor="val/acc", ended="2024-01-01T10:01:30+00:00")  # fmt: skip
    make(
        "new",
        "2024-03-01T10:00:00+00:00",
        "failed",
        {"model": "cnn", "task": "auto"},
        message="NaN loss",
        task="binary",
    )
    make("mid", "2024-02-01T10:00:00+01:00", "interrupted")
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "mlflow.db").write_text("")

    runs = list_runs(tmp_path)
    assert [r.name for r in runs] == ["new", "mid", "old"]
    old = runs[2]
    assert (old.state, old.task, old.model, old.data) == ("finished", "multiclass", "mlp", "digits")
    assert (old.epoch, old.step, old.best_metric, old.monitor) == (5, 500, 0.91, "val/acc")
    assert old.duration_s == 90.0 and old.started.year == 2024 and old.path == tmp_path / "old"
    assert (runs[0].state, runs[0].model, runs[0].task, runs[0].message) == (
        "failed",
        "cnn",
        "binary",  # the resolved task in status.json wins over the recipe's "auto"
        "NaN loss",
    )
    assert runs[1].model is None and runs[1].best_metric is None
    assert list_runs(tmp_path / "missing") == []


def test_tracker_import_is_lazy() -> None:
    code = "import sys, gradwise.tracking; print(sorted({'mlflow', 'tensorboard', 'wandb', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_tensorboard_logging_does_not_import_tensorflow(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow", reason="only meaningful where TensorFlow is installed")
    code = (
        "import sys; from pathlib import Path; from gradwise.tracking import Tracker\n"
        f"with Tracker(Path({str(tmp_path)!r}), params={{'a': 1}}, tensorboard=True, mlflow=False)"
        " as t:\n    t.log(1, {'loss': 1.0}, split='train')\n"
        "print('tensorflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False" and "absl" not in out.stderr
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_a_logger_that_fails_to_start_is_a_warning_and_the_run_goes_on(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    from gradwise.tracking import tracker as tracking

    def broken(*args, **kwargs):
        raise RuntimeError("database is locked")

    monkeypatch.setattr(tracking._MLflow, "__init__", broken)
    with Tracker(tmp_path, params={}, tensorboard=False, mlflow=True) as tracker:
        tracker.log(1, {"loss": 1.0}, split="train")
        assert tracker.backends == [] and tracker.mlflow_run_id is None
    assert "mlflow logging is off: RuntimeError: database is locked" in caplog.text
    assert [m["loss"] for m in read_metrics(tmp_path)] == [1.0]


def test_loggers_start_into_the_run_or_at_its_end(tmp_path: Path, monkeypatch) -> None:
    # a short run must not fight MLflow's import for the interpreter: loggers wait for
    # start_after_secs, or start at close; metrics.jsonl is written all along
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setattr(Tracker, "start_after_secs", 60.0)
    short = tmp_path / "short"
    short.mkdir()
    with Tracker(short, params={}, tensorboard=True, mlflow=False) as tracker:
        tracker.log(1, {"loss": 1.0}, split="train")
        time.sleep(1.5)
        assert not (short / "tb").exists()  # not started yet ...
        assert read_metrics(short) == [read_metrics(short)[0]]  # ... but the file is flushed
    events = EventAccumulator(str(short / "tb"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == [1.0]  # everything arrives at close

    monkeypatch.setattr(Tracker, "start_after_secs", 0.2)
    long = tmp_path / "long"
    long.mkdir()
    with Tracker(long, params={}, tensorboard=True, mlflow=False) as tracker:
        deadline = time.time() + 10
        while not (long / "tb").exists() and time.time() < deadline:
            time.sleep(0.05)
        assert (long / "tb").exists()  # started while the run goes on


def test_a_failing_metrics_flush_warns_once_and_recovers(tmp_path: Path, caplog) -> None:
    class FullDisk:  # stands in for the buffered file while the disk is full
        def __init__(self, real) -> None:
            self.real, self.full = real, True

        def flush(self) -> None:
            if self.full:
                raise OSError(28, "No space left on device")
            self.real.flush()

        def __getattr__(self, name: str):
            return getattr(self.real, name)

    tracker = Tracker(tmp_path, params={}, tensorboard=False, mlflow=False)
    disk = FullDisk(tracker._file)
    tracker._file = disk
    for _ in range(3):
        tracker._flush_file()
    disk.full = False
    tracker._flush_file()
    tracker._file = disk.real
    tracker.close()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("logging failed" in m for m in messages) == 1
    assert any("works again" in m for m in messages)
