"""Model rules (GW2xx): the model, its loss and its initialisation do not fit together.

``loss_kind`` names the loss a training run uses; the checks take a batch's outputs and targets,
the model, or the activation scales that :func:`activation_stds` measures. Every threshold is in
:data:`THRESHOLDS`.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from gradwise.doctor.findings import rule
from gradwise.doctor.rules._types import Result
from gradwise.doctor.rules.data import (
    BCE_LOSSES,
    CLASS_INDEX_LOSSES,
    IGNORE_INDEX,
    is_probability_targets,
    multiclass_indices,
)

LOSS_KINDS = ("cross_entropy", "nll", "bce_logits", "bce", "mse", "l1", "huber", "other")
REGRESSION_LOSSES = ("mse", "l1", "huber")
CLASS_TASKS = ("multiclass", "binary", "multilabel", "lm", "classification")


@dataclass(frozen=True)
class ModelThresholds:
    """Every number the model rules decide with. Change them here, nowhere else."""

    # GW201 probabilities-into-logits-loss -----------------------------------------------------
    row_sum_tolerance: float = 1e-3
    """Outputs are softmax probabilities when every row is >= 0 and sums to 1 within this
    (float32 softmax rows sum to 1 within ~1e-6; raw logits essentially never do)."""
    row_sum_tolerance_low_precision: float = 1e-2
    """The same for float16/bfloat16 outputs (bf16 has ~3 significant digits)."""
    sigmoid_min_values: int = 256
    """Without structural evidence (a final Sigmoid), this many outputs must all lie in [0, 1] ...
    (an untrained model's logits for one small batch can all be small and positive)"""
    sigmoid_min_span: float = 0.5
    """... and spread over at least this much of [0, 1]: logits that move that far yet never leave
    [0, 1] are squashed by a sigmoid."""

    # GW204 poor-initialisation ----------------------------------------------------------------
    collapse_ratio: float = 1e-2
    """Output std of the last Linear/Conv layer over that of the first below which the signal has
    vanished with depth (Glorot & Bengio 2010; He et al. 2015: a good init keeps it ~1; PyTorch's
    default init shrinks ReLU stacks by ~0.4x per layer until the biases set a floor)."""
    explode_ratio: float = 1e2
    """Output std of any later Linear/Conv layer over that of the first above which the signal
    explodes with depth (e.g. N(0, 1) weights: x sqrt(fan_in / 2) per ReLU layer)."""

    # GW206 batchnorm-tiny-batch ---------------------------------------------------------------
    min_batchnorm_batch: int = 8
    """Batch size below which BatchNorm's batch statistics are too noisy: its error rises steeply
    below 8-16 samples per GPU (Wu & He 2018, 'Group Normalization', figure 1; Ioffe 2017)."""


THRESHOLDS = ModelThresholds()


# ============================================================================ loss kinds

_MODULE_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.CrossEntropyLoss, "cross_entropy"),
    (nn.NLLLoss, "nll"),
    (nn.BCEWithLogitsLoss, "bce_logits"),
    (nn.BCELoss, "bce"),
    (nn.MSELoss, "mse"),
    (nn.L1Loss, "l1"),
    (nn.HuberLoss, "huber"),
    (nn.SmoothL1Loss, "huber"),
)
_FUNCTION_KINDS = {
    "cross_entropy": "cross_entropy",
    "nll_loss": "nll",
    "binary_cross_entropy_with_logits": "bce_logits",
    "binary_cross_entropy": "bce",
    "mse_loss": "mse",
    "l1_loss": "l1",
    "huber_loss": "huber",
    "smooth_l1_loss": "huber",
}
_NAME_KINDS = {
    # gradwise's Task.loss_name values and recipe names; "bce" is gradwise's BCE-with-logits
    "cross_entropy": "cross_entropy",
    "ce": "cross_entropy",
    "nll": "nll",
    "bce": "bce_logits",
    "bce_logits": "bce_logits",
    "bce_probs": "bce",
    "mse": "mse",
    "l2": "mse",
    "mae": "l1",
    "l1": "l1",
    "huber": "huber",
    "smooth_l1": "huber",
}
_TASK_KINDS = {
    "multiclass": "cross_entropy",
    "lm": "cross_entropy",
    "binary": "bce_logits",
    "multilabel": "bce_logits",
    "regression": "mse",
}


