"""The doctor inside Keras 3 ``model.fit``, on the TensorFlow, JAX and PyTorch backends alike.

    from gradwise.integrations.keras import DoctorCallback

    model.fit(x, y, validation_data=(xv, yv), callbacks=[DoctorCallback("runs/keras")])

The callback feeds :class:`gradwise.doctor.numeric.NumericDoctor`, so the findings carry the same
codes (GW102, GW105, GW301, GW305, GW401, ...) as the PyTorch Doctor's, and ``gradwise report
runs/keras`` renders them.

How it sees inside ``fit`` without changing it: while ``fit`` runs, ``model.train_function`` (the
per-step entry point every backend's ``fit`` calls with the batch, or with the iterator it pulls
the batch from) is wrapped. The wrapper hands the very batch ``fit`` drew to the original train
function, unchanged and exactly once, so the run trains as it would without the callback, with
the same compiled step; it keeps a reference to the batch, and to the logs the step returns.
(TensorFlow pulls the batch inside its compiled loop: the wrapper draws it itself only at the
steps that need it, and passes it to the same compiled one-step function; other steps take
``fit``'s own path.) The callback has no per-batch hook, so Keras' asynchronous callback dispatch
and its host syncs stay as they were.

- The loss: Keras' ``logs["loss"]`` is the running mean over the epoch, weighted by batch size;
  the batch's own loss is recovered from two consecutive means and the batch sizes, lazily: the
  device scalars are read on the host at the doctor's sampled steps only.
- At the steps the doctor wants more (the first steps, then every ``sample_every``-th), one
  *stateless* probe runs on the same batch with the weights the step is about to use: a forward
  pass returning the outputs and the activation layers' outputs (Sequential and functional
  models; a subclassed model has no layer graph to tap), and (TensorFlow, JAX: compiled once,
  at every GRADIENT_SAMPLES-th sampled step) the gradients. Being stateless (``stateless_call``), it moves no BatchNorm statistic and
  no dropout seed, so the user's results stay bit-for-bit the same. On PyTorch the gradients are
  read from ``.grad``, which the step leaves in place.
- The weights at sampled steps (the update-to-weight ratios of GW305/GW306), the learning rate
  (a schedule is evaluated at the step), and at each epoch's end ``val_loss`` for GW401.

Any failure of the doctor becomes one warning and the doctor (or only its probe) stops; ``fit``
never sees it. Not supported: ``steps_per_execution > 1`` (the doctor turns itself off, with a
warning), several inputs or outputs for the data checks (skipped).
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

import keras
import numpy as np

from gradwise.doctor.findings import Finding
from gradwise.doctor.numeric import NumericDoctor
from gradwise.errors import GradwiseWarning

GRADIENT_SAMPLES = 4
"""TensorFlow and JAX: the gradients are measured at every GRADIENT_SAMPLES-th sampled step (a
separate pass costs about a training step); PyTorch leaves them in ``.grad`` at every step."""
ACTIVATIONS = ("relu", "relu6", "sigmoid", "tanh")
"""Activation kinds whose outputs the doctor watches (dead units GW304, saturation GW309)."""

_CLASS_LOSSES = {
    "sparse_categorical_crossentropy": "cross_entropy",
    "categorical_crossentropy": "cross_entropy",
    "binary_crossentropy": "bce_logits",
    "mean_squared_error": "mse",
    "mse": "mse",
    "mean_absolute_error": "l1",
    "mae": "l1",
    "huber": "huber",
    "huber_loss": "huber",
}


def loss_kind(loss: Any) -> tuple[str | None, bool]:
    """(the doctor's loss kind, whether the model outputs probabilities) for a Keras loss: a
    string, a ``keras.losses.Loss`` or a loss function; (None, False) when unknown (the doctor
    then reads the kind from the first loss value)."""
    from_logits = False
    if isinstance(loss, str):
        name = loss.lower()
    elif isinstance(loss, keras.losses.Loss):
        fn = getattr(loss, "fn", None)
        name = getattr(fn, "__name__", None) or _snake(type(loss).__name__)
        kwargs = getattr(loss, "_fn_kwargs", {}) or {}
        from_logits = bool(getattr(loss, "from_logits", kwargs.get("from_logits", False)))
    elif callable(loss):
        name = getattr(loss, "__name__", "")
    else:
        return None, False
    kind = _CLASS_LOSSES.get(name)
    if kind is None:
        return None, False
    if kind == "cross_entropy":
        return ("cross_entropy", False) if from_logits else ("nll", True)
    if kind == "bce_logits":
        return ("bce_logits", False) if from_logits else ("bce", True)
    return kind, False


def _snake(name: str) -> str:
    out = "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")
    return out.replace("cross_entropy", "crossentropy")


class DoctorCallback(keras.callbacks.Callback):
    """Diagnose a Keras ``fit`` with the gradwise doctor's rules; see the module docstring.

    run_dir: when given, ``run_dir/doctor/`` gets findings.json and telemetry.json at the end of
        training (``gradwise report run_dir`` renders them).
    task: what the model is for ("multiclass", "regression", ...), when the loss does not say.
    ignore, sample_every, on_finding: as ``gradwise.Doctor``.
    """

    async_safe = True  # it has no per-batch hook: Keras may keep dispatching callbacks async

    def __init__(
        self,
        run_dir: str | Path | None = None,
        *,
        task: str | None = None,
        ignore: Iterable[str] = (),
        sample_every: int = 20,
        on_finding: Callable[[Finding], None] | str | None = "print",
    ) -> None:
        super().__init__()
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.task, self.ignore = task, tuple(ignore)
        self.sample_every, self.on_finding = sample_every, on_finding
        self.doctor: NumericDoctor | None = None
        self._active = False
        self._original: Any = None
        self._probe: _Probe | None = None

    @property
    def findings(self) -> list[Finding]:
        return [] if self.doctor is None else self.doctor.findings

    # -- Keras hooks ---------------------------------------------------------------------------

    def on_train_begin(self, logs: dict | None = None) -> None:
        model = self.model
        kind, probabilities = loss_kind(getattr(model, "loss", None))
        if self.doctor is None:  # a second fit() on the same callback continues the same run
            self.doctor = NumericDoctor(
                self.task,
                kind,
                framework="keras",
                ignore=self.ignore,
                sample_every=self.sample_every,
                on_finding=self.on_finding,
            )
        self._probabilities = probabilities
        self._backend = keras.backend.backend()
        self._epoch_seen = 0.0  # samples seen this epoch (the running mean's weight)
        self._epoch_step = 0
        self._previous: _BatchLoss | None = None
        self._full_batch: int | None = None  # TensorFlow: the size of the batches not drawn here
        try:
            if self._backend not in ("tensorflow", "jax", "torch"):
                raise RuntimeError(f"the {self._backend} backend is not supported")
            self._optimizer_steps = int(np.asarray(model.optimizer.iterations))
            self._steps = 0
            self._probe = _Probe.of(model, self._backend)
            self._install(model)
            self._active = True
        except Exception as exc:
            self._fail("starting", exc)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_seen, self._previous = 0.0, None  # fit resets the metrics at each epoch
        self._epoch_step = 0

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if not self._active or not logs or logs.get("val_loss") is None:
            return
        try:
            metric = next((v for k, v in logs.items() if k.startswith("val_") and "acc" in k), None)
            self.doctor.validate(loss=float(logs["val_loss"]), metric=metric)
        except Exception as exc:
            self._fail("recording the validation", exc)

    def on_train_end(self, logs: dict | None = None) -> None:
        self._uninstall()
        self._active = False
        if self.doctor is not None:
            try:
                self.doctor.finish()  # reads and judges the steps since the last sample
            except Exception as exc:
                self._fail("reading the last losses", exc)
        if self.doctor is not None and self.run_dir is not None:
            try:
                self.doctor.save(self.run_dir / "doctor")
            except Exception as exc:
                self._fail("writing the run directory", exc)

    # -- the train function's wrapper ----------------------------------------------------------

    def _install(self, model: keras.Model) -> None:
        original = model.train_function
        if original is None:
            raise RuntimeError("fit did not build a train function")
        self._original = original
        if self._backend == "jax":

            def train_function(state, iterator):
                if not self._active:
                    return original(state, iterator)
                return self._jax_step(original, state, iterator)

        elif self._backend == "tensorflow":

            def train_function(iterator):
                if not self._active:
                    return original(iterator)
                return self._tf_step(original, iterator)

        else:

            def train_function(data):
                if not self._active:
                    return original(data)
                return self._torch_step(original, data)

        train_function.__wrapped__ = original  # type: ignore[attr-defined]
        model.train_function = train_function

    def _uninstall(self) -> None:
        model = self.model
        wrapped = getattr(getattr(model, "train_function", None), "__wrapped__", None)
        if self._original is not None and wrapped is self._original:
            model.train_function = self._original
        self._original = None

    def _jax_step(self, original: Callable, state: Any, iterator: Any) -> Any:
        spe = getattr(self._model, "steps_per_execution", 1)
        if spe != 1:
            self._fail("watching fit", RuntimeError("steps_per_execution > 1"))
            return original(state, iterator)
        batch = next(iterator)  # the batch fit would draw; handed on unchanged
        plan = self._before(batch, lambda: state)
        logs, new_state = original(state, iter((batch,)))
        self._after(plan, batch, logs, new_state)
        return logs, new_state

    def _tf_step(self, original: Callable, iterator: Any) -> Any:
        spe = getattr(self._model, "steps_per_execution", 1)
        if spe != 1:
            self._fail("watching fit", RuntimeError("steps_per_execution > 1"))
            return original(iterator)
        if not self._tf_wants_batch():  # fit's own compiled path; the batch size is known
            logs = original(iterator)
            self._after(self._before(None, None), None, logs, None)
            return logs
        batch = next(iterator)  # the batch fit would draw (StopIteration ends the epoch as usual)
        plan = self._before(batch, None)
        logs = original([batch])  # the same compiled step, on the batch drawn here
        self._after(plan, batch, logs, None)
        return logs

    def _tf_wants_batch(self) -> bool:
        """Whether this step's batch is drawn here (TensorFlow's compiled path pulls it from the
        iterator itself): when the doctor or the probe needs it, and at each epoch's last step
        (a smaller batch: its size weighs the running mean), or always when the number of steps
        per epoch is unknown."""
        if not self._active:
            return False
        d = self.doctor
        steps = (self.params or {}).get("steps")
        return (
            self._full_batch is None
            or not steps
            or self._epoch_step >= steps - 1
            or d.wants_batch
            or d.wants_activations
            or d.signals.step % d.sample_every == 0
        )

    def _torch_step(self, original: Callable, data: Any) -> Any:
        batch = data[0] if isinstance(data, (list, tuple)) and len(data) == 1 else None
        plan = self._before(batch, None)
        logs = original(data)
        self._after(plan, batch, logs, None)
        return logs

    # -- what the doctor gets at each step -----------------------------------------------------

    def _before(self, batch: Any, state: Callable | None):
        """Before the step: decide what to measure, and run the stateless probe on the batch
        with the weights the step will use (the exact gradient the optimizer gets)."""
        if not self._active:
            return None
        try:
            d = self.doctor
            plan = {
                "sampled": d.signals.step % d.sample_every == 0,
                "layers": d.wants_layers,
                "activations": d.wants_activations,
                "batch": d.wants_batch,
            }
        except Exception as exc:
            self._fail("planning the step", exc)
            return None
        probe = self._probe
        if batch is None or probe is None or not probe.ok:
            return plan
        sample = d.signals.step // d.sample_every
        want_grads = plan["sampled"] and self._backend != "torch" and sample % GRADIENT_SAMPLES == 0
        if not (plan["batch"] or plan["activations"] or want_grads):
            return plan
        if not getattr(self._model, "built", True):  # TensorFlow builds a subclassed model in
            plan["deferred"] = want_grads  # its first step: probe after it, with its weights
            return plan
        try:
            # JAX: the model's variables are purged during fit, the state holds them
            tv, ntv, _, mv = state() if state else (None, None, None, None)
            plan["probe"] = probe.run(batch, tv, ntv, mv, want_grads, plan["activations"])
        except Exception as exc:
            self._probe_failed(exc)
        return plan

    def _probe_failed(self, exc: Exception) -> None:
        """The probe is off (one warning); the doctor goes on with the loss, weights and batch."""
        self._probe.ok = False
        warnings.warn(
            "gradwise doctor (keras): probing the batch failed; the doctor goes on without the "
            f"model's outputs, activations and gradients ({type(exc).__name__}: {exc})",
            GradwiseWarning,
            stacklevel=2,
        )

    def _after(self, plan: dict | None, batch: Any, logs: Any, state: tuple | None) -> None:
        if plan is None or not self._active:
            return
        if "deferred" in plan and self._probe.ok:
            try:
                run = self._probe.run
                plan["probe"] = run(batch, None, None, None, plan["deferred"], plan["activations"])
            except Exception as exc:
                self._probe_failed(exc)
        try:
            with self._threads():
                self._record(plan, batch, logs, state)
        except Exception as exc:
            self._fail("recording the step", exc)

    def _threads(self) -> contextlib.AbstractContextManager:
        """The doctor's own torch work on one thread under TensorFlow and JAX: their thread pools
        spin next to torch's, and small statistics on two contended pools cost 10x."""
        if self._backend == "torch":
            return contextlib.nullcontext()
        return _torch_threads(1)

    def _record(self, plan: dict, batch: Any, logs: Any, state: tuple | None) -> None:
        d = self.doctor
        size = _batch_size(batch) if batch is not None else self._full_batch
        steps = (self.params or {}).get("steps")
        if batch is not None and (self._full_batch is None or self._epoch_step != (steps or 0) - 1):
            self._full_batch = size  # not an epoch's last batch, which may be smaller
        loss = self._batch_loss(logs, size)
        kwargs: dict[str, Any] = {}
        probe = plan.get("probe") or {}
        x, y = _inputs_targets(batch) if plan["batch"] else (None, None)
        if x is not None:
            kwargs["inputs"], kwargs["targets"] = x, y
            outputs = probe.get("outputs")
            if outputs is not None:
                outputs = np.asarray(outputs)
                if self._probabilities:  # the rules' NLL/BCE read log-probabilities
                    outputs = (
                        np.log(np.clip(outputs, 1e-12, 1.0))
                        if d.signals.loss_kind == "nll"
                        else outputs
                    )
                kwargs["outputs"] = outputs
        if plan["activations"] and probe.get("activations"):
            kwargs["activations"] = probe["activations"]
        if plan["layers"]:
            kwargs["params"] = self._probe.params(state[0] if state else None)
        if plan["sampled"]:
            grads = probe.get("grads")
            if grads is None and self._backend == "torch":
                grads = self._probe.torch_grads()
            if grads is not None:
                kwargs["grads"] = grads
                kwargs["grad_norm"] = math.sqrt(
                    sum(
                        float(np.vdot(a, a))
                        for arrays in grads.values()
                        for a in (arrays if isinstance(arrays, list) else [arrays])
                    )
                )
            kwargs["lr"] = self._learning_rate(state)
        d.step(loss, **kwargs)
        self._steps += 1
        self._epoch_step += 1

    def _batch_loss(self, logs: Any, size: int | None) -> _BatchLoss:
        if not isinstance(logs, dict) or "loss" not in logs:
            raise RuntimeError("the train step's logs have no 'loss'")
        if size is None:
            raise RuntimeError("the batch size is unknown")
        loss = _BatchLoss(logs["loss"], self._epoch_seen, float(size), self._previous)
        self._epoch_seen += size
        self._previous = loss
        return loss

    def _learning_rate(self, state: tuple | None) -> float | None:
        """The optimizer's learning rate at this step (a schedule is evaluated at it; under JAX
        the variable's value is in the train state, the model's own copy is purged)."""
        optimizer = self._model.optimizer  # not .model: under JAX it syncs the state
        lr = getattr(optimizer, "_learning_rate", None)
        if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
            return float(np.asarray(lr(self._optimizer_steps + self._steps)))
        if state is not None and isinstance(lr, keras.Variable):
            for variable, value in zip(optimizer.variables, state[2], strict=False):
                if variable is lr:
                    return _host_float(value)
        return _host_float(optimizer.learning_rate)

    def _fail(self, what: str, exc: Exception) -> None:
        """One warning; the doctor stops watching this fit, which goes on unchanged."""
        if self._active or self._original is None:
            warnings.warn(
                f"gradwise doctor (keras): {what} failed, the doctor is off for the rest of this "
                f"fit ({type(exc).__name__}: {exc})",
                GradwiseWarning,
                stacklevel=2,
            )
        self._active = False


