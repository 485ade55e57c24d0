"""Artifact formats are rows of one table: a new row exports, loads, benchmarks and is trusted like
the built-in ones, and a name that is no row gets a did-you-mean."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradwise.deploy import bench, export, load_runner
from gradwise.deploy.formats import FORMATS, Format, serving_card
from gradwise.errors import ConfigError
from gradwise.trust import UntrustedError


def _write_pickle(model: nn.Module, example: torch.Tensor, path: Path) -> dict:
    torch.save(model, path)
    return {"pickled_with": torch.__version__}


def _load_pickle(path: Path, threads: int | None):
    module = torch.load(path, weights_only=False).eval()
    return lambda x: module(torch.from_numpy(x)).detach().numpy()


PICKLE = Format("pickle", "model.pkl", _write_pickle, _load_pickle, "torch-pickle", unpickles=True)


@pytest.fixture
def pickle_format(monkeypatch: pytest.MonkeyPatch) -> Format:
    monkeypatch.setitem(FORMATS, PICKLE.name, PICKLE)
    return PICKLE


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def test_a_new_format_is_one_row(pickle_format, tmp_path):
    net, sample = model(), torch.randn(16, 4)
    artifact = export(None, "pickle", out=tmp_path / "pkl", model=net, sample=sample)
    assert artifact.path == tmp_path / "pkl" / "model.pkl" and artifact.parity["passed"]
    assert artifact.card["format"] == "pickle" and artifact.card["pickled_with"]
    x = sample[:3].numpy()
    assert np.allclose(load_runner(artifact.path)(x), net(sample[:3]).detach().numpy())
    result = bench(artifact.dir, batch_sizes=(2,), seconds=0.02, model=net)
    assert [r["backend"] for r in result.rows] == ["eager", "torch-pickle"]
    with pytest.raises(ConfigError, match="format: got 'pickle'; expected 'onnx'"):
        serving_card(artifact.dir)  # gradwise serve runs ONNX Runtime
    with pytest.raises(ConfigError, match=r"quantize: got 'dynamic'; expected format 'onnx'"):
        export(None, "pickle", out=tmp_path / "q", model=net, sample=sample, quantize="dynamic")
    other = tmp_path / "other.pkl"  # a pickle gradwise did not write: it runs code when loaded
    torch.save(net, other)
    with pytest.raises(UntrustedError, match=r"other\.pkl"):
        load_runner(other)
    assert load_runner(other, trusted=True)(x).shape == (3, 3)


def test_a_format_that_is_no_row_gets_a_did_you_mean(tmp_path):
    with pytest.raises(ConfigError, match=r"format: got 'onxx'; expected one of .*'onnx'\?"):
        export(None, "onxx", out=tmp_path / "x", model=model(), sample=torch.randn(4, 4))
    with pytest.raises(ConfigError, match=r"a \.onnx, \.pt2 or \.ts file"):
        load_runner(tmp_path / "model.bin")
