"""``environment.json``: what a run ran on (versions, code, seed, hardware) and what it trained on
(the data's fingerprint, :mod:`gradwise.tracking.lineage`), to reproduce, explain or compare it.

Its lineage keys: ``"data"`` (the training and validation splits' fingerprints), ``"git"`` (the
commit, branch and dirty flag of the repository the run was started in, null outside one) and
``"versions"`` (Python, gradwise and every dependency). ``gradwise runs --compare`` reads them."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from gradwise.tracking.files import atomic_write_json, now_iso

ENVIRONMENT_FILE = "environment.json"

# used when gradwise's own metadata is unavailable (e.g. run from a source tree)
_FALLBACK_PACKAGES = (
    "torch", "numpy", "pydantic", "pyyaml", "torchmetrics", "scikit-learn", "safetensors",
    "mlflow", "tensorboard", "optuna", "onnx", "onnxruntime", "peft",
)  # fmt: skip
_EXTRA_PACKAGES = ("wandb", "triton")
_ENV_VARS = (
    "CUDA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "PYTORCH_CUDA_ALLOC_CONF",
)


def write_environment(
    run_dir: Path, seed: int | None, train: Any = None, val: Any = None
) -> dict[str, Any]:
    """Collect the environment (see :func:`collect_environment`) and the fingerprints of the
    ``train`` and ``val`` data (Datasets or DataLoaders; :func:`~gradwise.tracking.lineage.fingerprint`),
    write them to ``environment.json`` and return them."""
    from gradwise.tracking.lineage import data_lineage

    env = collect_environment(seed)
    env["data"] = data_lineage(train, val)
    atomic_write_json(Path(run_dir) / ENVIRONMENT_FILE, env)
    return env


def collect_environment(seed: int | None = None) -> dict[str, Any]:
    """Versions of Python and of the installed dependencies, the git state of the working
    directory, the seed and the hardware."""
    return {
        "created": now_iso(),
        "seed": seed,
        "versions": package_versions(),
        "git": git_state(Path.cwd()),
        "hardware": hardware(),
        "command": sys.argv,
        "env": {k: os.environ[k] for k in _ENV_VARS if k in os.environ},
    }


def package_versions() -> dict[str, str]:
    """``{"python": ..., "gradwise": ..., <dependency>: <version>}`` for each installed dependency."""
    import gradwise

    versions = {"python": platform.python_version(), "gradwise": gradwise.__version__}
    for name in (*_dependency_names(), *_EXTRA_PACKAGES):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def _dependency_names() -> list[str]:
    try:
        requirements = importlib.metadata.requires("gradwise") or []
    except importlib.metadata.PackageNotFoundError:
        return list(_FALLBACK_PACKAGES)
    names = []
    for req in requirements:
        if 'extra == "dev"' in req:
            continue
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req)
        if match and match.group() != "gradwise" and match.group() not in names:
            names.append(match.group())
    return names


def git_state(path: Path) -> dict[str, Any] | None:
    """Commit, branch and dirty flag (uncommitted changes to tracked files) of the repository at
    ``path``; None outside a repository or without git."""

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", *args], cwd=path, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        branch = git("rev-parse", "--abbrev-ref", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "branch": branch, "dirty": dirty}


def hardware() -> dict[str, Any]:
    """Platform, CPUs, torch threads, CUDA devices (name, memory, capability), bf16 and MPS."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else None,
        "memory_gb": _memory_gb(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cuda": None,
        "mps": bool(torch.backends.mps.is_available()),
    }
    if torch.cuda.is_available():
        devices = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append(
                {
                    "name": p.name,
                    "memory_gb": round(p.total_memory / 2**30, 2),
                    "capability": f"{p.major}.{p.minor}",
                    "multiprocessors": p.multi_processor_count,
                }
            )
        info["cuda"] = {
            "version": torch.version.cuda,
            "hip": getattr(torch.version, "hip", None),
            "cudnn": torch.backends.cudnn.version(),
            "bf16": bool(torch.cuda.is_bf16_supported()),
            "devices": devices,
        }
    return info


def _memory_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 2)
    except (AttributeError, ValueError, OSError):
        return None
