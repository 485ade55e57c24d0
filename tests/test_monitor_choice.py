"""The metric that matters: the advisor monitors PR-AUC or macro F1 on imbalanced classes, with the
doctor's GW103 threshold and verdict, and GW103's advice names the same metric."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import QUIET, mlp
from sklearn.datasets import make_classification
from sklearn.metrics import average_precision_score, f1_score
from sklearn.model_selection import train_test_split

import gradwise as gw
from gradwise.doctor.rules.data import THRESHOLDS, class_imbalance
from gradwise.tasks import Task, imbalanced_monitor


def _model(outputs: int = 1) -> torch.nn.Module:
    return mlp(inputs=12, outputs=outputs)


@pytest.fixture(scope="module")
def imbalanced_run(tmp_path_factory):
    """~66:1 binary data, a tiny MLP, 5 epochs, as a user would: gw.advise, then gw.Trainer."""
    x, y = make_classification(
        n_samples=2400, n_features=12, n_informative=6, weights=[0.985], flip_y=0,
        class_sep=1.2, random_state=0,
    )  # fmt: skip
    x, y = x.astype(np.float32), y.astype(np.float32)
    xt, xv, yt, yv = train_test_split(x, y, test_size=0.3, stratify=y, random_state=0)
    advised = gw.advise(_model(), (xt, yt), task="binary", budget=5)
    root = tmp_path_factory.mktemp("runs")
    run = gw.Trainer(
        _model(), (xt, yt), (xv, yv), recipe=advised.recipe, root=str(root), **QUIET
    ).fit()
    return advised, run, (xt, yt, xv, yv)


def test_imbalanced_binary_monitors_pr_auc_with_gw103s_numbers(imbalanced_run):
    advised, run, (_, yt, _, _) = imbalanced_run
    major, minor = int((yt == 0).sum()), int((yt == 1).sum())
    assert major / minor > 60  # the data really is ~66:1
    [advice] = [a for a in advised.advice if a.setting == "early_stopping.monitor"]
    assert advice.value == "pr_auc" == advised.recipe.early_stopping.monitor
    assert run.monitor == "val_pr_auc"
    # the reason quotes what the rule measured and the threshold it compared with
    assert f"{major / minor:.3g}:1" in advice.why and f"{major:,} vs {minor:,}" in advice.why
    assert f"{THRESHOLDS.imbalance_ratio:g}:1" in advice.why
    assert f"{major / (major + minor):.1%} accuracy" in advice.why
    assert any("Saito" in ref for ref in advice.references)


def test_imbalanced_best_checkpoint_finds_the_rare_class(imbalanced_run):
    _, run, (_, _, xv, yv) = imbalanced_run
    model = _model()
    gw.load_checkpoint(run.best_checkpoint, model)
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(xv)).squeeze(-1)
    predicted = (logits > 0).numpy()
    assert f1_score(yv, predicted) > 0  # what accuracy as the monitor fails to give
    # the monitored value is the best checkpoint's average precision (binned: 200 thresholds)
    scores = torch.sigmoid(logits).numpy()
    assert run.best_metric == pytest.approx(average_precision_score(yv, scores), abs=0.03)
    history = [
        json.loads(line)
        for line in (run.dir / "metrics.jsonl").read_text().splitlines()
        if '"val"' in line
    ]
    assert run.best_metric == max(h["val_pr_auc"] for h in history)


def _monitor_advice(x: torch.Tensor, y: torch.Tensor, outputs: int, task: str) -> gw.advisor.Advice:
    advised = gw.advise(mlp(inputs=x.shape[1], outputs=outputs), (x, y), task=task, budget=5)
    [advice] = [a for a in advised.advice if a.setting == "early_stopping.monitor"]
    return advice


CASES = {  # class counts -> (task, outputs); the doctor and the advisor must agree on each
    "balanced 3 classes": ([100, 100, 100], "multiclass", 3),
    "9:1, below the threshold": ([450, 50], "binary", 1),
    "12:1 on few samples: not confident": ([24, 2], "binary", 1),
    "66:1 binary": ([660, 10], "binary", 1),
    "30:1 among 3 classes": ([300, 300, 10], "multiclass", 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_doctor_and_the_advisor_agree(case):
    counts, task, outputs = CASES[case]
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    y = y.float() if task == "binary" else y
    x = torch.randn(len(y), 4, generator=torch.Generator().manual_seed(0))
    advice = _monitor_advice(x, y, outputs, task)
    finding = class_imbalance(y)
    if finding is None:
        assert advice.value == "auto" and "below" in advice.why
        return
    metric, name, _ = imbalanced_monitor(len(counts))
    assert advice.value == metric and name in advice.why
    message, evidence = finding
    assert f"early_stopping.monitor: {metric}" in message and name in message
    assert f"{evidence['imbalance_ratio']:.3g}:1" in advice.why
    assert f"{evidence['threshold']:g}:1" in advice.why
    weighted, _ = class_imbalance(y, weighted=True)
    assert f"early_stopping.monitor: {metric}" in weighted


def test_balanced_classification_keeps_accuracy(blobs):
    x, y = blobs
    advice = _monitor_advice(x, y, 3, "multiclass")
    assert advice.value == "auto"
    assert "1:1 apart" in advice.why and f"{THRESHOLDS.imbalance_ratio:g}:1" in advice.why
    assert "val_accuracy" in advice.why


def test_multilabel_keeps_macro_f1():
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(200, 3, generator=g) < torch.tensor([0.5, 0.3, 0.05])).float()
    advice = _monitor_advice(torch.randn(200, 4, generator=g), y, 3, "multilabel")
    assert advice.value == "auto" and "macro F1" in advice.why


@pytest.mark.parametrize("kind,outputs", [("binary", 1), ("multiclass", 3), ("multilabel", 3)])
def test_pr_auc_is_scikit_learns_average_precision(kind, outputs):
    g = torch.Generator().manual_seed(1)
    n = 400
    logits = torch.randn(n, outputs, generator=g) * 2
    if kind == "multiclass":
        y = torch.randint(0, outputs, (n,), generator=g)
        logits[torch.arange(n), y] += 1.5
        scores, truth = torch.softmax(logits, -1), np.eye(outputs)[y]
    else:
        y = (torch.rand(n, outputs, generator=g) < 0.2).float()
        logits += 2 * y
        if kind == "binary":
            logits, y = logits[:, 0], y[:, 0]
        scores, truth = torch.sigmoid(logits), y.numpy()
    metrics = Task(kind, outputs).metrics(torch.device("cpu"))
    for i in range(0, n, 64):  # batch by batch, as in validation
        metrics.update(logits[i : i + 64], y[i : i + 64])
    expected = average_precision_score(truth, scores.numpy(), average="macro")
    # binned at AUROC_BINS thresholds (constant memory): within 0.02 of the exact value
    assert metrics.compute()["val_pr_auc"] == pytest.approx(expected, abs=0.02)
