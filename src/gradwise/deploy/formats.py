"""Artifact formats, one row each in :data:`FORMATS`: adding a format is adding a row.

A row names the format (``export(format=...)``, ``--format``), its file in the export directory,
how to write it from a model (returning what the model card records about it), how to run it on
NumPy batches, its name in benchmarks, whether loading it unpickles (then it loads only when its
SHA-256 is in the trust ledger, see :mod:`gradwise.trust`), and whether ONNX Runtime runs it (int8
quantization and ``gradwise serve`` need that).

torch is imported by the writers and loaders that use it, so that the server and the card checks
import this module without it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gradwise.deploy.card import CARD, load_card
from gradwise.errors import ConfigError, GradwiseError, did_you_mean
from gradwise.trust import record_artifact, require_recorded

if TYPE_CHECKING:
    import torch
    from torch import nn

Runner = Callable[[np.ndarray], np.ndarray]
CHUNK = 64  # batch size for running artifacts (different from the export example's 2)


class ExportError(GradwiseError):
    """A model could not be exported in the asked format."""


@dataclass(frozen=True)
class Format:
    """One artifact format."""

    name: str
    file: str
    """The artifact's file name in an export directory (its suffix identifies the format)."""
    write: Callable[[nn.Module, torch.Tensor, Path], dict[str, Any]]
    """Write the model traced on an example batch; returns fields for the model card."""
    load: Callable[[Path, int | None], Runner]
    """A runner for the file, with that many intra-op threads (ONNX Runtime) where it applies."""
    backend: str
    """Its name in benchmark results."""
    unpickles: bool = False
    """Loading it can run code: only artifacts gradwise wrote (the ledger) load without trust."""
    onnx_runtime: bool = False
    """ONNX Runtime runs it: int8 quantization and ``gradwise serve`` apply."""


# -- writers and loaders ----------------------------------------------------------------------------


def _batch_axis() -> dict[int, Any]:
    import torch

    return {0: torch.export.Dim("batch", min=1)}


def _write_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> dict[str, Any]:
    import onnx
    import torch

    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        input_names=["input"],
        output_names=["output"],
        dynamic_shapes=(_batch_axis(),),
        verbose=False,
    )
    program.save(str(path))
    proto = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"opset": opset}


def _write_torch_export(model: nn.Module, example: torch.Tensor, path: Path) -> dict[str, Any]:
    import torch

    program = torch.export.export(model, (example,), dynamic_shapes=(_batch_axis(),))
    torch.export.save(program, str(path))
    return {}


def _write_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> dict[str, Any]:
    """``torch.jit.script`` (keeps control flow), else ``torch.jit.trace`` on the example."""
    import torch

    try:
        scripted, method = torch.jit.script(model), "script"
    except Exception:
        scripted, method = torch.jit.trace(model, (example,), check_trace=False), "trace"
    torch.jit.save(scripted, str(path))
    return {"torchscript": method}


def ort_session(path: str | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (and one inter-op thread)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _load_onnx(path: Path, threads: int | None) -> Runner:
    session = ort_session(path, threads)
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def _load_torch_export(path: Path, threads: int | None) -> Runner:
    import torch

    with quiet():
        return _torch_runner(torch.export.load(str(path)).module())


def _load_torchscript(path: Path, threads: int | None) -> Runner:
    import torch

    with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.13: legacy format
        warnings.simplefilter("ignore", DeprecationWarning)
        return _torch_runner(torch.jit.load(str(path)))


def _torch_runner(module: Callable[[torch.Tensor], torch.Tensor]) -> Runner:
    """PyTorch threads are left to the caller (``torch.set_num_threads``)."""
    import torch

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()

    return run


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "onnx", "model.onnx", _write_onnx, _load_onnx, "onnxruntime-fp32", onnx_runtime=True
        ),
        Format(
            "torch-export", "model.pt2", _write_torch_export, _load_torch_export, "torch-export",
            unpickles=True,
        ),
        Format(
            "torchscript", "model.ts", _write_torchscript, _load_torchscript, "torchscript",
            unpickles=True,
        ),
    )
}  # fmt: skip


