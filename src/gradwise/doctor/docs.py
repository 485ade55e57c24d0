"""The rules' documentation, generated from the rule registry: ``docs/doctor.md`` for people and
``rules.json`` beside this module for ``gradwise explain``, which reads it without importing torch.

Regenerate both with ``python -m gradwise.doctor.docs`` (a test fails when either is stale).
"""

from __future__ import annotations

import json
from pathlib import Path

from gradwise.doctor import RULES

INTRO = """# The doctor's rules

Generated from the rule registry by `python -m gradwise.doctor.docs`; do not edit by hand.

Every rule has a stable code that never changes meaning. Show one rule with
`gradwise explain GW302`; switch rules off with `Doctor(..., ignore=["GW307"])` or the recipe's
`doctor.ignore: [GW307]`.

| code | name | severity | stage | what it means |
| --- | --- | --- | --- | --- |
"""
MARKDOWN = Path(__file__).parents[3] / "docs" / "doctor.md"  # in a source checkout


def render() -> str:
    """docs/doctor.md: the table of rules, then every rule's page."""
    rules = [RULES[code] for code in sorted(RULES)]
    table = "".join(
        f"| {r.code} | {r.name} | {r.severity} | {r.stage} | {r.summary} |\n" for r in rules
    )
    return INTRO + table + "\n" + "\n".join(r.page() for r in rules)


def render_index() -> str:
    """rules.json: code, name, severity, stage, summary and page of every rule."""
    index = [
        {
            "code": r.code,
            "name": r.name,
            "severity": r.severity,
            "stage": r.stage,
            "summary": r.summary,
            "page": r.page(),
        }
        for r in (RULES[code] for code in sorted(RULES))
    ]
    return json.dumps(index, indent=1) + "\n"


if __name__ == "__main__":
    from gradwise.doctor.pages import INDEX
    from gradwise.tracking.files import atomic_write_text

    atomic_write_text(INDEX, render_index())
    atomic_write_text(MARKDOWN, render())
    print(f"wrote {INDEX} and {MARKDOWN}")
