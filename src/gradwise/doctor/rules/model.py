"""The GW2 family: the model, its loss, its initialisation and the training loop's set-up.

``loss_kind`` names the loss a training run uses; the checks take a batch's outputs and targets,
the model, the activation scales that :func:`activation_stds` measures, or what the live Doctor's
hooks saw (stale or reset gradients, parameters without gradients, frozen parts, ranks out of
sync, reused stateful modules, probes of the batch axis and of evaluation). Every threshold of
GW201-GW206 is in :data:`THRESHOLDS`; those of the set-up rules are the constants before them.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from gradwise._format import percent
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


def _with_thresholds(fn: Callable) -> Callable:
    """Fill the docstring's ``{name}`` fields with :data:`THRESHOLDS`: the rule's page (built
    from the docstring when ``@rule`` registers it, above this decorator) shows the values."""
    fn.__doc__ = (fn.__doc__ or "").format(**asdict(THRESHOLDS))
    return fn


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
@_with_thresholds
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
    {sigmoid_min_values} outputs all in [0, 1] spread over at least
    {sigmoid_min_span:g} (a single small batch of an untrained model is never enough).
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
@_with_thresholds
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
    the first's below {collapse_ratio:g}, or any later layer's above
    {explode_ratio:g}. Layers whose output is exactly zero while deeper layers are
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
@_with_thresholds
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
    {min_batchnorm_batch}.
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


# ============================================================================ set-up: the loop, the
# optimizer, frozen parts and ranks (GW202, GW203, GW207-GW210)

STALE_COSINE = 0.999
"""GW202: cosine between .grad and the gradient of this step's backward passes; 1.0 when zeroed."""
STALE_CHECKS = 2
"""GW202: consecutive checks that must show accumulation."""
NO_GRAD_STEPS = 20
"""GW207: steps after which a trainable parameter that never received a gradient is reported."""
BN_DRIFT = 1e-4
"""GW209: relative change of a frozen BatchNorm's running mean or variance between two sampled
steps above which it counts as moving (float rounding stays far below; one training-mode batch at
momentum 0.1 moves them by a tenth of the gap to the batch's statistics)."""
SYNC_RTOL = 1e-6
"""GW210: relative difference between two ranks' fingerprints of a tensor above which they differ
(replicas that DDP keeps in step are bitwise equal; this only forgives rounding in the last bits on
mixed hardware)."""


@rule(
    "GW202",
    "gradients-not-zeroed",
    "error",
    "live",
    explains=("GW301", "GW302", "GW305"),
    fixes=[
        "Call optimizer.zero_grad(set_to_none=True) once per optimizer step, before backward().",
        "If you accumulate gradients on purpose, declare it: Doctor(..., accumulation_steps=k) "
        "(the Trainer does this for train.accumulate), and divide the loss by k.",
    ],
    references=[
        "PyTorch FAQ: zero_grad, https://pytorch.org/docs/stable/generated/torch.optim.Optimizer.zero_grad.html"
    ],
)
def stale_gradients(cosines: list[float]) -> Result:
    """Gradients keep accumulating across steps: .grad still holds earlier steps' gradients.

    ## Why it matters
    backward() adds into .grad. Without zero_grad() every step applies the sum of all gradients so
    far, so updates grow and point in stale directions: training drifts or diverges.

    ## How it is detected
    A tensor hook on one weight records the gradient each backward pass computes; at
    ``doctor.step`` .grad is compared (by cosine, so clipping and loss scaling do not matter) with
    the sum of this step's backward passes. They differ when old gradients were not cleared.
    Under DDP, whose all-reduce replaces .grad with the mean over the ranks, the ranks exchange
    a fixed sample of their fresh gradients at each sampled step and .grad is compared with their
    mean; under FSDP2 (sharded gradients) the check is off.
    """
    recent = cosines[-STALE_CHECKS:]
    if len(recent) == STALE_CHECKS and max(recent) < STALE_COSINE:
        return (
            ".grad holds gradients from earlier steps: zero_grad() is not called between steps",
            {"cosine_to_fresh_gradient": recent[-1]},
        )
    return None