def loss_kind(loss_fn: Any, task: Any = None) -> str:
    """The kind of loss ``loss_fn`` computes: one of :data:`LOSS_KINDS`.

    Understands torch loss modules (CrossEntropyLoss, NLLLoss, BCEWithLogitsLoss, BCELoss, MSELoss,
    L1Loss, HuberLoss, SmoothL1Loss and their subclasses), ``torch.nn.functional`` losses (also
    wrapped in ``functools.partial``), gradwise ``Task`` objects and their bound ``loss`` method,
    and loss names (``"mse"``, ``"mae"``, ...; ``"bce"`` is gradwise's BCE with logits). Anything
    else is "other". With ``loss_fn`` None the task decides (a ``Task`` or its name):
    multiclass/lm -> cross_entropy, binary/multilabel -> bce_logits, regression -> mse.
    """
    if loss_fn is None:
        if task is None:
            return "other"
        if _is_task(task):
            return loss_kind(task)
        return _TASK_KINDS.get(str(task), "other")
    return _loss_kind(loss_fn, depth=0)


def _is_task(obj: Any) -> bool:
    from gradwise.tasks import Task

    return isinstance(obj, Task)


def _loss_kind(fn: Any, depth: int) -> str:
    if depth > 4:
        return "other"
    if isinstance(fn, str):
        return _NAME_KINDS.get(fn.lower(), "other")
    if isinstance(fn, nn.Module):
        for cls, kind in _MODULE_KINDS:
            if isinstance(fn, cls):
                return kind
        return "other"
    if _is_task(fn):
        custom = getattr(fn, "_custom", None)
        if custom is not None:
            return _loss_kind(custom, depth + 1)
        return _NAME_KINDS.get(fn.loss_name, "other")
    owner = getattr(fn, "__self__", None)  # a bound method: Task.loss, or a module's forward
    if owner is not None and (_is_task(owner) or isinstance(owner, nn.Module)):
        return _loss_kind(owner, depth + 1)
    if isinstance(fn, functools.partial):
        return _loss_kind(fn.func, depth + 1)
    if callable(fn):
        name = getattr(fn, "__name__", "")
        module = getattr(fn, "__module__", "") or ""
        if name in _FUNCTION_KINDS and (getattr(F, name, None) is fn or module.startswith("torch")):
            return _FUNCTION_KINDS[name]
    return "other"


# ============================================================================ GW201


def final_module(model: nn.Module) -> nn.Module | None:
    """The module that most likely produces the model's output: the last element of a
    Sequential (recursively), else the last leaf module registered."""
    current: nn.Module = model
    while isinstance(current, nn.Sequential) and len(current) > 0:
        current = current[-1]
    if not list(current.children()):
        return current
    leaves = [m for m in current.modules() if not list(m.children())]
    return leaves[-1] if leaves else None


_SQUASH_MODULES: dict[type[nn.Module], str] = {nn.Softmax: "softmax", nn.Sigmoid: "sigmoid"}
_TRANSPARENT_OPS = {
    "squeeze",
    "unsqueeze",
    "view",
    "reshape",
    "flatten",
    "contiguous",
    "float",
    "to",
    "type",
    "clone",
    "double",
    "detach",
}


class _LastOps(TorchFunctionMode):
    """Records which torch operation produced each of the most recent tensors."""

    def __init__(self, keep: int = 256) -> None:
        super().__init__()
        self.recent: deque[tuple[torch.Tensor, str]] = deque(maxlen=keep)

    def producer(self, tensor: torch.Tensor) -> str | None:
        for t, name in reversed(self.recent):
            if t is tensor:
                return name
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            name = getattr(func, "__name__", "")
            if name in _TRANSPARENT_OPS and args and isinstance(args[0], torch.Tensor):
                name = self.producer(args[0]) or name
            self.recent.append((out, name))
        return out


