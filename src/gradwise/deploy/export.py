"""Export a trained model to ONNX, a ``torch.export`` program or TorchScript, with a parity check.

    artifact = gradwise.deploy.export("runs/digits-cnn", format="onnx", quantize="static")

The model is rebuilt from the run directory (``recipe.yaml`` plus the best checkpoint; the EMA
weights when the run kept an EMA, since those are the ones it validated) or passed in. Every export
runs the artifact on real validation inputs and compares it with eager PyTorch in eval mode; above
``tolerance`` (max absolute difference) the export fails with :class:`ParityError`.

Why 1e-4 absolute for fp32: fp32 carries a 24-bit mantissa (epsilon 1.2e-7). Exporters and ONNX
Runtime reorder sums and fuse operations (GEMM + bias, LayerNorm, GELU, attention), so outputs of
magnitude ~10 legitimately differ by 1e-7..1e-5 after a few layers (the zoo models measure at most
about 2e-6). Real export bugs (dropout or BatchNorm left in training mode, a wrong operator
semantic, a baked-in batch size) show up at 1e-2 and above. 1e-4 sits between the two with about
50x headroom on each side, and it is far below any gap that could flip a prediction other than an
exact tie.

The export is written into a temporary directory next to ``out`` and renamed into place only when
everything (artifact, parity, quantization, card, reference) succeeded, so a failed export never
leaves a directory that looks complete.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gradwise._lazy import callable_as_namesake
from gradwise.deploy.card import (
    CARD,
    INT8,
    REFERENCE,
    load_card,
    reference_statistics,
    sha256_file,
    unpreprocess,
    versions,
)
from gradwise.deploy.formats import (
    ExportError,
    get_format,
    load_runner,
    onnx_runtime_formats,
    run_chunked,
    write_artifact,
)
from gradwise.deploy.source import Source, load_model, load_source
from gradwise.errors import ConfigError, DataError, GradwiseError
from gradwise.tracking.files import atomic_write_json, publish_dir

QUANTIZE_MODES = ("dynamic", "static", "qat")
DEFAULT_TOLERANCE = 1e-4
PARITY_SAMPLES = 512  # validation inputs the parity check runs
CALIBRATION_SAMPLES = 256  # training inputs static quantization calibrates on
REFERENCE_SAMPLES = 20_000  # training inputs the reference statistics come from (at most)
METRIC_SAMPLES = 10_000  # validation samples the quantized metric delta is measured on (at most)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # export merge=False


class ParityError(ExportError):
    """The exported artifact does not reproduce eager PyTorch within the tolerance."""


@dataclass
class Artifact:
    """An export directory: the artifact, its model card and reference statistics."""

    dir: Path
    format: str
    path: Path  # the artifact file
    card: dict[str, Any] = field(repr=False)
    int8_path: Path | None = None
    notes: list[str] = field(default_factory=list)  # e.g. what became of an earlier int8 model

    @property
    def parity(self) -> dict[str, Any]:
        return self.card["parity"]

    @property
    def quantized(self) -> dict[str, Any] | None:
        return self.card["quantized"]


@dataclass
class _Data:
    """Inputs (model space) and targets for parity, calibration, reference and metrics."""

    val_x: torch.Tensor
    val_y: torch.Tensor | None
    train_x: torch.Tensor
    train_y: torch.Tensor | None = None
    info: Any = None  # DataInfo or None
    source: str = "validation"


def export(
    run_dir_or_checkpoint: str | Path | None,
    format: str = "onnx",
    out: str | Path | None = None,
    quantize: str | None = None,
    model: nn.Module | None = None,
    sample: Any = None,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    task: str | None = None,
    trust: bool = False,
    merge: bool = True,
) -> Artifact:
    """Export a run's best model (or ``model``) to ``out`` and return the :class:`Artifact`.

    run_dir_or_checkpoint: a run directory, a checkpoint directory, or None with ``model``.
    format: onnx (the dynamo exporter, dynamic batch axis), torch-export (``.pt2``) or torchscript.
    out: the export directory (default ``<run_dir>/export/<format>``); replaced atomically.
    quantize: dynamic or static int8, or qat (quantization-aware fine-tuning; ONNX only): adds
    ``model.int8.onnx``, measured in the card.
    model: the model to export; with a run directory the run's best weights are loaded into it
    (needed when the run was trained on a Python model object).
    sample: inputs, or an ``(X, y)`` pair, for the parity check (default: the run's validation
    data); needed when there is no run data to rebuild.
    tolerance: the largest max-absolute difference to eager PyTorch that passes (fp32).
    task: the task when no run directory says it (binary, multiclass, regression...).
    trust: import the model, data and loss import paths the run's recipe names (a run directory
    may come from anyone; see :mod:`gradwise.trust`). Zoo models and built-in data need no trust.
    merge: for a model with peft adapters (a run with ``finetune.peft``): fold the adapter into the
    weights and export that plain model (checked against the model with its adapter on the parity
    inputs, max abs difference <= 1e-5). False: export the base model without the adapter and
    write the adapter next to it in peft's layout (adapter_config.json,
    adapter_model.safetensors: ``peft.PeftModel.from_pretrained(base, out)`` reads it); the card
    says which.

    Exporting again without ``quantize`` keeps the earlier int8 model only when it was quantized
    from the same float artifact (equal sha256); otherwise it is removed. ``Artifact.notes`` says
    which.
    """
    fmt = get_format(format)
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ConfigError("quantize", quantize, f"one of {', '.join(QUANTIZE_MODES)} or None")
    if quantize is not None and not fmt.onnx_runtime:
        raise ConfigError(
            "quantize",
            quantize,
            f"format {onnx_runtime_formats()}",
            "int8 quantization runs on ONNX Runtime",
        )
    if not isinstance(tolerance, (int, float)) or not tolerance > 0:
        raise ConfigError("tolerance", tolerance, "a positive number, e.g. 1e-4")

    source = (
        load_source(run_dir_or_checkpoint, trust) if run_dir_or_checkpoint is not None else Source()
    )
    if model is None and source.recipe is None:
        raise ConfigError("run_dir_or_checkpoint", None, "a run directory, or a model to export")
    model = load_model(source, model)
    data = _data(source, sample)
    task = task or (source.recipe.task if source.recipe is not None else None)
    if out is None:
        if source.run_dir is None:
            raise ConfigError("out", None, "an output directory when exporting a model object")
        out = source.run_dir / "export" / format
    out = Path(out)

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        model, adapter = _peft_export(model, tmp, data, merge)
        card = _build(model, format, tmp, source, data, task, quantize, float(tolerance))
        card["peft"] = adapter
        notes = [] if quantize else _previous_int8(out, tmp, card)
        if adapter is not None and not adapter["merged"]:
            notes.append(adapter["note"])
        atomic_write_json(tmp / CARD, card)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    quantized = card["quantized"]
    return Artifact(
        dir=out,
        format=format,
        path=out / fmt.file,
        card=card,
        int8_path=out / quantized["artifact"] if quantized else None,
        notes=notes,
    )


def _peft_export(
    model: nn.Module, tmp: Path, data: _Data, merge: bool
) -> tuple[nn.Module, dict[str, Any] | None]:
    """The model to export and the card's ``peft`` entry (None without adapters): the adapter
    merged into the weights (parity-checked), or the base with the adapter written beside it."""
    from gradwise.finetune.adapters import is_peft

    if not is_peft(model):
        return model, None
    from gradwise.finetune.adapters import base_of, merge_with_report, peft_summary, save_adapter

    if merge:
        plain, report = merge_with_report(model, data.val_x[:PARITY_SAMPLES])
        return plain.eval(), {**report, "merged": True, "inputs": data.source}
    summary = peft_summary(model)
    written = save_adapter(model, tmp / ".adapter")
    files = []
    for name in ADAPTER_FILES:  # peft's layout, in the export directory itself
        (written / name).rename(tmp / name)
        files.append({"name": name, "sha256": sha256_file(tmp / name)})
    shutil.rmtree(written)
    note = (
        f"the exported model is the base without the {summary['method']} adapter (and with the "
        "modules trained in full as they were before training); the fine-tuned model is that "
        f"base with {' and '.join(ADAPTER_FILES)} in this directory, in peft's layout "
        "(peft.PeftModel.from_pretrained(base, directory)); the card's metrics are the "
        "fine-tuned model's"
    )
    entry = {**summary, "merged": False, "files": files, "note": note}
    return base_of(model).eval(), entry


def _previous_int8(out: Path, tmp: Path, card: dict[str, Any]) -> list[str]:
    """Carry the int8 model of the export at ``out`` into ``tmp`` when it was quantized from the
    very float artifact just written (same sha256); otherwise it goes with the old directory.
    Returns a note on what happened, if there was an int8 model."""
    if not (out / CARD).is_file() and not (out / INT8).is_file():
        return []
    try:
        old = load_card(out)  # verifies every file's sha256
    except GradwiseError:
        old = {}
    quantized = old.get("quantized")
    if not quantized:
        if (out / INT8).is_file():
            return [f"removed {INT8} of the previous export: its model card does not vouch for it"]
        return []
    name = quantized.get("artifact") or INT8
    if old.get("sha256") != card["sha256"]:
        return [
            f"removed {name} of the previous export: it was quantized from different weights; "
            "pass --quantize to recreate it"
        ]
    shutil.copy2(out / name, tmp / name)
    card["quantized"] = quantized
    return [
        f"kept {name} of the previous export: it was quantized from this same {card['artifact']}"
    ]


# -- data: validation inputs, training inputs --------------------------------------------------------


def _data(source: Source, sample: Any) -> _Data:
    from gradwise.assemble import OBJECT

    given = _sample(sample) if sample is not None else None
    recipe = source.recipe
    bundle = None
    if recipe is not None and not recipe.data.name.startswith(OBJECT):
        from gradwise.data import load_data

        bundle = load_data(recipe.data.name, recipe.data.kwargs, trusted=source.trusted)
    if given is None and bundle is None:
        raise ConfigError(
            "sample",
            None,
            "example inputs (or an (X, y) pair) for the parity check",
            "the run's data was a Python object, so it cannot be rebuilt",
        )
    if bundle is None:
        x, y = given
        return _Data(val_x=x, val_y=y, train_x=x, source="sample")
    train_x, train_y = _arrays(bundle.train, REFERENCE_SAMPLES, seed=0)
    if given is not None:
        val_x, val_y, where = given[0], given[1], "sample"
    elif bundle.val is not None and len(bundle.val):
        val_x, val_y = _arrays(bundle.val, METRIC_SAMPLES, seed=0)
        where = "validation"
    else:
        val_x, val_y = _arrays(bundle.train, METRIC_SAMPLES, seed=1)
        where = "train"
    return _Data(val_x, val_y, train_x, train_y, info=bundle.info, source=where)


def _sample(sample: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    from gradwise.data.common import input_tensor, target_tensor

    if isinstance(sample, (tuple, list)) and len(sample) == 2:
        x, y = input_tensor(sample[0], "sample X"), target_tensor(sample[1], "sample y")
        if len(x) != len(y):
            raise DataError(f"sample X has {len(x)} rows but y has {len(y)}")
    else:
        x, y = input_tensor(sample, "sample"), None
    if len(x) == 0:
        raise DataError("sample is empty; the parity check needs at least one input")
    return x, y


def _arrays(dataset: Any, limit: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inputs and targets of up to ``limit`` samples of a Dataset (a seeded subset when larger)."""
    from torch.utils.data import TensorDataset, default_collate

    n = len(dataset)
    idx = np.arange(n)
    if n > limit:
        idx = np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        x, y = dataset.tensors[0], dataset.tensors[1]
        return x[torch.from_numpy(idx)], y[torch.from_numpy(idx)]
    x, y = default_collate([dataset[int(i)] for i in idx])
    return x, y