@rule(
    "GW203",
    "eval-in-train-mode",
    "warning",
    "live",
    when="manual",
    fixes=[
        "Call model.eval() before evaluating and model.train() before training again.",
        "Use torch.inference_mode() together with model.eval(): one turns off autograd, the other "
        "switches dropout and batch-norm behaviour.",
    ],
    references=[
        "PyTorch docs, Module.eval: https://pytorch.org/docs/stable/generated/torch.nn.Module.html#torch.nn.Module.eval"
    ],
)
def eval_in_train_mode(modules: list[str]) -> Result:
    """The model ran without gradients (evaluation) while dropout or batch-norm were in training mode.

    ## Why it matters
    In training mode dropout zeroes random units and batch-norm normalises with the batch's own
    statistics (and updates its running averages with evaluation data): evaluation numbers are
    noisy and wrong, and the model is silently changed by the evaluation.

    ## How it is detected
    A forward pre-hook on the model sees forward passes under ``torch.no_grad()``/``inference_mode``
    while the model is in training mode and contains dropout or batch-norm layers.
    """
    if not modules:
        return None
    return (
        f"evaluation ran with {len(modules)} dropout/batch-norm layers in training mode (e.g. {modules[0]})",
        {"modules_in_training_mode": len(modules)},
    )


@rule(
    "GW207",
    "params-without-gradients",
    "warning",
    "live",
    when="manual",
    fixes=[
        "Parameters unfrozen but not in the optimizer: rebuild the optimizer over every parameter "
        "that will ever train (frozen ones have no gradient, so AdamW and SGD skip them until "
        "they are unfrozen), or call optimizer.add_param_group({'params': [...]}) when you "
        "unfreeze them; gradwise's Trainer puts every parameter in the optimizer from the start.",
        "Pass all trainable parameters to the optimizer (model.parameters()), including layers "
        "added after the optimizer was built.",
        "In the optimizer but never a gradient: remove layers that are never used in forward(), "
        "or freeze them (requires_grad_(False)).",
        "Look for .detach(), .data, torch.no_grad() or integer casts that cut the graph.",
    ],
    references=[
        "PyTorch docs, Autograd mechanics: https://pytorch.org/docs/stable/notes/autograd.html",
        "PyTorch docs, Optimizer.add_param_group: https://pytorch.org/docs/stable/generated/torch.optim.Optimizer.add_param_group.html",
    ],
)
def params_without_gradients(
    never: list[str], not_in_optimizer: list[str], total: int, optimizer_known: bool = False
) -> Result:
    """Trainable parameters never receive a gradient, or the optimizer does not update them.

    ## Why it matters
    Such parameters never change: a layer that is unused, cut from the graph by a detach, or
    forgotten when the optimizer was built silently keeps its initial random values. A classic
    case in fine-tuning: the optimizer is built over the trainable parameters only, and layers
    unfrozen later (gradual unfreezing) are then trainable but not in it, so they never update.

    ## How it is detected
    Trainable parameters (``requires_grad``) that belong to none of the optimizer's parameter
    groups, checked at the first step and whenever the set of trainable parameters changes
    (unfrozen but not in the optimizer); and, after the first steps, trainable parameters whose
    ``.grad`` has always been None (in the optimizer but never a gradient: unused or detached).
    See also ``gradwise explain freezing-layers`` and ``gradwise explain gradual-unfreezing``.
    """
    if not_in_optimizer:
        return (
            f"{len(not_in_optimizer)} parameters are unfrozen (requires_grad) but not in the "
            f"optimizer (e.g. {not_in_optimizer[0]}): they will never update; rebuild the "
            "optimizer or add a param group",
            {"not_in_optimizer": len(not_in_optimizer), "trainable": total},
        )
    if never:
        where = "are in the optimizer but " if optimizer_known else ""
        return (
            f"{len(never)} trainable parameters {where}never received a gradient "
            f"(e.g. {never[0]}): unused in forward() or cut from the graph",
            {"without_gradient": len(never), "trainable": total},
        )
    return None


