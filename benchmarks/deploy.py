"""Export and quantization: eager PyTorch vs ONNX Runtime fp32 vs int8, side by side in one run.

Three zoo models are trained briefly with gradwise (``mlp`` 64-256-256-10 and ``cnn`` 32-64 on
scikit-learn's digits, a 2-layer ``transformer`` with d_model 128 on synthetic token sequences),
then exported with ``gradwise.deploy.export`` to ONNX twice: with dynamic and with static int8
quantization. For each model and batch size the four backends (eager PyTorch in eval mode under
``torch.inference_mode``, ONNX Runtime fp32, int8 dynamic, int8 static) run *interleaved* on the
same batch of real validation inputs (``gradwise.deploy.bench.compare_latency``), with the same
thread count for PyTorch and ONNX Runtime. Accuracy deltas are the export cards' (the whole
validation split). Targets (issue 6): ONNX Runtime fp32 >= 1.3x eager throughput; int8 >= 1.5x
fp32 on the MLP and Transformer with <= 1 point accuracy loss.

    .venv/bin/python benchmarks/deploy.py [--threads 1] [--seconds 1] [--batch-sizes 1,8,32,128]
                                          [--models mlp cnn transformer] [--json results.json]

The ``serving`` section runs ``benchmarks/serve.py`` (micro-batching on vs off under 32 concurrent
clients; target >= 2x). Sections are functions in ``SECTIONS`` (name -> function(args) -> results
dict), selected with ``--sections``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import gradwise as gw
from gradwise.deploy import export, load_runner
from gradwise.deploy.bench import compare_latency

QUIET = {"progress": "off", "mlflow": False, "tensorboard": False}
SEQUENCES = {"n_samples": 2000, "seq_len": 32, "vocab_size": 20, "n_classes": 4}
MODELS = {  # name: (model section, data section, epochs)
    "mlp": ({"name": "mlp"}, {"name": "digits"}, 10),
    "cnn": ({"name": "cnn"}, {"name": "digits"}, 5),
    "transformer": (
        {"name": "transformer", "kwargs": {"d_model": 128, "n_heads": 4, "n_layers": 2}},
        {"name": "synthetic_sequences", "kwargs": SEQUENCES},
        6,
    ),
}
BACKENDS = ["eager", "ort-fp32", "ort-int8-dynamic", "ort-int8-static"]


def train_and_export(name: str, root: Path) -> dict[str, Any]:
    """Train one zoo model briefly, export it with dynamic and static int8; paths and cards."""
    model, data, epochs = MODELS[name]
    recipe = {
        "name": name, "model": model, "data": data, "doctor": {"mode": "off"},
        "tracking": {"root": str(root / "runs")},
    }  # fmt: skip
    start = time.perf_counter()
    run = gw.Trainer(recipe=recipe, epochs=epochs, **QUIET).fit()
    trained = time.perf_counter() - start
    cards = {}
    for mode in ("dynamic", "static"):
        artifact = export(run.dir, "onnx", out=root / f"{name}-{mode}", quantize=mode)
        cards[mode] = artifact.card
    eager = run.model.cpu().eval()
    gw.load_checkpoint(run.dir, eager)
    bundle = gw.load_data(data["name"], data.get("kwargs"))
    x_val = bundle.val.tensors[0].numpy()
    print(
        f"{name}: {sum(p.numel() for p in eager.parameters()):,} parameters, trained "
        f"{trained:.0f} s to val accuracy {run.best_metric:.4f}",
        flush=True,
    )
    return {"run": run.dir, "root": root, "cards": cards, "eager": eager, "x_val": x_val}


def measure(
    prepared: dict[str, Any], batch_sizes: list[int], seconds: float, threads: int
) -> list[dict]:
    """Interleaved timings of the four backends at each batch size."""
    root, name = prepared["root"], prepared["cards"]["static"]["name"]
    eager = prepared["eager"]

    def run_eager(x: np.ndarray) -> Any:
        with torch.inference_mode():
            return eager(torch.from_numpy(x))

    runners = {
        "eager": run_eager,
        "ort-fp32": load_runner(root / f"{name}-static" / "model.onnx", threads),
        "ort-int8-dynamic": load_runner(root / f"{name}-dynamic" / "model.int8.onnx", threads),
        "ort-int8-static": load_runner(root / f"{name}-static" / "model.int8.onnx", threads),
    }
    rows = []
    x_val = prepared["x_val"]
    for batch in batch_sizes:
        x = np.ascontiguousarray(np.resize(x_val, (batch, *x_val.shape[1:])))
        stats = compare_latency(runners, x, seconds, threads)
        rows.append({"batch_size": batch, **{b: stats[b] for b in BACKENDS}})
    return rows


def report(name: str, prepared: dict[str, Any], rows: list[dict]) -> dict[str, Any]:
    cards = prepared["cards"]
    q = {mode: cards[mode]["quantized"] for mode in ("dynamic", "static")}
    print(f"\n== {name} ==")
    print(
        f"accuracy fp32 {q['static']['metric_float']:.4f}; int8 dynamic "
        f"{q['dynamic']['metric_int8']:.4f} ({100 * q['dynamic']['accuracy_delta']:+.2f} points), "
        f"static {q['static']['metric_int8']:.4f} ({100 * q['static']['accuracy_delta']:+.2f} points)"
    )
    print(
        f"size fp32 {q['static']['float_size_bytes']:,} B; int8 dynamic "
        f"{q['dynamic']['size_bytes']:,} B, static {q['static']['size_bytes']:,} B"
    )
    header = "batch  " + "  ".join(f"{b + ' p50 ms':>22}" for b in BACKENDS)
    header += "  fp32/eager  dyn/fp32  static/fp32 (throughput)"
    print(header)
    ratios = []
    for row in rows:
        tp = {b: row[b]["throughput"] for b in BACKENDS}
        r = {
            "batch_size": row["batch_size"],
            "fp32/eager": tp["ort-fp32"] / tp["eager"],
            "int8-dynamic/fp32": tp["ort-int8-dynamic"] / tp["ort-fp32"],
            "int8-static/fp32": tp["ort-int8-static"] / tp["ort-fp32"],
        }
        ratios.append(r)
        cells = "  ".join(f"{row[b]['p50_ms']:>22.3f}" for b in BACKENDS)
        print(
            f"{row['batch_size']:>5}  {cells}  {r['fp32/eager']:>9.2f}x  "
            f"{r['int8-dynamic/fp32']:>7.2f}x  {r['int8-static/fp32']:>10.2f}x"
        )
    print("throughput (samples/s): " + "; ".join(
        f"batch {row['batch_size']}: " + ", ".join(f"{b} {row[b]['throughput']:,.0f}" for b in BACKENDS)
        for row in rows
    ))  # fmt: skip
    return {
        "accuracy": {
            "fp32": q["static"]["metric_float"],
            "int8_dynamic": q["dynamic"]["metric_int8"],
            "int8_static": q["static"]["metric_int8"],
        },
        "size_bytes": {
            "fp32": q["static"]["float_size_bytes"],
            "int8_dynamic": q["dynamic"]["size_bytes"],
            "int8_static": q["static"]["size_bytes"],
        },
        "parity_max_abs": cards["static"]["parity"]["max_abs"],
        "rows": rows,
        "ratios": ratios,
    }


def export_section(args: argparse.Namespace) -> dict[str, Any]:
    """Eager PyTorch vs ONNX Runtime fp32 vs int8 (dynamic, static) per model."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="gradwise-bench-deploy-") as tmp:
        for name in args.models:
            prepared = train_and_export(name, Path(tmp) / name)
            rows = measure(prepared, args.batch_sizes, args.seconds, args.threads)
            results[name] = report(name, prepared, rows)
    print("\ntargets (issue 6), throughput at the largest batch size:")
    for name, result in results.items():
        last = result["ratios"][-1]
        acc = result["accuracy"]
        line = f"  {name}: ONNX Runtime fp32 {last['fp32/eager']:.2f}x eager (target >= 1.3)"
        for mode in ("dynamic", "static"):
            loss = 100 * (acc["fp32"] - acc[f"int8_{mode}"])
            line += f"; int8 {mode} {last[f'int8-{mode}/fp32']:.2f}x fp32, {loss:+.2f} points lost"
        print(line + (" (target >= 1.5x, <= 1 point)" if name != "cnn" else ""))
    return results


