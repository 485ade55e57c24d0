"""The doctor's visual report: one self-contained HTML file that shows a run as an expert reads it.

``report_run(run_dir)`` reads ``metrics.jsonl``, ``recipe.yaml`` and the doctor's files
(``doctor/telemetry.json``, ``doctor/findings.json``, ``doctor/repairs.json``) and writes
``run_dir/report.html``. The file has no external resources: charts are matplotlib SVG inlined in
the page, the CSS and the few lines of JavaScript are inline too, so it opens offline from disk.

Sections, in the order an expert looks at a run: verdict and recipe, findings (errors first),
training curves with markers where findings fired and repairs happened, per-layer gradient norms
and update-to-weight ratios, activation statistics, and the repairs log. Any telemetry key may be
missing; the report then says what is not available instead of failing.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from gradwise.doctor.findings import SEVERITY_ORDER
from gradwise.errors import GradwiseError
from gradwise.tracking.files import atomic_write_text, now_iso, read_metrics

MAX_POINTS = 1500  # per line; longer series keep each bucket's min and max, so spikes survive
MAX_LAYER_POINTS = 4000  # shared by the lines of a per-layer chart (at least 150 each)
MAX_COLUMNS = 400  # per heatmap row
FIG_WIDTH, LEFT, RIGHT = 9.5, 0.13, 0.82  # inches; the axes' left and right edges as fractions
UPDATE_RATIO_BAND = (10**-3.5, 10**-2.5)  # about 1e-3: the update/weight ratio of healthy training
SEVERITY_COLOURS = {"error": "#c62828", "warning": "#e65100", "info": "#1565c0"}
REPAIR_COLOUR = "#6a1b9a"
SATURATING = ("sigmoid", "tanh", "hardtanh", "hardsigmoid", "softsign", "logsigmoid")


# ---------------------------------------------------------------------------------------------
# public API


def write_report(
    path: str | Path,
    *,
    telemetry: dict,
    findings: list[dict],
    repairs: Iterable[dict] = (),
    metrics: Iterable[dict] = (),
    title: str = "gradwise report",
    recipe: dict | None = None,
) -> Path:
    """Write the HTML report to ``path`` (atomically) and return the path."""
    path = Path(path)
    data = _ReportData(
        telemetry=telemetry or {},
        findings=_sorted_findings(findings or []),
        repairs=sorted(
            (r for r in repairs or () if isinstance(r, dict)), key=lambda r: _num(r.get("step"), 0)
        ),
        metrics=list(metrics or ()),
        recipe=recipe or {},
    )
    html = _page(title, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, html)
    return path


def report_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Build the report of the run in ``run_dir``; written to ``out`` or ``run_dir/report.html``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GradwiseError(
            f"{run_dir} is not a directory; expected a run directory such as runs/<name>"
        )
    doctor = run_dir / "doctor"
    telemetry = _read_json(doctor / "telemetry.json", {}, dict)
    findings = _read_json(doctor / "findings.json", [], list)
    repairs = _read_json(doctor / "repairs.json", [], list)
    return write_report(
        out if out is not None else run_dir / "report.html",
        telemetry=telemetry,
        findings=findings,
        repairs=repairs,
        metrics=read_metrics(run_dir),
        title=run_dir.resolve().name,
        recipe=_read_recipe(run_dir / "recipe.yaml"),
    )


# ---------------------------------------------------------------------------------------------
# reading


def _read_json(path: Path, default: Any, kind: type) -> Any:
    """The JSON in ``path``, ``default`` when the file does not exist; a clear error when damaged."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GradwiseError(f"{path} is not valid JSON ({e}); the file was damaged") from None
    if not isinstance(value, kind):
        raise GradwiseError(f"{path}: expected a JSON {kind.__name__}, got {type(value).__name__}")
    return value


def _read_recipe(path: Path) -> dict | None:
    """``recipe.yaml`` as a dict; None (with a warning) when it is missing or unreadable."""
    if not path.exists():
        return None
    from gradwise.errors import ConfigError
    from gradwise.recipe import load_yaml

    try:  # a run directory may come from anyone: damaged or alias-bombed YAML is left out
        recipe = load_yaml(path.read_text(encoding="utf-8"), str(path))
    except (ConfigError, UnicodeDecodeError) as e:
        warnings.warn(
            f"{path}: could not read the recipe ({e}); the report leaves it out", stacklevel=3
        )
        return None
    return recipe if isinstance(recipe, dict) else None


class _ReportData:
    """Everything the page shows, with the series resolved from telemetry or metrics."""

    def __init__(
        self,
        telemetry: dict,
        findings: list[dict],
        repairs: list[dict],
        metrics: list[dict],
        recipe: dict,
    ):
        self.telemetry, self.findings, self.repairs, self.recipe = (
            telemetry,
            findings,
            repairs,
            recipe,
        )
        train = [m for m in metrics if m.get("split") == "train"]
        val = [m for m in metrics if m.get("split") == "val"]
        self.loss, self.loss_source = _series_from(telemetry, "loss", train, "loss")
        self.lr, self.lr_source = _series_from(telemetry, "lr", train, "lr")
        self.grad_norm, self.grad_norm_source = _series_from(
            telemetry, "grad_norm", train, "grad_norm"
        )
        self.val_loss, self.val_metric, self.val_metric_name = _validation(telemetry, val, recipe)
        steps = [p[0] for s in (self.loss, self.lr, self.grad_norm, self.val_loss) for p in s]
        self.xlim = (min(steps), max(steps)) if steps else None