@rule(
    "GW208",
    "frozen-by-mistake",
    "warning",
    "live",
    when="manual",
    fixes=[
        "Unfreeze what must learn: module.requires_grad_(True), above all a new head sized for "
        "your classes (in gradwise: finetune.unfreeze: [head] or the module's path).",
        'Freeze only what you mean to, by name: finetune.freeze: ["features.*"] in a recipe, or '
        "tell the doctor what you froze on purpose: Doctor(..., frozen_on_purpose=names).",
        "If nothing is trainable, check for a leftover requires_grad_(False) on the whole model "
        "(or a model loaded for inference) and count trainable parameters before training.",
    ],
    references=[
        "Yosinski et al. 2014, How transferable are features in deep neural networks?, arXiv:1411.1792",
        "PyTorch docs, Module.requires_grad_: https://pytorch.org/docs/stable/generated/torch.nn.Module.html#torch.nn.Module.requires_grad_",
    ],
)
def frozen_by_mistake(
    total: int, trainable: int, output_layer: str | None, undeclared: list[str]
) -> Result:
    """Parameters that should train are frozen: all of them, the output layer, or undeclared parts.

    ## Why it matters
    A frozen parameter never changes. With every parameter frozen nothing trains (backward()
    fails or the loss stays where it started); with the output layer frozen, a new head keeps
    its random initialisation and the rest of the network must learn to serve random outputs;
    a module frozen by a stray ``requires_grad_(False)`` (a copied fine-tuning snippet, a model
    loaded for inference) silently trains less than intended.

    ## How it is detected
    When the Doctor is built, at the first step and whenever the set of trainable parameters
    changes: no parameter has ``requires_grad``; or the output layer (the last module with
    parameters to run in the forward pass) has all of its parameters frozen while others train
    (not reported for models with PEFT adapters, whose frozen head is by design, unless
    declared otherwise); or, when the caller declared ``frozen_on_purpose`` (parameter names,
    module paths or globs; gradwise's Trainer passes what the recipe's ``finetune`` section
    froze), frozen parameters outside it. See also ``gradwise explain freezing-layers``.
    """
    if total and not trainable:
        return (
            f"every one of the {total:,} parameters is frozen (requires_grad=False): nothing "
            "will train",
            {"trainable": 0, "total": total},
        )
    if output_layer is not None:
        return (
            f"the output layer {output_layer} is frozen while {trainable:,} other parameters "
            "train: it keeps its initial weights; unfreeze it",
            {"trainable": trainable, "total": total, "undeclared_frozen": len(undeclared)},
        )
    if undeclared:
        return (
            f"{len(undeclared)} parameters are frozen but not declared frozen on purpose "
            f"(e.g. {undeclared[0]}): they will not train",
            {"trainable": trainable, "total": total, "undeclared_frozen": len(undeclared)},
        )
    return None


@rule(
    "GW209",
    "frozen-batchnorm-drift",
    "warning",
    "live",
    when="manual",
    fixes=[
        "Keep BatchNorm layers of a frozen backbone in eval mode: gradwise does this with "
        "finetune.freeze_bn: true (the default); in your loop, call module.eval() on them after "
        "every model.train() (or override train() in your model).",
        "If the statistics should adapt to the new data (a large domain shift with big batches), "
        "unfreeze the BatchNorm parameters too and ignore this rule (doctor.ignore: [GW209]).",
    ],
    references=[
        "Ioffe & Szegedy 2015, Batch Normalization, arXiv:1502.03167 (running averages for inference)",
        "PyTorch docs, BatchNorm2d (running statistics are updated in training mode): https://pytorch.org/docs/stable/generated/torch.nn.BatchNorm2d.html",
        "Kolesnikov et al. 2020, Big Transfer (BiT): General Visual Representation Learning, arXiv:1912.11370",
    ],
)
def frozen_batchnorm_drift(drifts: dict[str, float]) -> Result:
    """BatchNorm layers of a frozen backbone run in training mode: their running statistics drift.

    ## Why it matters
    Freezing a BatchNorm layer's weight and bias does not freeze its running mean and variance:
    those are buffers that every training-mode forward pass moves toward the current batch's
    statistics, and in training mode the layer also normalises with the batch's statistics
    instead of the pretrained ones. The "frozen" backbone changes, most with small batches and a
    shifted domain, and evaluation (which uses the drifted averages) disagrees with what the head
    was trained on.

    ## How it is detected
    At each sampled step, the running mean and variance of every BatchNorm whose affine
    parameters are all frozen are compared with their values at the previous sampled step;
    a relative change above 1e-4 (``BN_DRIFT``) means the layer ran in training mode in between. See
    also ``gradwise explain freezing-layers`` and ``gradwise explain batch-normalization``.
    """
    moved = {name: d for name, d in drifts.items() if d > BN_DRIFT}
    if not moved:
        return None
    worst = max(moved, key=moved.__getitem__)
    return (
        f"{len(moved)} BatchNorm layers with frozen weights run in training mode (e.g. {worst}): "
        f"their running statistics moved by {percent(moved[worst])} since the last sample; keep "
        "them in eval mode (finetune.freeze_bn: true, or module.eval())",
        {"drifting_layers": len(moved), "max_relative_drift": moved[worst]},
    )


