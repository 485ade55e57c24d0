"""The doctor for loops gradwise cannot hook: fed numbers and arrays instead of a PyTorch model.

Keras 3 (every backend) and JAX/Optax have no module hooks gradwise can attach, so their
integrations measure at the edge (the loss, the gradient norm, per-layer gradients, weights or
updates, activations, the batch) and hand the values over; NumPy arrays, JAX arrays, TensorFlow
and PyTorch tensors are all accepted and converted once, at the sampled steps only. The rules are
the very same functions the PyTorch Doctor dispatches, with the same codes and thresholds, so a
finding reads the same whatever framework the run used.

    doctor = NumericDoctor(loss_kind="cross_entropy", framework="jax")
    for step in range(steps):
        ...
        if doctor.wants_layers:  # the sampled steps: per-layer statistics cost a host copy
            doctor.step(loss, grad_norm=norm, grads=grads, params=params, inputs=x, targets=y)
        else:
            doctor.step(loss, grad_norm=norm, inputs=x, targets=y)
    doctor.validate(loss=val_loss)

Rules that need the PyTorch model itself (its hooks, autograd graph or modules) do not run here;
each rule's page says where it applies (:data:`gradwise.doctor.frameworks.NOT_CHECKED`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradwise.doctor import dispatch
from gradwise.doctor._judging import DEAD_WINDOW, IMBALANCE_BATCHES, Judging
from gradwise.doctor.findings import Finding
from gradwise.doctor.frameworks import NOT_CHECKED
from gradwise.doctor.graph import kind_from_value
from gradwise.doctor.rules import data as data_rules
from gradwise.doctor.rules import model as model_rules
from gradwise.doctor.signals import Series, Signals

EARLY_BATCHES = 3  # as the PyTorch Doctor: steps whose batches get the data and set-up checks
FAMILIES = {"relu": "rectifier", "relu6": "rectifier", "sigmoid": "sigmoid", "tanh": "tanh"}
"""Activation kinds (lower-case names, as Keras and Flax spell them) whose outputs the rules judge:
rectifiers can die (GW304), sigmoid and tanh saturate (GW309)."""

ArrayTree = Mapping[str, Any]  # layer name -> an array, or a list of arrays (its weights)


class NumericDoctor(Judging):
    """Diagnose a run from measured values; see the module docstring.

    task / loss_kind: what the loss is (a task name such as "multiclass", or one of
        ``rules.model.LOSS_KINDS``); when neither is given the kind is read from the first loss's
        value against the standard losses of the outputs and targets.
    framework: the integration's name ("keras", "jax", ...): rules that cannot apply there are
        off, and the telemetry says where it came from.
    unit_axis: the axis of an activation's units (-1: channels last, as Keras and Flax).
    ignore, sample_every, on_finding: as ``gradwise.Doctor``.
    """

    def __init__(
        self,
        task: str | None = None,
        loss_kind: str | None = None,
        *,
        framework: str = "numpy",
        ignore: Iterable[str] = (),
        sample_every: int = 20,
        on_finding: Callable[[Finding], None] | str | None = "print",
        unit_axis: int = -1,
    ) -> None:
        if sample_every < 1:
            raise ValueError("sample_every must be >= 1")
        self._start_judging(ignore, on_finding)
        self.task, self.framework = task, framework
        self.sample_every, self.unit_axis = sample_every, unit_axis
        self._loss_declared = loss_kind is not None or task is not None
        kind = loss_kind or model_rules.loss_kind(None, task)
        if kind not in model_rules.LOSS_KINDS:
            raise ValueError(f"loss_kind must be one of {model_rules.LOSS_KINDS}, got {kind!r}")
        self.signals = Signals(loss_kind=kind)
        self._skip = set(NOT_CHECKED.get(framework, {}))
        self._pending: list[tuple[Any, Any]] = []  # (loss, grad norm) not yet read on the host
        self._snapshot: dict[str, list[np.ndarray]] | None = None  # weights at the last sample
        self._train_losses_since_val: list[float] = []

    # -- what the integration should measure at this step --------------------------------------

    @property
    def wants_layers(self) -> bool:
        """This step is sampled: pass ``grads``/``params``/``updates``/``lr`` (per-layer statistics
        cost a host copy, so they are read at sampled steps only), or the step after one, whose
        weights give the size of the update since."""
        step = self.signals.step
        return step % self.sample_every == 0 or self._snapshot is not None

    @property
    def wants_activations(self) -> bool:
        """Pass ``activations`` at this step: the first DEAD_WINDOW steps and the sampled ones."""
        step = self.signals.step
        return step < DEAD_WINDOW or step % self.sample_every == 0

    @property
    def wants_batch(self) -> bool:
        """Pass ``inputs``/``outputs``/``targets`` at this step (the first steps, for the data
        checks and the class balance, and the sampled ones)."""
        step = self.signals.step
        return step < IMBALANCE_BATCHES or step % self.sample_every == 0

    # -- public API ----------------------------------------------------------------------------

    def step(
        self,
        loss: Any,
        *,
        grad_norm: Any = None,
        lr: float | None = None,
        grads: ArrayTree | None = None,
        params: ArrayTree | None = None,
        updates: ArrayTree | None = None,
        activations: Mapping[str, tuple[str, Any]] | None = None,
        inputs: Any = None,
        outputs: Any = None,
        targets: Any = None,
        layer_input: Any = None,
    ) -> list[Finding]:
        """Record one optimizer step; returns the findings that fired at it.

        loss, grad_norm: scalars (a device scalar is read at the next sampled step, not now).
        grads / params / updates: per layer, its gradient, weights and the optimizer's update
            (``updates``, else the change of ``params`` since the sampled step is the update).
        activations: per activation layer, (its kind such as "relu", its output at this step).
        inputs / outputs / targets: the batch, its predictions (logits, or log-probabilities for a
            loss on probabilities) and targets; layer_input: what the first dense/conv layer got,
            when the model normalises its own inputs.
        """
        s = self.signals
        step = s.step
        self._fired_now = []
        self._pending.append((loss, grad_norm))
        with self._catching("the batch checks"):
            batch = None
            if inputs is not None or outputs is not None or targets is not None:
                batch = (_tensor(inputs), _tensor(outputs), _labels(_tensor(targets)))
            if batch is not None and (step < EARLY_BATCHES or self._sampled(step)):
                self._check_batch(step, loss, *batch, _tensor(layer_input))
            if batch is not None and step < IMBALANCE_BATCHES and batch[2] is not None:
                self._pool_targets(step, batch[2], batch[1])
        with self._catching("the activation statistics"):
            if activations:
                self._activations(activations)
        with self._catching("the per-layer statistics"):
            if self._snapshot is not None and params is not None:
                self._update_ratios(step, params)
            if self._sampled(step):
                if lr is not None:
                    s.lr.append(step, float(lr))
                self._layer_statistics(step, grads, params, updates)
        with self._catching("the sampled checks"):
            if self._sampled(step):
                self._flush(step)
                context = dispatch.Context(step=step, signals=s, loss_kind=s.loss_kind)
                self._dispatch("sample", context, step)
                self._dispatch("activations", context, step)
            elif step == DEAD_WINDOW - 1 and activations:
                self._dispatch("activations", dispatch.Context(step=step, signals=s), step)
            elif _nonfinite(loss):  # a host scalar is free to read: GW301 at once
                self._flush(step)
                self._dispatch("sample", dispatch.Context(step=step, signals=s), step)
        s.step += 1
        return self._fired_now

    def validate(self, loss: float | None = None, metric: float | None = None) -> list[Finding]:
        """Record an evaluation (validation loss and/or a metric); enables GW401/GW404."""
        self._fired_now = []
        with self._catching("recording the evaluation"):
            self._flush()
            recent, self._train_losses_since_val = self._train_losses_since_val, []
            self.signals.val.append(
                {
                    "step": self.signals.step,
                    "loss": _scalar(loss),
                    "metric": _scalar(metric),
                    "train_loss": sum(recent) / len(recent) if recent else None,
                }
            )
            context = dispatch.Context(step=self.signals.step, signals=self.signals)
            self._dispatch("validate", context, self.signals.step)
        return list(self._fired_now)

    def finish(self) -> list[Finding]:
        """Training ended: judge the steps since the last sampled one (a device loss that turned
        NaN there is otherwise never read). Returns the findings that fired."""
        self._fired_now = []
        with self._catching("the last steps' checks"):
            if self._pending:
                loss, n = self.signals.loss, len(self._pending)
                self._flush()
                steps, values = loss.steps[-n:], loss.values[-n:]
                # a non-finite loss is named at the step it appeared, as at a sampled step
                bad = [t for t, v in zip(steps, values, strict=True) if not math.isfinite(v)]
                at = bad[0] if bad else steps[-1]
                self._dispatch("sample", dispatch.Context(step=at, signals=self.signals), at)
        return list(self._fired_now)

    def telemetry(self) -> dict:
        self._flush()
        return {
            "sample_every": self.sample_every,
            "framework": self.framework,
            **self.signals.to_dict(),
        }

    def save(self, directory: str | Path, telemetry: bool = True) -> Path:
        self._flush()
        return super().save(directory, telemetry)

    # -- collection ----------------------------------------------------------------------------

    def _sampled(self, step: int) -> bool:
        return step % self.sample_every == 0

    def _flush(self, last_step: int | None = None) -> None:
        """Read the pending losses and gradient norms (of the steps up to ``last_step``, by
        default the last one recorded) on the host, into their series."""
        if not self._pending:
            return
        last = self.signals.step - 1 if last_step is None else last_step
        first = last - len(self._pending) + 1
        pending, self._pending = self._pending, []
        for i, (loss, norm) in enumerate(pending):
            value = _scalar(loss)
            self.signals.loss.append(first + i, value)
            if norm is not None:
                self.signals.grad_norm.append(first + i, _scalar(norm))
            if math.isfinite(value):
                self._train_losses_since_val.append(value)

    def _check_batch(
        self,
        step: int,
        loss: Any,
        inputs: torch.Tensor | None,
        outputs: torch.Tensor | None,
        targets: torch.Tensor | None,
        layer_input: torch.Tensor | None,
    ) -> None:
        s = self.signals
        early = step < EARLY_BATCHES
        if step == 0 and not self._loss_declared:
            value = _scalar(loss)
            inferred = kind_from_value(value, outputs, targets) if value is not None else None
            s.loss_kind = inferred or _class_index_kind(value, outputs, targets) or "other"
        values: dict[str, Any] = {"inputs": inputs, "outputs": outputs, "targets": targets}
        providers: dict[str, Callable[[], Any]] = {}
        if early:
            providers["loss_value"] = lambda: _scalar(loss)
            values["layer_input"] = layer_input
            if inputs is not None and inputs.ndim:
                values["batch_size"] = inputs.shape[0]
        context = dispatch.Context(
            step=step,
            signals=s,
            loss_kind=s.loss_kind,
            task=self.task,
            providers=providers,
            **values,
        )
        for when in ("first", "batch", "early") if step == 0 else ("batch", "early"):
            if when != "early" or early:
                self._dispatch(when, context, step)
        classes = s.loss_kind in ("cross_entropy", "nll")
        if early and classes and outputs is not None and outputs.ndim >= 2:
            axis = data_rules.class_axis(outputs, targets) if targets is not None else 1
            if axis is not None:
                s.num_classes = outputs.shape[axis]

    def _activations(self, activations: Mapping[str, tuple[str, Any]]) -> None:
        for name, (kind, value) in activations.items():
            x = _tensor(value)
            if x is None or not x.is_floating_point() or x.ndim < 2:
                continue
            family = FAMILIES.get(str(kind).lower())
            self.signals.output_module = name
            self._observe_activation(name, str(kind), x.float(), family, self.unit_axis % x.ndim)

    def _layer_statistics(
        self,
        step: int,
        grads: ArrayTree | None,
        params: ArrayTree | None,
        updates: ArrayTree | None,
    ) -> None:
        """Per layer: ||grad|| / ||weights||, the update's size, and a snapshot of the weights."""
        s = self.signals
        if params is None:
            return
        weights = {name: _arrays(value) for name, value in params.items()}
        s.layers = list(weights)
        norms = {name: _norm(arrays) for name, arrays in weights.items()}
        for name, w in norms.items():
            if w == 0.0:
                s.zero_init.add(name)
            if grads is not None and name in grads:
                g = _norm(_arrays(grads[name]))
                s.layer_grad_norm.setdefault(name, Series()).append(step, g / max(w, 1e-12))
            if updates is not None and name in updates:
                u = _norm(_arrays(updates[name]))
                s.update_ratio.setdefault(name, Series()).append(step, u / max(w, 1e-12))
        if updates is None:  # the next step's weights give the update's size
            self._snapshot = weights

    def _update_ratios(self, step: int, params: ArrayTree) -> None:
        snapshot, self._snapshot = self._snapshot, None
        for name, old in (snapshot or {}).items():
            if name not in params:
                continue
            new = _arrays(params[name])
            if [a.shape for a in new] != [a.shape for a in old]:
                continue
            delta = math.sqrt(
                sum(float(np.sum((n - o) ** 2)) for n, o in zip(new, old, strict=True))
            )
            ratio = delta / max(_norm(old), 1e-12)
            self.signals.update_ratio.setdefault(name, Series()).append(step, ratio)


