"""Listing the runs under a runs root, for ``gradwise runs``, reports and tuning."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from gradwise.errors import ConfigError, GradwiseError
from gradwise.tracking.files import STATUS_FILE, dead_reason, heartbeat_age, read_status

_NAME_KEYS = ("name", "source", "dataset", "path", "type", "kind")


@dataclass
class RunSummary:
    """One line about a run: what it trained, how far it got, how well and when."""

    name: str
    path: Path
    # running | finished | failed | interrupted; "dead" for a running one whose process is gone
    # (message says why); "unknown" if status.json is damaged
    state: str
    task: str | None
    model: str | None
    data: str | None
    epoch: int | None  # from status.json: last epoch reached
    step: int | None  # from status.json: last optimizer step reached
    best_metric: float | None
    monitor: str | None  # the metric best_metric is the best of, e.g. "val/loss"
    started: datetime | None
    duration_s: float | None  # ended (or last update, while running) minus started
    message: str | None = None


def list_runs(root: str | Path = "runs") -> list[RunSummary]:
    """Every run directory under ``root`` (those with a ``status.json``), newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [_summary(d) for d in root.iterdir() if (d / STATUS_FILE).is_file()]
    runs.sort(key=lambda r: r.name)
    runs.sort(key=lambda r: r.started.timestamp() if r.started else float("-inf"), reverse=True)
    return runs


def _summary(run_dir: Path) -> RunSummary:
    try:
        status = read_status(run_dir)
    except GradwiseError as e:
        status = {"state": "unknown", "message": str(e)}
    dead = dead_reason(status, heartbeat_age(run_dir))
    if dead:
        status = {**status, "state": "dead", "message": f"dead: {dead}"}
    recipe = _read_recipe(run_dir / "recipe.yaml")
    started, ended = (
        _time(status.get("started")),
        _time(status.get("ended") or status.get("updated")),
    )
    return RunSummary(
        name=run_dir.name,
        path=run_dir,
        state=status.get("state") or "unknown",
        task=status.get("task") or _name_of(recipe.get("task")),  # status: resolved from "auto"
        model=_name_of(recipe.get("model")),
        data=_name_of(recipe.get("data")),
        epoch=status.get("epoch"),
        step=status.get("step"),
        best_metric=status.get("best_metric"),
        monitor=status.get("monitor"),
        started=started,
        duration_s=(ended - started).total_seconds() if started and ended else None,
        message=status.get("message"),
    )


def _read_recipe(path: Path) -> dict[str, Any]:
    from gradwise.recipe import load_yaml

    try:  # bounded: an alias-bombed recipe.yaml must not hang `gradwise runs`
        recipe = load_yaml(path.read_text(encoding="utf-8"), str(path))
    except (OSError, ConfigError, UnicodeDecodeError):
        return {}
    return recipe if isinstance(recipe, dict) else {}


def _name_of(section: Any) -> str | None:
    """A recipe section's name: the value itself if a string, else its ``name`` (or similar) key."""
    if isinstance(section, str):
        return section
    if isinstance(section, dict):
        for key in _NAME_KEYS:
            if isinstance(section.get(key), str):
                return section[key]
    return None


def _time(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return None
    return value if value.tzinfo else value.astimezone()  # naive: assume local time
