"""Time from `gradwise train` to the first optimizer step: start-up, recipe, data, model, advice
and assembly, everything a user waits for before training begins.

Each case runs the real command line in a fresh process, with a global optimizer step hook that
records the moment of the first step and ends the process there. Sources are compared in one run,
interleaved: this checkout, and with ``--before DIR`` another source tree (e.g. a ``git worktree``
of an older commit, put first on PYTHONPATH). Medians and their ratios.

    git worktree add /tmp/gw-before d8900fb~3   # the commit before gradwise.assemble
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/first_step.py --before /tmp/gw-before/src
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXAMPLES = Path(__file__).parents[1] / "examples"
CASES = {
    "digits CNN": [str(EXAMPLES / "digits_cnn.yaml")],
    "digits CNN, --advise": [str(EXAMPLES / "digits_cnn.yaml"), "--advise"],
    "char GPT": [str(EXAMPLES / "char_lm.yaml")],
}
CHILD = """
import os, sys, time
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

def first_step(optimizer, args, kwargs):
    print(time.time(), flush=True)
    os._exit(0)

register_optimizer_step_pre_hook(first_step)
sys.argv = ["gradwise", "train", *sys.argv[1:], "-q", "--set", "tracking.mlflow=false",
            "--set", "tracking.tensorboard=false"]
from gradwise.cli import main
main()
"""


def seconds_to_first_step(args: list[str], source: str | None, cwd: Path) -> float:
    env = {**os.environ}
    if source is not None:
        env["PYTHONPATH"] = source
    start = time.time()
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    if out.returncode != 0 or not out.stdout.strip():
        raise RuntimeError(f"{args}: {out.stderr[-2000:]}")
    return float(out.stdout.split()[0]) - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", help="another source tree to compare (a src/ directory)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sources = {"now": None} | ({"before": args.before} if args.before else {})
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for case, case_args in CASES.items():
                for label, source in sources.items():
                    seconds = seconds_to_first_step(case_args, source, Path(tmp))
                    times.setdefault((case, label), []).append(seconds)
    print(f"{'case':<24}" + "".join(f"{label:>12}" for label in sources) + "   now/before")
    for case in CASES:
        medians = {label: statistics.median(times[(case, label)]) for label in sources}
        ratio = f"{medians['now'] / medians['before']:>12.2f}" if args.before else ""
        print(f"{case:<24}" + "".join(f"{m:>11.2f}s" for m in medians.values()) + ratio)


if __name__ == "__main__":
    main()
