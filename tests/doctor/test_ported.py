"""The cases ported from public reports cite their report, and every fault has a fixed twin.

``tests/doctor/test_cases.py`` runs every registered case (these included); this file checks only
the bookkeeping of :mod:`gradwise.doctor.ported`.
"""

from __future__ import annotations

from urllib.parse import urlparse

from gradwise.doctor.cases import CASES

PORTED = {n: c for n, c in CASES.items() if c.build.__module__ == "gradwise.doctor.ported"}
FAULTS = {n: c for n, c in PORTED.items() if c.expect is not None}
FIXED = {n: c for n, c in PORTED.items() if c.expect is None}


def test_ported_cases_are_registered_through_the_cases_module():
    assert PORTED
    assert all(name.startswith("ported-") for name in PORTED)


def test_every_ported_case_cites_a_web_address():
    for name, case in PORTED.items():
        url = urlparse(case.source or "")
        assert url.scheme in ("http", "https") and url.netloc, (name, case.source)
        assert case.description, name


def test_every_fault_has_a_fixed_twin_from_the_same_report():
    for name, fault in FAULTS.items():
        twin = FIXED.get(f"{name}-fixed")
        assert twin is not None, f"{name} has no healthy twin {name}-fixed"
        assert twin.source == fault.source, name
    orphans = [n for n in FIXED if n.removesuffix("-fixed") not in FAULTS]
    assert orphans == []


def test_at_least_16_faults_from_at_least_12_reports():
    assert len(FAULTS) >= 16
    assert len({case.source for case in FAULTS.values()}) >= 12
