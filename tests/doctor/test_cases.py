"""Every planted fault is detected with its rule's code; healthy runs end without warnings or errors."""

from __future__ import annotations

import pytest

from gradwise.doctor import RULES
from gradwise.doctor.cases import CASES

FAULTS = [name for name, case in CASES.items() if case.expect]
HEALTHY = [name for name, case in CASES.items() if case.expect is None]


def test_every_rule_has_a_planted_fault_and_there_are_five_healthy_runs():
    planted = {CASES[name].expect for name in FAULTS}
    assert set(RULES) - planted == set()
    assert len(HEALTHY) >= 5


@pytest.mark.parametrize("name", FAULTS)
def test_planted_fault_is_detected(name):
    case = CASES[name]
    doctor = case.run()
    codes = [f.code for f in doctor.findings]
    assert case.expect in codes, (name, [str(f) for f in doctor.findings])
    finding = next(f for f in doctor.findings if f.code == case.expect)
    assert finding.message and finding.fixes and finding.evidence


@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_run_has_no_warnings_or_errors(name):
    doctor = CASES[name].run()
    serious = [str(f) for f in doctor.findings if f.severity != "info"]
    assert serious == []
