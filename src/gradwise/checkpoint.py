"""Checkpoints that survive a kill and never unpickle arbitrary objects.

A checkpoint is a directory ``checkpoints/step-00000120/`` holding

- ``model.safetensors`` (and ``ema.safetensors``): the weights, in safetensors;
- ``state.pt``: optimizer, scheduler, scaler and RNG states and the data position, only tensors and
  plain Python values, so it loads with ``torch.load(weights_only=True)``;
- ``meta.json``: step, epoch and metrics for people.

It is written into a hidden temporary directory, every file and the directory are fsynced, and the
directory is renamed into place: a reader sees a whole checkpoint or none. ``best.json`` points at the
best one; the last ``keep_last`` are kept besides it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from gradwise.errors import DataError
from gradwise.tracking.files import atomic_write_json, publish_dir

CHECKPOINTS = "checkpoints"
WEIGHTS, EMA_WEIGHTS, STATE, META, BEST = (
    "model.safetensors",
    "ema.safetensors",
    "state.pt",
    "meta.json",
    "best.json",
)


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model: nn.Module,
    state: dict[str, Any],
    ema: nn.Module | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically and return its directory (replacing one of the same step)."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / WEIGHTS))
    if ema is not None:
        save_model(ema, str(tmp / EMA_WEIGHTS))
    torch.save(state, tmp / STATE)
    (tmp / META).write_text(json.dumps({"step": step, **(meta or {})}, indent=2))
    return publish_dir(tmp, final)


def copy_checkpoint(source: str | Path, run_dir: Path) -> Path:
    """Copy the checkpoint directory ``source`` into ``run_dir``, atomically, and return the copy.

    The copy keeps its step name, replacing a checkpoint of the same step; resuming ``run_dir``
    then continues from the copied weights and training state (population-based training's
    exploit step). Written like :func:`save_checkpoint`: temporary directory, fsync, rename.
    """
    source = Path(source)
    if not (source / WEIGHTS).is_file():
        raise DataError(f"{source} is not a checkpoint: it has no {WEIGHTS}")
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / source.name
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    return publish_dir(tmp, final)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are not listed)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / WEIGHTS).is_file())


def mark_best(run_dir: Path, checkpoint: Path, metric: str, value: float) -> None:
    atomic_write_json(
        Path(run_dir) / CHECKPOINTS / BEST, {"checkpoint": checkpoint.name, metric: value}
    )


def best_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / CHECKPOINTS / BEST
    if not pointer.is_file():
        return None
    path = pointer.parent / json.loads(pointer.read_text())["checkpoint"]
    return path if (path / WEIGHTS).is_file() else None


def prune(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints and the best one, and stale temporaries."""
    root = Path(run_dir) / CHECKPOINTS
    best = best_checkpoint(run_dir)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        if old != best:
            shutil.rmtree(old, ignore_errors=True)
    for stale in [*root.glob(".tmp-*"), *root.glob(".*.old-*")]:  # publish_dir names old ones
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)


def resolve_checkpoint(path: str | Path, which: str = "best") -> Path:
    """A checkpoint directory from itself, its run directory (``which``: best or latest)."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return path
    run_dir = path.parent if path.name == CHECKPOINTS else path
    found = best_checkpoint(run_dir) if which == "best" else None
    if found is None:
        complete = list_checkpoints(run_dir)
        found = complete[-1] if complete else None
    if found is None:
        raise DataError(f"no checkpoint found at {path}: expected a run directory or a checkpoint")
    return found


def load_checkpoint(
    path: str | Path,
    model: nn.Module | None = None,
    *,
    ema: nn.Module | None = None,
    which: str = "best",
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Load weights into ``model`` (and ``ema``) and return the training state.

    ``path`` is a checkpoint directory or a run directory (then its best checkpoint, or the latest
    with ``which="latest"``). The state file is read with ``weights_only=True``.
    """
    ckpt = resolve_checkpoint(path, which)
    device = str(map_location)
    if model is not None:
        load_model(model, str(ckpt / WEIGHTS), device=device)
    if ema is not None:
        load_model(ema, str(ckpt / EMA_WEIGHTS), device=device)
    state_file = ckpt / STATE
    state = (
        torch.load(state_file, map_location=map_location, weights_only=True)
        if state_file.is_file()
        else {}
    )
    state["path"] = str(ckpt)
    return state


# -- random number generators -----------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`get_rng_state`'s state; its tensors may have been loaded onto the GPU."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
