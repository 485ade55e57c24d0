"""gradwise.evaluate's numbers against scikit-learn's (and torchmetrics') on the same predictions;
the bootstrap's intervals; temperature scaling on an over-confident model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from gradwise.errors import DataError
from gradwise.evaluate import calibration as cal
from gradwise.evaluate import metrics as mt


def _multiclass(n: int = 600, c: int = 6, sharpness: float = 1.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    z = rng.normal(size=(n, c))
    z[np.arange(n), y] += 1.5
    return y, z * sharpness


def test_multiclass_metrics_equal_sklearn() -> None:
    y, z = _multiclass()
    p = mt.probabilities(z, "multiclass")
    m = mt.classification_metrics(y, p, "multiclass", resamples=200)
    pred = p.argmax(1)
    prec, rec, f1, sup = skm.precision_recall_fscore_support(y, pred)
    for k, row in enumerate(m["per_class"]):
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            (prec[k], rec[k], f1[k], sup[k])
        )
    for avg in ("macro", "micro", "weighted"):
        ref = skm.precision_recall_fscore_support(y, pred, average=avg)[:3]
        got = m["averages"][avg]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx(ref)
    h = {k: v["value"] for k, v in m["headline"].items()}
    assert h["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert h["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert h["roc_auc_macro"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr"))
    onehot = np.eye(p.shape[1])[y]
    assert h["average_precision_macro"] == pytest.approx(skm.average_precision_score(onehot, p))
    assert h["nll"] == pytest.approx(skm.log_loss(y, p))
    assert h["brier"] == pytest.approx(skm.brier_score_loss(y, p, labels=range(p.shape[1])))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    for k in ("1", "3", "5"):
        assert m["top_k_accuracy"][k] == pytest.approx(skm.top_k_accuracy_score(y, p, k=int(k)))


def test_binary_metrics_equal_sklearn() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random(500) < 0.2).astype(int)
    p = np.clip(0.3 * y + 0.7 * rng.random(500), 0, 1)
    m = mt.classification_metrics(y, p, "binary", resamples=200)
    h = {k: v["value"] for k, v in m["headline"].items()}
    pred = (p >= 0.5).astype(int)
    assert h["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert h["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert h["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert h["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert h["average_precision"] == pytest.approx(skm.average_precision_score(y, p))
    assert h["brier"] == pytest.approx(skm.brier_score_loss(y, p))
    assert h["nll"] == pytest.approx(skm.log_loss(y, p))
    assert m["top_k_accuracy"] == {}


def test_multilabel_metrics_equal_sklearn() -> None:
    rng = np.random.default_rng(2)
    y = (rng.random((300, 4)) < 0.4).astype(int)
    p = np.clip(0.4 * y + 0.6 * rng.random((300, 4)), 0, 1)
    m = mt.classification_metrics(y, p, "multilabel", resamples=100)
    h = {k: v["value"] for k, v in m["headline"].items()}
    pred = (p >= 0.5).astype(int)
    assert h["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert h["f1_micro"] == pytest.approx(skm.f1_score(y, pred, average="micro"))
    assert h["subset_accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert h["hamming_loss"] == pytest.approx(skm.hamming_loss(y, pred))
    assert h["roc_auc_macro"] == pytest.approx(skm.roc_auc_score(y, p, average="macro"))


def test_bootstrapped_metrics_equal_sklearn_with_sample_weights() -> None:
    """Each bootstrap resample is a count vector; the vectorised metrics under it are scikit-learn's
    metrics with those counts as sample weights (ties included)."""
    rng = np.random.default_rng(3)
    y = (rng.random(400) < 0.3).astype(np.float32)
    p = np.round(np.clip(0.3 * y + 0.7 * rng.random(400), 0, 1), 2)  # rounded: many ties
    w = next(mt.bootstrap_weights(400, 5, seed=7))
    auc, ap = mt.ranking_metrics(p, y, w)
    for i in range(5):
        assert auc[i] == pytest.approx(skm.roc_auc_score(y, p, sample_weight=w[i]), abs=1e-6)
        assert ap[i] == pytest.approx(
            skm.average_precision_score(y, p, sample_weight=w[i]), abs=1e-6
        )
    assert np.all(w.sum(1) == 400)


def test_bootstrap_intervals_contain_the_estimate_and_shrink_with_n() -> None:
    widths, lows = [], []
    for n in (200, 5000):
        y, z = _multiclass(n=n, c=3, seed=4)
        m = mt.classification_metrics(y, mt.probabilities(z, "multiclass"), "multiclass")
        for name, v in m["headline"].items():
            assert v["ci_low"] <= v["value"] <= v["ci_high"], name
        acc = m["headline"]["accuracy"]
        widths.append(acc["ci_high"] - acc["ci_low"])
        lows.append(acc["ci_low"])
    assert widths[1] < widths[0] / 3  # ~ 1/sqrt(n): sqrt(25) = 5 times narrower
    y, z = _multiclass(n=200, c=3, seed=4)
    again = mt.classification_metrics(y, mt.probabilities(z, "multiclass"), "multiclass")
    assert again["headline"]["accuracy"]["ci_low"] == lows[0]  # seeded: the same interval


def test_regression_metrics_equal_sklearn() -> None:
    rng = np.random.default_rng(5)
    y = rng.normal(size=400)
    p = y + rng.normal(scale=0.5, size=400)
    m = mt.regression_metrics(y, p)
    h = {k: v["value"] for k, v in m["headline"].items()}
    assert h["mae"] == pytest.approx(skm.mean_absolute_error(y, p))
    assert h["rmse"] == pytest.approx(math.sqrt(skm.mean_squared_error(y, p)))
    assert h["r2"] == pytest.approx(skm.r2_score(y, p))
    for v in m["headline"].values():
        assert v["ci_low"] <= v["value"] <= v["ci_high"]


def test_lm_perplexity_and_bits() -> None:
    m = mt.lm_metrics([2.0, 4.0], [2, 2], char_level=True, resamples=50)
    h = {k: v["value"] for k, v in m["headline"].items()}
    assert h["perplexity"] == pytest.approx(math.exp(1.5))
    assert h["bits_per_character"] == pytest.approx(1.5 / math.log(2))


def test_ece_equals_torchmetrics() -> None:
    import torch
    from torchmetrics.classification import MulticlassCalibrationError

    y, z = _multiclass(sharpness=3.0)
    p = mt.probabilities(z, "multiclass")
    ref = MulticlassCalibrationError(6, n_bins=15, norm="l1")(
        torch.tensor(p, dtype=torch.float32), torch.tensor(y)
    )
    assert cal.calibration_error(p, y, "multiclass") == pytest.approx(float(ref), abs=1e-5)


@pytest.mark.parametrize("kind", ["multiclass", "binary"])
def test_temperature_scaling_lowers_ece_of_an_overconfident_model(kind: str) -> None:
    y, z = _multiclass(n=2000, c=4 if kind == "multiclass" else 2, seed=6)
    if kind == "binary":
        z = z[:, 1] - z[:, 0]
    z = z * 5  # over-confident: the same ranking, five times the logits
    record = cal.fit_temperature(z, y, kind)
    assert record["temperature"] > 2
    assert record["ece_after"] < record["ece_before"] / 2
    assert record["nll_after"] < record["nll_before"]
    assert cal.validate(record) is record
    # predictions never change
    before = mt.probabilities(z, kind)
    after = mt.probabilities(z, kind, record["temperature"])
    assert np.array_equal(before.argmax(-1) if kind == "multiclass" else before >= 0.5,
                          after.argmax(-1) if kind == "multiclass" else after >= 0.5)  # fmt: skip


def test_read_temperature(tmp_path) -> None:
    assert cal.read_temperature(tmp_path) is None
    y, z = _multiclass()
    record = cal.fit_temperature(z, y, "multiclass")
    (tmp_path / "evaluation").mkdir()
    cal.write(tmp_path / "evaluation", record)
    assert cal.read_temperature(tmp_path) == pytest.approx(record["temperature"])
    path = tmp_path / "evaluation" / "calibration.json"
    path.write_text(json.dumps({**record, "temperature": -1}))
    with pytest.raises(DataError, match="temperature is -1; expected a finite number > 0"):
        cal.read_temperature(tmp_path)
    path.write_text("{not json")
    with pytest.raises(DataError, match="not readable JSON"):
        cal.read_temperature(tmp_path)


def test_bad_inputs_are_clear_errors() -> None:
    with pytest.raises(DataError, match="scores contain NaN"):
        mt.classification_metrics([0, 1], [0.5, math.nan], "binary")
    with pytest.raises(DataError, match=r"labels 0\.\.7 for 3 classes"):
        mt.classification_metrics([0, 7], np.full((2, 3), 1 / 3), "multiclass")
