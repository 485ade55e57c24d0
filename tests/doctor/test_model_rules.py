"""Model rules GW201, GW204-GW206 and loss_kind: planted faults fire, healthy set-ups never do."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradwise.doctor.findings import RULES
from gradwise.doctor.rules import model as model_rules
from gradwise.doctor.rules.model import (
    activation_stds,
    batchnorm_tiny_batch,
    final_module,
    loss_kind,
    loss_task_mismatch,
    output_producer,
    poor_initialisation,
    probabilities_to_logits_loss,
    probe_forward,
)
from gradwise.nn import init_weights
from gradwise.tasks import Task


def test_rules_are_registered_with_documentation() -> None:
    for code, name, severity in [
        ("GW201", "probabilities-into-logits-loss", "error"),
        ("GW204", "poor-initialisation", "warning"),
        ("GW205", "loss-task-mismatch", "error"),
        ("GW206", "batchnorm-tiny-batch", "warning"),
    ]:
        r = RULES[code]
        assert (r.name, r.severity) == (name, severity)
        assert r.summary and "## Why it matters" in r.doc and "## How it is detected" in r.doc
        assert len(r.fixes) >= 2 and r.references
        assert r.check is getattr(model_rules, r.check.__name__)


# ---------------------------------------------------------------------------- loss_kind


@pytest.mark.parametrize(
    ("loss_fn", "kind"),
    [
        (nn.CrossEntropyLoss(), "cross_entropy"),
        (nn.CrossEntropyLoss(label_smoothing=0.1), "cross_entropy"),
        (nn.NLLLoss(), "nll"),
        (nn.BCEWithLogitsLoss(), "bce_logits"),
        (nn.BCELoss(), "bce"),
        (nn.MSELoss(), "mse"),
        (nn.L1Loss(), "l1"),
        (nn.HuberLoss(), "huber"),
        (nn.SmoothL1Loss(), "huber"),
        (F.cross_entropy, "cross_entropy"),
        (F.nll_loss, "nll"),
        (F.binary_cross_entropy_with_logits, "bce_logits"),
        (F.binary_cross_entropy, "bce"),
        (F.mse_loss, "mse"),
        (F.l1_loss, "l1"),
        (F.huber_loss, "huber"),
        (F.smooth_l1_loss, "huber"),
        (functools.partial(F.cross_entropy, ignore_index=-1), "cross_entropy"),
        (Task("multiclass", 3), "cross_entropy"),
        (Task("multiclass", 3).loss, "cross_entropy"),
        (Task("binary", 1), "bce_logits"),
        (Task("regression", 1, loss="mae"), "l1"),
        (Task("regression", 1, loss="huber").loss, "huber"),
        (Task("custom", 1, loss=F.mse_loss), "mse"),
        ("mse", "mse"),
        (lambda out, y: (out - y).abs().mean(), "other"),
        (nn.Linear(2, 2), "other"),
    ],
)
def test_loss_kind(loss_fn, kind) -> None:
    assert loss_kind(loss_fn) == kind


def test_loss_kind_subclass_and_task_fallback() -> None:
    class Weighted(nn.CrossEntropyLoss):
        pass

    assert loss_kind(Weighted()) == "cross_entropy"
    assert loss_kind(None, "multiclass") == "cross_entropy"
    assert loss_kind(None, "lm") == "cross_entropy"
    assert loss_kind(None, "binary") == "bce_logits"
    assert loss_kind(None, "multilabel") == "bce_logits"
    assert loss_kind(None, "regression") == "mse"
    assert loss_kind(None, "custom") == "other"
    assert loss_kind(None, None) == "other"
    assert loss_kind(None, Task("regression", 1, loss="mae")) == "l1"


# ---------------------------------------------------------------------------- GW201


def mlp(outputs: int = 4, seed: int = 0, head: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, outputs)]
    return nn.Sequential(*layers, *([head] if head is not None else []))


def test_softmax_head_into_cross_entropy() -> None:
    model = mlp(head=nn.Softmax(dim=1))
    out = model(torch.randn(16, 8))
    message, ev = probabilities_to_logits_loss(out, "cross_entropy", model)
    assert ev["final_softmax"] == 1.0
    assert ev["max_row_sum_deviation"] < 1e-5
    assert ev["min_output"] >= 0 and ev["max_output"] <= 1
    assert "CrossEntropyLoss" in message and "Softmax" in message
    # the outputs alone are evidence enough: rows sum to one
    assert probabilities_to_logits_loss(out, "cross_entropy") is not None
    assert probabilities_to_logits_loss(out, "nll", model) is not None  # softmax, not log_softmax


def test_logits_never_fire_even_when_small() -> None:
    for seed in range(20):
        for classes in (2, 3, 10):
            model = mlp(classes, seed)
            out = model(torch.randn(32, 8)) * (0.01 if seed % 2 else 1.0)
            assert probabilities_to_logits_loss(out, "cross_entropy", model) is None
            assert probabilities_to_logits_loss(out.softmax(1).log(), "nll", model) is None
    log_softmax = mlp(head=nn.LogSoftmax(dim=1))
    assert probabilities_to_logits_loss(log_softmax(torch.randn(8, 8)), "nll", log_softmax) is None


def test_sigmoid_head_into_bce_with_logits() -> None:
    model = mlp(1, head=nn.Sigmoid())
    out = model(torch.randn(8, 8))
    message, ev = probabilities_to_logits_loss(out, "bce_logits", model)
    assert ev["final_sigmoid"] == 1.0 and "BCEWithLogitsLoss" in message
    assert probabilities_to_logits_loss(out, "bce", model) is None  # BCELoss wants probabilities


def test_small_positive_logits_of_one_batch_are_not_enough() -> None:
    torch.manual_seed(0)
    out = 0.3 + 0.1 * torch.rand(16, 1)  # an untrained model's logits can look like this
    assert probabilities_to_logits_loss(out, "bce_logits", mlp(1)) is None
    # many outputs spread over [0, 1] without ever leaving it: squashed
    spread = torch.rand(512, 1)
    _, ev = probabilities_to_logits_loss(spread, "bce_logits")
    assert ev["span"] > 0.9 and ev["outputs"] == 512


def test_functional_sigmoid_seen_through_the_final_operation() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = mlp(1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.body(x)).squeeze(-1)

    net = Net()
    x = torch.randn(8, 8)
    out, op = probe_forward(net, x)
    assert op == "sigmoid" and out.shape == (8,)
    assert output_producer(mlp(), x) == "linear"
    assert probabilities_to_logits_loss(out, "bce_logits", net) is None  # no structural sign
    _, ev = probabilities_to_logits_loss(out, "bce_logits", net, final_op=op)
    assert ev["final_sigmoid"] == 1.0


def test_final_module() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.Softmax(dim=1)))
    assert isinstance(final_module(model), nn.Softmax)
    assert isinstance(final_module(nn.Linear(2, 2)), nn.Linear)


# ---------------------------------------------------------------------------- GW204


def deep_mlp(depth: int = 8, width: int = 64, init: str | None = "he") -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(16, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 3))
    model = nn.Sequential(*layers)
    return init_weights(model, init) if init else model


def cnn(bn: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    channels = 3
    for out in (16, 32, 32, 64, 64, 64):
        layers += [nn.Conv2d(channels, out, 3, padding=1)]
        layers += [nn.BatchNorm2d(out)] if bn else []
        layers += [nn.ReLU()]
        channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)]
    return nn.Sequential(*layers)


def reinit(model: nn.Module, std: float) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, std)
                m.bias.zero_()
    return model


def test_healthy_initialisations_do_not_fire() -> None:
    x = torch.randn(64, 16)
    assert poor_initialisation(activation_stds(deep_mlp(), x)) is None
    assert poor_initialisation(activation_stds(deep_mlp(init=None), x)) is None  # torch default
    images = torch.randn(16, 3, 8, 8)
    assert poor_initialisation(activation_stds(cnn(bn=True), images)) is None
    # a zero-initialised head (a common, deliberate choice) is not a collapse
    model = deep_mlp()
    nn.init.zeros_(model[-1].weight)
    stds = activation_stds(model, x)
    assert stds[-1][1] == 0.0
    assert poor_initialisation(stds) is None


def test_exploding_initialisation() -> None:
    stds = activation_stds(reinit(deep_mlp(), 1.0), torch.randn(64, 16))
    message, ev = poor_initialisation(stds)
    assert ev["max_ratio"] > 1e2 and ev["layers"] == 8
    assert ev["max_std"] / ev["first_std"] == pytest.approx(ev["max_ratio"])
    assert "explode" in message


def test_vanishing_initialisation() -> None:
    stds = activation_stds(reinit(deep_mlp(), 0.01), torch.randn(64, 16))
    message, ev = poor_initialisation(stds)
    assert ev["ratio"] < 1e-2 and ev["last_std"] < 1e-2 * ev["first_std"]
    assert 1 <= ev["collapse_layer"] < 8
    assert "vanish" in message


def test_zero_initialised_weights() -> None:
    stds = activation_stds(reinit(deep_mlp(), 0.0), torch.randn(64, 16))
    _, ev = poor_initialisation(stds)
    assert ev["ratio"] == 0.0
    assert poor_initialisation([("a", 0.5), ("b", 0.0), ("c", 0.0)])[1]["collapse_layer"] == 1
    assert poor_initialisation([("a", 1.0), ("b", math.inf)])[1]["nonfinite_layer"] == 1
    assert poor_initialisation([("only", 1.0)]) is None


def test_activation_stds_leave_the_model_as_it_was() -> None:
    model = cnn(bn=True)
    model[1].eval()  # a frozen BatchNorm stays frozen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    stds = activation_stds(model, torch.randn(8, 3, 8, 8) * 3 + 1)
    assert [n for n, _ in stds] == ["0", "3", "6", "9", "12", "15", "20"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    assert all(not m._forward_hooks for m in model.modules())


def test_activation_stds_count_repeated_calls() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(torch.relu(self.layer(x)))

    assert [n for n, _ in activation_stds(Twice(), torch.randn(5, 4))] == ["layer", "layer#2"]


# ---------------------------------------------------------------------------- GW205


def test_regression_loss_on_class_indices() -> None:
    labels = torch.randint(0, 5, (32,))
    message, ev = loss_task_mismatch("mse", labels, torch.randn(32, 5))
    assert ev["integer_targets"] == 1.0 and ev["distinct_targets"] == 5
    assert ev["outputs_per_sample"] == 5
    assert "integer class indices" in message
    # float class indices against C outputs: the loss broadcasts [B, C] against [B]
    _, ev = loss_task_mismatch("l1", labels.float(), torch.randn(32, 5))
    assert ev["integer_targets"] == 0.0
    assert loss_task_mismatch("mse", labels.float(), None, task="multiclass") is not None


def test_class_loss_on_continuous_targets() -> None:
    message, ev = loss_task_mismatch("cross_entropy", torch.randn(32), torch.randn(32, 3))
    assert ev["integer_targets"] == 0.0 and "regression targets" in message
    assert loss_task_mismatch("cross_entropy", torch.randint(0, 3, (32,)), task="regression")


def test_bce_on_multiclass_indices() -> None:
    message, ev = loss_task_mismatch("bce_logits", torch.arange(32) % 4, torch.randn(32, 1))
    assert ev["max_target"] == 3 and "multi-class" in message
    # 0/255 binary targets are out of range (GW105), not multi-class
    assert loss_task_mismatch("bce_logits", torch.tensor([0.0, 255.0] * 8), torch.randn(16)) is None


def test_matching_losses_do_not_fire() -> None:
    assert loss_task_mismatch("mse", torch.randn(32), torch.randn(32, 1)) is None
    assert loss_task_mismatch("mse", torch.randn(32, 3), torch.randn(32, 3)) is None
    assert loss_task_mismatch("mse", torch.randint(0, 9, (32,)), task="regression") is None
    assert (
        loss_task_mismatch("cross_entropy", torch.randint(0, 3, (32,)), torch.randn(32, 3)) is None
    )
    soft = torch.softmax(torch.randn(32, 3), 1)
    assert loss_task_mismatch("cross_entropy", soft, torch.randn(32, 3)) is None
    assert (
        loss_task_mismatch("cross_entropy", torch.randint(0, 50, (4, 16)), torch.randn(4, 16, 50))
        is None
    )
    assert (
        loss_task_mismatch("bce_logits", torch.randint(0, 2, (32, 1)).float(), torch.randn(32, 1))
        is None
    )
    assert loss_task_mismatch("other", torch.randn(32)) is None


# ---------------------------------------------------------------------------- GW206


def test_batchnorm_tiny_batch() -> None:
    model = cnn(bn=True)
    message, ev = batchnorm_tiny_batch(model, 4)
    assert ev["batch_size"] == 4 and ev["batchnorm_layers"] == 6 and ev["threshold"] == 8
    assert "GroupNorm" in message
    assert batchnorm_tiny_batch(model, 8) is None
    assert batchnorm_tiny_batch(cnn(bn=False), 2) is None
    model.eval()  # training will switch them on
    assert batchnorm_tiny_batch(model, 2)[1]["batchnorm_layers"] == 6
    model.train()
    for m in model.modules():  # frozen BatchNorm (fine-tuning) is fine
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    assert batchnorm_tiny_batch(model, 2) is None
