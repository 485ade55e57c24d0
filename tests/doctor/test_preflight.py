"""Preflight check(): healthy set-ups pass clean, planted faults are found, nothing is mutated."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from gradwise.doctor.preflight import CheckReport, OverfitResult, check, overfit_one_batch
from gradwise.errors import ConfigError, DataError


def blobs(n: int = 240, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable 3-class problem with standardised features."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 8, generator=g) * 3
    y = torch.arange(n) % 3
    x = centers[y] + torch.randn(n, 8, generator=g)
    return (x - x.mean(0)) / x.std(0), y


def mlp(outputs: int = 3, head: nn.Module | None = None, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(8, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, outputs)]
    return nn.Sequential(*layers, *([head] if head is not None else []))


def images(n: int = 96, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes of 1x8x8 images: bright left half vs bright right half, in [0, scale]."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.3
    x[y == 0, :, :, :4] += 0.7
    x[y == 1, :, :, 4:] += 0.7
    return (x * scale).round() if scale > 1 else x, y


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )


# ---------------------------------------------------------------------------- healthy


def test_healthy_mlp_passes_clean(tmp_path: Path) -> None:
    x, y = blobs()
    report = check(mlp(), (x[:200], y[:200]), (x[200:], y[200:]), plot=tmp_path / "lr.png")
    assert isinstance(report, CheckReport)
    assert report.findings == [] and report.ok
    assert report.overfit.passed and report.overfit.final_loss <= report.overfit.target
    assert report.overfit.final_loss < 0.1 * report.overfit.initial_loss
    assert 1e-4 < report.lr_range.suggestion < 1.0
    assert (tmp_path / "lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = str(report)
    assert "no problems found" in text and "overfit one batch of 32: passed" in text


def test_healthy_cnn_with_batchnorm_and_regression_pass_clean() -> None:
    x, y = images()
    report = check(small_cnn(), (x, y), task="multiclass", batch_size=16, lr_range=False)
    assert report.findings == [] and report.overfit.passed
    g = torch.Generator().manual_seed(1)
    features = torch.randn(200, 5, generator=g)
    target = features @ torch.randn(5, generator=g) + 0.1 * torch.randn(200, generator=g)
    torch.manual_seed(0)
    reg = nn.Sequential(nn.Linear(5, 32), nn.ReLU(), nn.Linear(32, 1))
    report = check(reg, (features, target), task="regression", lr_range=False)
    assert report.findings == [] and report.overfit.passed


def test_healthy_token_model_passes_clean() -> None:
    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Embedding(20, 32)
            self.head = nn.Linear(32, 20)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.embed(tokens)))

    successor = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    text = torch.zeros(8000, dtype=torch.int64)
    for i in range(1, 8000):  # each token determines the next: learnable by a bigram model
        text[i] = successor[text[i - 1]] if i % 97 else (text[i - 1] + 3) % 20
    windows = text.unfold(0, 257, 256)
    report = check(TinyLM(), (windows[:, :-1], windows[:, 1:]), task="lm", lr_range=False)
    assert report.findings == [] and report.overfit.passed
    assert report.overfit.batch_size == 4  # at most 1024 target tokens in the overfit batch


# ---------------------------------------------------------------------------- planted faults


def test_shuffled_labels_cannot_be_overfitted() -> None:
    x, y = blobs()
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    report = check(mlp(), (x, shuffled), lr_range=False)
    assert report.codes == ["GW402"]
    finding = report.findings[0]
    assert finding.severity == "error" and finding.step == 0
    assert finding.evidence["final_loss"] > finding.evidence["target_loss"]
    assert finding.evidence["steps"] == 200 and finding.evidence["batch_size"] == 32
    assert "labels aligned" in finding.message
    assert not report.overfit.passed and not report.ok


def test_raw_pixels() -> None:
    x, y = images(scale=255)
    report = check(
        small_cnn(), (x, y), task="multiclass", batch_size=16, overfit=False, lr_range=False
    )
    assert report.codes == ["GW102"]
    assert report.findings[0].evidence["max"] == 255


def test_validation_copy_of_training_data() -> None:
    x, y = blobs()
    report = check(mlp(), (x, y), (x.clone(), y.clone()), overfit=False, lr_range=False)
    assert report.codes == ["GW104"]
    assert report.findings[0].evidence["leaked_fraction"] == 1.0


def test_softmax_head_with_cross_entropy() -> None:
    x, y = blobs()
    report = check(
        mlp(head=nn.Softmax(dim=1)), (x, y), loss_fn=nn.CrossEntropyLoss(), lr_range=False
    )
    assert "GW201" in report.codes
    assert report.findings[0].code == "GW201"  # errors first
    assert report.findings[0].evidence["final_softmax"] == 1.0


def test_functional_sigmoid_with_bce_with_logits() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = mlp(1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.body(x)).squeeze(-1)

    x, y = blobs()
    binary = (y == 0).float()
    report = check(
        Net(), (x, binary), loss_fn=nn.BCEWithLogitsLoss(), overfit=False, lr_range=False
    )
    assert report.codes == ["GW201"]
    assert report.findings[0].evidence["final_sigmoid"] == 1.0


def test_labels_out_of_range_are_explained_not_crashing() -> None:
    x, y = blobs()
    report = check(mlp(outputs=3), (x, y + 1), loss_fn=nn.CrossEntropyLoss())
    assert report.codes == ["GW105"]  # the crashing overfit test is not reported separately
    assert report.findings[0].evidence["max_target"] == 3
    assert report.overfit.error.startswith("the training step raised an error")
    assert report.lr_range is None


def test_mse_on_class_labels() -> None:
    x, y = blobs()
    report = check(mlp(outputs=3), (x, y), loss_fn=nn.MSELoss(), overfit=False, lr_range=False)
    assert "GW205" in report.codes


def test_class_imbalance_on_the_whole_data() -> None:
    x, y = blobs(n=600)
    y = (torch.arange(600) % 20 == 0).long()  # 30 positives, 570 negatives
    report = check(mlp(outputs=1), (x, y), overfit=False, lr_range=False)
    assert report.codes == ["GW103"]
    assert report.findings[0].evidence["minority_count"] == 30


def test_class_imbalance_with_a_class_weighted_loss() -> None:
    from gradwise.tasks import Task

    x, _ = blobs(n=600)
    y = (torch.arange(600) % 20 == 0).long()
    weighted = Task("binary", 1, class_weights=torch.tensor([1.0, 19.0]))
    report = check(mlp(outputs=1), (x, y), loss_fn=weighted, overfit=False, lr_range=False)
    assert report.codes == ["GW103"]  # still imbalanced, but the advice changes
    assert "already class-weighted" in report.findings[0].message
    assert report.findings[0].fixes[0].startswith("Pick the checkpoint")


def regression(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy linear targets: the loss has a floor, so a range test's loss turns and diverges."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 8, generator=g)
    return x, x @ torch.randn(8, generator=g) / 3 + 0.3 * torch.randn(200, generator=g)


def test_planned_lr_above_the_range_tests_divergence() -> None:
    x, y = regression()
    model = mlp(outputs=1)
    report = check(
        model,
        (x, y),
        task="regression",
        optimizer=torch.optim.SGD(model.parameters(), lr=3.0),
        overfit=False,
    )
    assert report.codes == ["GW305"] and not report.ok
    finding = report.findings[0]
    assert finding.severity == "error" and finding.evidence["planned_lr"] == 3.0
    assert finding.evidence["diverged_at_lr"] == report.lr_range.diverged_at < 3.0
    assert (
        "range test" in finding.message and f"{report.lr_range.diverged_at:.3g}" in finding.message
    )
    text = str(report)
    assert "no problems found" not in text and text.startswith("gradwise check: 1 error")
    # ignored, the report still does not call it clean
    ignored = check(model, (x, y), task="regression", lr=3.0, overfit=False, ignore=["GW305"])
    assert ignored.findings == [] and "no problems found" not in str(ignored)
    assert "training will diverge" in str(ignored)


def test_planned_lr_far_from_the_suggestion_and_a_sane_one() -> None:
    x, y = regression()
    model = mlp(outputs=1)
    high = check(model, (x, y), task="regression", lr=1.0, overfit=False)  # below divergence
    assert high.codes == ["GW305"] and high.findings[0].severity == "warning"
    assert high.findings[0].evidence["planned_to_suggested"] > 10
    low = check(model, (x, y), task="regression", lr=1e-6, overfit=False)
    assert low.codes == ["GW306"] and low.findings[0].severity == "info" and low.ok
    assert str(low).startswith("gradwise check: 0 errors, 0 warnings, 1 info")
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sane = check(model, (x, y), task="regression", optimizer=adamw, overfit=False)
    assert sane.findings == [] and sane.lr_comparison.verdict == "ok"
    text = str(sane)
    assert "no problems found" in text
    assert "planned lr 0.001 is within the range test's stable range" in text
    with pytest.raises(ValueError, match=r"lr must be a positive finite learning rate.*got -1"):
        check(model, (x, y), task="regression", lr=-1, overfit=False)


def test_planned_lr_is_the_peak_of_a_scheduled_optimizer() -> None:
    x, y = regression()
    model = mlp(outputs=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=3.0)
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: step / 100)  # warmup: lr 0 now
    report = check(model, (x, y), task="regression", optimizer=optimizer, overfit=False)
    assert report.codes == ["GW305"] and report.findings[0].evidence["planned_lr"] == 3.0


def test_batchnorm_with_tiny_batches_and_optimizer_missing_parameters() -> None:
    x, y = images()
    model = small_cnn()
    head = model[-1]
    optimizer = torch.optim.AdamW(
        [p for name, p in model.named_parameters() if not name.startswith("8.")]
    )
    report = check(
        model,
        (x, y),
        task="multiclass",
        optimizer=optimizer,
        batch_size=4,
        overfit=False,
        lr_range=False,
    )
    assert set(report.codes) == {"GW206", "GW207"}
    gw207 = next(f for f in report.findings if f.code == "GW207")
    assert gw207.evidence["not_in_optimizer"] == 2
    assert gw207.evidence["values_not_in_optimizer"] == head.weight.numel() + head.bias.numel()
    assert "8.weight" in gw207.message


def test_ignore() -> None:
    x, y = blobs()
    report = check(mlp(), (x, y), (x, y), ignore=["GW104"], overfit=False, lr_range=False)
    assert report.findings == []
    with pytest.raises(ConfigError):
        check(mlp(), (x, y), ignore=["GW999"], overfit=False, lr_range=False)


# ---------------------------------------------------------------------------- inputs and outputs


class Pairs(Dataset):
    """A plain map-style Dataset (no .tensors): samples are loaded one by one."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def test_dataloader_and_dataset_inputs() -> None:
    x, y = blobs()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    report = check(mlp(), loader, Pairs(x[:10], y[:10]), batch_size=None, lr_range=False)
    assert report.overfit.batch_size == 16
    assert report.codes == ["GW104"]  # the validation samples are training samples
    report = check(mlp(), Pairs(x, y), overfit=False, lr_range=False)
    assert report.findings == []


