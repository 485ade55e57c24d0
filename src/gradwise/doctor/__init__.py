"""The doctor: a linter for training dynamics, in gradwise's Trainer and in any plain PyTorch loop.

``Doctor`` watches a run live; ``check`` runs the preflight checks (data, model, overfit one batch,
learning-rate range test) before compute is spent. Every rule has a stable code (GW101...), a
documentation page (``gradwise explain GW302``) and can be ignored by code.
"""

from __future__ import annotations

from gradwise._lazy import lazy_exports

# all lazy: gradwise.doctor.pages (the rules' pages for ``gradwise explain``) must not import torch
_LAZY = {
    "Doctor": "gradwise.doctor.doctor",
    "RULES": "gradwise.doctor.doctor",  # importing the Doctor registers every rule
    "Finding": "gradwise.doctor.findings",
    "Rule": "gradwise.doctor.findings",
    "check": "gradwise.doctor.preflight",
    "CheckReport": "gradwise.doctor.preflight",
    "lr_range_test": "gradwise.doctor.lr_finder",
    "LRRangeResult": "gradwise.doctor.lr_finder",
    "write_report": "gradwise.doctor.report",
    "report_run": "gradwise.doctor.report",
}

__all__ = list(_LAZY)


__getattr__, __dir__ = lazy_exports("gradwise.doctor", _LAZY, globals())
