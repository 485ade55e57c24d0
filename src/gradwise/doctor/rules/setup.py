"""Set-up faults the live Doctor sees through hooks (GW202, GW203, GW207)."""

from __future__ import annotations

from gradwise.doctor.findings import rule
from gradwise.doctor.rules._types import Result

STALE_COSINE = 0.999
"""GW202: cosine between .grad and the gradient of this step's backward passes; 1.0 when zeroed."""
STALE_CHECKS = 2
"""GW202: consecutive checks that must show accumulation."""
NO_GRAD_STEPS = 20
"""GW207: steps after which a trainable parameter that never received a gradient is reported."""


@rule(
    "GW202",
    "gradients-not-zeroed",
    "error",
    "live",
    fixes=[
        "Call optimizer.zero_grad(set_to_none=True) once per optimizer step, before backward().",
        "If you accumulate gradients on purpose, declare it: Doctor(..., accumulation_steps=k) "
        "(the Trainer does this for train.accumulate), and divide the loss by k.",
    ],
    references=[
        "PyTorch FAQ: zero_grad, https://pytorch.org/docs/stable/generated/torch.optim.Optimizer.zero_grad.html"
    ],
)
def stale_gradients(cosines: list[float]) -> Result:
    """Gradients keep accumulating across steps: .grad still holds earlier steps' gradients.

    ## Why it matters
    backward() adds into .grad. Without zero_grad() every step applies the sum of all gradients so
    far, so updates grow and point in stale directions: training drifts or diverges.

    ## How it is detected
    A tensor hook on one weight records the gradient each backward pass computes; at
    ``doctor.step`` .grad is compared (by cosine, so clipping and loss scaling do not matter) with
    the sum of this step's backward passes. They differ when old gradients were not cleared.
    """
    recent = cosines[-STALE_CHECKS:]
    if len(recent) == STALE_CHECKS and max(recent) < STALE_COSINE:
        return (
            ".grad holds gradients from earlier steps: zero_grad() is not called between steps",
            {"cosine_to_fresh_gradient": recent[-1]},
        )
    return None


@rule(
    "GW203",
    "eval-in-train-mode",
    "warning",
    "live",
    fixes=[
        "Call model.eval() before evaluating and model.train() before training again.",
        "Use torch.inference_mode() together with model.eval(): one turns off autograd, the other "
        "switches dropout and batch-norm behaviour.",
    ],
    references=[
        "PyTorch docs, Module.eval: https://pytorch.org/docs/stable/generated/torch.nn.Module.html#torch.nn.Module.eval"
    ],
)
def eval_in_train_mode(modules: list[str]) -> Result:
    """The model ran without gradients (evaluation) while dropout or batch-norm were in training mode.

    ## Why it matters
    In training mode dropout zeroes random units and batch-norm normalises with the batch's own
    statistics (and updates its running averages with evaluation data): evaluation numbers are
    noisy and wrong, and the model is silently changed by the evaluation.

    ## How it is detected
    A forward pre-hook on the model sees forward passes under ``torch.no_grad()``/``inference_mode``
    while the model is in training mode and contains dropout or batch-norm layers.
    """
    if not modules:
        return None
    return (
        f"evaluation ran with {len(modules)} dropout/batch-norm layers in training mode (e.g. {modules[0]})",
        {"modules_in_training_mode": len(modules)},
    )


@rule(
    "GW207",
    "params-without-gradients",
    "warning",
    "live",
    fixes=[
        "Pass all trainable parameters to the optimizer (model.parameters()), including layers "
        "added after the optimizer was built.",
        "Remove layers that are never used in forward(), or freeze them (requires_grad_(False)).",
        "Look for .detach(), .data, torch.no_grad() or integer casts that cut the graph.",
    ],
    references=[
        "PyTorch docs, Autograd mechanics: https://pytorch.org/docs/stable/notes/autograd.html"
    ],
)
def params_without_gradients(never: list[str], not_in_optimizer: list[str], total: int) -> Result:
    """Trainable parameters never receive a gradient, or the optimizer does not update them.

    ## Why it matters
    Such parameters never change: a layer that is unused, cut from the graph by a detach, or
    forgotten when the optimizer was built silently keeps its initial random values.

    ## How it is detected
    After the first steps, parameters with ``requires_grad`` whose ``.grad`` has always been None;
    and trainable parameters that belong to none of the optimizer's parameter groups.
    """
    if not_in_optimizer:
        return (
            f"{len(not_in_optimizer)} trainable parameters are not in the optimizer (e.g. {not_in_optimizer[0]})",
            {"not_in_optimizer": len(not_in_optimizer), "trainable": total},
        )
    if never:
        return (
            f"{len(never)} trainable parameters never received a gradient (e.g. {never[0]})",
            {"without_gradient": len(never), "trainable": total},
        )
    return None
