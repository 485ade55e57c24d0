"""Layer groups, freezing by glob, discriminative learning rates and gradual unfreezing.

A model is split into layer groups, bottom to top: the embeddings (or stem), each block of its
longest block list, the head. Fine-tuning then treats groups differently (Howard & Ruder 2018,
ULMFiT): lower groups learn general features and get smaller learning rates (``lr_decay``, or
fastai's ``lr_range``), and are unfrozen last (``unfreeze_every``) or after the head has settled
(``head_epochs``, fastai's ``fine_tune``).

Every parameter that will ever train is in the optimizer from the first step; a frozen one simply
has no gradient (``requires_grad=False``), which AdamW and SGD skip entirely, weight decay
included. Unfreezing is then only ``requires_grad_(True)``: the parameter updates at the next step.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from gradwise.errors import ConfigError

__all__ = [
    "LayerGroup",
    "Unfreezer",
    "blocks",
    "discriminative_rates",
    "freeze",
    "head_names",
    "layer_groups",
    "settle_batchnorm",
    "unfreeze",
]


HEAD = "head"  # in freeze/unfreeze: the top layer group, whatever its modules are called
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


@dataclass
class LayerGroup:
    """One layer group: a name (a module path, or the glob that chose it) and its parameters."""

    name: str
    params: list[str] = field(default_factory=list)  # parameter names, in the model's order


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether a parameter name lies under any pattern: a module path ("features" or "features.0"),
    a glob of module paths or parameter names ("features.*", "*.bias", "*")."""
    return any(
        name == p or name.startswith(p + ".") or fnmatch.fnmatchcase(name, p) for p in patterns
    )


def _set_trainable(model: nn.Module, patterns: list[str], field_name: str, on: bool) -> list[str]:
    if isinstance(patterns, str):
        patterns = [patterns]
    names = [n for n, _ in model.named_parameters()]
    if HEAD in patterns and not any(matches(n, [HEAD]) for n in names):
        patterns = [p for p in patterns if p != HEAD] + layer_groups(model)[-1].params
    for pattern in patterns:
        if not any(matches(n, [pattern]) for n in names):
            raise ConfigError(
                field_name,
                pattern,
                "a module path or glob that matches parameters of the model",
                f"the model's modules start: {', '.join(_top_paths(model)[:8])}",
            )
    chosen = [n for n, p in model.named_parameters() if matches(n, patterns)]
    params = dict(model.named_parameters())
    for n in chosen:
        params[n].requires_grad_(on)
    return chosen


def freeze(model: nn.Module, patterns: list[str] | str) -> list[str]:
    """Freeze the parameters under ``patterns`` (module paths or globs); returns their names."""
    return _set_trainable(model, patterns, "finetune.freeze", False)


def unfreeze(model: nn.Module, patterns: list[str] | str) -> list[str]:
    """Make the parameters under ``patterns`` trainable again; returns their names."""
    return _set_trainable(model, patterns, "finetune.unfreeze", True)


def _top_paths(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_children() if any(True for _ in m.parameters())]


def _block_list(model: nn.Module) -> tuple[str, list[str]] | None:
    """The module path of the model's main stack of blocks and its children's names: the
    ModuleList or Sequential with two or more parameterised children that holds the most
    parameters (a transformer's layers, a CNN's stages); None when there is none."""
    best, best_size = None, 0
    for path, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = [(n, sum(p.numel() for p in c.parameters())) for n, c in module.named_children()]
        children = [(n, size) for n, size in children if size]
        size = sum(s for _, s in children)
        if len(children) >= 2 and size > best_size:
            best, best_size = (path, [n for n, _ in children]), size
    return best


def blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of the model's main stack (see :func:`layer_groups`); [] when it has none."""
    found = _block_list(model)
    if found is None:
        return []
    path, names = found
    stack = model.get_submodule(path) if path else model
    return [stack.get_submodule(n) for n in names]


def layer_groups(model: nn.Module, spec: list[str] | str = "auto") -> list[LayerGroup]:
    """The model's layer groups, bottom to top.

    ``auto``: the parameters before the main block list (embeddings, stem), each block, and the
    parameters after it (the head); a model without a block list: its top-level children. A list
    of globs: each parameter goes to the first group whose glob it matches; every parameter must
    match one (end with "*" to catch the rest).
    """
    names = [n for n, _ in model.named_parameters()]
    if spec != "auto":
        return _groups_from_globs(names, list(spec))
    found = _block_list(model)
    if found is None:
        root = LayerGroup("(root)")  # parameters registered on the model itself
        groups = [root, *(LayerGroup(child) for child in _top_paths(model))]
        for n in names:
            next((g for g in groups[1:] if matches(n, [g.name])), root).params.append(n)
        return [g for g in groups if g.params]
    path, blocks = found
    prefix = f"{path}." if path else ""
    stem, head = LayerGroup("stem"), LayerGroup("head")
    groups = {b: LayerGroup(f"{prefix}{b}") for b in blocks}
    seen_block = False
    for n in names:
        block = n[len(prefix) :].split(".", 1)[0] if n.startswith(prefix) else None
        if block in groups:
            groups[block].params.append(n)
            seen_block = True
        else:
            (head if seen_block else stem).params.append(n)
    stem.name = _common_name(stem.params, "stem")
    head.name = _common_name(head.params, "head")
    return [g for g in (stem, *_with_norms(model, prefix, groups), head) if g.params]


