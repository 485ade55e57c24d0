"""Activation checkpointing: recompute a block's activations in the backward pass instead of keeping them.

    names = apply_activation_checkpointing(model, recipe.train.activation_checkpointing)
    report = measure_activation_memory(model, lambda m: loss_fn(m(x), y))

Each chosen block's ``forward`` runs under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``
(Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"): only the block's inputs are kept
for the backward pass, and its inner activations are recomputed there, with the random state of the
forward pass (dropout draws the same masks). The wrapper replaces the ``forward`` of the module
instance only: parameter names, ``state_dict`` keys, the module's type and its hooks are unchanged,
so checkpoints of runs with and without it are interchangeable, and module hooks (FSDP2's
``fully_shard``, DDP's, the doctor's on the block itself) stay outside the recomputed region, as
Hugging Face's own ``GradientCheckpointingLayer`` does it. BatchNorm running statistics are restored
after a recomputation, so they are updated once per forward pass, as without checkpointing.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import threading
import time
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gradwise.errors import ConfigError, GradwiseWarning, did_you_mean

FIELD = "train.activation_checkpointing"
_INNER = "_gradwise_inner_forward"  # a forward the instance had before it was wrapped
_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache")
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)
_state = threading.local()


def zoo_blocks() -> tuple[type[nn.Module], ...]:
    """The block types of gradwise's zoo that ``activation_checkpointing: true`` recomputes:
    the pre-norm Transformer block (``transformer``, ``gpt``) and ResNet's BasicBlock."""
    from gradwise.models.blocks import Block
    from gradwise.models.resnet import BasicBlock

    return (Block, BasicBlock)


def apply_activation_checkpointing(model: nn.Module, spec: bool | list[str] | None) -> list[str]:
    """Checkpoint the blocks of ``model`` that ``spec`` (the recipe's
    ``train.activation_checkpointing``) chooses, in place; returns their module paths.

    spec: False (or None, []) nothing; True the blocks of the zoo's Transformer, GPT and ResNet, or a
    Hugging Face model's decoder/encoder layers; a list of module type names (``BertLayer``, or the
    qualified ``module.Class``) or module-path globs (``encoder.layer.*``). Of nested matches only
    the outermost module is checkpointed. A name or glob that matches nothing, or ``True`` on a
    model without known blocks, is a ConfigError that lists the model's module types.
    Calling it again on a checkpointed model wraps nothing twice.
    """
    if spec is None or spec is False or (isinstance(spec, list) and not spec):
        return []
    if spec is True:
        chosen = _known_blocks(model)
    elif isinstance(spec, (list, tuple)) and all(isinstance(s, str) for s in spec):
        chosen = _matching(model, list(spec))
    else:
        raise ConfigError(
            FIELD, spec, "true, false or a list of module type names or module-path globs"
        )
    names = []
    for name, module in _outermost(chosen):
        wrap(module)
        names.append(name)
    return names


def wrap(module: nn.Module) -> nn.Module:
    """Recompute ``module``'s activations in the backward pass (in place; returns ``module``).

    The instance's ``forward`` becomes one that runs the original under non-reentrant
    ``torch.utils.checkpoint``; nothing else about the module changes."""
    if is_wrapped(module):
        return module
    own = module.__dict__.get("forward")
    if own is not None:  # a forward set on the instance before (e.g. by another library): keep it
        module.__dict__[_INNER] = own
    module.forward = types.MethodType(_checkpointed_forward, module)
    return module


def unwrap(model: nn.Module) -> list[str]:
    """Undo :func:`wrap` on every module of ``model``; returns the paths of those unwrapped."""
    names = []
    for name, module in model.named_modules():
        if is_wrapped(module):
            del module.__dict__["forward"]
            inner = module.__dict__.pop(_INNER, None)
            if inner is not None:
                module.forward = inner
            names.append(name)
    return names


def is_wrapped(module: nn.Module) -> bool:
    """Whether ``module``'s forward is checkpointed by :func:`wrap`."""
    forward = module.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _checkpointed_forward


def checkpointed(model: nn.Module) -> list[str]:
    """The module paths of ``model`` whose activations are recomputed."""
    return [name for name, module in model.named_modules() if is_wrapped(module)]


def recomputing() -> bool:
    """True while a checkpointed block re-runs its forward in the backward pass, in the thread
    that runs it. Module hooks inside the block fire a second time then (a statistics hook can
    skip those calls); the replay stops once it has what the backward pass needs, so the last
    hooks of a block may not fire again."""
    return getattr(_state, "depth", 0) > 0