def _arrays(value: Any) -> list[np.ndarray]:
    """A layer's arrays on the host as float32 copies (a JAX, TF or torch array, or a list)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu()
        out.append(np.array(v, dtype=np.float32, copy=True))
    return out


def _norm(arrays: list[np.ndarray]) -> float:
    return math.sqrt(sum(float(np.dot(a.ravel(), a.ravel())) for a in arrays))


def _tensor(value: Any) -> torch.Tensor | None:
    """A framework's array as a torch tensor for the rules (no copy for NumPy)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        array = np.asarray(value)
    except Exception:  # a dict of features, a ragged batch: the data rules have nothing to judge
        return None
    if array.dtype == object or array.dtype.kind not in "biuf":
        return None
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)


def _labels(targets: torch.Tensor | None) -> torch.Tensor | None:
    """Integer targets as int64, the class-index dtype torch's losses (and the loss-kind
    inference) take: JAX gives int32, Keras often int32 or uint8."""
    if targets is None or targets.is_floating_point() or targets.is_complex():
        return targets
    if targets.dtype in (torch.bool, torch.int64):
        return targets
    return targets.long()


def _class_index_kind(
    loss: float | None, outputs: torch.Tensor | None, targets: torch.Tensor | None
) -> str | None:
    """The kind "cross_entropy" for a non-finite first loss over integer targets that index the
    outputs' class axis: a class-index loss that met labels out of range, which JAX and
    TensorFlow answer with NaN where torch raises, so that GW105 can name them; else None."""
    if loss is None or math.isfinite(loss) or outputs is None or targets is None:
        return None
    if targets.is_floating_point() or targets.dtype == torch.bool:
        return None
    if not outputs.is_floating_point():
        return None
    axis = data_rules.class_axis(outputs, targets)
    return "cross_entropy" if axis is not None and outputs.shape[axis] >= 2 else None


def _scalar(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().reshape(()))
    return float(np.asarray(value, dtype=np.float64).reshape(()))


def _nonfinite(value: Any) -> bool:
    """Whether a host scalar is NaN or inf (a device scalar is left for the sampled step)."""
    if isinstance(value, (int, float, np.floating)):
        return not math.isfinite(float(value))
    return False
