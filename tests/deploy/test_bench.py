"""Benchmarks: percentiles and throughput per backend and batch size, interleaved, threads stated."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import QUIET, gradwise_cli

import gradwise as gw
from gradwise.deploy import bench, export
from gradwise.deploy.bench import compare_latency, latency_stats
from gradwise.errors import ConfigError

BACKENDS = ["eager", "onnxruntime-fp32", "onnxruntime-int8"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    recipe = {
        "name": "mlp",
        "model": {"name": "mlp", "kwargs": {"hidden": [32]}},
        "data": {"name": "digits"},
        "doctor": {"mode": "off"},
        "tracking": {"root": str(root / "runs")},
    }
    run = gw.Trainer(recipe=recipe, epochs=1, **QUIET).fit()
    return export(run.dir, "onnx", out=root / "onnx", quantize="dynamic").dir


def test_bench_reports_percentiles_and_throughput_per_backend(exported):
    result = bench(exported, batch_sizes=(1, 16), threads=1, seconds=0.05)
    assert result.threads == 1 and result.notes == []
    assert [(r["backend"], r["batch_size"]) for r in result.rows] == [
        (b, n) for n in (1, 16) for b in BACKENDS
    ]
    for row in result.rows:
        assert row["threads"] == 1 and row["calls"] >= 1
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert row["throughput"] > 0
    ratios = result.ratios()
    assert [r["batch_size"] for r in ratios] == [1, 16]
    assert set(ratios[0]) == {
        "batch_size", "onnxruntime-fp32/eager", "onnxruntime-int8/eager", "int8/fp32",
    }  # fmt: skip
    header, rows = result.table()
    assert header[0] == "backend" and len(rows) == 6
    assert json.loads(json.dumps(result.to_dict()))["threads"] == 1
    assert torch.get_num_threads() == 1  # the thread count is restored


def test_backends_run_interleaved():
    calls: list[str] = []

    def runner(name: str):
        def run(x: np.ndarray) -> None:
            calls.append(name)

        return run

    stats = compare_latency(
        {"a": runner("a"), "b": runner("b")}, np.zeros(2), seconds=0.02, slice_s=0.001
    )
    timed = calls[6:]  # after three warm-up calls each
    switches = sum(1 for first, second in itertools.pairwise(timed) if first != second)
    assert switches >= 3  # a, b, a, b...: not all of a, then all of b
    assert stats["a"]["calls"] + stats["b"]["calls"] == len(timed)


def test_latency_stats():
    stats = latency_stats([0.001] * 98 + [0.002, 0.010], batch_size=4)
    assert stats["p50_ms"] == pytest.approx(1.0) and stats["p99_ms"] > 2.0
    assert stats["throughput"] == pytest.approx(4 * 100 / 0.110)


def test_bench_without_the_checkpoint_skips_eager_with_a_note(exported, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    card = json.loads((copy / "model.json").read_text())
    card["source"]["checkpoint"] = str(tmp_path / "gone")
    (copy / "model.json").write_text(json.dumps(card))
    result = bench(copy, batch_sizes=(2,), threads=1, seconds=0.02)
    assert [r["backend"] for r in result.rows] == ["onnxruntime-fp32", "onnxruntime-int8"]
    assert "eager PyTorch not measured" in result.notes[0]


def test_bench_torch_export_artifact_with_token_inputs(tmp_path):
    data = {"name": "synthetic_sequences", "kwargs": {"n_samples": 100, "seq_len": 8}}
    model = {"name": "rnn", "kwargs": {"hidden": 8, "embed_dim": 8}}
    recipe = {"model": model, "data": data, "doctor": {"mode": "off"}}
    run = gw.Trainer(recipe=recipe, epochs=1, **QUIET).fit()
    artifact = export(run.dir, "torch-export", out=tmp_path / "pt2")
    result = bench(artifact.dir, batch_sizes=(4,), threads=1, seconds=0.02)
    assert [r["backend"] for r in result.rows] == ["eager", "torch-export"]


def test_bench_bad_input(exported, tmp_path):
    with pytest.raises(ConfigError, match="batch_sizes"):
        bench(exported, batch_sizes=(0,))
    with pytest.raises(ConfigError, match=r"artifact: .*model\.json"):
        bench(tmp_path)


def test_cli_bench(exported, tmp_path):
    result = gradwise_cli(
        "bench", str(exported), "--batch-sizes", "1,4", "--threads", "1", "--seconds", "0.05",
        "--json", "bench.json", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "1 threads" in result.stdout and "int8/fp32" in result.stdout
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert {(r["backend"], r["batch_size"]) for r in rows} == {
        (b, n) for b in BACKENDS for n in (1, 4)
    }
    bad = gradwise_cli("bench", str(exported), "--batch-sizes", "one", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --batch-sizes")
