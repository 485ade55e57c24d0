"""What a loss is, read from its autograd graph, its value and the outputs it was computed from.

Most users never tell the Doctor their loss function; the loss itself says what it is. Its autograd
graph names the loss operation (``NllLossBackward0`` under ``LogSoftmaxBackward0`` is
cross-entropy), what fed it (a ``SoftmaxBackward0`` below the cross-entropy: probabilities into a
loss that expects logits), whether its inputs were broadcast (``ExpandBackward0`` below an
element-wise loss) and every leaf tensor it trains (``AccumulateGrad`` nodes). Where there is no
graph (a float, a detached loss), the loss's value is matched against the standard losses of the
batch's outputs and targets.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

MAX_NODES = 200_000
"""Nodes visited at most when walking a loss graph (a large transformer's has ~10^4)."""
VALUE_RTOL = 1e-4
"""Relative tolerance for a loss value to match a standard loss recomputed from the outputs (the
same float32 operations agree to ~1e-6; a different loss differs by far more)."""

_LOSS_NODES = {
    "MseLossBackward0": "mse",
    "HuberLossBackward0": "huber",
    "SmoothL1LossBackward0": "huber",
    "BinaryCrossEntropyWithLogitsBackward0": "bce_logits",
    "BinaryCrossEntropyBackward0": "bce",
    "NllLossBackward0": "nll",
    "NllLoss2DBackward0": "nll",
}
_TRANSPARENT = {  # reshapes and casts: they do not change what a tensor holds
    "ViewBackward0",
    "ReshapeAliasBackward0",
    "UnsafeViewBackward0",
    "SqueezeBackward0",
    "SqueezeBackward1",
    "UnsqueezeBackward0",
    "TransposeBackward0",
    "PermuteBackward0",
    "CloneBackward0",
    "ToCopyBackward0",
    "SliceBackward0",
    "SelectBackward0",
    "IndexBackward0",
    "ContiguousBackward0",
}
_REDUCTIONS = {"MeanBackward0", "MeanBackward1", "SumBackward0", "SumBackward1", "DivBackward0"}
_SQUASH = {"SoftmaxBackward0": "softmax", "SigmoidBackward0": "sigmoid"}

_CANDIDATES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": lambda o, t: F.cross_entropy(o, t),
    "nll": lambda o, t: F.nll_loss(o, t),
    "bce_logits": lambda o, t: F.binary_cross_entropy_with_logits(o, t.to(o.dtype)),
    "mse": lambda o, t: F.mse_loss(o, t.to(o.dtype)),
    "l1": lambda o, t: F.l1_loss(o, t.to(o.dtype)),
}
"""Standard losses a loss value is compared with, most specific first."""


@dataclass
class LossGraph:
    """A loss's autograd graph, summarised for the rules."""

    kind: str = "other"  # the loss's kind (rules.model.LOSS_KINDS)
    loss_op: str | None = None  # the loss node, e.g. "NllLossBackward0"
    input_op: str | None = None  # what fed the loss: "softmax", "sigmoid", "log_softmax", ...
    broadcast: bool = False  # the loss's input or target was expanded to a common shape
    leaves: list[torch.Tensor] = field(default_factory=list)  # trained leaf tensors it reaches
    complete: bool = True  # False when the walk stopped at MAX_NODES


def read_graph(loss: torch.Tensor) -> LossGraph | None:
    """Summarise ``loss``'s autograd graph; None when it has none (a float or a detached loss)."""
    root = getattr(loss, "grad_fn", None)
    if root is None:
        return None
    graph = LossGraph()
    node = _skip(root, _REDUCTIONS | _TRANSPARENT | {"NegBackward0", "MulBackward0"})
    name = type(node).__name__
    if name in _LOSS_NODES:
        graph.loss_op, graph.kind = name, _LOSS_NODES[name]
        below = [_skip(n, _TRANSPARENT) for n in _children(node)]
        names = {type(n).__name__ for n in below}
        if graph.kind == "nll" and "LogSoftmaxBackward0" in names:
            graph.kind, graph.input_op = "cross_entropy", "log_softmax"
            soft = next(n for n in below if type(n).__name__ == "LogSoftmaxBackward0")
            below = [_skip(n, _TRANSPARENT) for n in _children(soft)]
            names = {type(n).__name__ for n in below}
        graph.broadcast = "ExpandBackward0" in names
        if graph.broadcast:
            below = [_skip(c, _TRANSPARENT) for n in below for c in _children(n)] + below
            names |= {type(n).__name__ for n in below}
        squash = [_SQUASH[n] for n in names if n in _SQUASH]
        graph.input_op = squash[0] if squash else graph.input_op
    elif name == "AbsBackward0" and any(
        type(_skip(n, _TRANSPARENT)).__name__ == "SubBackward0" for n in _children(node)
    ):
        graph.loss_op, graph.kind = name, "l1"
    graph.leaves, graph.complete = _leaves(root)
    return graph


def kind_from_value(
    loss: float, outputs: torch.Tensor | None, targets: torch.Tensor | None
) -> str | None:
    """The standard loss whose value on (outputs, targets) equals ``loss``; None when none does."""
    if outputs is None or targets is None or not math.isfinite(loss):
        return None
    if not outputs.is_floating_point() or outputs.shape[0] != targets.shape[0]:
        return None
    out, y = outputs.detach().float(), targets.detach()
    for kind, fn in _CANDIDATES.items():
        try:
            with warnings.catch_warnings():  # torch warns of the broadcasting we look for
                warnings.simplefilter("ignore")
                value = float(fn(out, y))
        except Exception:  # the wrong shapes or dtypes for this loss: not this one
            continue
        if math.isfinite(value) and abs(value - loss) <= VALUE_RTOL * max(abs(loss), 1e-3):
            return kind
    return None


def _children(node: object) -> list[object]:
    return [n for n, _ in getattr(node, "next_functions", ()) if n is not None]


def _skip(node: object, names: set[str]) -> object:
    """Follow single-input nodes named in ``names`` down to the first other node."""
    seen = 0
    while type(node).__name__ in names and seen < 64:
        children = _children(node)
        if not children:
            break
        graded = [c for c in children if type(c).__name__ != "AccumulateGrad"]
        node = graded[0] if len(graded) == 1 else children[0]
        seen += 1
    return node


def _leaves(root: object) -> tuple[list[torch.Tensor], bool]:
    """The leaf tensors (AccumulateGrad nodes) reachable from ``root``, and whether all were."""
    stack, seen, leaves = [root], {id(root)}, []
    while stack:
        if len(seen) > MAX_NODES:
            return leaves, False
        node = stack.pop()
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves.append(variable)
        for child in _children(node):
            if id(child) not in seen:
                seen.add(id(child))
                stack.append(child)
    return leaves, True
