"""Quality with defaults: the digits example (examples/digits_cnn.yaml) as shipped, on this machine.

Trains the bundled recipe for several seeds with tracking on, as `gradwise demo` does, and prints the
best validation accuracy and the wall time of each run. Target: >= 97% validation accuracy.

    .venv/bin/python benchmarks/quality.py [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import gradwise as gw

RECIPE = Path(gw.__file__).parent / "examples" / "digits_cnn.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            start = time.perf_counter()
            run = gw.Trainer(
                recipe=RECIPE, seed=seed, root=str(Path(tmp) / "runs"), progress="lines"
            ).fit()
            rows.append((seed, run.best_metric, time.perf_counter() - start, run.steps))
    print(
        f"\ndigits CNN ({RECIPE.name}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    )
    print(f"{'seed':>4}  {'best val accuracy':>17}  {'wall s':>7}  {'steps':>5}")
    for seed, accuracy, seconds, steps in rows:
        print(f"{seed:>4}  {accuracy:>17.4f}  {seconds:>7.1f}  {steps:>5}")
    accuracies = [r[1] for r in rows]
    print(f"mean {statistics.mean(accuracies):.4f}, min {min(accuracies):.4f} (target >= 0.97); "
          f"median wall time {statistics.median(r[2] for r in rows):.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
