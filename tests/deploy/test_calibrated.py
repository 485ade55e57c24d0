"""The run's fitted temperature travels into the export and is applied by ONNX Runtime prediction
and by a real gradwise server: probabilities are softmax(logits / T), labels unchanged."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from conftest import QUIET

import gradwise as gw
from gradwise.deploy.card import card_temperature
from gradwise.deploy.serve import Model, create_app
from gradwise.errors import ConfigError

from .conftest import live_server

T = 2.0


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny iris run with a fitted temperature of 2, exported to ONNX."""
    from gradwise.deploy.card import unpreprocess

    root = tmp_path_factory.mktemp("calibrated")
    recipe = {
        "name": "iris", "model": {"name": "mlp", "kwargs": {"hidden": [16]}},
        "data": {"name": "iris"}, "doctor": {"mode": "off"}, "tracking": {"root": str(root)},
    }  # fmt: skip
    run = gw.Trainer(recipe=recipe, epochs=1, max_steps=6, **QUIET).fit().dir
    (run / "evaluation").mkdir()
    (run / "evaluation" / "calibration.json").write_text(json.dumps({
        "method": "temperature", "temperature": T, "fitted_on": "validation", "samples": 30,
        "ece_before": 0.2, "ece_after": 0.05, "nll_before": 0.9, "nll_after": 0.7,
    }))  # fmt: skip
    artifact = gw.export(run, "onnx", out=root / "export")
    bundle = gw.load_data("iris")
    raw = unpreprocess(bundle.val.tensors[0].numpy(), bundle.info.preprocessing)
    np.save(root / "rows.npy", raw)
    return {"run": run, "artifact": artifact, "rows": root / "rows.npy", "raw": raw}


def test_export_carries_the_temperature_and_onnx_runtime_applies_it(exported):
    card = exported["artifact"].card
    assert card["calibration"]["temperature"] == T and card["calibration"]["ece_after"] == 0.05
    from_run = gw.predict(exported["run"], exported["rows"])
    from_export = gw.predict(exported["artifact"].dir, exported["rows"])
    assert from_export.source == "export" and from_export.calibrated
    assert from_export.temperature == T and from_run.temperature == T
    assert from_export.labels == from_run.labels
    np.testing.assert_allclose(from_export.probabilities, from_run.probabilities, atol=1e-5)
    raw_logits = from_export.outputs
    expected = np.exp(raw_logits / T) / np.exp(raw_logits / T).sum(1, keepdims=True)
    np.testing.assert_allclose(from_export.probabilities, expected, atol=1e-9)


def test_the_server_returns_calibrated_probabilities(exported):
    directory = exported["artifact"].dir
    expected = gw.predict(directory, exported["rows"])
    assert Model(directory).temperature == T
    app = create_app(directory, threads=1)
    with live_server(app) as (url, _):
        r = httpx.post(f"{url}/v1/predict", json={"instances": exported["raw"].tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    np.testing.assert_allclose(body["probabilities"], expected.probabilities, atol=1e-6)
    assert body["labels"] == expected.labels


def test_a_card_temperature_is_checked_and_optional():
    assert card_temperature({"task": "multiclass"}) is None  # exports from before: T = 1
    assert card_temperature({"calibration": None}) is None
    for bad in (-1, 0, float("nan"), "2", True):
        with pytest.raises(ConfigError, match=r"calibration\.temperature"):
            card_temperature({"calibration": {"temperature": bad}})
