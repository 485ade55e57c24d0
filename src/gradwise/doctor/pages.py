"""The doctor rules' pages without importing torch (``gradwise explain`` answers in a blink).

``rules.json`` is generated from the rule registry by ``python -m gradwise.doctor.docs``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

INDEX = Path(__file__).with_name("rules.json")


@dataclass(frozen=True)
class RulePage:
    code: str
    name: str
    severity: str
    stage: str
    summary: str
    page: str


@cache
def rule_pages() -> dict[str, RulePage]:
    """Every rule by code, as documented."""
    return {entry["code"]: RulePage(**entry) for entry in json.loads(INDEX.read_text("utf-8"))}
