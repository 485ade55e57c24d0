"""/v1/drift on a real export: a digits CNN trained for a few steps, exported by gradwise export,
served the raw training images it was trained on."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import QUIET

from gradwise.deploy.serve import create_app

from .conftest import live_server
from .test_serve_limits import npy


@pytest.fixture(scope="module")
def digits_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import gradwise as gw
    from gradwise.deploy import export

    root = tmp_path_factory.mktemp("runs")
    recipe = {
        "name": "digits-cnn",
        "model": {"name": "cnn", "kwargs": {"channels": [8]}},
        "data": {"name": "digits"},
        "doctor": {"mode": "off"},
        "tracking": {"root": str(root)},
    }
    run = gw.Trainer(recipe=recipe, epochs=1, max_steps=6, **QUIET).fit()
    return export(run.dir, "onnx").dir


@pytest.mark.slow
def test_serving_the_training_data_reports_no_drift_and_brighter_images_do(digits_export) -> None:
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float32)[:, None]  # raw pixels 0..16, [N, 1, 8, 8]
    app = create_app(digits_export, drift_window=1000, drift_min_rows=200)
    with live_server(app) as (url, _), httpx.Client(base_url=url) as client:
        headers = {"Content-Type": "application/x-npy"}
        assert client.post("/v1/predict", content=npy(images[:1000]), headers=headers).is_success
        report = client.get("/v1/drift").json()
        assert report["kind"] == "summary"
        assert report["verdict"] == "no drift", report["drifted"]
        by_name = {f["name"]: f for f in report["features"]}
        assert by_name["min"]["ks_statistic"] < 0.05  # was 1.0: every image's min is 0

        brighter = np.minimum(images[:1000] + 2, 16)
        assert client.post("/v1/predict", content=npy(brighter), headers=headers).is_success
        report = client.get("/v1/drift").json()
    assert report["verdict"] == "significant drift"
    assert {"mean", "min"} <= set(report["drifted"])