def probe_forward(model: nn.Module, inputs: Any) -> tuple[Any, str | None]:
    """``model(inputs)`` in eval mode without gradients, and the torch operation that produced the
    output ("softmax", "sigmoid", "linear", ...), seen through reshapes and dtype casts. Catches
    functional ``torch.softmax``/``F.sigmoid`` calls that no module structure shows. Every
    module's training mode is restored."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), _LastOps() as ops:
            out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        return out, (ops.producer(out) if isinstance(out, torch.Tensor) else None)
    finally:
        for m, mode in modes:
            m.training = mode


def output_producer(model: nn.Module, inputs: Any) -> str | None:
    """The torch operation that produced ``model(inputs)`` (see :func:`probe_forward`)."""
    return probe_forward(model, inputs)[1]


def _row_sums_to_one(outputs: torch.Tensor) -> tuple[bool, float]:
    """Whether outputs are non-negative with every slice along some class axis summing to 1."""
    if outputs.ndim < 2 or bool((outputs < 0).any()):
        return False, math.inf
    low = outputs.dtype in (torch.float16, torch.bfloat16)
    tol = THRESHOLDS.row_sum_tolerance_low_precision if low else THRESHOLDS.row_sum_tolerance
    best = math.inf
    for axis in sorted({1, outputs.ndim - 1}):
        if outputs.shape[axis] < 2:
            continue
        dev = float((outputs.double().sum(dim=axis) - 1).abs().max())
        best = min(best, dev)
    return best <= tol, best


@rule(
    "GW201",
    "probabilities-into-logits-loss",
    "error",
    "preflight",
    explains=("GW306", "GW307", "GW402"),
    fixes=[
        "Remove the final Softmax/Sigmoid from the model and feed the raw logits to the loss: "
        "CrossEntropyLoss applies log-softmax itself, BCEWithLogitsLoss applies the sigmoid.",
        "If you need probabilities for inference, apply torch.softmax/torch.sigmoid to the logits "
        "outside the model (or only in eval mode).",
        "If the model must output probabilities, use the matching loss: NLLLoss on log_softmax "
        "outputs, or BCELoss on sigmoid outputs (numerically less stable).",
    ],
    references=[
        "https://pytorch.org/docs/stable/generated/torch.nn.CrossEntropyLoss.html ('The input is "
        "expected to contain the unnormalized logits for each class')",
        "https://pytorch.org/docs/stable/generated/torch.nn.BCEWithLogitsLoss.html",
        "Goodfellow, Bengio & Courville 2016, 'Deep Learning', section 6.2.2 (saturating outputs)",
    ],
)
def probabilities_to_logits_loss(
    outputs: torch.Tensor,
    loss_kind: str,
    model: nn.Module | None = None,
    *,
    final_op: str | None = None,
    loss_graph: Any = None,
    loss_value: float | None = None,
) -> Result:
    """The model outputs probabilities (softmax or sigmoid) into a loss that expects logits.

    ## Why it matters
    CrossEntropyLoss applies log-softmax to its input and BCEWithLogitsLoss a sigmoid. Fed
    probabilities, they squash twice: the loss can no longer approach zero (softmax outputs in
    [0, 1] differ by at most 1, so the 'logits' can never favour a class strongly), gradients
    shrink as predictions improve, and training stalls at a mediocre loss.

    ## How it is detected
    Detected from the
    outputs and the model's structure: for cross-entropy/NLL, non-negative outputs whose rows sum
    to 1; for BCE with logits, all outputs in [0, 1] together with a final ``nn.Sigmoid`` (or a
    final sigmoid operation, ``final_op``), or, without that structural evidence, at least
    ``THRESHOLDS.sigmoid_min_values`` outputs all in [0, 1] spread over at least
    ``THRESHOLDS.sigmoid_min_span`` (a single small batch of an untrained model is never enough).
    Without a declared loss, the loss's autograd graph says what the loss is and what fed it (a
    softmax below the cross-entropy, a sigmoid below BCE with logits), and an NLL loss below zero
    was given probabilities or raw scores instead of log-probabilities.
    """
    t = THRESHOLDS
    if not torch.is_tensor(outputs) or not outputs.is_floating_point() or outputs.numel() == 0:
        return None
    if loss_kind not in ("cross_entropy", "nll", "bce_logits"):
        return None
    fed = getattr(loss_graph, "input_op", None)
    if loss_kind == "nll" and loss_value is not None and loss_value < 0 and fed != "log_softmax":
        return (
            f"the NLL loss is {loss_value:.3g}, below zero: NLLLoss expects log-probabilities "
            f"(log_softmax), but got {fed + ' outputs' if fed else 'raw scores'}; use "
            "CrossEntropyLoss on the logits",
            {"loss": loss_value, "final_softmax": float(fed == "softmax")},
        )
    if (fed == "softmax" and loss_kind != "bce_logits") or (
        fed == "sigmoid" and loss_kind == "bce_logits"
    ):
        expects = {"cross_entropy": "logits", "nll": "log-probabilities (log_softmax)"}
        return (
            f"the loss's autograd graph shows a {fed} feeding the {loss_kind} loss, which expects "
            f"{expects.get(loss_kind, 'logits')}: probabilities are squashed twice; remove the "
            f"{fed} (the loss applies its own)",
            {"final_softmax": float(fed == "softmax"), "final_sigmoid": float(fed == "sigmoid")},
        )
    out = outputs.detach()
    if not bool(torch.isfinite(out).all()):
        return None
    structural = None
    last = final_module(model) if model is not None else None
    for cls, op in _SQUASH_MODULES.items():
        if last is not None and isinstance(last, cls):
            structural = op
    if final_op in ("softmax", "sigmoid"):
        structural = final_op
    lo, hi = float(out.min()), float(out.max())
    in_unit = lo >= 0 and hi <= 1
    rows, deviation = _row_sums_to_one(out)
    evidence = {
        "min_output": lo,
        "max_output": hi,
        "final_softmax": float(structural == "softmax"),
        "final_sigmoid": float(structural == "sigmoid"),
        "outputs": out.numel(),
    }
    if math.isfinite(deviation):
        evidence["max_row_sum_deviation"] = deviation
    where = (
        f" (the model ends in {type(last).__name__})"
        if structural and last is not None and type(last) in _SQUASH_MODULES
        else f" (its last operation is {structural})"
        if structural
        else ""
    )
    loss_name = {
        "cross_entropy": "CrossEntropyLoss",
        "nll": "NLLLoss",
        "bce_logits": "BCEWithLogitsLoss",
    }[loss_kind]
    if loss_kind in ("cross_entropy", "nll"):
        if rows or (structural is not None and in_unit):
            expects = "log-probabilities (log_softmax)" if loss_kind == "nll" else "logits"
            return (
                f"the model outputs probabilities{where}: outputs lie in [{lo:.3g}, {hi:.3g}]"
                + (", every row sums to 1" if rows else "")
                + f", but {loss_name} expects {expects}; remove the final softmax",
                evidence,
            )
        return None
    # bce_logits
    if rows and out.shape[-1] >= 2:
        return (
            f"the model outputs softmax probabilities{where} (every row sums to 1) into "
            f"{loss_name}, which expects one logit per label; remove the softmax",
            evidence,
        )
    if not in_unit:
        return None
    span = hi - lo
    evidence["span"] = span
    if structural is not None or (
        out.numel() >= t.sigmoid_min_values and span >= t.sigmoid_min_span
    ):
        return (
            f"the model outputs probabilities{where}: all {out.numel()} outputs lie in "
            f"[{lo:.3g}, {hi:.3g}], but {loss_name} applies a sigmoid itself; remove the final "
            "sigmoid (or use BCELoss)",
            evidence,
        )
    return None


# ============================================================================ GW204


_SCALE_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


def activation_stds(model: nn.Module, inputs: torch.Tensor) -> list[tuple[str, float]]:
    """The std of every Linear/Conv layer's output for ``inputs``, in the order they run.

    One forward without gradients through the model itself (no copy), with temporary forward
    hooks. Dropout is off (eval mode), but BatchNorm layers use batch statistics as they will in
    training (in eval mode a fresh BatchNorm is the identity and would hide the normalisation that
    keeps a deep CNN's scale); their running statistics are restored afterwards, as are every
    module's training mode and the hooks. A layer called several times gives one entry per call
    (``name#2``, ...).
    """
    records: list[tuple[str, float]] = []
    calls: dict[str, int] = {}
    handles = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if not isinstance(output, torch.Tensor) or output.numel() < 2:
            return
        name = names.get(module, type(module).__name__) or type(module).__name__
        calls[name] = calls.get(name, 0) + 1
        label = name if calls[name] == 1 else f"{name}#{calls[name]}"
        records.append((label, float(output.detach().double().std())))

    modes = [(m, m.training) for m in model.modules()]
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [
        {k: v.clone() for k, v in bn.named_buffers(recurse=False) if v is not None}
        for bn in batchnorms
    ]
    batch = inputs.shape[0] if inputs.ndim else 1
    try:
        for m in model.modules():
            if isinstance(m, _SCALE_LAYERS):
                handles.append(m.register_forward_hook(hook))
        model.eval()
        if batch > 1:
            for bn in batchnorms:
                bn.train()
        with torch.no_grad():
            model(inputs)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for bn, buffers in zip(batchnorms, saved, strict=True):
                for k, v in buffers.items():
                    getattr(bn, k).copy_(v)
        for m, mode in modes:
            m.training = mode
    return records


@rule(
    "GW204",
    "poor-initialisation",
    "warning",
    "preflight",
    when="first",
    explains=("GW303", "GW309"),
    fixes=[
        "Use He (Kaiming) initialisation for ReLU-family networks and Xavier/Glorot for "
        "tanh/linear ones (gradwise.nn.init_weights(model, 'he')), with zero biases.",
        "Add normalisation (BatchNorm for CNNs, LayerNorm for MLPs/Transformers) so that each layer "
        "sees unit-scale inputs whatever the initialisation.",
        "Do not re-initialise weights with a fixed std (e.g. N(0, 1) or N(0, 0.01)) that ignores "
        "the layer's fan-in.",
        "For very deep residual networks, scale or zero-initialise the last layer of each residual "
        "branch (Fixup, zero-init BN gamma) so the identity path carries the signal.",
    ],
    references=[
        "Glorot & Bengio 2010, 'Understanding the difficulty of training deep feedforward neural networks'",
        "He, Zhang, Ren & Sun 2015, 'Delving Deep into Rectifiers' (Kaiming initialisation)",
        "Mishkin & Matas 2016, 'All you need is a good init' (LSUV)",
        "https://pytorch.org/docs/stable/nn.init.html",
    ],
)
def poor_initialisation(activation_stds: list[tuple[str, float]]) -> Result:
    """The scale of the activations vanishes or explodes with depth at initialisation.

    ## Why it matters
    If each layer multiplies the signal's scale by a factor away from 1, the deep layers see
    numbers 100x too small (gradients vanish, the early layers do not learn) or 100x too large
    (saturated activations, huge gradients, NaNs). Good initialisations (He for ReLU, Xavier for
    tanh) keep every layer's output std near the first layer's.

    ## How it is detected
    Detected from the output std of
    each Linear/Conv layer in forward order (:func:`activation_stds`): the last layer's std over
    the first's below ``THRESHOLDS.collapse_ratio``, or any later layer's above
    ``THRESHOLDS.explode_ratio``. Layers whose output is exactly zero while deeper layers are
    not (deliberately zero-initialised heads or residual branches) are skipped; all deeper layers
    at exactly zero (zero-initialised weights) is a collapse.
    """
    t = THRESHOLDS
    entries = [(n, float(s)) for n, s in activation_stds]
    if len(entries) < 2:
        return None
    nonfinite = [(i, n) for i, (n, s) in enumerate(entries) if not math.isfinite(s)]
    if nonfinite:
        i, name = nonfinite[0]
        return (
            f"the activations overflow at initialisation: layer {name} (#{i + 1} of "
            f"{len(entries)}) outputs non-finite values",
            {"layers": len(entries), "first_std": entries[0][1], "nonfinite_layer": i},
        )
    nonzero = [i for i, (_, s) in enumerate(entries) if s > 0]
    if not nonzero:
        return (
            f"every one of the {len(entries)} Linear/Conv layers outputs a constant at "
            "initialisation: the weights are zero-initialised, so no hidden unit can learn "
            "anything different from the others",
            {"layers": len(entries), "first_std": 0.0, "last_std": 0.0, "ratio": 0.0},
        )
    ref_i = nonzero[0]
    ref_name, ref = entries[ref_i]
    later = [(i, entries[i]) for i in nonzero if i > ref_i]
    if ref_i < len(entries) - 1 and not later:
        return (
            f"layer {ref_name} has output std {ref:.3g} but all {len(entries) - ref_i - 1} layers "
            "after it output constants at initialisation (zero-initialised weights): the signal "
            "collapses to 0",
            {
                "layers": len(entries),
                "first_std": ref,
                "last_std": 0.0,
                "ratio": 0.0,
                "collapse_layer": ref_i + 1,
            },
        )
    if not later:
        return None
    last_i, (last_name, last) = later[-1]
    ratio = last / ref
    top_i, (top_name, top) = max(later, key=lambda e: e[1][1])
    evidence = {
        "layers": len(entries),
        "first_std": ref,
        "last_std": last,
        "ratio": ratio,
        "max_std": top,
        "max_ratio": top / ref,
        "threshold_low": t.collapse_ratio,
        "threshold_high": t.explode_ratio,
    }
    if top / ref > t.explode_ratio:
        evidence["explode_layer"] = top_i
        return (
            f"the activations explode with depth at initialisation: output std grows from "
            f"{ref:.3g} ({ref_name}) to {top:.3g} ({top_name}), {top / ref:.3g}x over "
            f"{top_i - ref_i} layers; use He/Xavier init",
            evidence,
        )
    if ratio < t.collapse_ratio:
        crossed = next(i for i, (_, s) in later if s / ref < t.collapse_ratio)
        evidence["collapse_layer"] = crossed
        return (
            f"the activations vanish with depth at initialisation: output std falls from "
            f"{ref:.3g} ({ref_name}) to {last:.3g} ({last_name}), {ratio:.3g}x over "
            f"{last_i - ref_i} layers; use He/Xavier init",
            evidence,
        )
    return None


# ============================================================================ GW205


def _integer_valued(t: torch.Tensor) -> bool:
    return (not t.is_floating_point()) or bool((t == torch.round(t)).all())


@rule(
    "GW205",
    "loss-task-mismatch",
    "error",
    "preflight",
    fixes=[
        "Classification (integer class labels): use CrossEntropyLoss on C logits (binary: "
        "BCEWithLogitsLoss on one logit) — or pass task='multiclass'/'binary' to gradwise.",
        "Regression (continuous targets): use MSELoss/L1Loss/HuberLoss on one output per target — "
        "or task='regression'.",
        "Multi-class labels 0..C-1 with BCE: switch to CrossEntropyLoss, or one-hot the labels if "
        "the task really is multilabel.",
    ],
    references=[
        "Goodfellow, Bengio & Courville 2016, 'Deep Learning', section 6.2.1 (choosing the loss "
        "from the output distribution)",
        "https://pytorch.org/docs/stable/nn.html#loss-functions",
    ],
)
def loss_task_mismatch(
    loss_kind: str,
    targets: torch.Tensor,
    outputs: torch.Tensor | None = None,
    task: Any = None,
) -> Result:
    """The loss does not fit the kind of targets: a regression loss on class labels, or vice versa.

    ## Why it matters
    MSE on class indices treats class 7 as 'closer' to class 8 than to class 1 and, with C outputs
    against [B] targets, silently broadcasts to a [B, C] comparison; cross-entropy on continuous
    regression targets either crashes or learns nonsense; BCE on multi-class indices 0..C-1 treats
    every index above 1 as an impossible probability.

    ## How it is detected
    Detected from the loss kind, the targets'
    dtype and values (integer class indices vs continuous floats), the outputs' shape and the task
    when it is known.
    """
    if not torch.is_tensor(targets) or targets.numel() == 0:
        return None
    targets = targets.detach()
    task = getattr(task, "kind", task)  # a gradwise Task or its name
    kind = loss_kind
    n_values = int(torch.unique(targets).numel()) if targets.numel() <= 10_000_000 else -1
    evidence: dict[str, float] = {
        "min_target": float(targets.min()),
        "max_target": float(targets.max()),
        "distinct_targets": float(n_values),
        "integer_targets": float(not targets.is_floating_point()),
    }
    width = None
    if outputs is not None and torch.is_tensor(outputs) and outputs.ndim >= 2:
        width = outputs.shape[1]
        evidence["outputs_per_sample"] = float(width)

    if kind in REGRESSION_LOSSES:
        if task in CLASS_TASKS:
            return (
                f"a regression loss ({kind}) for a {task} task: the targets are class labels "
                f"({_values(targets)}); use cross-entropy (binary: BCE with logits)",
                evidence,
            )
        if task == "regression":
            return None
        int_labels = targets.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8)
        broadcast = (
            width is not None
            and width > 1
            and targets.ndim == 1
            and _integer_valued(targets)
            and float(targets.min()) >= 0
            and float(targets.max()) < width
        )
        if int_labels or broadcast:
            detail = (
                f"; the model has {width} outputs per sample against 1 target, so the loss "
                "broadcasts them"
                if broadcast
                else ""
            )
            return (
                f"{kind} on integer class indices ({_values(targets)}){detail}: a regression loss "
                "treats classes as ordered numbers; use cross-entropy on one logit per class",
                evidence,
            )
        return None

    if kind in CLASS_INDEX_LOSSES:
        if task == "regression":
            return (
                f"a class-index loss ({kind}) for a regression task; use MSE/L1/Huber",
                evidence,
            )
        if not targets.is_floating_point():
            return None
        if is_probability_targets(targets, outputs):
            return None
        if _integer_valued(targets):
            return None  # float class indices: GW105 (targets-out-of-range) says cast them
        return (
            f"{kind} on continuous targets ({_values(targets)}): these are regression targets, "
            "not class indices; use MSE/L1/Huber with one output per target",
            evidence,
        )

    if kind in BCE_LOSSES:
        if task == "regression":
            in_unit = float(targets.min()) >= 0 and float(targets.max()) <= 1
            if not in_unit:
                return (
                    f"binary cross-entropy for a regression task with targets "
                    f"{float(targets.min()):.3g}..{float(targets.max()):.3g}; use MSE/L1/Huber",
                    evidence,
                )
            return None
        if task in ("multiclass", "lm") or multiclass_indices(targets):
            return (
                f"binary cross-entropy on multi-class indices ({_values(targets)}): BCE needs "
                "0/1 targets; use CrossEntropyLoss with one logit per class",
                evidence,
            )
    return None


def _values(t: torch.Tensor, k: int = 6) -> str:
    flat = t.flatten()
    flat = flat[flat != IGNORE_INDEX] if not t.is_floating_point() else flat
    values = torch.unique(flat)
    shown = ", ".join(f"{v:.4g}" for v in values[:k].tolist())
    more = f", ... {values.numel()} distinct" if values.numel() > k else ""
    return f"values {shown}{more}, dtype {str(t.dtype).removeprefix('torch.')}"


# ============================================================================ GW206


@rule(
    "GW206",
    "batchnorm-tiny-batch",
    "warning",
    "preflight",
    fixes=[
        "Replace BatchNorm with GroupNorm (CNNs) or LayerNorm (MLPs, sequences), which do not "
        "depend on the batch.",
        "Use a larger batch per step (at least 16, ideally 32+); note that gradient accumulation "
        "does not help BatchNorm, whose statistics come from each micro-batch.",
        "When fine-tuning a pretrained network with tiny batches, freeze the BatchNorm layers "
        "(eval mode and requires_grad=False) to keep their pretrained statistics.",
        "Across several GPUs, SyncBatchNorm computes the statistics over the global batch.",
    ],
    references=[
        "Wu & He 2018, 'Group Normalization' (BatchNorm error grows sharply below batch 8-16)",
        "Ioffe 2017, 'Batch Renormalization: Towards Reducing Minibatch Dependence in Batch-Normalized Models'",
        "Ioffe & Szegedy 2015, 'Batch Normalization'",
    ],
)
def batchnorm_tiny_batch(model: nn.Module, batch_size: int) -> Result:
    """BatchNorm layers are trained with batches too small for reliable batch statistics.

    ## Why it matters
    BatchNorm normalises with the mean and variance of the current batch. With a handful of
    samples those estimates are noisy, so training is noisy and the running statistics used at
    evaluation differ from what the network saw in training: validation accuracy drops (Wu & He
    2018: error rises steeply below 8 samples per batch); a batch of 1 is an error.

    ## How it is detected
    Detected when
    the model has BatchNorm layers that will train (in training mode; all of them if the whole
    model is still in eval mode, since training switches them on) and ``batch_size`` is below
    ``THRESHOLDS.min_batchnorm_batch``.
    """
    t = THRESHOLDS
    if batch_size >= t.min_batchnorm_batch:
        return None
    bns = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    training = [(n, m) for n, m in bns if m.training] if model.training else bns
    if not training:
        return None
    names = ", ".join(n or type(m).__name__ for n, m in training[:3])
    more = f" and {len(training) - 3} more" if len(training) > 3 else ""
    return (
        f"{len(training)} BatchNorm layers ({names}{more}) will normalise with batches of "
        f"{batch_size} samples (below {t.min_batchnorm_batch}): their statistics are too noisy; "
        "use GroupNorm/LayerNorm or a larger batch",
        {
            "batch_size": batch_size,
            "batchnorm_layers": len(training),
            "threshold": t.min_batchnorm_batch,
        },
    )


__all__ = [
    "LOSS_KINDS",
    "THRESHOLDS",
    "ModelThresholds",
    "activation_stds",
    "batchnorm_tiny_batch",
    "final_module",
    "loss_kind",
    "loss_task_mismatch",
    "output_producer",
    "poor_initialisation",
    "probabilities_to_logits_loss",
    "probe_forward",
]
