"""Tracking cost on a short run: `gradwise train` on the diabetes example for 3 epochs with MLflow and
TensorBoard on, against the same run with both off, wall time of the whole command.

Three cases, interleaved, each in a fresh process: tracking off; on with a fresh runs folder (the
first run creates runs/mlflow.db, a one-time cost); on with that database already there. Medians
and their ratios to "off". Target: on <= 1.5x off.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tracking.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = Path(__file__).parents[1] / "examples" / "diabetes_regression.yaml"
OFF = ["--set", "tracking.mlflow=false", "--set", "tracking.tensorboard=false"]


def timed(cwd: Path, *extra: str) -> float:
    command = [sys.executable, "-m", "gradwise", "train", str(RECIPE), "-q", "--set", "epochs=3"]
    start = time.perf_counter()
    subprocess.run([*command, *extra], cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"off": [], "on, new database": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp:
        warm = Path(tmp) / "warm"
        warm.mkdir()
        timed(warm)  # creates warm/runs/mlflow.db
        for i in range(args.repeats):
            fresh = Path(tmp) / f"fresh-{i}"
            fresh.mkdir()
            times["off"].append(timed(fresh, *OFF))
            shutil.rmtree(fresh / "runs")
            times["on, new database"].append(timed(fresh))
            times["on"].append(timed(warm))
    base = statistics.median(times["off"])
    print(f"{'tracking':<20}{'median s':>10}{'vs off':>10}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<20}{median:>10.2f}{median / base:>9.2f}x")


if __name__ == "__main__":
    main()
