"""The advisor's reasons state what its rules did: the numbers in each ``why`` are the ones behind
the value chosen, in every branch (parsed back out of the text and recomputed here)."""

from __future__ import annotations

import math
import re

import pytest
import torch

import gradwise as gw
from gradwise import advisor
from gradwise.advisor import decide
from gradwise.facts import Facts


def _facts(**changes) -> Facts:
    """A small tabular classification MLP's facts; ``changes`` override fields."""
    base = dict(
        params=5_000,
        trainable_params=5_000,
        depth=3,
        kinds={"linear": 3},
        activations=["ReLU"],
        architecture="mlp",
        width=64,
        task="multiclass",
        modality="tabular",
        input_shape=(16,),
        n_samples=1_000,
        num_classes=3,
        class_counts=[340, 330, 330],
        imbalance=340 / 330,
        feature_scale={"mean": 0.0, "std": 1.0, "max_abs": 4.0},
        target_heavy_tail=None,
        device="cpu",
        bf16=False,
        memory_gb=None,
        cpu_count=2,
    )
    return Facts(**{**base, **changes})


def _advice(facts: Facts, epochs: int | None = None) -> dict[str, advisor.Advice]:
    return {a.setting: a for a in decide(facts, epochs)}


def _number(text: str) -> float:
    return float(text.replace(",", ""))


# -- the batch size ---------------------------------------------------------------------------


def test_batch_size_that_reaches_the_step_target_says_its_steps():
    a = _advice(_facts(n_samples=455), epochs=50)["data.batch_size"]
    found = re.search(
        r"gives (\d+)\+ optimizer steps in (\d+) epochs of ([\d,]+) samples \(([\d,]+)\)", a.why
    )
    wanted, epochs, n, steps = (int(_number(g)) for g in found.groups())
    assert (wanted, epochs, n) == (advisor.MIN_STEPS, 50, 455)
    assert steps == epochs * math.ceil(n / a.value) >= wanted
    larger = [b for b in advisor.BATCH_CHOICES if b > a.value]
    assert all(epochs * math.ceil(n / b) < wanted for b in larger)


def test_batch_size_fallback_says_the_smallest_falls_short():
    a = _advice(_facts(n_samples=89), epochs=50)["data.batch_size"]
    found = re.search(
        r"even the smallest of [\d/]+, (\d+), gives only ([\d,]+) optimizer steps in (\d+) "
        r"epochs of ([\d,]+) samples \(fewer than the (\d+) wanted\)",
        a.why,
    )
    size, steps, epochs, n, wanted = (int(_number(g)) for g in found.groups())
    assert size == a.value == min(advisor.BATCH_CHOICES) == 16
    assert steps == epochs * math.ceil(n / size) == 300 < wanted == advisor.MIN_STEPS
    assert "largest" not in a.why


def test_batch_size_limited_by_memory_states_the_arithmetic():
    f = _facts(
        architecture="cnn", modality="image", input_shape=(3, 224, 224), depth=50, memory_gb=1.0
    )
    a = _advice(f, epochs=30)["data.batch_size"]
    mib = re.search(r"about ([\d.,]+) MiB per sample", a.why)
    fits = re.search(r"so ([\d,]+) samples fit: (\d+),", a.why)
    per_sample = 4 * 3 * 224 * 224 * 50 * 8 / 2**20
    assert _number(mib.group(1)) == pytest.approx(per_sample, rel=1e-2)
    assert int(_number(fits.group(1))) == int(1.0 * 0.5 * 1024 / per_sample) == 2
    assert int(fits.group(2)) == a.value == 2


# -- the loss ---------------------------------------------------------------------------------


def _loss_why(y: torch.Tensor) -> tuple[str, str, Facts]:
    x = torch.randn(len(y), 4, generator=torch.Generator().manual_seed(1))
    advised = gw.advise(torch.nn.Linear(4, 1), (x, y), task="regression", budget=5)
    loss = next(a for a in advised.advice if a.setting == "train.loss")
    return loss.value, loss.why, advised.facts