def test_model_that_cannot_take_the_data() -> None:
    x, y = blobs()
    with pytest.raises(DataError, match="cannot take the data"):
        check(nn.Linear(5, 3), (x, y), overfit=False, lr_range=False)
    binary = (y == 0).long()
    with pytest.raises(DataError, match="outputs do not match"):  # as the Trainer's probe
        check(mlp(outputs=3), (x, binary), overfit=False, lr_range=False)
    check(mlp(outputs=2), (x, binary), overfit=False, lr_range=False)  # two binary logits are fine


def test_report_text_lists_findings_with_their_first_fix() -> None:
    x, y = blobs()
    text = str(check(mlp(), (x, y), (x, y), overfit=False, lr_range=False))
    assert text.startswith("gradwise check: 1 error, 0 warnings")
    assert "GW104 train-val-leakage (error)" in text and "fix: " in text


def test_overfit_one_batch_detects_a_cut_graph() -> None:
    class Detached(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x).detach()

    x, y = blobs()
    result = overfit_one_batch(Detached(), x[:32], y[:32], nn.functional.cross_entropy)
    assert isinstance(result, OverfitResult)
    assert not result.passed and "graph is cut" in result.error


# ---------------------------------------------------------------------------- nothing is mutated


def test_check_mutates_nothing() -> None:
    x, y = blobs()
    model = nn.Sequential(
        nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3)
    )
    model[0].bias.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    nn.functional.cross_entropy(model(x[:16]), y[:16]).backward()  # give the optimizer state
    optimizer.step()
    model.eval()
    seen: list[int] = []
    model.register_forward_hook(lambda *args: seen.append(1))

    weights = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    requires = [p.requires_grad for p in model.parameters()]
    opt_state = copy.deepcopy(optimizer.state_dict())
    rng = torch.get_rng_state()

    report = check(model, (x, y), (x[:50] + 1, y[:50]), optimizer=optimizer)
    assert report.overfit is not None and report.lr_range is not None

    after = model.state_dict()
    assert weights.keys() == after.keys()
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == requires
    for before, p in zip(grads, model.parameters(), strict=True):
        assert (before is None and p.grad is None) or torch.equal(before, p.grad)
    state = optimizer.state_dict()
    assert state["param_groups"] == opt_state["param_groups"]
    for key, values in opt_state["state"].items():
        for name, value in values.items():
            assert torch.equal(torch.as_tensor(state["state"][key][name]), torch.as_tensor(value))
    assert torch.equal(torch.get_rng_state(), rng)
    assert seen == []  # the user's hooks never saw the copies' forward passes
    assert math.isfinite(report.lr_range.suggestion)


