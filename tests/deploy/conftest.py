"""Shared fixtures for the deploy tests: small exported artifacts and a live server.

Artifacts follow the export contract (model.onnx from the exporter's ``write_artifact``, the
model card model.json, reference.json from ``gradwise.deploy.card``); they are built once per
session, so each ONNX export (about 2 s) runs once.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def export_artifact(
    out: Path,
    model: torch.nn.Module,
    example: torch.Tensor,
    *,
    task: str,
    raw_train: np.ndarray,
    class_labels: list[Any] | None = None,
    preprocessing: dict[str, Any] | None = None,
    name: str = "test-model",
) -> Path:
    """Write an export directory as ``gradwise export`` does: model.onnx, model.json and
    reference.json (statistics of ``raw_train``, the raw training inputs)."""
    from gradwise.deploy.card import preprocess, reference_statistics, sha256_file
    from gradwise.deploy.export import write_artifact

    out.mkdir(parents=True, exist_ok=True)
    write_artifact(model.eval(), example, "onnx", out / "model.onnx")
    preprocessing = preprocessing or {}
    with torch.no_grad():
        outputs = model(torch.as_tensor(preprocess(raw_train, preprocessing))).numpy()

    def spec(name: str, t: np.ndarray | torch.Tensor) -> dict[str, Any]:
        return {"name": name, "shape": [None, *t.shape[1:]], "dtype": str(t.dtype).split(".")[-1]}

    card = {
        "name": name,
        "format": "onnx",
        "artifact": "model.onnx",
        "sha256": sha256_file(out / "model.onnx"),
        "inputs": [spec("input", example)],
        "outputs": [spec("output", outputs)],
        "task": task,
        "class_labels": class_labels,
        "preprocessing": preprocessing,
        "recipe": {},
        "metrics": {"val_accuracy": 0.9},
        "versions": {"torch": torch.__version__},
        "parity": {},
        "quantized": None,
        "created": "2025-01-01T00:00:00Z",
    }
    (out / "model.json").write_text(json.dumps(card, indent=2))
    reference = reference_statistics(raw_train, outputs, task=task, class_labels=class_labels)
    (out / "reference.json").write_text(json.dumps(reference))
    return out


@pytest.fixture(scope="session")
def tabular(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 2-class MLP on scikit-learn's breast cancer data (30 raw features, standardised inside
    the serving pre-processing): its artifact, the eager model and the raw data."""
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    mean, std = x.mean(0), x.std(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(30, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    xs = torch.tensor((x - mean) / std, dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):  # a few full-batch steps: predictions that mean something
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xs), torch.tensor(y)).backward()
        opt.step()
    pre = {"standardize": {"mean": mean.tolist(), "std": std.tolist(), "per": "feature"}}
    out = tmp_path_factory.mktemp("artifacts") / "tabular"
    export_artifact(
        out,
        model,
        xs[:4],
        task="multiclass",
        raw_train=x,
        class_labels=["malignant", "benign"],
        preprocessing=pre,
        name="breast-cancer-mlp",
    )
    return {"dir": out, "model": model.eval(), "x": x.astype(np.float32), "y": y, "pre": pre}


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int = 20, width: int = 8) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(ids)))


@pytest.fixture(scope="session")
def lm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A character-level 'language model' over a 20-character vocabulary, 12 tokens per sample."""
    torch.manual_seed(0)
    model = TinyLM()
    ids = np.random.default_rng(0).integers(0, 20, size=(300, 12))
    out = tmp_path_factory.mktemp("artifacts") / "lm"
    export_artifact(
        out,
        model,
        torch.as_tensor(ids[:2]),
        task="lm",
        raw_train=ids,
        preprocessing={"char_vocab": "abcdefghijklmnopqrst"},
        name="tiny-lm",
    )
    return {"dir": out, "model": model.eval(), "ids": ids}


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def live_server(app: Any, graceful_timeout: float = 10) -> Iterator[tuple[str, Any]]:
    """Run ``app`` with uvicorn on a free loopback port in a background thread; yields the base
    URL and the uvicorn server, and shuts it down gracefully at the end."""
    import uvicorn

    sock = free_socket()
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=graceful_timeout,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    host, port = sock.getsockname()
    try:
        yield f"http://{host}:{port}", server
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
