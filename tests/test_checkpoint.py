"""Checkpoints: atomic under SIGKILL, safe to load, and resumable to the last bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import QUIET, gradwise_main, mlp
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset, TensorDataset

import gradwise as gw
from gradwise.checkpoint import (
    STATE,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    write_manifest,
)
from gradwise.tracking import read_metrics, read_status


def test_round_trip_and_state_loads_with_weights_only(tmp_path):
    model = mlp()
    state = {"position": {"step": 3}, "rng": torch.get_rng_state(), "history": [{"val_loss": 0.5}]}
    path = save_checkpoint(tmp_path, 3, model=model, state=state, meta={"epoch": 1})
    other = mlp()
    torch.nn.init.zeros_(other[0].weight)
    loaded = load_checkpoint(tmp_path, other, which="latest")
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True)
    )
    assert loaded["history"] == [{"val_loss": 0.5}]
    torch.load(path / STATE, weights_only=True)  # no arbitrary unpickling needed


def test_a_pickled_object_in_the_state_file_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, 1, model=mlp(), state={"ok": 1})
    torch.save({"evil": Path("x")}, path / STATE)  # an arbitrary class instance
    with pytest.raises(gw.DataError, match=r"damaged: state\.pt (has|does not match)"):
        load_checkpoint(path)
    write_manifest(path)  # one who also rewrites the manifest still cannot unpickle objects
    with pytest.raises(Exception, match=r"[Ww]eights only"):
        load_checkpoint(path)


_SAVER = textwrap.dedent(
    """
    import sys, torch
    from gradwise.checkpoint import save_checkpoint, prune
    run_dir = sys.argv[1]
    model = torch.nn.Linear(1024, 2048)  # 8 MB of weights: the write dominates the loop
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            model.weight.fill_(step)
            model.bias.fill_(step)
        save_checkpoint(run_dir, step, model=model, state={"step": torch.tensor(step)})
        prune(run_dir, keep_last=2)
        print(step, flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.05, 0.17, 0.31])
