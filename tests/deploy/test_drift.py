"""Drift statistics without a server: PSI, KS, the report's verdict and the sliding window."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import ks_2samp

from gradwise.deploy.card import bin_fractions as card_bin_fractions
from gradwise.deploy.card import reference_statistics, summary_features
from gradwise.deploy.drift import (
    DriftMonitor,
    bin_fractions,
    drift_report,
    interior_edges,
    ks,
    psi,
    psi_level,
)


def test_psi_is_zero_for_equal_distributions_and_matches_the_formula() -> None:
    assert psi([0.25, 0.25, 0.5], [0.25, 0.25, 0.5]) == 0.0
    expected = [0.5, 0.5]
    actual = [0.8, 0.2]
    by_hand = (0.8 - 0.5) * math.log(0.8 / 0.5) + (0.2 - 0.5) * math.log(0.2 / 0.5)
    assert psi(expected, actual) == pytest.approx(by_hand)
    # an empty bin is floored at epsilon: large but finite
    value = psi([0.5, 0.5], [1.0, 0.0])
    assert math.isfinite(value) and value > 1


def test_psi_levels_follow_the_conventional_thresholds() -> None:
    assert psi_level(0.05) == "none"
    assert psi_level(0.1) == "moderate"
    assert psi_level(0.2) == "moderate"
    assert psi_level(0.26) == "significant"


def test_bins_are_left_closed_with_open_ends_like_the_reference_builder() -> None:
    edges = [0.0, 1.0]
    values = np.array([-5, 0.0, 0.5, 1.0, 7])
    assert bin_fractions(values, edges).tolist() == [0.2, 0.4, 0.4]
    assert np.array_equal(bin_fractions(values, edges), card_bin_fractions(values, edges))
    assert interior_edges([-1.0, 0.0, 1.0, 2.0], 3).tolist() == [0.0, 1.0]  # outer edges dropped
    with pytest.raises(ValueError, match="do not fit"):
        interior_edges([0.0], 3)


def test_ks_matches_scipy_and_separates_shifted_samples() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=500), rng.normal(size=400)
    stat, p = ks(a, b)
    ref = ks_2samp(a, b, method="asymp")
    assert stat == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    assert p > 0.01
    assert ks(a, b + 1.0)[1] < 1e-10


@pytest.fixture
def table() -> tuple[np.ndarray, dict]:
    """5 features of mixed scale (one discrete) and a class column from the training split."""
    rng = np.random.default_rng(1)
    x = np.column_stack(
        [
            rng.normal(0, 1, 3000),
            rng.normal(100, 20, 3000),
            rng.exponential(2.0, 3000),
            rng.integers(0, 3, 3000).astype(float),
            rng.uniform(-1, 1, 3000),
        ]
    )
    logits = np.column_stack([x[:, 0], -x[:, 0]])
    return x, reference_statistics(x, logits, task="multiclass", class_labels=["a", "b"])


def test_training_like_data_shows_no_drift(table) -> None:
    _, reference = table
    rng = np.random.default_rng(2)
    fresh = np.column_stack(
        [
            rng.normal(0, 1, 1000),
            rng.normal(100, 20, 1000),
            rng.exponential(2.0, 1000),
            rng.integers(0, 3, 1000).astype(float),
            rng.uniform(-1, 1, 1000),
        ]
    )
    report = drift_report(reference, fresh, (fresh[:, 0] < 0).astype(int))
    assert report["verdict"] == "no drift", report
    assert report["drifted"] == []
    assert all(f["psi"] < 0.1 for f in report["features"])
    assert report["predictions"]["psi_level"] == "none"


def test_a_shifted_feature_is_flagged_by_psi_and_ks(table) -> None:
    x, reference = table
    shifted = x[:1000].copy()
    shifted[:, 1] += 20  # one standard deviation
    report = drift_report(reference, shifted)
    assert report["verdict"] == "significant drift"
    assert report["drifted"] == ["f1"]
    f1 = report["features"][1]
    assert f1["psi_level"] == "significant" and f1["ks_drift"] and f1["ks_pvalue"] < 1e-6
    assert report["features"][0]["psi_level"] == "none"


def test_a_moderate_shift_reads_moderate(table) -> None:
    x, reference = table
    shifted = x[:2000].copy()
    shifted[:, 0] += 0.4
    report = drift_report(reference, shifted)
    assert report["features"][0]["psi_level"] == "moderate", report["features"][0]
    assert report["verdict"] == "moderate drift"


def test_prediction_drift_counts_in_the_verdict(table) -> None:
    x, reference = table
    report = drift_report(reference, x[:1000], np.zeros(1000, dtype=int))  # every row class 0
    assert report["predictions"]["psi_level"] == "significant"
    assert "predictions" in report["drifted"]
    assert report["verdict"] == "significant drift"


def test_a_small_window_is_insufficient_data(table) -> None:
    x, reference = table
    report = drift_report(reference, x[:50] + 100)
    assert report["verdict"] == "insufficient data" and report["features"] == []
    with pytest.raises(ValueError, match="do not match"):
        drift_report(reference, x[:, :3])


def test_images_drift_on_summary_features() -> None:
    rng = np.random.default_rng(3)
    images = rng.uniform(0, 1, size=(600, 3, 8, 8))
    reference = reference_statistics(images)
    assert reference["kind"] == "summary"
    assert [f["name"] for f in reference["features"]][:4] == ["mean", "std", "min", "max"]
    same = summary_features(rng.uniform(0, 1, size=(400, 3, 8, 8)))
    assert drift_report(reference, same)["verdict"] == "no drift"
    brighter = rng.uniform(0, 1, size=(400, 3, 8, 8))
    brighter[:, 0] += 0.2  # the red channel drifts
    report = drift_report(reference, summary_features(brighter))
    assert report["verdict"] == "significant drift"
    assert "channel0_mean" in report["drifted"] and "channel1_mean" not in report["drifted"]


def test_monitor_keeps_the_last_rows_of_a_sliding_window(table) -> None:
    x, reference = table
    monitor = DriftMonitor(reference, window=300, min_rows=200)
    monitor.add(x[:100] + 1000, np.ones(100, dtype=int))  # pushed out by what follows
    for i in range(0, 300, 30):
        monitor.add(x[i : i + 30], (x[i : i + 30, 0] < 0).astype(int))
    rows, preds = monitor.snapshot()
    assert preds is not None and len(preds) == 300
    assert len(rows) == 300 and rows.max() < 1000
    assert sorted(map(tuple, rows)) == sorted(map(tuple, x[:300]))
    assert monitor.report()["verdict"] == "no drift"
    assert monitor.report()["window"] == 300
    monitor.add(x[:1000] + 50)  # a batch larger than the window keeps its last rows
    assert len(monitor.snapshot()[0]) == 300
    assert monitor.report()["verdict"] == "significant drift"


def _as_exported(raw: np.ndarray, per: str) -> tuple[dict, dict]:
    """The reference and preprocessing export writes for raw training inputs that gradwise's data
    pipeline scaled and standardised: statistics of the model inputs mapped back to raw."""
    import torch

    from gradwise.data.common import standardize
    from gradwise.deploy.card import unpreprocess

    model_inputs, _, record = standardize(torch.as_tensor(raw) / 16.0, None, per=per)
    pre = {"scale": 1 / 16, "standardize": record}
    return reference_statistics(unpreprocess(model_inputs.numpy(), pre)), pre


@pytest.mark.parametrize("per", ["channel", "all"])
def test_the_training_data_itself_shows_no_drift_and_a_shift_still_does(per) -> None:
    # digits-like images: pixels 0..16, a blank border (a constant 0 feature, every image's min)
    rng = np.random.default_rng(4)
    images = np.zeros((1000, 1, 8, 8), dtype=np.float32)
    images[:, :, 1:7, 1:7] = rng.integers(0, 17, size=(1000, 1, 6, 6))
    if per == "all":  # tabular rows of 64 pixels: one feature per pixel
        images = images.reshape(1000, 64)
    reference, pre = _as_exported(images, per)
    border = reference["features"][0]
    assert border["min"] != 0.0  # the round trip through float32 left 0 as about -1e-7

    monitor = DriftMonitor(reference, window=1000, min_rows=200, preprocessing=pre)
    monitor.add(images)
    report = monitor.report()
    assert report["verdict"] == "no drift", [f for f in report["features"] if f["ks_drift"]]
    assert all(f["ks_statistic"] < 0.05 for f in report["features"])

    brighter = images + 1.0  # one grey level brighter, the border too
    monitor = DriftMonitor(reference, window=1000, min_rows=200, preprocessing=pre)
    monitor.add(brighter)
    report = monitor.report()
    assert report["verdict"] == "significant drift"
    assert border["name"] in report["drifted"]
