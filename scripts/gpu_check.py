"""Checks of gradwise's CUDA paths, for a machine with an NVIDIA GPU (CI has none).

Each check prints PASS or FAIL with its numbers; a JSON summary goes to ``--out``.

- facts and advice see the GPU: device cuda, bf16 support, memory; the advisor picks bf16;
- the digits CNN trains on CUDA in fp32, bf16 (autocast) and fp16 (autocast + GradScaler) to the
  same accuracy, with EMA and gradient accumulation, the doctor watching (no findings on a healthy run);
- a run stopped after two epochs and resumed on CUDA ends bitwise equal to an uninterrupted one
  (deterministic kernels);
- preflight (overfit one batch, learning-rate range test) on CUDA;
- a CUDA-trained run exports to ONNX with the parity check passing;
- step time of a GPT (d_model 512, 6 layers, 256 tokens) in fp32 vs bf16, interleaved.

    CUBLAS_WORKSPACE_CONFIG=:4096:8 python scripts/gpu_check.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import gradwise as gw

QUIET = {"progress": "off", "mlflow": False, "tensorboard": False}
DIGITS = {"model": {"name": "cnn"}, "data": {"name": "digits"}}
RESULTS: dict[str, Any] = {}


def check(name: str) -> Callable[[Callable[[], dict]], None]:
    def run(fn: Callable[[], dict]) -> None:
        start = time.perf_counter()
        try:
            numbers = fn()
            ok = numbers.pop("ok")
        except Exception:  # a failed check is reported, the others still run
            numbers, ok = {"error": traceback.format_exc(limit=4)}, False
        numbers["seconds"] = round(time.perf_counter() - start, 1)
        RESULTS[name] = {"ok": ok, **numbers}
        print(f"{'PASS' if ok else 'FAIL'} {name}: {numbers}", flush=True)

    return run


def digits(root: str, **overrides: Any) -> gw.Run:
    return gw.Trainer(recipe=DIGITS, root=root, **QUIET, **overrides).fit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--dry-run", action="store_true", help="run on CPU (to check the script)")
    args = parser.parse_args()
    if not args.dry_run:
        assert torch.cuda.is_available(), "no CUDA device"
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    root = tempfile.mkdtemp(prefix="gradwise-gpu-")

    @check("facts and advice")
    def _() -> dict:
        bundle = gw.load_data("digits")
        model = gw.build_model("cnn", {}, bundle.info, bundle.info.num_classes)
        f = gw.facts(model, bundle.train)
        advice = {a.setting: a.value for a in gw.advise(recipe=DIGITS).advice}
        ok = f.device != "cpu" and f.bf16 and (f.memory_gb or 0) > 1
        ok = ok and advice["train.precision"] == "bf16"
        return {"ok": ok, "device": f.device, "bf16": f.bf16, "memory_gb": f.memory_gb,
                "precision": advice["train.precision"], "batch_size": advice["data.batch_size"]}  # fmt: skip

    @check("precisions: fp32, bf16, fp16 (+ EMA, accumulation, doctor)")
    def _() -> dict:
        out = {}
        for precision in ("fp32", "bf16", "fp16"):
            run = digits(
                root, name=f"digits-{precision}", precision=precision, epochs=10,
                ema_decay=0.9, accumulate=2,
            )  # fmt: skip
            path = run.dir / "doctor" / "findings.json"
            findings = json.loads(path.read_text()) if path.exists() else []
            out[precision] = {
                "acc": round(run.best_metric, 4), "state": run.state,
                "device": str(next(run.model.parameters()).device),
                "findings": sorted({f["code"] for f in findings}),
            }  # fmt: skip
        ok = all(v["acc"] >= 0.97 and v["state"] == "finished" for v in out.values())
        return {"ok": ok, **out}

    @check("exact resume on CUDA")
    def _() -> dict:
        settings = {"epochs": 4, "deterministic": True, "seed": 3, "precision": "bf16"}
        reference = digits(root, name="resume-ref", **settings)
        stopped = gw.Trainer(
            recipe=DIGITS, root=root, name="resume-cut", on_evaluate=lambda h: h["epoch"] >= 2,
            **QUIET, **settings,
        ).fit()  # fmt: skip
        resumed = gw.Trainer.resume(stopped.dir, progress="off").fit()
        same = all(
            torch.equal(a, b)
            for a, b in zip(reference.model.state_dict().values(), resumed.model.state_dict().values(), strict=True)
        )  # fmt: skip
        return {"ok": same and resumed.steps == reference.steps, "stopped_at": stopped.steps,
                "steps": [reference.steps, resumed.steps], "bitwise_equal": same}  # fmt: skip

    @check("preflight on CUDA")
    def _() -> dict:
        bundle = gw.load_data("digits")
        model = gw.build_model("cnn", {}, bundle.info, bundle.info.num_classes).to(device)
        report = gw.check(model, bundle.train, bundle.val)
        findings = sorted({f.code for f in report.findings})
        return {"ok": report.overfit.passed and report.lr_range is not None, "findings": findings,
                "overfit_final_loss": report.overfit.final_loss,
                "suggested_lr": report.lr_range.suggestion}  # fmt: skip

    @check("export a CUDA-trained run to ONNX")
    def _() -> dict:
        run = digits(root, name="export", epochs=2)
        artifact = gw.export(run.dir, "onnx", out=Path(root) / "onnx", quantize="dynamic")
        p = artifact.parity
        return {"ok": p["passed"], "max_abs": p["max_abs"],
                "int8_delta": artifact.quantized.get("metric_delta")}  # fmt: skip

    @check("GPT step time, fp32 vs bf16")
    def _() -> dict:
        from gradwise.models.gpt import gpt

        times: dict[str, list[float]] = {"fp32": [], "bf16": []}
        model = gpt(vocab_size=256, d_model=512, n_layers=6, n_heads=8, max_seq_len=256).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
        x = torch.randint(0, 256, (32 if device == "cuda" else 2, 256), device=device)
        sync = torch.cuda.synchronize if device == "cuda" else lambda: None
        for _ in range(5):  # interleaved repeats of 20 steps each
            for precision in times:
                with torch.autocast(device, torch.bfloat16, enabled=precision == "bf16"):
                    for i in range(23):
                        if i == 3:  # after warm-up
                            sync()
                            start = time.perf_counter()
                        loss = torch.nn.functional.cross_entropy(
                            model(x).flatten(0, 1), x.flatten()
                        )
                        loss.backward()
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                sync()
                times[precision].append((time.perf_counter() - start) / 20 * 1000)
        fp32, bf16 = (statistics.median(v) for v in times.values())
        return {"ok": bf16 < fp32, "fp32_ms": round(fp32, 2), "bf16_ms": round(bf16, 2),
                "speedup": round(fp32 / bf16, 2)}  # fmt: skip

    args.out.write_text(json.dumps(RESULTS, indent=2, default=str))
    print(f"{sum(r['ok'] for r in RESULTS.values())}/{len(RESULTS)} checks passed")


if __name__ == "__main__":
    main()
