"""What a rule's check returns: None when healthy, else (message, evidence)."""

from __future__ import annotations

Result = tuple[str, dict[str, float]] | None
