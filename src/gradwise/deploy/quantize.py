"""Post-training int8 quantization of ONNX artifacts with ONNX Runtime, measured against fp32.

Both modes start with ``quant_pre_process`` (symbolic shape inference and graph optimisation, so
that ONNX Runtime sees fused operators such as Gemm, LayerNorm and GELU and quantizes the right
nodes):

- **dynamic**: int8 weights (per output channel), activations quantized at run time from each
  batch's own range (``quantize_dynamic``; operator format: ``DynamicQuantizeLinear`` +
  ``MatInteger``-style kernels). No calibration data; best for MatMul-heavy models (MLPs,
  Transformers, RNNs) whose activation ranges vary per input. Convolutions stay fp32 in this mode:
  ONNX Runtime's dynamic ``ConvInteger`` is slower than its fp32 convolution on CPU.
- **static**: int8 weights (symmetric, per output channel) and uint8 activations (asymmetric,
  per tensor) with ranges fixed by calibration on a sample of training inputs (MinMax), in QDQ
  format (``QuantizeLinear``/``DequantizeLinear`` pairs that ONNX Runtime fuses into integer
  kernels). Best for convolutional nets.

Each quantized artifact is measured next to the float one on the validation set: the task's metric
(accuracy, MSE or perplexity), the largest output difference, prediction agreement, file size and
latency (see :func:`quantize_artifact`).

**Quantization-aware training is not offered (yet)**, for these reasons, checked with torch 2.13,
onnxruntime 1.32 and onnxscript 0.7:

- torch 2.13 no longer ships the PT2E flow: ``torch.ao.quantization.quantize_pt2e``
  (``prepare_qat_pt2e``, ``convert_pt2e``) and ``torch.ao.quantization.quantizer`` are gone; it
  lives in torchao now, which is not a gradwise dependency.
- The eager-mode ``torch.ao.quantization.prepare_qat``/``convert`` API (still present, deprecated)
  yields modules with quantized tensors and packed parameters that ``torch.export``, and so the
  dynamo ONNX exporter, cannot trace.
- Hand-rolled fake quantization with core ops (``torch.fake_quantize_per_tensor_affine``,
  ``..._per_channel_affine``, which onnxscript's torchlib would map to QuantizeLinear /
  DequantizeLinear) fails at the exporter's first step: torch.export has no fake-tensor kernel for
  ``aten.fake_quantize_per_tensor_affine_cachemask`` (UnsupportedOperatorException).

The path that does work, verified outside gradwise with torchao 0.18 on CPU: ``torch.export`` the
model, ``prepare_qat_pt2e`` with ``X86InductorQuantizer`` (``is_qat=True``), train the prepared
GraphModule, ``convert_pt2e``, then ``torch.onnx.export(dynamo=True)``: the result is a QDQ ONNX
model that ONNX Runtime runs (digits MLP 64-128-128-10, four epochs: 0.969 accuracy). Landing it
needs torchao in the ``deploy`` extra and a Trainer hook that trains the prepared GraphModule
instead of the nn.Module (checkpoints, EMA and the doctor's per-layer hooks then see a different
module tree, and export must repeat prepare + convert before loading weights): more than a small
additive change. Offered instead: post-training static (calibrated, per-channel) and dynamic int8,
within 0.3 accuracy points of fp32 on digits (see benchmarks/deploy.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gradwise.errors import ConfigError, GradwiseError

DYNAMIC_OPS = ["MatMul", "Gemm", "Attention", "LSTM", "GRU"]  # convolutions stay fp32 (see above)
LATENCY_BATCH = 32
LATENCY_SECONDS = 0.5


class QuantizationError(GradwiseError):
    """ONNX Runtime could not quantize the model."""


def quantize_onnx(
    model_path: str | Path,
    out_path: str | Path,
    mode: str,
    calibration: np.ndarray | None = None,
    *,
    per_channel: bool = True,
    input_name: str = "input",
) -> dict[str, Any]:
    """Quantize the ONNX model at ``model_path`` to int8 at ``out_path``; returns the settings used.

    ``calibration``: model inputs ``[N, ...]`` from the training data (static mode only).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    if mode not in ("dynamic", "static"):
        raise ConfigError("quantize", mode, "dynamic or static")
    if mode == "static" and (calibration is None or len(calibration) == 0):
        raise ConfigError("calibration", None, "training inputs for static quantization")

    class Reader(CalibrationDataReader):
        def __init__(self, x: np.ndarray, batch: int = 32) -> None:
            self.batches = iter(
                [
                    {input_name: np.ascontiguousarray(x[i : i + batch])}
                    for i in range(0, len(x), batch)
                ]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="gradwise-quant-") as work, _quiet_root_logger():
        pre = Path(work) / "pre.onnx"
        try:
            quant_pre_process(str(model_path), str(pre))
        except Exception:  # symbolic shape inference cannot follow every graph: optimise only
            quant_pre_process(str(model_path), str(pre), skip_symbolic_shape=True)
        tmp_out = Path(work) / "int8.onnx"
        try:
            if mode == "dynamic":
                quantize_dynamic(
                    str(pre),
                    str(tmp_out),
                    op_types_to_quantize=DYNAMIC_OPS,
                    per_channel=per_channel,
                    weight_type=QuantType.QInt8,
                )
                settings = {"format": "QOperator", "op_types": DYNAMIC_OPS}
            else:
                quantize_static(
                    str(pre),
                    str(tmp_out),
                    Reader(calibration),
                    quant_format=QuantFormat.QDQ,
                    per_channel=per_channel,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
                )
                settings = {
                    "format": "QDQ",
                    "calibration": "MinMax",
                    "calibration_samples": len(calibration),
                    "activations": "uint8 asymmetric per tensor",
                }
        except GradwiseError:
            raise
        except Exception as exc:
            raise QuantizationError(f"{mode} int8 quantization failed: {exc}") from exc
        shutil.move(str(tmp_out), str(out_path))
    settings["weights"] = "int8 symmetric " + ("per channel" if per_channel else "per tensor")
    settings["per_channel"] = per_channel
    return settings


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """ONNX Runtime's quantization tools log to (and may reconfigure) the root logger: restore it."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def task_metric(
    task: str | None, outputs: np.ndarray, targets: np.ndarray
) -> tuple[str, float] | None:
    """The task's headline metric of raw ``outputs`` against ``targets``, or None.

    binary: accuracy of logit > 0; multiclass: accuracy of the argmax; multilabel: accuracy per
    label (logit > 0); regression: mean squared error (standardised units); lm: perplexity.
    """
    out = np.asarray(outputs, dtype=np.float64)
    y = np.asarray(targets)
    if task == "binary":
        return "accuracy", float(np.mean((out.reshape(len(out), -1)[:, 0] > 0) == y.reshape(-1)))
    if task == "multiclass":
        return "accuracy", float(np.mean(out.argmax(-1) == y))
    if task == "multilabel":
        return "accuracy", float(np.mean((out > 0) == (y > 0.5)))
    if task == "regression":
        return "mse", float(np.mean((out.reshape(y.shape) - y) ** 2))
    if task == "lm":
        logits = out.reshape(-1, out.shape[-1])
        labels = y.reshape(-1)
        keep = labels >= 0
        logits, labels = logits[keep], labels[keep]
        top = logits.max(-1, keepdims=True)
        logz = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
        return "perplexity", float(math.exp(np.mean(logz - logits[np.arange(len(labels)), labels])))
    return None


def quantize_artifact(
    float_path: Path,
    out_path: Path,
    mode: str,
    *,
    calibration: np.ndarray | None,
    val_x: np.ndarray,
    val_y: np.ndarray | None,
    task: str | None,
    threads: int,
    per_channel: bool = True,
) -> dict[str, Any]:
    """Quantize ``float_path`` and measure the int8 model against it: the card's ``quantized``."""
    from gradwise.deploy.bench import compare_latency
    from gradwise.deploy.card import sha256_file
    from gradwise.deploy.export import load_runner, run_chunked

    settings = quantize_onnx(float_path, out_path, mode, calibration, per_channel=per_channel)
    fp32, int8 = load_runner(float_path, threads), load_runner(out_path, threads)
    out_f, out_q = run_chunked(fp32, val_x), run_chunked(int8, val_x)
    report: dict[str, Any] = {
        "artifact": out_path.name,
        "mode": mode,
        **settings,
        "sha256": sha256_file(out_path),
        "size_bytes": out_path.stat().st_size,
        "float_size_bytes": float_path.stat().st_size,
        "max_abs_vs_float": float(np.abs(out_f.astype(np.float64) - out_q).max()),
        "samples": len(val_x),
    }
    if task in ("binary", "multiclass", "lm"):
        pick = (lambda o: o[..., 0] > 0) if task == "binary" else (lambda o: o.argmax(-1))
        report["agreement"] = float(np.mean(pick(out_f) == pick(out_q)))
    metric = task_metric(task, out_f, val_y) if val_y is not None else None
    if metric is not None:
        name, value_f = metric
        value_q = task_metric(task, out_q, val_y)[1]
        report.update(
            metric=name,
            metric_float=value_f,
            metric_int8=value_q,
            metric_delta=value_q - value_f,
        )
    # accuracy in points of 1 (0.01 = one percentage point); None when the metric is not accuracy
    report["accuracy_delta"] = (
        report.get("metric_delta") if report.get("metric") == "accuracy" else None
    )
    batch = np.ascontiguousarray(val_x[:LATENCY_BATCH])
    timings = compare_latency({"float": fp32, "int8": int8}, batch, LATENCY_SECONDS, threads)
    report["latency_ms"] = {
        "batch_size": len(batch),
        "threads": threads,
        "float_p50": timings["float"]["p50_ms"],
        "int8_p50": timings["int8"]["p50_ms"],
    }
    report["speedup"] = timings["float"]["p50_ms"] / max(timings["int8"]["p50_ms"], 1e-9)
    return report
