"""Distributed training on this CPU: 1 process against 2 (DDP and FSDP2, gloo), and the memory
activation checkpointing saves on the zoo GPT.

The same MLP, data, global batch and number of steps in each case, launched the way users launch
them (`gradwise train --nproc N` runs torchrun), interleaved repeats, medians of the time per step
measured inside the run (from the first step to the last, set-up excluded). Then the zoo GPT's
bytes saved for backward with and without `train.activation_checkpointing`.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distributed.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SCRIPT = """
import json, os, sys, time, torch
import gradwise as gw
torch.manual_seed(0)
x = torch.randn(8192, 256)
y = (x[:, :10].argmax(1))
model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                            torch.nn.ReLU(), torch.nn.Linear(1024, 10))
class Clock:
    def on_step_end(self, trainer):
        if trainer.state.position.step == 5:
            self.start = time.perf_counter()
        self.end = time.perf_counter()
clock = Clock()
world = int(os.environ.get("WORLD_SIZE", 1))
run = gw.Trainer(model, (x, y), recipe=None, batch_size=256 // world, max_steps=45, epochs=10,
                 strategy=sys.argv[1], callbacks=[clock], progress="off", mlflow=False,
                 tensorboard=False, doctor={"mode": "off"}, root=sys.argv[2]).fit()
if int(os.environ.get("RANK", 0)) == 0:
    print(json.dumps({"ms_per_step": 1000 * (clock.end - clock.start) / 40}))
"""


def timed(strategy: str, nproc: int, threads: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "run.py"
        script.write_text(SCRIPT)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
        cmd += ["--standalone", str(script), strategy, str(Path(tmp) / "runs")]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])["ms_per_step"]


def activation_memory() -> dict:
    from gradwise.memory import measure_activation_memory
    from gradwise.models.gpt import gpt

    torch.manual_seed(0)
    model = gpt(vocab_size=256, max_seq_len=256, d_model=256, n_heads=8, n_layers=6)
    tokens = torch.randint(0, 256, (8, 256))

    def batch_loss(m: torch.nn.Module) -> torch.Tensor:
        out = m(tokens)
        return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), tokens.reshape(-1))

    return measure_activation_memory(model, batch_loss, True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cases = {
        "1 process, 2 threads": ("none", 1, 2),
        "1 process, 1 thread": ("none", 1, 1),
        "2 processes DDP, 1 thread each": ("ddp", 2, 1),
        "2 processes FSDP2, 1 thread each": ("fsdp", 2, 1),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, case in cases.items():  # interleaved
            times[name].append(timed(*case))
    base = statistics.median(times["1 process, 2 threads"])
    print("MLP 256-1024-1024-10, global batch 256, 40 timed steps, gloo on the CPU")
    print("| case | median ms/step | ratio |")
    print("| --- | ---: | ---: |")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} | {median / base:.2f} |")
    memory = activation_memory()
    print(
        f"\nzoo GPT (d 256, 6 layers, batch 8 x 256 tokens): {memory['saved_mb']:.1f} MB saved for "
        f"backward, {memory['saved_mb_checkpointed']:.1f} MB with activation checkpointing "
        f"({memory['saved_ratio']:.1f}x less); step time {memory['seconds']:.3f} s -> "
        f"{memory['seconds_checkpointed']:.3f} s"
    )


if __name__ == "__main__":
    main()