# -- the wrapper -------------------------------------------------------------------------------


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    inner = self.__dict__.get(_INNER) or type(self).forward.__get__(self)
    if not (torch.is_grad_enabled() and self.training):
        return inner(*args, **kwargs)  # no backward to replay, or evaluation: run as is
    kwargs = _without_cache(self, kwargs)
    calls = 0

    def run(*a: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            return inner(*a, **kwargs)
        with _recomputation(self):  # every call after the first replays the block in backward
            return inner(*a, **kwargs)

    # keyword arguments travel in the closure: they cannot collide with checkpoint's own options
    return checkpoint(run, *args, use_reentrant=False)


def _without_cache(module: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A key/value cache (Hugging Face decoder layers) would be written a second time by the
    replay: like transformers' own checkpointing, the layer trains without one (``use_cache``
    off; a cache object given is dropped with a warning, once per layer type)."""
    dropped = [k for k in _CACHE_KWARGS if kwargs.get(k) is not None]
    if not dropped and not kwargs.get("use_cache"):
        return kwargs
    kind = type(module).__name__
    warned = getattr(_state, "warned", set())
    if dropped and kind not in warned:
        _state.warned = warned | {kind}
        warnings.warn(
            f"{FIELD}: {kind} was given {', '.join(dropped)}; a cache is incompatible with "
            "recomputing the layer, so it trains without one",
            GradwiseWarning,
            stacklevel=4,
        )
    changed = {k: None for k in dropped}
    if "use_cache" in kwargs:
        changed["use_cache"] = False
    return {**kwargs, **changed}


@contextlib.contextmanager
def _recomputation(module: nn.Module) -> Iterator[None]:
    """Mark the replay, and put back the running statistics of the block's BatchNorms, which the
    replay would otherwise update a second time (running mean, variance and batch count)."""
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats:
            for t in (m.running_mean, m.running_var, m.num_batches_tracked):
                if t is not None:
                    saved.append((t, t.clone()))
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
        with torch.no_grad():
            for t, value in saved:
                t.copy_(value)


# -- choosing the modules ----------------------------------------------------------------------


def _known_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The zoo's blocks, else a Hugging Face model's checkpointable layers
    (``GradientCheckpointingLayer`` subclasses, else the types in ``_no_split_modules``)."""
    zoo = zoo_blocks()
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, zoo)]
    if found:
        return found
    found = [
        (n, m)
        for n, m in model.named_modules()
        if any(c.__name__ == "GradientCheckpointingLayer" for c in type(m).__mro__[1:])
    ]
    if found:
        return found
    names: set[str] = set()
    for m in model.modules():
        listed = getattr(m, "_no_split_modules", None)
        if isinstance(listed, (list, tuple, set)):
            names.update(x for x in listed if isinstance(x, str) and "Embedding" not in x)
    found = [(n, m) for n, m in model.named_modules() if type(m).__name__ in names]
    if found:
        return found
    raise ConfigError(
        FIELD,
        True,
        "a model with blocks gradwise knows (the zoo's transformer, gpt and resnet, or a Hugging "
        f"Face model's layers); {type(model).__name__} has none",
        f"list the module types to recompute instead, e.g. {FIELD}: {_examples(model)}; "
        f"this model's module types: {', '.join(module_types(model))}",
    )


def _matching(model: nn.Module, spec: list[str]) -> list[tuple[str, nn.Module]]:
    """Modules whose type name (or qualified name) or path matches an entry; each entry must match."""
    modules = list(model.named_modules())
    chosen: dict[str, nn.Module] = {}
    for entry in spec:
        hits = [
            (name, m)
            for name, m in modules
            if entry in (type(m).__name__, f"{type(m).__module__}.{type(m).__qualname__}")
            or (name and fnmatch.fnmatchcase(name, entry))
        ]
        if not hits:
            types_ = module_types(model)
            close = did_you_mean(entry, types_) or did_you_mean(entry, [n for n, _ in modules if n])
            raise ConfigError(
                FIELD,
                entry,
                f"a module type name or module-path glob of {type(model).__name__}",
                (f"{close} " if close else "")
                + f"its module types: {', '.join(types_)}; paths look like {_sample_paths(modules)}",
            )
        chosen.update(hits)
    order = {name: i for i, (name, _) in enumerate(modules)}
    return sorted(chosen.items(), key=lambda item: order[item[0]])