@rule(
    "GW210",
    "ranks-out-of-sync",
    "error",
    "live",
    when="manual",
    fixes=[
        "Build the model identically on every rank: seed every rank with the same seed before "
        "creating it (not seed + rank), and wrap it in DDP before training (DDP broadcasts rank "
        "0's parameters and buffers when it is built).",
        "Change parameters only through DDP's backward and the optimizer: an in-place edit on "
        "one rank (under torch.no_grad(), .data, a rank-dependent re-initialisation, weight tying "
        "redone after wrapping) is never undone; do it on every rank, or before wrapping.",
        "Keep buffers in step: leave DistributedDataParallel(broadcast_buffers=True) (the "
        "default), or use SyncBatchNorm; a rank-dependent buffer (a mask, a cache) must be built "
        "from the same seed on every rank.",
        "Parameters used on some steps only: DistributedDataParallel(find_unused_parameters=True), "
        "or remove them; a parameter without a gradient on one rank is not averaged.",
        "Ranks at different steps: give every rank the same number of batches (DistributedSampler "
        "pads or drop_last=True), or use torch.distributed.algorithms.Join for uneven inputs.",
        "A non-finite loss on one rank only: look at that rank's shard of the data (gradwise "
        "explain GW101) and at non-deterministic or rank-dependent operations; with a NaN on one "
        "rank the all-reduced gradients are NaN everywhere.",
    ],
    references=[
        "PyTorch docs, DistributedDataParallel: https://pytorch.org/docs/stable/generated/torch.nn.parallel.DistributedDataParallel.html",
        "Li et al. 2020, PyTorch Distributed: Experiences on Accelerating Data Parallel Training, arXiv:2006.15704",
        "PyTorch docs, Join (uneven inputs): https://pytorch.org/docs/stable/distributed.algorithms.join.html",
    ],
)
def ranks_out_of_sync(
    steps: list[int],
    names: list[str] | None = None,
    fingerprints: list[list[float]] | None = None,
    loss_finite: list[bool] | None = None,
) -> Result:
    """The ranks of a data-parallel run disagree: different parameters, steps or a non-finite loss.

    ## Why it matters
    Data parallelism is only correct while every rank holds the same model: DDP averages the
    gradients but never compares the weights, so replicas that drift apart (a rank-dependent seed,
    a parameter changed on one rank outside DDP, a buffer that is not broadcast) keep training
    different models, silently; the checkpoint is rank 0's, and the others' work is partly lost.
    Ranks that call the training step a different number of times pair the wrong collectives and
    hang; a non-finite loss on one rank turns every rank's averaged gradient into NaN.

    ## How it is detected
    At every sampled step each rank sums a fixed sample of the entries of every parameter (and of
    every floating-point buffer other than BatchNorm's running statistics, which are per-rank by
    design without SyncBatchNorm) and their squares, in float64; the ranks exchange these
    fingerprints with their step counts and whether their losses were finite, and compare them with
    rank 0's. Parameters are compared when the model is wrapped in DDP, or when every rank held
    the same parameters at the first sampled step (the ranks are replicas); FSDP2's shards differ
    by design and are not compared. See also ``gradwise explain ddp`` and ``gradwise explain fsdp``.
    """
    world = len(steps)
    behind = [r for r in range(1, world) if steps[r] != steps[0]]
    if behind:
        r = behind[0]
        return (
            f"rank {r} is at step {steps[r]} while rank 0 is at step {steps[0]}: the ranks call "
            "the training step a different number of times (uneven data?)",
            {"rank": r, "step_difference": steps[r] - steps[0], "world_size": world},
        )
    if names and fingerprints:
        differ = _differing(names, fingerprints)
        if differ:
            r, index, gap = differ[0]
            which = (
                f"rank {r}" if len(differ) == 1 else "ranks " + ", ".join(str(d[0]) for d in differ)
            )
            verb = "holds" if len(differ) == 1 else "hold"
            return (
                f"{which} {verb} a different model from rank 0, first at {names[index]} (relative "
                f"difference {gap:.2g}): the replicas have drifted apart",
                {"rank": r, "ranks_out_of_sync": len(differ), "relative_difference": gap,
                 "world_size": world},
            )  # fmt: skip
    if loss_finite and not all(loss_finite) and any(loss_finite):
        bad = [r for r, ok in enumerate(loss_finite) if not ok]
        which = f"rank {bad[0]}" if len(bad) == 1 else "ranks " + ", ".join(map(str, bad))
        return (
            f"the loss is not finite on {which} while it is finite on the other ranks",
            {"rank": bad[0], "nonfinite_ranks": len(bad), "world_size": world},
        )
    return None


