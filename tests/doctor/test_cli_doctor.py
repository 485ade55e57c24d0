"""gradwise check and gradwise report through the real command line."""

from __future__ import annotations

import textwrap

from conftest import gradwise_cli, gradwise_main

SOFTMAX_MODEL = textwrap.dedent(
    """
    import torch

    def softmax_head(in_features=4, num_outputs=3):
        return torch.nn.Sequential(torch.nn.Linear(in_features, 16), torch.nn.ReLU(),
                                   torch.nn.Linear(16, num_outputs), torch.nn.Softmax(dim=1))
    """
)


def test_check_a_healthy_recipe_suggests_a_learning_rate(tmp_path):
    recipe = tmp_path / "iris.yaml"
    recipe.write_text(
        "model: {name: mlp, kwargs: {hidden: [32]}}\ndata: {name: iris, batch_size: 16}\n"
    )
    result = gradwise_cli("check", str(recipe), "--plot", "lr.png", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        "overfit one batch of 16: passed" in result.stdout
        and "lr range test: suggestion" in result.stdout
    )
    assert "lr.png" in result.stdout and "no problems found" in result.stdout
    assert "planned lr 0.001 is within the range test's stable range" in result.stdout
    assert (tmp_path / "lr.png").stat().st_size > 10_000


def test_check_reports_a_recipe_lr_above_the_range_tests_divergence(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "iris.yaml"
    recipe.write_text(
        "model: {name: mlp, kwargs: {hidden: [32]}}\ndata: {name: iris, batch_size: 16}\n"
    )
    code, out, _ = gradwise_main(
        monkeypatch, capsys, "check", str(recipe), "--no-overfit", "--set", "optim.lr=20"
    )
    assert code == 1 and "no problems found" not in out
    assert (
        "GW305 learning-rate-too-high (error): the planned learning rate 20 is at or above" in out
    )


def test_check_exits_1_on_an_error_finding(tmp_path):
    (tmp_path / "user_models.py").write_text(SOFTMAX_MODEL)
    recipe = tmp_path / "softmax.yaml"
    recipe.write_text("model: {name: 'user_models:softmax_head'}\ndata: {name: iris}\n")
    result = gradwise_cli(
        "check", str(recipe), "--no-lr-range", cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)}
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "GW201" in result.stdout


def test_report_for_a_trained_run(tmp_path):
    recipe = tmp_path / "iris.yaml"
    recipe.write_text(
        "model: {name: mlp, kwargs: {hidden: [16]}}\ndata: {name: iris}\ntracking: {mlflow: false}\n"
    )
    assert (
        gradwise_cli(
            "train", str(recipe), "--set", "epochs=2", "--name", "r", "-q", cwd=tmp_path
        ).returncode
        == 0
    )
    result = gradwise_cli("report", "runs/r", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    html = (tmp_path / "runs" / "r" / "report.html").read_text()
    assert "<svg" in html and "healthy" in html.lower()
    missing = gradwise_cli("report", "runs/nope", cwd=tmp_path)
    assert missing.returncode == 2 and "run directory" in missing.stderr
