"""The run directory and experiment tracking.

A run directory is the contract between stages: the trainer writes it, and report, resume,
export and tune read it. Everything in it is a plain file a person can open::

    runs/<name>/recipe.yaml         the recipe (written by the trainer)
    runs/<name>/status.json         state, progress and best metric (written atomically)
    runs/<name>/metrics.jsonl       one JSON object per logged step and split
    runs/<name>/environment.json    lineage (data fingerprints, git commit and dirty flag, package
                                    versions), seed and hardware
    runs/<name>/tb/                 TensorBoard event files, when enabled
    runs/mlflow.db                  MLflow tracking database shared by all runs under runs/
    runs/mlartifacts/               MLflow artifact root

Importing this package is cheap: torch, MLflow, TensorBoard and W&B are imported only when used.
"""

from __future__ import annotations

from gradwise.tracking.environment import collect_environment, write_environment
from gradwise.tracking.files import (
    STATES,
    atomic_write_json,
    atomic_write_text,
    fsync_dir,
    new_run_dir,
    read_metrics,
    read_status,
    write_status,
)
from gradwise.tracking.runs import RunSummary, list_runs
from gradwise.tracking.tracker import Tracker, flatten_params

__all__ = [
    "STATES",
    "RunSummary",
    "Tracker",
    "atomic_write_json",
    "atomic_write_text",
    "collect_environment",
    "flatten_params",
    "fsync_dir",
    "list_runs",
    "new_run_dir",
    "read_metrics",
    "read_status",
    "write_environment",
    "write_status",
]