def _differing(names: list[str], fingerprints: list[list[float]]) -> list[tuple[int, int, float]]:
    """(rank, index of the first differing tensor, relative difference) for each rank whose
    fingerprints differ from rank 0's; a fingerprint is (entries, sum, sum of squares) per tensor."""
    ref = fingerprints[0]
    out = []
    for r, fp in enumerate(fingerprints[1:], 1):
        for i in range(len(names)):
            n, s0, q0 = ref[3 * i : 3 * i + 3]
            _, s1, q1 = fp[3 * i : 3 * i + 3]
            if _same(s0, s1) and _same(q0, q1):  # equal, or non-finite alike (both diverged)
                continue
            scale = max(math.sqrt(n * max(q0, q1)), 1e-30)  # bounds the sum of |x|
            gap = max(abs(s1 - s0) / scale, abs(q1 - q0) / max(q0, q1, 1e-30))
            if not gap <= SYNC_RTOL:  # NaN differs too
                out.append((r, i, gap))
                break
    return out


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


# ============================================================================ what the loop and the
# model's structure do to samples, state and gradients (GW211-GW217)

ELEMENTWISE_LOSSES = ("mse", "l1", "huber", "bce", "bce_logits")
"""Losses computed per element: their input and target must have the same shape."""
RESET_RATIO = 1e-3
"""GW216: |1 - ||.grad|| / ||this micro-batch's gradient||| below which .grad holds that gradient
alone (a sum over two or more micro-batches differs by far more, unless gradients cancel)."""
RESET_COSINE = 0.9999
"""GW216: ... and the cosine above which they point the same way."""
RESET_CHECKS = 2
"""GW216: micro-batches inside accumulation windows that must all show the reset."""


@rule(
    "GW211",
    "batch-axis-mixing",
    "error",
    "preflight",
    when="first",
    fixes=[
        "Recurrent layers: nn.LSTM/GRU/RNN expect (time, batch, features) unless built with "
        "batch_first=True; pass batch_first=True (or transpose the input) when your tensors are "
        "(batch, time, features).",
        "Softmax, normalisation and reductions: take them over the feature or class dimension "
        "(dim=-1 or dim=1), never over dim=0, the batch.",
        "If mixing is intended (BatchNorm in training mode, contrastive losses, attention across "
        "a set), ignore this rule: doctor.ignore: [GW211].",
    ],
    references=[
        "PyTorch docs, nn.LSTM (batch_first: 'If True, then the input and output tensors are "
        "provided as (batch, seq, feature)'): https://pytorch.org/docs/stable/generated/torch.nn.LSTM.html",
        "Karpathy 2019, A Recipe for Training Neural Networks ('use backprop to chart "
        "dependencies': a sample's gradient must not touch other samples)",
        "Reported cases: https://github.com/yunjey/pytorch-tutorial/issues/196, "
        "https://github.com/MicrosoftDocs/pytorchfundamentals/issues/4",
    ],
)
def batch_axis_mixing(mixing: dict[str, float]) -> Result:
    """Samples mix across the batch axis: one sample's output depends on the others in its batch.

    ## Why it matters
    A model must compute each sample's prediction from that sample alone (in evaluation mode).
    When the batch axis is mixed, by a recurrent layer that takes the batch for time or a softmax
    over dim 0, every prediction depends on which other samples share its batch: training learns
    from the wrong dependencies, and predictions change with the batch size and order, so a model
    that looked fine in training is wrong one sample at a time.

    ## How it is detected
    A probe at the first step (and in ``gradwise check``): in eval mode and without gradients, the
    model runs on up to 16 rows of the batch, on the same rows permuted, and on their first half;
    each sample's output must be the same in all three, up to rounding.
    """
    tolerance = mixing["tolerance"]
    moved = max(mixing["permuted"], mixing["halved"])
    if moved <= tolerance:
        return None
    how = "permuted" if mixing["permuted"] >= mixing["halved"] else "halved"
    return (
        f"each sample's output changes when the batch is {how} (by {moved:.2g} of the outputs' "
        f"scale; rounding is below {tolerance:.0e}): samples mix across the batch axis; look for "
        "an RNN without batch_first=True, or a softmax/normalisation over dim 0",
        {"permuted_change": mixing["permuted"], "halved_change": mixing["halved"]},
    )


