"""Validation metrics of the built-in tasks, streamed batch by batch in constant memory.

    m = TaskMetrics("multiclass", num_outputs=10, device=device)
    m.update(logits, targets)        # every validation batch: on the device, no host sync
    m.compute()                      # {"accuracy": ..., "f1": ..., "auroc": ..., "pr_auc": ...}
    m.reset()

Every state is a sum (counts, histograms, sums of squares) of fixed size, so memory stays constant
and the states of several ranks add up: under torch.distributed, :meth:`TaskMetrics.compute` sums
them over the ranks first (as torchmetrics syncs its states on compute). The definitions are
torchmetrics' (tests/test_metrics.py checks every value against it): accuracy at threshold 0.5 or
the argmax; F1 of the positive class (binary) or macro over classes (those neither predicted nor
present left out) and labels; AUROC and average precision from a confusion count at AUROC_BINS
fixed thresholds (linspace(0, 1)), one-vs-rest and macro for several classes or labels; MSE, MAE
and R2 (averaged over outputs); perplexity over the tokens whose target is not IGNORE_INDEX.
torchmetrics itself takes seconds to import (its package imports transformers and scipy), so
training never imports it unless you pass a torchmetrics metric of your own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gradwise.data.bundle import IGNORE_INDEX

AUROC_BINS = 200  # binned AUROC keeps memory constant; exact AUROC stores every prediction

NAMES = {
    "binary": ("accuracy", "f1", "auroc", "pr_auc"),
    "multiclass": ("accuracy", "f1", "auroc", "pr_auc"),
    "multilabel": ("accuracy", "f1", "auroc", "pr_auc"),
    "regression": ("mse", "mae", "r2"),
    "lm": ("perplexity",),
}


class TaskMetrics:
    """The validation metrics of task ``kind`` (see :data:`NAMES`) over ``num_outputs`` classes,
    labels or regression outputs. ``update`` takes the model's raw outputs: logits, already
    aligned to the targets' shape for binary and regression (``Task.align``)."""

    def __init__(self, kind: str, num_outputs: int | None, device: torch.device | str) -> None:
        if kind not in NAMES:
            raise ValueError(f"no built-in metrics for task {kind!r}")
        self.kind, self.device = kind, torch.device(device)
        self.width = max(int(num_outputs or 1), 1)
        # sums of floats in float64 where the device has it (MPS has not)
        self.real = torch.float32 if self.device.type == "mps" else torch.float64
        self.thresholds = torch.linspace(0, 1, AUROC_BINS, device=self.device)
        self._states: dict[str, torch.Tensor] = {}
        self._shape_states()

    # -- states ------------------------------------------------------------------------------

    def _state(self, name: str, size: int | tuple[int, ...], dtype: torch.dtype) -> None:
        self._states[name] = torch.zeros(size, dtype=dtype, device=self.device)

    def _shape_states(self) -> None:
        k, bins, count = self.width, AUROC_BINS + 1, torch.int64
        if self.kind in ("binary", "multiclass", "multilabel"):
            groups = 1 if self.kind == "binary" else k
            # per class or label: true positives, predicted and actual positives at the decision
            # threshold (0.5, or the argmax); correct predictions; samples
            for name in ("tp", "predicted", "actual", "correct"):
                self._state(name, groups, count)
            self._state("samples", (), count)
            # per class or label, the scores of positives and of negatives by bin: bin b holds
            # scores s with thresholds[b - 1] <= s < thresholds[b] (torch.bucketize, right=True)
            self._state("histogram", (2, groups, bins), count)
        elif self.kind == "regression":
            for name in ("squared_error", "absolute_error", "target_sum", "target_squares"):
                self._state(name, k, self.real)
            self._state("samples", (), count)
        else:
            self._state("nll", (), self.real)
            self._state("tokens", (), count)

    def states(self) -> list[torch.Tensor]:
        """The state tensors (fixed sizes, all sums)."""
        return list(self._states.values())

    def reset(self) -> None:
        for state in self._states.values():
            state.zero_()

    def to(self, device: torch.device | str) -> TaskMetrics:
        self.device = torch.device(device)
        self.thresholds = self.thresholds.to(self.device)
        self._states = {k: v.to(self.device) for k, v in self._states.items()}
        return self

    # -- update ------------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, out: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: raw outputs (logits; scores for regression) and targets."""
        out = out.detach().float()
        target = target.detach()
        if self.kind == "binary":
            self._classes(torch.sigmoid(out).reshape(-1, 1), target.reshape(-1, 1).long(), True)
        elif self.kind == "multiclass":
            probs = torch.softmax(out, dim=-1)
            k = probs.shape[-1]
            probs = probs.movedim(1, -1).reshape(-1, k) if probs.ndim > 2 else probs
            target = target.reshape(-1).long()
            self._classes(probs, F.one_hot(target, k), False)
        elif self.kind == "multilabel":
            probs, k = torch.sigmoid(out), out.shape[1]
            probs = probs.movedim(1, -1).reshape(-1, k)
            self._classes(probs, target.long().movedim(1, -1).reshape(-1, k), True)
        elif self.kind == "regression":
            self._regression(out, target.float())
        else:
            self._perplexity(out, target)

    def _classes(self, probs: torch.Tensor, truth: torch.Tensor, thresholded: bool) -> None:
        """probs [N, K] and 0/1 truth [N, K]: per column (the one class of binary, each class
        one-vs-rest, each label) the decision counts and the positives' and negatives' scores."""
        s = self._states
        n, k = probs.shape
        # binary, multilabel: positive above 0.5; multiclass: the argmax
        predicted = (probs > 0.5).long() if thresholded else F.one_hot(probs.argmax(dim=-1), k)
        s["tp"] += (predicted * truth).sum(0)
        s["predicted"] += predicted.sum(0)
        s["actual"] += truth.sum(0)
        s["correct"] += (predicted == truth).long().sum(0)
        s["samples"] += n
        bins = AUROC_BINS + 1
        which = torch.bucketize(probs, self.thresholds, right=True)  # 0..AUROC_BINS
        index = (1 - truth) * (k * bins) + torch.arange(k, device=probs.device) * bins + which
        flat = s["histogram"].view(-1)
        flat.scatter_add_(0, index.reshape(-1), torch.ones_like(index).reshape(-1))

    def _regression(self, out: torch.Tensor, target: torch.Tensor) -> None:
        s = self._states
        target = target.reshape(target.shape[0], -1) if target.ndim > 1 else target.reshape(-1, 1)
        out = out.reshape(target.shape)
        error = (out - target).to(self.real)
        target = target.to(self.real)
        s["squared_error"] += (error * error).sum(0)
        s["absolute_error"] += error.abs().sum(0)
        s["target_sum"] += target.sum(0)
        s["target_squares"] += (target * target).sum(0)
        s["samples"] += target.shape[0]

    def _perplexity(self, out: torch.Tensor, target: torch.Tensor) -> None:
        s = self._states
        logits = out.reshape(-1, out.shape[-1])
        target = target.reshape(-1)
        keep = target != IGNORE_INDEX
        logp = torch.log_softmax(logits, dim=-1)
        picked = logp.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1)
        s["nll"] -= torch.where(keep, picked, torch.zeros_like(picked)).sum().to(self.real)
        s["tokens"] += keep.sum()

    # -- compute -----------------------------------------------------------------------------

    def compute(self) -> dict[str, float]:
        """The metrics over everything updated since the last reset (summed over the ranks of a
        torch.distributed run)."""
        s = _all_sum(self._states)
        if self.kind in ("binary", "multiclass", "multilabel"):
            return self._compute_classes(s)
        if self.kind == "regression":
            return _regression_metrics(s)
        tokens = s["tokens"].to(self.real)
        return {"perplexity": float(torch.exp(s["nll"] / tokens))}

    def _compute_classes(self, s: dict[str, torch.Tensor]) -> dict[str, float]:
        real = self.real
        tp, predicted, actual = (s[k].to(real) for k in ("tp", "predicted", "actual"))
        fp, fn = predicted - tp, actual - tp
        f1 = _divide(2 * tp, 2 * tp + fp + fn)
        samples = s["samples"].to(real)
        if self.kind == "multiclass":
            accuracy = tp.sum() / samples.clamp(min=1)
            present = (tp + fp + fn) > 0  # torchmetrics leaves out classes never seen nor predicted
            f1 = _divide((f1 * present).sum(), present.sum().to(real))
        else:  # binary: the positive class; multilabel: the mean over labels
            accuracy = (s["correct"].to(real) / samples.clamp(min=1)).mean()
            f1 = f1.mean()
        auroc, ap = _binned_curves(s["histogram"].to(real))
        return {
            "accuracy": float(accuracy),
            "f1": float(f1),
            "auroc": float(auroc.mean()),
            "pr_auc": float(ap.mean()),
        }


