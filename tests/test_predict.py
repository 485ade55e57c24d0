"""gradwise predict on real runs: the model's own outputs, calibrated probabilities, CSV/NumPy/images,
clear errors, and text generation for language models."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import QUIET, gradwise_main

import gradwise as gw
from gradwise.errors import ConfigError, DataError

NO_DOCTOR = {"doctor": {"mode": "off"}}


def _train(root: Path, name: str, model: dict, data: dict, **extra) -> Path:
    recipe = {
        "name": name,
        "model": model,
        "data": data,
        **NO_DOCTOR,
        "tracking": {"root": str(root)},
    }
    return gw.Trainer(recipe=recipe, epochs=1, max_steps=6, **extra, **QUIET).fit().dir


@pytest.fixture(scope="module")
def iris(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny iris MLP run, its own model (built and loaded independently of predict), and the
    validation rows as raw features."""
    from gradwise.deploy.card import unpreprocess

    root = tmp_path_factory.mktemp("runs")
    run = _train(root, "iris", {"name": "mlp", "kwargs": {"hidden": [16]}}, {"name": "iris"})
    recipe = gw.load_recipe(run / "recipe.yaml")
    model = gw.build_model(recipe.model.name, recipe.model.kwargs)
    gw.load_checkpoint(run, model)
    bundle = gw.load_data("iris")
    x, y = bundle.val.tensors
    with torch.no_grad():
        logits = model.eval()(x).double().numpy()
    raw = unpreprocess(x.numpy(), bundle.info.preprocessing)
    return {"run": run, "logits": logits, "raw": raw, "y": y.numpy(), "info": bundle.info}


def _csv(path: Path, header: list[str], rows: np.ndarray | list) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_predictions_from_a_run_equal_the_models_own_outputs(iris, tmp_path):
    info, raw = iris["info"], iris["raw"]
    # columns in another order, plus the label column: matched by name, the label ignored
    names = list(reversed(info.feature_names))
    rows = np.column_stack([raw[:, ::-1], iris["y"]])
    data = _csv(tmp_path / "new.csv", [*names, "label"], rows.tolist())
    result = gw.predict(iris["run"], data, output=tmp_path / "out" / "p.csv")

    expected = _softmax(iris["logits"])
    assert not result.calibrated and result.temperature == 1.0
    assert "not calibrated" in result.notes[0]
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
    np.testing.assert_allclose(result.probabilities.sum(1), 1.0, atol=1e-12)
    assert result.labels == [info.class_names[c] for c in expected.argmax(1)]

    with (tmp_path / "out" / "p.csv").open() as f:
        table = list(csv.reader(f))
    assert table[0] == ["row", "label", "class", *(f"p_{c}" for c in info.class_names)]
    assert len(table) == len(raw) + 1
    written = np.array([[float(v) for v in r[3:]] for r in table[1:]])
    np.testing.assert_allclose(written, expected, atol=1e-6)

    np.save(tmp_path / "x.npy", raw)  # the same rows as a NumPy file
    np.testing.assert_allclose(
        gw.predict(iris["run"], tmp_path / "x.npy").probabilities, expected, atol=1e-5
    )


def test_a_fitted_temperature_of_2_flattens_the_probabilities(iris, tmp_path):
    run = iris["run"]
    calibration = run / "evaluation" / "calibration.json"
    calibration.parent.mkdir(exist_ok=True)
    calibration.write_text(json.dumps({
        "method": "temperature", "temperature": 2.0, "fitted_on": "validation", "samples": 30,
        "ece_before": 0.2, "ece_after": 0.05, "nll_before": 0.9, "nll_after": 0.7,
    }))  # fmt: skip
    np.save(tmp_path / "x.npy", iris["raw"])
    try:
        result = gw.predict(run, tmp_path / "x.npy")
    finally:
        calibration.unlink()
    plain = _softmax(iris["logits"])
    assert result.calibrated and result.temperature == 2.0
    np.testing.assert_allclose(result.probabilities, _softmax(iris["logits"] / 2), atol=1e-5)
    np.testing.assert_allclose(result.probabilities.sum(1), 1.0, atol=1e-12)
    assert (result.probabilities.argmax(1) == plain.argmax(1)).all()  # same classes
    assert (result.probabilities.max(1) < plain.max(1)).all()  # less confident, every row

    calibration.parent.mkdir(exist_ok=True)
    calibration.write_text(json.dumps({"method": "temperature", "temperature": -1}))
    try:
        with pytest.raises((ConfigError, DataError), match="temperature"):
            gw.predict(run, tmp_path / "x.npy")
    finally:
        calibration.unlink()