@rule(
    "GW212",
    "stateful-module-reused",
    "warning",
    "live",
    when="first",
    fixes=[
        "Give every position its own normalisation layer: self.bn1, self.bn2, ... (or a "
        "ModuleList), instead of calling one BatchNorm module at several depths.",
        "Stateless modules (ReLU, Dropout, pooling) may be reused freely; modules with running "
        "statistics may not.",
    ],
    references=[
        "Ioffe & Szegedy 2015, Batch Normalization, arXiv:1502.03167 (running averages per layer)",
        "A reported case: eval() far worse than train() with one BatchNorm shared by several "
        "iterations, https://github.com/pytorch/pytorch/issues/1738",
    ],
)
def stateful_module_reused(reused: dict[str, int]) -> Result:
    """A module with running statistics (BatchNorm) is called at several depths in one forward pass.

    ## Why it matters
    A BatchNorm layer's running mean and variance are one set of averages. Called after several
    layers, it averages the statistics of all of them (and its affine parameters are shared):
    training normalises each depth with its own batch statistics, but evaluation uses the mixed
    running averages, so eval-mode outputs are wrong although training looked fine.

    ## How it is detected
    In the first forward pass, a counting hook on every module with running statistics and on the
    modules that contain it: one called more often than the nearest enclosing module that ran is
    reused inside it (a whole encoder reused, as in Siamese networks, calls both equally and is
    not reported).
    """
    if not reused:
        return None
    name, calls = max(reused.items(), key=lambda kv: kv[1])
    return (
        f"{name} is called {calls} times in one forward pass: one set of running statistics "
        "averages several depths, so evaluation normalises with the wrong statistics; give each "
        "position its own layer",
        {"reused_modules": len(reused), "calls": calls},
    )


@rule(
    "GW213",
    "stochastic-evaluation",
    "warning",
    "live",
    when="manual",
    fixes=[
        "Pass the module's mode to functional dropout: F.dropout(x, p, training=self.training) "
        "(its default is training=True), or use an nn.Dropout module, which model.eval() switches off.",
        "Other randomness in forward (torch.rand, noise injection, sampling) must also check "
        "self.training.",
        "If the model is stochastic on purpose (MC dropout, a VAE's sampling), ignore this rule: "
        "doctor.ignore: [GW213].",
    ],
    references=[
        "PyTorch docs, torch.nn.functional.dropout (training=True by default): https://pytorch.org/docs/stable/generated/torch.nn.functional.dropout.html",
        "A reported case: https://github.com/pytorch/pytorch/issues/11999",
    ],
)
def stochastic_evaluation(repeat: dict[str, float]) -> Result:
    """Evaluation is random: two eval-mode passes over the same inputs give different outputs.

    ## Why it matters
    model.eval() switches off dropout modules, but not ``F.dropout(x, p)`` (its ``training``
    argument defaults to True) nor other randomness in forward(). Validation metrics are then
    noisy and biased downward, checkpoints are chosen by noise, and the deployed model answers
    the same request differently.

    ## How it is detected
    At the first forward pass in eval mode without gradients (a validation), the Doctor runs the
    model a second time on the same inputs (random generators restored afterwards) and compares.
    """
    if repeat["difference"] <= repeat["tolerance"]:
        return None
    return (
        f"two eval-mode passes over the same inputs differ by {repeat['difference']:.2g} of the "
        "outputs' scale: something random runs in evaluation (F.dropout without "
        "training=self.training?)",
        {"difference": repeat["difference"]},
    )


