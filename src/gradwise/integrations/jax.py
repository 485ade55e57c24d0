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
functions. Each step it dispatches one small jitted function of its own (the global gradient norm)
and keeps the loss and that norm as device scalars; every ``sample_every`` steps it computes the
per-layer norms on the device (without ``updates`` it keeps a device copy of the weights from the
step before, to measure the update) and reads a few floats. It judges each step at the next call,
so that it never waits for a step still running on the device, and whatever it keeps of a step is
its own copy (a train step may donate the weights and the optimizer state). The batch
(``inputs``/``outputs``/``targets``) and ``activations`` are copied to the host only at the steps
that need them: the first ones and the sampled ones. The doctor's own functions compile once per
tree structure, at their first call. Its own gradient norm is most of its cost on a CPU (a
separate pass over the gradients each step); return ``optax.global_norm(grads)`` from the jitted
step and pass it as ``grad_norm=`` to have it fused into the step for free
(``benchmarks/doctor_overhead_jax.py``).

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

from gradwise.doctor._judging import DEAD_WINDOW, IMBALANCE_BATCHES
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
        self.sample_every = sample_every
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._steps = 0  # steps recorded; NumericDoctor has judged all but the held one
        self._held: tuple[Any, Any, dict[str, Any]] | None = None  # the last step, not yet judged
        self._previous: list[list[Any]] | None = None  # device copy of the weights, by layer
        self._previous_names: list[str] | None = None
        self._snapshot_next = False  # NumericDoctor measures the next step's weights against these
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
        """Record one optimizer step.

        loss: the step's loss (a JAX scalar is read on the host at sampled steps only).
        grads / params / updates: pytrees of the gradients, the weights and Optax's updates
            (without ``updates`` the change of ``params`` over a step is measured instead).
        inputs / outputs / targets: the batch, the model's outputs (logits) and the targets.
        lr: the learning rate, or an Optax schedule (called with the step); else read from an
            ``optax.inject_hyperparams`` state passed as ``opt_state``.
        activations: name -> (kind such as "relu", the activation's output), e.g. from Flax's
            ``sow``; grad_norm: the global gradient norm when computed in the train step.

        The doctor judges each step at the next call (or at ``validate``, ``findings``, ``close``),
        so that it never waits for the device while the step it was given still runs: it returns
        the findings that fired at the step before this one.
        """
        step = self._steps
        self._steps += 1
        kwargs: dict[str, Any] = {}
        # everything that reads the user's arrays is dispatched (or copied) now: the next step may
        # donate their buffers; the rest waits in ``_held`` for the next call
        if grad_norm is None and grads is not None:
            with self._guard("the gradient norm"):
                grad_norm = _global_norm(_params_of(grads))
        if step < IMBALANCE_BATCHES or step % self.sample_every == 0:
            with self._guard("the batch"):
                kwargs.update(_batch(inputs, outputs, targets, layer_input))
        if activations and (step < DEAD_WINDOW or step % self.sample_every == 0):
            with self._guard("the activations"):
                kwargs["activations"] = {
                    name: (kind, _async_to_host(value))
                    for name, (kind, value) in activations.items()
                }
        if step % self.sample_every == 0 or self._snapshot_next:
            with self._guard("the per-layer statistics"):
                kwargs.update(self._layers(step, grads, params, updates))
            with self._guard("the learning rate"):
                kwargs["lr"] = _learning_rate(lr, opt_state, step)
        if params is not None and updates is None and (step + 1) % self.sample_every == 0:
            with self._guard("the weights' copy"):  # the next (sampled) step measures the update
                names, groups = _grouped(params)
                self._previous, self._previous_names = _copy(groups), names
        fired = self._judge()
        self._held = (loss, grad_norm, kwargs)
        return fired

    @property
    def wants_activations(self) -> bool:
        """Whether the next step reads ``activations`` (the first steps and the sampled ones):
        capture them (Flax's ``sow``, ``capture_intermediates``) only then, if that costs."""
        return self._steps < DEAD_WINDOW or self._steps % self.sample_every == 0

    @property
    def wants_batch(self) -> bool:
        """Whether the next step reads ``inputs``/``outputs``/``targets``."""
        return self._steps < IMBALANCE_BATCHES or self._steps % self.sample_every == 0

    def validate(self, loss: Any = None, metric: Any = None) -> list[Finding]:
        """Record an evaluation (validation loss and/or a metric, JAX scalars or floats);
        enables the generalisation rules (GW401 overfitting, GW404)."""
        self._judge()
        return self.doctor.validate(loss=loss, metric=metric)

    # -- results -------------------------------------------------------------------------------

    @property
    def findings(self) -> list[Finding]:
        """Findings so far (up to the last step recorded), errors first."""
        self._judge()
        return self.doctor.findings

    def summary(self) -> str:
        self._judge()
        return self.doctor.summary()

    def telemetry(self) -> dict:
        self._judge()
        return self.doctor.telemetry()

    def save(self, run_dir: str | Path | None = None) -> Path:
        """Write ``findings.json`` and ``telemetry.json`` into ``run_dir/doctor`` (default: the
        ``run_dir`` given to the constructor); returns that directory."""
        run_dir = Path(run_dir) if run_dir is not None else self.run_dir
        if run_dir is None:
            raise ValueError("save() needs a run directory: Doctor(run_dir=...) or save(run_dir)")
        self._judge()
        return self.doctor.save(run_dir / "doctor")

    def close(self) -> None:
        """End of the run: judge the last step and save into ``run_dir`` (when given), once."""
        if self._closed:
            return
        self._closed = True
        self._judge()
        self._previous = None
        with self._guard("judging the last steps"):
            self.doctor.finish()  # the steps since the last sampled one
        if self.run_dir is not None:
            with self._guard("saving the run directory"):
                self.save()

    def report(self, path: str | Path, **kwargs: Any) -> Path:
        """Write the self-contained HTML report of this run to ``path``."""
        self._judge()
        return self.doctor.report(path, **kwargs)

    def __enter__(self) -> Doctor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- measurements --------------------------------------------------------------------------

    def _judge(self) -> list[Finding]:
        """Hand the held step to NumericDoctor, its device values read on the host now."""
        held, self._held = self._held, None
        if held is None:
            return []
        loss, grad_norm, kwargs = held
        with self._guard("reading the per-layer statistics"):
            kwargs.update(_on_host(kwargs.pop("layers", None)))
        with self._guard("reading the learning rate"):
            kwargs["lr"] = _float(kwargs.get("lr"))
        return self.doctor.step(loss, grad_norm=grad_norm, **kwargs)

    def _layers(self, step: int, grads: Any, params: Any, updates: Any) -> dict[str, Any]:
        """Per layer, the norms of the gradient, the weights and the update, dispatched on the
        device now and read at the next call; NumericDoctor gets them as one-element arrays
        (whose norm is that norm): it reads the same ||g||/||w|| and ||u||/||w|| as from the whole
        arrays, and nothing the size of the weights crosses to the host.

        Without ``updates`` the update is the change of the weights since the step before, whose
        device copy was kept; at the first sample there is none, so a device copy of the weights
        goes to NumericDoctor whole (its host snapshot, measured against the next step's weights):
        the first steps' updates are the ones a learning rate far too high shows most clearly.
        """
        previous, previous_names = self._previous, self._previous_names
        self._previous = self._previous_names = None
        snapshot_follow_up, self._snapshot_next = self._snapshot_next, False
        if params is None:
            return {}
        names, weights = _grouped(params)
        if snapshot_follow_up and step % self.sample_every:
            return {"params": dict(zip(names, _copy(weights), strict=True))}
        g = _grouped(grads) if grads is not None else None
        u = _grouped(updates) if updates is not None else None
        same = previous is not None and previous_names == names
        delta = previous if u is None and same and _shapes(previous) == _shapes(weights) else None
        norms = _norms(weights, g[1] if g else None, u[1] if u else None, delta)
        layers = (names, g[0] if g else None, u[0] if u else None, norms)
        if u is None and delta is None:  # NumericDoctor keeps these weights (updates=None)
            self._snapshot_next = True
            return {"layers": layers, "params": dict(zip(names, _copy(weights), strict=True))}
        return {"layers": layers}

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


