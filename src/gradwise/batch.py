"""Batches and model outputs as users bring them, in one place.

A batch is ``(inputs, target)``; ``(x1, x2, ..., target)`` (the last element is the target); or a
mapping such as a tokenizer's output, ``{"input_ids": ..., "attention_mask": ..., "labels": ...}``,
whose target is the first of :data:`LABEL_KEYS` it holds (or ``data.label_key``) and whose other
entries are the model's keyword arguments. A model may return a tensor, a tuple, a dict or a
Hugging Face ``ModelOutput``: gradwise uses its ``logits`` (else its first tensor) and, where the
model computes its own ``loss`` from the labels it was given, that loss.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradwise.errors import DataError

LABEL_KEYS = ("labels", "label", "targets", "target", "y")
"""The keys a mapping batch's target is found under, in this order (``data.label_key`` overrides)."""


@dataclass
class Batch:
    """One batch split into the model's positional and keyword inputs and the target."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    target: torch.Tensor | None = None
    label_key: str | None = None  # the mapping key the target came from

    @property
    def inputs(self) -> torch.Tensor | None:
        """The main input tensor (what the doctor's data checks and mixup look at)."""
        for value in (*self.args, *self.kwargs.values()):
            if isinstance(value, torch.Tensor):
                return value
        return None

    def to(self, device: torch.device) -> Batch:
        return Batch(
            tuple(_to(a, device) for a in self.args),
            {k: _to(v, device) for k, v in self.kwargs.items()},
            _to(self.target, device),
            self.label_key,
        )

    def with_inputs(self, x: torch.Tensor) -> Batch:
        """The same batch with its main input replaced (mixup and CutMix blend it)."""
        if self.args:
            return Batch((x, *self.args[1:]), self.kwargs, self.target, self.label_key)
        first = next(iter(self.kwargs))
        return Batch(self.args, {**self.kwargs, first: x}, self.target, self.label_key)


def split_batch(batch: Any, label_key: str | None = None) -> Batch:
    """A collated batch (or a sample) as model inputs and target; see the module docstring."""
    if isinstance(batch, Mapping):
        key = label_key or next((k for k in LABEL_KEYS if k in batch), None)
        if label_key is not None and label_key not in batch:
            raise DataError(
                f"data.label_key: the batch has no {label_key!r}; its keys are {sorted(batch)}"
            )
        kwargs = {k: v for k, v in batch.items() if k != key}
        return Batch((), kwargs, batch[key] if key is not None else None, key)
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= 2:
        return Batch(tuple(batch[:-1]), {}, batch[-1])
    if isinstance(batch, torch.Tensor):
        return Batch((batch,), {}, None)
    raise DataError(
        f"a batch must be (inputs, target), (inputs..., target) or a mapping with a "
        f"{'/'.join(LABEL_KEYS)} key; got {type(batch).__name__}"
    )


def run_model(model: nn.Module, batch: Batch, with_labels: bool = False) -> Any:
    """``model(*args, **kwargs)``; ``with_labels`` also passes the target under its own key, so a
    model that computes its own loss (Hugging Face) returns it."""
    kwargs = batch.kwargs
    if with_labels and batch.label_key is not None and batch.target is not None:
        kwargs = {**kwargs, batch.label_key: batch.target}
    return model(*batch.args, **kwargs)


def outputs_of(out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, the model's own loss or None) from whatever the model returned."""
    if isinstance(out, torch.Tensor):
        return out, None
    if isinstance(out, Mapping):  # a dict, or a Hugging Face ModelOutput (an OrderedDict)
        values = dict(out.items())
        loss = values.get("loss")
        logits = values.get("logits")
        if logits is None:
            logits = next((v for k, v in values.items() if k != "loss" and _tensor(v)), None)
        if logits is not None:
            return logits, loss if _tensor(loss) else None
    elif isinstance(out, Sequence) and out:
        tensors = [v for v in out if _tensor(v)]
        # a Hugging Face tuple given labels starts with the scalar loss: (loss, logits, ...)
        if len(tensors) >= 2 and tensors[0].ndim == 0 and tensors[1].ndim > 0:
            return tensors[1], tensors[0]
        if tensors:
            return tensors[0], None
    raise DataError(
        f"the model returned {type(out).__name__}; expected a tensor, a tuple, a dict or a "
        "ModelOutput with logits"
    )


def takes_labels(model: nn.Module, key: str | None) -> bool:
    """Whether the model's forward accepts the label key (and so can compute its own loss)."""
    if key is None:
        return False
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return key in params


def _tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
