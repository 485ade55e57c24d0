"""The doctor's test bench: every planted fault, every bug ported from a public report (each with its
fixed version as a healthy run), and the repair recipes.

Prints, for each fault, whether the rule it plants fired (detected), whether the report leads with
it (diagnosed: no other finding ranked before the cause) and after how many steps; for each healthy
run, any warning- or error-level finding (a false alarm); and for each faulty recipe, the outcome
in watch mode and in repair mode. Planted and ported cases are counted apart. Targets: every fault
detected with the right code and diagnosed, zero false alarms.

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
    print(f"{'case':<44}{'expects':<9}{'result':<11}{'step':>6}{'s':>6}  report (cause first)")
    tally: dict[str, dict[str, list]] = {}
    for name, case in CASES.items():
        group = tally.setdefault("ported" if case.source else "planted", {
            "detected": [], "diagnosed": [], "steps": [], "healthy": [], "false": []
        })  # fmt: skip
        start = time.perf_counter()
        findings = case.run().findings
        seconds = time.perf_counter() - start
        serious = [f for f in findings if f.severity != "info"]
        report = ", ".join(
            f"{f.code}@{f.step}" + (f"<{f.explained_by}" if f.explained_by else "") for f in serious
        )
        if case.expect:
            hit = next((f for f in serious if f.code == case.expect), None)
            # diagnosed: the report leads with the expected finding (no other cause before it)
            lead = hit is not None and serious[0] is hit
            group["detected"].append(hit is not None)
            group["diagnosed"].append(lead)
            if hit is not None:
                group["steps"].append(hit.step)
            result = "diagnosed" if lead else "detected" if hit else "MISSED"
            step = "" if hit is None else str(hit.step)
        else:
            group["healthy"].append(name)
            group["false"] += [f"{name}: {f.code}" for f in serious]
            result, step = ("healthy" if not serious else "FALSE+"), ""
        print(f"{name:<44}{case.expect or '-':<9}{result:<11}{step:>6}{seconds:>6.1f}  {report}")

    print()
    for label, g in tally.items():
        n = len(g["detected"])
        median = statistics.median(g["steps"]) if g["steps"] else float("nan")
        print(f"{label}: detected {sum(g['detected'])}/{n}, diagnosed (report leads with it) "
              f"{sum(g['diagnosed'])}/{n}; false alarms on {len(g['healthy'])} healthy runs: "
              f"{len(g['false'])} {g['false'] or ''}; median steps to detection {median:.0f}")  # fmt: skip

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