# -- building the export directory -----------------------------------------------------------------


def _build(
    model: nn.Module,
    format: str,
    tmp: Path,
    source: Source,
    data: _Data,
    task: str | None,
    quantize: str | None,
    tolerance: float,
) -> dict[str, Any]:
    example = (
        data.val_x[:2]
        if len(data.val_x) >= 2
        else data.val_x.repeat(2, *[1] * (data.val_x.ndim - 1))
    )
    with torch.no_grad():
        eager_example = model(example)
    if not isinstance(eager_example, torch.Tensor):
        raise ExportError(
            f"the model returns {type(eager_example).__name__}; export needs one output tensor"
        )
    path = tmp / get_format(format).file
    fields = write_artifact(model, example, format, path)
    threads = torch.get_num_threads()
    runner = load_runner(path, threads, trusted=True)  # written just now, by us

    parity_x = data.val_x[:PARITY_SAMPLES]
    eager = run_eager(model, parity_x.numpy())
    parity = parity_report(eager, run_chunked(runner, parity_x.numpy()), tolerance)
    parity["inputs"] = data.source
    if not parity["passed"]:
        raise ParityError(
            f"{format} export does not match eager PyTorch: max abs difference "
            f"{parity['max_abs']:.3g} > tolerance {tolerance:g} on {parity['samples']} "
            f"{data.source} inputs (max relative {parity['max_rel']:.3g}); no artifact was written"
        )

    info = data.info
    quantized = None
    if quantize is not None:
        from gradwise.deploy.quantize import quantize_artifact

        quantized = quantize_artifact(
            path,
            tmp / INT8,
            quantize,
            calibration=_subset(data.train_x, CALIBRATION_SAMPLES).numpy(),
            val_x=data.val_x.numpy(),
            val_y=None if data.val_y is None else data.val_y.numpy(),
            task=task,
            threads=threads,
            qat=_qat_inputs(model, source, data, task) if quantize == "qat" else None,
        )

    card = _card(model, format, path, source, data, task, parity, quantized, eager_example)
    card.update(fields)  # what the format records about itself (the ONNX opset...)
    preprocessing = info.preprocessing if info is not None else {}
    train_x = data.train_x
    outputs = run_eager(model, train_x.numpy())
    reference = reference_statistics(
        unpreprocess(train_x.numpy(), preprocessing),
        outputs,
        task=task,
        class_labels=card["class_labels"],
        feature_names=info.feature_names if info is not None else None,
        target_standardize=preprocessing.get("target_standardize"),
        source="train" if data.source != "sample" else "sample",
    )
    atomic_write_json(tmp / REFERENCE, reference)
    return card


