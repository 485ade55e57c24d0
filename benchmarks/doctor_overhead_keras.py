"""Keras DoctorCallback overhead: the same ``model.fit`` with and without the callback, per backend.

Two identical MLPs (256-768-768-10, AdamW, batch 128) train side by side in one process, one
``fit`` of one epoch (BLOCK steps) per block; the blocks alternate between them (the order flips
every block), so both see the same machine state. The callback runs at its defaults (the probe on
the first steps and every 20th, the weights at sampled steps) and one DoctorCallback watches all
of the watched model's fits, as one run; its one-time costs (compiling its probe) fall in the
warm-up block. We report, per backend, the median ms/step of each, the ratio of total times and
the median of per-block ratios. Target: <= 1.05. Keras picks its backend at import, so each
backend runs in its own subprocess.

    .venv/bin/python benchmarks/doctor_overhead_keras.py [--blocks 30] [--backends tensorflow jax torch]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

IN, WIDTH, CLASSES, BATCH, BLOCK = 256, 768, 10, 128, 40


def measure(blocks: int) -> dict:
    import keras
    import numpy as np

    from gradwise.integrations.keras import DoctorCallback

    rng = np.random.default_rng(0)
    x = rng.standard_normal((BLOCK * BATCH, IN)).astype("float32")
    y = rng.integers(0, CLASSES, BLOCK * BATCH)

    def make() -> keras.Model:
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((IN,)),
                keras.layers.Dense(WIDTH, activation="relu"),
                keras.layers.Dense(WIDTH, activation="relu"),
                keras.layers.Dense(CLASSES),
            ]
        )
        model.compile(
            keras.optimizers.AdamW(1e-3),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model

    plain, watched = make(), make()
    callback = DoctorCallback(on_finding=None)

    def block(model, callbacks) -> float:
        start = time.perf_counter()
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False, callbacks=callbacks)
        return time.perf_counter() - start

    block(plain, [])  # warm up both (compilation, the probe's tracing)
    block(watched, [callback])
    times: dict[str, list[float]] = {"plain": [], "watched": []}
    for b in range(blocks):
        runs = [("plain", plain, []), ("watched", watched, [callback])]
        for name, model, callbacks in runs if b % 2 == 0 else runs[::-1]:
            times[name].append(block(model, callbacks))
    p, w = times["plain"], times["watched"]
    return {
        "backend": keras.backend.backend(),
        "plain_ms": statistics.median(p) * 1000 / BLOCK,
        "watched_ms": statistics.median(w) * 1000 / BLOCK,
        "ratio": sum(w) / sum(p),
        "paired": statistics.median(b / a for a, b in zip(p, w, strict=True)),
        "findings": [f.code for f in callback.findings],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--backends", nargs="+", default=["tensorflow", "jax", "torch"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.blocks)))
        return
    print(f"MLP {IN}-{WIDTH}-{WIDTH}-{CLASSES}, batch {BATCH}, {args.blocks} alternating fit() "
          f"blocks of {BLOCK} steps, DoctorCallback defaults (sample_every=20)")  # fmt: skip
    for backend in args.backends:
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        cmd = [sys.executable, __file__, "--child", "--blocks", str(args.blocks)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{backend:<10} failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{r['backend']:<10} plain {r['plain_ms']:.2f} ms/step, with DoctorCallback "
              f"{r['watched_ms']:.2f} ms/step; ratio of totals {r['ratio']:.3f}, median of "
              f"per-block ratios {r['paired']:.3f} (target <= 1.05)")  # fmt: skip


if __name__ == "__main__":
    main()
