"""Tasks: what is learned, which loss trains it, which metrics judge it.

One table (``TASKS``) says, for each task, its loss, its validation metrics (gradwise.metrics,
updated batch by batch with constant memory) and the metric that picks the best checkpoint.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from gradwise.data.bundle import IGNORE_INDEX, DataInfo
from gradwise.errors import ConfigError, DataError
from gradwise.metrics import AUROC_BINS, TaskMetrics
from gradwise.registry import import_path

__all__ = ["AUROC_BINS", "TASKS", "Metrics", "Task"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TaskKind:
    """One row of the task table."""

    name: str
    default_loss: str
    monitor: str  # validation metric that picks the best checkpoint
    description: str
    metrics: tuple[str, ...] = ()  # validation metrics besides the loss (val_<name>)


CLASSIFICATION = ("accuracy", "f1", "auroc", "pr_auc")
"""f1 is the positive class's F1 for binary tasks, macro F1 (every class weighs the same) for
multiclass and multilabel; pr_auc is the average precision (the area under the precision-recall
curve): the positive class's for binary tasks, the macro average over classes or labels otherwise."""

TASKS: dict[str, TaskKind] = {
    t.name: t
    for t in [
        TaskKind(
            "binary",
            "bce",
            "val_accuracy",
            "one logit (or two) per sample, targets 0/1",
            CLASSIFICATION,
        ),
        TaskKind(
            "multiclass",
            "cross_entropy",
            "val_accuracy",
            "C logits, integer class targets",
            CLASSIFICATION,
        ),
        TaskKind("multilabel", "bce", "val_f1", "L logits, 0/1 target per label", CLASSIFICATION),
        TaskKind("regression", "mse", "val_loss", "real-valued targets", ("mse", "mae", "r2")),
        TaskKind(
            "lm",
            "cross_entropy",
            "val_perplexity",
            "next-token prediction over a vocabulary",
            ("perplexity",),
        ),
        TaskKind("custom", "custom", "val_loss", "your loss function; validation loss only"),
    ]
}

# Direction of every metric gradwise computes (for monitor mode "auto").
METRIC_MODES: dict[str, str] = {
    "loss": "min",
    "accuracy": "max",
    "f1": "max",
    "auroc": "max",
    "pr_auc": "max",
    "mse": "min",
    "mae": "min",
    "r2": "max",
    "perplexity": "min",
}


IMBALANCED_MONITOR: dict[str, tuple[str, str, str]] = {
    # problem: (metric, its name in words, why it, and not accuracy, judges an imbalanced problem)
    "two_classes": (
        "pr_auc",
        "PR-AUC (average precision)",
        "it scores how well the rare class is ranked above the common one, at every threshold, "
        "and a model that never predicts the rare class scores its prevalence, near 0 "
        "(Saito & Rehmsmeier 2015; Davis & Goadrich 2006)",
    ),
    "classes": (
        "f1",
        "macro F1",
        "every class weighs the same in it, so a model that ignores the rare classes scores "
        "poorly however many common samples it gets right (Sokolova & Lapalme 2009)",
    ),
    "labels": (
        "f1",
        "macro F1",
        "every label weighs the same in it, so rarely positive labels count as much as the "
        "common ones (Sokolova & Lapalme 2009)",
    ),
}
"""The metric that picks the best checkpoint and stops early when classes are imbalanced (the
doctor's GW103 says when: :data:`gradwise.doctor.rules.data.THRESHOLDS`). One table, read by the
advisor (``early_stopping.monitor``) and by GW103's advice, so the two always name the same metric.
Accuracy is not on it: on 66:1 data, always predicting the majority scores 98.5%."""


def imbalanced_monitor(num_classes: int | None, multilabel: bool = False) -> tuple[str, str, str]:
    """(metric, name in words, why) for an imbalanced problem with ``num_classes`` classes (or
    labels): PR-AUC for two classes, macro F1 for more, macro F1 over labels for multilabel."""
    if multilabel:
        return IMBALANCED_MONITOR["labels"]
    return IMBALANCED_MONITOR["two_classes" if (num_classes or 2) <= 2 else "classes"]