def _qat_inputs(model: nn.Module, source: Source, data: _Data, task: str | None) -> dict:
    """What quantization-aware fine-tuning needs: the model, labelled training data, the run's
    loss and a tenth of its learning rate."""
    from gradwise.deploy.quantize import QAT_DEFAULT_LR, QAT_LR_FRACTION
    from gradwise.tasks import TASKS, Task

    if data.train_y is None:
        raise ConfigError(
            "quantize", "qat", "a run whose training data gradwise can rebuild",
            "QAT fine-tunes on the training data; a model object with a sample has none",
        )  # fmt: skip
    if task not in TASKS or task == "custom":
        raise ConfigError("quantize", "qat", "a run with a built-in task", f"the task is {task}")
    recipe = source.recipe
    loss = Task(
        task, None, loss=recipe.train.loss if recipe is not None else "auto", trusted=source.trusted
    ).loss
    lr = recipe.optim.lr * QAT_LR_FRACTION if recipe is not None else QAT_DEFAULT_LR
    return {
        "model": model,
        "train_x": data.train_x,
        "train_y": data.train_y,
        "loss_fn": loss,
        "lr": lr,
        "seed": recipe.seed if recipe is not None else 0,
    }


def _subset(x: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    if len(x) <= n:
        return x
    idx = np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False))
    return x[torch.from_numpy(idx)]


