"""The model registry and :func:`build_model`, which sizes a model from the data it will see."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from gradwise.errors import ConfigError, did_you_mean
from gradwise.recipe import call_factory
from gradwise.registry import Registry, resolve

if TYPE_CHECKING:
    from gradwise.data.bundle import DataInfo

# infer(info, num_outputs, given_kwargs) -> the size arguments derivable from the data
InferFn = Callable[["DataInfo | None", "int | None", dict[str, Any]], dict[str, Any]]

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

# the size arguments build_model fills, when derivable from the data, for any factory that names
# them and whose kwargs do not give them (docs/reference.md and `gradwise models` show this table)
SIZE_ARGS = {
    "in_features": "features per sample: prod(input_shape) for flat inputs, the last axis for "
    "float sequences [T, F]",
    "in_channels": "channels of a [C, H, W] image input",
    "input_shape": "the shape of one input sample, without the batch axis",
    "num_outputs": "the output layer's width: classes (multiclass), 1 (binary, regression), labels "
    "(multilabel), vocabulary (lm)",
    "num_classes": "the same as num_outputs, for factories that call it that",
    "vocab_size": "the vocabulary of token-id inputs (largest id + 1)",
    "seq_len": "the length of a token or feature sequence",
    "max_seq_len": "the same as seq_len, for position embeddings",
}


def register_model(name: str, infer: InferFn | None = None) -> Callable[[Callable], Callable]:
    """Register a model factory under ``name``; ``infer`` says how its size arguments come from data.

    Without ``infer`` the generic rule of :func:`infer_generic` is used.
    """

    def decorator(fn: Callable) -> Callable:
        fn.gradwise_infer = infer  # type: ignore[attr-defined]
        return MODELS.register(name)(fn)

    return decorator


def _is_tokens(info: DataInfo) -> bool:
    return info.input_dtype.startswith("int")


def infer_generic(info: DataInfo | None, num_outputs: int | None, given: dict) -> dict[str, Any]:
    """Every size argument derivable from ``info`` / ``num_outputs`` (None values are left out).

    ``in_features`` is the per-position width ``input_shape[-1]`` for float sequences
    (``info.seq_len`` set), else ``prod(input_shape)`` (flattened); ``in_channels`` is
    ``input_shape[0]`` of a ``C,H,W`` input; ``num_classes`` is the output width.
    """
    out: dict[str, Any] = {"num_outputs": num_outputs, "num_classes": num_outputs}
    if info is not None:
        shape = tuple(info.input_shape)
        out["input_shape"] = shape
        out["seq_len"] = out["max_seq_len"] = info.seq_len
        if _is_tokens(info):
            out["vocab_size"] = info.vocab_size
        elif shape:
            sequence = info.seq_len is not None and len(shape) >= 2
            out["in_features"] = shape[-1] if sequence else math.prod(shape)
            if len(shape) == 3:
                out["in_channels"] = shape[0]
    return {k: v for k, v in out.items() if v is not None}


def infer_flat(info: DataInfo | None, num_outputs: int | None, given: dict) -> dict[str, Any]:
    """MLP rule: ``in_features = prod(input_shape)`` (inputs are flattened)."""
    out = {"num_outputs": num_outputs}
    if info is not None:
        out["in_features"] = math.prod(info.input_shape)
    return {k: v for k, v in out.items() if v is not None}


def infer_image(info: DataInfo | None, num_outputs: int | None, given: dict) -> dict[str, Any]:
    """CNN rule: ``in_channels = input_shape[0]`` of a ``C,H,W`` input."""
    out = {"num_outputs": num_outputs}
    if info is not None and info.input_shape:
        out["in_channels"] = info.input_shape[0]
    return {k: v for k, v in out.items() if v is not None}


def infer_sequence(info: DataInfo | None, num_outputs: int | None, given: dict) -> dict[str, Any]:
    """Sequence rule: token ids give ``vocab_size``, float ``[T, F]`` inputs ``in_features = F``.

    Neither is inferred when the user gave one of them; ``max_seq_len`` is the data's length.
    """
    out: dict[str, Any] = {"num_outputs": num_outputs}
    if info is not None:
        if "vocab_size" not in given and "in_features" not in given:
            if _is_tokens(info):
                out["vocab_size"] = info.vocab_size
            elif info.input_shape:
                out["in_features"] = info.input_shape[-1]
        out["max_seq_len"] = info.seq_len or (info.input_shape[0] if info.input_shape else None)
    return {k: v for k, v in out.items() if v is not None}


def infer_lm(info: DataInfo | None, num_outputs: int | None, given: dict) -> dict[str, Any]:
    """Language-model rule: ``vocab_size`` (the output width too), ``max_seq_len = seq_len``."""
    out: dict[str, Any] = {"vocab_size": num_outputs}
    if info is not None:
        out["vocab_size"] = info.vocab_size or num_outputs
        out["max_seq_len"] = info.seq_len or (info.input_shape[0] if info.input_shape else None)
    return {k: v for k, v in out.items() if v is not None}


def _parameters(factory: Callable, name: str) -> tuple[dict[str, inspect.Parameter], bool]:
    """The factory's named parameters and whether it takes ``**kwargs``."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}, True  # no signature to check against: pass everything through
    named = {k: p for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named, any(p.kind is p.VAR_KEYWORD for p in params.values())


def build_model(
    name: str,
    kwargs: dict | None = None,
    info: DataInfo | None = None,
    num_outputs: int | None = None,
    *,
    trusted: bool = True,
) -> nn.Module:
    """Build model ``name`` (a registered name or ``package.module:factory``) sized for the data.

    User ``kwargs`` win; arguments not given are filled from ``info`` and ``num_outputs`` (the
    output-layer width) by the model's infer rule. Problems raise :class:`ConfigError` naming
    ``model.name`` or ``model.kwargs.<arg>``. The returned module carries
    ``gradwise_build = {"name": ..., "kwargs": ...}``, the fully resolved arguments, so it can be
    rebuilt without the data (e.g. from a checkpoint). ``trusted=False`` refuses import paths
    (the name comes from a directory the user has not trusted; see :mod:`gradwise.trust`).
    """
    if not isinstance(name, str) or not name:
        raise ConfigError("model.name", name, "a registered model name or 'package.module:factory'")
    factory = resolve(MODELS, name, "model.name", trusted=trusted)
    if not callable(factory):
        raise ConfigError("model.name", name, "a callable model factory")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ConfigError("model.kwargs", kwargs, "a mapping of argument names to values")
    given = dict(kwargs or {})
    params, var_kw = _parameters(factory, name)

    if not var_kw:
        for key, value in given.items():
            if key not in params:
                hint = did_you_mean(key, params) or f"{name} accepts: {', '.join(params) or 'none'}"
                raise ConfigError(f"model.kwargs.{key}", value, f"an argument of {name!r}", hint)

    infer = getattr(factory, "gradwise_infer", None) or infer_generic
    inferred = infer(info, num_outputs, given)
    resolved = {k: v for k, v in inferred.items() if k in params and k not in given}
    resolved.update(given)

    for key, p in params.items():
        if p.default is inspect.Parameter.empty and key not in resolved:
            why = "no data info was given" if info is None else f"data {info.name!r} does not say"
            if key in ("num_outputs", "num_classes") and num_outputs is None:
                why = "no num_outputs was given"
            raise ConfigError(
                f"model.kwargs.{key}",
                None,
                f"a value for the required argument {key!r} of {name!r}",
                f"it could not be inferred ({why}); set model.kwargs.{key}",
            )

    model = call_factory(factory, resolved, "model.kwargs", name)  # wrong types: ConfigError
    if not isinstance(model, nn.Module):
        raise ConfigError(
            "model.name",
            name,
            "a factory that returns a torch.nn.Module",
            f"it returned {type(model).__name__}",
        )
    model.gradwise_build = {"name": name, "kwargs": resolved}
    return model


def check_choice(arg: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise a ConfigError for ``model.kwargs.<arg>`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        hint = (
            did_you_mean(value, [c for c in choices if isinstance(c, str)])
            if isinstance(value, str)
            else None
        )
        raise ConfigError(f"model.kwargs.{arg}", value, f"one of {list(choices)}", hint)


def check_positive(arg: str, value: Any) -> None:
    """Raise a ConfigError for ``model.kwargs.<arg>`` unless ``value`` is a positive int."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"model.kwargs.{arg}", value, "a positive integer")
