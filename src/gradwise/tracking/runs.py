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


# -- comparing runs side by side ------------------------------------------------------------------

MAX_JSON_BYTES = 16 << 20  # environment.json beyond this is not a run's (a hostile directory)


@dataclass
class Comparison:
    """Runs side by side: one row per difference in recipe, data, code or versions, then the
    metrics. ``rows``: (what, one value per run, verdict: same | different | unknown | "")."""

    runs: list[str]
    rows: list[tuple[str, list[str], str]]


def resolve_run(name: str | Path, root: str | Path = "runs") -> Path:
    """A run directory: ``name`` itself, or ``root/name``; a ConfigError when neither is one."""
    for candidate in (Path(name), Path(root) / str(name)):
        if (candidate / STATUS_FILE).is_file():
            return candidate
    raise ConfigError(
        "run", str(name), f"a run directory (with {STATUS_FILE}) or the name of a run under {root}"
    )


def compare_runs(runs: list[str | Path], root: str | Path = "runs") -> Comparison:
    """Compare two or more runs: the recipe settings that differ (flattened keys), the data
    fingerprints (train and validation), the code version (git commit, dirty) and the package
    versions that differ, then each run's state, best and last validation metrics."""
    if len(runs) < 2:
        raise ConfigError("runs", list(map(str, runs)), "two or more runs to compare")
    dirs = [resolve_run(r, root) for r in runs]
    recipes = [_flatten(_read_recipe(d / "recipe.yaml")) for d in dirs]
    envs = [_read_json(d / "environment.json") for d in dirs]
    rows: list[tuple[str, list[str], str]] = []
    differing = [k for k in sorted(set().union(*recipes)) if _differs([r.get(k) for r in recipes])]
    for key in differing:
        rows.append((f"recipe {key}", [_show(r.get(key, "-")) for r in recipes], "different"))
    if not differing:
        rows.append(("recipe", ["same settings"] * len(dirs), "same"))
    rows += _data_rows(envs)
    rows += _code_rows(envs)
    rows += _metric_rows(dirs)
    return Comparison([d.name for d in dirs], rows)


def _data_rows(envs: list[dict[str, Any]]) -> list[tuple[str, list[str], str]]:
    from gradwise.tracking.lineage import same_data

    rows = []
    for split in ("train", "val"):
        prints = [(e.get("data") or {}).get(split) for e in envs]
        if all(p is None for p in prints):
            continue
        pairs = [same_data(prints[0], p) for p in prints[1:]]
        verdict = "unknown" if None in pairs else "same" if all(pairs) else "different"
        rows.append((f"data {split}", [_fingerprint_text(p) for p in prints], verdict))
    if not rows:
        rows.append(("data", ["not recorded"] * len(envs), "unknown"))
    return rows


def _fingerprint_text(p: Any) -> str:
    if not isinstance(p, dict):
        return "not recorded"
    if not p.get("sha256"):
        return f"{p.get('method', '?')}: {p.get('reason', '')}"[:80]
    samples = p.get("samples")
    size = f"{samples:,} samples" if isinstance(samples, int) else "a stream"
    return f"{str(p['sha256'])[:12]} ({size}, {p.get('method')})"


def _code_rows(envs: list[dict[str, Any]]) -> list[tuple[str, list[str], str]]:
    gits = [e.get("git") if isinstance(e.get("git"), dict) else None for e in envs]
    texts = [
        "no repository"
        if g is None
        else f"{str(g.get('commit', '?'))[:10]}{' +dirty' if g.get('dirty') else ''}"
        for g in gits
    ]
    if None in gits or any(g.get("dirty") for g in gits):  # uncommitted changes: unknown code
        verdict = "unknown" if len(set(texts)) == 1 else "different"
    else:
        verdict = "same" if len(set(texts)) == 1 else "different"
    rows = [("code (git)", texts, verdict)]
    versions = [e.get("versions") if isinstance(e.get("versions"), dict) else {} for e in envs]
    changed = [k for k in sorted(set().union(*versions)) if _differs([v.get(k) for v in versions])]
    for name in changed:
        rows.append((f"version {name}", [str(v.get(name, "-")) for v in versions], "different"))
    if not changed:
        rows.append(("versions", ["same packages"] * len(envs), "same"))
    return rows


def _metric_rows(dirs: list[Path]) -> list[tuple[str, list[str], str]]:
    from gradwise.tracking.files import read_metrics

    summaries = [_summary(d) for d in dirs]
    rows = [
        ("state", [s.state for s in summaries], ""),
        ("steps", [str(s.step if s.step is not None else "-") for s in summaries], ""),
    ]
    monitors = {s.monitor for s in summaries}
    best = [
        "-"
        if s.best_metric is None
        else f"{s.best_metric:.4g}" + ("" if len(monitors) == 1 else f" ({s.monitor})")
        for s in summaries
    ]
    rows.append((f"best {summaries[0].monitor if len(monitors) == 1 else 'monitor'}", best, ""))
    last = []
    for d in dirs:
        records = read_metrics(d, "val")
        last.append(records[-1] if records else {})
    names = sorted({k for r in last for k, v in r.items() if k.startswith("val_") and _number(v)})
    for name in names:
        values = [f"{r[name]:.4g}" if _number(r.get(name)) else "-" for r in last]
        rows.append((f"last {name}", values, ""))
    return rows


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def _differs(values: list[Any]) -> bool:
    return any(v != values[0] for v in values[1:])


def _show(value: Any) -> str:
    import json

    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return "null" if value is None else str(value)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            return {}
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}
