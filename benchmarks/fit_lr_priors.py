"""Fit the advisor's learning-rate priors (gradwise.advisor.BASE_LR) on the searches of the fit tasks.

Reads the 20-trial TPE searches that benchmarks/lr_judgment.py stored in
benchmarks/data/lr_judgment.json, takes each fit task's smoothed optimum (the middle of its good
region, not one seed's best trial), undoes the advisor's own scalings (square root of the batch
ratio to REF_BATCH; 1/width to TRANSFORMER_REF_WIDTH for Transformers) and prints the base rate per
architecture, to one significant figure, with the task it comes from. The held-out tasks are never
read.

    .venv/bin/python benchmarks/fit_lr_priors.py
"""

from __future__ import annotations

import math

from lr_judgment import TASKS, load, smoothed_best

from gradwise.advisor import REF_BATCH, TRANSFORMER_REF_WIDTH


def main() -> None:
    results = load()
    fitted: dict[str, list[float]] = {}
    for name, spec in TASKS.items():
        r = results.get(name)
        if not spec["fit"] or not r or "search" not in r:
            continue
        best = smoothed_best(r["search"]["trials"], r["mode"])
        base = best / math.sqrt(r["batch_size"] / REF_BATCH)
        kind = r["architecture"]
        if kind == "transformer":
            base *= spec["recipe"]["model"]["kwargs"]["d_model"] / TRANSFORMER_REF_WIDTH
        if kind == "mlp" and spec["recipe"]["model"].get("kwargs", {}).get("norm", "layernorm"):
            kind = "mlp_normalised"
        fitted.setdefault(kind, []).append(base)
        print(
            f"{name:<24} {kind:<15} smoothed best {best:.3g} at batch {r['batch_size']}: base {base:.3g}"
        )
    print("\nBASE_LR = {")
    for kind, values in sorted(fitted.items()):
        mean = math.exp(sum(map(math.log, values)) / len(values))
        print(f'    "{kind}": {float(f"{mean:.1g}")},')
    print("}")


if __name__ == "__main__":
    main()
