"""Numbers in messages: short and readable whatever their size (never "19984011887434984.0x")."""

from __future__ import annotations

import math


def times(ratio: float) -> str:
    """A ratio as a multiple: "1.8x", "450x", "2.0e+16x"."""
    if not math.isfinite(ratio):
        return f"{ratio}x"
    if abs(ratio) < 10:
        return f"{ratio:.1f}x"
    if abs(ratio) < 10_000:
        return f"{ratio:.0f}x"
    return f"{ratio:.1e}x"


def percent(fraction: float) -> str:
    """A fraction as a percentage ("37%", "0.4%"); far above 100% as a multiple ("3.8e+13x")."""
    if not math.isfinite(fraction) or abs(fraction) > 10:
        return times(fraction)
    if abs(fraction) < 0.01:
        return f"{fraction:.1%}"
    return f"{fraction:.0%}"
