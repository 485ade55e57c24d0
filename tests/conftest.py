"""Shared fixtures: every test runs in its own temporary directory, so runs/ never leaks."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

# Tests train tiny models: one thread is faster for them and keeps results identical run to run.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)

# Trainer overrides that keep tests quiet and fast: no progress output, no MLflow/TensorBoard.
QUIET = {"progress": "off", "mlflow": False, "tensorboard": False}


@pytest.fixture(autouse=True, scope="session")
def _gradwise_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The artifact ledger (gradwise.trust) of this test session, never the user's own."""
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("gradwise-home")
        mp.setenv("GRADWISE_HOME", str(home))
        yield home


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def blobs() -> tuple[torch.Tensor, torch.Tensor]:
    """A small, learnable 3-class problem: 240 samples, 8 features."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 3
    y = torch.arange(240) % 3
    x = centers[y] + torch.randn(240, 8, generator=g)
    return x, y


def mlp(inputs: int = 8, outputs: int = 3, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(inputs, 32),
        torch.nn.ReLU(),
        torch.nn.Dropout(dropout),
        torch.nn.Linear(32, outputs),
    )


def gradwise_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 120):
    """Run the real ``gradwise`` command line in a subprocess."""
    full_env = {**os.environ, "GRADWISE_DEBUG": "0", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "gradwise", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def gradwise_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """The real ``gradwise`` entry point in this process (a subprocess would import torch again):
    (exit code, stdout, stderr)."""
    from gradwise.cli import main

    monkeypatch.setattr(sys, "argv", ["gradwise", *args])
    monkeypatch.setenv("GRADWISE_DEBUG", "0")
    with pytest.raises(SystemExit) as exit_:
        main()
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err
