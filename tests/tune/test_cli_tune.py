"""gradwise tune on the command line: a study, its report regenerated from storage, and bad input."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import gradwise_cli, gradwise_main

RECIPE = textwrap.dedent(
    """
    model: {name: mlp, kwargs: {hidden: [16]}}
    data: {name: iris}
    train: {epochs: 2}
    doctor: {mode: "off"}
    tracking: {mlflow: false, tensorboard: false}
    """
)
SPACE = textwrap.dedent(
    """
    optim.lr: {type: log_uniform, low: 1.0e-3, high: 0.3}
    model.kwargs.dropout: {type: uniform, low: 0.0, high: 0.5}
    """
)


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    (tmp_path / "space.yaml").write_text(SPACE)
    return tmp_path


def test_tune_then_report_from_storage(files, monkeypatch, capsys):
    code, out, _ = gradwise_main(
        monkeypatch, capsys, "tune", "recipe.yaml", "--space", "space.yaml", "--trials", "3",
        "--study", "cli", "--pruner", "none",
    )  # fmt: skip
    assert code == 0, out
    assert "trial 2 complete" in out and "best recipe: runs/tune/cli/best.yaml" in out
    folder = Path("runs/tune/cli")
    best = yaml.safe_load((folder / "best.yaml").read_text())
    assert best["model"]["kwargs"]["hidden"] == [16] and 1e-3 <= best["optim"]["lr"] <= 0.3
    for name in ("best.yaml", "trials.csv", "importances.json"):
        (folder / name).unlink()
    for plot in (folder / "plots").iterdir():
        plot.unlink()

    code, out, _ = gradwise_main(monkeypatch, capsys, "tune", "--report", "cli")
    assert code == 0
    table = [line.split("\t") for line in out.splitlines() if "\t" in line]
    assert table[0][:3] == ["trial", "state", "val_accuracy"] and len(table) == 4
    assert all(row[1] == "complete" for row in table[1:])
    assert "importance (fANOVA): " in out
    assert {p.name for p in (folder / "plots").iterdir()} == {
        "history.png", "parallel_coordinate.png", "importances.png",
    }  # fmt: skip
    assert (folder / "best.yaml").is_file() and (folder / "trials.csv").read_text().count("\n") == 4


def test_propose_prints_a_space_to_save(files, monkeypatch, capsys):
    code, out, _ = gradwise_main(
        monkeypatch, capsys, "tune", "recipe.yaml", "--propose", "--set", "lr=0.02"
    )
    assert code == 0
    space = yaml.safe_load(out)
    assert space["optim.lr"] == {"type": "log_uniform", "low": 0.002, "high": 0.2}
    assert space["model.kwargs.dropout"]["type"] == "uniform"


BAD_SPACES = [
    ("optim.lrr: {type: uniform, low: 0.1, high: 1}", "optim.lrr", "did you mean 'lr'"),
    ("optim.lr: {type: uniform, low: 0.5, high: 0.1}", "optim.lr.low", "at most high (0.1)"),
    ("optim.lr: {type: log_uniform, low: 0, high: 1}", "optim.lr.low", "positive number on a log"),
    ("data.batch_size: {type: categorical, choices: []}", "batch_size.choices", "non-empty list"),
    ("optim.lr: {type: normal, low: 0.1, high: 1}", "optim.lr.type", "one of uniform"),
    (
        "optim.name: [adamw, sgd]\noptim.momentum: {type: uniform, low: 0.8, high: 0.9, when: {optim.name: sgdd}}",
        "optim.momentum.when.optim.name",
        "one of ['adamw', 'sgd']",
    ),
]  # fmt: skip
BAD_OPTIONS = [
    (["--sampler", "tpee"], "sampler", "did you mean 'tpe'"),
    (["--pruner", "hyperbnd"], "pruner", "did you mean 'hyperband'"),
    (["--objective", "accuracyy"], "objective", "did you mean 'val_accuracy'"),
    (["--workers", "0"], "workers", "a positive integer"),
    (["--storage", "runs/study.db"], "--storage", "a journal file ending in .journal"),
]


@pytest.mark.parametrize(("space", "field", "expected"), BAD_SPACES)
def test_bad_space_exits_2_with_one_message(files, monkeypatch, capsys, space, field, expected):
    (files / "bad.yaml").write_text(space)
    code, _, err = gradwise_main(monkeypatch, capsys, "tune", "recipe.yaml", "--space", "bad.yaml")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: bad.yaml: "), err
    assert field in lines[0] and expected in lines[0], lines[0]
    assert not Path("runs/tune/mlp-iris").exists()  # no trial started


@pytest.mark.parametrize(("options", "field", "expected"), BAD_OPTIONS)
def test_bad_options_exit_2_with_one_message(files, monkeypatch, capsys, options, field, expected):
    code, _, err = gradwise_main(
        monkeypatch, capsys, "tune", "recipe.yaml", "--space", "space.yaml", *options
    )
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {field}"), err
    assert expected in lines[0], lines[0]
    assert not Path("runs/tune/mlp-iris").exists()


def test_unreachable_storage_is_one_line_without_traceback(files):
    result = gradwise_cli(
        "tune", "recipe.yaml", "--space", "space.yaml",
        "--storage", "postgresql://gradwise:secret@127.0.0.1:1/studies", cwd=files,
    )  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: cannot open the study storage postgresql")
    assert "127.0.0.1:1" in lines[0] and "secret" not in lines[0] and "Traceback" not in lines[0]


def test_report_of_an_unknown_study(files, monkeypatch, capsys):
    code, _, err = gradwise_main(monkeypatch, capsys, "tune", "--report", "nope")
    assert code == 2 and "error: --report: got 'nope'" in err and "runs/tune/nope.journal" in err
