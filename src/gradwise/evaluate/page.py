"""One self-contained HTML page for an evaluation: every table, every plot (PNG as a data URI),
no script, no request: it opens anywhere, offline, and can be attached to a ticket."""

from __future__ import annotations

import base64
import math
from html import escape
from typing import Any

STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}
td,th{border:1px solid #ddd;padding:.25rem .6rem;text-align:right}
th{background:#f5f5f5}td:first-child,th:first-child{text-align:left}
.plots{display:flex;flex-wrap:wrap;gap:1rem}figure{margin:0}figcaption{font-size:.85rem;color:#555}
img{max-width:100%;height:auto;border:1px solid #eee}.note{color:#555;font-size:.9rem}
"""

CAPTIONS = {
    "confusion_matrix": "Confusion matrix",
    "roc": "ROC curves",
    "pr": "Precision-recall curves",
    "reliability": "Reliability diagram",
    "residuals": "Residuals",
    "predicted_vs_true": "Predicted vs true",
}


def _num(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return escape(str(v))
    if isinstance(v, int):
        return f"{v:,}"
    return "NaN" if math.isnan(v) else f"{v:.4f}"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_num(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _dicts(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p class=note>none</p>"
    header = list(rows[0])
    return _table(header, [[r.get(k) for k in header] for r in rows])


def render(result: dict[str, Any], plots: dict[str, bytes], title: str) -> str:
    """The page for ``result`` (an Evaluation's ``to_dict()``) and its PNG ``plots``."""
    m = result["metrics"]
    parts = [f"<h1>{escape(title)}</h1>"]
    source = result.get("source", {})
    facts = [f"task {m['task']}", f"{m['samples']:,} samples"]
    facts += [f"{k} {v}" for k, v in source.items() if v is not None]
    parts.append(f"<p class=note>{escape(' · '.join(str(f) for f in facts))}</p>")
    boot = m.get("bootstrap", {})
    parts.append("<h2>Headline metrics</h2>")
    parts.append(
        _table(
            ["metric", "value", "95% CI low", "95% CI high"],
            [[k, v["value"], v["ci_low"], v["ci_high"]] for k, v in m["headline"].items()],
        )
    )
    parts.append(
        f"<p class=note>Percentile bootstrap, {boot.get('resamples')} resamples (seed "
        f"{boot.get('seed')}).</p>"
    )
    if m.get("top_k_accuracy"):
        parts.append(
            _table(["top-k", "accuracy"], [[f"top-{k}", v] for k, v in m["top_k_accuracy"].items()])
        )
    if m.get("averages"):
        parts.append("<h2>Averages</h2>")
        parts.append(
            _table(
                ["average", "precision", "recall", "F1"],
                [[k, v["precision"], v["recall"], v["f1"]] for k, v in m["averages"].items()],
            )
        )
    if m.get("per_class"):
        parts.append("<h2>Per class</h2>" + _dicts(m["per_class"]))
    if m.get("residuals"):
        parts.append("<h2>Residuals</h2>" + _dicts([m["residuals"]]))
    cal = result.get("calibration")
    if cal:
        parts.append("<h2>Calibration (temperature scaling)</h2>")
        parts.append(_dicts([cal]))
        parts.append(
            "<p class=note>T is fitted on the validation split by minimising NLL; it changes "
            "confidences, never predictions. ECE/NLL after scaling are measured on the data T was "
            "fitted on, so they are optimistic.</p>"
        )
    analysis = result.get("analysis") or {}
    if analysis.get("worst_classes"):
        parts.append("<h2>Worst classes (lowest F1)</h2>" + _dicts(analysis["worst_classes"]))
    if analysis.get("confused_pairs"):
        parts.append("<h2>Most confused pairs</h2>" + _dicts(analysis["confused_pairs"]))
    if analysis.get("confident_mistakes") is not None:
        parts.append("<h2>Most confident mistakes</h2>" + _dicts(analysis["confident_mistakes"]))
    for name, rows in (analysis.get("slices") or {}).items():
        parts.append(f"<h2>Slices by {escape(name)}</h2>" + _dicts(rows))
    if plots:
        figures = []
        for name, png in plots.items():
            data = base64.b64encode(png).decode("ascii")
            caption = escape(CAPTIONS.get(name, name))
            figures.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{caption}" '
                f'data-plot="{escape(name)}"><figcaption>{caption}</figcaption></figure>'
            )
        parts.append("<h2>Plots</h2><div class=plots>" + "".join(figures) + "</div>")
    for note in result.get("notes", []):
        parts.append(f"<p class=note>{escape(note)}</p>")
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>"
        + "\n".join(parts)
        + "</body></html>\n"
    )