class _BatchLoss:
    """One batch's own loss, recovered from Keras' running mean over the epoch when read:
    mean_i = (sum_j<=i n_j loss_j) / (sum_j<=i n_j), so loss_i = (S_i mean_i - S_i-1 mean_i-1) / n_i.
    The device scalar is read on the host only when the doctor reads the value (``__array__``)."""

    __slots__ = ("_mean", "_mean_value", "_previous", "_seen", "_size", "_value")

    def __init__(self, mean: Any, seen: float, size: float, previous: _BatchLoss | None) -> None:
        self._mean, self._seen, self._size = mean, seen, size
        self._previous = previous if seen > 0 else None
        self._value: float | None = None
        self._mean_value: float | None = None

    def mean(self) -> float:
        if self._mean_value is None:
            self._mean_value = _host_float(self._mean)
            self._mean = None
        return self._mean_value

    def value(self) -> float:
        if self._value is None:
            total = (self._seen + self._size) * self.mean()
            if self._previous is not None:
                total -= self._seen * self._previous.mean()
            self._value = total / self._size
            self._previous = None  # cut the chain: the earlier means are read
        return self._value

    def __float__(self) -> float:
        return self.value()

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self.value(), dtype=dtype or np.float64)


@contextlib.contextmanager
def _torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if before != n:
            torch.set_num_threads(before)


