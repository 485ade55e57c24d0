"""Export directories as untrusted data: confined card paths, required sha256, the artifact
ledger for pickled formats, and what re-exporting does to an earlier int8 model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import QUIET, gradwise_cli

import gradwise as gw
from gradwise.deploy import bench, export, load_card, load_reference, load_runner
from gradwise.deploy.card import sha256_file
from gradwise.errors import ConfigError, GradwiseError
from gradwise.trust import UntrustedError

FAST = {"batch_sizes": (2,), "threads": 1, "seconds": 0.02}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny iris runs with different weights (seeds)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for seed in (0, 1):
        recipe = {
            "name": f"iris-{seed}",
            "seed": seed,
            "model": {"name": "mlp", "kwargs": {"hidden": [8]}},
            "data": {"name": "iris"},
            "doctor": {"mode": "off"},
            "tracking": {"root": str(root)},
        }
        out[seed] = gw.Trainer(recipe=recipe, epochs=1, **QUIET).fit().dir
    return out


@pytest.fixture(scope="module")
def quantized(runs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(
        runs[0], "onnx", out=tmp_path_factory.mktemp("q") / "onnx", quantize="dynamic"
    ).dir


def edit_card(directory: Path, **changes) -> None:
    card = json.loads((directory / "model.json").read_text())
    card.update(changes)
    (directory / "model.json").write_text(json.dumps(card))


@pytest.fixture
def copy(quantized, tmp_path) -> Path:
    return shutil.copytree(quantized, tmp_path / "export")


# -- card paths stay inside the export directory ------------------------------------------------


def test_an_artifact_outside_the_directory_is_refused(copy, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.copy(copy / "model.onnx", outside)
    edit_card(copy, artifact="../outside.onnx")
    with pytest.raises(ConfigError, match=r"model\.json: artifact: got '\.\./outside\.onnx'"):
        load_card(copy)
    edit_card(copy, artifact=str(outside))  # absolute
    with pytest.raises(ConfigError, match=r"model\.json: artifact: got '/"):
        bench(copy, **FAST)
    result = gradwise_cli("bench", str(copy), "--seconds", "0.02")
    assert result.returncode == 2 and result.stderr.startswith("error: model.json: artifact")
    assert result.stderr.strip().count("\n") == 0


def test_symbolic_links_that_lead_out_are_refused(copy, tmp_path):
    from gradwise.deploy.serve import create_app

    outside = tmp_path / "outside.onnx"
    (copy / "model.onnx").rename(outside)
    os.symlink(outside, copy / "model.onnx")  # same bytes, so the sha256 alone would pass
    with pytest.raises(ConfigError, match="symbolic link"):
        create_app(copy)
    (copy / "model.onnx").unlink()
    outside.rename(copy / "model.onnx")
    (copy / "reference.json").rename(tmp_path / "reference.json")
    os.symlink(tmp_path / "reference.json", copy / "reference.json")
    with pytest.raises(ConfigError, match="symbolic link"):
        load_reference(copy)
    with pytest.raises(ConfigError, match=r"symbolic links point to: reference\.json"):
        gw.deploy.register(copy, "linked")


def test_the_int8_artifact_is_confined_and_checked_too(copy):
    card = json.loads((copy / "model.json").read_text())
    edit_card(copy, quantized={**card["quantized"], "artifact": "../../model.int8.onnx"})
    with pytest.raises(ConfigError, match=r"quantized\.artifact"):
        load_card(copy)
    edit_card(copy, quantized={**card["quantized"], "sha256": None})
    with pytest.raises(ConfigError, match=r"model\.json: quantized\.sha256: got None"):
        bench(copy, **FAST)
    edit_card(copy, quantized=card["quantized"])
    (copy / "model.int8.onnx").write_bytes(b"replaced")
    with pytest.raises(GradwiseError, match=r"model\.int8\.onnx does not match the sha256"):
        load_card(copy)


def test_a_card_without_sha256_is_refused_everywhere(copy):
    from gradwise.deploy.serve import create_app

    edit_card(copy, sha256=None)
    with pytest.raises(ConfigError, match=r"model\.json: sha256: got None; expected the sha256"):
        load_card(copy)
    with pytest.raises(ConfigError, match=r"model\.json: sha256"):
        create_app(copy)
    with pytest.raises(ConfigError, match=r"model\.json: sha256"):
        gw.deploy.register(copy, "unsigned")
    result = gradwise_cli("bench", str(copy), "--seconds", "0.02")
    assert result.returncode == 2 and result.stderr.startswith("error: model.json: sha256")


def test_bench_measures_only_the_int8_model_its_card_vouches_for(copy):
    edit_card(copy, quantized=None)  # a model.int8.onnx that no card entry checks
    rows = bench(copy, **FAST).rows
    assert [r["backend"] for r in rows] == ["eager", "onnxruntime-fp32"]


# -- pickled artifacts load only from the ledger ------------------------------------------------


def test_a_pt2_not_written_by_gradwise_is_refused_unless_trusted(runs, tmp_path):
    out = export(runs[0], "torch-export", out=tmp_path / "pt2").dir
    assert load_runner(out / "model.pt2")(torch.zeros(2, 4).numpy()).shape == (2, 3)
    # a hostile directory: its own .pt2, and a card that vouches for it
    program = torch.export.export(torch.nn.Linear(4, 3), (torch.zeros(2, 4),))
    torch.export.save(program, str(out / "model.pt2"))
    edit_card(out, sha256=sha256_file(out / "model.pt2"))
    with pytest.raises(UntrustedError, match="not in the ledger"):
        load_runner(out / "model.pt2")
    result = gradwise_cli("bench", str(out), "--seconds", "0.02", "--batch-sizes", "2")
    assert result.returncode == 2 and result.stderr.startswith("error: artifact: got ")
    assert "model.pt2" in result.stderr and "--trust" in result.stderr
    rows = bench(out, trust=True, **FAST).rows
    assert [r["backend"] for r in rows] == ["eager", "torch-export"]


# -- re-exporting ---------------------------------------------------------------------------------


def test_reexport_keeps_the_int8_model_of_the_same_weights_and_removes_a_stale_one(
    runs, quantized, tmp_path
):
    out = shutil.copytree(quantized, tmp_path / "onnx")
    int8 = load_card(out)["quantized"]
    again = export(runs[0], "onnx", out=out)
    assert again.card["quantized"] == int8 and again.int8_path == out / "model.int8.onnx"
    assert again.notes == ["kept model.int8.onnx of the previous export: it was quantized from "
                           "this same model.onnx"]  # fmt: skip
    assert load_card(out)["quantized"]["sha256"] == sha256_file(out / "model.int8.onnx")
    other = export(runs[1], "onnx", out=out)  # other weights: the int8 model is stale
    assert not (out / "model.int8.onnx").exists() and other.card["quantized"] is None
    assert other.int8_path is None and other.notes == [
        "removed model.int8.onnx of the previous export: it was quantized from different "
        "weights; pass --quantize to recreate it"
    ]


def test_cli_export_says_what_became_of_the_int8_model(runs, quantized, tmp_path):
    out = shutil.copytree(quantized, tmp_path / "onnx")
    result = gradwise_cli("export", str(runs[1]), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "removed model.int8.onnx of the previous export" in result.stdout