def resolve_kind(task: str, info: DataInfo | None) -> str:
    """The concrete task: 'auto' and 'classification' are settled by what the targets look like."""
    if task in TASKS:
        return task
    suggested = info.task if info is not None else None
    if suggested is None:
        raise ConfigError(
            "task", task, f"one of {', '.join(TASKS)}", "gradwise could not tell from the data"
        )
    if task == "classification" and suggested not in ("binary", "multiclass", "multilabel"):
        raise ConfigError(
            "task",
            task,
            "targets that are class labels",
            f"the targets look like a {suggested} task (dtype {info.target_dtype}); set task={suggested}",
        )
    return suggested


def num_outputs(kind: str, info: DataInfo | None) -> int | None:
    """Width of the model's output layer for this task."""
    if info is None:
        return None
    if kind == "binary":
        return 1
    if kind == "multiclass":
        return info.num_classes
    if kind == "multilabel":
        return info.target_shape[-1] if info.target_shape else None
    if kind == "regression":
        return math.prod(info.target_shape) if info.target_shape else 1
    if kind == "lm":
        return info.vocab_size
    return None


class Task:
    """Loss, sample counting and metrics for one concrete task."""

    def __init__(
        self,
        kind: str,
        num_outputs: int | None,
        *,
        loss: str | LossFn = "auto",
        label_smoothing: float = 0.0,
        class_weights: torch.Tensor | None = None,
        focal_gamma: float = 2.0,
        trusted: bool = True,
    ) -> None:
        self.kind = kind
        self.spec = TASKS[kind]
        self.num_outputs = num_outputs
        self.label_smoothing = label_smoothing
        self.focal_gamma = focal_gamma
        self.loss_name, self._custom = self._pick_loss(loss, trusted)
        if class_weights is not None and kind not in ("binary", "multiclass", "multilabel"):
            raise ConfigError(
                "train.class_weights", "balanced", "a classification task", f"this is {kind}"
            )
        self.class_weights = class_weights

    def _pick_loss(self, loss: str | LossFn, trusted: bool) -> tuple[str, LossFn | None]:
        if callable(loss):
            return "custom", loss
        if loss == "auto":
            if self.kind == "custom":
                raise ConfigError(
                    "train.loss",
                    loss,
                    "a loss for task=custom",
                    "pass loss_fn= or train.loss='module:fn'",
                )
            return self.spec.default_loss, None
        if loss in ("mse", "mae", "huber"):
            if self.kind != "regression" and self.kind != "custom":
                raise ConfigError("train.loss", loss, f"a loss that fits task={self.kind}")
            return loss, None
        if loss == "focal":
            if self.kind not in ("binary", "multiclass", "multilabel"):
                raise ConfigError(
                    "train.loss", loss, "a classification task", f"this is {self.kind}"
                )
            return loss, None
        if ":" in loss:
            return "custom", import_path(loss, "train.loss", trusted=trusted)
        raise ConfigError(
            "train.loss", loss, "auto, focal, mse, mae, huber or an import path 'module:fn'"
        )

    # -- loss --------------------------------------------------------------------------------

    def loss(self, out: torch.Tensor, target: torch.Tensor, *, train: bool = True) -> torch.Tensor:
        """Mean loss over the batch (over tokens for lm). Label smoothing only while training."""
        smoothing = self.label_smoothing if train else 0.0
        name = self.loss_name
        if self._custom is not None:
            return self._custom(out, target)
        if name == "cross_entropy":
            if self.kind == "lm":
                return F.cross_entropy(
                    out.flatten(0, -2).float(),
                    target.flatten(),
                    ignore_index=IGNORE_INDEX,
                    label_smoothing=smoothing,
                )
            return F.cross_entropy(
                out.float(), target, weight=self._weights(out), label_smoothing=smoothing
            )
        if name == "focal":
            return self._focal(out, target, smoothing)
        if name == "bce":
            target = target.float()
            if smoothing:
                target = target * (1 - smoothing) + 0.5 * smoothing
            return F.binary_cross_entropy_with_logits(
                self.align(out, target).float(), target, pos_weight=self._pos_weight(out)
            )
        out = self.align(out, target).float()
        target = target.float()
        if name == "mse":
            return F.mse_loss(out, target)
        if name == "mae":
            return F.l1_loss(out, target)
        return F.huber_loss(out, target)

    def _weights(self, out: torch.Tensor) -> torch.Tensor | None:
        return None if self.class_weights is None else self.class_weights.to(out.device)

    def _pos_weight(self, out: torch.Tensor) -> torch.Tensor | None:
        """Binary/multilabel class weights as BCE's pos_weight (weight of positives / negatives)."""
        w = self._weights(out)
        if w is None:
            return None
        return w[1] / w[0] if self.kind == "binary" else w

    def _focal(self, out: torch.Tensor, target: torch.Tensor, smoothing: float) -> torch.Tensor:
        """Focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_t)^gamma, so easy, confident
        examples (mostly the majority class) contribute little; class weights act as alpha."""
        gamma = self.focal_gamma
        if self.kind == "multiclass":
            logp = F.log_softmax(out.float(), dim=-1)
            if target.ndim == 1:  # class indices; mixup gives probabilities instead
                target = F.one_hot(target, out.shape[-1]).float()
            if smoothing:
                target = target * (1 - smoothing) + smoothing / out.shape[-1]
            weights = (1 - logp.exp()).pow(gamma) * target
            if self.class_weights is not None:
                weights = weights * self._weights(out)
            return -(weights * logp).sum(-1).mean()
        logits = self.align(out, target).float()
        target = target.float()
        if smoothing:
            target = target * (1 - smoothing) + 0.5 * smoothing
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        p = torch.sigmoid(logits)
        p_t = p * target + (1 - p) * (1 - target)
        loss = bce * (1 - p_t).pow(gamma)
        if self.class_weights is not None:
            w = self._weights(out)
            alpha = w[1] / (w[0] + w[1]) if self.kind == "binary" else w / (1 + w)
            loss = loss * (alpha * target + (1 - alpha) * (1 - target))
        return loss.mean()

    def align(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Outputs shaped like the target: a trailing axis of size 1 is dropped ([B, 1] vs [B]);
        for a binary task, two logits become one, z1 - z0 (sigmoid(z1 - z0) is softmax's p1)."""
        if out.ndim == target.ndim + 1:
            if out.shape[-1] == 1:
                return out.squeeze(-1)
            if out.shape[-1] == 2 and self.kind == "binary":
                return out[..., 1] - out[..., 0]
        return out

    def unsmoothed(self) -> Task:
        """The same task without label smoothing (whose loss cannot reach zero)."""
        clone = copy.copy(self)
        clone.label_smoothing = 0.0
        return clone

    def __call__(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """A Task is its training loss, so it can stand wherever a loss function is expected."""
        return self.loss(out, target)

    def count(self, target: torch.Tensor) -> torch.Tensor | int:
        """What the mean loss averages over: samples, or non-ignored tokens for lm."""
        if self.kind == "lm":
            return (target != IGNORE_INDEX).sum()
        return target.shape[0]

    # -- checks ------------------------------------------------------------------------------

    def check_fit(self, out: torch.Tensor, target: torch.Tensor, info: DataInfo | None) -> None:
        """Raise DataError when the model's outputs cannot serve this task's targets."""
        shapes = f"model output shape {tuple(out.shape)}, target shape {tuple(target.shape)}"
        if self.kind == "multiclass":
            if out.ndim != 2 or target.ndim != 1:
                raise DataError(
                    f"multiclass: expected outputs [batch, classes] and integer targets [batch]; got {shapes}"
                )
            _check_labels(target, out.shape[-1], info, "classes")
        elif self.kind == "lm":
            if out.shape[:-1] != target.shape:
                raise DataError(
                    f"lm: expected outputs [batch, time, vocab] for targets [batch, time]; got {shapes}"
                )
            _check_labels(target[target != IGNORE_INDEX], out.shape[-1], info, "tokens")
        elif self.kind in ("binary", "multilabel", "regression"):
            if self.align(out, target).shape != target.shape:
                raise DataError(
                    f"{self.kind}: the model's outputs do not match the targets: {shapes}"
                )
            if self.kind != "regression" and not bool(((target == 0) | (target == 1)).all()):
                found = target.unique()[:5].tolist()
                raise DataError(f"{self.kind}: targets must be 0 or 1; found values {found}")

    # -- metrics -----------------------------------------------------------------------------

    def metric_names(self) -> list[str]:
        """The validation metrics a run records: val_loss and the task's own."""
        return ["val_loss", *(f"val_{name}" for name in self.spec.metrics)]

    def metrics(self, device: torch.device, extra: dict[str, Any] | None = None) -> Metrics:
        return Metrics(self, device, extra)


class Metrics:
    """Validation metrics, accumulated batch by batch in constant memory (no list of all logits).

    ``extra``: the user's metrics by name: torchmetrics metrics (updated with each batch's raw
    outputs and targets, in constant memory too) or plain functions ``(outputs, targets) ->
    number``, given the whole validation set's outputs and targets at once (as the Hugging Face
    Trainer's ``compute_metrics``).
    """

    def __init__(
        self, task: Task, device: torch.device, extra: dict[str, Any] | None = None
    ) -> None:
        self.task = task
        self.collection = (
            TaskMetrics(task.kind, task.num_outputs, device) if task.kind != "custom" else None
        )
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        extra = extra or {}
        self.streaming = {k: m.to(device) for k, m in extra.items() if _torchmetric(m)}
        self.functions = {k: f for k, f in extra.items() if k not in self.streaming}
        self._seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def reset(self) -> None:
        if self.collection is not None:
            self.collection.reset()
        for metric in self.streaming.values():
            metric.reset()
        self._seen.clear()
        self.loss_sum.zero_()
        self.count.zero_()

    def update(
        self, out: torch.Tensor, target: torch.Tensor, loss: torch.Tensor | None = None
    ) -> None:
        """Add a batch: outputs, targets, and the model's own loss when it computes one."""
        n = self.task.count(target)
        if loss is None:
            loss = self.task.loss(out, target, train=False)
        self.loss_sum += loss.double() * n
        self.count += n
        if self.collection is not None:
            with _counting_kernels_allowed():
                self._update_collection(out, target)
        for metric in self.streaming.values():
            metric.update(out, target)
        if self.functions:
            self._seen.append((out.detach().float().cpu(), target.detach().cpu()))

    def _update_collection(self, out: torch.Tensor, target: torch.Tensor) -> None:
        if self.task.kind in ("binary", "regression"):  # one logit (or score) per target
            out = self.task.align(out, target)
        self.collection.update(out, target)

    def compute(self) -> dict[str, float]:
        results = {"val_loss": (self.loss_sum / self.count.clamp(min=1)).item()}
        if self.collection is not None:
            results.update({f"val_{k}": v for k, v in self.collection.compute().items()})
        results.update({f"val_{k}": float(m.compute()) for k, m in self.streaming.items()})
        if self.functions and self._seen:
            outputs = torch.cat([o for o, _ in self._seen])
            targets = torch.cat([t for _, t in self._seen])
            for name, fn in self.functions.items():
                results[f"val_{name}"] = float(fn(outputs, targets))
        return results


def _torchmetric(metric: Any) -> bool:
    """Whether ``metric`` is a torchmetrics Metric, without importing torchmetrics (seconds): a
    torchmetrics object exists only once its package was imported."""
    module = sys.modules.get("torchmetrics")
    return module is not None and isinstance(metric, module.Metric)


@contextmanager
def _counting_kernels_allowed() -> Iterator[None]:
    """Lift ``torch.use_deterministic_algorithms`` while the metrics count.

    Under it, CUDA's scatter-add (the metrics' histograms) sorts its indices to add them in a fixed
    order (torchmetrics, used before, replaced ``bincount`` by a one-hot sum of samples x bins
    entries: 16 GB for a 200-threshold AUROC over one batch of 10 classes). Integer counts are exact
    in any order, so the metrics, and a deterministic run, stay deterministic.
    """
    if not torch.are_deterministic_algorithms_enabled():
        yield
        return
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(True, warn_only=warn_only)


def balanced_weights(counts: list[int], kind: str, n: int) -> torch.Tensor:
    """Class weights n / (C * n_c) (King & Zeng 2001; scikit-learn's "balanced"); for multilabel,
    each label's negatives / positives (BCE's pos_weight)."""
    c = torch.tensor(counts, dtype=torch.float32).clamp(min=1)
    if kind == "multilabel":
        return (n - c).clamp(min=1) / c
    return n / (len(counts) * c)


def _check_labels(labels: torch.Tensor, width: int, info: DataInfo | None, what: str) -> None:
    """Class or token labels must index the model's output: over the whole training data where
    ``info`` knows its label range, else over ``labels`` (a batch)."""
    if info is not None and info.label_range is not None:
        lowest, highest = info.label_range
        source = "the training data has" if info.labels_complete else "the training data read has"
    else:
        lowest, highest = (int(labels.min()), int(labels.max())) if labels.numel() else (0, 0)
        source = "the data has"
    known = (info.num_classes if what == "classes" else info.vocab_size) if info else None
    highest = max(highest, (known or 0) - 1)
    check_label_range(lowest, highest, width, what, source)


def check_label_range(lowest: int, highest: int, width: int, what: str, source: str) -> None:
    """A DataError unless every label in ``lowest..highest`` indexes one of ``width`` outputs."""
    if highest < width and lowest >= 0:
        return
    hint = (
        f"; class indices start at 0 ({IGNORE_INDEX} marks positions without a loss)"
        if lowest < 0
        else ""
    )
    raise DataError(
        f"labels outside the model's output range: {source} labels {lowest}..{highest} but "
        f"the model outputs {width} {what}; expected labels in 0..{width - 1}{hint}"
    )


def resolve_monitor(
    task: Task, spec: Any, has_val: bool, extra: tuple[str, ...] = ()
) -> tuple[str, str]:
    """(metric, min|max) that picks the best checkpoint and stops early, from the recipe's
    ``early_stopping`` section; without validation data, the training loss. ``extra``: the names
    of the user's own metrics."""
    monitor = task.spec.monitor if spec.monitor == "auto" else spec.monitor
    if not has_val:
        monitor = "train_loss"
    elif not monitor.startswith(("val_", "train_")):
        monitor = f"val_{monitor}"
    available = ["train_loss", *task.metric_names(), *(f"val_{name}" for name in extra)]
    if monitor not in available:
        raise ConfigError("early_stopping.monitor", spec.monitor, f"one of {', '.join(available)}")
    return monitor, monitor_mode(monitor, spec.mode)


def monitor_mode(monitor: str, mode: str) -> str:
    """'min' or 'max' for a monitored metric; 'auto' looks the metric up."""
    if mode != "auto":
        return mode
    key = monitor.removeprefix("val_").removeprefix("train_")
    if key not in METRIC_MODES:
        raise ConfigError(
            "early_stopping.mode",
            mode,
            "min or max",
            f"gradwise does not know the direction of {monitor!r}",
        )
    return METRIC_MODES[key]
