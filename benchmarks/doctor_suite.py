"""The doctor's test bench: every planted fault, every healthy run, and the repair recipes.

Prints, for each planted fault, whether the rule it plants fired and after how many steps; for each
healthy run, any warning- or error-level finding (a false positive); and for each faulty recipe, the
outcome in watch mode and in repair mode. Targets: every fault detected with the right code, zero
false positives.

    .venv/bin/python benchmarks/doctor_suite.py
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

import gradwise as gw
from gradwise.doctor.cases import CASES, REPAIR_RECIPES


def main() -> None:
    torch.set_num_threads(1)
    print(f"{'case':<36}{'expects':<9}{'detected':<10}{'step':>6}{'s':>6}  also reported")
    detected, steps, false_positives = [], [], []
    for name, case in CASES.items():
        start = time.perf_counter()
        findings = case.run().findings
        seconds = time.perf_counter() - start
        codes = [f.code for f in findings]
        if case.expect:
            hit = next((f for f in findings if f.code == case.expect), None)
            detected.append(hit is not None)
            if hit is not None:
                steps.append(hit.step)
            others = ", ".join(c for c in codes if c != case.expect)
            step = "" if hit is None else str(hit.step)
            print(
                f"{name:<36}{case.expect:<9}{'yes' if hit else 'NO':<10}{step:>6}{seconds:>6.1f}  {others}"
            )
        else:
            serious = [f"{f.code}@{f.step}" for f in findings if f.severity != "info"]
            false_positives += serious
            print(
                f"{name:<36}{'-':<9}{'healthy' if not serious else 'FALSE+':<10}{'':>6}{seconds:>6.1f}  {', '.join(serious)}"
            )
    n = len(detected)
    print(f"\ndetection: {sum(detected)}/{n} planted faults with the right code; "
          f"false positives on {sum(1 for c in CASES.values() if c.expect is None)} healthy runs: "
          f"{len(false_positives)}; median steps to detection: {statistics.median(steps):.0f}")  # fmt: skip

    print(f"\n{'faulty recipe':<24}{'watch':<34}{'repair':<34}repairs")
    with tempfile.TemporaryDirectory() as root:
        for name, recipe in REPAIR_RECIPES.items():
            outcomes = []
            for mode in ("watch", "repair"):
                run = gw.Trainer(
                    recipe=recipe, root=root, progress="off", mlflow=False, tensorboard=False,
                    **{"doctor.mode": mode},
                )  # fmt: skip
                result = run.fit()
                best = "-" if result.best_metric is None else f"{result.best_metric:.3f}"
                outcomes.append((f"{result.state}, best {result.monitor} {best}", result))
            repaired = outcomes[1][1]
            repairs = (repaired.dir / "doctor" / "repairs.json").read_text()
            count = repairs.count('"step"')
            print(f"{name:<24}{outcomes[0][0]:<34}{outcomes[1][0]:<34}{count}")


if __name__ == "__main__":
    main()
