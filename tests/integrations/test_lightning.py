"""gradwise.integrations.lightning.DoctorCallback on real Lightning runs: a healthy run (with
gradient accumulation, clipping and bf16 autocast) stays silent, each planted fault gets its code,
the run directory renders, the callback changes nothing in the run and never breaks it, and under
DDP on 2 CPU processes rank 0 reports what one process would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

pytest.importorskip("lightning")

import lightning as L
import torch
from lightning_cases import fit, scenario
from torch.utils.data import DataLoader, TensorDataset

from gradwise.doctor.report import report_run
from gradwise.errors import GradwiseWarning
from gradwise.integrations.lightning import DoctorCallback

HERE = Path(__file__).parent
PLANTED = {
    "lr-too-high": "GW305",
    "nonfinite-loss": "GW301",
    "targets-out-of-range": "GW105",
    "unnormalised-inputs": "GW102",
    "overfitting": "GW401",
    "eval-in-train-mode": "GW203",
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[DoctorCallback, Path]]:
    root = tmp_path_factory.mktemp("lightning")
    return {name: (fit(name, root / name), root / name) for name in ["healthy", *PLANTED]}


def test_a_healthy_run_has_no_findings_and_its_run_directory_renders(runs) -> None:
    callback, run_dir = runs["healthy"]
    assert [f for f in callback.findings if f.severity != "info"] == []
    telemetry = json.loads((run_dir / "doctor" / "telemetry.json").read_text())
    # the loss is the model's, not Lightning's division by the accumulation (ln 10 at the start)
    assert 2.0 < telemetry["loss"][0][1] < 2.6
    assert len(telemetry["loss"]) == 120  # one Doctor step per optimizer step, not per micro-batch
    assert len(telemetry["val"]) >= 1 and telemetry["val"][0]["loss"] is not None
    assert set(telemetry["update_ratio"]) == {"model.0", "model.2", "model.4"}
    html = report_run(run_dir).read_text()
    assert "model.0" in html and "<svg" in html


@pytest.mark.parametrize("name", PLANTED)
def test_each_planted_fault_gets_its_code(runs, name: str) -> None:
    callback, run_dir = runs[name]
    codes = {f.code for f in callback.findings if f.severity in ("warning", "error")}
    assert PLANTED[name] in codes, callback.doctor.summary()
    saved = json.loads((run_dir / "doctor" / "findings.json").read_text())
    assert PLANTED[name] in {f["code"] for f in saved}


def _trained_weights(with_callback: bool, root: Path) -> list[torch.Tensor]:
    module, train, _, _, _ = scenario("lr-too-high")
    callbacks = [DoctorCallback(on_finding=None)] if with_callback else []
    trainer = L.Trainer(
        max_steps=25, callbacks=callbacks, logger=False, enable_checkpointing=False,
        default_root_dir=root,  # where the callback writes doctor/ when given no run_dir
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    torch.manual_seed(1)
    trainer.fit(module, DataLoader(TensorDataset(*train), batch_size=32, shuffle=True))
    return [p.detach().clone() for p in module.parameters()]


def test_the_callback_changes_nothing_in_the_run(tmp_path) -> None:
    """Its probes run the model on purpose; the weights trained must be the same to the bit."""
    plain, watched = _trained_weights(False, tmp_path), _trained_weights(True, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(plain, watched, strict=True))
    assert (tmp_path / "doctor" / "findings.json").exists()  # the trainer's log_dir by default


def test_a_failing_doctor_is_one_warning_and_the_run_goes_on(tmp_path, monkeypatch) -> None:
    from gradwise.doctor.doctor import Doctor

    def broken(self, *args, **kwargs):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(Doctor, "step", broken)
    with pytest.warns(GradwiseWarning, match="planted failure") as caught:
        callback = fit("unnormalised-inputs", tmp_path)
    assert sum("planted failure" in str(w.message) for w in caught) == 1
    assert callback.findings == []
    assert (tmp_path / "doctor" / "findings.json").exists()


@pytest.mark.slow
def test_under_ddp_on_two_processes_rank_0_reports_the_fault(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone"]
    cmd += [str(HERE / "lightning_cases.py"), str(tmp_path)]
    with warnings.catch_warnings():
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert [c for c, severity in results["healthy"] if severity != "info"] == []
    assert "GW305" in {c for c, _ in results["lr-too-high"]}
    assert (tmp_path / "lr-too-high" / "doctor" / "findings.json").exists()


def test_gradwise_report_renders_the_run_directory(runs, monkeypatch, capsys, tmp_path) -> None:
    from conftest import gradwise_main

    _, run_dir = runs["lr-too-high"]
    out = tmp_path / "report.html"
    code, stdout, _ = gradwise_main(monkeypatch, capsys, "report", str(run_dir), "-o", str(out))
    assert "report:" in stdout
    assert code in (0, None) and "GW305" in out.read_text()
    code, _, stderr = gradwise_main(monkeypatch, capsys, "report", str(tmp_path))
    assert code == 2 and "doctor/findings.json" in stderr
