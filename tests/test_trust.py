"""The trust model: a run directory's import paths run only with --trust / trust=True."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import QUIET, gradwise_cli, mlp

import gradwise as gw
from gradwise.errors import ConfigError
from gradwise.registry import import_path
from gradwise.trust import UntrustedError, ledger_path, record_artifact, recorded

# the console script `gradwise` does not put the current directory on sys.path; `python -m` does
SAFE_PATH = {"PYTHONSAFEPATH": "1"}

MODELS = """
from torch import nn

def build(in_features: int, num_outputs: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, 16), nn.ReLU(), nn.Linear(16, num_outputs))
"""
# code that a hostile directory wants run: it leaves a marker when imported or called
EVIL = """
from pathlib import Path

MARKER = Path(__file__).with_name("PWNED")
MARKER.write_text("imported")

def build(**kwargs):
    MARKER.write_text("called")
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder with the user's model module, a hostile module, and a run trained from a
    recipe naming ``trust_models_gw:build`` with the gradwise command."""
    root = tmp_path_factory.mktemp("trust")
    (root / "trust_models_gw.py").write_text(MODELS)
    (root / "evil_gw.py").write_text(EVIL)
    recipe = {
        "name": "custom",
        "model": {"name": "trust_models_gw:build"},
        "data": {"name": "iris"},
        "doctor": {"mode": "off"},
        "tracking": {"mlflow": False, "tensorboard": False},
        "train": {"epochs": 1},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = gradwise_cli("train", "recipe.yaml", "-q", cwd=root, env=SAFE_PATH)
    assert result.returncode == 0, result.stderr
    return root


def hostile(run_dir: Path, dst: Path, **sections: dict) -> Path:
    """A copy of ``run_dir`` whose recipe.yaml has the given sections merged in."""
    shutil.copytree(run_dir, dst)
    recipe = yaml.safe_load((dst / "recipe.yaml").read_text())
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    (dst / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return dst


def one_error_line(result, field: str, path: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(f"error: {field}: got '{path}'"), result.stderr
    assert "--trust" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_cli_train_imports_the_users_module_from_the_current_directory(workdir):
    assert (workdir / "runs" / "custom" / "checkpoints").is_dir()


def test_cli_resume_refuses_a_run_directory_that_names_os_system(workdir, tmp_path):
    marker = tmp_path / "pwned"
    data = {"name": "os:system", "kwargs": {"command": f"touch {marker}"}}
    run = hostile(workdir / "runs" / "custom", tmp_path / "run", data=data)
    result = gradwise_cli("resume", str(run), "-q", cwd=workdir)
    one_error_line(result, "data.name", "os:system")
    assert not marker.exists()


def test_cli_export_refuses_a_run_directory_that_names_a_hostile_module(workdir, tmp_path):
    run = hostile(workdir / "runs" / "custom", tmp_path / "run", model={"name": "evil_gw:build"})
    result = gradwise_cli("export", str(run), cwd=workdir)  # evil_gw.py is importable from here
    one_error_line(result, "model.name", "evil_gw:build")
    assert not (workdir / "PWNED").exists() and not (run / "export").exists()


def test_cli_resume_export_and_bench_a_trusted_run(workdir, tmp_path):
    run = tmp_path / "custom"
    shutil.copytree(workdir / "runs" / "custom", run)
    resumed = gradwise_cli("resume", str(run), "-q", "--trust", cwd=workdir, env=SAFE_PATH)
    assert resumed.returncode == 0, resumed.stderr
    assert "finished" in resumed.stdout
    args = ("export", str(run), "-f", "torch-export", "-o", str(tmp_path / "pt2"))
    exported = gradwise_cli(*args, "--trust", cwd=workdir, env=SAFE_PATH)
    assert exported.returncode == 0, exported.stderr
    bench = ("bench", str(tmp_path / "pt2"), "--batch-sizes", "2", "--seconds", "0.02")
    # the card's recipe names the user's module: rebuilding eager PyTorch needs trust
    one_error_line(gradwise_cli(*bench, cwd=workdir), "model.name", "trust_models_gw:build")
    trusted = gradwise_cli(*bench, "--trust", cwd=workdir, env=SAFE_PATH)
    assert trusted.returncode == 0, trusted.stderr
    assert "eager" in trusted.stdout and "torch-export" in trusted.stdout


def test_cli_bench_refuses_an_export_whose_card_names_a_hostile_module(in_workdir, tmp_path):
    import json

    from gradwise.deploy import export

    pytest.importorskip("onnxruntime")
    workdir = in_workdir
    run = shutil.copytree(workdir / "runs" / "custom", tmp_path / "run")
    out = export(run, "onnx", trust=True).dir  # the user's own run
    card = json.loads((out / "model.json").read_text())
    card["recipe"]["model"]["name"] = "evil_gw:build"
    (out / "model.json").write_text(json.dumps(card))
    result = gradwise_cli("bench", str(out), "--seconds", "0.02", cwd=workdir)
    one_error_line(result, "model.name", "evil_gw:build")
    assert not (workdir / "PWNED").exists()


# -- Python ---------------------------------------------------------------------------------------


@pytest.fixture
def in_workdir(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in the project folder; sys.path comes back as it was."""
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return workdir


def test_trainer_resume_refuses_import_paths_unless_trusted(in_workdir, tmp_path):
    run = hostile(in_workdir / "runs" / "custom", tmp_path / "run", train={"loss": "evil_gw:build"})
    with pytest.raises(UntrustedError, match=r"model\.name: got 'trust_models_gw:build'"):
        gw.Trainer.resume(run, **QUIET).fit()
    data = gw.load_data("iris")
    model = gw.build_model("trust_models_gw:build", info=data.info, num_outputs=3)
    with pytest.raises(UntrustedError, match=r"train\.loss: got 'evil_gw:build'"):
        gw.Trainer.resume(run, model, data.train, data.val, **QUIET).fit()
    assert not (in_workdir / "PWNED").exists()
    mine = shutil.copytree(in_workdir / "runs" / "custom", tmp_path / "mine")
    assert gw.Trainer.resume(mine, trust=True, epochs=2, **QUIET).fit().state == "finished"