def _card(
    model: nn.Module,
    format: str,
    path: Path,
    source: Source,
    data: _Data,
    task: str | None,
    parity: dict[str, Any],
    quantized: dict[str, Any] | None,
    eager_example: torch.Tensor,
) -> dict[str, Any]:
    info = data.info
    x = data.val_x
    class_labels = None
    if info is not None and info.class_names and task in ("binary", "multiclass", "multilabel"):
        class_labels = list(info.class_names)
    recipe = source.recipe.to_dict() if source.recipe is not None else None
    name = source.run_dir.name if source.run_dir is not None else type(model).__name__
    card: dict[str, Any] = {
        "name": name,
        "format": format,
        "artifact": path.name,
        "sha256": sha256_file(path),
        "size_bytes": path.stat().st_size,
        "inputs": [{"name": "input", "shape": [None, *x.shape[1:]], "dtype": _dtype(x)}],
        "outputs": [
            {
                "name": "output",
                "shape": [None, *eager_example.shape[1:]],
                "dtype": _dtype(eager_example),
            }
        ],
        "task": task,
        "class_labels": class_labels,
        "preprocessing": info.preprocessing if info is not None else {},
        "recipe": recipe,
        "metrics": {k: v for k, v in source.meta.items() if k.startswith("val_")},
        "versions": versions(),
        "parity": parity,
        "quantized": quantized,
        "calibration": _calibration(source),
        "created": datetime.now().astimezone().isoformat(timespec="seconds"),
        "source": {
            "run_dir": str(source.run_dir.resolve()) if source.run_dir else None,
            "checkpoint": str(source.checkpoint.resolve()) if source.checkpoint else None,
            "weights": source.weights,
            "step": source.meta.get("step"),
        },
    }
    return card


