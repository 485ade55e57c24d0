"""gradwise.integrations.keras.DoctorCallback on every installed Keras backend.

Keras picks its backend at import, so each backend runs ``keras_cases.py`` (all scenarios) once, in
its own subprocess; the three run at the same time, and the tests below read their JSON results.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("keras", reason="keras is not installed")
pytestmark = pytest.mark.slow  # three subprocesses, each importing Keras and its backend

BACKENDS = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}  # backend -> package
CASES = Path(__file__).with_name("keras_cases.py")
PLANTED = {  # scenario -> the code the PyTorch Doctor gives the same planted fault
    "lr_too_high": "GW305",
    "nonfinite_loss": "GW301",
    "targets_out_of_range": "GW105",
    "overfitting": "GW401",
}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every installed backend's results (a skip reason for a backend whose package is absent)."""
    base = tmp_path_factory.mktemp("keras")
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "OMP_NUM_THREADS": "1",  # three processes share the machine
        "TF_NUM_INTRAOP_THREADS": "1",
        "TF_NUM_INTEROP_THREADS": "1",
    }
    running, out = {}, {}
    for backend, package in BACKENDS.items():
        if importlib.util.find_spec(package) is None:
            out[backend] = {"skip": f"{package} is not installed"}
            continue
        path, run_dir = base / f"{backend}.json", base / f"run-{backend}"
        cmd = [sys.executable, str(CASES), str(path), str(run_dir)]
        proc = subprocess.Popen(
            cmd,
            env={**env, "KERAS_BACKEND": backend},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        running[backend] = (proc, path, run_dir)
    for backend, (proc, path, run_dir) in running.items():
        log, _ = proc.communicate(timeout=280)
        assert proc.returncode == 0, f"{backend}: keras_cases.py failed:\n{log[-3000:]}"
        out[backend] = {**json.loads(path.read_text()), "run_dir": str(run_dir)}
    return out


def _backend(results: dict, backend: str) -> dict:
    r = results[backend]
    if "skip" in r:
        pytest.skip(r["skip"])
    return r


def _scenario(results: dict, backend: str, name: str) -> dict:
    r = _backend(results, backend)[name]
    assert "error" not in r, f"{backend} {name} raised:\n{r['error']}"
    return r


@pytest.mark.parametrize("backend", BACKENDS)
def test_healthy_run_has_no_finding(results, backend):
    r = _scenario(results, backend, "healthy")
    serious = [f for f in r["findings"] if f["severity"] in ("warning", "error")]
    assert serious == [], serious
    assert r["warnings"] == []
    # every signal was fed: losses, gradients, updates, activations, lr, validation
    assert r["loss_kind"] == "cross_entropy"
    assert r["layers_with_grads"] == ["batch_normalization", "dense", "dense_1"]
    assert r["layers_with_updates"] == ["batch_normalization", "dense", "dense_1"]
    assert r["activations"] == ["dense"]
    assert r["lr"] == [pytest.approx(1e-3)]
    assert r["validations"] == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_losses_recovered_from_the_running_mean(results, backend):
    r = _scenario(results, backend, "healthy")
    assert r["doctor_epoch_loss"] == pytest.approx(r["epoch_loss"], rel=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_results_are_unchanged(results, backend):
    r = _scenario(results, backend, "healthy")
    assert r["identical"], f"final weights differ by up to {r['max_abs_diff']}"
    assert r["global_rng_untouched"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failing_doctor_is_one_warning(results, backend):
    r = _scenario(results, backend, "healthy")
    assert len(r["broken_warnings"]) == 1 and "planted failure" in r["broken_warnings"][0]
    assert r["broken_epochs"] == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_unnormalised_inputs(results, backend):
    r = _scenario(results, backend, "healthy")
    assert "GW102" in [f["code"] for f in r["unnormalised_findings"]]


@pytest.mark.parametrize("scenario", PLANTED)
@pytest.mark.parametrize("backend", BACKENDS)
def test_planted_fault_is_diagnosed(results, backend, scenario):
    r = _scenario(results, backend, scenario)
    codes = [f["code"] for f in r["findings"]]
    assert PLANTED[scenario] in codes, codes
    assert r["warnings"] == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_run_directory_renders(results, backend):
    from gradwise.doctor.report import report_run

    run_dir = Path(_backend(results, backend)["run_dir"])
    assert (run_dir / "doctor" / "findings.json").is_file()
    telemetry = json.loads((run_dir / "doctor" / "telemetry.json").read_text())
    assert telemetry["framework"] == "keras"
    html = report_run(run_dir).read_text()
    assert "<html" in html.lower()


@pytest.mark.parametrize("backend", BACKENDS)
def test_subclassed_model_with_probabilities(results, backend):
    r = _scenario(results, backend, "subclassed")
    assert r["warnings"] == []
    assert [f for f in r["findings"] if f["severity"] != "info"] == []
    assert r["loss_kind"] == "nll"  # softmax outputs, from_logits=False: log-probabilities
    assert r["num_classes"] == 10
    assert r["losses"] == 25
    assert len(r["layers_with_grads"]) == 2  # both Dense layers (auto-named dense_N)