def _series_from(telemetry: dict, key: str, records: list[dict], field: str) -> tuple[list, str]:
    """``telemetry[key]`` if it has points, else ``field`` of the metrics records with a step."""
    points = _points(telemetry.get(key))
    if points:
        return points, "doctor telemetry"
    points = [(r["step"], r[field]) for r in records if "step" in r and field in r]
    return _points(points), "metrics.jsonl" if points else ""


def _validation(telemetry: dict, records: list[dict], recipe: dict) -> tuple[list, list, str]:
    """Validation loss and metric points, and the metric's name."""
    val = telemetry.get("val") or []
    if val:
        loss = _points([(v.get("step"), v.get("loss")) for v in val if isinstance(v, dict)])
        metric = _points([(v.get("step"), v.get("metric")) for v in val if isinstance(v, dict)])
        name = str(_get(recipe, "early_stopping", "monitor") or "metric")
        return loss, metric, "metric" if name == "auto" else name
    loss = _points([(r.get("step"), r.get("val_loss")) for r in records])
    names = [k for r in records for k in r if k.startswith("val_") and k != "val_loss"]
    monitor = f"val_{_get(recipe, 'early_stopping', 'monitor')}"
    name = monitor if monitor in names else (names[0] if names else "")
    metric = _points([(r.get("step"), r.get(name)) for r in records]) if name else []
    return loss, metric, name.removeprefix("val_")


def _points(raw: Any) -> list[tuple[float, float]]:
    """``[[step, value], ...]`` as (step, value) floats; malformed entries skipped, null -> NaN."""
    out = []
    for item in raw or ():
        if not isinstance(item, list | tuple) or len(item) != 2:
            continue
        step, value = _num(item[0]), _num(item[1], math.nan)
        if step is not None and value is not None:
            out.append((step, value))
    out.sort(key=lambda p: p[0])
    return out


def _num(value: Any, default: float | None = None) -> float | None:
    if isinstance(value, bool):
        return default
    if isinstance(value, int | float):
        return float(value)
    return default