def _with_norms(model: nn.Module, prefix: str, groups: dict[str, LayerGroup]) -> list[LayerGroup]:
    """Blocks with a normalisation layer that follows its layer in a flat stack (Conv, BatchNorm,
    ReLU, ...) joined into the layer's group: a norm trains and unfreezes with its layer."""
    out: list[LayerGroup] = []
    for block, group in groups.items():
        module = model.get_submodule(f"{prefix}{block}")
        if out and isinstance(module, _NORMS):
            out[-1].params.extend(group.params)
        else:
            out.append(group)
    return out


def _common_name(params: list[str], default: str) -> str:
    """The modules a group's parameters belong to, for messages ("bert.pooler, classifier")."""
    modules = dict.fromkeys(p.rsplit(".", 1)[0] if "." in p else p for p in params)
    tops: dict[str, None] = {}
    for m in modules:
        parts = m.split(".")
        tops[".".join(parts[: 2 if len(parts) > 2 else len(parts)])] = None
    return ", ".join(list(tops)[:3]) + (", ..." if len(tops) > 3 else "") if tops else default


def _groups_from_globs(names: list[str], globs: list[str]) -> list[LayerGroup]:
    if not globs:
        raise ConfigError("finetune.layer_groups", globs, "auto, or a non-empty list of globs")
    groups = [LayerGroup(g) for g in globs]
    for n in names:
        group = next((g for g in groups if matches(n, [g.name])), None)
        if group is None:
            raise ConfigError(
                "finetune.layer_groups",
                globs,
                "globs that together match every parameter",
                f"{n!r} matches none; end the list with '*' to catch the rest",
            )
        group.params.append(n)
    empty = [g.name for g in groups if not g.params]
    if empty:
        raise ConfigError("finetune.layer_groups", empty[0], "a glob that matches a parameter")
    return groups


def head_names(model: nn.Module) -> list[str]:
    """Module paths of the model's head: the modules owning the top layer group's parameters."""
    params = layer_groups(model)[-1].params
    return list(dict.fromkeys(p.rsplit(".", 1)[0] for p in params if "." in p))


def discriminative_rates(
    n: int, lr: float, decay: float | None = None, lr_range: tuple[float, float] | None = None
) -> list[float]:
    """Learning rates for ``n`` groups, bottom to top: the top at ``lr`` and each lower one divided
    by ``decay`` (ULMFiT: 2.6), or spaced geometrically over ``lr_range`` (fastai's slice)."""
    if lr_range is not None:
        low, high = lr_range
        return [high] if n == 1 else [low * (high / low) ** (i / (n - 1)) for i in range(n)]
    if decay is not None:
        return [lr / decay ** (n - 1 - i) for i in range(n)]
    return [lr] * n


class Unfreezer:
    """Which layer groups train at a position of the run: gradual unfreezing (top group first,
    one more every ``every`` epochs or ``steps`` steps) or fastai's two phases (the head alone for
    ``head_epochs``, then every group at half the rates).

    The trainable set is a function of the position, so resuming recomputes it; the halving of the
    rates happens once, when the run crosses into the second phase (a resumed optimizer already
    carries it).
    """

    def __init__(
        self,
        model: nn.Module,
        groups: list[LayerGroup],
        *,
        every: int | None = None,
        steps: int | None = None,
        head_epochs: int | None = None,
        held: Iterable[str] = (),
    ) -> None:
        self.groups, self.every, self.steps, self.head_epochs = groups, every, steps, head_epochs
        self.params = dict(model.named_parameters())
        self.held = set(held)  # frozen for the whole run (finetune.freeze): never unfrozen here
        self.stage = 0  # groups trainable from the top

    @property
    def active(self) -> bool:
        return bool(self.every or self.steps or self.head_epochs)

    def target(self, epoch: int, step: int) -> int:
        """How many groups, from the top, train at this position."""
        n = len(self.groups)
        if self.head_epochs:
            return 1 if epoch < self.head_epochs else n
        done = step // self.steps if self.steps else epoch // self.every
        return min(n, 1 + done)

    def apply(self, epoch: int, step: int) -> list[str]:
        """Set requires_grad for this position; the names of the groups newly unfrozen."""
        target = self.target(epoch, step)
        n = len(self.groups)
        for i, group in enumerate(self.groups):
            on = i >= n - target
            for name in group.params:
                if name not in self.held:
                    self.params[name].requires_grad_(on)
        opened = (
            [g.name for g in self.groups[n - target : n - self.stage]]
            if target > self.stage
            else []
        )
        self.stage = target
        return opened

    def second_phase(self, before: int) -> bool:
        """Whether the last apply crossed from the head-only phase into the full one."""
        return bool(self.head_epochs) and before == 1 and self.stage == len(self.groups) > 1


def settle_batchnorm(model: nn.Module) -> int:
    """Put BatchNorm layers whose parameters are all frozen into eval mode, so their running
    statistics stay those of pre-training (call after ``model.train()``); returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()
                count += 1
    return count
