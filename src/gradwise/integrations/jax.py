"""The doctor in a JAX / Flax / Optax training loop: one ``doctor.step`` per optimizer step.

    from gradwise.integrations.jax import Doctor

    doctor = Doctor(task="multiclass", run_dir="runs/jax-mlp")
    for x, y in batches:
        params, opt_state, loss, grads, updates, logits = train_step(params, opt_state, x, y)
        doctor.step(loss, grads=grads, params=params, updates=updates,
                    inputs=x, outputs=logits, targets=y, opt_state=opt_state)
    doctor.validate(loss=val_loss)
    doctor.close()  # writes runs/jax-mlp/doctor/, which `gradwise report runs/jax-mlp` renders

The rules are the very ones ``gradwise.Doctor`` runs on PyTorch (``gradwise.doctor.numeric``), with
the same codes and thresholds; those that need a PyTorch model cannot run here and their pages say
so (:data:`gradwise.doctor.frameworks.NOT_CHECKED`). ``grads``, ``params`` and ``updates`` are any
pytrees (Flax Linen variables, an ``nnx.State`` or ``nnx.Module``, dicts, lists, tuples); their
leaves are grouped into layers by their path without its last key, in natural order of the names
(``Dense_2`` before ``Dense_10``).

What it costs, and why it never recompiles your code: the doctor passes nothing into your jitted
functions. Each step it dispatches one small jitted function of its own (the global gradient norm,
asynchronous) and keeps the loss and that norm as device scalars; every ``sample_every`` steps it
reads them on the host and computes the per-layer norms on the device (one more small dispatch and a
transfer of a few floats; without ``updates`` it keeps one device copy of the weights for a step, to
measure the update). The batch (``inputs``/``outputs``/``targets``) and ``activations`` are copied
to the host only at the steps that need them: the first ones and the sampled ones. The doctor's own
functions compile once per tree structure, at their first call. The cheapest feed: return
``optax.global_norm(grads)`` from the jitted step and pass it as ``grad_norm=`` (fused into the
step, where the doctor's own norm reads the gradients once more), and pass Optax's ``updates``.

A failure of the doctor is one warning, and that part is skipped: it never raises into your loop.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradwise.doctor.findings import Finding
from gradwise.doctor.numeric import NumericDoctor
from gradwise.errors import GradwiseWarning

__all__ = ["Doctor", "layers"]

_WRAPPERS = ("value", "raw_value")  # attribute keys of a variable box (nnx.Variable.value)


class Doctor:
    """Diagnose a JAX training loop; see the module docstring.

    task / loss_kind: what the loss is ("multiclass", "binary", "regression", ... or one of
        ``gradwise.doctor.rules.model.LOSS_KINDS``); with neither, it is read from the first
        loss's value against the standard losses of the outputs and targets.
    run_dir: where ``save()``/``close()`` write ``doctor/findings.json`` and ``telemetry.json``.
    ignore, sample_every, on_finding: as ``gradwise.Doctor`` (codes to skip, the steps between
        per-layer samples, what to do with a new finding: "print", a callable or None).
    """

    def __init__(
        self,
        task: str | None = None,
        loss_kind: str | None = None,
        *,
        run_dir: str | Path | None = None,
        ignore: Iterable[str] = (),
        sample_every: int = 20,
        on_finding: Callable[[Finding], None] | str | None = "print",
    ) -> None:
        self.doctor = NumericDoctor(
            task,
            loss_kind,
            framework="jax",
            ignore=ignore,
            sample_every=sample_every,
            on_finding=on_finding,
            unit_axis=-1,
        )
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._previous: list[list[Any]] | None = None  # device copy of the weights, by layer
        self._previous_names: list[str] | None = None
        self._failed: set[str] = set()
        self._closed = False

    # -- the loop ------------------------------------------------------------------------------

    def step(
        self,
        loss: Any,
        grads: Any = None,
        params: Any = None,
        updates: Any = None,
        inputs: Any = None,
        outputs: Any = None,
        targets: Any = None,
        lr: float | Callable[[int], Any] | None = None,
        activations: Mapping[str, tuple[str, Any]] | None = None,
        *,
        grad_norm: Any = None,
        opt_state: Any = None,
        layer_input: Any = None,
    ) -> list[Finding]:
        """Record one optimizer step; returns the findings that fired at it.

        loss: the step's loss (a JAX scalar is read on the host at sampled steps only).
        grads / params / updates: pytrees of the gradients, the weights and Optax's updates
            (without ``updates`` the change of ``params`` over a step is measured instead).
        inputs / outputs / targets: the batch, the model's outputs (logits) and the targets.
        lr: the learning rate, or an Optax schedule (called with the step); else read from an
            ``optax.inject_hyperparams`` state passed as ``opt_state``.
        activations: name -> (kind such as "relu", the activation's output), e.g. from Flax's
            ``sow``; grad_norm: the global gradient norm when computed in the train step.
        """
        d = self.doctor
        step = d.signals.step
        kwargs: dict[str, Any] = {}
        if grad_norm is None and grads is not None:
            with self._guard("the gradient norm"):
                grad_norm = _global_norm(_params_of(grads))
        if d.wants_batch:
            kwargs.update(inputs=inputs, outputs=outputs, targets=targets, layer_input=layer_input)
        if activations and d.wants_activations:
            kwargs["activations"] = activations
        if d.wants_layers:
            with self._guard("the per-layer statistics"):
                kwargs.update(self._layer_norms(grads, params, updates))
            with self._guard("the learning rate"):
                kwargs["lr"] = _learning_rate(lr, opt_state, step)
        if params is not None and updates is None and (step + 1) % d.sample_every == 0:
            with self._guard("the weights' copy"):  # the next (sampled) step measures the update
                names, groups = _grouped(params)
                self._previous, self._previous_names = _copy(groups), names
        return d.step(loss, grad_norm=grad_norm, **kwargs)

    @property
    def wants_activations(self) -> bool:
        """Whether the next step reads ``activations`` (the first steps and the sampled ones):
        capture them (Flax's ``sow``, ``capture_intermediates``) only then, if that costs."""
        return self.doctor.wants_activations

    @property
    def wants_batch(self) -> bool:
        """Whether the next step reads ``inputs``/``outputs``/``targets``."""
        return self.doctor.wants_batch

    def validate(self, loss: Any = None, metric: Any = None) -> list[Finding]:
        """Record an evaluation (validation loss and/or a metric, JAX scalars or floats);
        enables the generalisation rules (GW401 overfitting, GW404)."""
        return self.doctor.validate(loss=loss, metric=metric)

    # -- results -------------------------------------------------------------------------------

    @property
    def findings(self) -> list[Finding]:
        """Findings so far, errors first."""
        return self.doctor.findings

    def summary(self) -> str:
        return self.doctor.summary()

    def telemetry(self) -> dict:
        return self.doctor.telemetry()

    def save(self, run_dir: str | Path | None = None) -> Path:
        """Write ``findings.json`` and ``telemetry.json`` into ``run_dir/doctor`` (default: the
        ``run_dir`` given to the constructor); returns that directory."""
        run_dir = Path(run_dir) if run_dir is not None else self.run_dir
        if run_dir is None:
            raise ValueError("save() needs a run directory: Doctor(run_dir=...) or save(run_dir)")
        return self.doctor.save(run_dir / "doctor")

    def close(self) -> None:
        """End of the run: save into ``run_dir`` (when one was given), once."""
        if self._closed:
            return
        self._closed = True
        self._previous = None
        if self.run_dir is not None:
            with self._guard("saving the run directory"):
                self.save()

    def report(self, path: str | Path, **kwargs: Any) -> Path:
        """Write the self-contained HTML report of this run to ``path``."""
        return self.doctor.report(path, **kwargs)

    def __enter__(self) -> Doctor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- measurements --------------------------------------------------------------------------

    def _layer_norms(self, grads: Any, params: Any, updates: Any) -> dict[str, Any]:
        """Per layer, the norms of the gradient, the weights and the update, computed on the
        device and handed over as one-element arrays (whose norm is that norm): NumericDoctor
        reads the same ||g||/||w|| and ||u||/||w|| as from the whole arrays, and nothing the size
        of the weights crosses to the host.

        Without ``updates`` the update is the change of the weights since the step before, whose
        device copy was kept; at the first sample there is none, so the weights go to
        NumericDoctor whole (its host snapshot, measured against the next step's weights): the
        first steps' updates are the ones a learning rate far too high shows in most clearly.
        """
        previous, previous_names = self._previous, self._previous_names
        self._previous = self._previous_names = None
        if params is None:
            return {}
        names, weights = _grouped(params)
        if self.doctor.signals.step % self.doctor.sample_every:  # the step after the snapshot
            return {"params": dict(zip(names, weights, strict=True))}
        g = _grouped(grads) if grads is not None else None
        u = _grouped(updates) if updates is not None else None
        same = previous is not None and previous_names == names
        delta = previous if u is None and same and _shapes(previous) == _shapes(weights) else None
        norms = jax.device_get(  # one transfer of a few floats
            _norms(weights, g[1] if g else None, u[1] if u else None, delta)
        )
        w, gn, un, dn = norms
        out: dict[str, Any] = {"grads": _as_arrays(g[0], gn) if g else None}
        if u is not None:
            out.update(params=_as_arrays(names, w), updates=_as_arrays(u[0], un))
        elif dn is not None:
            out.update(params=_as_arrays(names, w), updates=_as_arrays(names, dn))
        else:  # NumericDoctor keeps the weights (updates=None) and measures the next step's
            out.update(params=dict(zip(names, weights, strict=True)), updates=None)
        return out

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """A failure of one measurement is one warning (the first time) and that measurement is
        skipped at this step; it never reaches the user's loop."""
        try:
            yield
        except Exception as exc:
            if what not in self._failed:
                self._failed.add(what)
                warnings.warn(
                    f"gradwise doctor (jax): {what} failed and is skipped "
                    f"({type(exc).__name__}: {exc})",
                    GradwiseWarning,
                    stacklevel=4,
                )


# -- pytrees into layers ------------------------------------------------------------------------


def layers(tree: Any) -> dict[str, list[Any]]:
    """Group a pytree's array leaves into layers: layer name -> its arrays.

    A leaf's layer is its path without its last key ("Dense_0/kernel" and "Dense_0/bias" make
    "Dense_0"); the keys all leaves share at the front are dropped while each leaf keeps a layer
    key (Flax Linen's "params" collection), as are the ".value" boxes of ``nnx.State``; a leaf with
    no parent (a flat dict of arrays) is a layer of its own. Layers come in natural order of their
    names. An ``nnx.Module`` stands for its ``nnx.Param`` state.
    """
    names, groups = _grouped(tree)
    return dict(zip(names, groups, strict=True))


_GROUPING: dict[Any, tuple[list[str], list[list[int]]]] = {}  # treedef -> (names, leaf indices)


def _grouped(tree: Any) -> tuple[list[str], list[list[Any]]]:
    """(layer names, each layer's arrays), the grouping cached per tree structure."""
    tree = _params_of(tree)
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    plan = _GROUPING.get(treedef)
    if plan is None:
        plan = _GROUPING[treedef] = _plan(tree)
        if len(_GROUPING) > 64:  # bounded: structures seen in one process are few
            _GROUPING.pop(next(iter(_GROUPING)))
    names, indices = plan
    return names, [[leaves[i] for i in idx] for idx in indices]


def _plan(tree: Any) -> tuple[list[str], list[list[int]]]:
    paths = []
    for i, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(tree)[0]):
        if not _is_float_array(leaf):
            continue
        keys = [_key_name(k) for k in path]
        while len(keys) > 1 and keys[-1] in _WRAPPERS and _is_attr(path[len(keys) - 1]):
            keys.pop()
        paths.append((i, keys))
    if not paths:
        return [], []
    shortest = min(len(keys) for _, keys in paths)
    prefix = 0  # leading keys every leaf shares, keeping at least one layer key per leaf
    while prefix < shortest - 2 and len({tuple(keys[: prefix + 1]) for _, keys in paths}) == 1:
        prefix += 1
    groups: dict[str, list[int]] = {}
    for i, keys in paths:
        parent = keys[prefix:-1]
        name = "/".join(parent) if parent else (keys[-1] if keys else "params")
        groups.setdefault(name, []).append(i)
    names = sorted(groups, key=_natural)
    return names, [groups[n] for n in names]


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _is_attr(key: Any) -> bool:
    return isinstance(key, jax.tree_util.GetAttrKey)


def _natural(name: str) -> list[Any]:
    return [
        (0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)
    ]


def _is_float_array(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and hasattr(leaf, "shape") and jnp.issubdtype(dtype, jnp.inexact)


def _params_of(tree: Any) -> Any:
    """An ``nnx.Module`` stands for its trainable parameters."""
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(tree, nnx.Module):
        return nnx.state(tree, nnx.Param)
    return tree


def _shapes(groups: list[list[Any]]) -> list[list[tuple]]:
    return [[tuple(a.shape) for a in arrays] for arrays in groups]


def _as_arrays(names: list[str], norms: Any) -> dict[str, np.ndarray]:
    return {
        name: np.asarray([value], dtype=np.float32)
        for name, value in zip(names, norms, strict=True)
    }


# -- the doctor's own device functions (compiled once per tree structure) ------------------------


def _sum_squares(arrays: Iterable[Any]) -> Any:
    total = jnp.zeros((), jnp.float32)
    for a in arrays:
        if jnp.issubdtype(a.dtype, jnp.complexfloating):
            a = jnp.abs(a)
        if jnp.issubdtype(a.dtype, jnp.inexact):
            total = total + jnp.sum(jnp.square(a.astype(jnp.float32)))
    return total


@jax.jit
def _global_norm(tree: Any) -> Any:
    return jnp.sqrt(_sum_squares(jax.tree_util.tree_leaves(tree)))


@jax.jit
def _norms(weights: Any, grads: Any, updates: Any, previous: Any) -> tuple:
    def per_layer(groups: Any) -> Any:
        if groups is None:
            return None
        return jnp.stack([jnp.sqrt(_sum_squares(arrays)) for arrays in groups] or [jnp.zeros(())])

    delta = None
    if previous is not None:
        delta = [
            [n.astype(jnp.float32) - o.astype(jnp.float32) for n, o in zip(new, old, strict=True)]
            for new, old in zip(weights, previous, strict=True)
        ]
    return per_layer(weights), per_layer(grads), per_layer(updates), per_layer(delta)


@jax.jit
def _copy(tree: Any) -> Any:
    return jax.tree_util.tree_map(jnp.copy, tree)


def _learning_rate(lr: Any, opt_state: Any, step: int) -> float | None:
    """The learning rate at ``step``: a number, a schedule, or an inject_hyperparams state's."""
    if lr is None and opt_state is not None:
        lr = _injected_lr(opt_state)
    elif callable(lr):
        lr = lr(step)
    if lr is None:
        return None
    value = float(np.asarray(lr, dtype=np.float64).reshape(()))
    return value if math.isfinite(value) else None


def _injected_lr(opt_state: Any) -> Any:
    """``hyperparams["learning_rate"]`` of the first ``optax.inject_hyperparams`` state found in
    ``opt_state`` (which may be a chain's tuple of states)."""
    states = jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda x: isinstance(getattr(x, "hyperparams", None), Mapping)
    )
    for state in states:
        hyper = getattr(state, "hyperparams", None)
        if isinstance(hyper, Mapping):
            for key in ("learning_rate", "lr", "step_size"):
                if key in hyper:
                    return hyper[key]
    return None
