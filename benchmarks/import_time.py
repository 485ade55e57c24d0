"""Import cost: what gradwise adds to `import torch`, measured in fresh interpreters.

Each statement runs in its own subprocess, interleaved, several times; we compare medians.
Target: `import gradwise` adds at most 15% to `import torch` alone; `gradwise --help` imports no torch.

    .venv/bin/python benchmarks/import_time.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

STATEMENTS = {
    "import torch": "import torch",
    "import torch, gradwise": "import torch, gradwise",
    "gradwise.Trainer (first use)": "import torch, gradwise; gradwise.Trainer",
}


def timed(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in STATEMENTS}
    for _ in range(args.repeats):
        for name, code in STATEMENTS.items():
            times[name].append(timed(code))
    base = statistics.median(times["import torch"])
    print(f"{'statement':<30}{'median s':>10}{'vs import torch':>17}")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:<30}{med:>10.3f}{med / base:>17.3f}")
    help_run = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "gradwise", "--help"],
        capture_output=True,
        text=True,
    )
    modules = {
        line.rsplit("|", 1)[-1].strip() for line in help_run.stderr.splitlines() if "|" in line
    }
    print(f"`gradwise --help` imports torch: {'torch' in modules}")


if __name__ == "__main__":
    main()
