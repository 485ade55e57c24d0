"""Export: every format on every zoo model, parity with eager PyTorch, the card, atomicity, errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import QUIET, gradwise_cli, gradwise_main
from torch import nn

import gradwise as gw
from gradwise.deploy import export, load_card, load_reference, load_runner
from gradwise.deploy.card import bin_fractions, preprocess, unpreprocess
from gradwise.deploy.export import ExportError, ParityError
from gradwise.errors import ConfigError

SEQ = {"n_samples": 160, "seq_len": 12, "vocab_size": 10}
TINY_TRANSFORMER = {"d_model": 16, "n_heads": 2, "n_layers": 1, "dropout": 0.0}

# tiny but real trained runs of every zoo model (one epoch or a few steps)
ZOO = {
    "mlp": ({"name": "mlp", "kwargs": {"hidden": [32]}}, {"name": "digits"}, {"ema_decay": 0.9}),
    "cnn": ({"name": "cnn", "kwargs": {"channels": [8]}}, {"name": "digits"}, {}),
    "resnet": (
        {"name": "resnet", "kwargs": {"widths": [8, 16], "blocks_per_stage": [1, 1]}},
        {"name": "digits"},
        {},
    ),
    "transformer": (
        {"name": "transformer", "kwargs": TINY_TRANSFORMER},
        {"name": "synthetic_sequences", "kwargs": {**SEQ, "n_classes": 3}},
        {},
    ),
    "gpt": (
        {"name": "gpt", "kwargs": {**TINY_TRANSFORMER, "n_layers": 2}},
        {"name": "synthetic_sequences", "kwargs": {**SEQ, "task": "lm"}},
        {"task": "lm"},
    ),
    "rnn": (
        {"name": "rnn", "kwargs": {"hidden": 16, "embed_dim": 8, "cell": "gru"}},
        {"name": "synthetic_sequences", "kwargs": {**SEQ, "n_classes": 3}},
        {},
    ),
}
FORMATS = ["onnx", "torch-export", "torchscript"]
NO_DOCTOR = {"doctor": {"mode": "off"}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, (model, data, extra) in ZOO.items():
        recipe = {"name": name, "model": model, "data": data, **NO_DOCTOR}
        recipe["tracking"] = {"root": str(root)}
        run = gw.Trainer(recipe=recipe, epochs=1, max_steps=6, **extra, **QUIET)
        out[name] = run.fit().dir
    return out


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", list(ZOO))
def test_every_format_matches_eager_pytorch_on_every_zoo_model(runs, tmp_path, name, fmt):
    artifact = export(runs[name], fmt, out=tmp_path / "out")
    parity = artifact.parity
    assert parity["passed"] and parity["max_abs"] <= 1e-4 and parity["inputs"] == "validation"
    # the whole validation split: 20% of 1797 digits or of 160 sequences
    assert parity["samples"] == (360 if ZOO[name][1]["name"] == "digits" else 32)
    # the artifact runs on its own (a fresh runtime) with a batch size it was not exported with
    card = artifact.card
    x = _inputs(card, 5)
    got = load_runner(artifact.path)(x)
    assert got.shape == (5, *card["outputs"][0]["shape"][1:])
    assert card["inputs"][0]["shape"][0] is None and card["outputs"][0]["shape"][0] is None


def _inputs(card: dict, n: int) -> np.ndarray:
    spec = card["inputs"][0]
    rng = np.random.default_rng(0)
    if spec["dtype"] == "int64":
        return rng.integers(0, 10, (n, *spec["shape"][1:]), dtype=np.int64)
    return rng.standard_normal((n, *spec["shape"][1:])).astype(np.float32)


def test_model_card_fields_and_sha256(runs, tmp_path):
    artifact = export(runs["mlp"], "onnx", out=tmp_path / "mlp")
    card = load_card(artifact.dir)
    assert card == json.loads(json.dumps(artifact.card))
    assert card["name"] == "mlp" and card["format"] == "onnx" and card["artifact"] == "model.onnx"
    assert card["sha256"] == hashlib.sha256((artifact.dir / "model.onnx").read_bytes()).hexdigest()
    assert card["inputs"] == [{"name": "input", "shape": [None, 1, 8, 8], "dtype": "float32"}]
    assert card["outputs"] == [{"name": "output", "shape": [None, 10], "dtype": "float32"}]
    assert card["task"] == "multiclass" and card["class_labels"] == [str(i) for i in range(10)]
    assert card["preprocessing"]["scale"] == 1 / 16 and "standardize" in card["preprocessing"]
    assert card["recipe"]["model"]["kwargs"]["hidden"] == [32]
    assert set(card["versions"]) == {"gradwise", "torch", "onnx", "onnxruntime", "python"}
    assert card["quantized"] is None and card["created"] and card["opset"] >= 18
    assert card["source"]["weights"] == "ema"  # the run kept an EMA: it validated those weights
    # the card's metrics are the best checkpoint's, and the artifact reproduces them
    meta = json.loads((Path(card["source"]["checkpoint"]) / "meta.json").read_text())
    assert card["metrics"] == {k: v for k, v in meta.items() if k.startswith("val_")}
    bundle = gw.load_data("digits")
    x, y = bundle.val.tensors
    accuracy = float((load_runner(artifact.path)(x.numpy()).argmax(-1) == y.numpy()).mean())
    assert accuracy == pytest.approx(card["metrics"]["val_accuracy"], abs=1e-6)


def test_reference_statistics_describe_raw_training_inputs(runs, tmp_path):
    artifact = export(runs["cnn"], "torchscript", out=tmp_path / "cnn")
    ref = load_reference(artifact.dir)
    assert ref["space"] == "raw" and ref["kind"] == "summary" and ref["n"] == 1437
    assert [f["name"] for f in ref["features"]] == ["mean", "std", "min", "max", "channel0_mean"]
    pixel_max = ref["features"][3]
    assert pixel_max["min"] >= 0 and pixel_max["max"] <= 16 + 1e-6  # raw digits pixels: 0..16
    for feature in ref["features"]:
        assert len(feature["fractions"]) == len(feature["edges"]) + 1 <= 10
        assert sum(feature["fractions"]) == pytest.approx(1.0)
        assert len(feature["sample"]) == 1000
    pred = ref["predictions"]
    assert pred["kind"] == "classes" and pred["labels"] == [str(i) for i in range(10)]
    assert sum(pred["fractions"]) == pytest.approx(1.0)
    gpt = export(runs["gpt"], "onnx", out=tmp_path / "gpt")
    lm, positions = load_reference(gpt.dir), gpt.card["inputs"][0]["shape"][1]
    # 12 token positions are a short row: one feature per position; no prediction stats for LMs
    assert lm["kind"] == "features" and len(lm["features"]) == positions == 12
    assert lm["predictions"] is None


def test_tabular_reference_names_features_and_uses_quantile_bins(tmp_path):
    recipe = {"model": {"name": "mlp", "kwargs": {"hidden": [16]}}, "data": {"name": "iris"}}
    run = gw.Trainer(recipe={**recipe, **NO_DOCTOR}, epochs=1, **QUIET).fit()
    artifact = export(run.dir, "onnx", out=tmp_path / "iris")
    ref, card = load_reference(artifact.dir), artifact.card
    assert ref["kind"] == "features"
    assert [f["name"] for f in ref["features"]] == gw.load_data("iris").info.feature_names
    raw = unpreprocess(gw.load_data("iris").train.tensors[0].numpy(), card["preprocessing"])
    first = ref["features"][0]
    assert first["mean"] == pytest.approx(raw[:, 0].mean())  # centimetres, not standardised
    assert first["fractions"] == pytest.approx(bin_fractions(raw[:, 0], first["edges"]).tolist())
    assert np.allclose(
        preprocess(raw, card["preprocessing"]), gw.load_data("iris").train.tensors[0]
    )


def test_failed_parity_leaves_no_export_directory(runs, tmp_path):
    out = tmp_path / "exports" / "onnx"
    with pytest.raises(ParityError, match="tolerance 1e-12"):
        export(runs["mlp"], "onnx", out=out, tolerance=1e-12)
    assert not out.exists() and list(out.parent.iterdir()) == []  # no temporary left either
    good = export(runs["mlp"], "onnx", out=out)  # an earlier good export survives a failed one
    with pytest.raises(ParityError):
        export(runs["mlp"], "onnx", out=out, tolerance=1e-12)
    assert load_card(out)["sha256"] == good.card["sha256"] and (out / "model.onnx").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["onnx"]


class Branchy(nn.Module):
    """Data-dependent Python control flow: torch.export (and so the ONNX exporter) cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.a(x)
        return self.b(x)


