"""NumericDoctor: the rules fed measured values (what the Keras and JAX integrations use), checked
against a plain loop whose numbers we know."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradwise.doctor.numeric import NumericDoctor
from gradwise.errors import GradwiseWarning


def digits_loop(doctor: NumericDoctor, *, lr: float, scale: float, steps: int = 60) -> None:
    """Softmax regression on digits written with NumPy arrays at the edge, fed as a JAX or Keras
    integration feeds it: scalars every step, layers/activations/batches when asked."""
    from sklearn.datasets import load_digits

    x_all, y_all = load_digits(return_X_y=True)
    x_all = torch.tensor(x_all * scale, dtype=torch.float32)
    y_all = torch.tensor(y_all)
    g = torch.Generator().manual_seed(0)
    w1 = (torch.randn(64, 32, generator=g) * 0.1).requires_grad_()
    w2 = (torch.randn(32, 10, generator=g) * 0.1).requires_grad_()
    for _ in range(steps):
        idx = torch.randint(0, 1500, (32,), generator=g)
        x, y = x_all[idx], y_all[idx]
        h = torch.relu(x @ w1)
        out = h @ w2
        loss = F.cross_entropy(out, y)
        g1, g2 = torch.autograd.grad(loss, [w1, w2])
        kwargs = {}
        if doctor.wants_layers:
            kwargs |= {"grads": {"d1": g1.numpy(), "d2": g2.numpy()}, "lr": lr}
            kwargs["params"] = {"d1": w1.detach().numpy(), "d2": w2.detach().numpy()}
        if doctor.wants_activations:
            kwargs["activations"] = {"relu": ("relu", h.detach().numpy())}
        if doctor.wants_batch:
            kwargs |= {"inputs": x.numpy(), "outputs": out.detach().numpy(), "targets": y.numpy()}
        norm = torch.sqrt(g1.square().sum() + g2.square().sum())
        doctor.step(np.float32(loss.item()), grad_norm=float(norm), **kwargs)
        with torch.no_grad():
            w1 -= lr * g1
            w2 -= lr * g2


def codes(doctor: NumericDoctor) -> set[str]:
    return {f.code for f in doctor.findings if f.severity in ("warning", "error")}


def test_a_healthy_loop_is_silent_and_its_series_line_up() -> None:
    doctor = NumericDoctor(framework="jax", on_finding=None)
    digits_loop(doctor, lr=0.1, scale=1 / 16)
    doctor.validate(loss=1.0)
    assert codes(doctor) == set()
    s = doctor.signals
    assert s.loss.steps == list(range(60)) and s.grad_norm.steps == list(range(60))
    assert s.loss_kind == "cross_entropy"  # read from the first loss's value
    assert set(s.update_ratio) == {"d1", "d2"} and s.lr.values[0] == 0.1
    assert s.val[0]["train_loss"] == pytest.approx(np.mean(s.loss.values), rel=1e-6)
    assert s.activations["relu"].dead.values  # the dead-unit window filled


@pytest.mark.parametrize(
    ("lr", "scale", "expected"), [(30.0, 1 / 16, "GW305"), (0.1, 1.0, "GW102")]
)
def test_planted_faults_get_the_torch_doctors_codes(lr, scale, expected) -> None:
    doctor = NumericDoctor(framework="jax", on_finding=None)
    digits_loop(doctor, lr=lr, scale=scale)
    assert expected in codes(doctor), doctor.summary()


def test_the_update_ratio_is_the_weights_change_over_their_norm() -> None:
    doctor = NumericDoctor(loss_kind="mse", on_finding=None, sample_every=10)
    w0, w1 = np.ones((4, 4), np.float32), np.full((4, 4), 1.5, np.float32)
    doctor.step(1.0, params={"dense": w0})  # sampled: a snapshot
    doctor.step(1.0, params={"dense": w1})  # the next step: the update's size
    assert doctor.signals.update_ratio["dense"].values == [pytest.approx(0.5)]
    doctor.step(1.0, updates={"dense": w0 * 0.1}, params={"dense": w1})  # not sampled: ignored
    assert len(doctor.signals.update_ratio["dense"]) == 1


def test_a_nonfinite_host_loss_is_reported_at_its_step() -> None:
    doctor = NumericDoctor(loss_kind="cross_entropy", on_finding=None)
    for step in range(7):
        doctor.step(float("nan") if step == 5 else 2.0, grad_norm=1.0)
    (finding,) = doctor.findings
    assert (finding.code, finding.step) == ("GW301", 5)
    assert math.isnan(doctor.signals.loss.values[5])


def test_inputs_it_cannot_read_never_raise() -> None:
    doctor = NumericDoctor(on_finding=None)
    with pytest.warns(GradwiseWarning, match="per-layer statistics"):  # once, not per step
        for _ in range(3):
            fired = doctor.step(
                1.0, inputs=["a", "b"], outputs={"x": 1}, targets=object(), params={"w": "text"}
            )
            assert fired == []
    assert [v for _, v in doctor.telemetry()["loss"]] == [1.0, 1.0, 1.0]


def test_finish_judges_the_steps_after_the_last_sample() -> None:
    """Device scalars are read at sampled steps only: a loss that turns NaN after the last one
    must still be reported when training ends."""
    doctor = NumericDoctor(loss_kind="cross_entropy", on_finding=None)
    for step in range(30):
        doctor.step(torch.tensor(float("nan") if step == 25 else 2.0), grad_norm=1.0)
    assert doctor.findings == []  # step 25 comes after the sample at step 20
    (finding,) = doctor.finish()
    assert (finding.code, finding.step) == ("GW301", 25)
