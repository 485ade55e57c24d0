"""Studies on a real PostgreSQL server, as several machines share them.

The server comes from scripts/ensure_postgres.sh (``make test`` runs it and sets
GRADWISE_REQUIRE_POSTGRES=1, so that a missing server fails these tests instead of skipping them).
GRADWISE_TEST_POSTGRES names another server; its role must be allowed to create databases. Each
test gets a database of its own, dropped afterwards, so reruns never meet an old study.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml

from gradwise.tune import storage as stores
from gradwise.tune import study_report, tune
from gradwise.tune.report import WORKER

DEFAULT_URL = "postgresql://gradwise:gradwise@127.0.0.1:5432/gradwise_test"
REQUIRED = os.environ.get("GRADWISE_REQUIRE_POSTGRES") == "1"

RECIPE = {
    "model": {"name": "mlp", "kwargs": {"hidden": [16]}},
    "data": {"name": "iris", "batch_size": 64},
    "train": {"epochs": 1},
    "doctor": {"mode": "off"},
    "tracking": {"mlflow": False, "tensorboard": False, "progress": False},
}
SPACE = {"optim.lr": {"type": "log_uniform", "low": 1.0e-3, "high": 0.3}}
QUIET = {"plots": False, "verbose": False}
# A model that takes its time in training, so that two processes that start a second apart both
# get trials; while a file "hold" exists in the working directory, its training step says it is
# under way (the file "under_way") and waits, so a worker is caught in the middle of a trial.
SLOW = textwrap.dedent(
    """
    import os
    import time

    import torch

    class Slow(torch.nn.Module):
        def __init__(self, in_features, num_outputs, delay):
            super().__init__()
            self.delay = delay
            self.layer = torch.nn.Linear(in_features, num_outputs)

        def forward(self, x):
            if self.training:
                time.sleep(self.delay)
                if os.path.exists("hold"):
                    open("under_way", "w").close()
                    started = time.monotonic()
                    while os.path.exists("hold") and time.monotonic() - started < 120:
                        time.sleep(0.05)
            return self.layer(x)

    def slow(in_features, num_outputs, delay=0.0):
        return Slow(in_features, num_outputs, delay)
    """
)


def _unavailable(reason: str) -> None:
    message = (
        f"{reason}; run scripts/ensure_postgres.sh (as root, or with sudo) or set "
        "GRADWISE_TEST_POSTGRES=postgresql://user:password@host:port/db"
    )
    if REQUIRED:
        pytest.fail(f"GRADWISE_REQUIRE_POSTGRES=1 but {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def server() -> str:
    """The URL of the test server, checked once."""
    url = os.environ.get("GRADWISE_TEST_POSTGRES") or DEFAULT_URL
    try:
        import psycopg2
    except ImportError:
        _unavailable("psycopg2 is not installed (pip install 'gradwise[tune]')")
    try:
        psycopg2.connect(url, connect_timeout=5).close()
    except psycopg2.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        _unavailable(f"no PostgreSQL at {stores.describe(url)} ({first})")
    return url


@pytest.fixture
def database(server: str) -> Iterator[str]:
    """The URL of a new, empty database on the test server (dropped after the test)."""
    import psycopg2
    from sqlalchemy.engine import make_url

    name = f"gradwise_test_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(server, connect_timeout=5)
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        yield make_url(server).set(database=name).render_as_string(hide_password=False)
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.close()


@pytest.fixture
def slow_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "slow_models.py").write_text(SLOW)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _recipe_file(folder: Path, delay: float) -> Path:
    recipe = {**RECIPE, "model": {"name": "slow_models:slow", "kwargs": {"delay": delay}}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    (folder / "space.yaml").write_text(yaml.safe_dump(SPACE))
    return path


def _tune_command(url: str, study: str, *options: str) -> list[str]:
    """The real `gradwise tune` command line on the recipe and space of _recipe_file."""
    return [
        sys.executable, "-m", "gradwise", "tune", "recipe.yaml", "--space", "space.yaml",
        "--pruner", "none", "--storage", url, "--study", study, *options,
    ]  # fmt: skip


def _trials(url: str, study: str) -> list[optuna.trial.FrozenTrial]:
    store = stores.open_storage(url)
    return optuna.load_study(study_name=study, storage=store).get_trials(deepcopy=False)


def _count(trials: list, *states: str) -> int:
    return sum(t.state.name in states for t in trials)


def test_workers_opening_an_empty_database_at_once_all_get_the_storage(database):
    # Each creates Optuna's tables; without the retry in open_storage all but one failed with
    # "duplicate key value violates unique constraint".
    barrier, errors = threading.Barrier(4), []

    def open_it() -> None:
        barrier.wait()
        try:
            stores.open_storage(database)
        except Exception as exc:  # collected, shown below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert optuna.study.get_all_study_names(stores.open_storage(database)) == []


def test_two_machines_share_one_study_and_its_cap(database, slow_model):
    # Two `gradwise tune` processes started at once on a new database, as on two machines (each
    # with its own --seed, as docs/tuning.md says).
    _recipe_file(slow_model, delay=0.2)
    command = _tune_command(database, "shared", "--trials", "8")
    env = {**os.environ, "GRADWISE_DEBUG": "0"}
    processes = [
        subprocess.Popen(
            [*command, "--seed", str(seed)],
            cwd=slow_model,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for seed in (0, 1)
    ]
    outputs = [p.communicate(timeout=180)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs

    trials = _trials(database, "shared")
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) == len(trials)
    assert _count(trials, "COMPLETE") == 8 and _count(trials, "RUNNING", "WAITING") == 0
    extra = [t for t in trials if t.state.name != "COMPLETE"]
    assert all(t.user_attrs.get("skipped") for t in extra)  # nothing beyond the cap was run
    workers = {t.user_attrs[WORKER] for t in trials if t.state.name == "COMPLETE"}
    assert len(workers) == 2  # both processes ran trials
    ran = [sum(f"trial {n} complete" in out for n in numbers) for out in outputs]
    assert sum(ran) == 8 and min(ran) >= 1
    for out in outputs:  # each printed the study's table, without the password
        assert "study shared (postgresql://gradwise:***@" in out and ":gradwise@" not in out


def test_a_study_killed_mid_trial_resumes_to_its_cap(database, slow_model):
    _recipe_file(slow_model, delay=0.3)
    hold, under_way = slow_model / "hold", slow_model / "under_way"
    hold.touch()  # the worker's first training step waits: it is killed mid-trial, not by luck
    log = slow_model / "worker.log"
    worker = subprocess.Popen(
        _tune_command(database, "killed", "--trials", "3"),
        cwd=slow_model,
        env={**os.environ, "GRADWISE_DEBUG": "0"},
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )
    try:
        deadline = time.monotonic() + 120
        while not under_way.exists() and worker.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert under_way.exists(), (
            f"the worker never started a trial (exit {worker.poll()}): {log.read_text()[-2000:]}"
        )
    finally:
        worker.send_signal(signal.SIGKILL)  # a machine that dies: no clean-up at all
        worker.wait()
        hold.unlink()
    running = [
        t
        for t in _trials(database, "killed")
        if t.state.name == "RUNNING" and WORKER in t.user_attrs  # it had recorded itself
    ]
    assert len(running) == 1

    result = tune(
        "recipe.yaml", "space.yaml", trials=3, pruner="none", storage=database,
        study_name="killed", **QUIET,
    )  # fmt: skip
    orphan = next(t for t in result.trials if t.number == running[0].number)
    assert orphan.state == "failed" and "is gone" in orphan.message
    assert sum(t.state == "complete" for t in result.trials) == 3

    again = study_report("killed", storage=database, plots=False)  # from any machine
    assert [(t.number, t.state) for t in again.trials] == [
        (t.number, t.state) for t in result.trials
    ]
    assert again.best.number == result.best.number
    more = tune(
        "recipe.yaml", "space.yaml", trials=4, pruner="none", storage=database,
        study_name="killed", **QUIET,
    )  # fmt: skip
    assert sum(t.state == "complete" for t in more.trials) == 4  # resumed to a larger cap


def test_a_trial_of_a_machine_that_stopped_heartbeating_is_failed_and_replaced(
    database, monkeypatch
):
    monkeypatch.setattr(stores, "HEARTBEAT_S", 1)
    monkeypatch.setattr(stores, "GRACE_S", 2)
    tune(RECIPE, SPACE, trials=1, pruner="none", storage=database, study_name="hb", **QUIET)
    store = stores.open_storage(database)
    study = optuna.load_study(study_name="hb", storage=store)
    with warnings.catch_warnings():  # "heartbeat ... supposed to be used with Study.optimize"
        warnings.simplefilter("ignore", UserWarning)
        lost = study.ask()  # a trial of another machine that went away mid-trial
    lost.set_user_attr(WORKER, "another-machine:4242")
    store.record_heartbeat(lost._trial_id)
    time.sleep(3)  # past the grace period
    result = tune(
        RECIPE, SPACE, trials=3, pruner="none", storage=database, study_name="hb", **QUIET
    )
    states = {t.number: t.state for t in result.trials}
    assert states[lost.number] == "failed"
    assert sum(state == "complete" for state in states.values()) == 3