def get_format(name: Any, field: str = "format") -> Format:
    """The row called ``name``; a ConfigError with a did-you-mean otherwise."""
    found = FORMATS.get(name) if isinstance(name, str) else None
    if found is None:
        hint = did_you_mean(name, FORMATS) if isinstance(name, str) else None
        raise ConfigError(field, name, f"one of {', '.join(FORMATS)}", hint)
    return found


def onnx_runtime_formats() -> str:
    """The formats that ONNX Runtime runs, in words: "'onnx'"."""
    return " or ".join(repr(n) for n, f in FORMATS.items() if f.onnx_runtime)


# -- writing and running artifacts ------------------------------------------------------------------


def write_artifact(
    model: nn.Module, example: torch.Tensor, format: str, path: Path
) -> dict[str, Any]:
    """Write ``model`` as a ``format`` artifact at ``path`` and record it in the trust ledger;
    returns the fields the model card records about it (the ONNX opset, how TorchScript compiled)."""
    import torch

    try:
        with quiet(), torch.no_grad():
            fields = get_format(format).write(model, example, path)
    except GradwiseError:
        raise
    except Exception as exc:
        others = ", ".join(f for f in FORMATS if f != format)
        raise ExportError(
            f"{format} export of {type(model).__name__} failed: {_root_cause(exc)}. "
            f"The model may use Python control flow or operations the exporter cannot trace; "
            f"try another format ({others})"
        ) from exc
    record_artifact(path)
    return fields


def load_runner(path: str | Path, threads: int | None = None, *, trusted: bool = False) -> Runner:
    """A function from a NumPy batch to NumPy outputs for an artifact file (its format by suffix).

    ONNX runs on ONNX Runtime's CPU provider with ``intra_op_num_threads = threads``;
    ``.pt2`` and ``.ts`` on PyTorch with ``torch.set_num_threads(threads)`` left to the caller.
    Formats that unpickle load only when gradwise wrote the file (its sha256 is in the ledger of
    :mod:`gradwise.trust`) or when ``trusted``.
    """
    path = Path(path)
    found = [f for f in FORMATS.values() if Path(f.file).suffix == path.suffix]
    if not found:
        suffixes = [Path(f.file).suffix for f in FORMATS.values()]
        expected = f"a {', '.join(suffixes[:-1])} or {suffixes[-1]} file"
        raise ConfigError("artifact", str(path), expected)
    if found[0].unpickles:
        require_recorded(path, trusted)
    return found[0].load(path, threads)


def run_chunked(runner: Runner, x: np.ndarray, chunk: int = CHUNK) -> np.ndarray:
    """``runner`` over ``x`` in batches of ``chunk``, outputs concatenated."""
    x = np.ascontiguousarray(x)
    return np.concatenate([runner(x[i : i + chunk]) for i in range(0, len(x), chunk)])


def serving_card(artifact_dir: str | Path) -> dict[str, Any]:
    """The model card of an export directory that ``gradwise serve`` can run (ONNX Runtime), its
    files checked by :func:`gradwise.deploy.card.load_card`."""
    card = load_card(artifact_dir)
    path = Path(artifact_dir) / CARD
    name = card.get("format", "onnx")
    fmt = FORMATS.get(name) if isinstance(name, str) else None
    if fmt is None or not fmt.onnx_runtime:
        raise ConfigError(f"{path}: format", card.get("format"), onnx_runtime_formats())
    if not card.get("inputs") or not card.get("outputs"):
        raise ConfigError(
            f"{path}: inputs/outputs", card.get("inputs"), "a non-empty list of tensors"
        )
    return card


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters' progress prints, warnings and log records up to WARNING while they
    run (torch's loggers carry their own levels and handlers, so only ``logging.disable`` reaches
    them); errors still raise."""
    disabled = logging.root.manager.disable
    logging.disable(max(disabled, logging.WARNING))
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)


def _root_cause(exc: BaseException) -> str:
    """``Type: first line`` of the innermost cause, without terminal colour codes."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