def test_regression_on_raw_targets_is_not_called_standardised():
    g = torch.Generator().manual_seed(0)
    value, why, facts = _loss_why(100 + 20 * torch.randn(400, generator=g))
    assert value == "auto" and "not standardised" in why and "standardise them" in why
    mean, std = (float(v) for v in re.search(r"mean ([\d.-]+), std ([\d.]+)", why).groups())
    assert (
        mean == pytest.approx(facts.target_scale["mean"], rel=1e-2) == pytest.approx(100, rel=0.05)
    )
    assert std == pytest.approx(facts.target_scale["std"], rel=1e-2) == pytest.approx(20, rel=0.1)


def test_regression_on_standardised_targets_says_so_with_the_numbers():
    y = torch.randn(400, generator=torch.Generator().manual_seed(0))
    y = (y - y.mean()) / y.std()
    value, why, _ = _loss_why(y)
    assert value == "auto" and why.startswith("MSE on standardised targets (mean ")
    assert "not standardised" not in why


def test_a_data_set_that_standardised_its_targets_is_believed():
    a = _advice(_facts(task="regression", target_standardized=True, target_scale=None))
    assert "standardised them with train statistics" in a["train.loss"].why


def test_heavy_tails_state_the_measured_fraction():
    a = _advice(_facts(task="regression", target_heavy_tail=0.034))
    assert a["train.loss"].value == "huber" and a["train.loss"].why.startswith("3.4% of targets")


# -- the other rules --------------------------------------------------------------------------


@pytest.mark.parametrize("n_samples", [500, 5_000, 50_000])
def test_regularisation_reasons_name_the_values(n_samples):
    a = {x.setting: x for x in decide(_facts(n_samples=n_samples), 20, {"dropout"})}
    decay, drop = a["optim.weight_decay"], a["model.kwargs.dropout"]
    if n_samples < advisor.TINY_DATA:
        assert f"{decay.value:g} instead of" in decay.why and "(below 1,000)" in decay.why
    else:
        assert decay.why.startswith(f"{decay.value:g}, within")
    assert drop.why.startswith(f"{n_samples:,} samples") and f"dropout {drop.value:g}" in drop.why


def test_warmup_clip_min_lr_and_smoothing_reasons_name_the_values():
    a = _advice(_facts(num_classes=10, class_counts=[100] * 10, imbalance=1.0))
    assert f"({a['schedule.warmup'].value:.0%} of the steps)" in a["schedule.warmup"].why
    assert f"{a['schedule.min_lr'].value:.0%} of the peak" in a["schedule.min_lr"].why
    assert f"at {a['train.grad_clip'].value:g}" in a["train.grad_clip"].why
    smoothing = a["train.label_smoothing"]
    assert smoothing.value == 0.1 and "10 classes" in smoothing.why and "0.1" in smoothing.why
    few = _advice(_facts())["train.label_smoothing"]
    assert few.value == 0.0 and "only 3 classes (fewer than 5)" in few.why


def test_epoch_budget_reason_names_the_rows_it_used():
    given = _advice(_facts(), epochs=7)["train.epochs"]
    assert given.value == 7 and "you gave (7)" in given.why
    default = _advice(_facts(n_samples=5_000))["train.epochs"]
    assert default.value == 30 and default.why.startswith(
        "5,000 training samples (below 20,000): 30"
    )


def test_ema_reason_counts_the_steps_of_the_chosen_batch():
    a = _advice(_facts(n_samples=100_000), epochs=20)
    steps = int(_number(re.match(r"([\d,]+) optimizer steps", a["train.ema_decay"].why).group(1)))
    assert steps == 20 * math.ceil(100_000 / a["data.batch_size"].value)


# -- early stopping ---------------------------------------------------------------------------


