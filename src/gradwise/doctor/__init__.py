"""The doctor: a linter for training dynamics, in gradwise's Trainer and in any plain PyTorch loop.

``Doctor`` watches a run live; ``check`` runs the preflight checks (data, model, overfit one batch,
learning-rate range test) before compute is spent. Every rule has a stable code (GW101...), a
documentation page (``gradwise explain GW302``) and can be ignored by code.
"""

from __future__ import annotations

import importlib
from typing import Any

from gradwise.doctor.doctor import Doctor
from gradwise.doctor.findings import RULES, Finding, Rule

_LAZY = {
    "check": "gradwise.doctor.preflight",
    "CheckReport": "gradwise.doctor.preflight",
    "lr_range_test": "gradwise.doctor.lr_finder",
    "LRRangeResult": "gradwise.doctor.lr_finder",
    "write_report": "gradwise.doctor.report",
    "report_run": "gradwise.doctor.report",
}

__all__ = ["RULES", "Doctor", "Finding", "Rule", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gradwise.doctor' has no attribute {name!r}")