def test_bad_input_exits_2_with_a_clear_message(iris, tmp_path, monkeypatch, capsys):
    run = str(iris["run"])
    three = _csv(tmp_path / "three.csv", ["a", "b", "c"], iris["raw"][:4, :3].tolist())
    code, _, err = gradwise_main(monkeypatch, capsys, "predict", run, "--data", str(three))
    assert code == 2 and "expected 4 feature columns" in err and "got 3" in err
    assert not (tmp_path / "predictions.csv").exists()  # nothing half-written

    (tmp_path / "rows.txt").write_text("1 2 3 4\n")
    code, _, err = gradwise_main(monkeypatch, capsys, "predict", run, "--data", "rows.txt")
    assert code == 2 and "rows.txt" in err and ".csv, .npy or .npz" in err

    code, _, err = gradwise_main(monkeypatch, capsys, "predict", "runs/nope", "--data", str(three))
    assert code == 2 and "runs/nope does not exist" in err

    np.save(tmp_path / "wide.npy", np.zeros((2, 5), np.float32))
    code, _, err = gradwise_main(monkeypatch, capsys, "predict", run, "--data", "wide.npy")
    assert code == 2 and "expected samples of shape [4], got [5]" in err

    ok = _csv(tmp_path / "ok.csv", ["a", "b", "c", "d"], iris["raw"][:4].tolist())  # by count
    code, out, _ = gradwise_main(monkeypatch, capsys, "predict", run, "--data", str(ok))
    assert code == 0 and "4 predictions: predictions.csv" in out
    assert len((tmp_path / "predictions.csv").read_text().splitlines()) == 5


def test_an_image_folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, colour in (("dark", 40), ("light", 210)):
        (root / "train" / c).mkdir(parents=True)
        for i in range(6):
            pixels = np.clip(colour + rng.normal(0, 20, (10, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "train" / c / f"{i}.png")
    (root / "new").mkdir()
    for i in (0, 1):
        src = root / "train" / ("dark", "light")[i] / "0.png"
        (root / "new" / f"img{i}.png").write_bytes(src.read_bytes())
    data = {"name": "image_folder", "kwargs": {"path": str(root / "train"), "image_size": 8}}
    run = _train(root / "runs", "img", {"name": "cnn", "kwargs": {"channels": [4]}}, data)

    result = gw.predict(run, root / "new", output=root / "p.csv")
    assert result.index == ["img0.png", "img1.png"]
    assert set(result.labels) <= {"dark", "light"}
    # the model's own outputs on the images, preprocessed by hand from the run's record
    info = gw.load_data("image_folder", data["kwargs"]).info
    record = info.preprocessing["standardize"]
    pixels = np.stack([
        np.asarray(Image.open(root / "new" / f"img{i}.png").convert("RGB").resize((8, 8), Image.Resampling.BILINEAR))
        for i in (0, 1)
    ]).transpose(0, 3, 1, 2) / 255.0  # fmt: skip
    x = (pixels - np.reshape(record["mean"], (1, -1, 1, 1))) / np.reshape(
        record["std"], (1, -1, 1, 1)
    )
    recipe = gw.load_recipe(run / "recipe.yaml")
    model = gw.build_model(recipe.model.name, recipe.model.kwargs)
    gw.load_checkpoint(run, model)
    with torch.no_grad():
        logits = model.eval()(torch.tensor(x, dtype=torch.float32)).double().numpy()
    expected = gw.predict.probabilities(logits, recipe.task)
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
    assert (root / "p.csv").read_text().splitlines()[1].startswith("img0.png,")


def test_a_language_model_generates_the_requested_tokens(tmp_path, monkeypatch, capsys):
    data = {
        "name": "synthetic_sequences",
        "kwargs": {"n_samples": 64, "seq_len": 8, "vocab_size": 10, "task": "lm"},
    }
    model = {"name": "gpt", "kwargs": {"d_model": 16, "n_heads": 2, "n_layers": 1, "dropout": 0.0}}
    run = _train(tmp_path / "runs", "lm", model, data, task="lm")

    result = gw.predict(run, prompt="1 2 3", max_tokens=11, seed=3, checkpoint="last")
    assert len(result.tokens) == 11 and all(0 <= t < 10 for t in result.tokens)
    assert gw.predict(run, prompt="1 2 3", max_tokens=11, seed=3).tokens == result.tokens
    greedy = gw.predict(run, prompt="1 2 3", max_tokens=11, temperature=0)
    assert gw.predict(run, prompt="1 2 3", max_tokens=11, temperature=0, seed=9).tokens == (
        greedy.tokens
    )  # greedy decoding does not sample: the seed does not matter
    with pytest.raises(ConfigError, match="token ids in"):
        gw.predict(run, prompt="1 99", max_tokens=2)

    code, out, _ = gradwise_main(
        monkeypatch, capsys, "predict", str(run), "--prompt", "4 5", "--max-tokens", "5",
        "--output", "gen.txt",
    )  # fmt: skip
    assert code == 0 and len((tmp_path / "gen.txt").read_text().split()) == 2 + 5
    assert out.startswith("4 5 ") and (tmp_path / "gen.txt").read_text() in out