def _host_float(value: Any) -> float:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
    return float(np.asarray(value, dtype=np.float64).reshape(()))


def _unpack(batch: Any) -> tuple[Any, Any, Any]:
    if isinstance(batch, (list, tuple)):
        if len(batch) == 1:
            return batch[0], None, None
        if len(batch) == 2:
            return batch[0], batch[1], None
        if len(batch) == 3:
            return batch[0], batch[1], batch[2]
    return batch, None, None


def _inputs_targets(batch: Any) -> tuple[Any, Any]:
    """The batch's inputs and targets as host arrays for the data rules (None when they are
    not one array each: several inputs or heads have no single batch to judge)."""
    x, y, _ = _unpack(batch)
    return _host(x), _host(y)


def _host(value: Any) -> np.ndarray | None:
    if value is None or isinstance(value, (dict, list, tuple)):
        return None
    if hasattr(value, "detach"):
        value = value.detach().cpu()
    try:
        return np.asarray(value)
    except Exception:
        return None


def _batch_size(batch: Any) -> int | None:
    x, _, _ = _unpack(batch)
    for leaf in keras.tree.flatten(x):
        shape = getattr(leaf, "shape", None)
        if shape is not None and len(shape):
            return int(shape[0])
    return None


class _Probe:
    """The doctor's own stateless pass over a batch: outputs, activations and (TensorFlow, JAX)
    gradients, with the weights the step is about to use. Compiled once per model and loss, so
    later fits (and later callbacks) of the same model reuse it."""

    _cache: ClassVar[weakref.WeakKeyDictionary] = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, model: keras.Model, backend: str) -> _Probe:
        key = (id(getattr(model, "_compile_loss", None)), id(model.optimizer))
        cached = cls._cache.get(model)
        if cached is not None and cached[0] == key:
            return cached[1]
        probe = cls(model, backend)
        cls._cache[model] = (key, probe)
        return probe

    def __init__(self, model: keras.Model, backend: str) -> None:
        self._model = weakref.ref(model)  # the cache's value must not keep its key alive
        self.backend, self.ok = backend, True
        self._names: list[str] = []
        self.watched, self.probe_model = _activation_model(model)
        self._grad_fn: Callable | None = None
        self._forward_fn: Callable | None = None

    @property
    def model(self) -> keras.Model:
        return self._model()

    @property
    def names(self) -> list[str]:
        """Each trainable variable's layer (read when needed: a subclassed model under
        TensorFlow has no variables before its first step)."""
        variables = self.model.trainable_variables
        if len(self._names) != len(variables):
            self._names = [_layer_key(self.model, v) for v in variables]
        return self._names

    # -- grouping by layer ---------------------------------------------------------------------

    def _grouped(self, values: list) -> dict[str, list]:
        out: dict[str, list] = {}
        for name, value in zip(self.names, values, strict=True):
            out.setdefault(name, []).append(_numpy(value))
        return out

    def params(self, trainable: list | None) -> dict[str, list]:
        values = (
            trainable
            if trainable is not None
            else [v.value for v in self.model.trainable_variables]
        )
        return self._grouped(values)

    def torch_grads(self) -> dict[str, list] | None:
        grads = [getattr(v.value, "grad", None) for v in self.model.trainable_variables]
        if any(g is None for g in grads):
            return None
        if isinstance(self.model.optimizer, keras.optimizers.LossScaleOptimizer):
            return None  # the gradients of a scaled loss
        return self._grouped(grads)

    # -- the pass ------------------------------------------------------------------------------

    def run(
        self,
        batch: Any,
        tv: list | None,
        ntv: list | None,
        mv: list | None,
        grads: bool,
        acts: bool,
    ) -> dict:
        model = self.model
        x, y, sw = _unpack(batch)
        if tv is None:
            tv = [v.value for v in model.trainable_variables]
        if ntv is None:
            ntv = [v.value for v in model.non_trainable_variables]
        if mv is None:
            mv = [v.value for v in model.metrics_variables]
        result: dict[str, Any] = {}
        if grads and y is not None:
            fn = self._grad_fn or self._build_grad_fn()
            outs, grad_values = fn(tv, ntv, mv, x, y, sw)
            result["grads"] = self._grouped(grad_values)
        else:
            outs = self._forward(tv, ntv, x)
        outs = list(outs)
        result["outputs"] = _numpy(outs[0]) if len(outs) and _single(outs[0]) else None
        if acts and self.watched:
            result["activations"] = {
                name: (kind, _numpy(value))
                for (name, kind), value in zip(self.watched, outs[1:], strict=True)
            }
        return result

    def _probe_values(self, tv: list, ntv: list) -> tuple[list, list]:
        """The model's weights in the order of the probe model's variables."""
        index = {id(v): value for v, value in zip(self.model.trainable_variables, tv, strict=True)}
        index.update(
            {id(v): value for v, value in zip(self.model.non_trainable_variables, ntv, strict=True)}
        )
        p = self.probe_model
        return (
            [index[id(v)] for v in p.trainable_variables],
            [index[id(v)] for v in p.non_trainable_variables],
        )

    def _call(self, tv: list, ntv: list, x: Any) -> list:
        """Stateless forward in training mode: the model's outputs, then the watched layers'."""
        if self.probe_model is None:
            out, _ = self.model.stateless_call(tv, ntv, x, training=True)
            return [out]
        ptv, pntv = self._probe_values(tv, ntv)
        outs, _ = self.probe_model.stateless_call(ptv, pntv, x, training=True)
        return list(outs)

    def _forward(self, tv: list, ntv: list, x: Any) -> list:
        if self.backend == "torch":
            import torch

            with torch.no_grad():
                return self._call(tv, ntv, x)
        if self._forward_fn is None:
            if self.backend == "jax":
                import jax

                self._forward_fn = jax.jit(self._call)
            else:
                import tensorflow as tf

                self._forward_fn = tf.function(self._call, reduce_retracing=True)
        return self._forward_fn(tv, ntv, x)

    def _loss(self, tv: list, ntv: list, mv: list, x: Any, y: Any, sw: Any) -> tuple[Any, list]:
        model = self.model
        outs = self._call(tv, ntv, x)
        loss, _ = model.stateless_compute_loss(
            tv, ntv, mv, x=x, y=y, y_pred=outs[0], sample_weight=sw, training=True
        )
        return loss, outs

    def _build_grad_fn(self) -> Callable:
        if self.backend == "jax":
            import jax

            def fn(tv, ntv, mv, x, y, sw):
                (_, outs), grads = jax.value_and_grad(self._loss, has_aux=True)(
                    tv, ntv, mv, x, y, sw
                )
                return outs, grads

            self._grad_fn = jax.jit(fn)
        else:
            import tensorflow as tf

            def fn(tv, ntv, mv, x, y, sw):
                tv = [tf.convert_to_tensor(v) for v in tv]
                ntv = [tf.convert_to_tensor(v) for v in ntv]
                mv = [tf.convert_to_tensor(v) for v in mv]
                with tf.GradientTape() as tape:
                    tape.watch(tv)
                    loss, outs = self._loss(tv, ntv, mv, x, y, sw)
                return outs, tape.gradient(loss, tv)

            self._grad_fn = tf.function(fn, reduce_retracing=True)
        return self._grad_fn