def serving_section(args: argparse.Namespace) -> dict[str, Any]:
    """Serving throughput with micro-batching on vs off (benchmarks/serve.py, its defaults)."""
    import serve  # benchmarks/ is on sys.path when this file runs as a script

    print("\n== serving: micro-batching on vs off ==")
    return serve.benchmark(
        argparse.Namespace(
            models=list(serve.MODELS),
            clients=args.clients,
            seconds=args.serve_seconds,
            rounds=args.rounds,
            threads=None,
            waits=[5.0],
        )
    )


SECTIONS = {"export": export_section, "serving": serving_section}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="PyTorch and ONNX Runtime threads")
    parser.add_argument("--seconds", type=float, default=1.0, help="per backend and batch size")
    parser.add_argument("--batch-sizes", default="1,8,32,128")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--clients", type=int, default=32, help="serving: concurrent clients")
    parser.add_argument("--serve-seconds", type=float, default=5.0, help="serving: per round")
    parser.add_argument("--rounds", type=int, default=3, help="serving: interleaved rounds")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s) for PyTorch and ONNX Runtime, "
        f"{args.seconds:g} s per backend and batch size, interleaved"
    )
    results = {"threads": args.threads, "seconds": args.seconds}
    for section in args.sections:
        results[section] = SECTIONS[section](args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