@rule(
    "GW214",
    "requires-grad-attribute",
    "error",
    "preflight",
    when="first",
    fixes=[
        "Freeze with the method: module.requires_grad_(False), or set it on each parameter: "
        "for p in module.parameters(): p.requires_grad = False.",
        "Remove the attribute (del module.requires_grad) so that nobody reads it as the truth.",
    ],
    references=[
        "PyTorch docs, Module.requires_grad_: https://pytorch.org/docs/stable/generated/torch.nn.Module.html#torch.nn.Module.requires_grad_",
        "A reported case: https://github.com/CSCYQJ/MICCAI23-ProtoContra-SFDA/issues/18",
    ],
)
def requires_grad_attribute(model: Any) -> Result:
    """``module.requires_grad = False`` was set on a Module: it freezes nothing.

    ## Why it matters
    ``requires_grad`` is a property of tensors. Assigned on an ``nn.Module`` it just creates a
    plain Python attribute: every parameter inside still trains. The layers you meant to freeze
    change, and the optimizer spends memory and time on them.

    ## How it is detected
    At the first step, any module whose instance dictionary holds a ``requires_grad`` attribute
    while some of its parameters still require gradients.
    """
    stray = [
        name or type(module).__name__
        for name, module in model.named_modules()
        if "requires_grad" in vars(module)
        and not vars(module)["requires_grad"]
        and any(p.requires_grad for p in module.parameters())
    ]
    if not stray:
        return None
    return (
        f"{stray[0]}.requires_grad = False is a plain attribute on a Module: its parameters "
        "still train; use requires_grad_(False)",
        {"modules": len(stray)},
    )


@rule(
    "GW215",
    "broadcast-loss-shapes",
    "error",
    "preflight",
    when="first",  # shapes do not change between steps
    explains=("GW307", "GW402"),
    fixes=[
        "Make the output and the target the same shape before the loss: out.squeeze(-1) for a "
        "(N, 1) output against (N,) targets, or targets.unsqueeze(-1).",
        "Turn PyTorch's 'Using a target size that is different to the input size' warning into "
        "an error while developing: warnings.simplefilter('error').",
    ],
    references=[
        "PyTorch docs, broadcasting semantics: https://pytorch.org/docs/stable/notes/broadcasting.html",
        "A reported case: https://github.com/pytorch/pytorch/issues/16413",
    ],
)
def broadcast_loss_shapes(
    outputs: torch.Tensor,
    targets: torch.Tensor,
    loss_kind: str,
    loss_graph: Any = None,
    loss_value: float | None = None,
) -> Result:
    """An element-wise loss compares outputs and targets of different shapes that broadcast.

    ## Why it matters
    MSE, L1 and BCE compare their inputs element by element, broadcasting them to a common shape
    first: an (N, 1) output against (N,) targets becomes an (N, N) comparison of every output
    with every target. The loss then rewards predicting the batch mean: the model trains, the
    loss falls a little, and it never learns the task.

    ## How it is detected
    The batch's outputs and targets have different shapes that broadcast to a larger one, for a
    loss of an element-wise kind; and the loss's autograd graph shows the expansion, or the
    loss's value equals the broadcast loss (so the outputs passed to the Doctor are the ones the
    loss saw).
    """
    if loss_kind not in ELEMENTWISE_LOSSES or outputs.shape == targets.shape:
        return None
    try:
        common = torch.broadcast_shapes(outputs.shape, targets.shape)
    except RuntimeError:
        return None
    if math.prod(common) <= max(outputs.numel(), targets.numel()):
        return None
    confirmed = bool(getattr(loss_graph, "broadcast", False))
    if not confirmed and loss_value is not None:
        from gradwise.doctor.graph import kind_from_value

        confirmed = kind_from_value(loss_value, outputs, targets) == loss_kind
    if not confirmed:
        return None
    return (
        f"the loss compares outputs of shape {tuple(outputs.shape)} with targets of shape "
        f"{tuple(targets.shape)}, broadcast to {tuple(common)}: every output is compared with "
        "every target; make the shapes equal (e.g. outputs.squeeze(-1))",
        {"broadcast_elements": math.prod(common), "outputs": outputs.numel()},
    )


