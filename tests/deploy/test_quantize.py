"""int8 quantization with ONNX Runtime: accuracy next to fp32, size, latency, the files it writes."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import QUIET

import gradwise as gw
from gradwise.deploy import export, load_runner
from gradwise.deploy.quantize import task_metric
from gradwise.errors import ConfigError

NO_DOCTOR = {"doctor": {"mode": "off"}}
DIGITS = {  # trained to a realistic accuracy (MLP ~0.97, CNN ~0.9) in a few seconds
    "mlp": ({"name": "mlp", "kwargs": {"hidden": [128, 128]}}, 8),
    "cnn": ({"name": "cnn", "kwargs": {"channels": [16, 32]}}, 3),
}


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, (model, epochs) in DIGITS.items():
        recipe = {"name": name, "model": model, "data": {"name": "digits"}, **NO_DOCTOR}
        recipe["tracking"] = {"root": str(root)}
        runs[name] = gw.Trainer(recipe=recipe, epochs=epochs, **QUIET).fit().dir
    return runs


@pytest.mark.parametrize("mode", ["static", "dynamic", "qat"])
@pytest.mark.parametrize("name", list(DIGITS))
def test_int8_accuracy_within_one_point_of_fp32_on_digits(digits_runs, tmp_path, name, mode):
    artifact = export(digits_runs[name], "onnx", out=tmp_path / "out", quantize=mode)
    q = artifact.quantized
    int8 = artifact.dir / "model.int8.onnx"
    assert artifact.int8_path == int8 and q["artifact"] == "model.int8.onnx" and q["mode"] == mode
    assert q["sha256"] == hashlib.sha256(int8.read_bytes()).hexdigest()
    assert q["size_bytes"] == int8.stat().st_size < q["float_size_bytes"]
    assert q["metric"] == "accuracy" and q["samples"] == 360  # the whole validation split
    assert q["metric_float"] > 0.85 and q["accuracy_delta"] >= -0.01  # at most one point lost
    assert q["accuracy_delta"] == pytest.approx(q["metric_int8"] - q["metric_float"])
    if mode != "qat":  # QAT goes on training (it may gain), post-training modes only round
        assert abs(q["accuracy_delta"]) <= 0.01 and q["agreement"] >= 0.97
    latency = q["latency_ms"]
    assert latency["batch_size"] == 32 and latency["threads"] == torch.get_num_threads()
    assert latency["float_p50"] > 0 and latency["int8_p50"] > 0 and q["speedup"] > 0
    # the fp32 metric is the float artifact's accuracy on the validation split
    x, y = gw.load_data("digits").val.tensors
    fp32 = float((load_runner(artifact.path)(x.numpy()).argmax(-1) == y.numpy()).mean())
    assert q["metric_float"] == pytest.approx(fp32)
    # what the file holds: QDQ pairs (static) or run-time activation quantization (dynamic)
    ops = {node.op_type for node in onnx.load(str(int8)).graph.node}
    if mode == "static":
        assert q["format"] == "QDQ" and {"QuantizeLinear", "DequantizeLinear"} <= ops
        assert q["calibration_samples"] == 256 and q["per_channel"]
    elif mode == "qat":  # fine-tuned with fake quantization from the run's weights, then QDQ
        assert q["format"] == "QDQ" and {"QuantizeLinear", "DequantizeLinear"} <= ops
        assert q["qat_epochs"] == 2 and q["qat_samples"] == len(gw.load_data("digits").train)
        assert q["qat_lr"] == pytest.approx(
            0.1 * gw.load_recipe(digits_runs[name] / "recipe.yaml").optim.lr
        )
        assert q["qat_final_loss"] < math.log(10)  # below chance: it trained, dropout on
    else:
        assert q["format"] == "QOperator" and "DynamicQuantizeLinear" in ops
    # the int8 model keeps the dynamic batch axis
    assert load_runner(int8)(x[:3].numpy()).shape == (3, 10)


def test_dynamic_int8_transformer(tmp_path):
    data = {"name": "synthetic_sequences", "kwargs": {"n_samples": 200, "seq_len": 12}}
    model = {"name": "transformer", "kwargs": {"d_model": 32, "n_heads": 2, "n_layers": 1}}
    recipe = {"model": model, "data": data, **NO_DOCTOR}
    run = gw.Trainer(recipe=recipe, epochs=2, **QUIET).fit()
    q = export(run.dir, "onnx", out=tmp_path / "t", quantize="dynamic").quantized
    assert q["metric"] == "accuracy" and q["samples"] == 40
    assert abs(q["accuracy_delta"]) <= 0.05  # 40 samples: one flip is 2.5 points
    assert q["size_bytes"] < q["float_size_bytes"]


def test_quantization_needs_onnx(tmp_path):
    model = torch.nn.Linear(4, 2)
    with pytest.raises(ConfigError, match="quantize"):
        export(
            None,
            "torch-export",
            out=tmp_path,
            model=model,
            sample=torch.randn(4, 4),
            quantize="static",
        )
    with pytest.raises(ConfigError, match="quantize"):
        export(None, "onnx", out=tmp_path, model=model, sample=torch.randn(4, 4), quantize="int4")
    with pytest.raises(ConfigError, match=r"quantize: got 'qat'; expected a run whose training"):
        export(None, "onnx", out=tmp_path, model=model, sample=torch.randn(4, 4), quantize="qat")
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing half-written


def test_task_metric_matches_torch():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(6, 5, 7, generator=g), torch.randint(0, 7, (6, 5), generator=g)
    labels[0, :2] = -100  # padding carries no loss
    name, value = task_metric("lm", logits.numpy(), labels.numpy())
    expected = math.exp(F.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1)).item())
    assert name == "perplexity" and value == pytest.approx(expected, rel=1e-6)
    out, y = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5]]), np.array([0, 1, 1])
    assert task_metric("multiclass", out, y) == ("accuracy", pytest.approx(2 / 3))
    assert task_metric("binary", np.array([[0.3], [-1.0]]), np.array([1.0, 1.0]))[1] == 0.5
    assert task_metric("regression", np.array([[1.0], [3.0]]), np.array([0.0, 3.0])) == ("mse", 0.5)
    assert task_metric("custom", out, y) is None
