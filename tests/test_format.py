"""Numbers in messages stay short whatever their size."""

from __future__ import annotations

from gradwise._format import percent, times
from gradwise.doctor import RULES
from gradwise.doctor.signals import Signals


def test_times_and_percent_are_readable_at_any_size():
    assert [times(v) for v in (1.25, 42.4, 450.0, 19984011887434984.0)] == [
        "1.2x",
        "42x",
        "450x",
        "2.0e+16x",
    ]
    assert [percent(v) for v in (0.37, 0.004, 1.5, 37682534124208.34)] == [
        "37%",
        "0.4%",
        "150%",
        "3.8e+13x",
    ]
    assert times(float("inf")) == "infx"


def test_a_plateau_far_above_its_start_is_not_printed_with_sixteen_digits():
    s = Signals(loss_kind=None, loss_scaling=False)
    for step in range(200):
        s.loss.append(step, 1.0 if step < 10 else 3.7e13)
        s.step = step + 1
    result = RULES["GW307"].check(s)
    assert result is not None and "3.7e+13x of its initial value" in result[0], result
