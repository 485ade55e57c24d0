"""Save-time cost of checkpoint checksums: save_checkpoint with and without SHA-256 hashing.

    .venv/bin/python scripts/checkpoint_hash_cost.py

Saves alternate between real hashing and none (a stub for hashlib), on a small MLP and a ~50 MB model, each with an
AdamW state (two moments: the state file is twice the weights, as in training). Prints medians.
"""

from __future__ import annotations

import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import torch

import gradwise.checkpoint as ckpt


def bench(model: torch.nn.Module, saves: int) -> dict[str, float]:
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    state = {"optimizer": opt.state_dict()}
    times: dict[str, list[float]] = {"without": [], "with": []}
    try:
        with tempfile.TemporaryDirectory(dir=".") as d:
            for step in range(saves):
                for label, module in (("without", _NoHash), ("with", hashlib)):
                    ckpt.hashlib = module
                    start = time.perf_counter()
                    ckpt.save_checkpoint(Path(d), step, model=model, state=state)
                    times[label].append(time.perf_counter() - start)
                    ckpt.prune(Path(d), 2)
    finally:
        ckpt.hashlib = hashlib
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


class _NoHash:
    """Stands in for hashlib in gradwise.checkpoint: no hashing at all."""

    @staticmethod
    def sha256() -> _NoHash:
        return _NoHash()

    @staticmethod
    def file_digest(file: object, name: str) -> _NoHash:
        return _NoHash()

    def update(self, data: object) -> None:
        pass

    def hexdigest(self) -> str:
        return "0" * 64


def main() -> None:
    torch.manual_seed(0)
    small = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    big = torch.nn.Sequential(*[torch.nn.Linear(2048, 1536) for _ in range(4)])
    for name, model, saves in (("small MLP", small, 40), ("~50 MB model", big, 15)):
        mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
        r = bench(model, saves)
        extra = r["with"] - r["without"]
        print(
            f"{name} ({mb:.2f} MB weights + {2 * mb:.2f} MB optimizer state): median save "
            f"{r['without']:.1f} ms without hashing, {r['with']:.1f} ms with "
            f"(+{extra:.1f} ms, {100 * extra / r['without']:+.0f}%)"
        )


if __name__ == "__main__":
    main()
