"""Every Keras DoctorCallback scenario of one backend, in one process (Keras picks its backend at
import): ``KERAS_BACKEND=jax python keras_cases.py OUT.json RUN_DIR`` writes the results as JSON.

The planted faults mirror ``gradwise.doctor.cases`` (the PyTorch Doctor's test bench): Adam at lr
0.3 (GW305), a hand-written cross-entropy log(softmax) that underflows (GW301), binary targets
stored as 0/255 (GW105), raw 0-255 pixels (GW102), a wide MLP memorising 200 noisy samples
(GW401). Tiny models and few steps: the whole file runs in seconds per backend.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import traceback
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
from keras import layers, ops
from sklearn.datasets import load_digits

from gradwise.integrations.keras import DoctorCallback

DIGITS = load_digits()
RAW = DIGITS.data.astype("float32")  # 0..16
LABELS = DIGITS.target.astype("int32")
MEAN, STD = RAW[:1400].mean(0), RAW[:1400].std(0) + 1e-6
X = (RAW - MEAN) / STD
XT, YT, XV, YV = X[:1400], LABELS[:1400], X[1400:], LABELS[1400:]


def mlp(
    hidden: int = 32, outputs: int = 10, lr: float = 1e-3, loss=None, sgd: bool = False, extra=()
):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((64,)), layers.Dense(hidden, activation="relu"), *extra, layers.Dense(outputs)]
    )
    optimizer = keras.optimizers.SGD(lr) if sgd else keras.optimizers.Adam(lr)
    model.compile(optimizer, loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def fit(model, x, y, run_dir=None, **kwargs):
    callback = DoctorCallback(run_dir, on_finding=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x, y, verbose=0, callbacks=[callback], **kwargs)
    gradwise_warnings = [str(w.message) for w in caught if "gradwise" in str(w.message)]
    return callback, history, gradwise_warnings


def findings(callback) -> list[dict]:
    return [{"code": f.code, "severity": f.severity, "step": f.step} for f in callback.findings]


def healthy(run_dir: str) -> dict:
    """A healthy run (with BatchNorm and Dropout) with the callback, the same seeded run without
    it: no finding, the same final weights; the run directory is written. The batch losses the
    callback recovered from Keras' running mean must average, weighted by batch size, to the
    epoch's loss (the last batch is smaller: 1400 = 43 * 32 + 24)."""

    def run(callbacks):
        model = mlp(extra=(layers.BatchNormalization(), layers.Dropout(0.3, seed=7)))
        keras.utils.set_random_seed(1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            history = model.fit(
                XT,
                YT,
                batch_size=32,
                epochs=2,
                verbose=0,
                validation_data=(XV, YV),
                callbacks=callbacks,
            )
        warned = [str(w.message) for w in caught if "gradwise" in str(w.message)]
        after = (random.random(), float(np.random.random()))  # the global generators, after
        return model, history, warned, after

    callback = DoctorCallback(run_dir, on_finding=None)
    model, history, warned, watched_after = run([callback])
    plain, _, _, plain_after = run([])
    watched_weights = model.get_weights()
    plain_weights = plain.get_weights()
    s = callback.doctor.signals
    epoch = [v for st, v in zip(s.loss.steps, s.loss.values, strict=True) if st < 44]
    sizes = [32] * 43 + [1400 - 32 * 43]
    result = {
        "findings": findings(callback),
        "warnings": warned,
        "identical": all(
            np.array_equal(a, b) for a, b in zip(plain_weights, watched_weights, strict=True)
        ),
        "max_abs_diff": max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(plain_weights, watched_weights, strict=True)
        ),
        "global_rng_untouched": plain_after == watched_after,
        "epoch_loss": history.history["loss"][0],
        "doctor_epoch_loss": float(np.dot(epoch, sizes) / 1400) if len(epoch) == 44 else None,
        "loss_kind": s.loss_kind,
        "layers_with_grads": sorted(s.layer_grad_norm),
        "layers_with_updates": sorted(s.update_ratio),
        "activations": sorted(s.activations),
        "lr": s.lr.values[:1],
        "validations": len(s.val),
    }
    # a doctor that breaks mid-fit: one warning, and fit goes on as without it (the plain model,
    # compiled already, trains on)
    broken = DoctorCallback(on_finding=None)

    def fail(*args, **kwargs):
        raise RuntimeError("planted failure")

    broken._record = fail
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = plain.fit(
            XT, YT, batch_size=32, epochs=2, steps_per_epoch=3, verbose=0, callbacks=[broken]
        )
    result["broken_warnings"] = [str(w.message) for w in caught if "gradwise" in str(w.message)]
    result["broken_epochs"] = len(again.history["loss"])
    # raw 0-255 pixels through the same compiled model: GW102 at the first step
    unnormalised, _, _ = fit(plain, RAW[:1400] * 16, YT, batch_size=32, steps_per_epoch=3, epochs=1)
    result["unnormalised_findings"] = findings(unnormalised)
    return result


