"""What one request may take of ``gradwise serve``: rows, memory, model call sizes.

The server runs as the real command line (``python -m gradwise serve``) in a subprocess, so that
its memory can be read from /proc.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from gradwise.deploy.serve import create_app

from .conftest import export_artifact, free_socket, live_server


def npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


@dataclass
class Served:
    url: str
    port: int
    proc: subprocess.Popen
    output: str = ""


@contextmanager
def serving(
    artifact: Path, *args: str, env: dict[str, str] | None = None, stop: int = signal.SIGINT
) -> Iterator[Served]:
    """``gradwise serve ARTIFACT --port P *args`` in a subprocess, once /health answers; stopped
    with ``stop`` at the end (its output is then in ``Served.output``)."""
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradwise", "serve", str(artifact), "--port", str(port), *args],
        env={**os.environ, "GRADWISE_DEBUG": "0", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    served = Served(f"http://127.0.0.1:{port}", port, proc)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{served.url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"the server did not start:\n{proc.communicate()[0]}")
            time.sleep(0.1)
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(stop)
        try:
            served.output = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            served.output = proc.communicate()[0]


def memory_mb(pid: int) -> tuple[float, float]:
    """Resident memory now and at its peak (VmRSS, VmHWM), in MB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An MLP 30-4096-2: its activations take 16 KiB per row, 1 GiB for 65,536 rows at once."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(30, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 2)
    ).eval()
    raw = np.random.default_rng(0).normal(size=(300, 30)).astype(np.float32)
    out = tmp_path_factory.mktemp("artifacts") / "wide"
    export_artifact(out, model, torch.as_tensor(raw[:4]), task="multiclass", raw_train=raw)
    return {"dir": out, "model": model}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_a_65k_row_request_runs_in_bounded_memory(wide) -> None:
    # Stated limit: the server's peak resident memory grows by less than 200 MB for this request
    # (one model call on all rows took 1.1 GB more, and kept it).
    x = np.random.default_rng(1).normal(size=(65_536, 30)).astype(np.float32)
    with (
        serving(wide["dir"], "--max-rows", "70000", "--max-batch-size", "256") as served,
        httpx.Client(base_url=served.url, timeout=120) as client,
    ):
        small = client.post("/v1/predict", json={"instances": x[:2].tolist()})
        assert small.status_code == 200  # warm: ONNX Runtime's first call allocates
        baseline, _ = memory_mb(served.proc.pid)
        r = client.post(
            "/v1/predict", content=npy(x), headers={"Content-Type": "application/x-npy"}
        )
        _, peak = memory_mb(served.proc.pid)
        metrics = client.get("/metrics").text
    assert r.status_code == 200, r.text
    got = np.asarray(r.json()["probabilities"])
    assert got.shape == (65_536, 2)
    rows = np.r_[0:3, 30_000:30_003, 65_533:65_536]  # pieces come back in order
    with torch.no_grad():
        expected = torch.softmax(wide["model"](torch.as_tensor(x[rows])), 1).numpy()
    np.testing.assert_allclose(got[rows], expected, atol=1e-5)
    assert peak - baseline < 200, f"peak {peak:.0f} MB, baseline {baseline:.0f} MB"
    # no model call saw more than --max-batch-size rows
    calls = _sample(metrics, "gradwise_batch_size_count")
    assert calls >= 65_536 / 256
    assert _sample(metrics, 'gradwise_batch_size_bucket{le="256.0"}') == calls


def _sample(text: str, name: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(name + " "))
    return float(line.split()[-1])


def test_more_rows_than_max_rows_is_a_413_naming_the_limit(tabular) -> None:
    x = tabular["x"]
    app = create_app(tabular["dir"], max_rows=100, max_batch_size=8, max_wait_ms=1)
    with live_server(app) as (url, _), httpx.Client(base_url=url) as client:
        for r in (
            client.post("/v1/predict", json={"instances": x[:101].tolist()}),
            client.post(
                "/v1/predict", content=npy(x[:101]), headers={"Content-Type": "application/x-npy"}
            ),
        ):
            assert r.status_code == 413, r.text
            detail = r.json()["detail"]
            assert "101 instances" in detail and "at most 100" in detail and "--max-rows" in detail
        r = client.post("/v1/predict", json={"instances": x[:100].tolist()})
        assert r.status_code == 200 and len(r.json()["predictions"]) == 100
        assert client.get("/health").json()["max_rows"] == 100


def test_npy_headers_that_claim_more_than_the_body_holds_are_refused(tabular) -> None:
    body = npy(tabular["x"][:4])
    # the same header claiming 400 million rows (48 GB), padding shortened to keep its length
    lying = body.replace(b"(4, 30)", b"(400000000, 30)").replace(b" " * 8 + b"\n", b"\n", 1)
    with live_server(create_app(tabular["dir"])) as (url, _):
        r = httpx.post(
            f"{url}/v1/predict", content=lying, headers={"Content-Type": "application/x-npy"}
        )
        assert r.status_code == 422
        assert "holds 480 bytes of data" in r.json()["detail"], r.text


def test_a_large_request_takes_turns_with_small_ones_in_calls_of_max_batch_size() -> None:
    import asyncio

    from gradwise.deploy.batching import MicroBatcher

    calls: list[int] = []

    def double(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        time.sleep(0.002)  # a model call
        return x * 2

    async def scenario() -> tuple[np.ndarray, float, float]:
        batcher = MicroBatcher(double, max_batch_size=4, max_wait_ms=1)
        await batcher.start()
        big = asyncio.create_task(batcher.submit(np.arange(400.0).reshape(400, 1)))
        await asyncio.sleep(0.02)  # the big request is under way
        start = time.perf_counter()
        small = await batcher.submit(np.ones((1, 1)))
        small_seconds = time.perf_counter() - start
        out = await big
        big_seconds = time.perf_counter() - start
        await batcher.close()
        assert small.tolist() == [[2.0]]
        return out, small_seconds, big_seconds

    out, small_seconds, big_seconds = asyncio.run(scenario())
    np.testing.assert_array_equal(out, np.arange(400.0).reshape(400, 1) * 2)
    assert max(calls) == 4 and sum(calls) == 401
    assert small_seconds < big_seconds / 3  # one turn (8 calls), not the rest of the 100