def _outermost(chosen: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Drop modules that lie inside another chosen one (recomputing twice saves nothing)."""
    kept: list[tuple[str, nn.Module]] = []
    for name, module in chosen:
        inside = any(
            (parent == "" and name != "") or name.startswith(parent + ".") for parent, _ in kept
        )
        if not inside:
            kept.append((name, module))
    return kept


def module_types(model: nn.Module, limit: int = 12) -> list[str]:
    """Distinct module type names of ``model``, composite ones (with children) first, at most
    ``limit``; containers (ModuleList, Sequential, ModuleDict) left out."""
    composite: list[str] = []
    leaves: list[str] = []
    for m in model.modules():
        if isinstance(m, _CONTAINERS) or m is model:
            continue
        name = type(m).__name__
        target = composite if any(True for _ in m.children()) else leaves
        if name not in composite and name not in leaves:
            target.append(name)
    return (composite + leaves)[:limit]


def _examples(model: nn.Module) -> list[str]:
    composite = [
        type(m).__name__
        for m in model.modules()
        if m is not model and not isinstance(m, _CONTAINERS) and any(True for _ in m.children())
    ]
    return list(dict.fromkeys(composite))[:2] or module_types(model, 2)


def _sample_paths(modules: list[tuple[str, nn.Module]]) -> str:
    """Example paths: an item of the model's longest block list, and the glob that takes them all."""
    lists = [
        (len(m), name)
        for name, m in modules
        if name and isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 1
    ]
    if lists:
        _, name = max(lists, key=lambda item: item[0])
        return f"{name}.0 (all of them: {name}.*)"
    return ", ".join(name for name, _ in modules if name and "." not in name)


# -- measuring the saving ----------------------------------------------------------------------


class _SavedBytes:
    """Counts the bytes of the distinct storages autograd keeps for the backward pass
    (``torch.autograd.graph.saved_tensors_hooks``), not counting parameters and buffers."""

    def __init__(self, model: nn.Module) -> None:
        self.skip = {_storage_key(t) for t in (*model.parameters(), *model.buffers())}
        self.seen: set[tuple] = set()
        self.bytes = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            key = _storage_key(t)
            if key not in self.skip and key not in self.seen:
                self.seen.add(key)
                self.bytes += t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError, TypeError):  # a tensor without storage
            pass
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr())


def measure_activation_memory(
    model: nn.Module,
    batch_fn: Callable[[nn.Module], torch.Tensor],
    spec: bool | list[str] = True,
) -> dict[str, Any]:
    """The activation memory of one training step without and with checkpointing ``spec``.

    ``batch_fn(model)`` runs the forward pass and returns the loss. Both runs use a deep copy of
    ``model`` (the model, its gradients and the global random state are left as they were).
    Returns ``saved_mb`` / ``saved_mb_checkpointed``: the bytes autograd keeps for the backward
    pass at the end of the forward pass (measured on any device by the saved-tensor hooks; the
    distinct storages, parameters excluded); ``peak_mb`` / ``peak_mb_checkpointed``: on CUDA, the
    peak of ``torch.cuda.max_memory_allocated`` over forward and backward above the memory in use
    before it (None elsewhere); ``seconds`` / ``seconds_checkpointed`` of the step (one run each);
    ``wrapped``: the checkpointed module paths.
    """
    plain = copy.deepcopy(model)
    unwrap(plain)
    without = _measure(plain, batch_fn)
    del plain
    wrapped = copy.deepcopy(model)
    unwrap(wrapped)
    names = apply_activation_checkpointing(wrapped, spec)
    with_ = _measure(wrapped, batch_fn)
    del wrapped
    mb = 2**20

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    return {
        "wrapped": names,
        "saved_mb": without["saved"] / mb,
        "saved_mb_checkpointed": with_["saved"] / mb,
        "saved_ratio": ratio(without["saved"], with_["saved"]),
        "peak_mb": None if without["peak"] is None else without["peak"] / mb,
        "peak_mb_checkpointed": None if with_["peak"] is None else with_["peak"] / mb,
        "peak_ratio": ratio(without["peak"], with_["peak"]),
        "seconds": without["seconds"],
        "seconds_checkpointed": with_["seconds"],
    }


def _measure(model: nn.Module, batch_fn: Callable[[nn.Module], torch.Tensor]) -> dict[str, Any]:
    model.train()
    for p in model.parameters():
        p.grad = None
    cuda = [p.device for p in model.parameters() if p.device.type == "cuda"]
    devices = sorted({d.index or 0 for d in cuda})
    with torch.random.fork_rng(devices=devices):
        counter = _SavedBytes(model)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            loss = batch_fn(model)
        loss.backward()
        del loss
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() - base if cuda else None
    return {"saved": counter.bytes, "peak": peak, "seconds": seconds}
