"""Rule dispatch: call every rule whose time has come with the fields it declares.

A rule's parameters name what it reads (the fields below); those without a default are what it
needs, and it is skipped while any of them is missing (a live run has no ``val_inputs``; a batch
without targets runs no target rule). Fields that cost something are computed on first use and at
most once per dispatch. Every call is guarded: a rule that raises is switched off for the run and
reported once, as an info finding under its own code, and training goes on. The live Doctor and
preflight both dispatch through :func:`run`, so neither pairs codes with functions by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from gradwise.doctor.findings import RULES, Rule, When

FIELDS = {
    "step": "the step being judged (0-based)",
    "signals": "the Doctor's Signals: per-step losses, gradient norms, activations, evaluations",
    "model": "the model being trained",
    "optimizer": "its optimizer (None when not given)",
    "inputs": "the batch's inputs (a tensor)",
    "outputs": "the model's output for the batch (a tensor: the logits)",
    "targets": "the batch's targets (a tensor)",
    "batch_size": "rows in the batch",
    "layer_input": "what the first Linear/Conv layer received in this step's forward pass",
    "loss_kind": "the loss's kind (see rules.model.LOSS_KINDS), given or inferred",
    "loss_graph": "the loss's autograd graph, summarised (see gradwise.doctor.graph)",
    "loss_value": "the step's loss as a float (the first steps only: reading it synchronises)",
    "task": "the task's name or gradwise Task, when given",
    "weighted": "whether the loss already weights classes",
    "pooled_targets": "targets of the first steps, pooled (class balance needs more than a batch)",
    "num_classes": "the number of classes, from the outputs",
    "activation_stds": "output std of each Linear/Conv layer in the first forward pass",
    "final_op": "the torch operation that produced the output (preflight's probe)",
    "cosines": "cosines between .grad and each sampled step's fresh gradient (GW202)",
    "accumulation": "per checked micro-batch: (position in its accumulation window, "
    "||.grad|| / ||its fresh gradient||, their cosine)",
    "reused": "modules with running statistics called more often than the module around them",
    "repeat": "how far a second eval-mode pass over the same inputs differs (a probe)",
    "train_inputs": "the whole training split's inputs (preflight)",
    "val_inputs": "the whole validation split's inputs (preflight)",
    "mixing": "how far per-sample outputs move when the batch is permuted or split (a probe)",
}
"""Every field a rule may read, with what it holds."""

_ALIASES = {"s": "signals"}  # the dynamics rules' short name for the signals


class Context:
    """What a dispatch knows: values given, and providers that compute a field on first use."""

    def __init__(
        self, providers: dict[str, Callable[[], Any]] | None = None, **values: Any
    ) -> None:
        unknown = set(values) | set(providers or {})
        unknown -= set(FIELDS)
        if unknown:
            raise ValueError(f"unknown context fields: {sorted(unknown)}")
        self._values = values
        self._providers = providers or {}

    def get(self, name: str) -> Any:
        name = _ALIASES.get(name, name)
        if name not in self._values and name in self._providers:
            self._values[name] = self._providers.pop(name)()
        return self._values.get(name)

    def ready(self, rule: Rule) -> bool:
        return all(
            _ALIASES.get(n, n) in self._values or _ALIASES.get(n, n) in self._providers
            for n in rule.needs
        )


def rules_at(when: When) -> list[Rule]:
    return [r for r in RULES.values() if r.when == when and r.check is not None]


def run(
    when: When | Iterable[Rule],
    context: Context,
    *,
    skip: set[str],
    on_result: Callable[[Rule, tuple[str, dict[str, float]]], None],
    on_failure: Callable[[Rule, Exception], None],
) -> None:
    """Call each rule of ``when`` (or the given rules) that is not in ``skip`` and has what it
    needs; ``on_result`` gets each fault found, ``on_failure`` each rule that raised (the caller
    adds it to ``skip``)."""
    for rule in rules_at(when) if isinstance(when, str) else when:
        if rule.code in skip:
            continue
        try:
            if not context.ready(rule):
                continue
            kwargs = {name: context.get(name) for name in rule.reads}
            if any(kwargs[name] is None for name in rule.needs):
                continue
            kwargs = {k: v for k, v in kwargs.items() if v is not None or k not in rule.defaulted}
            result = rule.check(**kwargs)
        except Exception as exc:  # a rule's failure is the doctor's, never the user's run's
            on_failure(rule, exc)
            continue
        if result is not None:
            on_result(rule, result)
