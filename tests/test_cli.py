"""The command line: bad input gets one clear message and exit code 2, and nothing looks finished."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import gradwise_cli

import gradwise as gw
from gradwise.tracking import list_runs

FACTORIES = textwrap.dedent(
    """
    import torch

    def three_classes():
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))

    def wrong_width():
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(10, 10))
    """
)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    (tmp_path / "user_models.py").write_text(FACTORIES)
    return path


BAD_INPUT = [
    ("optim:\n  lrr: 0.1\n", [], "optim.lrr", "did you mean 'lr'"),
    ("train:\n  epochs: ten\n", [], "train.epochs", "integer"),
    ("{}\n", ["--set", "optim.lr=-1"], "optim.lr", "greater than 0"),
    ("{}\n", ["--set", "optim.lrr=1"], "optim.lrr", "did you mean 'lr'"),
    (
        "data:\n  name: csv\n  kwargs: {path: missing.csv, target: y}\n",
        [],
        "missing.csv",
        "does not exist",
    ),
    ("model:\n  name: no_such_pkg.models:net\n", [], "model.name", "importable module"),
    ("model:\n  name: resnett\n", [], "model.name", "did you mean 'resnet'"),
    (
        "model:\n  name: user_models:three_classes\ndata:\n  name: digits\n",
        [],
        "labels outside",
        "0..9",
    ),
    (
        "model:\n  name: user_models:wrong_width\ndata:\n  name: digits\n",
        [],
        "cannot take the data",
        "(2, 1, 8, 8)",
    ),
]


@pytest.mark.parametrize(("recipe", "extra", "names", "expects"), BAD_INPUT)
def test_bad_input_exits_2_with_one_clear_message(tmp_path, recipe, extra, names, expects):
    path = _write(tmp_path, recipe)
    result = gradwise_cli(
        "train", str(path), *extra, cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)}
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert names in lines[0] and expects in lines[0], lines[0]
    assert not any(run.state == "finished" for run in list_runs(tmp_path / "runs"))


def test_missing_recipe_file(tmp_path):
    result = gradwise_cli("train", "nope.yaml", cwd=tmp_path)
    assert (
        result.returncode == 2 and "nope.yaml" in result.stderr and "Traceback" not in result.stderr
    )


def test_debug_shows_the_traceback(tmp_path):
    path = _write(tmp_path, "optim:\n  lrr: 0.1\n")
    result = gradwise_cli("train", str(path), "--debug", cwd=tmp_path)
    assert (
        result.returncode != 0 and "Traceback" in result.stderr and "ConfigError" in result.stderr
    )


def test_help_does_not_import_torch():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "gradwise", "--help"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and "train" in result.stdout and "resume" in result.stdout
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line
    }
    assert "torch" not in imported and "gradwise.cli" in imported


def test_import_gradwise_is_lazy():
    code = "import sys, gradwise; print(sorted(m for m in ('torch', 'pydantic', 'torchmetrics', 'sklearn', 'mlflow') if m in sys.modules))"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()
        == "[]"
    )
    code = "import sys, gradwise; gradwise.Trainer; print(sorted(m for m in ('torchmetrics', 'sklearn', 'mlflow', 'tensorboard') if m in sys.modules))"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()
        == "[]"
    )


def test_train_then_list_runs(tmp_path):
    path = _write(
        tmp_path,
        "model: {name: mlp, kwargs: {hidden: [16]}}\ndata: {name: iris}\ntracking: {mlflow: false, tensorboard: false}\n",
    )
    result = gradwise_cli(
        "train", str(path), "--set", "epochs=2", "--name", "iris-quick", "-q", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "best val_accuracy" in result.stdout and "runs/iris-quick" in result.stdout
    listing = gradwise_cli("runs", cwd=tmp_path)
    assert (
        listing.returncode == 0 and "iris-quick" in listing.stdout and "finished" in listing.stdout
    )
    assert "the advisor was not asked" in result.stderr  # the run says where its settings came from
    assert not (tmp_path / "runs" / "iris-quick" / "advice.json").exists()


def test_train_with_advise_chooses_like_the_python_api(tmp_path):
    path = _write(
        tmp_path,
        "model: {name: mlp, kwargs: {hidden: [16]}}\ndata: {name: iris}\noptim: {lr: 0.02}\n"
        "tracking: {mlflow: false, tensorboard: false}\n",
    )
    result = gradwise_cli(
        "train", str(path), "--advise", "--set", "epochs=1", "--name", "adv", "-q", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "advised for this model and data" in result.stderr
    run = tmp_path / "runs" / "adv"
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    assert recipe["optim"]["lr"] == 0.02 and recipe["train"]["epochs"] == 1  # the user's win
    python = gw.advise(recipe={**yaml.safe_load(path.read_text()), "train": {"epochs": 1}})
    advised = {a.setting: a.value for a in python.advice}
    assert recipe["data"]["batch_size"] == advised["data.batch_size"]
    assert recipe["optim"]["weight_decay"] == advised["optim.weight_decay"]
    assert (run / "advice.json").is_file()


def test_public_functions_stay_callable_after_their_modules_are_imported():
    # gradwise.facts, .tune, .deploy.export and .serve are modules and the functions users call.
    code = (
        "import gradwise, gradwise.tune.space, gradwise.deploy.export, gradwise.deploy.serve\n"
        "import gradwise.advisor, gradwise.assemble, gradwise.deploy.bench\n"
        "assert callable(gradwise.assemble) and gradwise.assemble.Assembly\n"
        "from gradwise.deploy import bench\n"
        "assert callable(bench) and callable(gradwise.deploy.bench)\n"
        "assert callable(gradwise.facts) and gradwise.facts.Facts\n"
        "from gradwise.tune.study import tune\n"
        "from gradwise.deploy.export import export\n"
        "print(callable(gradwise.tune), callable(gradwise.deploy.export),"
        " callable(gradwise.deploy.serve), gradwise.export is export,"
        " 'tpe' in gradwise.tune.SAMPLERS, sorted(dir(gradwise))[:2])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True True True True True ['Advice', 'Assembly']"


def test_a_loss_that_cannot_take_outputs_and_targets_is_one_line_before_training(tmp_path):
    path = _write(
        tmp_path,
        "model: {name: mlp, kwargs: {num_outputs: 3}}\ndata: {name: iris}\ntask: custom\n"
        "train: {loss: 'os:system'}\ntracking: {mlflow: false, tensorboard: false}\n",
    )
    result = gradwise_cli("train", str(path), "-q", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        "train.loss: got 'os:system'" in result.stderr
        and "takes at most 1 argument" in result.stderr
    )
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_a_python_loss_that_returns_no_scalar_is_a_config_error(blobs):
    x, y = blobs
    with pytest.raises(gw.ConfigError, match=r"loss_fn.*it returned \(2,\)"):
        gw.Trainer(
            torch.nn.Linear(8, 3),
            (x[:20], y[:20]),
            task="custom",
            loss_fn=lambda out, target: out.sum(1),
            progress="off",
        ).fit()


def test_train_quick_check_keeps_nothing(tmp_path):
    path = _write(tmp_path, "model: {name: mlp, kwargs: {hidden: [8]}}\ndata: {name: iris}\n")
    result = gradwise_cli("train", str(path), "--quick-check", "2", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "quick check passed: 2 training steps" in result.stdout
    assert not (tmp_path / "runs").exists()
