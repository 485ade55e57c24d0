"""Serving throughput with dynamic micro-batching on versus off, under the same concurrent load.

Models are exported with ``gradwise.deploy.export`` (ONNX): ``small``, an MLP 30-16-2 the size of
gradwise's breast-cancer example, and ``wide``, an MLP 256-2048-2048-10 (4.7M parameters). Each
variant is its own server process (``create_app`` under uvicorn: one worker, ONNX Runtime with
``--threads`` intra-op threads, access log off); this process is the load: ``--clients`` closed-loop
clients on keep-alive connections, each sending one-instance JSON requests and waiting for the
answer, for ``--seconds`` after a one-second warm-up. Servers run as ``gradwise serve`` does
(``gradwise.deploy.serve``: uvicorn with gradwise's connection limits and timeouts);
``--compare-protocols`` adds a variant on uvicorn's own httptools protocol, without the limits, to
measure what they cost. Variants interleave round by round; medians
over rounds are reported. Batching on: ``max_batch_size 32, max_wait_ms 5`` (the defaults); off:
``max_batch_size 1`` (every request its own ONNX Runtime call, run side by side in a thread pool).
Target (issue 6): micro-batching >= 2x the throughput at 32 concurrent clients.

    .venv/bin/python benchmarks/serve.py [--seconds 5] [--rounds 3] [--clients 32] [--models small wide]
        [--compare-protocols]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch

MODELS = {
    "small": "MLP 30-16-2 (breast-cancer size)",
    "wide": "MLP 256-2048-2048-10 (4.7M parameters)",
    "transformer": "gradwise zoo transformer: 64 token ids, d_model 128, 2 layers, 2 classes",
}


def build(name: str, root: Path) -> tuple[Path, np.ndarray]:
    """Export the named model with gradwise.deploy.export; returns the directory and sample rows."""
    from gradwise.deploy import export

    torch.manual_seed(0)
    if name == "transformer":
        from gradwise.models.transformer import transformer

        model = transformer(num_outputs=2, vocab_size=1000, max_seq_len=64)
        x, y = torch.randint(0, 1000, (512, 64)), torch.randint(0, 2, (512,))
    else:
        sizes = [30, 16, 2] if name == "small" else [256, 2048, 2048, 10]
        layers: list[torch.nn.Module] = []
        for a, b in itertools.pairwise(sizes[:-1]):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        model = torch.nn.Sequential(*layers, torch.nn.Linear(sizes[-2], sizes[-1]))
        x, y = torch.randn(512, sizes[0]), torch.randint(0, sizes[-1], (512,))
    artifact = export(None, model=model.eval(), sample=(x, y), task="multiclass", out=root / name)
    return artifact.dir, x.numpy()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(artifact: Path, port: int, threads: int | None, options: dict) -> subprocess.Popen:
    options = dict(options)
    if options.pop("plain_uvicorn", False):  # uvicorn's own protocol: no limits, no timeouts
        code = (
            "import uvicorn\n"
            "from gradwise.deploy.serve import create_app\n"
            f"app = create_app({str(artifact)!r}, threads={threads}, **{options!r})\n"
            f"uvicorn.run(app, host='127.0.0.1', port={port}, log_level='warning', "
            "access_log=False, http='httptools')\n"
        )
    else:
        code = (
            "from gradwise.deploy.serve import serve\n"
            f"serve({str(artifact)!r}, port={port}, threads={threads}, log_level='warning', "
            f"access_log=False, **{options!r})\n"
        )
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            status, _ = asyncio.run(http_get(port, "/health"))
            if status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("the server did not start")


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    return status, await reader.readexactly(length)


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    result = await read_response(reader)
    writer.close()
    return result


async def load(port: int, bodies: list[bytes], clients: int, seconds: float, warmup: float = 1.0):
    """Closed-loop load: each client sends a request and waits for its answer, then the next."""
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds

    async def client(i: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        k = i
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                break
            writer.write(bodies[k % len(bodies)])
            k += clients
            await writer.drain()
            status, _ = await read_response(reader)
            t1 = time.perf_counter()
            if t0 >= measure_from:
                latencies.append(t1 - t0)
                errors += status != 200
        writer.close()

    await asyncio.gather(*[client(i) for i in range(clients)])
    return latencies, errors


def requests_for(x: np.ndarray) -> list[bytes]:
    out = []
    for row in x:
        body = json.dumps({"instances": [row.tolist()]}).encode()
        head = (
            "POST /v1/predict HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        out.append(head + body)
    return out


def batch_stats(port: int) -> tuple[float, float]:
    _, text = asyncio.run(http_get(port, "/metrics"))
    values = {}
    for key in ("gradwise_batch_size_sum", "gradwise_batch_size_count"):
        values[key] = float(re.search(rf"^{key} (\S+)$".encode(), text, re.M).group(1))
    return values["gradwise_batch_size_sum"], values["gradwise_batch_size_count"]


def run_variant(artifact: Path, bodies: list[bytes], options: dict, args) -> dict:
    port = free_port()
    proc = start_server(artifact, port, args.threads, options)
    try:
        rows0, calls0 = batch_stats(port)
        latencies, errors = asyncio.run(load(port, bodies, args.clients, args.seconds))
        rows1, calls1 = batch_stats(port)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    ms = np.asarray(latencies) * 1000
    return {
        "rps": len(latencies) / args.seconds,
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "errors": errors,
        "rows_per_call": (rows1 - rows0) / max(calls1 - calls0, 1),
    }


def benchmark(args: argparse.Namespace) -> dict:
    """Every model under every variant, rounds interleaved; prints the tables, returns medians.

    ``args`` needs: models, clients, seconds, rounds, threads, waits.
    """
    print(
        f"{args.clients} clients, {args.seconds:g} s x {args.rounds} rounds per variant, "
        f"ORT threads {args.threads or 'server default'}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, httptools {'on' if find_spec('httptools') else 'off'}"
    )
    variants = {
        f"batching on, wait {w:g} ms": {"max_batch_size": 32, "max_wait_ms": w} for w in args.waits
    }
    variants["batching off"] = {"max_batch_size": 1}
    if args.compare_protocols:
        variants["batching on, uvicorn's protocol (no limits)"] = {
            "max_batch_size": 32,
            "max_wait_ms": args.waits[0],
            "plain_uvicorn": True,
        }
    on = next(iter(variants))
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            artifact, x = build(name, Path(tmp))
            bodies = requests_for(x)
            runs: dict[str, list[dict]] = {v: [] for v in variants}
            for _ in range(args.rounds):
                for variant, options in variants.items():
                    runs[variant].append(run_variant(artifact, bodies, options, args))
            results[name] = {
                v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in runs.items()
            }
            results[name]["speedup"] = statistics.median(
                a["rps"] / b["rps"] for a, b in zip(runs[on], runs["batching off"], strict=True)
            )
            print(f"\n{name}: {MODELS[name]}")
            print("| variant | requests/s | p50 ms | p99 ms | rows per model call | errors |")
            print("| --- | ---: | ---: | ---: | ---: | ---: |")
            for v in variants:
                r = results[name][v]
                print(
                    f"| {v} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | "
                    f"{r['rows_per_call']:.1f} | {r['errors']:.0f} |"
                )
            print(
                f"throughput {on} / off (median of paired rounds): {results[name]['speedup']:.2f}x"
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="ONNX Runtime intra-op threads (default: the server's)",
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument(
        "--waits",
        nargs="+",
        type=float,
        default=[5.0],
        help="max_wait_ms values to run (first: the headline)",
    )
    parser.add_argument(
        "--compare-protocols",
        action="store_true",
        help="add a variant on uvicorn's own protocol (no limits) to measure what they cost",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = benchmark(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
