"""Probes: run the model on purpose-built inputs to expose what no statistic shows.

* Batch-axis mixing (GW211): a model computes each sample's output from that sample alone. Run on a
  permuted batch, or on half of it, every sample's output must stay the same; an RNN fed
  (batch, time, features) without ``batch_first`` or a softmax over dim 0 changes them.
* Stochastic evaluation (GW213): in eval mode two passes over the same inputs must agree; a
  ``F.dropout`` without ``training=self.training`` makes them differ.

Every probe runs without gradients, in eval mode, with every module's attributes, buffers and mode
and the random generators restored: the run it probes is left exactly as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from gradwise.batch import outputs_of

PROBE_ROWS = 16
"""Rows of the batch the mixing probe uses (enough to see mixing; small enough to cost nothing)."""
MIXING_RTOL = 1e-3
"""Largest change of a sample's output, relative to the outputs' scale, that is still rounding:
float32 kernels that pick another blocking for another batch size differ by ~1e-6 relative, bf16
by ~1e-2 (the probe runs in float32 unless the model's weights are low precision)."""
MIXING_RTOL_LOW_PRECISION = 5e-2


@contextlib.contextmanager
def quiet(model: nn.Module) -> Iterator[None]:
    """Eval mode, no gradients, RNG state saved, and every module's state kept: its attributes
    (a hidden state carried between batches, a cache) and its buffers' values are put back on
    exit, whatever happened, so a model with state sees the probe's passes never happened."""
    saved = [(m, dict(m.__dict__), dict(m._buffers)) for m in model.modules()]
    values = {id(b): b.detach().clone() for _, _, bs in saved for b in bs.values() if b is not None}
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        with torch.no_grad():
            for m, attributes, buffers in saved:
                for key in set(m.__dict__) - set(attributes):
                    del m.__dict__[key]
                m.__dict__.update(attributes)
                m._buffers.clear()
                m._buffers.update(buffers)
                for buffer in buffers.values():
                    if buffer is not None:
                        buffer.copy_(values[id(buffer)])
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def rows(inputs: Any) -> int | None:
    """The batch size of a tensor or a mapping of tensors that share their first dimension."""
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0] if inputs.ndim else None
    if isinstance(inputs, Mapping):
        sizes = {v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.ndim}
        return sizes.pop() if len(sizes) == 1 else None
    return None


def _take(inputs: Any, index: torch.Tensor) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs[index.to(inputs.device)]
    return {
        k: v[index.to(v.device)] if isinstance(v, torch.Tensor) and v.ndim else v
        for k, v in inputs.items()
    }


def _call(model: nn.Module, inputs: Any) -> torch.Tensor | None:
    out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    logits, _ = outputs_of(out)
    return logits.float() if isinstance(logits, torch.Tensor) else None


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(torch.maximum(a.abs().max(), b.abs().max())) + 1e-12
    return float((a - b).abs().max()) / scale


def batch_mixing(model: nn.Module, inputs: Any) -> dict[str, float] | None:
    """How far per-sample outputs move when the batch is permuted and when it is halved.

    None when the probe does not apply: fewer than 4 rows, inputs that are not a tensor or a
    mapping of tensors with one batch dimension, outputs without one row per sample, or a model
    that cannot be called on part of a batch (it then has a fixed batch size).
    """
    n = rows(inputs)
    if n is None or n < 4:
        return None
    n = min(n, PROBE_ROWS)
    model = getattr(model, "_orig_mod", model)  # torch.compile'd: new batch sizes would recompile
    index = torch.arange(n)
    perm = torch.roll(index, n // 2)  # a fixed permutation: no random generator is used
    try:
        with quiet(model):
            full = _call(model, _take(inputs, index))
            if full is None or full.ndim == 0 or full.shape[0] != n:
                return None
            again = _call(model, _take(inputs, index))  # random in eval mode: GW213's, not ours
            if again is None or again.shape != full.shape or _relative(full, again) > MIXING_RTOL:
                return None
            permuted = _call(model, _take(inputs, perm))
            half = _call(model, _take(inputs, index[: n // 2]))
    except Exception:  # the model only takes its own batch size: the probe does not apply
        return None
    if permuted is None or half is None or permuted.shape != full.shape:
        return None
    if half.shape[1:] != full.shape[1:] or half.shape[0] != n // 2:
        return None
    if not bool(torch.isfinite(full).all()):
        return None
    low = any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters())
    return {
        "permuted": _relative(full[perm], permuted),
        "halved": _relative(full[: n // 2], half),
        "rows": float(n),
        "tolerance": MIXING_RTOL_LOW_PRECISION if low else MIXING_RTOL,
    }


def repeat_forward(
    model: nn.Module, call: Callable[[], Any], first: Any
) -> dict[str, float] | None:
    """How far a second eval-mode pass (``call``) differs from the first one's output ``first``."""
    a, _ = outputs_of(first)
    if not isinstance(a, torch.Tensor) or not a.is_floating_point() or a.numel() == 0:
        return None
    with quiet(model):
        b, _ = outputs_of(call())
    if not isinstance(b, torch.Tensor) or b.shape != a.shape:
        return None
    a, b = a.detach().float(), b.detach().float()
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        return None
    return {"difference": _relative(a, b), "tolerance": MIXING_RTOL}