@rule(
    "GW216",
    "zero-grad-in-accumulation",
    "error",
    "live",
    when="batch",
    fixes=[
        "Call optimizer.zero_grad() once per optimizer step, after optimizer.step(), not before "
        "every micro-batch's backward().",
        "The pattern: loss = loss_fn(model(x), y) / k; loss.backward(); every k micro-batches: "
        "optimizer.step(); optimizer.zero_grad().",
    ],
    references=[
        "A reported case: https://github.com/bytetriper/RAE/issues/67",
        "Hugging Face Accelerate docs, gradient accumulation: https://huggingface.co/docs/accelerate/usage_guides/gradient_accumulation",
    ],
)
def zero_grad_in_accumulation(accumulation: list[tuple[int, float, float]]) -> Result:
    """Gradients are reset inside an accumulation window: only the last micro-batch counts.

    ## Why it matters
    Gradient accumulation sums k micro-batches' gradients before one optimizer step, to train
    with an effective batch k times larger. A ``zero_grad()`` before each backward() throws the
    sum away: each step uses the last micro-batch alone, so the effective batch is k times
    smaller than intended, and with a loss divided by k, the learning rate is too.

    ## How it is detected
    With ``accumulation_steps`` > 1, a tensor hook on one weight records each micro-batch's
    gradient; at micro-batches past the first of a window, .grad must hold more than the latest
    micro-batch's gradient. Equal norm and direction at every such check: the sum was reset.
    """
    inside = [a for a in accumulation if a[0] > 0]
    if len(inside) < RESET_CHECKS:
        return None
    if all(abs(1 - ratio) < RESET_RATIO and cos > RESET_COSINE for _, ratio, cos in inside):
        return (
            f"at {len(inside)} micro-batches inside accumulation windows .grad held only the "
            "latest micro-batch's gradient: zero_grad() runs before every backward(), so only "
            "the last micro-batch of each window counts",
            {"checks": len(inside), "grad_to_fresh": inside[-1][1]},
        )
    return None


@rule(
    "GW217",
    "orphan-trainable-tensors",
    "error",
    "live",
    when="first",
    fixes=[
        "Register trainable tensors on the model: nn.Parameter attributes, nn.ParameterList or "
        "nn.ModuleList instead of plain Python lists, so model.parameters() (and the optimizer, "
        "checkpoints and .to(device)) see them.",
        "Or pass them to the optimizer explicitly: torch.optim.AdamW([*model.parameters(), *extra]).",
    ],
    references=[
        "PyTorch docs, nn.ParameterList ('a plain Python list is not registered'): https://pytorch.org/docs/stable/generated/torch.nn.ParameterList.html",
        "Reported cases: https://github.com/pytorch/pytorch/issues/715, "
        "https://github.com/automan000/Convolutional_LSTM_PyTorch/issues/17",
    ],
)
def orphan_trainable_tensors(loss_graph: Any, model: Any, optimizer: Any) -> Result:
    """The loss trains tensors that neither the model nor the optimizer holds: they never update.

    ## Why it matters
    Tensors with ``requires_grad`` kept in a plain Python list or dict (not ``nn.ParameterList``)
    get gradients, but they are not in ``model.parameters()``, so the optimizer built from it
    never updates them, checkpoints do not save them and ``.to(device)`` does not move them.

    ## How it is detected
    At the first step, the loss's autograd graph is walked to its leaves (``AccumulateGrad``
    nodes): leaves that require gradients and are neither among the model's parameters nor in
    any of the optimizer's parameter groups.
    """
    held = {id(p) for p in model.parameters()}
    held |= {id(p) for group in optimizer.param_groups for p in group["params"]}
    orphans = [t for t in loss_graph.leaves if t.requires_grad and id(t) not in held]
    if not orphans:
        return None
    size = sum(t.numel() for t in orphans)
    shapes = ", ".join(str(tuple(t.shape)) for t in orphans[:3])
    return (
        f"{len(orphans)} tensors that the loss trains ({size:,} values; shapes {shapes}) are "
        "neither model parameters nor in the optimizer: they never update; register them "
        "(nn.Parameter, nn.ParameterList)",
        {"orphan_tensors": len(orphans), "orphan_values": size},
    )