def test_kill_during_checkpoint_writes_leaves_the_previous_one_intact(tmp_path, delay):
    proc = subprocess.Popen(
        [sys.executable, "-c", _SAVER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    proc.stdout.readline()  # at least one checkpoint is complete
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    complete = list_checkpoints(tmp_path)
    assert complete, "the last complete checkpoint must survive"
    for path in complete:
        model = torch.nn.Linear(1024, 2048)
        state = load_checkpoint(path, model)
        step = int(state["step"])
        assert path.name == f"step-{step:08d}"
        assert torch.all(model.weight == step) and torch.all(model.bias == step)


def _recipe(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(
        textwrap.dedent(
            """
            model: {name: mlp, kwargs: {hidden: [64, 64], dropout: 0.2}}
            data: {name: synthetic_classification, kwargs: {n_samples: 600}, batch_size: 16}
            train: {epochs: 3, ema_decay: 0.9}
            checkpoint: {every_steps: 1, keep_last: 2}
            tracking: {mlflow: false, tensorboard: false}
            """
        )
    )
    return path


def _final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    last = list_checkpoints(run_dir)[-1]
    return {
        **load_file(last / "model.safetensors"),
        **{f"ema.{k}": v for k, v in load_file(last / "ema.safetensors").items()},
    }


@pytest.mark.slow
def test_exact_resume_after_sigkill_is_bitwise_equal(tmp_path, monkeypatch, capsys):
    recipe = _recipe(tmp_path)
    env = {**os.environ, "GRADWISE_DEBUG": "0"}

    def train(name: str, output: int) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "gradwise", "train", str(recipe), "--name", name, "-q"],
            cwd=tmp_path, env=env, stdout=output, stderr=output, text=True,
        )  # fmt: skip

    # the uninterrupted reference trains at the same time, in a process of its own
    reference = train("reference", subprocess.PIPE)
    proc = train("killed", subprocess.DEVNULL)
    run_dir = tmp_path / "runs" / "killed"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill mid-run, in the second epoch (30 steps per epoch)
        steps = [int(p.name.split("-")[1]) for p in list_checkpoints(run_dir)]
        if steps and max(steps) >= 40:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(int(p.name.split("-")[1]) for p in list_checkpoints(run_dir))
    assert 40 <= killed_at < 90
    assert read_status(run_dir)["state"] == "running"  # a killed run never looks finished
    _, stderr = reference.communicate(timeout=120)
    assert reference.returncode == 0, stderr

    code, _, stderr = gradwise_main(monkeypatch, capsys, "resume", str(run_dir), "-q")
    assert code == 0, stderr
    assert read_status(run_dir)["state"] == "finished"
    expected, got = _final_tensors(tmp_path / "runs" / "reference"), _final_tensors(run_dir)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


class _Interrupting(Dataset):
    """Sends this process a real SIGINT (Ctrl-C) when sample ``at`` is loaded."""

    def __init__(self, base: Dataset, at: int | None) -> None:
        self.base, self.at, self.count = base, at, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        self.count += 1
        if self.count == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return self.base[i]


def test_ctrl_c_checkpoints_and_a_foreign_dataloader_resumes_exactly(blobs):
    x, y = blobs
    val = (x[200:], y[200:])

    def loader(at):  # a user's own DataLoader: shuffled by the global RNG
        return DataLoader(
            _Interrupting(TensorDataset(x[:200], y[:200]), at), batch_size=16, shuffle=True
        )

    settings = {
        **QUIET,
        "epochs": 3,
        "seed": 5,
        "recipe": None,
    }  # plain defaults: no advisor probing
    reference = gw.Trainer(mlp(dropout=0.3), loader(None), val, **settings).fit()

    interrupted = gw.Trainer(mlp(dropout=0.3), loader(300), val, **settings).fit()  # mid epoch 2
    assert interrupted.state == "interrupted" and 0 < interrupted.steps < reference.steps
    assert read_status(interrupted.dir)["state"] == "interrupted"

    resumed = gw.Trainer.resume(
        interrupted.dir, mlp(dropout=0.3), loader(None), val, progress="off"
    ).fit()
    assert resumed.state == "finished" and resumed.steps == reference.steps
    for a, b in zip(reference.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)

    def without_times(history):
        return [{k: v for k, v in h.items() if k != "time_s"} for h in history]

    assert without_times(resumed.history) == without_times(reference.history)


@pytest.mark.slow
def test_ctrl_c_in_the_cli_says_how_to_resume(tmp_path):
    recipe = _recipe(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradwise", "train", str(recipe), "--name", "stopped", "-q", "--set", "epochs=50"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    run_dir = tmp_path / "runs" / "stopped"
    deadline = time.time() + 120
    while not list_checkpoints(run_dir) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert f"gradwise resume {Path('runs') / 'stopped'}" in stderr
    assert read_status(run_dir)["state"] == "interrupted"
    step = read_status(run_dir)["step"]
    assert list_checkpoints(run_dir)[-1].name == f"step-{step:08d}"


def test_resuming_a_python_object_run_asks_for_the_objects(blobs):
    x, y = blobs
    run = gw.Trainer(mlp(), (x, y), epochs=1, **QUIET).fit()
    recipe = gw.load_recipe(run.dir / "recipe.yaml")
    assert recipe.model.name == "object:Sequential" and recipe.data.name == "object:arrays"
    with pytest.raises(gw.ConfigError, match="pass it again"):
        gw.Trainer.resume(run.dir).fit()


def test_a_run_killed_right_after_a_checkpoint_keeps_the_metrics_it_resumes_from(
    tmp_path, monkeypatch, capsys
):
    # os._exit in on_evaluate (called after the epoch's checkpoint) dies like SIGKILL: no cleanup,
    # and the tracker's 1-second flush is pushed out of reach so only a flush at the checkpoint counts
    script = tmp_path / "killed.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys
            import gradwise as gw
            from gradwise.tracking import Tracker
            Tracker.flush_secs = 3600
            recipe = {"name": "killed", "model": {"name": "mlp", "kwargs": {"hidden": [8]}},
                      "data": {"name": "iris", "batch_size": 16}, "train": {"epochs": 3,
                      "log_every": 4}, "tracking": {"mlflow": False, "tensorboard": False}}
            gw.Trainer(recipe=recipe, progress="off", on_evaluate=lambda entry: os._exit(9)).fit()
            """
        )
    )
    killed = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True)
    assert killed.returncode == 9, killed.stderr
    run_dir = tmp_path / "runs" / "killed"
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-00000008"]
    code, _, stderr = gradwise_main(monkeypatch, capsys, "resume", str(run_dir), "-q")
    assert code == 0, stderr
    train_steps = [m["step"] for m in read_metrics(run_dir) if m["split"] == "train"]
    assert train_steps == [4, 8, 12, 16, 20, 24]  # 8 steps per epoch, a row every 4
    val_steps = [m["step"] for m in read_metrics(run_dir) if m["split"] == "val"]
    assert val_steps == [8, 16, 24]


def test_resume_set_changes_settings_from_the_checkpoint_on(tmp_path, monkeypatch, capsys):
    def gradwise(*args: str) -> tuple[int, str]:  # the CLI in this process: no torch start-ups
        code, _, stderr = gradwise_main(monkeypatch, capsys, *args)
        return code, stderr

    recipe = _recipe(tmp_path)
    code, stderr = gradwise("train", str(recipe), "--name", "short", "-q", "--set", "epochs=1")
    assert code == 0, stderr
    run_dir = tmp_path / "runs" / "short"
    code, stderr = gradwise("resume", str(run_dir), "-q", "--set", "epochs=2")
    assert code == 0, stderr
    assert read_status(run_dir)["step"] == 60  # 30 steps per epoch
    code, stderr = gradwise("resume", str(run_dir), "--set", "epochz=3")
    assert code == 2 and "epochs" in stderr and "Traceback" not in stderr
