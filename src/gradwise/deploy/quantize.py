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

**Quantization-aware training** (``qat``) fine-tunes the trained float model with fake
quantization before converting it, so the weights learn to live on the int8 grid (Jacob et al. 2018;
Krishnamoorthi 2018). torch 2.13 no longer ships the PT2E flow, so it comes from torchao:
``torch.export`` the model, ``prepare_qat_pt2e`` with ``X86InductorQuantizer`` (int8 symmetric
per-channel weights, uint8 activations), a few epochs at a tenth of the run's learning rate,
``convert_pt2e``, and the dynamo ONNX exporter writes the QDQ model that ONNX Runtime runs. The
eager ``torch.ao.quantization.prepare_qat`` modules cannot be exported, and core fake-quantize ops
have no ``torch.export`` kernels, hence torchao. QAT runs at export time from the run's best
checkpoint and training data, not inside ``Trainer.fit``: it needs the traced graph, which the
doctor's hooks, EMA and checkpoints of the Trainer do not work with.
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

from gradwise.deploy.card import sha256_file
from gradwise.deploy.formats import load_runner, quiet, run_chunked, write_artifact
from gradwise.errors import ConfigError, GradwiseError
from gradwise.trust import record_artifact

DYNAMIC_OPS = ["MatMul", "Gemm", "Attention", "LSTM", "GRU"]  # convolutions stay fp32 (see above)
LATENCY_BATCH = 32
LATENCY_SECONDS = 0.5


QAT_EPOCHS = 2  # fine-tuning passes over the training data with fake quantization
QAT_LR_FRACTION = 0.1  # of the run's peak learning rate: fine-tune, do not retrain
QAT_DEFAULT_LR = 1e-4  # when the run's learning rate is unknown (a model object)
QAT_BATCH = 64


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
    record_artifact(out_path)
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


def quantize_qat(
    model: Any,
    out_path: str | Path,
    train_x: Any,
    train_y: Any,
    loss_fn: Any,
    *,
    lr: float,
    epochs: int = QAT_EPOCHS,
    seed: int = 0,
) -> dict[str, Any]:
    """Quantization-aware fine-tuning of a float ``model`` (torch), written as int8 QDQ ONNX.

    ``train_x``/``train_y``: training inputs (model space) and targets; ``loss_fn(out, y)``.
    Returns the settings used, for the model card.
    """
    import copy

    import torch

    try:
        with quiet():  # torchao's import reports every optional kernel it cannot load
            from torchao.quantization.pt2e import (
                move_exported_model_to_eval,
                move_exported_model_to_train,
            )
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
            from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
                X86InductorQuantizer,
                get_default_x86_inductor_quantization_config,
            )
    except ImportError:
        raise ConfigError(
            "quantize", "qat", "torchao installed for quantization-aware training",
            "pip install 'gradwise[deploy]'",
        ) from None  # fmt: skip

    if len(train_x) < 2:
        raise ConfigError("training data", len(train_x), "at least 2 samples for QAT")
    torch.manual_seed(seed)
    example = train_x[:2]
    try:
        float_model = copy.deepcopy(model).eval()
        batch = torch.export.Dim("batch", min=1)
        graph = torch.export.export(float_model, (example,), dynamic_shapes=({0: batch},))
        config = get_default_x86_inductor_quantization_config(is_qat=True)
        with quiet():
            prepared = prepare_qat_pt2e(graph.module(), X86InductorQuantizer().set_global(config))
    except Exception as exc:
        raise QuantizationError(f"qat: inserting fake quantization failed: {exc}") from exc
    move_exported_model_to_train(prepared)
    optimizer = torch.optim.AdamW(prepared.parameters(), lr=lr, weight_decay=0.0)
    order_rng = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=order_rng)
        losses = []
        for i in range(0, len(order), QAT_BATCH):
            idx = order[i : i + QAT_BATCH]
            if len(idx) < 2:  # a batch of one would meet BatchNorm and specialised shapes
                continue
            loss = loss_fn(prepared(train_x[idx]), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    move_exported_model_to_eval(prepared)
    with quiet():
        converted = convert_pt2e(prepared)
    write_artifact(converted, example, "onnx", Path(out_path))
    return {
        "format": "QDQ",
        "method": "quantization-aware fine-tuning (torchao PT2E, X86InductorQuantizer)",
        "qat_epochs": epochs,
        "qat_lr": lr,
        "qat_samples": len(train_x),
        "qat_final_loss": sum(losses) / max(len(losses), 1),
        "activations": "uint8 asymmetric per tensor",
        "weights": "int8 symmetric per channel",
        "per_channel": True,
    }


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
    qat: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Quantize ``float_path`` and measure the int8 model against it: the card's ``quantized``.

    ``qat``: for mode ``qat``, the keyword arguments of :func:`quantize_qat` but ``out_path``.
    """
    from gradwise.deploy.bench import compare_latency

    if mode == "qat":
        if qat is None:
            raise ConfigError("quantize", mode, "the model and its training data for QAT")
        settings = quantize_qat(out_path=out_path, **qat)
    else:
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