def _single(value: Any) -> bool:
    return not isinstance(value, (dict, list, tuple))


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu()
    return np.asarray(value)


def _layer_key(model: keras.Model, variable: Any) -> str:
    path = getattr(variable, "path", None) or variable.name
    key = path.rsplit("/", 1)[0] if "/" in path else path
    prefix = f"{model.name}/"
    return key[len(prefix) :] if key.startswith(prefix) and key != prefix[:-1] else key


def _kind(layer: keras.layers.Layer) -> str | None:
    if isinstance(layer, keras.layers.ReLU):
        return "relu"
    fn = getattr(layer, "activation", None)
    name = getattr(fn, "__name__", None)
    return name if name in ACTIVATIONS else None


def _activation_model(model: keras.Model) -> tuple[list[tuple[str, str]], keras.Model | None]:
    """The activation layers to watch and a functional model that outputs the model's output
    followed by theirs; ([], None) for a subclassed model (no graph of layers to tap)."""
    try:
        outputs = model.outputs
        inputs = model.inputs
    except Exception:
        return [], None
    if not outputs or not inputs or len(outputs) != 1:
        return [], None
    watched, taps = [], []
    for layer in model.layers:
        kind = _kind(layer)
        if kind is None:
            continue
        try:
            taps.append(layer.output)
        except Exception:
            continue
        watched.append((layer.name, kind))
    if not watched:
        return [], None
    try:
        probe = keras.Model(inputs if len(inputs) > 1 else inputs[0], [outputs[0], *taps])
    except Exception:
        return [], None
    return watched, probe
