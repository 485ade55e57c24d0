"""Fine-tuning: start from pretrained weights and adapt them (recipe section ``finetune``).

pretrained.py  load weights (run directory, state-dict file, Hugging Face directory), key report
layers.py      layer groups, freezing by glob, discriminative rates, gradual unfreezing
adapters.py    parameter-efficient fine-tuning through Hugging Face peft
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gradwise.errors import ConfigError
from gradwise.finetune.layers import (
    LayerGroup,
    Unfreezer,
    discriminative_rates,
    freeze,
    head_names,
    layer_groups,
    settle_batchnorm,
    unfreeze,
)


def __getattr__(name: str) -> Any:
    """load_pretrained and KeyReport on first use (they import safetensors and the checkpoints)."""
    if name in ("load_pretrained", "KeyReport"):
        from gradwise.finetune import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'gradwise.finetune' has no attribute {name!r}")


if TYPE_CHECKING:
    from torch import nn

    from gradwise.recipe import FinetuneSpec, OptimSpec

__all__ = [
    "Finetuning",
    "KeyReport",
    "LayerGroup",
    "Unfreezer",
    "discriminative_rates",
    "freeze",
    "head_names",
    "layer_groups",
    "load_pretrained",
    "prepare",
    "settle_batchnorm",
    "unfreeze",
]

# settings that reshape the optimizer by layer group: not combined with an adapter, whose base is
# frozen and whose trainable parameters are the adapter's own
_BY_GROUP = ("lr_decay", "lr_range", "head_epochs", "unfreeze_every", "unfreeze_steps", "freeze")


@dataclass
class Finetuning:
    """A model made ready for fine-tuning, and what was done to it."""

    spec: FinetuneSpec
    model: nn.Module  # the peft model when an adapter is trained
    report: Any = None  # gradwise.finetune.pretrained.KeyReport, when weights were loaded
    groups: list[LayerGroup] = field(default_factory=list)
    unfreezer: Unfreezer | None = None
    held: list[str] = field(default_factory=list)  # frozen for the whole run on purpose
    peft: bool = False

    def frozen_on_purpose(self) -> set[str]:
        """Names of the parameters fine-tuning froze (for the doctor): an adapter's base, those
        held for the run, the groups the unfreezing schedule holds back for now."""
        if self.peft:
            return {n for n, p in self.model.named_parameters() if not p.requires_grad}
        frozen = set(self.held)
        if self.unfreezer is not None:
            stage = self.unfreezer.stage
            for group in self.groups[: len(self.groups) - stage]:
                frozen.update(group.params)
        return frozen

    def optimizer_groups(self, optim: OptimSpec) -> list[dict] | None:
        """Parameter groups for the recipe's optimizer: one pair (decayed, not decayed) per layer
        group with its discriminative rate, holding every parameter that will train at some point
        of the run; None when the default groups do (no rates by group, no schedule)."""
        s = self.spec
        if not (s.lr_decay or s.lr_range or self.unfreezer):
            return None
        from gradwise.optim import decay_exempt

        params = dict(self.model.named_parameters())
        exempt = decay_exempt(self.model)
        rates = discriminative_rates(len(self.groups), optim.lr, s.lr_decay, s.lr_range)
        held = set(self.held)
        out = []
        for group, lr in zip(self.groups, rates, strict=True):
            chosen = [params[n] for n in group.params if n not in held]
            for suffix, decays in (("decay", True), ("no_decay", False)):
                part = [p for p in chosen if (id(p) not in exempt) == decays]
                if part:
                    out.append({
                        "params": part,
                        "lr": lr,
                        "weight_decay": optim.weight_decay if decays else 0.0,
                        "name": f"{group.name}/{suffix}",
                    })  # fmt: skip
        if not out:
            raise ConfigError("finetune.freeze", s.freeze, "a run that leaves parameters to train")
        return out

    def lines(self) -> list[str]:
        """What fine-tuning did, for the run's log."""
        out = list(self.report.lines()) if self.report is not None else []
        if self.peft:
            from gradwise.finetune.adapters import trainable_counts

            trainable, total = trainable_counts(self.model)
            out.append(
                f"{self.spec.peft} adapter {self.spec.adapter!r}: {trainable:,} of {total:,} "
                f"parameters train ({100 * trainable / max(total, 1):.2f}%)"
            )
        if self.held:
            out.append(
                f"frozen for the run: {len(self.held)} parameters ({_short(self.spec.freeze)})"
            )
        s = self.spec
        if s.lr_decay or s.lr_range:
            how = f"/ {s.lr_decay:g} per group" if s.lr_decay else f"over {list(s.lr_range)}"
            out.append(f"discriminative rates {how} across {len(self.groups)} layer groups")
        if self.unfreezer is not None:
            if s.head_epochs:
                when = f"the head alone for {s.head_epochs} epoch(s), then all at half the rates"
            else:
                every = (
                    f"{s.unfreeze_steps} steps"
                    if s.unfreeze_steps
                    else f"{s.unfreeze_every} epoch(s)"
                )
                when = f"top group first, one more every {every}"
            out.append(f"gradual unfreezing of {len(self.groups)} layer groups: {when}")
        return out


def _short(items: list[str]) -> str:
    return ", ".join(items[:3]) + (", ..." if len(items) > 3 else "")


def prepare(model: nn.Module, spec: FinetuneSpec) -> Finetuning:
    """Make ``model`` ready to fine-tune as ``spec`` says, in this order: pretrained weights
    loaded (with a key report), the adapter wrapped around it, parameters frozen by glob, the
    layer groups and the unfreezing schedule (the position-0 trainable set applied)."""
    peft_with = [k for k in _BY_GROUP if spec.peft and getattr(spec, k)]
    if peft_with:
        raise ConfigError(
            f"finetune.{peft_with[0]}",
            getattr(spec, peft_with[0]),
            "no setting by layer group with finetune.peft (the adapter is what trains)",
            "drop one of them",
        )
    report = None
    if spec.pretrained:
        from gradwise.finetune.pretrained import load_pretrained

        report = load_pretrained(model, spec.pretrained, which=spec.which, strict=spec.strict)
    groups = layer_groups(model, spec.layer_groups)
    if spec.peft:
        from gradwise.finetune.adapters import apply_peft

        model = apply_peft(model, spec, head_names(model))
        return Finetuning(spec, model, report, groups, peft=True)
    held = freeze(model, spec.freeze) if spec.freeze else []
    if spec.unfreeze:
        opened = set(unfreeze(model, spec.unfreeze))
        held = [n for n in held if n not in opened]
    unfreezer = Unfreezer(
        model,
        groups,
        every=spec.unfreeze_every,
        steps=spec.unfreeze_steps,
        head_epochs=spec.head_epochs,
        held=held,
    )
    if unfreezer.active:
        if len(groups) < 2:
            raise ConfigError(
                "finetune.layer_groups", spec.layer_groups,
                "two or more layer groups for gradual unfreezing", f"found {len(groups)}",
            )  # fmt: skip
        unfreezer.apply(0, 0)
    return Finetuning(spec, model, report, groups, unfreezer if unfreezer.active else None, held)