@pytest.mark.parametrize("fmt", ["onnx", "torch-export"])
def test_untraceable_model_fails_with_a_clear_error(tmp_path, fmt):
    with pytest.raises(ExportError, match=f"{fmt} export of Branchy failed: .*data-dependent"):
        export(None, fmt, out=tmp_path / fmt, model=Branchy(), sample=torch.randn(8, 4))
    assert not (tmp_path / fmt).exists()
    # TorchScript scripting keeps the control flow: the legacy format handles this model
    artifact = export(
        None, "torchscript", out=tmp_path / "ts", model=Branchy(), sample=torch.randn(8, 4)
    )
    assert artifact.card["torchscript"] == "script" and artifact.parity["passed"]


def test_model_object_runs_need_the_model_and_a_sample(tmp_path, blobs):
    x, y = blobs
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    data = (x[:200], y[:200]), (x[200:], y[200:])
    run = gw.Trainer(model, *data, recipe=NO_DOCTOR, epochs=1, **QUIET).fit()
    with pytest.raises(ConfigError, match="Sequential model object"):
        export(run.dir, "onnx")
    with pytest.raises(ConfigError, match="sample"):
        export(run.dir, "onnx", model=nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)))
    fresh = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    artifact = export(run.dir, "onnx", model=fresh, sample=(x[200:], y[200:]))
    assert artifact.dir == run.dir / "export" / "onnx" and artifact.parity["inputs"] == "sample"
    # the run's weights were loaded into the fresh model
    assert torch.equal(fresh[0].weight, run.model[0].weight.detach().cpu())
    with pytest.raises(ConfigError, match="out"):
        export(None, "onnx", model=fresh, sample=x)


