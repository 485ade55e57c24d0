"""Recovery instead of tracebacks: damaged checkpoints fall back to good ones, dead runs show dead."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import QUIET, gradwise_cli, mlp
from safetensors.torch import load_file

import gradwise as gw
from gradwise.checkpoint import (
    EMA_WEIGHTS,
    MANIFEST,
    META,
    STATE,
    WEIGHTS,
    list_checkpoints,
    load_checkpoint,
    mark_best,
    resolve_checkpoint,
    save_checkpoint,
)
from gradwise.errors import DataError, GradwiseWarning
from gradwise.tracking import list_runs, read_metrics, read_status, write_status
from gradwise.tracking.files import Heartbeat

# -- checkpoints ------------------------------------------------------------------------------


def _flip_bit(file: Path, from_end: int = 5) -> None:
    data = bytearray(file.read_bytes())
    data[-from_end] ^= 0x10  # in the last tensor's data, past the header
    file.write_bytes(bytes(data))


DAMAGE = {  # how files are damaged on disk, and what the warning says
    "truncated": (lambda c: _cut(c / WEIGHTS, 0.5), "model.safetensors has"),
    "empty": (lambda c: (c / STATE).write_bytes(b""), "state.pt has 0 bytes"),
    "garbage": (lambda c: (c / STATE).write_bytes(b"\x00garbage" * 99), "state.pt has 792"),
    "flipped bit": (lambda c: _flip_bit(c / WEIGHTS), "model.safetensors does not match its SHA"),
    "no manifest": (lambda c: (c / MANIFEST).unlink(), "manifest.json is missing"),
    "bad manifest": (lambda c: (c / MANIFEST).write_text("{"), "manifest.json is damaged"),
}


def _cut(file: Path, fraction: float) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * fraction)])


def _model(fill: float) -> torch.nn.Module:
    model = mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(fill)
    return model


def _two_checkpoints(run_dir: Path) -> tuple[Path, Path]:
    return tuple(
        save_checkpoint(run_dir, s, model=_model(s), state={"step": s, "t": torch.ones(256)})
        for s in (10, 20)
    )


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_good_one(tmp_path, kind):
    damage, reason = DAMAGE[kind]
    first, second = _two_checkpoints(tmp_path)
    damage(second)
    model = mlp()
    with pytest.warns(GradwiseWarning, match=rf"step-00000020 \({reason}.*using step-00000010"):
        state = load_checkpoint(tmp_path, model, which="latest")
    assert state["step"] == 10 and state["path"] == str(first)
    assert all(torch.all(p == 10.0) for p in model.parameters())
    with pytest.raises(DataError, match=f"checkpoint {second} is damaged: {reason}"):
        load_checkpoint(second, mlp())  # named directly: no fallback


def test_when_no_checkpoint_is_good_one_error_names_each(tmp_path):
    first, second = _two_checkpoints(tmp_path)
    _flip_bit(first / WEIGHTS)
    (second / WEIGHTS).write_bytes(b"")
    with pytest.raises(DataError) as error:
        load_checkpoint(tmp_path, mlp(), which="latest")
    assert str(error.value) == (
        f"no good checkpoint in {tmp_path}: step-00000020: model.safetensors has 0 bytes, "
        f"{(first / WEIGHTS).stat().st_size} were written; step-00000010: model.safetensors "
        "does not match its SHA-256 (the file changed after it was written)"
    )


def _old_format(checkpoint: Path) -> None:
    """Make a checkpoint look like one written before manifests."""
    (checkpoint / MANIFEST).unlink()
    meta = json.loads((checkpoint / META).read_text())
    del meta["format"]
    (checkpoint / META).write_text(json.dumps(meta))


def test_old_checkpoints_without_a_manifest_load_and_are_checked_for_structure(tmp_path):
    first, second = _two_checkpoints(tmp_path)
    _old_format(first)
    _old_format(second)
    assert load_checkpoint(tmp_path, mlp(), which="latest")["step"] == 20  # lenient: no checksum
    with zipfile.ZipFile(second / STATE) as archive:  # a bit of the tensor's data in the zip
        info = next(i for i in archive.infolist() if "/data/" in i.filename)
    inside = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size // 2
    _flip_bit(second / STATE, from_end=(second / STATE).stat().st_size - inside)
    with pytest.warns(GradwiseWarning, match=r"state.pt: .* does not match its CRC"):
        assert load_checkpoint(tmp_path, mlp(), which="latest")["step"] == 10
    _cut(first / WEIGHTS, 0.9)
    with pytest.raises(DataError, match=r"model.safetensors has \d+ bytes, its header describes"):
        load_checkpoint(tmp_path, mlp(), which="latest")


def test_a_damaged_best_checkpoint_falls_back_to_the_best_good_one(tmp_path):
    checkpoints = [
        save_checkpoint(tmp_path, step, model=_model(step), state={}, meta={"val_loss": loss})
        for step, loss in ((1, 0.5), (2, 0.3), (3, 0.2), (4, 0.4))
    ]
    mark_best(tmp_path, checkpoints[2], "val_loss", 0.2)
    assert resolve_checkpoint(tmp_path) == checkpoints[2]
    _cut(checkpoints[2] / WEIGHTS, 0.5)
    with pytest.warns(
        GradwiseWarning, match="step-00000003: model.safetensors .* using step-00000002"
    ):
        assert resolve_checkpoint(tmp_path) == checkpoints[1]  # val_loss 0.3 of the good ones
    (tmp_path / "checkpoints" / "best.json").write_text("{")
    with pytest.warns(GradwiseWarning, match="best.json names no checkpoint.*using step-00000004"):
        assert resolve_checkpoint(tmp_path) == checkpoints[3]  # no metric to go by: the latest


@pytest.mark.slow
def test_a_run_resumes_exactly_from_the_newest_good_checkpoint(blobs):
    x, y = blobs
    settings = {**QUIET, "recipe": None, "epochs": 3, "batch_size": 32, "seed": 3}
    settings |= {"checkpoint.every_steps": 1, "checkpoint.keep_last": 3, "ema_decay": 0.9}
    reference = gw.Trainer(mlp(dropout=0.2), (x[:200], y[:200]), (x[200:], y[200:]), **settings)
    reference = reference.fit()
    expected = {k: v.clone() for k, v in reference.model.state_dict().items()}

    run = gw.Trainer(mlp(dropout=0.2), (x[:200], y[:200]), (x[200:], y[200:]), **settings).fit()
    last, before = list_checkpoints(run.dir)[-1], list_checkpoints(run.dir)[-2]
    _flip_bit(last / EMA_WEIGHTS)
    _cut(before / STATE, 0.5)
    resumed = gw.Trainer.resume(
        run.dir, mlp(dropout=0.2), (x[:200], y[:200]), (x[200:], y[200:]), progress="off"
    )
    with pytest.warns(GradwiseWarning, match="moved the damaged checkpoint"):
        resumed = resumed.fit()
    assert resumed.steps == reference.steps == 21
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in reference.history]
    val = [m["val_loss"] for m in read_metrics(run.dir, "val")]
    assert val == [h["val_loss"] for h in reference.history]  # each evaluation logged once
    aside = sorted(p.name for p in (run.dir / "checkpoints").glob("damaged-*"))
    assert aside == [f"damaged-{before.name}", f"damaged-{last.name}"]
    assert list_checkpoints(run.dir)[-1].name == last.name  # written again, whole
    assert torch.equal(load_file(last / WEIGHTS)["0.weight"], expected["0.weight"])


# -- dead runs --------------------------------------------------------------------------------


def _running(run_dir: Path, **identity) -> Path:
    run_dir.mkdir(parents=True)
    write_status(run_dir, "running", step=3)
    status = json.loads((run_dir / "status.json").read_text())
    (run_dir / "status.json").write_text(json.dumps({**status, **identity}))
    return run_dir


def _states(root: Path) -> dict[str, tuple[str, str | None]]:
    return {r.name: (r.state, r.message) for r in list_runs(root)}


def test_a_running_run_whose_process_is_gone_is_shown_dead(tmp_path):
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    pid = int(gone.stdout)
    _running(tmp_path / "alive")  # this very process
    _running(tmp_path / "killed", pid=pid)
    start = json.loads((tmp_path / "alive" / "status.json").read_text())["process_start"]
    _running(tmp_path / "reused", process_start=start + 1)  # our pid, but another process
    _running(tmp_path / "elsewhere", host="another-host")  # heartbeat fresh
    _running(tmp_path / "silent", host="another-host")
    old = time.time() - 11 * 60
    os.utime(tmp_path / "silent" / "status.json", (old, old))
    old_style = tmp_path / "old"  # written before process identities: taken at its word
    old_style.mkdir()
    (old_style / "status.json").write_text(json.dumps({"state": "running"}))
    states = _states(tmp_path)
    assert states["alive"] == ("running", None) and states["elsewhere"] == ("running", None)
    assert states["old"] == ("running", None)
    host = socket.gethostname()
    assert states["killed"] == ("dead", f"dead: its process {pid} on {host} is gone")
    assert states["reused"][0] == "dead" and "another process's now" in states["reused"][1]
    assert states["silent"] == ("dead", "dead: no heartbeat from another-host for 11 minutes")


@pytest.mark.slow
def test_a_sigkilled_training_is_dead_in_gradwise_runs(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model: {name: mlp}\ndata: {name: iris}\ntrain: {epochs: 100000}\n"
        "tracking: {mlflow: false, tensorboard: false}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradwise", "train", str(recipe), "--name", "k", "-q"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    status = tmp_path / "runs" / "k" / "status.json"
    deadline = time.time() + 120
    while not status.is_file() and time.time() < deadline:
        time.sleep(0.05)
    assert _states(tmp_path / "runs")["k"] == ("running", None)
    proc.kill()
    proc.wait()
    assert read_status(tmp_path / "runs" / "k")["state"] == "running"  # as the kill left it
    out = gradwise_cli("runs", "--root", "runs", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.splitlines()[1].split("\t")[:2] == ["k", "dead"]


def test_the_heartbeat_touches_status_json_off_the_training_thread(tmp_path):
    write_status(tmp_path, "running")
    os.utime(tmp_path / "status.json", (0, 0))
    beat = Heartbeat(tmp_path, interval=0.01)
    deadline = time.time() + 10
    while (tmp_path / "status.json").stat().st_mtime == 0 and time.time() < deadline:
        time.sleep(0.01)
    beat.stop()
    assert (tmp_path / "status.json").stat().st_mtime > 0 and not beat._thread.is_alive()


# -- a full disk ------------------------------------------------------------------------------

_TMPFS = "mkdir -p {mnt} && mount -t tmpfs -o size={size} tmpfs {mnt}"


def _tmpfs_reason() -> str | None:
    """Why a small tmpfs cannot be mounted here (None if it can): a real full disk needs one."""
    if shutil.which("unshare") is None:
        return "no unshare command to mount a small tmpfs in a private mount namespace"
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", _TMPFS.format(mnt="/tmp", size="64k")],
        capture_output=True, text=True,
    )  # fmt: skip
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a user namespace: {probe.stderr.strip()}"
    return None


_NO_TMPFS = _tmpfs_reason()


@pytest.mark.slow
@pytest.mark.skipif(_NO_TMPFS is not None, reason=str(_NO_TMPFS))
def test_a_full_disk_is_one_line_exit_2_and_a_failed_run(tmp_path):
    """`gradwise train` on a real 2 MB tmpfs: the first checkpoint (17 MB) does not fit."""
    mnt, saved = tmp_path / "disk", tmp_path / "saved"
    (tmp_path / "recipe.yaml").write_text(
        "model: {name: mlp, kwargs: {hidden: [1024, 1024]}}\ndata: {name: digits}\n"
        f"train: {{epochs: 1}}\ntracking: {{mlflow: false, tensorboard: false, root: {mnt}/runs}}\n"
    )
    script = (
        _TMPFS.format(mnt=mnt, size="2m")
        + f" && {sys.executable} -m gradwise train recipe.yaml --name full -q;"
        + f" rc=$?; cp -a {mnt}/runs {saved}; exit $rc"
    )  # the mount vanishes with the namespace: keep a copy of what was written
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "GRADWISE_DEBUG": "0"}, timeout=300,
    )  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert errors == [
        f"error: no space left on device while writing {mnt}/runs/full/checkpoints/"
        "step-00000023: free space or set tracking.root to a disk with room"
    ]
    status = read_status(saved / "full")
    assert status["state"] == "failed" and "No space left on device" in status["message"]
    assert list((saved / "full" / "checkpoints").iterdir()) == []  # nothing half-written