def _on_host(layers: tuple | None) -> dict[str, Any]:
    """NumericDoctor's grads/params/updates from the device norms of ``_layers`` (one transfer
    of a few floats); a whole-weights snapshot already in ``params`` is kept."""
    if layers is None:
        return {}
    names, grad_names, update_names, norms = layers
    w, gn, un, dn = jax.device_get(norms)
    out: dict[str, Any] = {"grads": _as_arrays(grad_names, gn) if grad_names else None}
    if update_names is not None:
        out.update(params=_as_arrays(names, w), updates=_as_arrays(update_names, un))
    elif dn is not None:
        out.update(params=_as_arrays(names, w), updates=_as_arrays(names, dn))
    else:
        out["updates"] = None  # the snapshot: ``params`` holds the weights' device copy
    return out


def _batch(inputs: Any, outputs: Any, targets: Any, layer_input: Any) -> dict[str, Any]:
    """The batch for the data checks: inputs and targets (ready: they went into the step) on the
    host now, the step's outputs copied asynchronously, read when the step is judged."""
    return {
        "inputs": _to_host(inputs),
        "targets": _to_host(targets),
        "layer_input": _to_host(layer_input),
        "outputs": _async_to_host(outputs),
    }


def _to_host(value: Any) -> Any:
    if isinstance(value, jax.Array):
        return np.asarray(value)
    return value


def _async_to_host(value: Any) -> Any:
    if isinstance(value, jax.Array):
        value.copy_to_host_async()
    return value


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
    """Sum of squares in float32 (or wider), as dot products: on XLA's CPU backend a dot of the
    flattened array is several times faster than a reduction of its squares."""
    total = jnp.zeros((), jnp.float32)
    for a in arrays:
        if jnp.issubdtype(a.dtype, jnp.complexfloating):
            a = jnp.abs(a)
        if jnp.issubdtype(a.dtype, jnp.inexact):
            v = a.ravel()
            wide = jnp.promote_types(v.dtype, jnp.float32)
            total = total + jnp.dot(v, v, preferred_element_type=wide).astype(jnp.float32)
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


def _learning_rate(lr: Any, opt_state: Any, step: int) -> Any:
    """The learning rate at ``step`` (a number, a schedule's value, or an inject_hyperparams
    state's), as it is: a device scalar is copied (the next step may donate the state) and read
    when the step is judged (``_float``)."""
    if lr is None and opt_state is not None:
        lr = _injected_lr(opt_state)
    elif callable(lr):
        lr = lr(step)
    return _copy(lr) if isinstance(lr, jax.Array) else lr


def _float(value: Any) -> float | None:
    if value is None:
        return None
    value = float(np.asarray(value, dtype=np.float64).reshape(()))
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
