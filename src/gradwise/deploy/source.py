"""Where an exported model comes from: a run (or checkpoint) directory, rebuilt with its weights.

    source = load_source("runs/digits-cnn", trusted=False)   # recipe, best checkpoint, its metrics
    model = load_model(source)                                 # eval mode, the EMA weights if kept

Shared by export (the model to export) and bench (eager PyTorch next to the artifact).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradwise.errors import ConfigError, DataError


@dataclass
class Source:
    """Where the model and its data come from."""

    run_dir: Path | None = None
    checkpoint: Path | None = None
    recipe: Any = None  # gradwise.recipe.Recipe
    meta: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None  # "model" or "ema"
    trusted: bool = True  # whether the recipe's import paths may be imported


def load_source(path: str | Path, trusted: bool) -> Source:
    """The run behind a run or checkpoint directory: its recipe, best checkpoint and metrics."""
    from gradwise.checkpoint import CHECKPOINTS, resolve_checkpoint
    from gradwise.recipe import load_recipe

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist: expected a run directory or a checkpoint")
    ckpt = resolve_checkpoint(path)
    run_dir = ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS else None
    recipe_file = run_dir / "recipe.yaml" if run_dir is not None else None
    if recipe_file is None or not recipe_file.is_file():
        raise DataError(f"{path}: no recipe.yaml found; expected a gradwise run directory")
    meta_file = ckpt / "meta.json"
    meta = _json(meta_file) if meta_file.is_file() else {}
    recipe = load_recipe(recipe_file)
    return Source(run_dir=run_dir, checkpoint=ckpt, recipe=recipe, meta=meta, trusted=trusted)


def _json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def load_model(source: Source, model: nn.Module | None = None) -> nn.Module:
    """``model`` (else the recipe's model, rebuilt) on the CPU in eval mode, with the checkpoint's
    weights when there is a checkpoint (``source.weights`` then says which)."""
    from gradwise.assemble import OBJECT

    if model is not None and not isinstance(model, nn.Module):
        raise ConfigError("model", type(model).__name__, "a torch.nn.Module")
    if model is None:
        from gradwise.models import build_model

        name = source.recipe.model.name
        if name.startswith(OBJECT):
            raise ConfigError(
                "model",
                None,
                f"the {name.removeprefix(OBJECT)} model object this run was trained with",
                "pass it again: export(run_dir, model=model)",
            )
        model = build_model(name, source.recipe.model.kwargs, trusted=source.trusted)
    model = model.cpu()
    if source.checkpoint is not None:
        model = _with_adapter(model, source, source.checkpoint)
        source.weights = _load_weights(model, source.checkpoint)
    return model.eval()


def _weights_file(ckpt: Path) -> tuple[Path, bool]:
    """The checkpoint's weights file: the EMA copy when there is one (the run validated it)."""
    from gradwise.checkpoint import EMA_WEIGHTS, WEIGHTS

    ema = (ckpt / EMA_WEIGHTS).is_file()
    return ckpt / (EMA_WEIGHTS if ema else WEIGHTS), ema


def _with_adapter(model: nn.Module, source: Source, ckpt: Path) -> nn.Module:
    """For an adapter-only checkpoint (a run with finetune.peft): the model prepared as the run
    prepared it (its pretrained weights loaded, the adapter wrapped around them); loading the
    checkpoint then checks that this base is the one the adapter was trained over."""
    from gradwise.checkpoint import adapter_info
    from gradwise.finetune import prepare
    from gradwise.finetune.adapters import is_peft

    info = adapter_info(_weights_file(ckpt)[0])
    if info is None or is_peft(model):
        return model
    spec = source.recipe.finetune if source.recipe is not None else None
    if spec is None or spec.peft is None:
        raise DataError(
            f"checkpoint {ckpt} holds only a {info.get('peft', {}).get('method')} "
            "adapter but its recipe names no finetune.peft: pass the model wrapped with "
            "gradwise.finetune.apply_peft"
        )
    return prepare(model, spec).model


def _load_weights(model: nn.Module, ckpt: Path) -> str:
    """Load the checkpoint's weights: the EMA copy when there is one (the run validated it)."""
    from safetensors.torch import load_file

    from gradwise.checkpoint import adapter_info, load_weights

    file, ema = _weights_file(ckpt)
    if adapter_info(file) is not None:  # the base is checked against its fingerprint
        load_weights(model, file, unwrap=ema)
        return "ema" if ema else "model"
    state = load_file(str(file))
    if ema:  # an AveragedModel: "module." prefixes and its n_averaged counter
        state = {k.removeprefix("module."): v for k, v in state.items() if k != "n_averaged"}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that do not fit
        raise DataError(
            f"the weights in {ckpt} do not fit the model: {str(exc).splitlines()[-1].strip()}"
        ) from None
    missing = [k for k in result.missing_keys if not _shared(model, k, state)]
    if missing or result.unexpected_keys:
        raise DataError(
            f"the weights in {ckpt} do not fit the model: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
    return "ema" if ema else "model"


def _shared(model: nn.Module, key: str, state: dict[str, torch.Tensor]) -> bool:
    """Whether parameter ``key`` is the same tensor as one that ``state`` holds (weight tying)."""
    tensors = dict(model.state_dict(keep_vars=True))
    target = tensors[key]
    return any(tensors[k] is target for k in state if k in tensors and k != key)
