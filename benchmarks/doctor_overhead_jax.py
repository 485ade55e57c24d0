"""Doctor overhead in JAX: the same jitted Optax loop with and without gradwise.integrations.jax.Doctor.

Two identical MLPs train side by side in one process on the same batches, through the same jitted
train step (it returns the loss, gradients, updates, logits and the global gradient norm in both
loops; the plain loop drops them); blocks of 40 steps alternate between them (the order flips
every block), so both see the same machine state, and each block ends by waiting for the device
(dispatch is asynchronous). The doctor runs at its defaults: each step the loss and the global
gradient norm (kept on the device), every 20 steps the per-layer statistics and the batch.
``--no-updates`` does not pass Optax's updates, so the doctor measures the update as the change of
the weights (one device copy of the weights per sample); ``--grad-norm`` passes the norm the step
computed as ``grad_norm=`` instead of letting the doctor compute its own. We report the medians
per step, the ratio of total times and the median of per-block ratios. Target: <= 1.05.

    .venv/bin/python benchmarks/doctor_overhead_jax.py [--blocks 100] [--no-updates] [--grad-norm]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradwise.integrations.jax import Doctor

IN, WIDTH, CLASSES, BATCH, BLOCK = 256, 768, 10, 128, 40
TX = optax.adamw(1e-3)


def init() -> tuple[dict, optax.OptState]:
    rng = np.random.default_rng(0)
    sizes = [IN, WIDTH, WIDTH, CLASSES]
    params = {
        f"Dense_{i}": {
            "kernel": rng.standard_normal((a, b), np.float32) * np.sqrt(2.0 / a),
            "bias": np.zeros(b, np.float32),
        }
        for i, (a, b) in enumerate(itertools.pairwise(sizes))
    }
    params = jax.device_put({"params": params})
    return params, TX.init(params)


def forward(variables: dict, x: jax.Array) -> jax.Array:
    p = variables["params"]
    h = jax.nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    h = jax.nn.relu(h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"])
    return h @ p["Dense_2"]["kernel"] + p["Dense_2"]["bias"]


@jax.jit
def train_step(params, opt_state, x, y):
    def objective(p):
        logits = forward(p, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

    (loss, logits), grads = jax.value_and_grad(objective, has_aux=True)(params)
    updates, opt_state = TX.update(grads, opt_state, params)
    norm = optax.global_norm(grads)  # what a loop that logs or clips the norm has anyway
    return optax.apply_updates(params, updates), opt_state, loss, grads, updates, logits, norm


def block(state, doctor, x, y, updates: bool, in_step_norm: bool) -> tuple[float, tuple]:
    params, opt_state = state
    start = time.perf_counter()
    for i in range(BLOCK):
        params, opt_state, loss, grads, upd, logits, norm = train_step(
            params, opt_state, x[i], y[i]
        )
        if doctor is not None:
            doctor.step(
                loss,
                grads=grads,
                params=params,
                updates=upd if updates else None,
                inputs=x[i],
                outputs=logits,
                targets=y[i],
                grad_norm=norm if in_step_norm else None,
            )
    jax.block_until_ready((params, opt_state))
    return time.perf_counter() - start, (params, opt_state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=100)
    parser.add_argument("--no-updates", action="store_true", help="do not pass Optax's updates")
    parser.add_argument(
        "--grad-norm", action="store_true", help="pass the step's own global norm as grad_norm="
    )
    args = parser.parse_args()
    updates, norm = not args.no_updates, args.grad_norm
    rng = np.random.default_rng(0)
    # one device array per step, sliced before timing (slicing a jax.Array costs ~0.5 ms on CPU)
    x = [jnp.asarray(rng.standard_normal((BATCH, IN), np.float32)) for _ in range(BLOCK)]
    y = [jnp.asarray(rng.integers(0, CLASSES, BATCH), jnp.int32) for _ in range(BLOCK)]
    plain_state, watched_state = init(), init()
    doctor = Doctor(task="multiclass", on_finding=None)
    _, plain_state = block(plain_state, None, x, y, updates, norm)  # warm up both (compiles)
    _, watched_state = block(watched_state, doctor, x, y, updates, norm)
    plain, watched = [], []
    for b in range(args.blocks):
        first_plain = b % 2 == 0
        for which in ("plain", "watched") if first_plain else ("watched", "plain"):
            if which == "plain":
                seconds, plain_state = block(plain_state, None, x, y, updates, norm)
                plain.append(seconds)
            else:
                seconds, watched_state = block(watched_state, doctor, x, y, updates, norm)
                watched.append(seconds)
    doctor.close()
    ratio = sum(watched) / sum(plain)
    paired = statistics.median(w / p for p, w in zip(plain, watched, strict=True))
    ms = 1000 / BLOCK
    print(f"MLP {IN}-{WIDTH}-{WIDTH}-{CLASSES}, batch {BATCH}, {args.blocks} alternating blocks of {BLOCK} steps, "
          f"Doctor defaults (sample_every=20), updates {'passed' if updates else 'not passed'}, "
          f"{'the step' if norm else 'the doctor'} computes the gradient norm, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs")  # fmt: skip
    print(f"plain loop   median {statistics.median(plain) * ms:.3f} ms/step")
    print(f"with Doctor  median {statistics.median(watched) * ms:.3f} ms/step")
    print(f"ratio of totals {ratio:.3f}, median of per-block ratios {paired:.3f} (target <= 1.05); "
          f"overhead {(sum(watched) - sum(plain)) * ms / args.blocks:.3f} ms/step")  # fmt: skip
    print(f"findings: {[f.code for f in doctor.findings] or 'none'}")


if __name__ == "__main__":
    main()
