"""DDP and FSDP2 on the CPU with gloo: 2 real processes under torchrun, against one process.

Each rank takes half of every global batch; gradients are averaged by all-reduce (DDP) or
reduce-scatter (FSDP2). The sum over the batch is then computed in another order than one process
computes it, so weights agree to float32 rounding: 1e-6 here, not bitwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import gradwise_cli, gradwise_main

import gradwise as gw
from gradwise.checkpoint import list_checkpoints

SCRIPT = Path(__file__).with_name("train_blobs.py")
REPO = Path(__file__).parents[2]
TOLERANCE = 1e-6
pytestmark = pytest.mark.slow


def torchrun(root: Path, settings: dict, nproc: int = 2, check: bool = True) -> dict | None:
    """Run the script under torchrun; rank 0's summary, or None when the job failed."""
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    cmd += ["--standalone", str(SCRIPT), str(root), json.dumps(settings)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=root)
    if out.returncode != 0:
        assert not check, out.stderr[-3000:]
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def alone(root: Path, settings: dict) -> dict:
    """One process, this one: the reference, and FSDP2's shards resumed on one rank."""
    from ranks.train_blobs import run

    root.mkdir(parents=True, exist_ok=True)
    return run(str(root), settings)


def weights(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The last checkpoint's weights, loaded in this process (FSDP2's shards read whole)."""
    from ranks.train_blobs import model

    m = model()
    gw.load_checkpoint(run_dir, m, which="latest")
    return m.state_dict()


def assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= TOLERANCE, worst


SETTINGS = {"epochs": 2, "doctor": {"mode": "off"}}


def test_ddp_equals_one_process_on_the_global_batch_and_writes_one_run(tmp_path):
    # 200 samples, global batch 26 with accumulation 2: a short last window, split 9/9 and 4/4
    doctor = {"doctor": {"mode": "watch", "sample_every": 3}}  # watching, on every rank
    one = alone(tmp_path / "one", {**SETTINGS, "batch_size": 26, "accumulate": 2})
    two = torchrun(tmp_path / "two", {**SETTINGS, **doctor, "batch_size": 13, "accumulate": 2})
    assert_close(weights(one["dir"]), weights(two["dir"]))
    losses = [h["train_loss"] for h in two["history"]]
    assert losses == pytest.approx([h["train_loss"] for h in one["history"]], rel=1e-5)
    for metric in ("val_accuracy", "val_f1", "val_auroc", "val_pr_auc"):  # summed over the ranks
        values = [h[metric] for h in two["history"]]
        assert values == pytest.approx([h[metric] for h in one["history"]], abs=1e-4), metric
    runs = [p for p in (tmp_path / "two" / "runs").iterdir()]
    assert [p.name for p in runs] == ["run"]  # one run directory, rank 0's
    assert len((runs[0] / "metrics.jsonl").read_text().splitlines()) > 0
    assert json.loads((runs[0] / "status.json").read_text())["state"] == "finished"
    assert json.loads((runs[0] / "doctor" / "findings.json").read_text()) == []  # no false alarm


def test_fsdp_equals_ddp_and_its_shards_resume_on_one_rank_and_back(tmp_path):
    # one process on the global batch stands for DDP, which equals it (the test above); it keeps
    # every epoch's checkpoint. FSDP2 on two ranks trains the first epoch and stops (on_evaluate),
    # one rank resumes its shards for the other two epochs; a one-rank FSDP2 run stopped after the
    # first epoch is resumed on two ranks: each part equals the same part of the one process
    keep = {"checkpoint": {"keep_last": 3}}
    ddp = alone(tmp_path / "ddp", {**SETTINGS, **keep, "batch_size": 32, "epochs": 3})
    half = torchrun(
        tmp_path / "half",
        {**SETTINGS, "batch_size": 16, "epochs": 3, "strategy": "fsdp", "on_evaluate_stop": 1},
    )
    assert half["state"] == "stopped"
    last = list_checkpoints(Path(half["dir"]))[-1]
    assert sorted(p.name for p in (last / "dcp").iterdir())[-2:] == ["__0_0.distcp", "__1_0.distcp"]
    assert_close(weights(Path(ddp["dir"]) / "checkpoints" / last.name), weights(last))
    resumed = alone(
        tmp_path / "half", {"resume": half["dir"], "strategy": "fsdp", "batch_size": 32}
    )
    assert resumed["state"] == "finished"
    assert_close(weights(ddp["dir"]), weights(resumed["dir"]))

    one = {**SETTINGS, "batch_size": 32, "epochs": 3, "strategy": "fsdp", "on_evaluate_stop": 1}
    back = alone(tmp_path / "back", one)  # and back: one rank's shards resumed on two
    again = torchrun(tmp_path / "back", {"resume": back["dir"], "batch_size": 16})
    assert again["state"] == "finished"
    assert_close(weights(ddp["dir"]), weights(again["dir"]))


def test_a_killed_rank_then_resume_equals_the_uninterrupted_run(tmp_path):
    settings = {**SETTINGS, "batch_size": 16, "epochs": 3, "checkpoint": {"every_steps": 2}}
    settings["distributed"] = {"timeout_s": 60}
    whole = alone(tmp_path / "whole", {**settings, "batch_size": 32})  # = 2 ranks of 16
    assert torchrun(tmp_path / "killed", {**settings, "kill": [1, 9]}, check=False) is None
    run_dir = tmp_path / "killed" / "runs" / "run"
    assert list_checkpoints(run_dir)[-1].name == "step-00000008"
    resumed = torchrun(tmp_path / "killed", {"resume": str(run_dir)})
    assert resumed["state"] == "finished"
    assert_close(weights(whole["dir"]), weights(resumed["dir"]))
    assert [h["val_loss"] for h in resumed["history"]] == pytest.approx(
        [h["val_loss"] for h in whole["history"]], rel=1e-5
    )


def test_cli_nproc_launches_torchrun_and_strategy_none_is_refused(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {name: mlp}\ndata: {name: iris}\ntrain: {epochs: 1}\n"
        "tracking: {mlflow: false, tensorboard: false}\n"
    )
    env = {"OMP_NUM_THREADS": "1"}
    result = gradwise_cli(
        "train", str(recipe), "--nproc", "2", "-q", cwd=tmp_path, env=env, timeout=240
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("run directory:") == 1  # rank 0 reports
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["mlp-iris"]
    # the launcher (in this process, torchrun not started) runs the same command without --nproc
    # and exits with torchrun's status
    refuse = ["train", str(recipe), "--nproc", "2", "-q", "--set", "distributed.strategy=none"]
    launched = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: launched.append(cmd) or 1)
    code, _, _ = gradwise_main(monkeypatch, capsys, *refuse)
    assert code == 1 and len(launched) == 1
    assert launched[0][:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=2" in launched[0]
    same = ["train", str(recipe), "-q", "--set", "distributed.strategy=none"]
    assert launched[0][-7:] == ["-m", "gradwise", *same]
    # each rank torchrun starts (its environment, here in this process) refuses strategy none
    # before it joins the process group
    for name, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    code, _, err = gradwise_main(monkeypatch, capsys, *refuse)
    assert code == 2 and len(launched) == 1
    assert "distributed.strategy: got 'none'" in err and "Traceback" not in err