def _calibration(source: Source) -> dict[str, Any] | None:
    """The run's fitted temperature (``evaluation/calibration.json`` of ``gradwise evaluate``),
    so that served probabilities are ``softmax(logits / T)``; None without one."""
    if source.run_dir is None:
        return None
    from gradwise.evaluate.calibration import read_calibration

    return read_calibration(source.run_dir)


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


# -- comparing with eager PyTorch ----------------------------------------------------------------


def run_eager(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Eager PyTorch outputs of ``model`` (eval mode) on ``x``, in chunks."""
    model.eval()

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).numpy()

    return run_chunked(run, x)


def parity_report(eager: np.ndarray, exported: np.ndarray, tolerance: float) -> dict[str, Any]:
    """Max absolute difference, and max relative difference to the largest eager magnitude.

    ``max_rel`` divides by the largest ``|eager|`` rather than element by element: an element-wise
    ratio is meaningless for outputs near zero (logits that cross zero), which always exist.
    """
    if eager.shape != exported.shape:
        return {
            "max_abs": float("inf"), "max_rel": float("inf"), "tolerance": tolerance,
            "samples": len(eager), "passed": False,
            "note": f"output shapes differ: eager {eager.shape}, exported {exported.shape}",
        }  # fmt: skip
    diff = np.abs(eager.astype(np.float64) - exported.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(eager).max()) if eager.size else 0.0
    finite = bool(np.isfinite(exported).all())
    return {
        "max_abs": max_abs,
        "max_rel": max_abs / scale if scale > 0 else max_abs,
        "tolerance": tolerance,
        "samples": len(eager),
        "passed": finite and max_abs <= tolerance,
    }


callable_as_namesake(__name__)