def test_cli_export_writes_the_directory_and_bad_input_exits_2(runs, tmp_path):
    result = gradwise_cli(
        "export", str(runs["rnn"]), "--format", "torch-export", "-o", "pt2", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "parity: max abs" in result.stdout and "model.json" in result.stdout
    assert sorted(p.name for p in (tmp_path / "pt2").iterdir()) == [
        "model.json", "model.pt2", "reference.json",
    ]  # fmt: skip
    bad = gradwise_cli(
        "export", str(runs["rnn"]), "--quantize", "static", "--format", "torchscript"
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: quantize")
    assert "Traceback" not in bad.stderr


def test_cli_export_registers_with_an_alias(runs, tmp_path, monkeypatch, capsys):
    from gradwise.deploy.registry import resolve

    # in this process (three subprocesses would import torch, ONNX and MLflow three times)
    uri = f"sqlite:///{(tmp_path / 'reg.db').as_posix()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    args = ("export", str(runs["mlp"]), "-o", "mlp-onnx", "--register", "digits")
    code, out, err = gradwise_main(monkeypatch, capsys, *args, "--alias", "champion")
    assert code == 0, err
    assert "registered digits version 1: gradwise serve models:/digits@champion" in out
    code, out, err = gradwise_main(monkeypatch, capsys, *args[:3], "mlp-onnx-2", *args[4:])
    assert code == 0, err
    assert "registered digits version 2: gradwise serve models:/digits/2" in out
    code, _, err = gradwise_main(
        monkeypatch, capsys, "export", str(runs["mlp"]), "--alias", "champion"
    )
    assert code == 2 and err.startswith("error: --alias")
    assert "Traceback" not in err
    champion = resolve("models:/digits@champion", tmp_path / "dl", uri=uri)
    card = json.loads((champion / "model.json").read_text())
    assert (
        card["sha256"] == json.loads((tmp_path / "mlp-onnx" / "model.json").read_text())["sha256"]
    )
