"""The Doctor's contract: hooks come and go cleanly, rules can be ignored, any plain loop works."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradwise.doctor import RULES, Doctor
from gradwise.errors import ConfigError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))


def _loop(doctor: Doctor, model: nn.Module, steps: int = 30, **step_kwargs) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        doctor.step(
            loss, **({"inputs": x, "outputs": out, "targets": y} if step_kwargs.get("full") else {})
        )
        opt.step()


def test_close_removes_every_hook_and_leaves_the_model_as_it_was():
    model = _model()
    before = copy.deepcopy(model.state_dict())
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with Doctor(model, on_finding=None) as doctor:
        assert sum(len(m._forward_hooks) for m in model.modules()) > 0
        with torch.no_grad():
            model.eval()
            model(torch.randn(4, 8))
    assert doctor._handles == []
    assert (
        sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
        == hooks_before
    )
    assert all(p._backward_hooks is None or len(p._backward_hooks) == 0 for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model, "gradwise_doctor")


def test_step_without_inputs_runs_the_gradient_rules():
    model = _model()
    doctor = Doctor(model, on_finding=None)
    _loop(doctor, model, steps=25)
    telemetry = doctor.telemetry()
    assert len(telemetry["loss"]) == 25 and len(telemetry["grad_norm"]) == 25
    assert telemetry["layer_grad_norm"] and telemetry["update_ratio"] and telemetry["activations"]
    assert telemetry["layers"] == ["0", "3"]


def test_ignore_switches_a_rule_off_and_unknown_codes_are_errors():
    model = _model()
    doctor = Doctor(model, on_finding=None, ignore=["GW203"])
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 8))  # evaluation in training mode: GW203, but ignored
    assert doctor.findings == []
    doctor.close()
    with pytest.raises(ConfigError, match="a rule code such as"):
        Doctor(model, ignore=["GW230"])


def test_findings_are_reported_once_and_counted():
    model = _model()
    seen = []
    doctor = Doctor(model, on_finding=seen.append)
    for _ in range(3):
        with torch.no_grad():
            model(torch.randn(4, 8))
    assert [f.code for f in seen] == ["GW203"]
    assert doctor.findings[0].count == 3
    doctor.close()


def test_every_rule_has_a_documentation_page():
    for code, rule in RULES.items():
        page = rule.page()
        assert page.startswith(f"## {code} {rule.name}")
        assert rule.summary and rule.fixes, code
        assert "How it is detected" in rule.doc or rule.stage == "validation", code
