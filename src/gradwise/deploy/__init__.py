"""Deployment: export with parity checks, int8 quantization, benchmarks, model cards, serving.

    artifact = gradwise.deploy.export("runs/digits-cnn", format="onnx", quantize="static")
    result = gradwise.deploy.bench(artifact.dir)

Names are imported lazily: ``import gradwise.deploy`` stays cheap (no torch, no ONNX).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "export": "gradwise.deploy.export",
    "Artifact": "gradwise.deploy.export",
    "ExportError": "gradwise.deploy.export",
    "ParityError": "gradwise.deploy.export",
    "load_runner": "gradwise.deploy.export",
    "quantize_onnx": "gradwise.deploy.quantize",
    "QuantizationError": "gradwise.deploy.quantize",
    "bench": "gradwise.deploy.bench",
    "BenchResult": "gradwise.deploy.bench",
    "load_card": "gradwise.deploy.card",
    "load_reference": "gradwise.deploy.card",
    "preprocess": "gradwise.deploy.card",
    "unpreprocess": "gradwise.deploy.card",
}

__all__ = [
    "Artifact",
    "BenchResult",
    "ExportError",
    "ParityError",
    "QuantizationError",
    "bench",
    "export",
    "load_card",
    "load_reference",
    "load_runner",
    "preprocess",
    "quantize_onnx",
    "unpreprocess",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gradwise.deploy' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from gradwise.deploy.bench import BenchResult, bench
    from gradwise.deploy.card import load_card, load_reference, preprocess, unpreprocess
    from gradwise.deploy.export import Artifact, ExportError, ParityError, export, load_runner
    from gradwise.deploy.quantize import QuantizationError, quantize_onnx