def _patience(val_samples: int, epochs: int = 50, params: int = 50_000_000) -> advisor.Advice:
    """Patience for a run too costly to count as cheap, unless ``params`` is small."""
    f = _facts(n_samples=4 * val_samples, val_samples=val_samples, params=params)
    return _advice(f, epochs=epochs)["early_stopping.patience"]


def _check_numbers(a: advisor.Advice, epochs: int, val_samples: int) -> None:
    found = re.match(r"(\d+) of the run's (\d+) evaluations \(one per epoch; (\d+)%", a.why)
    patience, evals, percent = (int(g) for g in found.groups())
    assert patience == a.value and evals == epochs and percent == round(100 * a.value / epochs)
    assert f"on {val_samples:,} validation samples" in a.why
    se = float(re.search(r"standard error of up to ([\d.]+)%", a.why).group(1))
    assert se == pytest.approx(100 * 0.5 / math.sqrt(val_samples), abs=0.051)


def test_patience_grows_as_the_validation_set_shrinks():
    sizes = [40_000, 5_000, 1_000, 100]
    advice = [_patience(n) for n in sizes]
    values = [a.value for a in advice]
    assert values == sorted(values) and values[0] < values[-1]
    assert values[0] == round(advisor.PATIENCE_FRACTION * 50)  # precise: a fifth of the budget
    assert values[-1] == round(advisor.PATIENCE_MAX_FRACTION * 50)  # noisy: capped at half
    for a, n in zip(advice, sizes, strict=True):
        _check_numbers(a, 50, n)
    ratio = float(re.search(r"20% of the evaluations x ([\d.]+)", advice[2].why).group(1))
    assert ratio == pytest.approx(math.sqrt(advisor.NOISE_REF_VAL / 1_000), rel=0.02)


def test_cheap_runs_get_half_the_budget_and_say_why():
    a = _patience(
        20_000, epochs=20, params=1_000
    )  # a precise validation set, but seconds of compute
    assert a.value == 10 and "the run is cheap" in a.why
    flops = float(re.search(r"~([\d.e+]+) FLOPs", a.why).group(1))
    assert flops == pytest.approx(6 * 1_000 * 80_000 * 20, rel=0.5)


def test_unknown_validation_size_is_assumed_and_said():
    f = _facts(n_samples=2_000, params=50_000_000)
    a = _advice(f, epochs=40)["early_stopping.patience"]
    assert "~500 validation samples (none given to count" in a.why


def test_a_noisy_flat_then_improving_curve_is_not_stopped_by_the_advised_patience():
    """The Trainer's own improvement test on a validation accuracy over 100 samples: rising, then a
    plateau where one lucky evaluation sets the best, then a slow real climb past it."""
    from gradwise.trainer import improves

    g = torch.Generator().manual_seed(0)
    epochs = 50
    noise = 0.03 * torch.randn(epochs, generator=g)  # sqrt(0.9 * 0.1 / 100): the standard error
    curve = [min(0.9, 0.6 + 0.05 * e) for e in range(epochs)]  # rises to a plateau at 0.90
    curve = [c + (0.004 * (e - 24) if e > 24 else 0.0) for e, c in enumerate(curve)]  # real climb
    values = [round(c + float(n), 2) for c, n in zip(curve, noise, strict=True)]
    values[12] = 0.96  # the lucky evaluation on the plateau

    def stopped(patience: int) -> tuple[int, float]:
        best, bad = None, 0
        for i, v in enumerate(values):
            if improves(v, best, "max"):
                best, bad = v, 0
            else:
                bad += 1
            if bad >= patience:
                return i + 1, best
        return epochs, best

    advised = _patience(100, epochs=epochs)
    assert advised.value == 25
    trained, kept = stopped(advised.value)
    assert kept == max(values) > 0.96 and trained > values.index(max(values))
    old_trained, old_kept = stopped(max(5, round(0.2 * epochs)))  # the rule before issue 16
    assert old_kept == 0.96 and old_trained < values.index(max(values))