def lr_too_high() -> dict:
    callback, _, warned = fit(mlp(64, lr=0.3), XT, YT, batch_size=32, epochs=1)
    return {"findings": findings(callback), "warnings": warned}


def nonfinite_loss() -> dict:
    def naive_cross_entropy(y_true, y_pred):  # log(softmax) underflows to log(0) = -inf
        p = ops.softmax(y_pred, axis=-1)
        picked = ops.take_along_axis(p, ops.expand_dims(ops.cast(y_true, "int32"), -1), axis=-1)
        return -ops.mean(ops.log(picked))

    model = mlp(lr=0.5, sgd=True, loss=naive_cross_entropy)
    callback, _, warned = fit(model, XT * 50, YT, batch_size=32, steps_per_epoch=5, epochs=1)
    return {"findings": findings(callback), "warnings": warned}


def targets_out_of_range() -> dict:
    y = (YT % 2 * 255).astype("float32")[:, None]  # binary targets stored as 0/255
    model = mlp(outputs=1, loss=keras.losses.BinaryCrossentropy(from_logits=True))
    callback, _, warned = fit(model, XT, y, batch_size=32, steps_per_epoch=5, epochs=1)
    return {"findings": findings(callback), "warnings": warned}


def overfitting() -> dict:
    rng = np.random.default_rng(1)
    y = YT[:200].copy()
    noisy = rng.random(200) < 0.3
    y[noisy] = rng.integers(0, 10, int(noisy.sum()))
    model = mlp(256, lr=3e-3)
    callback, _, warned = fit(
        model, XT[:200], y, batch_size=20, epochs=24, validation_data=(XV, YV), validation_freq=2
    )
    return {"findings": findings(callback), "warnings": warned}


class Subclassed(keras.Model):
    """A subclassed model ending in softmax, with the loss given by name (from_logits=False):
    no graph of layers to tap, built by TensorFlow only in its first step; the doctor reads the
    loss as NLL on log-probabilities."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = layers.Dense(32, activation="relu")
        self.head = layers.Dense(10, activation="softmax")

    def call(self, x, training=False):
        return self.head(self.hidden(x))


def subclassed() -> dict:
    keras.utils.set_random_seed(0)
    model = Subclassed()
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    callback, _, warned = fit(model, XT, YT, batch_size=32, steps_per_epoch=25, epochs=1)
    s = callback.doctor.signals
    return {
        "findings": findings(callback),
        "warnings": warned,
        "loss_kind": s.loss_kind,
        "losses": len(s.loss),
        "layers_with_grads": sorted(s.layer_grad_norm),
        "num_classes": s.num_classes,
    }


SCENARIOS = {
    "healthy": healthy,
    "lr_too_high": lr_too_high,
    "nonfinite_loss": nonfinite_loss,
    "targets_out_of_range": targets_out_of_range,
    "overfitting": overfitting,
    "subclassed": subclassed,
}


def main() -> None:
    out, run_dir = sys.argv[1], sys.argv[2]
    results: dict = {"backend": keras.backend.backend()}
    for name, scenario in SCENARIOS.items():
        start = time.perf_counter()
        try:
            results[name] = scenario(run_dir) if name == "healthy" else scenario()
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        results[name]["seconds"] = round(time.perf_counter() - start, 2)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