def _get(d: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _sorted_findings(findings: list[dict]) -> list[dict]:
    """Errors first, then warnings, then info; within a severity by first step and code."""
    good = [f for f in findings if isinstance(f, dict)]
    return sorted(
        good,
        key=lambda f: (
            SEVERITY_ORDER.get(f.get("severity"), 3),
            _num(f.get("step"), 0),
            str(f.get("code")),
        ),
    )


# ---------------------------------------------------------------------------------------------
# the page


def _page(title: str, data: _ReportData) -> str:
    sections = [
        ("findings", "Findings", _findings_section(data)),
        ("curves", "Training curves", _curves_section(data)),
        ("layers", "Per-layer gradients and updates", _layers_section(data)),
        ("activations", "Activations", _activations_section(data)),
        ("repairs", "Repairs", _repairs_section(data)),
    ]
    nav = " ".join(f'<a href="#{sid}">{escape(name)}</a>' for sid, name, _ in sections)
    body = "\n".join(
        f'<section id="{sid}">\n<h2>{escape(name)}</h2>\n{content}\n</section>'
        for sid, name, content in sections
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light">
<title>{escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header>
<p class="kicker">gradwise doctor report</p>
<h1>{escape(title)}</h1>
{_verdict(data)}
{_recipe_summary(data.recipe)}
<nav>{nav}</nav>
</header>
<main>
{body}
</main>
<footer>Written by gradwise on {escape(now_iso())}. Self-contained: works offline.</footer>
<script>{_JS}</script>
</body>
</html>
"""


def _verdict(data: _ReportData) -> str:
    counts = {
        s: sum(f.get("severity") == s for f in data.findings) for s in ("error", "warning", "info")
    }
    if counts["error"] or counts["warning"]:
        parts = [_plural(counts["error"], "error"), _plural(counts["warning"], "warning")]
        text = ", ".join(p for p in parts if p)
        level = "error" if counts["error"] else "warning"
    else:
        text, level = "healthy: no warnings or errors", "healthy"
    extras = [_plural(counts["info"], "note"), _plural(len(data.repairs), "automatic repair")]
    extras = [e for e in extras if e]
    if extras:
        text += " (" + ", ".join(extras) + ")"
    return f'<p class="verdict {level}" id="verdict">{escape(text)}</p>'


def _plural(n: int, word: str) -> str:
    return "" if n == 0 else f"{n} {word}" + ("" if n == 1 else "s")


def _recipe_summary(recipe: dict) -> str:
    """Optimizer, learning rate, schedule, batch size and the other settings that shape training."""
    if not recipe:
        return '<p class="na">Recipe: not available.</p>'
    items = []
    model, task = _get(recipe, "model", "name"), recipe.get("task")
    if model:
        items.append(("model", f"{model}" + (f" ({task})" if task and task != "auto" else "")))
    optim = recipe.get("optim") or {}
    if optim:
        text = str(optim.get("name", "?"))
        if "weight_decay" in optim:
            text += f", weight decay {_fmt(optim['weight_decay'])}"
        items.append(("optimizer", text))
        if "lr" in optim:
            items.append(("lr", _fmt(optim["lr"])))
    schedule = recipe.get("schedule") or {}
    if schedule.get("name"):
        text = str(schedule["name"])
        if schedule["name"] in ("warmup_cosine", "onecycle") and "warmup" in schedule:
            text += f", warmup {_fmt(schedule['warmup'])}"
        items.append(("schedule", text))
    batch, accumulate = _get(recipe, "data", "batch_size"), _get(recipe, "train", "accumulate") or 1
    if batch:
        text = (
            str(batch)
            if accumulate == 1
            else f"{batch} × {accumulate} accumulated = {batch * accumulate}"
        )
        items.append(("batch size", text))
    train = recipe.get("train") or {}
    for key, label in (
        ("epochs", "epochs"),
        ("max_steps", "max steps"),
        ("grad_clip", "grad clip"),
        ("precision", "precision"),
    ):
        if train.get(key) is not None:
            items.append((label, _fmt(train[key])))
    if not items:
        return '<p class="na">Recipe: not available.</p>'
    cells = "".join(f"<div><dt>{escape(k)}</dt><dd>{escape(v)}</dd></div>" for k, v in items)
    return f'<dl class="recipe">{cells}</dl>'


def _fmt(value: Any) -> str:
    """Numbers short and exact enough to read (4 significant digits), everything else as text."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int) or (
        math.isfinite(value) and value == int(value) and abs(value) < 1e15
    ):
        return str(int(value))
    return f"{value:.4g}"


def _na(what: str, why: str = "") -> str:
    return f'<p class="na"><strong>{escape(what)}:</strong> not available{escape(why and f" ({why})")}.</p>'


# ---------------------------------------------------------------------------------------------
# findings and repairs


def _findings_section(data: _ReportData) -> str:
    if not data.findings:
        return '<p class="none">No findings: the doctor saw nothing wrong in this run.</p>'
    counts = {
        s: sum(f.get("severity") == s for f in data.findings) for s in ("error", "warning", "info")
    }
    boxes = "".join(
        f'<label><input type="checkbox" data-filter="{s}" checked> {s} ({n})</label>'
        for s, n in counts.items()
        if n
    )
    ids: set[str] = set()
    cards = "\n".join(_finding_card(f, ids) for f in data.findings)
    return f'<div class="filters">Show: {boxes}</div>\n<div class="cards">\n{cards}\n</div>'


def _finding_card(f: dict, ids: set[str]) -> str:
    """One card: code, name, severity, steps, message, evidence, fixes, references.

    The card's id is ``finding-<code>`` (for links), unless an earlier card has it already.
    """
    severity = str(f.get("severity", "info"))
    anchor = f"finding-{f.get('code', '')}"
    anchor_attr = "" if anchor in ids else f' id="{escape(anchor)}"'
    ids.add(anchor)
    step, last, count = f.get("step"), f.get("last_step"), f.get("count", 1)
    where = f"step {_fmt(step)}" if step is not None else "step unknown"
    if last is not None and last != step:
        where += f" – {_fmt(last)}"
    if isinstance(count, int) and count > 1:
        where += f" · fired {count}×"
    evidence = f.get("evidence") or {}
    rows = "".join(
        f"<tr><th>{escape(str(k))}</th><td>{escape(_fmt(v))}</td></tr>" for k, v in evidence.items()
    )
    parts = [
        f'<article class="finding {escape(severity)}"{anchor_attr}>',
        '<div class="finding-head">',
        f'<span class="badge {escape(severity)}">{escape(severity)}</span>',
        f'<h3><span class="code">{escape(str(f.get("code", "?")))}</span> {escape(str(f.get("name", "")))}</h3>',
        f'<span class="where">{escape(where)}</span>',
        "</div>",
        f'<p class="message">{escape(str(f.get("message", "")))}</p>',
    ]
    if rows:
        parts.append(f'<table class="evidence"><caption>Evidence</caption>{rows}</table>')
    fixes = f.get("fixes") or []
    if fixes:
        items = "".join(f"<li>{escape(str(x))}</li>" for x in fixes)
        parts.append(f'<div class="fixes"><h4>What to do, in order</h4><ol>{items}</ol></div>')
    refs = f.get("references") or []
    if refs:
        # plain text, not links: the report must not point at anything outside the file
        items = "".join(f'<li><span class="ref">{escape(str(r))}</span></li>' for r in refs)
        parts.append(f'<div class="refs"><h4>References</h4><ul>{items}</ul></div>')
    parts.append("</article>")
    return "\n".join(parts)


def _repairs_section(data: _ReportData) -> str:
    if not data.repairs:
        return '<p class="none">No repairs: the doctor did not change the run.</p>'
    rows = "".join(
        "<tr>"
        f"<td>{escape(_fmt(r.get('step', '')))}</td>"
        f'<td><span class="code">{escape(str(r.get("code", "")))}</span></td>'
        f"<td>{escape(str(r.get('action', '')))}</td>"
        f"<td>{escape(_fmt(r['rolled_back_to'])) if r.get('rolled_back_to') is not None else '–'}</td>"
        "</tr>"
        for r in data.repairs
    )
    return (
        '<table class="log"><thead><tr><th>step</th><th>finding</th><th>action</th>'
        f"<th>rolled back to</th></tr></thead><tbody>{rows}</tbody></table>"
    )


# ---------------------------------------------------------------------------------------------
# charts


def _curves_section(data: _ReportData) -> str:
    out = []
    if data.loss or data.val_loss:
        out.append(_figure("loss", _loss_caption(data), _loss_chart, data))
    else:
        out.append(_na("Loss", "no loss in the doctor's telemetry or in metrics.jsonl"))
    if data.lr:
        caption = "Learning rate per optimizer step, as the schedule set it."
        out.append(_figure("lr", caption, _line_chart, data, data.lr, "learning rate", "#2e7d32"))
    else:
        out.append(_na("Learning rate", "no lr in the doctor's telemetry or in metrics.jsonl"))
    if data.grad_norm:
        clip = _get(data.recipe, "train", "grad_clip")
        caption = (
            "Global gradient norm before clipping, log scale. Spikes an order of magnitude above the "
            "running level precede divergence; a steady climb means the step size is too large."
        )
        if clip:
            caption += f" Dashed: the clipping threshold ({_fmt(clip)})."
        out.append(
            _figure(
                "grad-norm",
                caption,
                _line_chart,
                data,
                data.grad_norm,
                "gradient norm",
                "#37474f",
                log=True,
                hline=clip,
            )
        )
    else:
        out.append(
            _na("Gradient norm", "no grad_norm in the doctor's telemetry or in metrics.jsonl")
        )
    return "\n".join(out)


def _loss_caption(data: _ReportData) -> str:
    text = f"Training loss (from {data.loss_source})" if data.loss else "No training loss"
    if len(data.loss) > 50:
        text += ", light: the samples, dark: smoothed"
    if data.val_loss:
        text += "; orange: validation loss"
    if data.val_metric:
        text += f"; below: validation {data.val_metric_name}"
    text += (
        ". Vertical lines: findings (coloured by severity, labelled by code) and repairs "
        "(purple, dotted; the shaded span before one was rolled back)."
    )
    bad = [s for s, v in data.loss if not math.isfinite(v)]
    if bad:
        text += f" The loss was NaN or infinite at {len(bad)} sampled steps (first: step {_fmt(bad[0])})."
    return text


def _loss_chart(data: _ReportData) -> Any:
    if data.val_metric:
        fig, (ax, ax2) = _new_figure(3.8, 2, height_ratios=[2.4, 1])
    else:
        fig, (ax,), ax2 = *_new_figure(3.0), None
    values = [v for _, v in data.loss + data.val_loss if math.isfinite(v)]
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
        _log_ticks(ax)
    if data.loss:
        x, y = _xy(data.loss)
        dx, dy = _decimate(x, y)
        if len(x) > 50:
            ax.plot(dx, dy, color="#90caf9", lw=0.8, label="train (samples)")
            sx, sy = _decimate(x, _smooth(y))
            ax.plot(sx, sy, color="#1565c0", lw=1.6, label="train (smoothed)")
        else:
            ax.plot(dx, dy, color="#1565c0", lw=1.4, marker=_dots(x), ms=2.5, label="train")
    if data.val_loss:
        x, y = _decimate(*_xy(data.val_loss))
        ax.plot(x, y, color="#e65100", lw=1.2, marker=_dots(x), ms=3.5, label="validation")
    ax.set_ylabel("loss")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    _mark_events(ax, data, labels=True)
    if ax2 is not None:
        x, y = _decimate(*_xy(data.val_metric))
        ax2.plot(x, y, color="#6d4c41", lw=1.2, marker=_dots(x), ms=3.5)
        ax2.set_ylabel(f"val {data.val_metric_name}"[:24])
        _mark_events(ax2, data, labels=False)
    _finish_x(ax2 or ax, data)
    return fig


def _dots(x: np.ndarray) -> str | None:
    """Dots on each point of a short series (validation every epoch); a plain line for long ones."""
    return "o" if len(x) <= 60 else None


def _line_chart(
    data: _ReportData,
    points: list,
    ylabel: str,
    colour: str,
    *,
    log: bool = False,
    hline: float | None = None,
) -> Any:
    fig, (ax,) = _new_figure(2.6)
    x, y = _xy(points, positive=log)
    if log and len(y):
        ax.set_yscale("log")
        _log_ticks(ax)
    dx, dy = _decimate(x, y)
    ax.plot(dx, dy, color=colour, lw=1.1)
    if hline:
        ax.axhline(hline, color="#455a64", ls="--", lw=1, label=f"clip {_fmt(hline)}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_ylabel(ylabel)
    _mark_events(ax, data, labels=True)
    _finish_x(ax, data)
    return fig


def _layers_section(data: _ReportData) -> str:
    tel = data.telemetry
    order = _layer_order(tel, "layer_grad_norm", "update_ratio")
    out = []
    grad = {k: _points(v) for k, v in (tel.get("layer_grad_norm") or {}).items()}
    grad = {k: grad[k] for k in order if grad.get(k)}
    if grad:
        caption = (
            "Gradient norm of each layer (the doctor's layer_grad_norm), log colour scale; layers "
            "top to bottom in forward order (first layer at the top). Healthy: similar colours down "
            "a column. Dark top rows (the first layers): vanishing gradients; a bright row or "
            "column: a layer or a step that explodes. Grey: no sample or a zero gradient."
        )
        out.append(_figure("layer-grad-norm", caption, _heatmap, data, grad, "grad norm"))
    else:
        out.append(_na("Per-layer gradient norms", "no layer_grad_norm in the doctor's telemetry"))
    ratio = {k: _points(v) for k, v in (tel.get("update_ratio") or {}).items()}
    ratio = {k: ratio[k] for k in order if ratio.get(k)}
    if ratio:
        caption = (
            "Update-to-weight ratio ‖Δw‖/‖w‖ per optimizer step for each layer, log scale. The green "
            "band is the ~1e-3 rule of thumb: well below it a layer barely learns (learning rate too "
            "low for it), well above it the updates are large enough to destabilise training."
        )
        out.append(_figure("update-ratio", caption, _ratio_chart, data, ratio))
    else:
        out.append(_na("Update-to-weight ratios", "no update_ratio in the doctor's telemetry"))
    if grad or ratio:
        out.append(_latest_table(order, [("gradient norm", grad), ("update/weight", ratio)]))
    return "\n".join(out)


def _activations_section(data: _ReportData) -> str:
    acts = data.telemetry.get("activations") or {}
    acts = {k: v for k, v in acts.items() if isinstance(v, dict)}
    if not any(
        _points(v.get(key)) for v in acts.values() for key in ("mean", "std", "dead", "saturated")
    ):
        return _na("Activation statistics", "no activations in the doctor's telemetry")
    order = [k for k in _layer_order(data.telemetry, "activations") if k in acts]
    caption = (
        "Activation statistics per layer, lines coloured by depth. Std should stay of order 1 across "
        "layers: shrinking with depth means vanishing signal, growing means exploding. Dead units "
        "(ReLU family: never positive on the batch) and saturated units (sigmoid/tanh: in the flat "
        "tails) learn nothing; a fraction that climbs during training is a warning sign."
    )
    figure = _figure("activations", caption, _activation_chart, data, acts, order)
    rows = []
    for name in order:
        stats = acts[name]
        cells = [escape(name), escape(str(stats.get("kind", "")))]
        for key in ("mean", "std", "dead", "saturated"):
            pts = _points(stats.get(key))
            value = pts[-1][1] if pts else None
            text = (
                "–"
                if value is None
                else (f"{value:.1%}" if key in ("dead", "saturated") else _fmt(value))
            )
            warn = key in ("dead", "saturated") and value is not None and value > 0.5
            cells.append(f'<td class="{"bad" if warn else ""}">{escape(text)}</td>')
        rows.append(f"<tr><th>{cells[0]}</th><td>{cells[1]}</td>{''.join(cells[2:])}</tr>")
    table = (
        "<details><summary>Latest values per layer</summary>"
        '<table class="log"><thead><tr><th>layer</th><th>kind</th><th>mean</th><th>std</th>'
        f"<th>dead</th><th>saturated</th></tr></thead><tbody>{''.join(rows)}</tbody></table></details>"
    )
    return figure + "\n" + table


def _layer_order(telemetry: dict, *keys: str) -> list[str]:
    """Layer names in forward order: ``telemetry["layers"]`` first, then any others as they appear."""
    order = [str(x) for x in telemetry.get("layers") or []]
    for key in keys:
        for name in telemetry.get(key) or {}:
            if name not in order:
                order.append(name)
    return order


def _latest_table(order: list[str], columns: list[tuple[str, dict]]) -> str:
    head = "".join(f"<th>{escape(name)} (latest)</th>" for name, _ in columns)
    rows = []
    for layer in order:
        if not any(layer in series for _, series in columns):
            continue
        cells = "".join(
            f"<td>{escape(_fmt(series[layer][-1][1])) if series.get(layer) else '–'}</td>"
            for _, series in columns
        )
        rows.append(f"<tr><th>{escape(layer)}</th>{cells}</tr>")
    return (
        "<details><summary>Latest values per layer</summary>"
        f'<table class="log"><thead><tr><th>layer</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></details>'
    )


def _heatmap(data: _ReportData, rows: dict[str, list], label: str) -> Any:
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    names = list(rows)
    grid, x0, x1 = _grid([rows[n] for n in names])
    fig, (ax,) = _new_figure(min(9.0, max(2.6, 0.8 + 0.18 * len(names))))
    positive = grid[np.isfinite(grid) & (grid > 0)]
    lo, hi = (positive.min(), positive.max()) if positive.size else (1e-3, 1.0)
    if lo == hi:  # one value: half a decade either side
        lo, hi = lo / 10**0.5, hi * 10**0.5
    cmap = colormaps["magma"].with_extremes(bad="#d9d9d9")
    norm = LogNorm(vmin=lo, vmax=hi)
    masked = np.ma.masked_invalid(np.where(grid > 0, grid, np.nan))
    image = ax.imshow(
        masked,
        aspect="auto",
        interpolation="nearest",
        cmap=cmap,
        norm=norm,
        extent=(x0, x1, len(names) - 0.5, -0.5),
    )
    _log_ticks(_colorbar(fig, ax, image, label=label).ax)
    _layer_ticks(ax, names)
    _mark_events(ax, data, labels=False, lw=0.8, alpha=0.9)
    ax.grid(False)
    _finish_x(ax, data)
    return fig


def _ratio_chart(data: _ReportData, rows: dict[str, list]) -> Any:
    fig, (ax,) = _new_figure(3.0)
    ax.set_yscale("log")
    ax.axhspan(*UPDATE_RATIO_BAND, color="#43a047", alpha=0.13, lw=0)
    ax.axhline(1e-3, color="#2e7d32", ls="--", lw=0.9)
    _depth_lines(fig, ax, rows, positive=True)
    ax.set_ylabel("‖Δw‖ / ‖w‖")
    _mark_events(ax, data, labels=True)
    _finish_x(ax, data)
    return fig


def _activation_chart(data: _ReportData, acts: dict, order: list[str]) -> Any:
    def stat(
        key: str, kinds: tuple[str, ...] | None = None, exclude: bool = False
    ) -> dict[str, list]:
        out = {}
        for name in order:
            kind = str(acts[name].get("kind", "")).lower()
            if kinds is not None and kind and (any(k in kind for k in kinds) == exclude):
                continue
            pts = _points(acts[name].get(key))
            if pts:
                out[name] = pts
        return out

    panels = [("std", stat("std"), True), ("mean", stat("mean"), False)]
    dead = stat("dead", SATURATING, exclude=True)  # the ReLU family (and layers of unknown kind)
    saturated = stat("saturated", SATURATING)
    if dead:
        panels.append(("dead fraction", dead, False))
    if saturated:
        panels.append(("saturated fraction", saturated, False))
    panels = [p for p in panels if p[1]]
    fig, axes = _new_figure(0.6 + 1.7 * len(panels), len(panels))
    for ax, (label, rows, log) in zip(axes, panels, strict=True):
        positive = log and all(v > 0 for pts in rows.values() for _, v in pts if math.isfinite(v))
        if positive:
            ax.set_yscale("log")
            _log_ticks(ax)
        if label.endswith("fraction"):
            ax.set_ylim(-0.02, 1.02)
        _depth_lines(fig, ax, rows, positive=positive, legend=ax is axes[0], layers=order)
        ax.set_ylabel(label)
        _mark_events(ax, data, labels=ax is axes[0])
    _finish_x(axes[-1], data)
    return fig


def _depth_lines(
    fig: Any,
    ax: Any,
    rows: dict[str, list],
    *,
    positive: bool,
    legend: bool = True,
    layers: list[str] | None = None,
) -> None:
    """One line per layer, coloured from the first layer (dark) to the last (light)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    layers = layers or list(rows)
    cmap = colormaps["viridis"]
    depth = {name: i / max(1, len(layers) - 1) * 0.9 for i, name in enumerate(layers)}
    for name, pts in rows.items():
        x, y = _decimate(*_xy(pts, positive=positive), max(150, MAX_LAYER_POINTS // len(rows)))
        ax.plot(x, y, color=cmap(depth.get(name, 0.0)), lw=1.1, label=name)
    if not legend:
        return
    if len(rows) <= 10:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    else:
        bar = _colorbar(fig, ax, ScalarMappable(Normalize(0, 0.9), cmap), ticks=[0, 0.9])
        bar.ax.set_yticklabels(["first layer", "last layer"])


def _layer_ticks(ax: Any, names: list[str]) -> None:
    every = max(1, math.ceil(len(names) / 40))
    ticks = list(range(0, len(names), every))
    ax.set_yticks(ticks)
    ax.set_yticklabels([_short(names[i]) for i in ticks], fontsize=7)


def _short(name: str, limit: int = 22) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]


def _mark_events(
    ax: Any, data: _ReportData, *, labels: bool, lw: float = 1.0, alpha: float = 0.75
) -> None:
    """Vertical lines where findings fired (coloured by severity) and repairs happened (purple).

    Labels of events closer than 1.5% of the step range are joined, so they do not overprint.
    """
    events = []  # (step, rank, label, colour, line style)
    for f in data.findings:
        step, severity = _num(f.get("step")), f.get("severity")
        if step is not None:
            colour = SEVERITY_COLOURS.get(severity, "#546e7a")
            events.append(
                (step, SEVERITY_ORDER.get(severity, 3), str(f.get("code", "?")), colour, "-")
            )
    for r in data.repairs:
        step, back = _num(r.get("step")), _num(r.get("rolled_back_to"))
        if step is None:
            continue
        events.append((step, 4, "repair", REPAIR_COLOUR, ":"))
        if back is not None and back < step:
            ax.axvspan(back, step, color=REPAIR_COLOUR, alpha=0.08, lw=0)
    events.sort()
    for step, _, _, colour, style in events:
        ax.axvline(step, color=colour, lw=lw, ls=style, alpha=alpha)
    if not labels:
        return
    gap = 0.015 * (data.xlim[1] - data.xlim[0]) if data.xlim else 0.0
    groups: list[list[tuple]] = []
    for event in events:
        if groups and event[0] - groups[-1][0][0] <= gap:
            groups[-1].append(event)
        else:
            groups.append([event])
    transform = ax.get_xaxis_transform()
    for group in groups:
        text = ", ".join(dict.fromkeys(e[2] for e in group))
        colour = min(group, key=lambda e: e[1])[3]
        ax.text(
            group[0][0],
            0.98,
            f" {text}",
            transform=transform,
            rotation=90,
            va="top",
            ha="left",
            fontsize=7,
            color=colour,
        )


def _finish_x(ax: Any, data: _ReportData) -> None:
    if data.xlim and data.xlim[0] < data.xlim[1]:
        ax.set_xlim(*data.xlim)
    ax.set_xlabel("step")


# ---------------------------------------------------------------------------------------------
# series helpers


def _xy(points: list, positive: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values as arrays, non-finite (and, for log scales, non-positive) values dropped."""
    if not points:
        return np.zeros(0), np.zeros(0)
    arr = np.asarray(points, dtype=float)
    keep = np.isfinite(arr[:, 1]) & np.isfinite(arr[:, 0])
    if positive:
        keep &= arr[:, 1] > 0
    return arr[keep, 0], arr[keep, 1]


def _decimate(
    x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points: each of ``max_points // 2`` buckets keeps its min and its max."""
    n = len(x)
    if n <= max_points:
        return x, y
    edges = np.linspace(0, n, max_points // 2 + 1).astype(int)
    keep: list[int] = []
    for a, b in itertools.pairwise(edges):
        if b > a:
            lo, hi = a + int(np.argmin(y[a:b])), a + int(np.argmax(y[a:b]))
            keep.extend(sorted({lo, hi}))
    idx = np.asarray(keep)
    return x[idx], y[idx]


def _smooth(y: np.ndarray) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard style), span ~2% of the series."""
    alpha = 2 / (max(5, len(y) // 50) + 1)
    out, avg, weight = np.empty_like(y), 0.0, 0.0
    for i, value in enumerate(y):
        avg = (1 - alpha) * avg + alpha * value
        weight = (1 - alpha) * weight + alpha
        out[i] = avg / weight
    return out


def _grid(rows: list[list]) -> tuple[np.ndarray, float, float]:
    """Rows of (step, value) binned into at most MAX_COLUMNS equal step bins (max per bin)."""
    steps = np.asarray([s for pts in rows for s, _ in pts], dtype=float)
    lo, hi = float(steps.min()), float(steps.max())
    columns = min(len(np.unique(steps)), MAX_COLUMNS)
    if hi <= lo or columns < 2:
        lo, hi, columns = lo - 0.5, hi + 0.5, 1
    else:  # bins centred on the sampled steps when there are few of them
        half = (hi - lo) / (columns - 1) / 2
        lo, hi = lo - half, hi + half
    edges = np.linspace(lo, hi, columns + 1)
    grid = np.full((len(rows), columns), np.nan)
    for i, pts in enumerate(rows):
        x, y = _xy(pts)
        col = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, columns - 1)
        np.fmax.at(grid[i], col, y)
    return grid, lo, hi


# ---------------------------------------------------------------------------------------------
# matplotlib to inline SVG


_RC = {
    "svg.fonttype": "none",  # text stays text: small, selectable, rendered by the browser
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Helvetica", "Arial"],
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.titlesize": 10,
}


def _new_figure(
    height: float, rows: int = 1, height_ratios: Sequence[float] | None = None
) -> tuple[Any, list]:
    """A figure with ``rows`` axes sharing the step axis, at the same place in every chart.

    Fixed margins (not a tight layout) put step 0 at the same x in every chart of the page, so a
    spike can be followed from one chart to the next; legends and colour bars go in the right margin.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(FIG_WIDTH, height))
    fig.subplots_adjust(
        left=LEFT, right=RIGHT, bottom=0.5 / height, top=1 - 0.12 / height, hspace=0.12
    )
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False, height_ratios=height_ratios)[:, 0]
    return fig, list(axes)


def _colorbar(fig: Any, ax: Any, mappable: Any, **kwargs: Any) -> Any:
    """A slim colour bar in the right margin, as tall as ``ax``."""
    pos = ax.get_position()
    cax = fig.add_axes((RIGHT + 0.015, pos.y0, 0.012, pos.height))
    return fig.colorbar(mappable, cax=cax, **kwargs)


def _log_ticks(ax: Any) -> None:
    """Plain numbers (0.5, 2, 100) on a log y axis instead of 5x10^-1 (matplotlib picks which)."""
    from matplotlib.ticker import LogFormatter

    class Plain(LogFormatter):
        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:g}" if super().__call__(x, pos) else ""

    ax.yaxis.set_major_formatter(Plain(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(1.5, 0.6)))


def _figure(
    chart_id: str, caption: str, build: Callable[..., Any], *args: Any, **kwargs: Any
) -> str:
    """``build(*args, **kwargs)``'s figure as an inline ``<svg>`` in a ``<figure>`` with its caption."""
    try:
        import matplotlib
    except ImportError:
        raise GradwiseError("the report needs matplotlib: pip install 'gradwise[tune]'") from None

    buffer = io.BytesIO()
    with matplotlib.rc_context({**_RC, "svg.hashsalt": chart_id}):  # ids unique per chart, stable
        fig = build(*args, **kwargs)
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    svg = buffer.getvalue().decode("utf-8")
    svg = svg[svg.index("<svg") :]
    svg = re.sub(r"\s*<metadata>.*?</metadata>", "", svg, count=1, flags=re.S)
    svg = re.sub(r' d="[^"]*"', _round_path, svg)
    svg = svg.replace("<svg ", f'<svg role="img" aria-label="{escape(chart_id)} chart" ', 1)
    return f'<figure class="chart" id="chart-{chart_id}">\n{svg}\n<figcaption>{escape(caption)}</figcaption>\n</figure>'


def _round_path(match: re.Match) -> str:
    """Path coordinates to 0.01 pt (matplotlib writes 1e-6): a third smaller, the same picture."""
    return re.sub(r"(\.\d\d)\d+", r"\1", match.group(0))


# ---------------------------------------------------------------------------------------------
# style and behaviour

_CSS = """
:root { color-scheme: light; --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --bg: #ffffff;
  --panel: #f6f8fa; --error: #c62828; --warning: #e65100; --info: #1565c0; --ok: #2e7d32; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg); line-height: 1.5;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header, main, footer { max-width: 1040px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 28px; padding-bottom: 8px; border-bottom: 1px solid var(--line); }
.kicker { margin: 0; color: var(--muted); text-transform: uppercase; letter-spacing: .08em; font-size: 12px; }
h1 { margin: 2px 0 6px; font-size: 28px; }
h2 { margin: 36px 0 12px; font-size: 21px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { margin: 0; font-size: 16px; flex: 1; }
h4 { margin: 10px 0 4px; font-size: 13px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; }
.verdict { display: inline-block; margin: 4px 0 10px; padding: 4px 12px; border-radius: 6px; font-weight: 600; }
.verdict.error { background: #fdecea; color: var(--error); }
.verdict.warning { background: #fff3e0; color: var(--warning); }
.verdict.healthy { background: #e8f5e9; color: var(--ok); }
dl.recipe { display: flex; flex-wrap: wrap; gap: 6px 10px; margin: 0 0 12px; }
dl.recipe div { background: var(--panel); border: 1px solid var(--line); border-radius: 6px; padding: 2px 10px; }
dl.recipe dt { display: inline; color: var(--muted); font-size: 13px; }
dl.recipe dt::after { content: ": "; }
dl.recipe dd { display: inline; margin: 0; font-weight: 600; font-variant-numeric: tabular-nums; }
nav { display: flex; gap: 16px; flex-wrap: wrap; padding: 6px 0; font-size: 14px; }
a { color: var(--info); text-decoration: none; }
a:hover { text-decoration: underline; }
.filters { margin-bottom: 10px; color: var(--muted); font-size: 14px; }
.filters label { margin-left: 12px; cursor: pointer; }
.cards { display: grid; gap: 14px; }
.finding { border: 1px solid var(--line); border-left: 5px solid var(--info); border-radius: 8px; padding: 12px 16px; }
.finding.error { border-left-color: var(--error); }
.finding.warning { border-left-color: var(--warning); }
.finding-head { display: flex; align-items: baseline; gap: 10px; flex-wrap: wrap; }
.badge { font-size: 11px; font-weight: 700; text-transform: uppercase; letter-spacing: .05em; padding: 1px 8px;
  border-radius: 10px; color: #fff; background: var(--info); }
.badge.error { background: var(--error); }
.badge.warning { background: var(--warning); }
.code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-weight: 700; }
.where { color: var(--muted); font-size: 13px; font-variant-numeric: tabular-nums; }
.message { margin: 8px 0; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 3px 12px 3px 0; border-bottom: 1px solid var(--line); vertical-align: top; }
table.evidence caption { text-align: left; font-size: 13px; color: var(--muted); text-transform: uppercase;
  letter-spacing: .04em; padding-bottom: 2px; }
table.evidence th { font-weight: normal; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
table.log { width: 100%; }
table.log thead th { color: var(--muted); font-weight: 600; }
td.bad { color: var(--error); font-weight: 600; }
ol, ul { margin: 0; padding-left: 22px; }
.ref { font-size: 13px; color: var(--muted); overflow-wrap: anywhere; }
figure.chart { margin: 0 0 22px; }
figure.chart svg { width: 100%; height: auto; display: block; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 2px; }
.na { color: var(--muted); background: var(--panel); border: 1px dashed var(--line); border-radius: 6px; padding: 8px 12px; }
.none { color: var(--ok); font-weight: 600; }
details { margin: 6px 0 20px; }
summary { cursor: pointer; color: var(--info); font-size: 14px; }
footer { margin-top: 40px; padding-top: 12px; padding-bottom: 28px; border-top: 1px solid var(--line);
  color: var(--muted); font-size: 12px; }
@media print { nav, .filters { display: none; } .finding, figure.chart { break-inside: avoid; } }
"""

_JS = """
(function () {
  "use strict";
  var boxes = document.querySelectorAll("input[data-filter]");
  Array.prototype.forEach.call(boxes, function (box) {
    box.addEventListener("change", function () {
      var cards = document.querySelectorAll(".finding." + box.getAttribute("data-filter"));
      Array.prototype.forEach.call(cards, function (card) { card.hidden = !box.checked; });
    });
  });
})();
"""
