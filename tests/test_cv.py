"""Cross-validation (gradwise cv) and paired significance tests (cv --against, gradwise compare),
on real runs: a tiny MLP on iris, 3 folds, trained once per module and shared."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import gradwise_main

import gradwise as gw
from gradwise.compare import paired_bootstrap
from gradwise.cv import corrected_t_test, fold_data, make_folds
from gradwise.data import load_data

K = 3


def _recipe(root: Path, **changes) -> dict:
    r = {
        "model": {"name": "mlp", "kwargs": {"hidden": [16]}},
        "data": {"name": "iris", "batch_size": 32},
        "optim": {"lr": 0.03},
        "train": {"epochs": 25},
        "tracking": {"root": str(root), "mlflow": False, "tensorboard": False, "progress": False},
        "doctor": {"mode": "off"},
    }
    for key, value in changes.items():
        section, _, name = key.partition(".")
        if name:
            r.setdefault(section, {})[name] = value
        else:
            r[key] = value
    return r


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cv")


@pytest.fixture(scope="module")
def same(root):
    """The same recipe with two training seeds, on the same folds."""
    return gw.cv(_recipe(root), folds=K, against=_recipe(root, seed=1))


@pytest.fixture(scope="module")
def worse(root):
    """A good recipe against one that cannot learn (learning rate 1e-6)."""
    return gw.cv(_recipe(root), folds=K, against=_recipe(root, **{"optim.lr": 1e-6}))


def test_folds_are_disjoint_cover_the_data_and_are_stratified():
    train = load_data("iris").train
    y = train.tensors[1].numpy()
    folds = make_folds(train, "multiclass", 4, seed=0)
    vals = [v for _, v in folds.splits]
    assert folds.splitter == "StratifiedKFold"
    assert sorted(np.concatenate(vals).tolist()) == list(range(len(y)))  # disjoint and covering
    for tr, va in folds.splits:
        assert not set(tr) & set(va) and len(tr) + len(va) == len(y)
        whole = np.bincount(y, minlength=3) / len(y)
        assert np.all(np.abs(np.bincount(y[va], minlength=3) - whole * len(va)) <= 1)
    regression = make_folds(load_data("diabetes").train, "regression", 3, seed=0)
    assert regression.splitter == "KFold"


def test_each_fold_refits_the_standardisation_on_its_own_training_part():
    data = {"name": "wine", "kwargs": {}}
    bundle = fold_data(data, folds=K, fold=2)
    x_tr, x_va = bundle.train.tensors[0], bundle.val.tensors[0]
    np.testing.assert_allclose(x_tr.mean(0).numpy(), 0, atol=1e-5)  # fitted on these rows only
    np.testing.assert_allclose(x_tr.std(0, unbiased=False).numpy(), 1, atol=1e-4)
    assert abs(float(x_va.mean())) > 1e-4  # the held-out rows were not in the fit
    record = bundle.info.preprocessing["standardize"]
    raw = load_data("wine", {"val_fraction": 0}).info.preprocessing["standardize"]
    assert record["mean"] != raw["mean"]
    assert bundle.info.n_train + bundle.info.n_val == len(load_data("wine").train)


def test_cv_writes_fold_runs_and_a_summary(same, monkeypatch, capsys):
    cv = json.loads((same.dir / "cv.json").read_text())
    assert cv["state"] == "finished" and cv["splitter"] == "StratifiedKFold"
    states = [json.loads(Path(r["dir"], "status.json").read_text())["state"] for r in cv["runs"]]
    assert states == ["finished"] * K
    s = cv["summary"]["val_accuracy"]
    assert len(s["values"]) == K and s["ci95"][0] <= s["mean"] <= s["ci95"][1]
    # the corrected interval is wider than the naive one (folds share training data)
    assert s["ci95"][1] - s["ci95"][0] > s["ci95_naive"][1] - s["ci95_naive"][0]
    assert s["mean"] > 0.8
    # a fold is a normal run: its recipe names its fold, `gradwise runs` lists it
    recipe = yaml.safe_load((same.dir / "a" / "fold-2" / "recipe.yaml").read_text())
    assert (
        recipe["data"]["name"] == "gradwise.cv:fold_data" and recipe["data"]["kwargs"]["fold"] == 2
    )
    code, out, _ = gradwise_main(monkeypatch, capsys, "runs", "--root", str(same.dir / "a"))
    assert code == 0 and all(f"fold-{k}" in out for k in range(1, K + 1))


def test_two_seeds_of_the_same_recipe_are_not_significantly_different(same):
    assert same.verdict == "not significant"
    c = same.comparison["val_accuracy"]
    assert c["p_value"] >= 0.05 and c["ci95"][0] <= 0 <= c["ci95"][1]


def test_a_clearly_worse_recipe_is_significantly_worse(worse):
    c = worse.comparison["val_accuracy"]
    assert worse.verdict == "significant" and c["p_value"] < 0.05, c
    assert c["better"] == "a" and c["difference"] > 0.3
    assert worse.comparison["val_loss"]["better"] == "a"  # lower loss is better


def test_compare_runs_on_the_same_fold_with_a_paired_bootstrap(worse, same, monkeypatch, capsys):
    a, b = worse.dir / "a" / "fold-1", worse.dir / "b" / "fold-1"
    r = gw.compare(a, b)
    assert r["metric"] == "val_accuracy" and r["verdict"] == "significant" and r["better"] == "a"
    # the metric from the reloaded best checkpoint equals what the run recorded while training
    assert r["a"] == pytest.approx(worse.runs[0].metrics["val_accuracy"], abs=1e-6)
    assert r["b"] == pytest.approx(worse.against["runs"][0].metrics["val_accuracy"], abs=1e-6)
    r = gw.compare(same.dir / "a" / "fold-1", same.dir / "b" / "fold-1")
    assert r["verdict"] == "not significant" and r["p_value"] >= 0.05
    code, out, _ = gradwise_main(
        monkeypatch, capsys, "compare", str(a), str(b), "--resamples", "500"
    )
    assert code == 0 and "significant" in out and "p = " in out


def test_compare_refuses_runs_validated_on_different_samples(same, monkeypatch, capsys):
    a1, a2 = same.dir / "a" / "fold-1", same.dir / "a" / "fold-2"
    code, _, err = gradwise_main(monkeypatch, capsys, "compare", str(a1), str(a2))
    assert code == 2 and "different samples" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("folds", "expected"), [("1", "an integer >= 2"), ("41", "smallest class")]
)
def test_bad_k_exits_2_before_any_run(tmp_path, monkeypatch, capsys, folds, expected):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(tmp_path / "runs")))
    code, _, err = gradwise_main(monkeypatch, capsys, "cv", str(path), "--folds", folds)
    assert code == 2 and expected in err and "--folds" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_against_a_recipe_on_other_data_is_refused(tmp_path):
    with pytest.raises(gw.ConfigError, match="same data"):
        gw.cv(_recipe(tmp_path), folds=K, against=_recipe(tmp_path, data={"name": "wine"}))


def test_corrected_t_test_and_bootstrap_by_hand():
    a, b, ratio = [0.9, 0.8, 0.85, 0.95], [0.7, 0.75, 0.7, 0.8], 1 / 3
    d = np.subtract(a, b)
    t = d.mean() / math.sqrt((1 / 4 + ratio) * d.var(ddof=1))
    r = corrected_t_test(a, b, ratio)
    assert r["t"] == pytest.approx(t) and r["df"] == 3
    from scipy import stats

    assert r["p_value"] == pytest.approx(2 * stats.t.sf(t, 3))
    # without the correction the same data would look more significant
    naive = d.mean() / (d.std(ddof=1) / 2)
    assert naive > t
    values = np.arange(50) % 2 == 0
    same = paired_bootstrap(lambda i: values[i].mean(-1), lambda i: values[i].mean(-1), 50)
    assert same["p_value"] == 1.0 and same["verdict"] == "not significant"
