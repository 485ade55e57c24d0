"""Latency and throughput of an export, side by side: eager PyTorch, ONNX Runtime fp32 and int8.

    result = gradwise.deploy.bench("runs/digits-cnn/export/onnx", batch_sizes=(1, 8, 32, 128))

For each batch size the backends run *interleaved* in short slices (round-robin, the starting
backend rotating each round) until each has run for ``seconds``, so that a machine getting slower
or faster during the benchmark (thermal limits, a neighbour's load) affects all of them alike.
PyTorch runs with ``torch.set_num_threads(threads)`` and ONNX Runtime with
``intra_op_num_threads = threads`` (and one inter-op thread), the same number for both.

Latency is the wall time of one call on a whole batch (p50/p95/p99 in milliseconds); throughput
is samples per second (batch size x calls / time spent in calls).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradwise._lazy import callable_as_namesake
from gradwise.deploy.card import CARD, load_card
from gradwise.deploy.formats import FORMATS, get_format, load_runner
from gradwise.deploy.source import Source, load_model
from gradwise.errors import ConfigError
from gradwise.trust import UntrustedError

Runner = Callable[[np.ndarray], Any]
SLICE_SECONDS = 0.05  # one backend's turn in the round-robin
WARMUP_CALLS = 3
INT8_BACKEND = "onnxruntime-int8"  # an export's int8 model (quantize.py)
FLOAT_BACKEND = FORMATS["onnx"].backend  # the float model it is quantized from


def latency_stats(times_s: Sequence[float], batch_size: int) -> dict[str, float]:
    """Percentiles (ms) and throughput (samples/s) of per-call wall times in seconds."""
    t = np.asarray(times_s, dtype=np.float64)
    p50, p95, p99 = np.percentile(t, [50, 95, 99]) * 1e3
    return {
        "p50_ms": float(p50),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "mean_ms": float(t.mean() * 1e3),
        "throughput": float(batch_size * len(t) / t.sum()),
        "calls": len(t),
    }


def compare_latency(
    runners: dict[str, Runner],
    x: np.ndarray,
    seconds: float = 1.0,
    threads: int | None = None,
    slice_s: float = SLICE_SECONDS,
) -> dict[str, dict[str, float]]:
    """Time every runner on batch ``x``, interleaved, for ``seconds`` each; stats per runner."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for run in runners.values():
            for _ in range(WARMUP_CALLS):
                run(x)
        names = list(runners)
        times: dict[str, list[float]] = {name: [] for name in names}
        spent = dict.fromkeys(names, 0.0)
        turn = 0
        while min(spent.values()) < seconds:
            start = turn % len(names)
            turn += 1
            for name in names[start:] + names[:start]:
                if spent[name] >= seconds:
                    continue
                run, record = runners[name], times[name]
                end = time.perf_counter() + slice_s
                while True:
                    t0 = time.perf_counter()
                    run(x)
                    t1 = time.perf_counter()
                    record.append(t1 - t0)
                    spent[name] += t1 - t0
                    if t1 >= end:
                        break
        return {name: latency_stats(times[name], len(x)) for name in names}
    finally:
        torch.set_num_threads(previous)


@dataclass
class BenchResult:
    """Rows of (backend, batch size) timings, the thread count and notes on what was skipped."""

    dir: Path
    threads: int
    seconds: float
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    def ratios(self) -> list[dict[str, Any]]:
        """Throughput ratios per batch size: each backend / eager and int8 / fp32."""
        out = []
        for batch in sorted({r["batch_size"] for r in self.rows}):
            by = {r["backend"]: r["throughput"] for r in self.rows if r["batch_size"] == batch}
            entry: dict[str, Any] = {"batch_size": batch}
            if "eager" in by:
                for name, value in by.items():
                    if name != "eager":
                        entry[f"{name}/eager"] = value / by["eager"]
            if INT8_BACKEND in by and FLOAT_BACKEND in by:
                entry["int8/fp32"] = by[INT8_BACKEND] / by[FLOAT_BACKEND]
            out.append(entry)
        return out

    def table(self) -> tuple[list[str], list[list[str]]]:
        header = ["backend", "batch", "p50 ms", "p95 ms", "p99 ms", "samples/s"]
        rows = [
            [
                r["backend"],
                str(r["batch_size"]),
                f"{r['p50_ms']:.3f}",
                f"{r['p95_ms']:.3f}",
                f"{r['p99_ms']:.3f}",
                f"{r['throughput']:,.0f}",
            ]
            for r in self.rows
        ]
        return header, rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "dir": str(self.dir),
            "threads": self.threads,
            "seconds": self.seconds,
            "rows": self.rows,
            "ratios": self.ratios(),
            "notes": self.notes,
        }