def test_trainer_resume_refuses_an_optimizer_import_path_unless_trusted(in_workdir, tmp_path):
    recipe = {
        "name": "optimizer-path",
        "model": {"name": "mlp", "kwargs": {"hidden": [8]}},
        "data": {"name": "iris"},
        "optim": {"name": "torch.optim:RMSprop", "kwargs": {"alpha": 0.9}},
        "doctor": {"mode": "off"},
        "train": {"epochs": 1},
    }
    run = gw.Trainer(recipe=recipe, **QUIET).fit()
    evil = hostile(run.dir, tmp_path / "evil", optim={"name": "evil_gw:build", "kwargs": {}})
    with pytest.raises(UntrustedError, match=r"optim\.name: got 'evil_gw:build'"):
        gw.Trainer.resume(evil, epochs=2, **QUIET).fit()
    assert not (in_workdir / "PWNED").exists()
    with pytest.raises(UntrustedError, match=r"optim\.name: got 'torch\.optim:RMSprop'"):
        gw.Trainer.resume(run.dir, epochs=2, **QUIET).fit()
    resumed = gw.Trainer.resume(run.dir, trust=True, epochs=2, **QUIET).fit()
    assert resumed.state == "finished" and resumed.steps > run.steps


def test_objects_passed_to_resume_need_no_trust(blobs, tmp_path):
    x, y = blobs
    data = (x[:200], y[:200]), (x[200:], y[200:])
    run = gw.Trainer(mlp(), *data, recipe={"doctor": {"mode": "off"}}, epochs=1, **QUIET).fit()
    evil = {"name": "evil_gw:build", "kwargs": {}}
    hostile(run.dir, tmp_path / "copy", model=evil, data=evil)
    resumed = gw.Trainer.resume(tmp_path / "copy", mlp(), *data, epochs=2, **QUIET).fit()
    assert resumed.state == "finished" and resumed.steps > run.steps


def test_export_refuses_import_paths_unless_trusted(in_workdir, tmp_path):
    from gradwise.deploy import export

    with pytest.raises(UntrustedError, match="trust_models_gw:build"):
        export(in_workdir / "runs" / "custom", "torchscript", out=tmp_path / "ts")
    assert not (tmp_path / "ts").exists()
    run = shutil.copytree(in_workdir / "runs" / "custom", tmp_path / "run")
    artifact = export(run, "torchscript", out=tmp_path / "ts", trust=True)
    assert artifact.parity["passed"] and artifact.card["recipe"]["model"]["name"].startswith(
        "trust"
    )


def test_registry_names_are_always_allowed():
    info = gw.load_data("iris", trusted=False).info
    model = gw.build_model("mlp", {"hidden": [8]}, info, 3, trusted=False)
    assert isinstance(model, torch.nn.Module)
    with pytest.raises(UntrustedError, match="--trust"):
        gw.build_model("os:getcwd", trusted=False)


# -- import paths and the current directory -----------------------------------------------------


@pytest.fixture
def no_cwd_on_path(monkeypatch: pytest.MonkeyPatch) -> Path:
    """sys.path as the ``gradwise`` console script has it: without the current directory."""
    cwd = Path.cwd()
    kept = [p for p in sys.path if p and Path(p).resolve() != cwd.resolve()]
    monkeypatch.setattr(sys, "path", kept)
    return cwd


def test_import_paths_find_modules_in_the_current_directory(no_cwd_on_path):
    (no_cwd_on_path / "cwd_models_gw.py").write_text("VALUE = 42\n")
    assert import_path("cwd_models_gw:VALUE") == 42
    assert str(no_cwd_on_path) == sys.path[-1]  # after installed packages: they keep precedence


def test_a_missing_module_hints_at_the_current_directory(no_cwd_on_path):
    with pytest.raises(ConfigError, match=r"is nowhere_gw\.py in the current directory or on PYTH"):
        import_path("nowhere_gw:build", "model.name")
    (no_cwd_on_path / "broken_gw.py").write_text("import missing_dependency_gw\n")
    with pytest.raises(ConfigError, match="missing_dependency_gw") as info:
        import_path("broken_gw:build", "model.name")
    assert "current directory" not in str(info.value)  # the module was found; its import failed


# -- the ledger ---------------------------------------------------------------------------------


def test_ledger_records_artifacts_privately_and_survives_a_torn_line(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADWISE_HOME", str(tmp_path / "home"))
    artifact = tmp_path / "model.pt2"
    artifact.write_bytes(b"weights")
    assert recorded(record_artifact(artifact)) and not recorded("0" * 64)
    assert ledger_path().stat().st_mode & 0o077 == 0  # only the user may vouch for artifacts
    with open(ledger_path(), "a") as f:
        f.write('{"sha256": "to')  # a crash mid-line
    artifact.write_bytes(b"other weights")
    digest = record_artifact(artifact)
    assert recorded(digest) and ledger_path().read_text().splitlines()[-1].startswith('{"sha')


def test_an_unwritable_ledger_only_warns(tmp_path, monkeypatch):
    (tmp_path / "home").write_text("a file where the directory should be")
    monkeypatch.setenv("GRADWISE_HOME", str(tmp_path / "home"))
    artifact = tmp_path / "model.pt2"
    artifact.write_bytes(b"weights")
    with pytest.warns(UserWarning, match="--trust"):
        record_artifact(artifact)
