"""Rules dispatched from the registry, guarded; the loss read from its graph; causes before symptoms."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradwise.doctor import Doctor
from gradwise.doctor.dispatch import FIELDS
from gradwise.doctor.findings import RULES, Finding, rule, sort_findings
from gradwise.doctor.graph import kind_from_value, read_graph
from gradwise.doctor.rules.data import imbalance_fixes
from gradwise.doctor.rules.generalisation import labels_independent, overfitting
from gradwise.doctor.signals import Signals
from gradwise.errors import GradwiseWarning


def _loop(model: nn.Module, steps: int, **doctor_kwargs) -> Doctor:
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    doctor = Doctor(model, opt, on_finding=None, **doctor_kwargs)
    for i in range(steps):
        xb, yb = x[i % 4 * 16 :][:16], y[i % 4 * 16 :][:16]
        opt.zero_grad()
        out = model(xb)
        loss = F.cross_entropy(out, yb)
        loss.backward()
        doctor.step(loss, inputs=xb, outputs=out, targets=yb)
        opt.step()
    return doctor


def test_a_rule_that_raises_is_switched_off_and_reported_once_as_info():
    calls = []

    @rule("GW999", "always-raises", "warning", "live", fixes=["none"])
    def always_raises(signals: Signals):
        """A rule whose check fails."""
        calls.append(signals.step)
        raise ZeroDivisionError("planted")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", GradwiseWarning)
            doctor = _loop(nn.Linear(8, 3), steps=7, sample_every=2)
    finally:
        del RULES["GW999"]
    assert calls == [0]  # off after its first failure, the loop went on
    [finding] = [f for f in doctor.findings if f.code == "GW999"]
    assert finding.severity == "info" and "ZeroDivisionError: planted" in finding.message
    assert doctor.signals.step == 7


def test_every_dispatched_rule_reads_known_fields():
    for r in RULES.values():
        if r.when != "manual":
            unknown = set(r.reads) - set(FIELDS) - {"s"}
            assert not unknown, (r.code, unknown)
    assert RULES["GW101"].needs == ()  # typed `X | None`: it judges what it gets
    assert RULES["GW217"].needs == ("loss_graph", "model", "optimizer")


@pytest.mark.parametrize(
    ("make", "kind", "fed"),
    [
        (lambda o, y: F.cross_entropy(o, y), "cross_entropy", "log_softmax"),
        (lambda o, y: nn.CrossEntropyLoss()(torch.softmax(o, 1), y), "cross_entropy", "softmax"),
        (lambda o, y: F.nll_loss(torch.softmax(o, 1), y), "nll", "softmax"),
        (lambda o, y: F.mse_loss(o[:, 0], y.float()), "mse", None),
        (
            lambda o, y: F.binary_cross_entropy_with_logits(o.sigmoid(), o.detach()),
            "bce_logits",
            "sigmoid",
        ),
        (lambda o, y: F.smooth_l1_loss(o[:, 0], y.float()), "huber", None),
        (lambda o, y: (o[:, 0] - y).abs().mean(), "l1", None),
    ],
)
def test_the_loss_graph_names_the_loss_and_what_fed_it(make, kind, fed):
    model = nn.Linear(4, 3)
    graph = read_graph(make(model(torch.randn(8, 4)), torch.randint(0, 3, (8,))))
    assert (graph.kind, graph.input_op) == (kind, fed)
    assert {id(t) for t in graph.leaves} == {id(p) for p in model.parameters()}


def test_a_float_loss_is_matched_against_the_standard_losses():
    out, y = torch.randn(16, 5), torch.randint(0, 5, (16,))
    assert kind_from_value(float(F.cross_entropy(out, y)), out, y) == "cross_entropy"
    assert kind_from_value(float(F.cross_entropy(out, y)) + 0.1, out, y) is None
    reg = torch.randn(16)
    assert kind_from_value(float(F.mse_loss(out[:, 0], reg)), out[:, 0], reg) == "mse"


def test_softmax_into_cross_entropy_is_found_without_loss_fn():
    model = nn.Sequential(nn.Linear(8, 3), nn.Softmax(dim=1))
    doctor = _loop(model, steps=3)  # the loop's loss is F.cross_entropy; the Doctor is not told
    assert doctor.signals.loss_kind == "cross_entropy"
    assert "GW201" in [f.code for f in doctor.findings]


def test_findings_lead_with_their_cause():
    cause = Finding("GW304", "dying-relu", "warning", 4, "dead")
    symptom = Finding("GW303", "vanishing-gradients", "error", 2, "small", explained_by="GW304")
    other = Finding("GW101", "nonfinite-data", "error", 9, "nan")
    assert [f.code for f in sort_findings([symptom, other, cause])] == ["GW101", "GW304", "GW303"]
    assert "a consequence of GW304" in str(symptom)


def _signals(val: list[float], train: list[float], **kwargs) -> Signals:
    s = Signals(**kwargs)
    s.val = [
        {"step": i, "loss": v, "metric": None, "train_loss": t}
        for i, (v, t) in enumerate(zip(val, train, strict=True))
    ]
    return s


def test_overfitting_needs_a_gap_and_a_rise_beyond_noise():
    # a healthy regression: validation as low as training, wobbling up by its usual noise
    noisy = _signals(
        [0.52, 0.50, 0.53, 0.51, 0.52, 0.53, 0.54], [0.53, 0.52, 0.52, 0.52, 0.52, 0.52, 0.52]
    )
    assert overfitting(noisy) is None
    memorising = _signals(
        [0.9, 0.6, 0.5, 0.49, 0.56, 0.65, 0.8], [0.9, 0.6, 0.45, 0.3, 0.2, 0.1, 0.05]
    )
    assert overfitting(memorising) is not None


def test_validation_at_chance_from_the_start_is_not_overfitting():
    chance = 2.302  # ln 10
    s = _signals([2.31, 2.35, 2.5], [2.0, 1.2, 0.6], loss_kind="cross_entropy", num_classes=10)
    message, evidence = labels_independent(s)
    assert evidence["chance_loss"] == pytest.approx(chance, abs=1e-3) and "paired" in message
    learning = _signals([2.0, 1.5, 1.6], [2.0, 1.2, 0.6], loss_kind="cross_entropy", num_classes=10)
    assert labels_independent(learning) is None


def test_a_spike_that_clipping_contains_is_not_exploding_gradients():
    from gradwise.doctor.rules.dynamics import exploding_gradients

    def signals(clip: float | None) -> Signals:
        s = Signals(grad_clip=clip)
        for step, norm in enumerate([1.0] * 30 + [40.0]):
            s.grad_norm.append(step, norm)
            s.loss.append(step, 0.5)
        s.new_values = 31
        return s

    assert exploding_gradients(signals(None)) is not None
    assert exploding_gradients(signals(1.0)) is None


def test_update_ratios_span_an_optimizer_step_under_accumulation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    doctor = Doctor(model, opt, on_finding=None, sample_every=4, accumulation_steps=4)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    for step in range(24):
        loss = F.cross_entropy(model(x), y) / 4
        loss.backward()
        doctor.step(loss, inputs=x, targets=y)
        if step % 4 == 3:
            opt.step()
            opt.zero_grad()
    ratios = [v for series in doctor.signals.update_ratio.values() for v in series.values]
    assert ratios and min(ratios) > 1e-5  # one AdamW step at 1e-3, never the 0 of no step
    assert "GW216" not in [f.code for f in doctor.findings]


def test_class_imbalance_in_a_weighted_loop_advises_metrics_first():
    torch.manual_seed(0)
    x = torch.randn(640, 8)
    y = (torch.rand(640) < 0.03).long()  # 97% / 3%
    model = nn.Linear(8, 2)
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 30.0]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    doctor = Doctor(model, opt, loss_fn=loss_fn, on_finding=None)
    for i in range(20):
        xb, yb = x[i * 32 : (i + 1) * 32], y[i * 32 : (i + 1) * 32]
        opt.zero_grad()
        out = model(xb)
        loss = loss_fn(out, yb)
        loss.backward()
        doctor.step(loss, inputs=xb, outputs=out, targets=yb)
        opt.step()
    [finding] = [f for f in doctor.findings if f.code == "GW103"]
    assert finding.fixes == imbalance_fixes(weighted=True)  # metrics and threshold first
    assert finding.fixes[0].startswith("Pick the checkpoint and stop early by PR-AUC")


class _Stateful(nn.Module):
    """Carries a hidden state between batches and counts its calls in a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.register_buffer("calls", torch.zeros(()))
        self.hidden = None

    def forward(self, x):
        self.calls += 1
        self.hidden = x.mean(0) if self.hidden is None else 0.5 * self.hidden + 0.5 * x.mean(0)
        return self.fc(x + self.hidden.detach())


def test_the_probes_leave_a_stateful_model_as_they_found_it():
    torch.manual_seed(0)
    model = _Stateful()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    doctor = Doctor(model, opt, on_finding=None, ignore=["GW211"])  # it mixes samples on purpose
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    out = model(x)
    loss = F.cross_entropy(out, y)
    loss.backward()
    hidden = model.hidden.clone()
    doctor.step(loss, inputs=x, outputs=out, targets=y)  # the batch-mixing probe runs here
    assert int(model.calls) == 1 and torch.equal(model.hidden, hidden)
    model.eval()
    with torch.no_grad():
        model(x)  # the stochastic-evaluation probe runs a second pass here
    assert int(model.calls) == 2 and model.training is False
    doctor.close()


def test_a_huge_drift_reads_as_a_multiple_not_a_16_digit_percentage():
    from gradwise.doctor.rules.model import frozen_batchnorm_drift

    message, _ = frozen_batchnorm_drift({"backbone.bn1": 37682534124208.34})
    assert "3.8e+13x" in message and "%" not in message