def bench(
    artifact_dir: str | Path,
    batch_sizes: Sequence[int] = (1, 8, 32, 128),
    threads: int | None = None,
    seconds: float = 1.0,
    model: torch.nn.Module | None = None,
    *,
    trust: bool = False,
) -> BenchResult:
    """Benchmark an export directory: eager PyTorch, the artifact, and the int8 model if present.

    Eager PyTorch is rebuilt from the card's recipe and source checkpoint (or ``model``); when
    neither is available it is left out, with a note. ``threads`` defaults to torch's current
    thread count. Every file is checked against the card's sha256 first. ``trust`` allows what
    an export directory from anyone must not do unasked (see :mod:`gradwise.trust`): import the
    recipe's import paths to rebuild the eager model, and load a ``.pt2`` or TorchScript artifact
    that gradwise did not write for you.
    """
    directory = Path(artifact_dir)
    card = load_card(directory)
    batch_sizes = [int(b) for b in batch_sizes]
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ConfigError("batch_sizes", batch_sizes, "positive integers, e.g. 1,8,32,128")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError("threads", threads, "a positive integer")
    if not seconds > 0:
        raise ConfigError("seconds", seconds, "a positive number of seconds")
    threads = threads or torch.get_num_threads()

    notes: list[str] = []
    runners: dict[str, Runner] = {}
    eager = _eager_model(card, model, notes, trust)
    if eager is not None:

        def run_eager(x: np.ndarray) -> Any:
            with torch.inference_mode():
                return eager(torch.from_numpy(x))

        runners["eager"] = run_eager
    artifact = directory / card["artifact"]  # load_card confined it to the directory
    backend = get_format(card.get("format"), f"{directory / CARD}: format").backend
    runners[backend] = load_runner(artifact, threads, trusted=trust)
    if card.get("quantized"):
        runners[INT8_BACKEND] = load_runner(directory / card["quantized"]["artifact"])

    rows = []
    for batch in batch_sizes:
        x = example_inputs(card, batch)
        for name, stats in compare_latency(runners, x, seconds, threads).items():
            rows.append({"backend": name, "batch_size": batch, "threads": threads, **stats})
    return BenchResult(directory, threads, seconds, rows, notes)


def example_inputs(card: dict[str, Any], batch: int, seed: int = 0) -> np.ndarray:
    """Random inputs of the card's input shape: normal floats, or token ids below the vocabulary."""
    spec = card["inputs"][0]
    shape = (batch, *spec["shape"][1:])
    rng = np.random.default_rng(seed)
    if spec["dtype"].startswith("int"):
        kwargs = ((card.get("recipe") or {}).get("model") or {}).get("kwargs") or {}
        vocab = int(kwargs.get("vocab_size") or 2)
        return rng.integers(0, vocab, shape, dtype=np.int64)
    return rng.standard_normal(shape).astype(np.float32)


def _eager_model(
    card: dict[str, Any], model: torch.nn.Module | None, notes: list[str], trust: bool
) -> torch.nn.Module | None:
    from gradwise.recipe import load_recipe

    checkpoint = (card.get("source") or {}).get("checkpoint")
    recipe = card.get("recipe")
    if checkpoint is None or not Path(checkpoint).is_dir() or recipe is None:
        if model is None:
            notes.append("eager PyTorch not measured: the source checkpoint is not available")
            return None
        return model.eval()
    source = Source(checkpoint=Path(checkpoint), recipe=load_recipe(recipe), trusted=trust)
    try:
        return load_model(source, model)
    except UntrustedError:
        raise
    except ConfigError as exc:
        notes.append(f"eager PyTorch not measured: {exc}")
        return None


callable_as_namesake(__name__)  # gradwise.deploy.bench(...) is its function bench(...)
