"""The cost of cross-validation: `gradwise cv --folds 5` against one `gradwise train` of the same
recipe (the breast-cancer MLP example), wall time of the whole command, each in a fresh process.

The two commands alternate (train, cv, train, cv, ...) so that load on the machine hits both
alike; medians and their ratio. Each fold trains on (K-1)/K of the training split, so K folds cost
about K-1 full runs of optimizer steps, plus one start-up (imports) for the whole cv: expect a
ratio a little under K-1 + start-up share, i.e. about 4-5x for K = 5.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cv_cost.py [--repeats 3] [--epochs 20] [--folds 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = Path(__file__).parents[1] / "examples" / "breast_cancer_mlp.yaml"


def timed(cwd: Path, command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "gradwise", *command], cwd=cwd, check=True, capture_output=True
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    common = [str(RECIPE), "-q", "--set", f"epochs={args.epochs}"]
    commands = {
        "train": ["train", *common],
        f"cv --folds {args.folds}": ["cv", *common, "--folds", str(args.folds)],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    with tempfile.TemporaryDirectory() as tmp:
        timed(Path(tmp), commands["train"])  # warm-up: the runs folder, its MLflow database, caches
        for _ in range(args.repeats):
            for name, command in commands.items():
                times[name].append(timed(Path(tmp), command))
    one, many = (statistics.median(t) for t in times.values())
    for name, t in times.items():
        print(
            f"{name:<14} median {statistics.median(t):6.2f} s  ({', '.join(f'{x:.2f}' for x in t)})"
        )
    print(
        f"ratio cv/train: {many / one:.2f}x for {args.folds} folds ({many / one / args.folds:.2f}x per fold)"
    )


if __name__ == "__main__":
    main()
