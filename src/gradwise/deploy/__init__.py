"""Deployment: export with parity checks, int8 quantization, benchmarks, model cards, serving.

    artifact = gradwise.export("runs/digits-cnn", format="onnx", quantize="static")
    result = gradwise.deploy.bench(artifact.dir)
    gradwise.deploy.serve(artifact.dir, port=8000)     # FastAPI + ONNX Runtime, micro-batching

Names are imported lazily: ``import gradwise.deploy`` stays cheap (no torch, no ONNX).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gradwise._lazy import lazy_exports

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "export": "gradwise.deploy.export",
    "Artifact": "gradwise.deploy.export",
    "ExportError": "gradwise.deploy.formats",
    "ParityError": "gradwise.deploy.export",
    "load_runner": "gradwise.deploy.formats",
    "quantize_onnx": "gradwise.deploy.quantize",
    "QuantizationError": "gradwise.deploy.quantize",
    "bench": "gradwise.deploy.bench",
    "BenchResult": "gradwise.deploy.bench",
    "load_card": "gradwise.deploy.card",
    "load_reference": "gradwise.deploy.card",
    "preprocess": "gradwise.deploy.card",
    "unpreprocess": "gradwise.deploy.card",
    "serve": "gradwise.deploy.serve",
    "create_app": "gradwise.deploy.serve",
    "MicroBatcher": "gradwise.deploy.batching",
    "DriftMonitor": "gradwise.deploy.drift",
    "drift_report": "gradwise.deploy.drift",
    "register": "gradwise.deploy.registry",
    "set_alias": "gradwise.deploy.registry",
    "resolve": "gradwise.deploy.registry",
}

__all__ = [
    "Artifact",
    "BenchResult",
    "DriftMonitor",
    "ExportError",
    "MicroBatcher",
    "ParityError",
    "QuantizationError",
    "bench",
    "create_app",
    "drift_report",
    "export",
    "load_card",
    "load_reference",
    "load_runner",
    "preprocess",
    "quantize_onnx",
    "register",
    "resolve",
    "serve",
    "set_alias",
    "unpreprocess",
]


__getattr__, __dir__ = lazy_exports("gradwise.deploy", _EXPORTS, globals())


if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from gradwise.deploy.batching import MicroBatcher
    from gradwise.deploy.bench import BenchResult, bench
    from gradwise.deploy.card import load_card, load_reference, preprocess, unpreprocess
    from gradwise.deploy.drift import DriftMonitor, drift_report
    from gradwise.deploy.export import Artifact, ParityError, export
    from gradwise.deploy.formats import ExportError, load_runner
    from gradwise.deploy.quantize import QuantizationError, quantize_onnx
    from gradwise.deploy.registry import register, resolve, set_alias
    from gradwise.deploy.serve import create_app, serve
