"""Each live rule on synthetic signals: the planted fault fires with its evidence, healthy series do not."""

from __future__ import annotations

import math
import random

from gradwise.doctor.rules import dynamics, generalisation
from gradwise.doctor.rules import model as model_rules
from gradwise.doctor.signals import Activation, Series, Signals


def series(values, start=0, every=1) -> Series:
    s = Series()
    for i, v in enumerate(values):
        s.append(start + i * every, v)
    return s


def healthy_loss(n=300, seed=0) -> list[float]:
    rng = random.Random(seed)
    return [2.3 * math.exp(-i / 80) + 0.1 + 0.05 * rng.random() for i in range(n)]


def test_gw301_nonfinite_loss_and_gradients():
    s = Signals(loss=series([1.0, 0.9, float("nan")]))
    message, evidence = dynamics.nonfinite(s)
    assert "nan" in message and evidence["step_first_seen"] == 2
    s = Signals(loss=series([1.0, 0.9]), grad_norm=series([1.0, float("inf")]))
    assert dynamics.nonfinite(s) is not None
    s.loss_scaling = True  # a GradScaler skips overflowing steps by design
    assert dynamics.nonfinite(s) is None
    assert (
        dynamics.nonfinite(Signals(loss=series(healthy_loss()), grad_norm=series([1.0, 2.0])))
        is None
    )


def test_gw302_spike_and_growth():
    calm = [1.0 + 0.5 * math.sin(i) for i in range(30)]
    _message, evidence = dynamics.exploding_gradients(
        Signals(grad_norm=series([*calm, 80.0]), new_values=10)
    )
    assert evidence["factor"] > 10 and evidence["grad_norm"] == 80.0
    growth = [1.0] * 10 + [10.0**i for i in range(6)]
    assert (
        dynamics.exploding_gradients(Signals(grad_norm=series(growth), new_values=10)) is not None
    )
    rng = random.Random(0)
    heavy_tailed = [rng.lognormvariate(0, 1.5) for _ in range(300)]  # healthy but spiky
    assert (
        dynamics.exploding_gradients(Signals(grad_norm=series(heavy_tailed), new_values=300))
        is None
    )
    rising_early = [0.1 * 1.5**i for i in range(8)]  # grows ~17x: common early in training
    assert (
        dynamics.exploding_gradients(Signals(grad_norm=series(rising_early), new_values=8)) is None
    )


def test_gw303_vanishing_gradients():
    layers = [f"l{i}" for i in range(6)]
    vanishing = {name: series([10.0 ** (-2 * (5 - i))] * 4) for i, name in enumerate(layers)}
    s = Signals(layers=layers, layer_grad_norm=vanishing)
    _message, evidence = dynamics.vanishing_gradients(s)
    assert evidence["early_to_late_ratio"] < 1e-3
    even = {name: series([0.01 * (1 + 0.3 * i)] * 4) for i, name in enumerate(layers)}
    assert dynamics.vanishing_gradients(Signals(layers=layers, layer_grad_norm=even)) is None


def test_gw304_dying_relu_needs_a_sustained_majority():
    dead = Activation("ReLU", dead=series([0.1, 0.7, 0.8]))
    assert dynamics.dying_relu(Signals(activations={"act1": dead}))[1]["dead_fraction"] == 0.8
    flicker = Activation("ReLU", dead=series([0.7, 0.1, 0.8]))
    assert dynamics.dying_relu(Signals(activations={"act1": flicker})) is None


def _ratios(value, layers=3, n=5):
    return {f"l{i}": series([value] * n) for i in range(layers)}


def test_gw305_lr_too_high_needs_big_updates_and_a_rising_loss():
    rising = [1.0 - 0.01 * i for i in range(30)] + [0.7 + 0.08 * i for i in range(30)]
    s = Signals(loss=series(rising), update_ratio=_ratios(0.3))
    _message, evidence = dynamics.lr_too_high(s)
    assert evidence["update_ratio"] == 0.3 and evidence["loss_to_min"] > 1.5
    assert (
        dynamics.lr_too_high(Signals(loss=series(healthy_loss()), update_ratio=_ratios(0.3)))
        is None
    )
    assert dynamics.lr_too_high(Signals(loss=series(rising), update_ratio=_ratios(1e-3))) is None


def test_gw306_lr_too_low():
    flat = [2.30 - 1e-5 * i for i in range(200)]
    s = Signals(step=200, loss=series(flat), update_ratio=_ratios(1e-7))
    assert dynamics.lr_too_low(s)[1]["update_ratio"] == 1e-7
    assert (
        dynamics.lr_too_low(
            Signals(step=300, loss=series(healthy_loss()), update_ratio=_ratios(1e-3))
        )
        is None
    )


def test_gw307_plateau_only_when_little_was_learned():
    stuck = [2.3 - 0.3 * (1 - math.exp(-i / 5)) for i in range(300)]  # learned 13%, then flat
    s = Signals(step=300, loss=series(stuck))
    assert dynamics.plateau(s)[1]["improvement"] < 0.01
    converged = [2.3 * math.exp(-i / 20) + 0.05 for i in range(300)]
    assert dynamics.plateau(Signals(step=300, loss=series(converged))) is None


def test_gw308_oscillation():
    bouncing = [1.0] * 10 + [1.0 + (0.6 if i % 2 else -0.4) for i in range(100)]
    s = Signals(step=100, loss=series(bouncing))
    assert dynamics.oscillating(s)[1]["amplitude"] > 0.9
    assert dynamics.oscillating(Signals(step=300, loss=series(healthy_loss()))) is None


def test_gw309_saturation_exempts_the_output_layer():
    hidden = Activation("Tanh", saturated=series([0.9, 0.95]))
    assert dynamics.saturated(Signals(activations={"h": hidden}, output_module="out")) is not None
    assert dynamics.saturated(Signals(activations={"out": hidden}, output_module="out")) is None


def test_gw202_gw203_gw207_checks():
    assert model_rules.stale_gradients([1.0, 0.4, 0.5]) is not None
    assert model_rules.stale_gradients([1.0, 1.0, 0.4]) is None  # one odd check is not enough
    assert model_rules.eval_in_train_mode(["drop"])[1]["modules_in_training_mode"] == 1
    assert model_rules.eval_in_train_mode([]) is None
    assert "not in the optimizer" in model_rules.params_without_gradients([], ["head.weight"], 4)[0]
    assert "never received" in model_rules.params_without_gradients(["extra.weight"], [], 4)[0]
    assert model_rules.params_without_gradients([], [], 4) is None


def test_gw401_overfitting_and_gw402_underfitting():
    evals = [
        {"step": 100 * i, "loss": v, "metric": None, "train_loss": t}
        for i, (v, t) in enumerate([(1.0, 1.2), (0.8, 0.9), (0.85, 0.7), (0.9, 0.5), (1.0, 0.3)])
    ]
    _message, evidence = generalisation.overfitting(Signals(val=evals))
    assert evidence["best_val_loss"] == 0.8 and evidence["val_loss"] == 1.0
    improving = [{**e, "loss": 1.0 - 0.1 * i} for i, e in enumerate(evals)]
    assert generalisation.overfitting(Signals(val=improving)) is None

    chance = math.log(10)
    stuck = Signals(
        step=400, loss=series([chance + 0.01] * 400), loss_kind="cross_entropy", num_classes=10
    )
    assert generalisation.underfitting(stuck)[1]["chance_loss"] == chance
    learning = Signals(
        step=400, loss=series(healthy_loss(400)), loss_kind="cross_entropy", num_classes=10
    )
    assert generalisation.underfitting(learning) is None
