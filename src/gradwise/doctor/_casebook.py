"""The doctor's case book: the registry of cases and the data, models and loop they share.

A case trains a small model in a plain PyTorch loop with a :class:`Doctor` attached, the way a
user would, and returns the doctor. Planted faults live in :mod:`gradwise.doctor.cases`, bugs
ported from public reports in :mod:`gradwise.doctor.ported`; both register here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from gradwise.doctor.doctor import Doctor


@dataclass(frozen=True)
class Case:
    name: str
    expect: str | None  # the rule code the fault must trigger; None: healthy, no warnings or errors
    description: str
    build: Callable[[], Doctor]  # a Doctor after the run (or a preflight report: .findings)
    source: str | None = None  # where a bug ported from a public report was reported

    def run(self) -> Doctor:
        torch.manual_seed(0)
        return self.build()


CASES: dict[str, Case] = {}


def case(
    name: str, expect: str | None, description: str, source: str | None = None
) -> Callable[[Callable[[], Doctor]], Callable]:
    """Register a case; ``source``: the public report a ported bug comes from (its address)."""

    def register(fn: Callable[[], Doctor]) -> Callable[[], Doctor]:
        if name in CASES:
            raise ValueError(f"case {name} is already registered")
        CASES[name] = Case(name, expect, description, fn, source)
        return fn

    return register


# -- data and models ----------------------------------------------------------------------------


def _digits(flat: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from gradwise.data import load_data

    bundle = load_data("digits", {"flatten": flat})
    x, y = bundle.train.tensors
    xv, yv = bundle.val.tensors
    return x, y, xv, yv


def _blobs(n: int = 2000, features: int = 20, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, features, generator=g) * 2
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, features, generator=g)
    return x, y


def _mlp(
    inputs: int, outputs: int, hidden: int = 64, depth: int = 2, act: type[nn.Module] = nn.ReLU
) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = inputs
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), act()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, outputs))


def _batches(
    n: int, batch_size: int, steps: int, seed: int = 0, shuffle: bool = True
) -> Iterator[tuple[int, torch.Tensor]]:
    """(step, indices) of ``steps`` mini-batches, reshuffled at every epoch, as a DataLoader with
    shuffle=True yields them (in order with shuffle=False)."""
    g = torch.Generator().manual_seed(seed)

    def epoch() -> torch.Tensor:
        return torch.randperm(n, generator=g) if shuffle else torch.arange(n)

    order, cursor = epoch(), 0
    for step in range(steps):
        if cursor + batch_size > n:
            order, cursor = epoch(), 0
        yield step, order[cursor : cursor + batch_size]
        cursor += batch_size


def _train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable,
    *,
    steps: int = 300,
    lr: float = 1e-3,
    optimizer: str = "adamw",
    batch_size: int = 32,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    eval_every: int = 50,
    zero_grad: bool = True,
    eval_mode: bool = True,
    shuffle: bool = True,
    params: list[nn.Parameter] | None = None,
    clip: float | None = None,
    **doctor_kwargs,
) -> Doctor:
    """A plain training loop, as a user writes it, with the Doctor attached."""
    params = list(model.parameters()) if params is None else params
    opt = torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else torch.optim.AdamW(params, lr=lr)
    doctor = Doctor(model, opt, loss_fn=loss_fn, on_finding=None, **doctor_kwargs)
    for step, idx in _batches(len(x), batch_size, steps, shuffle=shuffle):
        model.train()
        if zero_grad:
            opt.zero_grad()
        out = model(x[idx])
        loss = loss_fn(out, y[idx])
        loss.backward()
        doctor.step(loss, inputs=x[idx], outputs=out, targets=y[idx])
        if clip:
            nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        if val is not None and (step + 1) % eval_every == 0:
            if eval_mode:
                model.eval()
            with torch.no_grad():
                out = model(val[0])
                doctor.validate(loss=loss_fn(out, val[1]).item())
    doctor.close()
    return doctor


# -- healthy runs: no warnings or errors --------------------------------------------------------


def _sequences(n: int = 2000, length: int = 20, vocab: int = 10):
    """Label: whether token 0 occurs more often than token 1 (needs the whole sequence)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (n, length), generator=g)
    y = ((x == 0).sum(1) > (x == 1).sum(1)).long()
    return x[:1600], y[:1600], x[1600:], y[1600:]
