"""gradwise evaluate on a real run: the CLI, evaluation/ on disk, MLflow, and the HTML page in
headless Chromium with every plot decoded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import gradwise_main, mlp
from doctor.test_report import Chromium, render

import gradwise as gw
from gradwise.evaluate.calibration import read_temperature

RECIPE = {
    "name": "bc",
    "model": {"name": "mlp", "kwargs": {"hidden": [16]}},
    "data": {"name": "breast_cancer"},
    "train": {"epochs": 2},
    "checkpoint": {"keep_last": 3},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny real run (2 epochs on breast_cancer) with MLflow tracking on, shared by the module."""
    root = tmp_path_factory.mktemp("evaluate-runs")
    recipe = {**RECIPE, "tracking": {"root": str(root / "runs")}}
    run = gw.Trainer(recipe=recipe, progress="off", tensorboard=False, mlflow=True).fit()
    return run.dir


@pytest.fixture(scope="module")
def evaluated(run_dir: Path) -> Path:
    result = gw.evaluate(run_dir, slices="label", resamples=200)
    assert result.dir == run_dir / "evaluation"
    return result.dir


def test_cli_evaluate_writes_evaluation_and_exits_0(run_dir: Path, monkeypatch, capsys) -> None:
    code, out, err = gradwise_main(
        monkeypatch, capsys, "evaluate", str(run_dir), "--checkpoint", "last",
        "--resamples", "100", "--slice", "mean radius",
    )  # fmt: skip
    assert code in (0, None), err
    assert "95% CI" in out and "temperature" in out and "index.html" in out
    ev = run_dir / "evaluation"
    files = {p.name for p in ev.iterdir()}
    assert {"metrics.json", "index.html", "calibration.json"} <= files
    assert {"confusion_matrix.png", "roc.png", "pr.png", "reliability.png"} <= files
    saved = json.loads((ev / "metrics.json").read_text())
    assert saved["source"]["checkpoint"].startswith("step-")
    assert saved["metrics"]["task"] == "binary" and saved["metrics"]["samples"] > 100
    assert "mean radius" in saved["analysis"]["slices"]
    assert read_temperature(run_dir) == pytest.approx(saved["calibration"]["temperature"])
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".evaluation")]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("worst", "best, last, or a step number"), ("99999", "the step of a checkpoint")],
)
def test_bad_checkpoint_exits_2(run_dir: Path, monkeypatch, capsys, value, expected) -> None:
    code, _, err = gradwise_main(
        monkeypatch, capsys, "evaluate", str(run_dir), "--checkpoint", value
    )
    assert code == 2
    assert "--checkpoint" in err and value in err and expected in err
    assert "Traceback" not in err


def test_mlflow_gets_the_metrics(run_dir: Path, evaluated: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(run_dir.parent / 'mlflow.db').as_posix()}")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`gradwise.run_dir` = '{run_dir.resolve()}'",
    )
    assert len(runs) == 1
    saved = json.loads((evaluated / "metrics.json").read_text())["metrics"]["headline"]
    logged = runs[0].data.metrics
    assert logged["eval/roc_auc"] == pytest.approx(saved["roc_auc"]["value"])
    assert logged["eval/f1_ci_low"] == pytest.approx(saved["f1"]["ci_low"])
    artifacts = [a.path for a in client.list_artifacts(runs[0].info.run_id, "evaluation")]
    assert "evaluation/index.html" in artifacts


PLOTS = """Array.from(document.images, i => ({plot: i.dataset.plot, complete: i.complete,
  width: i.naturalWidth, height: i.naturalHeight, src: i.src.slice(0, 22)}))"""


def test_page_renders_every_plot_in_chromium(evaluated: Path, tmp_path: Path) -> None:
    browser = Chromium(tmp_path / "profile")
    try:
        page = render(browser, evaluated / "index.html", PLOTS)
    finally:
        browser.close()
    assert page.problems == []
    assert all(url.startswith(("file:", "data:")) for url in page.requests), page.requests
    plots = {p["plot"]: p for p in page.checks}
    assert set(plots) == {"confusion_matrix", "roc", "pr", "reliability"}
    for p in plots.values():
        assert p["complete"] and p["width"] > 0 and p["height"] > 0, p
        assert p["src"] == "data:image/png;base64,"
    assert "Headline metrics" in page.text and "Most confident mistakes" in page.text
    assert "Slices by label" in page.text


def test_evaluate_a_model_on_tensors_regression_and_step(run_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(300, 8)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    model = mlp(8, 3)
    result = gw.evaluate(model, (x, y), task="multiclass", resamples=50)
    assert result.dir is None and result.task == "multiclass"
    assert result.metrics["samples"] == 300 and "top_k_accuracy" in result.metrics
    out = result.write(tmp_path / "ev")
    assert (out / "index.html").is_file() and (out / "calibration.json").is_file()
    # regression: residual and predicted-vs-true plots, metrics in the target's units
    w = torch.randn(8)
    reg = gw.evaluate(torch.nn.Linear(8, 1), (x, x @ w), task="regression", resamples=50)
    assert set(reg.plots) == {"residuals", "predicted_vs_true"}
    assert reg.headline["rmse"] > 0 and reg.calibration is None
    # a checkpoint by its step
    steps = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    step = int(steps[0].removeprefix("step-"))
    first = gw.evaluate(run_dir, checkpoint=step, resamples=0, plots=False, write=False)
    assert first.source["checkpoint"] == steps[0]
    assert all(v["ci_low"] is None for v in first.metrics["headline"].values())
    assert np.isfinite(first.headline["accuracy"])
