"""gradwise.metrics against torchmetrics (the metrics it replaces), batch by batch on random
predictions for every task, the binned AUROC and average precision at the same thresholds; and a
Trainer that never imports torchmetrics (nor transformers) for its own metrics."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gradwise.data.bundle import IGNORE_INDEX
from gradwise.metrics import AUROC_BINS
from gradwise.tasks import Task

tm = pytest.importorskip("torchmetrics")
from torchmetrics import classification, regression  # noqa: E402

N, BATCH = 300, 64


def _data(kind: str, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits that carry some signal, and targets, for ``kind`` with ``k`` outputs."""
    if kind == "binary":
        y = torch.randint(0, 2, (N,), generator=g)
        return torch.randn(N, 1, generator=g) * 2 + y[:, None], y
    if kind == "multiclass":
        y = torch.randint(0, k, (N,), generator=g)
        out = torch.randn(N, k, generator=g) * 2
        out[torch.arange(N), y] += 1.0
        return out, y
    if kind == "multilabel":
        y = (torch.rand(N, k, generator=g) < torch.linspace(0.1, 0.6, k)).long()
        return torch.randn(N, k, generator=g) * 2 + 1.5 * y, y
    if kind == "regression":
        y = torch.randn(N, k, generator=g) * 3 + 1
        return y + torch.randn(N, k, generator=g), y
    y = torch.randint(0, k, (N // 10, 12), generator=g)  # lm: [batch, time], some ignored
    y[torch.rand(y.shape, generator=g) < 0.2] = IGNORE_INDEX
    return torch.randn(N // 10, 12, k, generator=g) * 2, y


def _reference(kind: str, k: int) -> dict:
    """torchmetrics as gradwise configured it before gradwise.metrics."""
    bins = {"thresholds": AUROC_BINS, "validate_args": False}
    if kind == "binary":
        return {
            "accuracy": classification.BinaryAccuracy(),
            "f1": classification.BinaryF1Score(),
            "auroc": classification.BinaryAUROC(**bins),
            "pr_auc": classification.BinaryAveragePrecision(**bins),
        }
    if kind == "multiclass":
        return {
            "accuracy": classification.MulticlassAccuracy(k, average="micro"),
            "f1": classification.MulticlassF1Score(k, average="macro"),
            "auroc": classification.MulticlassAUROC(k, **bins),
            "pr_auc": classification.MulticlassAveragePrecision(k, average="macro", **bins),
        }
    if kind == "multilabel":
        return {
            "accuracy": classification.MultilabelAccuracy(k),
            "f1": classification.MultilabelF1Score(k, average="macro"),
            "auroc": classification.MultilabelAUROC(k, **bins),
            "pr_auc": classification.MultilabelAveragePrecision(k, average="macro", **bins),
        }
    if kind == "regression":
        return {
            "mse": regression.MeanSquaredError(),
            "mae": regression.MeanAbsoluteError(),
            "r2": regression.R2Score(),
        }
    from torchmetrics.text import Perplexity

    return {"perplexity": Perplexity(ignore_index=IGNORE_INDEX)}


def _reference_inputs(kind: str, out: torch.Tensor, y: torch.Tensor):
    if kind == "binary":
        return torch.sigmoid(out[:, 0]), y
    if kind == "multiclass":
        return torch.softmax(out, -1), y
    if kind == "multilabel":
        return torch.sigmoid(out), y
    return out, y


CASES = [("binary", 1), ("multiclass", 5), ("multilabel", 4), ("regression", 1), ("regression", 3)]
CASES += [("lm", 11)]


@pytest.mark.parametrize("kind,k", CASES)
def test_values_equal_torchmetrics(kind, k):
    g = torch.Generator().manual_seed(len(kind) * 7 + k)
    out, y = _data(kind, k, g)
    if kind == "regression" and k == 1:
        out, y = out[:, 0], y[:, 0]  # one output: targets [N]
    ours = Task(kind, k).metrics(torch.device("cpu"))
    reference = _reference(kind, k)
    for i in range(0, len(y), BATCH):  # batch by batch, as in validation
        ours.update(out[i : i + BATCH], y[i : i + BATCH])
        batch = _reference_inputs(kind, out[i : i + BATCH], y[i : i + BATCH])
        for metric in reference.values():
            metric.update(*batch)
    got = ours.compute()
    assert set(got) == {"val_loss", *(f"val_{name}" for name in reference)}
    for name, metric in reference.items():
        assert got[f"val_{name}"] == pytest.approx(float(metric.compute()), rel=1e-5, abs=1e-6)


def test_classes_never_seen_are_left_out_of_macro_f1_and_auroc_agrees():
    """Class 3 of 4 is neither a target nor predicted: torchmetrics' macro F1 leaves it out."""
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 3, (100,), generator=g)
    out = torch.randn(100, 4, generator=g)
    out[:, 3] = -10
    ours = Task("multiclass", 4).metrics(torch.device("cpu"))
    ours.update(out, y)
    probs = torch.softmax(out, -1)
    reference = _reference("multiclass", 4)
    for name, metric in reference.items():
        assert ours.compute()[f"val_{name}"] == pytest.approx(float(metric(probs, y)), abs=1e-6)


def test_binary_two_logits_and_states_reset():
    g = torch.Generator().manual_seed(4)
    out, y = torch.randn(50, 2, generator=g), torch.randint(0, 2, (50,), generator=g)
    ours = Task("binary", 2).metrics(torch.device("cpu"))
    ours.update(torch.randn(50, 2), 1 - y)  # forgotten by the reset
    ours.reset()
    ours.update(out, y)
    p1 = torch.softmax(out, -1)[:, 1]  # two logits: sigmoid(z1 - z0) is softmax's p1
    auroc = classification.BinaryAUROC(thresholds=AUROC_BINS)(p1, y)
    assert ours.compute()["val_auroc"] == pytest.approx(float(auroc), abs=1e-6)


def test_a_trainer_imports_neither_torchmetrics_nor_transformers():
    code = (
        "import sys, torch, gradwise as gw\n"
        "x = torch.randn(64, 4); y = (x[:, 0] > 0).long()\n"
        "run = gw.Trainer(torch.nn.Linear(4, 2), (x[:48], y[:48]), (x[48:], y[48:]), epochs=1,"
        " progress='off', mlflow=False, tensorboard=False).fit()\n"
        "assert 'val_auroc' in run.history[-1], run.history\n"
        "print(sorted(m for m in ('torchmetrics', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["[]"]


def test_your_own_torchmetrics_metric_still_streams():
    from gradwise.tasks import Metrics

    metric = classification.MulticlassAccuracy(3, average="macro")
    metrics = Metrics(Task("multiclass", 3), torch.device("cpu"), {"balanced": metric})
    g = torch.Generator().manual_seed(5)
    out, y = torch.randn(40, 3, generator=g), torch.randint(0, 3, (40,), generator=g)
    metrics.update(out, y)
    expected = classification.MulticlassAccuracy(3, average="macro")(out, y)
    assert metrics.compute()["val_balanced"] == pytest.approx(float(expected))
