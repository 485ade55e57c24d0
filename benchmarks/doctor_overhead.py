"""Doctor overhead: the same plain PyTorch loop with and without a Doctor attached.

Two identical MLPs (a plain step takes several ms here) train side by side in one process on the
same batches; blocks of 40 steps alternate between them (the order flips every block), so both see
the same machine state. The Doctor runs at its default settings: the loss and the global gradient
norm every step, per-layer statistics every 20 steps. With ``--fresh`` every block gets a new
Doctor and ends with a validation pass (the same for both), so every block also pays the one-time
costs of a run's start: the first step's probes (the loss graph walk, the batch-mixing probe's
extra forward passes), activation statistics at each of the first 5 steps, and the
stochastic-evaluation probe's second pass at the first validation: a worst case of a new run
every 40 steps. We report the ratio of total times and the median of per-block ratios. Target:
<= 1.05.

    .venv/bin/python benchmarks/doctor_overhead.py [--blocks 100] [--fresh]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from gradwise.doctor import Doctor

IN, WIDTH, CLASSES, BATCH, BLOCK = 256, 768, 10, 128, 40


def make() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(IN, WIDTH),
        nn.ReLU(),
        nn.Linear(WIDTH, WIDTH),
        nn.ReLU(),
        nn.Linear(WIDTH, CLASSES),
    )
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def block(model, opt, doctor, x, y, validate: bool = False) -> float:
    start = time.perf_counter()
    model.train()
    for i in range(BLOCK):
        opt.zero_grad(set_to_none=True)
        out = model(x[i])
        loss = F.cross_entropy(out, y[i])
        loss.backward()
        if doctor is not None:
            doctor.step(loss, inputs=x[i], outputs=out, targets=y[i])
        opt.step()
    if validate:
        model.eval()
        with torch.no_grad():
            val_loss = F.cross_entropy(model(x[0]), y[0])
        if doctor is not None:
            doctor.validate(loss=float(val_loss))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=100)
    parser.add_argument("--fresh", action="store_true", help="a new Doctor for every block")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BLOCK, BATCH, IN, generator=g)
    y = torch.randint(0, CLASSES, (BLOCK, BATCH), generator=g)
    plain_model, plain_opt = make()
    watched_model, watched_opt = make()
    doctor = Doctor(watched_model, watched_opt, loss_fn=F.cross_entropy, on_finding=None)
    block(plain_model, plain_opt, None, x, y)  # warm up both
    block(watched_model, watched_opt, doctor, x, y)
    plain, watched = [], []
    for b in range(args.blocks):
        if args.fresh:  # built outside the timed block, as a run builds it before its first step
            doctor.close()
            doctor = Doctor(watched_model, watched_opt, loss_fn=F.cross_entropy, on_finding=None)
        runs = [
            (plain, plain_model, plain_opt, None),
            (watched, watched_model, watched_opt, doctor),
        ]
        for times, model, opt, doc in runs if b % 2 == 0 else runs[::-1]:
            times.append(block(model, opt, doc, x, y, validate=args.fresh))
    doctor.close()
    ratio = sum(watched) / sum(plain)
    paired = statistics.median(w / p for p, w in zip(plain, watched, strict=True))
    ms = 1000 / BLOCK
    print(f"MLP {IN}-{WIDTH}-{WIDTH}-{CLASSES}, batch {BATCH}, {args.blocks} alternating blocks of {BLOCK} steps, "
          f"Doctor defaults (sample_every=20){', a new Doctor per block' if args.fresh else ''}, torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"plain loop   median {statistics.median(plain) * ms:.3f} ms/step")
    print(f"with Doctor  median {statistics.median(watched) * ms:.3f} ms/step")
    print(f"ratio of totals {ratio:.3f}, median of per-block ratios {paired:.3f} (target <= 1.05); "
          f"overhead {(sum(watched) - sum(plain)) * ms / args.blocks:.3f} ms/step")  # fmt: skip


if __name__ == "__main__":
    main()
