"""Data rules GW101-GW105: each planted fault fires with the right evidence; healthy data never does."""

from __future__ import annotations

import functools
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradwise.doctor.findings import RULES
from gradwise.doctor.rules import data as data_rules
from gradwise.doctor.rules.data import (
    THRESHOLDS,
    class_imbalance,
    leakage,
    loss_is_weighted,
    nonfinite_data,
    targets_out_of_range,
    unnormalised_inputs,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_rules_are_registered_with_documentation() -> None:
    for code, name, severity in [
        ("GW101", "nonfinite-data", "error"),
        ("GW102", "unnormalised-inputs", "warning"),
        ("GW103", "class-imbalance", "warning"),
        ("GW104", "train-val-leakage", "error"),
        ("GW105", "targets-out-of-range", "error"),
    ]:
        r = RULES[code]
        assert (r.name, r.severity) == (name, severity)
        assert r.summary and "## Why it matters" in r.doc and "## How it is detected" in r.doc
        assert len(r.fixes) >= 2 and r.references
        assert r.check is getattr(data_rules, r.check.__name__)


def test_rule_pages_show_threshold_values_not_their_names() -> None:
    pages = {code: " ".join(RULES[code].page().split()) for code in RULES if code < "GW200"}
    for code, page in pages.items():
        assert "THRESHOLDS" not in page and "{" not in page, code
    assert f"reach {THRESHOLDS.imbalance_ratio:g}:1" in pages["GW103"]  # 10:1
    assert f"above {THRESHOLDS.max_std_ratio:g}." in pages["GW102"]
    assert f"reaches {THRESHOLDS.leak_fraction:.0%}," in pages["GW104"]


# ---------------------------------------------------------------------------- GW101


def test_nonfinite_counts_nan_and_inf_in_inputs_and_targets() -> None:
    x = torch.randn(100, 5, generator=gen())
    y = torch.randn(100, generator=gen(1))
    assert nonfinite_data(x, y) is None
    x[3, 1] = float("nan")
    x[3, 2] = float("nan")
    x[7, 0] = float("inf")
    y[50] = float("-inf")
    message, ev = nonfinite_data(x, y)
    assert ev["nan_inputs"] == 2 and ev["inf_inputs"] == 1
    assert ev["samples_with_nonfinite_inputs"] == 2
    assert ev["nonfinite_inputs_fraction"] == pytest.approx(3 / 500)
    assert ev["inf_targets"] == 1 and ev["nan_targets"] == 0
    assert "NaN" in message and "targets" in message


def test_nonfinite_ignores_integer_tensors_and_missing_parts() -> None:
    tokens = torch.randint(0, 50, (8, 16), generator=gen())
    assert nonfinite_data(tokens, tokens) is None
    assert nonfinite_data(None, None) is None
    assert nonfinite_data(torch.tensor([[float("nan")]]), None)[1]["nan_inputs"] == 1


# ---------------------------------------------------------------------------- GW102


def standardised(n: int = 500, f: int = 10, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, f, generator=gen(seed)) * torch.linspace(0.1, 50, f) + 7
    return (x - x.mean(0)) / x.std(0)


def test_unnormalised_healthy_inputs_do_not_fire() -> None:
    g = gen()
    assert unnormalised_inputs(standardised()) is None
    assert unnormalised_inputs(torch.rand(64, 3, 16, 16, generator=g)) is None  # [0, 1] images
    assert unnormalised_inputs(torch.rand(64, 3, 16, 16, generator=g) * 2 - 1) is None
    # standardised features next to one-hot and binary columns
    onehot = torch.nn.functional.one_hot(torch.randint(0, 5, (500,), generator=g), 5).float()
    rare = (torch.rand(500, 1, generator=g) < 0.01).float()
    assert unnormalised_inputs(torch.cat([standardised(), onehot, rare], dim=1)) is None
    # flattened [0, 1] images with many nearly-always-dark pixels
    img = torch.rand(300, 64, generator=g)
    img[:, :20] = (torch.rand(300, 20, generator=g) < 0.02).float() * 0.05
    assert unnormalised_inputs(img) is None
    # heavy-tailed features, standardised, and a small batch
    heavy = torch.distributions.LogNormal(0.0, 1.5).sample((2000, 6))
    heavy = (heavy - heavy.mean(0)) / heavy.std(0)
    assert unnormalised_inputs(heavy) is None
    assert unnormalised_inputs(standardised(n=4)) is None
    # token ids are not features
    assert unnormalised_inputs(torch.randint(0, 5000, (32, 64), generator=g)) is None


def test_unnormalised_never_fires_on_batches_of_standardised_heavy_tailed_data() -> None:
    torch.manual_seed(0)
    data = torch.distributions.StudentT(3.0).sample((6400, 12))
    data = (data - data.mean(0)) / data.std(0)
    fired = [unnormalised_inputs(batch) for batch in data.split(32)]
    assert not any(fired)


def test_unnormalised_raw_pixels() -> None:
    pixels = torch.randint(0, 256, (16, 3, 8, 8), generator=gen()).float()
    message, ev = unnormalised_inputs(pixels)
    assert ev["raw_pixels"] == 1 and ev["max"] == 255 and ev["min"] == 0
    assert "raw" in message
    digits_like = torch.randint(
        0, 17, (16, 1, 8, 8), generator=gen()
    ).float()  # sklearn digits 0..16
    assert unnormalised_inputs(digits_like)[1]["max"] == 16
    mask = torch.randint(0, 2, (16, 1, 8, 8), generator=gen()).float()  # 0/1 masks are fine
    assert unnormalised_inputs(mask) is None


def test_unnormalised_large_offset_names_the_feature() -> None:
    x = standardised()
    x[:, 6] = 2000 + 10 * x[:, 6]  # e.g. a year
    message, ev = unnormalised_inputs(x)
    assert ev["feature"] == 6
    assert ev["feature_mean"] == pytest.approx(2000, rel=0.01)
    assert ev["max_mean_abs"] > THRESHOLDS.max_mean_abs and ev["features_above"] == 1
    assert "feature 6" in message


def test_unnormalised_wildly_different_scales() -> None:
    x = standardised()
    x[:, 2] *= 1e-3  # millimetres next to metres
    message, ev = unnormalised_inputs(x)
    assert ev["min_std_feature"] == 2
    assert ev["std_ratio"] == pytest.approx(1000, rel=0.05)
    assert "different scales" in message


def test_unnormalised_per_channel_for_images() -> None:
    img = torch.rand(32, 3, 8, 8, generator=gen())
    img[:, 1] = img[:, 1] * 40 + 100  # one channel left raw-ish, not whole numbers
    _, ev = unnormalised_inputs(img)
    assert ev["feature"] == 1 and ev["features"] == 3


# ---------------------------------------------------------------------------- GW103


def test_class_imbalance_fires_with_counts() -> None:
    y = torch.cat([torch.zeros(950), torch.ones(50)]).long()
    message, ev = class_imbalance(y)
    assert ev["majority_class"] == 0 and ev["majority_count"] == 950
    assert ev["minority_class"] == 1 and ev["minority_count"] == 50
    assert ev["imbalance_ratio"] == pytest.approx(19)
    assert "19:1" in message


def test_class_imbalance_balanced_and_noisy_batches_do_not_fire() -> None:
    assert class_imbalance(torch.arange(300) % 3) is None
    g = gen()
    for _ in range(300):  # batches of a balanced 10-class problem, some with a class missing
        assert class_imbalance(torch.randint(0, 10, (32,), generator=g), num_classes=10) is None
    # one batch with a single minority sample is not evidence
    assert class_imbalance(torch.tensor([0] * 31 + [1])) is None
    # mild imbalance (5:1) is left alone
    assert class_imbalance(torch.tensor([0] * 500 + [1] * 100)) is None


def test_class_imbalance_absent_class_counts_when_num_classes_given() -> None:
    y = torch.arange(1000) % 4  # classes 0..3, class 4 never occurs
    assert class_imbalance(y) is None
    _, ev = class_imbalance(y, num_classes=5)
    assert ev["minority_class"] == 4 and ev["minority_count"] == 0


def test_class_imbalance_multilabel_and_binary_floats() -> None:
    g = gen()
    y = (torch.rand(2000, 4, generator=g) < 0.5).float()
    assert class_imbalance(y) is None
    y[:, 2] = (torch.rand(2000, generator=g) < 0.02).float()
    _, ev = class_imbalance(y)
    assert ev["label"] == 2 and ev["imbalanced_labels"] == 1
    binary = torch.cat([torch.zeros(900), torch.ones(30)])
    assert class_imbalance(binary)[1]["minority_count"] == 30


def test_class_imbalance_with_a_weighted_loss_advises_metrics_not_weights() -> None:
    y = torch.cat([torch.zeros(950), torch.ones(50)]).long()
    assert "weight the loss" in class_imbalance(y)[0]
    message, ev = class_imbalance(y, weighted=True)
    assert "19:1" in message and ev["loss_weighted"] == 1.0  # the imbalance is still reported
    assert "already class-weighted" in message and "weight the loss" not in message
    multilabel = (torch.rand(2000, 3, generator=gen()) < 0.5).float()
    multilabel[:, 1] = (torch.rand(2000, generator=gen(1)) < 0.02).float()
    message, _ = class_imbalance(multilabel, weighted=True)
    assert "already class-weighted" in message and "pos_weight" not in message
    fixes = data_rules.imbalance_fixes(weighted=True)
    assert fixes[0].startswith("Pick the checkpoint") and sorted(fixes) == sorted(
        RULES["GW103"].fixes
    )


def test_loss_is_weighted() -> None:
    from gradwise.tasks import Task

    w = torch.tensor([1.0, 19.0])
    for weighted in (
        nn.CrossEntropyLoss(weight=w),
        nn.BCEWithLogitsLoss(pos_weight=torch.tensor(19.0)),
        functools.partial(F.cross_entropy, weight=w),
        functools.partial(F.binary_cross_entropy_with_logits, pos_weight=w[1]),
        Task("multiclass", 2, class_weights=w),
        Task("binary", 1, class_weights=w).loss,
    ):
        assert loss_is_weighted(weighted), weighted
    for plain in (
        None,
        "cross_entropy",
        F.cross_entropy,
        nn.CrossEntropyLoss(),
        nn.BCELoss(weight=w),  # rescales samples, not classes
        Task("multiclass", 2),
    ):
        assert not loss_is_weighted(plain), plain


def test_class_imbalance_messages_stay_readable_when_a_class_never_occurs() -> None:
    message, _ = class_imbalance(torch.arange(1000) % 4, num_classes=5)
    assert "class 4 never occurs (0 of 1000 samples)" in message and "inf" not in message
    y = (torch.rand(2000, 3, generator=gen()) < 0.5).float()
    y[:, 1] = 0
    message, _ = class_imbalance(y)
    assert "label 1 is never positive in 2000 samples" in message and "e+" not in message


def test_class_imbalance_ignores_tokens_and_regression() -> None:
    tokens = torch.cat([torch.zeros(32, 60), torch.ones(32, 4)], dim=1).long()  # skewed, natural
    assert class_imbalance(tokens) is None
    assert class_imbalance(torch.randn(1000)) is None


# ---------------------------------------------------------------------------- GW104


def test_leakage_copy_and_partial_overlap() -> None:
    x = torch.randn(500, 12, generator=gen())
    _, ev = leakage(x, x.clone())
    assert ev["leaked_samples"] == 500 and ev["leaked_fraction"] == 1.0
    val = torch.cat([x[:30], torch.randn(270, 12, generator=gen(1))])
    _, ev = leakage(x, val)
    assert ev["leaked_samples"] == 30 and ev["leaked_fraction"] == pytest.approx(0.1)
    assert ev["first_leaked_val_index"] == 0
    assert "30 of 300" in leakage(x, val)[0]


def test_leakage_disjoint_and_near_duplicates_do_not_fire() -> None:
    x = torch.randn(500, 12, generator=gen())
    assert leakage(x, torch.randn(200, 12, generator=gen(1))) is None
    nudged = x[:100].clone()
    nudged[:, 5] = torch.nextafter(nudged[:, 5], torch.tensor(float("inf")))  # one ulp apart
    assert leakage(x, nudged) is None
    tokens = torch.randint(0, 100, (300, 32), generator=gen())
    assert leakage(tokens, tokens[:50])[1]["leaked_samples"] == 50  # integer samples too
    images = torch.rand(40, 3, 8, 8, generator=gen())
    assert leakage(images, images[::2])[1]["leaked_samples"] == 20


def test_leakage_single_natural_duplicate_is_not_a_leak() -> None:
    train = torch.randn(120, 4, generator=gen())
    val = torch.cat([train[7:8], torch.randn(29, 4, generator=gen(1))])  # like iris: 1 of 30
    assert leakage(train, val) is None
    _, ev = leakage(train, torch.cat([train[:4], val[1:]]))  # 4 of 30 is no accident
    assert ev["leaked_samples"] == 4 and ev["expected_natural_duplicates"] == 0


def test_leakage_low_cardinality_data_is_not_a_leak() -> None:
    g = gen()
    train = torch.randint(0, 2, (1000, 3), generator=g).float()  # 8 distinct rows
    val = torch.randint(0, 2, (200, 3), generator=g).float()
    assert leakage(train, val) is None


def split(x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random 80/20 train/validation split."""
    order = torch.randperm(len(x), generator=gen(seed))
    return x[order[len(x) // 5 :]], x[order[: len(x) // 5]]


def test_leakage_resampling_before_the_split_but_not_natural_duplicates() -> None:
    x = torch.randn(1000, 8, generator=gen())
    minority = torch.arange(1000) % 10 == 0
    oversampled = torch.cat([x[~minority], x[minority].repeat(5, 1)])  # then split: the bug
    message, ev = leakage(*split(oversampled))
    assert ev["resampled_before_split"] == 1.0 and ev["copied_rows"] > 20
    assert (
        "resampled" in message and "Split first, then resample only the training split" in message
    )
    pairs = torch.cat([x[~minority], x[minority].repeat(2, 1)])  # each minority row copied once
    message, ev = leakage(*split(pairs))
    assert ev["resampled_before_split"] == 0.0 and "held duplicates before it was split" in message
    train, val = split(x)  # split first, then oversample only the training split: no leak
    rare = train[torch.arange(len(train)) % 10 == 0]
    assert leakage(torch.cat([train, rare.repeat(4, 1)]), val) is None
    # natural duplicates, in both splits at their natural rate: discrete (one-hot and ordinal)
    # tabular data, one repeated blank sample, measurements rounded to 0.1
    g = gen(2)
    cats = torch.stack([torch.randint(0, k, (2000,), generator=g) for k in (3, 4, 5, 2, 2)], 1)
    onehot = torch.cat([F.one_hot(c, int(c.max()) + 1) for c in cats.T], 1).float()
    skewed = torch.tensor([0.7, 0.2, 0.05, 0.03, 0.02]).multinomial(12_000, True, generator=g)
    blank = torch.rand(2000, 64, generator=g)
    blank[:100] = 0
    rounded = (torch.randn(2000, 4, generator=g) * 8).round() / 10
    for data in (onehot, skewed.reshape(2000, 6).float(), blank, rounded):
        train, val = split(data)
        assert leakage(train, val) is None


def test_leakage_is_fast_for_100k_samples() -> None:
    x = torch.randn(100_000, 32, generator=gen())
    start = time.perf_counter()
    _, ev = leakage(x, x[::10].clone())
    assert time.perf_counter() - start < 3.0
    assert ev["leaked_samples"] == 10_000


# ---------------------------------------------------------------------------- GW105


def test_targets_in_range_do_not_fire() -> None:
    out = torch.randn(8, 5)
    assert (
        targets_out_of_range(out, torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]), "cross_entropy") is None
    )
    assert targets_out_of_range(out, torch.tensor([0, -100, 4, 1, 2, 3, 4, 0]), "nll") is None
    soft = torch.softmax(torch.randn(8, 5), dim=1)
    assert targets_out_of_range(out, soft, "cross_entropy") is None
    lm_out, tokens = torch.randn(2, 7, 30), torch.randint(0, 30, (2, 7))
    assert targets_out_of_range(lm_out, tokens, "cross_entropy") is None
    assert (
        targets_out_of_range(torch.randn(8, 1), torch.randint(0, 2, (8, 1)).float(), "bce_logits")
        is None
    )
    assert targets_out_of_range(torch.randn(8, 1), torch.randn(8, 1) * 100, "mse") is None


def test_targets_one_based_labels() -> None:
    out = torch.randn(10, 5)
    y = torch.tensor([1, 2, 3, 4, 5, 1, 2, 3, 4, 5])
    message, ev = targets_out_of_range(out, y, "cross_entropy")
    assert ev["max_target"] == 5 and ev["num_classes"] == 5
    assert ev["out_of_range"] == 2 and ev["out_of_range_fraction"] == pytest.approx(0.2)
    assert "1-based" in message


def test_targets_negative_and_lm_token_out_of_vocab() -> None:
    _, ev = targets_out_of_range(torch.randn(4, 3), torch.tensor([0, -1, 2, 1]), "cross_entropy")
    assert ev["min_target"] == -1 and ev["out_of_range"] == 1
    tokens = torch.randint(0, 30, (2, 7))
    tokens[1, 3] = 30
    _, ev = targets_out_of_range(torch.randn(2, 7, 30), tokens, "cross_entropy")
    assert ev["num_classes"] == 30 and ev["out_of_range"] == 1


def test_targets_whole_data_against_one_probe_batch() -> None:
    # preflight passes the outputs of one batch and the targets of the whole data set
    _, ev = targets_out_of_range(torch.randn(8, 3), torch.arange(100) % 4, "cross_entropy")
    assert ev["out_of_range"] == 25


def test_targets_float_class_indices() -> None:
    message, ev = targets_out_of_range(
        torch.randn(6, 3), torch.tensor([0.0, 1, 2, 1, 0, 2]), "cross_entropy"
    )
    assert ev["float_class_indices"] == 1.0
    assert ".long()" in message
    # continuous targets are a loss/task mismatch (GW205), not this rule
    assert targets_out_of_range(torch.randn(6, 3), torch.randn(6), "cross_entropy") is None


def test_targets_bce_outside_unit_interval() -> None:
    y = torch.tensor([-1.0, 1.0, 1.0, -1.0])
    message, ev = targets_out_of_range(torch.randn(4), y, "bce_logits")
    assert ev["min_target"] == -1 and ev["out_of_range"] == 2
    assert "-1/+1" in message
    assert targets_out_of_range(torch.randn(4), torch.tensor([0, 1, 1, 0]), "bce") is None
    # integer labels 0..4 into BCE: GW205's business
    assert targets_out_of_range(torch.randn(5), torch.arange(5), "bce_logits") is None
    # binary targets stored as 0/255, integer or float
    for y255 in (torch.tensor([0, 255, 255, 0]), torch.tensor([0.0, 255.0, 255.0, 0.0])):
        _, ev = targets_out_of_range(torch.randn(4, 1), y255.unsqueeze(1), "bce_logits")
        assert ev["max_target"] == 255 and ev["out_of_range"] == 2
