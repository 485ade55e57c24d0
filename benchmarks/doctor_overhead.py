"""Doctor overhead: the same plain PyTorch loop with and without a Doctor attached.

An MLP whose plain step takes several ms here, AdamW, fixed data; the Doctor at its default
settings (per-step loss and global gradient norm, the expensive statistics every 20 steps).
Interleaved repeats, median time per step, ratio. Target: <= 1.05.

    .venv/bin/python benchmarks/doctor_overhead.py [--repeats 7] [--steps 300]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from gradwise.doctor import Doctor

IN, WIDTH, CLASSES, BATCH = 256, 768, 10, 128


def run(steps: int, with_doctor: bool, sample_every: int) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(IN, WIDTH),
        nn.ReLU(),
        nn.Linear(WIDTH, WIDTH),
        nn.ReLU(),
        nn.Linear(WIDTH, CLASSES),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(steps, BATCH, IN, generator=g)
    y = torch.randint(0, CLASSES, (steps, BATCH), generator=g)
    doctor = (
        Doctor(model, opt, loss_fn=F.cross_entropy, sample_every=sample_every, on_finding=None)
        if with_doctor
        else None
    )
    start = time.perf_counter()
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        out = model(x[i])
        loss = F.cross_entropy(out, y[i])
        loss.backward()
        if doctor is not None:
            doctor.step(loss, inputs=x[i], outputs=out, targets=y[i])
        opt.step()
    elapsed = time.perf_counter() - start
    if doctor is not None:
        doctor.close()
    return 1000 * elapsed / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--sample-every", type=int, default=20)
    args = parser.parse_args()
    run(20, True, args.sample_every)  # warm up both paths
    plain, doctored = [], []
    for r in range(args.repeats):
        pair = [(plain, False), (doctored, True)]
        for times, flag in pair if r % 2 == 0 else pair[::-1]:
            times.append(run(args.steps, flag, args.sample_every))
    p, d = statistics.median(plain), statistics.median(doctored)
    print(f"MLP {IN}-{WIDTH}-{WIDTH}-{CLASSES}, batch {BATCH}, {args.steps} steps, {args.repeats} interleaved "
          f"repeats, sample_every={args.sample_every}, torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"plain loop      {p:.3f} ms/step   ({' '.join(f'{t:.2f}' for t in plain)})")
    print(f"with Doctor     {d:.3f} ms/step   ({' '.join(f'{t:.2f}' for t in doctored)})")
    print(f"ratio {d / p:.3f} (target <= 1.05), overhead {d - p:.3f} ms/step")


if __name__ == "__main__":
    main()