def _binned_curves(histogram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AUROC and average precision per column from the score histograms [2, K, AUROC_BINS + 1]
    (positives, negatives), as torchmetrics computes them from its binned confusion counts."""
    positives, negatives = histogram[0], histogram[1]
    # at threshold t (index i): the scores >= t are the bins above i, so tp[i] = sum(bins i+1..)
    above = lambda h: h.flip(-1).cumsum(-1).flip(-1)[..., 1:]  # noqa: E731
    tp, fp = above(positives), above(negatives)
    fn, tn = positives.sum(-1, keepdim=True) - tp, negatives.sum(-1, keepdim=True) - fp
    tpr = _divide(tp, tp + fn).flip(-1)
    fpr = _divide(fp, fp + tn).flip(-1)
    auroc = torch.trapz(tpr, fpr, dim=-1)
    one = torch.ones_like(tp[..., :1])
    precision = torch.cat([torch.nan_to_num(tp / (tp + fp), nan=0.0), one], -1)
    recall = torch.cat([torch.nan_to_num(tp / (tp + fn), nan=0.0), 0 * one], -1)
    ap = -((recall[..., 1:] - recall[..., :-1]) * precision[..., :-1]).sum(-1)
    return auroc, ap


def _regression_metrics(s: dict[str, torch.Tensor]) -> dict[str, float]:
    n = s["samples"].to(s["squared_error"].dtype)
    values = n.clamp(min=1) * s["squared_error"].numel()
    rss, total = s["squared_error"], s["target_sum"]
    tss = s["target_squares"] - total * total / n.clamp(min=1)
    # as torchmetrics' R2Score: 1 where nothing is left to explain, 0 for constant targets
    moving = ~torch.isclose(rss, torch.zeros_like(rss), atol=1e-4)
    varied = ~torch.isclose(tss, torch.zeros_like(tss), atol=1e-4)
    r2 = torch.where(moving & varied, 1 - rss / torch.where(varied, tss, 1.0), 1.0)
    r2 = torch.where(moving & ~varied, 0.0, r2)
    return {
        "mse": float(s["squared_error"].sum() / values),
        "mae": float(s["absolute_error"].sum() / values),
        "r2": float(r2.mean()),
    }


def _divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 where den is 0."""
    return torch.where(den == 0, torch.zeros_like(num), num / torch.where(den == 0, 1, den))


def _all_sum(states: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The states summed over the ranks of an initialised process group (copies: the local states
    keep accumulating), or the states themselves."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return states
    summed = {}
    for name, state in states.items():
        state = state.clone()
        dist.all_reduce(state)
        summed[name] = state
    return summed