class _TimeFirstLSTM(nn.Module):
    """An LSTM without batch_first fed (batch, time, features): it runs along the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.LSTM(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class _FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(24, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.b(nn.functional.dropout(torch.relu(self.a(x.flatten(1))), 0.5))


def _frozen_by_attribute() -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 3))
    model[1].requires_grad = False  # freezes nothing
    return model


@pytest.mark.parametrize(
    ("make", "task", "code"),
    [
        (_TimeFirstLSTM, "multiclass", "GW211"),
        (_FunctionalDropout, "multiclass", "GW213"),
        (_frozen_by_attribute, "multiclass", "GW214"),
        (lambda: nn.Sequential(nn.Flatten(), nn.Linear(24, 1)), "regression", "GW215"),
    ],
)
def test_check_runs_the_structural_probes(make, task, code):
    torch.manual_seed(0)
    x = torch.randn(64, 6, 4)
    y = torch.randint(0, 3, (64,)) if task == "multiclass" else torch.randn(64)
    loss_fn = nn.MSELoss() if task == "regression" else None
    report = check(make(), (x, y), task=task, loss_fn=loss_fn, overfit=False, lr_range=False)
    assert code in [f.code for f in report.findings], report
    healthy = nn.Sequential(nn.Flatten(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 3))
    clean = check(healthy, (x, torch.randint(0, 3, (64,))), overfit=False, lr_range=False)
    assert not {"GW211", "GW213", "GW214", "GW215"} & {f.code for f in clean.findings}
